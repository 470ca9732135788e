#pragma once
// The CPU implementations of the ops whose schemas cmbn_ext/ops.py defines: the same arguments and
// results as the CUDA ones (cuda/cmbn_cuda.h), computed with at::parallel_for and at::vec on the host.
#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace cmbn {

// cmbn_ext::cmbn_forward: (y, mean, var, batch_mean, batch_var, b), y = act(BN(x)) with activation.h's
// code and parameter.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmbn_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& history_count,
    const at::Tensor& history_mean, const at::Tensor& history_var, double eps,
    std::optional<double> ema_momentum, bool exact_grad, int64_t activation,
    double activation_param);

// cmbn_ext::cmbn_batch_stats: (batch_mean, batch_var).
std::tuple<at::Tensor, at::Tensor> cmbn_batch_stats_cpu(const at::Tensor& x);

// cmbn_ext::cmbn_pooled_forward: (y, mean, var, b).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmbn_pooled_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& count, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, const at::Tensor& history_count, const at::Tensor& history_mean,
    const at::Tensor& history_var, double eps, std::optional<double> ema_momentum);

// cmbn_ext::cmbn_backward: (grad_x, grad_weight, grad_bias). grad_y is the gradient of act's output;
// x is the layer's input, or with from_output (an invertible activation) its output.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cmbn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, const at::Tensor& b, double eps, bool exact_grad,
    const std::optional<at::Tensor>& bias, int64_t activation, double activation_param,
    bool from_output);

// cmbn_ext::cmbn_backward_sums: (sum_dy, sum_dy_xc).
std::tuple<at::Tensor, at::Tensor> cmbn_backward_sums_cpu(const at::Tensor& grad_y,
                                                          const at::Tensor& x,
                                                          const at::Tensor& batch_mean);

// cmbn_ext::cmbn_backward_dx: grad_x.
at::Tensor cmbn_backward_dx_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& var, const at::Tensor& batch_mean,
                                const at::Tensor& batch_var, const at::Tensor& b,
                                const at::Tensor& sum_dy, const at::Tensor& sum_dy_xc,
                                const at::Tensor& count, double eps, bool exact_grad);

// cmbn_ext::cmbn_update_state: the window and running statistics, in place.
void cmbn_update_state_cpu(at::Tensor& window_count, at::Tensor& window_mean, at::Tensor& window_var,
                           at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var,
                           const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& m,
                           const at::Tensor& mean, const at::Tensor& var,
                           const at::Tensor& batch_mean, const at::Tensor& batch_var,
                           std::string_view layer_mode, std::optional<int64_t> window,
                           std::optional<double> momentum, bool every_micro_batch);

// The same with m known on the host (cmbn_train_forward's, from x's shape: train_forward.h):
// no count tensor to make.
void cmbn_update_state_host_count_cpu(
    at::Tensor& window_count, at::Tensor& window_mean, at::Tensor& window_var,
    at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, int64_t m, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& batch_mean, const at::Tensor& batch_var,
    std::string_view layer_mode, std::optional<int64_t> window, std::optional<double> momentum,
    bool every_micro_batch);

}  // namespace cmbn
