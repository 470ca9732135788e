#pragma once
// The argument checks both kernel families (cpu/, cuda/) run before any work, with messages that name
// the op and the argument: bad input is a Python error, never a crash or a half-written buffer.
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "activation.h"

namespace cmbn {

inline bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

// Statistics run in fp64 for fp64 input, in fp32 for everything else (SPEC section 3).
inline at::ScalarType stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// x (or another (N, C, *) input) on the kernels' device type, in a dtype they compute.
inline void check_input(const char* op, const at::Tensor& x, const char* name,
                        c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, op, ": ", name, " must be a ",
              c10::DeviceTypeName(device), " tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 2, op, ": ", name, " must have shape (N, C, *), got ", x.dim(),
              " dimension(s)");
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
}

inline void check_same_device(const char* op, const at::Tensor& t, const char* name,
                              const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// A (C,) float vector on x's device (a statistic, a sum, or weight/bias).
inline void check_channel_vector(const char* op, const at::Tensor& t, const char* name,
                                 const at::Tensor& x) {
  check_same_device(op, t, name, x);
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, " must be a float tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape (C,) = (",
              x.size(1), ",), got ", t.sizes());
}

// weight and bias may be absent (affine=False).
inline void check_optional_channel_vector(const char* op, const std::optional<at::Tensor>& t,
                                          const char* name, const at::Tensor& x) {
  if (t.has_value() && t->defined()) check_channel_vector(op, *t, name, x);
}

// The window the forward pools with: int64 counts and float statistics, (S, C) each.
inline void check_history(const char* op, const at::Tensor& x, const at::Tensor& count,
                          const at::Tensor& mean, const at::Tensor& var) {
  const int64_t channels = x.size(1);
  TORCH_CHECK(count.scalar_type() == at::kLong, op, ": history_count must be int64, got ",
              count.scalar_type());
  TORCH_CHECK(count.dim() == 2 && count.size(1) == channels, op,
              ": history_count must have shape (S, C) with C = ", channels, ", got ", count.sizes());
  const auto check_like_count = [&](const at::Tensor& t, const char* name) {
    check_same_device(op, t, name, x);
    TORCH_CHECK(t.sizes() == count.sizes(), op, ": ", name, " must have the shape of history_count ",
                count.sizes(), ", got ", t.sizes());
  };
  check_like_count(count, "history_count");
  check_like_count(mean, "history_mean");
  check_like_count(var, "history_var");
  TORCH_CHECK(is_supported_float(mean.scalar_type()), op,
              ": history_mean must be a float tensor, got ", mean.scalar_type());
  TORCH_CHECK(is_supported_float(var.scalar_type()), op,
              ": history_var must be a float tensor, got ", var.scalar_type());
}

// The arguments of the ops that pool and normalize (cmbn_forward, cmbn_pooled_forward), on `device`.
inline void check_pooling_args(const char* op, const at::Tensor& x,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& history_count,
                               const at::Tensor& history_mean, const at::Tensor& history_var,
                               c10::DeviceType device) {
  check_input(op, x, "x", device);
  check_optional_channel_vector(op, weight, "weight", x);
  check_optional_channel_vector(op, bias, "bias", x);
  check_history(op, x, history_count, history_mean, history_var);
}

// grad_y of x's shape on x's device, in any float dtype, or in x's own with `dtype_of_x` (the ops
// that read it in another dtype convert it as they copy it into x's layout).
inline void check_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                         bool dtype_of_x = false) {
  check_same_device(op, grad_y, "grad_y", x);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have the shape of x ", x.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK(is_supported_float(grad_y.scalar_type()), op, ": grad_y must be a float tensor, got ",
              grad_y.scalar_type());
  TORCH_CHECK(!dtype_of_x || grad_y.scalar_type() == x.scalar_type(), op,
              ": grad_y must have the dtype of x (", x.scalar_type(), "), got ", grad_y.scalar_type());
}

// The activation arguments of a fused op (cmbn_ext/activations.py's codes): a known code, and
// from_output (the backward reads the layer's output) only for an activation the output determines
// the input of. ValueError, as the reference raises.
inline void check_activation(const char* op, int64_t activation, double activation_param,
                             bool from_output = false) {
  TORCH_CHECK_VALUE(activation >= 0 && activation < kActivationCount, op,
                    ": activation must be a code from 0 to ", kActivationCount - 1,
                    " (cmbn_ext.activations: identity, relu, leaky_relu, elu, silu, mish, "
                    "hardswish), got ", activation);
  TORCH_CHECK_VALUE(!from_output || activation_invertible(activation, activation_param), op,
                    ": from_output needs an invertible activation (identity, leaky_relu with a "
                    "positive slope, elu with a positive alpha), got activation ", activation,
                    " with activation_param ", activation_param);
}

}  // namespace cmbn
