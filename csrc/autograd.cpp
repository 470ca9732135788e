// Autograd for cmbn_ext::cmbn_train_forward, in C++ so that a training micro-batch costs one
// dispatch forward and one backward node, as torch's BatchNorm does. The forward runs the op below
// autograd (whatever backend serves it: the CUDA kernels, or the CPU kernels); the backward calls
// cmbn_ext::cmbn_backward, from x, or from y where keep_output asks for it (memory="lean": y is the
// tensor the next layer keeps anyway). Only y is differentiable: the statistics are outputs for the state, and
// the window state the op updates is never part of the graph (SPEC section 4: history is a
// constant).
//
// The backward node is written the way torch's generated BatchNorm node is (a Node with three next
// edges and its saved tensors as members), not with torch::autograd::Function: that one tracks all
// twenty arguments and keeps its options in a map of IValues, which costs more host time per call
// than the whole BatchNorm node.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

namespace cmbn {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using Statistics = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor defined_or_empty(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? *tensor : at::Tensor();
}

std::optional<at::Tensor> optional_if_defined(const at::Tensor& tensor) {
  return tensor.defined() ? std::optional<at::Tensor>(tensor) : std::nullopt;
}

// The backward of one training micro-batch: grads of (x, weight, bias) from the gradient of y.
struct TrainForwardBackward : public torch::autograd::Node {
  SavedVariable input_or_output, weight, bias, mean, var, batch_mean, batch_var, b;
  double eps = 0;
  bool exact_grad = false;
  int64_t activation = 0;
  double activation_param = 0;
  bool from_output = false;
  std::optional<at::ScalarType> weight_dtype, bias_dtype;

  std::string name() const override { return "CrossMiniBatchNormBackward"; }

  void release_variables() override {
    for (SavedVariable* saved :
         {&input_or_output, &weight, &bias, &mean, &var, &batch_mean, &batch_var, &b}) {
      saved->reset_data();
    }
  }

  variable_list apply(variable_list&& grads) override {
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
    variable_list result(3);
    if (!grads[0].defined()) return result;  // y did not reach the loss
    auto [grad_x, grad_weight, grad_bias] =
        op.call(grads[0], input_or_output.unpack(getptr()), optional_if_defined(weight.unpack()),
                mean.unpack(), var.unpack(), batch_mean.unpack(), batch_var.unpack(), b.unpack(),
                eps, exact_grad, optional_if_defined(bias.unpack()), activation, activation_param,
                from_output);
    if (task_should_compute_output(0)) result[0] = grad_x;
    // In the parameters' dtype: a no-op check (no dispatch) for the usual fp32 parameters.
    const auto in_dtype = [](const at::Tensor& grad, at::ScalarType dtype) {
      return grad.scalar_type() == dtype ? grad : grad.to(dtype);
    };
    if (weight_dtype && task_should_compute_output(1)) {
      result[1] = in_dtype(grad_weight, *weight_dtype);
    }
    if (bias_dtype && task_should_compute_output(2)) result[2] = in_dtype(grad_bias, *bias_dtype);
    return result;
  }
};

// A new node, owned as this torch's autograd owns nodes (a shared_ptr before torch 2.13, an
// intrusive_ptr since).
template <typename NodeType>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>) {
    return c10::make_intrusive<NodeType>();
  } else {
    return std::shared_ptr<NodeType>(new NodeType());
  }
}

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
  Statistics outputs;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    outputs = op.call(x, weight, bias, window_count, window_mean, window_var, window_step,
                      running_mean, running_var, num_batches_tracked, eps, ema_momentum, exact_grad,
                      layer_mode, window, momentum, every_micro_batch, activation, activation_param,
                      keep_output);
  }
  if (!torch::autograd::compute_requires_grad(x, weight, bias)) return outputs;
  auto& [y, mean, var, batch_mean, batch_var, b] = outputs;
  auto node = make_node<TrainForwardBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
  node->eps = eps;
  node->exact_grad = exact_grad;
  node->activation = activation;
  node->activation_param = activation_param;
  node->from_output = keep_output;
  if (weight.has_value() && weight->defined()) node->weight_dtype = weight->scalar_type();
  if (bias.has_value() && bias->defined()) node->bias_dtype = bias->scalar_type();
  torch::autograd::set_history(y, node);
  // Saved after set_history (an output is saved without a reference to its node: no cycle), and in
  // the order of CrossMiniBatchNormFunction, which recomputes this forward under non-reentrant
  // activation checkpointing and must save the same tensors in the same order.
  node->input_or_output = keep_output ? SavedVariable(y, true) : SavedVariable(x, false);
  node->weight = SavedVariable(defined_or_empty(weight), false);
  node->bias = SavedVariable(defined_or_empty(bias), false);
  node->mean = SavedVariable(mean, false);
  node->var = SavedVariable(var, false);
  node->batch_mean = SavedVariable(batch_mean, false);
  node->batch_var = SavedVariable(batch_var, false);
  node->b = SavedVariable(b, false);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(cmbn_ext, Autograd, m) {
  m.impl("cmbn_train_forward", TORCH_FN(train_forward_autograd));
}

}  // namespace cmbn
