// cmbn_update_state: the layer's state update after a training micro-batch (window_state.update_state,
// SPEC sections 5 and 6) in one launch of one block. Threads loop over the channels; the scalars
// window_step and num_batches_tracked are read by every thread at the start and written once, by
// thread 0 after a __syncthreads, so every channel sees their old values and the host never reads
// them. The count m is read on the device too when it lives there (the distributed path's group
// count): a count of 0 leaves the state as it is, decided by the kernel. A block of up to 512 threads
// covers a few thousand channels in a handful of iterations.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <string>
#include <string_view>
#include <type_traits>

#include "cmbn_cuda.h"
#include "device_utils.cuh"
#include "host_utils.h"
#include "kernel_image.h"
#include "kernel_types.h"
#include "state_arguments.h"
#include "work_tensors.h"

namespace cmbn {
namespace {

constexpr int kStateThreads = 512;

template <typename stats_t>
struct StateArgs {
  int64_t* window_count;  // (S, C) contiguous
  AnyFloatBuffer window_mean;
  AnyFloatBuffer window_var;
  int64_t* window_step;          // one value
  AnyFloatBuffer running_mean;   // absent when the running statistics are not tracked
  AnyFloatBuffer running_var;
  int64_t* num_batches_tracked;  // null when not tracked
  const stats_t* mean;           // (C,): the pooled statistics the micro-batch was normalized with
  const stats_t* var;
  const stats_t* batch_mean;     // (C,): the micro-batch's own
  const stats_t* batch_var;
  int64_t channels;  // C
  int64_t slots;     // S
  const int64_t* m_device;  // the micro-batch's values per channel, on the device; or null and
  int64_t m_host;           // then this value, known on the host
  StateMode mode;
  bool has_window;  // cumulative: commit after `window` micro-batches
  int64_t window;
  bool has_momentum;  // false: the cumulative average over tracked batches
  double momentum;
  bool every_micro_batch;  // cumulative and deferred: running statistics after every micro-batch
};

// Arithmetic rounded once per operation, never contracted into an FMA: the reference rounds each
// tensor operation on its own, and the running statistics accumulate that rounding over training.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// running[c] += delta as torch adds two tensors of the running dtype: delta rounded to that dtype
// first (the reference's .to(running.dtype)), the sum in fp32 (fp64 for fp64) rounded once.
template <typename compute_t>
__device__ __forceinline__ void add_to_running(const AnyFloatBuffer& running, int64_t c,
                                               compute_t delta) {
  switch (running.kind) {
    case FloatKind::kHalf: {
      c10::Half* p = static_cast<c10::Half*>(running.data);
      const float rounded = static_cast<float>(c10::Half(static_cast<float>(delta)));
      p[c] = c10::Half(add_rn(static_cast<float>(p[c]), rounded));
      break;
    }
    case FloatKind::kBFloat16: {
      c10::BFloat16* p = static_cast<c10::BFloat16*>(running.data);
      const float rounded = static_cast<float>(c10::BFloat16(static_cast<float>(delta)));
      p[c] = c10::BFloat16(add_rn(static_cast<float>(p[c]), rounded));
      break;
    }
    case FloatKind::kFloat: {
      float* p = static_cast<float*>(running.data);
      p[c] = add_rn(p[c], static_cast<float>(delta));
      break;
    }
    case FloatKind::kDouble: {
      double* p = static_cast<double*>(running.data);
      p[c] = add_rn(p[c], static_cast<double>(delta));
      break;
    }
    default:
      break;
  }
}

// window_state.update_running for one channel that takes the update (valid, counted, count > 1):
// running += factor * (value - running), the variance made unbiased with the pooled count. value_t is
// the dtype of the pooled statistics (the reference's `var`), compute_t that of value - running.
template <typename value_t, typename compute_t, typename stats_t>
__device__ void update_running_channel(const StateArgs<stats_t>& args, int64_t c, int64_t count,
                                       value_t mean, value_t var, double factor) {
  // The ratio in fp64 (counts may exceed 2^24), then rounded to the statistics' dtype.
  const value_t bessel =
      static_cast<value_t>(static_cast<double>(count) / static_cast<double>(count - 1));
  const value_t unbiased_var = mul_rn(var, bessel);
  const compute_t f = static_cast<compute_t>(factor);
  const compute_t old_mean = load_any_float<compute_t>(args.running_mean, c, compute_t(0));
  const compute_t old_var = load_any_float<compute_t>(args.running_var, c, compute_t(0));
  add_to_running(args.running_mean, c,
                 mul_rn(f, sub_rn(static_cast<compute_t>(mean), old_mean)));
  add_to_running(args.running_var, c,
                 mul_rn(f, sub_rn(static_cast<compute_t>(unbiased_var), old_var)));
}

template <typename T>
__device__ __forceinline__ bool is_finite(T value) {
  return ::isfinite(value);
}

// Deferred mode: the window so far (count, mean, var) merged with the micro-batch's own statistics
// over m values, as window_state.merge_micro_batch does (reference.pool, rounded op by op).
template <typename value_t>
__device__ void merge_micro_batch(int64_t count, value_t& mean, value_t& var, int64_t m,
                                  value_t batch_mean, value_t batch_var) {
  // b = m / (count + m) as reference.current_weight takes it: a reciprocal, then a product, in fp64.
  const value_t b = static_cast<value_t>(
      mul_rn(1.0 / static_cast<double>(count + m), static_cast<double>(m)));
  const value_t a = sub_rn(value_t(1), b);
  const value_t merged_mean = add_rn(mul_rn(a, mean), mul_rn(b, batch_mean));
  const value_t delta_a = sub_rn(mean, merged_mean);
  const value_t delta_b = sub_rn(batch_mean, merged_mean);
  var = add_rn(mul_rn(a, add_rn(var, mul_rn(delta_a, delta_a))),
               mul_rn(b, add_rn(batch_var, mul_rn(delta_b, delta_b))));
  mean = merged_mean;
}

// stats_t: dtype of mean, var, batch_mean, batch_var. value_t: the pooled statistics as the reference
// holds them (torch.where(finite, mean, window_mean[0]) promotes to the wider of stats and window;
// sliding mode uses stats_t). compute_t: value_t promoted with the running statistics' dtype.
template <typename stats_t, typename value_t, typename compute_t>
__global__ void __launch_bounds__(kStateThreads) update_state_kernel(const StateArgs<stats_t> args) {
  // The count, the same for every thread: an empty micro-batch (m <= 0) changes nothing, and the
  // whole block returns before the barrier together.
  const int64_t m = args.m_device != nullptr ? *args.m_device : args.m_host;
  if (m <= 0) return;
  // The old scalars, read by every thread before thread 0 writes the new ones (after the barrier).
  const int64_t step = *args.window_step;
  const bool tracking = args.num_batches_tracked != nullptr;
  const int64_t tracked = tracking ? *args.num_batches_tracked : 0;

  const bool sliding = args.mode == StateMode::kSliding;
  const bool ema = args.mode == StateMode::kEma;
  const bool deferred = args.mode == StateMode::kDeferred;
  // Cumulative and deferred: window_step counts this micro-batch, then the window ends if it is full;
  // it commits then, unless the running statistics took every micro-batch already.
  const bool every = !sliding && !ema && args.every_micro_batch;
  const bool full = !sliding && !ema && args.has_window && step + 1 >= args.window;
  const bool commit = full && !every;
  const int64_t new_step = full ? 0 : step + 1;
  // A tracked batch: every micro-batch in sliding and EMA modes (and with every_micro_batch), each
  // commit otherwise.
  const int64_t new_tracked = tracked + ((sliding || ema || every || commit) ? 1 : 0);
  const double factor = args.has_momentum
                            ? args.momentum
                            : 1.0 / static_cast<double>(new_tracked > 1 ? new_tracked : 1);
  // Sliding: the micro-batch replaces the oldest ring slot (Python's %, non-negative).
  int64_t ring_slot = -1;
  if (sliding && args.slots > 0) {
    ring_slot = step % args.slots;
    if (ring_slot < 0) ring_slot += args.slots;
  }

  const int64_t channels = args.channels;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    const stats_t mean = args.mean[c];
    const stats_t var = args.var[c];
    const stats_t batch_mean = args.batch_mean[c];
    const stats_t batch_var = args.batch_var[c];
    // A channel whose statistics are not finite enters no state (SPEC section 6).
    const bool finite =
        is_finite(mean) && is_finite(var) && is_finite(batch_mean) && is_finite(batch_var);
    int64_t window_total = 0;
    for (int64_t s = 0; s < args.slots; ++s) window_total += args.window_count[s * channels + c];
    const int64_t pooled_count = window_total + m;

    if (sliding) {
      if (ring_slot >= 0) {
        const int64_t i = ring_slot * channels + c;
        args.window_count[i] = finite ? m : 0;
        store_any_float(args.window_mean, i, finite ? batch_mean : stats_t(0));
        store_any_float(args.window_var, i, finite ? batch_var : stats_t(0));
      }
      if (tracking && finite && pooled_count > 1) {
        update_running_channel<stats_t, compute_t>(args, c, pooled_count, mean, var, factor);
      }
      continue;
    }

    // Cumulative, deferred and EMA: slot 0 holds the window so far (or the average); a non-finite
    // channel keeps it.
    int64_t count = finite ? pooled_count : args.window_count[c];
    value_t pooled_mean = static_cast<value_t>(mean);
    value_t pooled_var = static_cast<value_t>(var);
    if (!finite || deferred) {
      pooled_mean = load_any_float<value_t>(args.window_mean, c, value_t(0));
      pooled_var = load_any_float<value_t>(args.window_var, c, value_t(0));
    }
    if (finite && deferred) {  // normalized alone: the window pools the micro-batch's own statistics
      merge_micro_batch<value_t>(args.window_count[c], pooled_mean, pooled_var, m,
                                 static_cast<value_t>(batch_mean), static_cast<value_t>(batch_var));
    }
    if (ema) {
      // The running statistics are the pooled ones themselves.
      if (tracking && finite) {
        store_any_float(args.running_mean, c, pooled_mean);
        store_any_float(args.running_var, c, pooled_var);
      }
    } else if (every && tracking && finite && count > 1) {  // Darknet: after every micro-batch
      update_running_channel<value_t, compute_t>(args, c, count, pooled_mean, pooled_var, factor);
    } else if (commit && tracking && count > 1) {
      update_running_channel<value_t, compute_t>(args, c, count, pooled_mean, pooled_var, factor);
    }
    if (full) {
      count = 0;
      pooled_mean = value_t(0);
      pooled_var = value_t(0);
    }
    for (int64_t s = 0; s < args.slots; ++s) {  // the reference writes every slot (S is 1 here)
      const int64_t i = s * channels + c;
      args.window_count[i] = count;
      store_any_float(args.window_mean, i, pooled_mean);
      store_any_float(args.window_var, i, pooled_var);
    }
  }

