// The CmBN backward family on the CPU (SPEC section 4, reference.backward):
//   cmbn_backward:      the per-channel sums sum(dy) and sum(dy * (x - batch_mean)) in one pass over x
//                       and dy, then dx = coef_dy * dy + coef_xc * (x - batch_mean) + const for either
//                       gradient, and grad_weight, grad_bias; through an activation, g = dy * act'(z)
//                       in place of dy, and from the output the normalized input in place of
//                       x - batch_mean (cpu_loops.h);
//   cmbn_backward_sums: the two sums alone;
//   cmbn_backward_dx:   dx alone, from sums the caller gives (all-reduced across processes).
// This file checks the arguments, allocates the outputs and hands the pointers to the loops
// (cpu_loops.h) of the instruction set this CPU runs.
#include <ATen/Dispatch.h>

#include <cmath>

#include "cmbn_cpu.h"
#include "cpu_kernel_utils.h"

#define CMBN_CPU_LOOPS baseline
#include "cpu_loops.h"

namespace cmbn {
namespace {

using namespace cmbn::cpu;

template <typename scalar_t, typename acc_t>
void run_backward(const BackwardCall<scalar_t, acc_t>& call) {
#ifdef CMBN_CPU_AVX2_LOOPS
  if (use_avx2_loops()) return avx2::run_backward(call);
#endif
  baseline::run_backward(call);
}

// The statistics saved by the forward, in the statistics' dtype and contiguous (kept alive for the
// call; no copies for the tensors the forward returns).
struct SavedStatistics {
  at::Tensor weight, mean, var, batch_mean, batch_var, b;
};

SavedStatistics saved_statistics(const char* op, const at::Tensor& x,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& var, const at::Tensor& batch_mean,
                                 const at::Tensor& batch_var, const at::Tensor& b) {
  check_optional_channel_vector(op, weight, "weight", x);
  check_channel_vector(op, mean, "mean", x);
  check_channel_vector(op, var, "var", x);
  check_channel_vector(op, batch_mean, "batch_mean", x);
  check_channel_vector(op, batch_var, "batch_var", x);
  check_channel_vector(op, b, "b", x);
  const at::ScalarType dtype = stats_dtype(x.scalar_type());
  return SavedStatistics{optional_as_dtype(weight, dtype),
                         as_dtype_contiguous(mean, dtype),
                         as_dtype_contiguous(var, dtype),
                         as_dtype_contiguous(batch_mean, dtype),
                         as_dtype_contiguous(batch_var, dtype),
                         as_dtype_contiguous(b, dtype)};
}

template <typename acc_t>
GradParams<acc_t> grad_params(const SavedStatistics& saved, double eps, bool exact, int64_t count) {
  GradParams<acc_t> p{};
  p.weight = data_or_null<acc_t>(saved.weight);
  p.mean = saved.mean.const_data_ptr<acc_t>();
  p.var = saved.var.const_data_ptr<acc_t>();
  p.batch_mean = saved.batch_mean.const_data_ptr<acc_t>();
  p.batch_var = saved.batch_var.const_data_ptr<acc_t>();
  p.current_weight = saved.b.const_data_ptr<acc_t>();
  p.eps = static_cast<acc_t>(eps);
  p.exact = exact;
  p.count = count;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmbn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, const at::Tensor& b, double eps, bool exact_grad,
    const std::optional<at::Tensor>& bias, int64_t activation, double activation_param,
    bool from_output) {
  const char* op = "cmbn_backward";
  check_input(op, x, "x", c10::DeviceType::CPU);
  check_grad_y(op, grad_y, x, /*dtype_of_x=*/true);
  check_activation(op, activation, activation_param, from_output);
  check_optional_channel_vector(op, bias, "bias", x);
  const SavedStatistics saved = saved_statistics(op, x, weight, mean, var, batch_mean, batch_var, b);
  // The bias only moves z (the activation's input) and the output: unused without either.
  const at::Tensor bias_c = activation != kIdentity || from_output
                                ? optional_as_dtype(bias, stats_dtype(x.scalar_type()))
                                : at::Tensor();

  const int64_t channels = x.size(1);
  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty({channels}, x.options().dtype(acc_dtype));
  at::Tensor grad_bias = at::empty({channels}, x.options().dtype(acc_dtype));
  if (channels > 0) {
    // x and grad_y are read in grad_x's layout (x's own when x is dense): a grad_y in another
    // memory format (or expanded, as from y.sum()) is copied into it first.
    const WorkTensors work = work_tensors(x, grad_x);
    const at::Tensor grad_y_work = with_layout_of(grad_y, work.out);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_backward_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      GradParams<acc_t> params =
          grad_params<acc_t>(saved, eps, exact_grad, work.info.values_per_channel());
      params.grad_weight = grad_weight.mutable_data_ptr<acc_t>();
      params.grad_bias = grad_bias.mutable_data_ptr<acc_t>();
      params.bias = data_or_null<acc_t>(bias_c);
      params.activation = activation;
      params.activation_param = activation_param;
      params.from_output = from_output;
      // The sums land in the parameter gradients' buffers first; dx_coefficients then overwrites
      // each channel's with its gradient after reading it.
      BackwardCall<scalar_t, acc_t> call{};
      call.info = work.info;
      call.grad_y = grad_y_work.const_data_ptr<scalar_t>();
      call.x = work.x.const_data_ptr<scalar_t>();
      call.grad_x = work.out.mutable_data_ptr<scalar_t>();
      call.batch_mean = saved.batch_mean.const_data_ptr<acc_t>();
      call.sum_dy = params.grad_bias;
      call.sum_dy_xc = params.grad_weight;
      call.params = &params;
      run_backward(call);
    });
    if (!work.out.is_same(grad_x)) grad_x.copy_(work.out);
  }
  // The fake returns empty_like(mean): match its dtype when mean came in another float dtype.
  if (mean.scalar_type() != acc_dtype) {
    grad_weight = grad_weight.to(mean.scalar_type());
    grad_bias = grad_bias.to(mean.scalar_type());
  }
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> cmbn_backward_sums_cpu(const at::Tensor& grad_y,
                                                          const at::Tensor& x,
                                                          const at::Tensor& batch_mean) {
  const char* op = "cmbn_backward_sums";
  check_input(op, x, "x", c10::DeviceType::CPU);
  check_grad_y(op, grad_y, x);
  check_channel_vector(op, batch_mean, "batch_mean", x);
  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  const int64_t channels = x.size(1);
  at::Tensor sum_dy = at::empty({channels}, x.options().dtype(acc_dtype));
  at::Tensor sum_dy_xc = at::empty({channels}, x.options().dtype(acc_dtype));
  if (channels == 0) return {sum_dy, sum_dy_xc};

  const at::Tensor batch_mean_c = as_dtype_contiguous(batch_mean, acc_dtype);
  const ReadableTensor readable_x = readable(x);
  // grad_y is read in x's dtype and layout, as the reference reads it.
  const at::Tensor grad_y_work = with_layout_of(grad_y, readable_x.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_backward_sums_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    BackwardCall<scalar_t, acc_t> call{};
    call.info = readable_x.info;
    call.grad_y = grad_y_work.const_data_ptr<scalar_t>();
    call.x = readable_x.x.const_data_ptr<scalar_t>();
    call.batch_mean = batch_mean_c.const_data_ptr<acc_t>();
    call.sum_dy = sum_dy.mutable_data_ptr<acc_t>();
    call.sum_dy_xc = sum_dy_xc.mutable_data_ptr<acc_t>();
    run_backward(call);
  });
  return {sum_dy, sum_dy_xc};
}

