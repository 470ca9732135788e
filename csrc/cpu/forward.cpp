// The CmBN forward family on the CPU (SPEC sections 1 to 3, reference.forward):
//   cmbn_forward:        the micro-batch's statistics (the mean, then the squared deviations from it,
//                        see cpu_loops.h), the pooling with the history, and y (through the
//                        activation, if any), in one op;
//   cmbn_batch_stats:    the statistics alone;
//   cmbn_pooled_forward: the pooling and y from statistics the caller gives (the whole group's).
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
void run_forward(const ForwardCall<scalar_t, acc_t>& call) {
#ifdef CMBN_CPU_AVX2_LOOPS
  if (use_avx2_loops()) return avx2::run_forward(call);
#endif
  baseline::run_forward(call);
}

// The history and parameters of the pooling, converted to the statistics' dtype where they are not
// (kept alive for the call).
struct PoolingInputs {
  at::Tensor weight, bias, history_count, history_mean, history_var;
};

PoolingInputs pooling_inputs(const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& history_count,
                             const at::Tensor& history_mean, const at::Tensor& history_var,
                             at::ScalarType acc_dtype) {
  return PoolingInputs{optional_as_dtype(weight, acc_dtype), optional_as_dtype(bias, acc_dtype),
                       history_count.contiguous(),
                       as_dtype_contiguous(history_mean, acc_dtype),
                       as_dtype_contiguous(history_var, acc_dtype)};
}

template <typename acc_t>
Pooling<acc_t> make_pooling(const PoolingInputs& in, int64_t channels, double eps,
                            std::optional<double> ema_momentum, at::Tensor& mean, at::Tensor& var,
                            at::Tensor& current_weight) {
  Pooling<acc_t> p{};
  p.history_count = in.history_count.const_data_ptr<int64_t>();
  p.history_mean = in.history_mean.const_data_ptr<acc_t>();
  p.history_var = in.history_var.const_data_ptr<acc_t>();
  p.slots = in.history_count.size(0);
  p.channels = channels;
  p.has_ema = ema_momentum.has_value();
  p.ema_momentum = ema_momentum.value_or(0.0);
  p.weight = data_or_null<acc_t>(in.weight);
  p.bias = data_or_null<acc_t>(in.bias);
  p.eps = static_cast<acc_t>(eps);
  p.mean = mean.mutable_data_ptr<acc_t>();
  p.var = var.mutable_data_ptr<acc_t>();
  p.current_weight = current_weight.mutable_data_ptr<acc_t>();
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmbn_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& history_count,
    const at::Tensor& history_mean, const at::Tensor& history_var, double eps,
    std::optional<double> ema_momentum, bool exact_grad, int64_t activation,
    double activation_param) {
  (void)exact_grad;  // the forward is the same for both gradients
  const char* op = "cmbn_forward";
  check_pooling_args(op, x, weight, bias, history_count, history_mean, history_var,
                     c10::DeviceType::CPU);
  check_activation(op, activation, activation_param);

  const int64_t channels = x.size(1);
  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  const at::TensorOptions stat_options = x.options().dtype(acc_dtype);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({channels}, stat_options);
  at::Tensor var = at::empty({channels}, stat_options);
  at::Tensor batch_mean = at::empty({channels}, stat_options);
  at::Tensor batch_var = at::empty({channels}, stat_options);
  at::Tensor current_weight = at::empty({channels}, stat_options);
  if (channels == 0) return {y, mean, var, batch_mean, batch_var, current_weight};

  const WorkTensors work = work_tensors(x, y);
  const PoolingInputs in =
      pooling_inputs(weight, bias, history_count, history_mean, history_var, acc_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Pooling<acc_t> pooling =
        make_pooling<acc_t>(in, channels, eps, ema_momentum, mean, var, current_weight);
    ForwardCall<scalar_t, acc_t> call{};
    call.info = work.info;
    call.x = work.x.const_data_ptr<scalar_t>();
    call.y = work.out.mutable_data_ptr<scalar_t>();
    call.batch_mean = batch_mean.mutable_data_ptr<acc_t>();
    call.batch_var = batch_var.mutable_data_ptr<acc_t>();
    call.pooling = &pooling;
    call.count = work.info.values_per_channel();
    call.activation = activation;
    call.activation_param = activation_param;
    run_forward(call);
  });
  if (!work.out.is_same(y)) y.copy_(work.out);
  return {y, mean, var, batch_mean, batch_var, current_weight};
}

std::tuple<at::Tensor, at::Tensor> cmbn_batch_stats_cpu(const at::Tensor& x) {
  const char* op = "cmbn_batch_stats";
  check_input(op, x, "x", c10::DeviceType::CPU);
  const int64_t channels = x.size(1);
  const at::TensorOptions stat_options = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor batch_mean = at::empty({channels}, stat_options);
  at::Tensor batch_var = at::empty({channels}, stat_options);
  if (channels == 0) return {batch_mean, batch_var};

  const ReadableTensor readable_x = readable(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_batch_stats_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    ForwardCall<scalar_t, acc_t> call{};
    call.info = readable_x.info;
    call.x = readable_x.x.const_data_ptr<scalar_t>();
    call.batch_mean = batch_mean.mutable_data_ptr<acc_t>();
    call.batch_var = batch_var.mutable_data_ptr<acc_t>();
    call.count = readable_x.info.values_per_channel();
    run_forward(call);
  });
  return {batch_mean, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmbn_pooled_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& count, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, const at::Tensor& history_count, const at::Tensor& history_mean,
    const at::Tensor& history_var, double eps, std::optional<double> ema_momentum) {
  const char* op = "cmbn_pooled_forward";
  check_pooling_args(op, x, weight, bias, history_count, history_mean, history_var,
                     c10::DeviceType::CPU);
  check_channel_vector(op, batch_mean, "batch_mean", x);
  check_channel_vector(op, batch_var, "batch_var", x);
  const int64_t values = read_count(op, count);

  const int64_t channels = x.size(1);
  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  const at::TensorOptions stat_options = x.options().dtype(acc_dtype);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({channels}, stat_options);
  at::Tensor var = at::empty({channels}, stat_options);
  at::Tensor current_weight = at::empty({channels}, stat_options);
  if (channels == 0) return {y, mean, var, current_weight};
  // x may be empty while the group's count is not (this rank had no values): then only the pooled
  // statistics are written.

  const at::Tensor given_mean = as_dtype_contiguous(batch_mean, acc_dtype);
  const at::Tensor given_var = as_dtype_contiguous(batch_var, acc_dtype);
  const WorkTensors work = work_tensors(x, y);
  const PoolingInputs in =
      pooling_inputs(weight, bias, history_count, history_mean, history_var, acc_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_pooled_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Pooling<acc_t> pooling =
        make_pooling<acc_t>(in, channels, eps, ema_momentum, mean, var, current_weight);
    ForwardCall<scalar_t, acc_t> call{};
    call.info = work.info;
    call.x = work.x.const_data_ptr<scalar_t>();
    call.y = work.out.mutable_data_ptr<scalar_t>();
    call.given_mean = given_mean.const_data_ptr<acc_t>();
    call.given_var = given_var.const_data_ptr<acc_t>();
    call.pooling = &pooling;
    call.count = values;
    run_forward(call);
  });
  if (!work.out.is_same(y)) y.copy_(work.out);
  return {y, mean, var, current_weight};
}

}  // namespace cmbn
