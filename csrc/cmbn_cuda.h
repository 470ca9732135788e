#pragma once
// The CUDA implementations of the ops whose schemas cmbn_ext/ops.py defines.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace cmbn {

// cmbn_ext::cmbn_forward: (y, mean, var, batch_mean, batch_var, b).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmbn_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& history_count,
    const at::Tensor& history_mean, const at::Tensor& history_var, double eps,
    std::optional<double> ema_momentum, bool exact_grad);

// cmbn_ext::cmbn_backward: (grad_x, grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cmbn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, const at::Tensor& b, double eps, bool exact_grad);

}  // namespace cmbn