  __syncthreads();
  if (threadIdx.x == 0) {
    *args.window_step = new_step;
    if (tracking) *args.num_batches_tracked = new_tracked;
  }
}

// A buffer the kernel writes, contiguous: itself, or a copy that is written back after the launch.
at::Tensor writable(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

void write_back(const at::Tensor& buffer, const at::Tensor& work) {
  if (work.defined() && !work.is_same(buffer)) buffer.copy_(work);
}

template <typename stats_t, typename value_t, typename compute_t>
void launch_update_state(const StateArgs<stats_t>& args) {
  // One block: enough warps for the channels, at most kStateThreads (threads loop over the rest).
  const int64_t warps = std::max<int64_t>(ceil_div(args.channels, 32), 1);
  const int threads = static_cast<int>(std::min<int64_t>(warps * 32, kStateThreads));
  update_state_kernel<stats_t, value_t, compute_t>
      <<<1, threads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The launcher behind both entry points: m on the device (m_device, a 0-dim int64 tensor there) or,
// when m_device is undefined, m_host.
void update_state(at::Tensor& window_count, at::Tensor& window_mean, at::Tensor& window_var,
                  at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
                  const std::optional<at::Tensor>& running_var,
                  const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& m_device,
                  int64_t m_host, const at::Tensor& mean, const at::Tensor& var,
                  const at::Tensor& batch_mean, const at::Tensor& batch_var,
                  std::string_view layer_mode, std::optional<int64_t> window,
                  std::optional<double> momentum, bool every_micro_batch) {
  const StateArguments state = check_state_arguments(
      window_count, window_mean, window_var, window_step, running_mean, running_var,
      num_batches_tracked, mean, var, batch_mean, batch_var, layer_mode, c10::DeviceType::CUDA);
  const StateMode mode = state.mode;
  const int64_t slots = state.slots;
  const int64_t channels = state.channels;
  const bool tracking = state.tracking;
  if (m_device.defined()) {
    TORCH_CHECK(m_device.device() == window_count.device(), kUpdateStateOp, ": m is on ", m_device.device(),
                " but window_count is on ", window_count.device());
  } else {
    check_host_count(m_host);
  }
  const c10::cuda::CUDAGuard device_guard(window_count.device());
  if (!m_device.defined() && m_host == 0) return;  // an empty micro-batch, known on the host

  // The statistics in fp64 if any is fp64, else fp32 (the ops return them so: no copy).
  const bool stats_double = mean.scalar_type() == at::kDouble || var.scalar_type() == at::kDouble ||
                            batch_mean.scalar_type() == at::kDouble ||
                            batch_var.scalar_type() == at::kDouble;
  const at::ScalarType stats_type = stats_double ? at::kDouble : at::kFloat;
  const at::Tensor mean_c = as_dtype_contiguous(mean, stats_type);
  const at::Tensor var_c = as_dtype_contiguous(var, stats_type);
  const at::Tensor batch_mean_c = as_dtype_contiguous(batch_mean, stats_type);
  const at::Tensor batch_var_c = as_dtype_contiguous(batch_var, stats_type);

  // Type promotion as in the reference: the pooled statistics are promoted with the window's dtype
  // (not in sliding mode, which takes the stats as they are), then with the running statistics'.
  const bool value_double =
      stats_double || (mode != StateMode::kSliding && window_mean.scalar_type() == at::kDouble);
  const bool compute_double =
      value_double || (tracking && running_mean->scalar_type() == at::kDouble);

  const at::Tensor window_count_w = writable(window_count);
  const at::Tensor window_mean_w = writable(window_mean);
  const at::Tensor window_var_w = writable(window_var);
  const at::Tensor window_step_w = writable(window_step);
  const at::Tensor running_mean_w = tracking ? writable(*running_mean) : at::Tensor();
  const at::Tensor running_var_w = tracking ? writable(*running_var) : at::Tensor();
  const at::Tensor tracked_w = tracking ? writable(*num_batches_tracked) : at::Tensor();

  const auto fill = [&](auto& args) {
    using stats_t = std::remove_const_t<std::remove_pointer_t<decltype(args.mean)>>;
    args.window_count = window_count_w.mutable_data_ptr<int64_t>();
    args.window_mean = any_float_buffer(window_mean_w);
    args.window_var = any_float_buffer(window_var_w);
    args.window_step = window_step_w.mutable_data_ptr<int64_t>();
    args.running_mean = any_float_buffer(running_mean_w);
    args.running_var = any_float_buffer(running_var_w);
    args.num_batches_tracked = tracking ? tracked_w.mutable_data_ptr<int64_t>() : nullptr;
    args.mean = mean_c.const_data_ptr<stats_t>();
    args.var = var_c.const_data_ptr<stats_t>();
    args.batch_mean = batch_mean_c.const_data_ptr<stats_t>();
    args.batch_var = batch_var_c.const_data_ptr<stats_t>();
    args.channels = channels;
    args.slots = slots;
    args.m_device = m_device.defined() ? m_device.const_data_ptr<int64_t>() : nullptr;
    args.m_host = m_host;
    args.mode = mode;
    args.has_window = window.has_value();
    args.window = window.value_or(0);
    args.has_momentum = momentum.has_value();
    args.momentum = momentum.value_or(0.0);
    args.every_micro_batch = every_micro_batch;
  };
  // Launched even for C == 0: the scalars still advance (unless m is 0).
  if (stats_double) {
    StateArgs<double> args{};
    fill(args);
    launch_update_state<double, double, double>(args);
  } else {
    StateArgs<float> args{};
    fill(args);
    if (value_double) {
      launch_update_state<float, double, double>(args);
    } else if (compute_double) {
      launch_update_state<float, float, double>(args);
    } else {
      launch_update_state<float, float, float>(args);
    }
  }

  write_back(window_count, window_count_w);
  write_back(window_mean, window_mean_w);
  write_back(window_var, window_var_w);
  write_back(window_step, window_step_w);
  if (tracking) {
    write_back(*running_mean, running_mean_w);
    write_back(*running_var, running_var_w);
    write_back(*num_batches_tracked, tracked_w);
  }
}

}  // namespace

cudaError_t probe_kernel_image() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, &update_state_kernel<float, float, float>);
}

