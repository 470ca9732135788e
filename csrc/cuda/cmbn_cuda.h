#pragma once
// The CUDA implementations of the ops whose schemas cmbn_ext/ops.py defines.
#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "kernel_types.h"

namespace cmbn {

// cmbn_ext::cmbn_forward: (y, mean, var, batch_mean, batch_var, b); y = act(normalized x).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmbn_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& history_count,
    const at::Tensor& history_mean, const at::Tensor& history_var, double eps,
    std::optional<double> ema_momentum, bool exact_grad, int64_t activation,
    double activation_param);

// cmbn_ext::cmbn_batch_stats: (batch_mean, batch_var).
std::tuple<at::Tensor, at::Tensor> cmbn_batch_stats_cuda(const at::Tensor& x);

// cmbn_ext::cmbn_pooled_forward: (y, mean, var, b).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmbn_pooled_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& count, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, const at::Tensor& history_count, const at::Tensor& history_mean,
    const at::Tensor& history_var, double eps, std::optional<double> ema_momentum);

// cmbn_ext::cmbn_backward: (grad_x, grad_weight, grad_bias). grad_y is the activation output's
// gradient; from_output: x is the layer's output (an invertible activation), from which the kernels
// recover the normalized input with bias and weight.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cmbn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, const at::Tensor& b, double eps, bool exact_grad,
    const std::optional<at::Tensor>& bias, int64_t activation, double activation_param,
    bool from_output);

// cmbn_ext::cmbn_backward_sums: (sum_dy, sum_dy_xc).
std::tuple<at::Tensor, at::Tensor> cmbn_backward_sums_cuda(const at::Tensor& grad_y,
                                                           const at::Tensor& x,
                                                           const at::Tensor& batch_mean);

// cmbn_ext::cmbn_backward_dx: grad_x.
at::Tensor cmbn_backward_dx_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& var, const at::Tensor& batch_mean,
                                 const at::Tensor& batch_var, const at::Tensor& b,
                                 const at::Tensor& sum_dy, const at::Tensor& sum_dy_xc,
                                 const at::Tensor& count, double eps, bool exact_grad);

// cmbn_ext::cmbn_update_state: the window and running statistics, in place (one launch).
// m: the micro-batch's count, a 0-dim int64 tensor on the state's device (the kernel reads it there)
// or on the CPU; a count of 0 changes nothing. every_micro_batch: cumulative and deferred modes update
// the running statistics after every micro-batch from the pooled statistics (Darknet's CmBN) instead
// of once per window.
void cmbn_update_state_cuda(at::Tensor& window_count, at::Tensor& window_mean, at::Tensor& window_var,
                            at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& m,
                            const at::Tensor& mean, const at::Tensor& var,
                            const at::Tensor& batch_mean, const at::Tensor& batch_var,
                            std::string_view layer_mode, std::optional<int64_t> window,
                            std::optional<double> momentum, bool every_micro_batch);

// The same with m known on the host (cmbn_train_forward's, from x's shape: train_forward.h):
// a kernel argument.
void cmbn_update_state_host_count_cuda(
    at::Tensor& window_count, at::Tensor& window_mean, at::Tensor& window_var,
    at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, int64_t m, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& batch_mean, const at::Tensor& batch_var,
    std::string_view layer_mode, std::optional<int64_t> window, std::optional<double> momentum,
    bool every_micro_batch);

// What cmbn_forward / cmbn_backward launch for x (the same planning code as their launchers).
LaunchPlan cmbn_forward_plan(const at::Tensor& x);
LaunchPlan cmbn_backward_plan(const at::Tensor& x);

// cmbn_ext::cmbn_kernel_plan: that plan as integers (cmbn_ext/kernel_plan.py names them).
std::vector<int64_t> cmbn_kernel_plan_cuda(const at::Tensor& x, bool backward);

}  // namespace cmbn
