#pragma once
// cmbn_ext::cmbn_train_forward for either kernel family: a training micro-batch in one op, the forward
// followed by the state update on its statistics, so that the layer pays for one dispatch per training
// forward. Forward is the family's cmbn_forward, UpdateState its update with m known on the host.
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

namespace cmbn {

template <auto Forward, auto UpdateState>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::Tensor& window_count, at::Tensor& window_mean,
    at::Tensor& window_var, at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, double eps,
    std::optional<double> ema_momentum, bool exact_grad, std::string_view layer_mode,
    std::optional<int64_t> window, std::optional<double> momentum, bool every_micro_batch,
    int64_t activation, double activation_param, bool keep_output) {
  (void)keep_output;  // which tensor autograd saves for the backward: the op computes the same
  // Deferred mode normalizes each micro-batch alone: its window is for the running statistics only
  // (no history slots); the other modes pool the whole window, passed as it is (a narrow() view
  // would cost a dispatch per tensor and call).
  const bool deferred = layer_mode == "deferred";
  const auto history = [deferred](const at::Tensor& t) { return deferred ? t.narrow(0, 0, 0) : t; };
  auto outputs = Forward(x, weight, bias, history(window_count), history(window_mean),
                         history(window_var), eps, ema_momentum, exact_grad, activation,
                         activation_param);
  const int64_t channels = x.dim() >= 2 ? x.size(1) : 0;
  const int64_t m = channels ? x.numel() / channels : 0;
  if (m > 0) {  // an empty micro-batch leaves the state as it is
    const auto& [y, mean, var, batch_mean, batch_var, b] = outputs;
    // m from the shape, passed by value: no count tensor to make (or copy to a GPU) per call.
    UpdateState(window_count, window_mean, window_var, window_step, running_mean, running_var,
                num_batches_tracked, m, mean, var, batch_mean, batch_var, layer_mode, window,
                momentum, every_micro_batch);
  }
  return outputs;
}

}  // namespace cmbn