void cmbn_update_state_cuda(at::Tensor& window_count, at::Tensor& window_mean, at::Tensor& window_var,
                            at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& m,
                            const at::Tensor& mean, const at::Tensor& var,
                            const at::Tensor& batch_mean, const at::Tensor& batch_var,
                            std::string_view layer_mode, std::optional<int64_t> window,
                            std::optional<double> momentum, bool every_micro_batch) {
  check_count_tensor(m);
  if (m.is_cuda()) {  // the kernel reads it: the host never waits for the count
    update_state(window_count, window_mean, window_var, window_step, running_mean, running_var,
                 num_batches_tracked, m, 0, mean, var, batch_mean, batch_var, layer_mode, window,
                 momentum, every_micro_batch);
    return;
  }
  // A count on the CPU (a caller's scalar) is read here, where it is: copying it to the device
  // would be a blocking copy (and none that a CUDA graph can capture).
  TORCH_CHECK(m.device().is_cpu(), kUpdateStateOp, ": m is on ", m.device(), " but window_count is on ",
              window_count.device());
  update_state(window_count, window_mean, window_var, window_step, running_mean, running_var,
               num_batches_tracked, at::Tensor(), *m.const_data_ptr<int64_t>(), mean, var, batch_mean,
               batch_var, layer_mode, window, momentum, every_micro_batch);
}

void cmbn_update_state_host_count_cuda(
    at::Tensor& window_count, at::Tensor& window_mean, at::Tensor& window_var,
    at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, int64_t m, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& batch_mean, const at::Tensor& batch_var,
    std::string_view layer_mode, std::optional<int64_t> window, std::optional<double> momentum,
    bool every_micro_batch) {
  update_state(window_count, window_mean, window_var, window_step, running_mean, running_var,
               num_batches_tracked, at::Tensor(), m, mean, var, batch_mean, batch_var, layer_mode,
               window, momentum, every_micro_batch);
}

}  // namespace cmbn