at::Tensor cmbn_backward_dx_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& var, const at::Tensor& batch_mean,
                                const at::Tensor& batch_var, const at::Tensor& b,
                                const at::Tensor& sum_dy, const at::Tensor& sum_dy_xc,
                                const at::Tensor& count, double eps, bool exact_grad) {
  const char* op = "cmbn_backward_dx";
  check_input(op, x, "x", c10::DeviceType::CPU);
  check_grad_y(op, grad_y, x);
  const SavedStatistics saved = saved_statistics(op, x, weight, mean, var, batch_mean, batch_var, b);
  check_channel_vector(op, sum_dy, "sum_dy", x);
  check_channel_vector(op, sum_dy_xc, "sum_dy_xc", x);
  const int64_t values = read_count(op, count);
  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  const at::Tensor sum_dy_c = as_dtype_contiguous(sum_dy, acc_dtype);
  const at::Tensor sum_dy_xc_c = as_dtype_contiguous(sum_dy_xc, acc_dtype);

  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return grad_x;
  const WorkTensors work = work_tensors(x, grad_x);
  const at::Tensor grad_y_work = with_layout_of(grad_y, work.out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_backward_dx_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const GradParams<acc_t> params = grad_params<acc_t>(saved, eps, exact_grad, values);
    BackwardCall<scalar_t, acc_t> call{};
    call.info = work.info;
    call.grad_y = grad_y_work.const_data_ptr<scalar_t>();
    call.x = work.x.const_data_ptr<scalar_t>();
    call.grad_x = work.out.mutable_data_ptr<scalar_t>();
    call.batch_mean = saved.batch_mean.const_data_ptr<acc_t>();
    call.given_sum_dy = sum_dy_c.const_data_ptr<acc_t>();
    call.given_sum_dy_xc = sum_dy_xc_c.const_data_ptr<acc_t>();
    call.params = &params;
    run_backward(call);
  });
  if (!work.out.is_same(grad_x)) grad_x.copy_(work.out);
  return grad_x;
}

}  // namespace cmbn
