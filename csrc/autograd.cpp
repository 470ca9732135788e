// Autograd for cmbn_ext::cmbn_train_forward, in C++ so that a training micro-batch costs one
// dispatch forward and one backward node, as torch's BatchNorm does. The forward runs the op below
// autograd (whatever backend serves it: the CUDA kernels, or the reference on the CPU); the backward
// calls cmbn_ext::cmbn_backward, from x, or from y where keep_output asks for it (memory="lean": y
// is the tensor the next layer keeps anyway). Only y is differentiable: the statistics are outputs for the state,
// and the window state the op updates is never part of the graph (SPEC section 4: history is a
// constant).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace cmbn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Statistics = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int kInputs = 20;  // arguments of cmbn_train_forward

class TrainForward : public torch::autograd::Function<TrainForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, at::Tensor& window_count,
                               at::Tensor& window_mean, at::Tensor& window_var,
                               at::Tensor& window_step,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var,
                               const std::optional<at::Tensor>& num_batches_tracked, double eps,
                               std::optional<double> ema_momentum, bool exact_grad,
                               std::string_view layer_mode, std::optional<int64_t> window,
                               std::optional<double> momentum, bool every_micro_batch,
                               int64_t activation, double activation_param, bool keep_output) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("cmbn_ext::cmbn_train_forward", "")
                               .typed<Statistics(const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&, at::Tensor&,
                                                 at::Tensor&, at::Tensor&, at::Tensor&,
                                                 const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&, double,
                                                 std::optional<double>, bool, std::string_view,
                                                 std::optional<int64_t>, std::optional<double>,
                                                 bool, int64_t, double, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, var, batch_mean, batch_var, b] =
        op.call(x, weight, bias, window_count, window_mean, window_var, window_step, running_mean,
                running_var, num_batches_tracked, eps, ema_momentum, exact_grad,
                layer_mode, window, momentum, every_micro_batch, activation, activation_param,
                keep_output);
    ctx->save_for_backward({keep_output ? y : x, weight.value_or(at::Tensor()),
                            bias.value_or(at::Tensor()), mean, var, batch_mean, batch_var, b});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["exact_grad"] = exact_grad;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["activation_param"] = activation_param;
    ctx->saved_data["keep_output"] = keep_output;
    ctx->saved_data["bias_dtype"] =
        bias.has_value() && bias->defined() ? c10::IValue(bias->scalar_type()) : c10::IValue();
    ctx->mark_non_differentiable({mean, var, batch_mean, batch_var, b});
    ctx->set_materialize_grads(false);  // no zero tensors (and launches) for the statistics' grads
    return {y, mean, var, batch_mean, batch_var, b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "cmbn_ext: double backward (create_graph=True) through CrossMiniBatchNorm is not "
                "supported");
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("cmbn_ext::cmbn_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, double, bool, const std::optional<at::Tensor>&, int64_t, double,
                bool)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input_or_output = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& bias = saved[2];
    variable_list grads(kInputs);
    if (!grad_outputs[0].defined()) return grads;  // y did not reach the loss
    auto [grad_x, grad_weight, grad_bias] =
        op.call(grad_outputs[0], input_or_output,
                weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt, saved[3],
                saved[4], saved[5], saved[6], saved[7], ctx->saved_data["eps"].toDouble(),
                ctx->saved_data["exact_grad"].toBool(),
                bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
                ctx->saved_data["activation"].toInt(),
                ctx->saved_data["activation_param"].toDouble(),
                ctx->saved_data["keep_output"].toBool());
    if (ctx->needs_input_grad(0)) grads[0] = grad_x;
    if (ctx->needs_input_grad(1)) grads[1] = grad_weight.to(weight.scalar_type());
    if (ctx->needs_input_grad(2)) grads[2] = grad_bias.to(ctx->saved_data["bias_dtype"].toScalarType());
    return grads;
  }
};

Statistics train_forward_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, at::Tensor& window_count,
                                  at::Tensor& window_mean, at::Tensor& window_var,
                                  at::Tensor& window_step,
                                  const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var,
                                  const std::optional<at::Tensor>& num_batches_tracked, double eps,
                                  std::optional<double> ema_momentum, bool exact_grad,
                                  std::string_view layer_mode, std::optional<int64_t> window,
                                  std::optional<double> momentum, bool every_micro_batch,
                                  int64_t activation, double activation_param, bool keep_output) {
  auto outputs = TrainForward::apply(
      x, weight, bias, window_count, window_mean, window_var, window_step, running_mean,
      running_var, num_batches_tracked, eps, ema_momentum, exact_grad,
      layer_mode, window, momentum, every_micro_batch, activation, activation_param, keep_output);
  return {outputs[0], outputs[1], outputs[2], outputs[3], outputs[4], outputs[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cmbn_ext, Autograd, m) {
  m.impl("cmbn_train_forward", TORCH_FN(train_forward_autograd));
}

}  // namespace cmbn
