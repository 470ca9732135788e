// cmbn_ext::cmbn_update_state on the CPU: window_state.update_state channel by channel, each value
// rounded as the reference's tensor operation rounds it (one operation at a time, in the dtype torch
// promotes to, never contracted into an FMA), so the buffers hold the reference's bits after any
// number of steps. The count m is read on the host: the state lives there. The scalars window_step
// and num_batches_tracked are read before the channels and written after them, so every channel
// sees their old values.
#include <ATen/Parallel.h>

#include <cmath>
#include <string>

#include "cmbn_cpu.h"
#include "state_arguments.h"
#include "work_tensors.h"

namespace cmbn {
namespace {

// A (C,) or (S, C) buffer of any float dtype, read and written in place through its strides.
// Stores round as torch's copy_ does (c10's conversions: to nearest, ties to even).
struct FloatBuffer {
  void* data = nullptr;
  at::ScalarType type = at::kFloat;
  int64_t slot_stride = 0;
  int64_t stride = 0;

  int64_t offset(int64_t slot, int64_t c) const { return slot * slot_stride + c * stride; }

  template <typename T>
  T load(int64_t slot, int64_t c) const {
    const int64_t i = offset(slot, c);
    switch (type) {
      case at::kHalf:
        return static_cast<T>(static_cast<float>(static_cast<const at::Half*>(data)[i]));
      case at::kBFloat16:
        return static_cast<T>(static_cast<float>(static_cast<const at::BFloat16*>(data)[i]));
      case at::kFloat:
        return static_cast<T>(static_cast<const float*>(data)[i]);
      default:
        return static_cast<T>(static_cast<const double*>(data)[i]);
    }
  }

  template <typename T>
  void store(int64_t slot, int64_t c, T value) const {
    const int64_t i = offset(slot, c);
    switch (type) {
      case at::kHalf:
        static_cast<at::Half*>(data)[i] = static_cast<at::Half>(value);
        break;
      case at::kBFloat16:
        static_cast<at::BFloat16*>(data)[i] = static_cast<at::BFloat16>(value);
        break;
      case at::kFloat:
        static_cast<float*>(data)[i] = static_cast<float>(value);
        break;
      default:
        static_cast<double*>(data)[i] = static_cast<double>(value);
    }
  }

  // running + delta.to(running.dtype): delta rounded to the buffer's dtype first, then the sum as
  // torch adds two tensors of that dtype (half and bfloat16 in fp32, rounded once to the dtype).
  template <typename T>
  void add(int64_t c, T delta) const {
    const int64_t i = offset(0, c);
    switch (type) {
      case at::kHalf: {
        auto* p = static_cast<at::Half*>(data);
        const float rounded = static_cast<float>(static_cast<at::Half>(delta));
        p[i] = static_cast<at::Half>(static_cast<float>(p[i]) + rounded);
        break;
      }
      case at::kBFloat16: {
        auto* p = static_cast<at::BFloat16*>(data);
        const float rounded = static_cast<float>(static_cast<at::BFloat16>(delta));
        p[i] = static_cast<at::BFloat16>(static_cast<float>(p[i]) + rounded);
        break;
      }
      case at::kFloat: {
        auto* p = static_cast<float*>(data);
        p[i] = p[i] + static_cast<float>(delta);
        break;
      }
      default: {
        auto* p = static_cast<double*>(data);
        p[i] = p[i] + static_cast<double>(delta);
      }
    }
  }
};

FloatBuffer float_buffer(const at::Tensor& t) {
  if (!t.defined()) return {};
  const bool slots = t.dim() == 2;
  return FloatBuffer{t.data_ptr(), t.scalar_type(), slots ? t.stride(0) : 0,
                     t.stride(slots ? 1 : 0)};
}

// A (C,) statistics vector of the one dtype stats_t.
template <typename stats_t>
struct Stats {
  const stats_t* data;
  int64_t stride;
  stats_t operator[](int64_t c) const { return data[c * stride]; }
};

template <typename stats_t>
Stats<stats_t> stats_of(const at::Tensor& t) {
  return Stats<stats_t>{t.const_data_ptr<stats_t>(), t.stride(0)};
}

template <typename stats_t>
struct StateArgs {
  const int64_t* window_count;  // (S, C)
  int64_t count_slot_stride;
  int64_t count_stride;
  int64_t* window_count_out;  // the same buffer, written
  FloatBuffer window_mean;
  FloatBuffer window_var;
  bool tracking;
  FloatBuffer running_mean;
  FloatBuffer running_var;
  Stats<stats_t> mean;  // the pooled statistics the micro-batch was normalized with
  Stats<stats_t> var;
  Stats<stats_t> batch_mean;  // the micro-batch's own
  Stats<stats_t> batch_var;
  int64_t slots;
  int64_t m;
  StateMode mode;
  bool every;          // running statistics after every micro-batch (cumulative, deferred)
  bool full;           // the window ends with this micro-batch (cumulative, deferred)
  bool commit;         // and is committed
  int64_t ring_slot;   // sliding: the slot the micro-batch replaces, or -1
  double factor;       // the running update's weight

  int64_t count_at(int64_t slot, int64_t c) const {
    return window_count[slot * count_slot_stride + c * count_stride];
  }
  void set_count(int64_t slot, int64_t c, int64_t value) const {
    window_count_out[slot * count_slot_stride + c * count_stride] = value;
  }
};

// window_state.update_running for one channel that takes the update (valid, counted, count > 1):
// running += factor * (value - running), the variance made unbiased with the pooled count. value_t is
// the dtype of the pooled statistics, compute_t that of value - running.
template <typename value_t, typename compute_t, typename stats_t>
void update_running_channel(const StateArgs<stats_t>& args, int64_t c, int64_t count, value_t mean,
                            value_t var) {
  // The ratio in fp64 (counts may exceed 2^24), then rounded to the statistics' dtype.
  const value_t bessel =
      static_cast<value_t>(static_cast<double>(count) / static_cast<double>(count - 1));
  const value_t unbiased_var = var * bessel;
  const compute_t factor = static_cast<compute_t>(args.factor);
  const compute_t old_mean = args.running_mean.template load<compute_t>(0, c);
  const compute_t old_var = args.running_var.template load<compute_t>(0, c);
  args.running_mean.add(c, factor * (static_cast<compute_t>(mean) - old_mean));
  args.running_var.add(c, factor * (static_cast<compute_t>(unbiased_var) - old_var));
}

// Deferred mode: the window so far merged with the micro-batch's own statistics over m values, as
// window_state.merge_micro_batch does (reference.pool, one rounding per tensor operation).
template <typename value_t>
void merge_micro_batch(int64_t count, value_t& mean, value_t& var, int64_t m, value_t batch_mean,
                       value_t batch_var) {
  // b = m / (count + m) as reference.current_weight takes it: a reciprocal, then a product, in fp64.
  const double reciprocal = 1.0 / static_cast<double>(count + m);
  const value_t b = static_cast<value_t>(reciprocal * static_cast<double>(m));
  const value_t a = value_t(1) - b;
  const value_t a_mean = a * mean;
  const value_t b_mean = b * batch_mean;
  const value_t merged_mean = a_mean + b_mean;
  const value_t delta_a = mean - merged_mean;
  const value_t delta_b = batch_mean - merged_mean;
  const value_t square_a = delta_a * delta_a;
  const value_t square_b = delta_b * delta_b;
  const value_t var_a = a * (var + square_a);
  const value_t var_b = b * (batch_var + square_b);
  var = var_a + var_b;
  mean = merged_mean;
}

// stats_t: dtype of the statistics. value_t: the pooled statistics as the reference holds them
// (torch.where(finite, mean, window_mean[0]) promotes stats and window; sliding mode takes the stats as
// they are). compute_t: value_t promoted with the running statistics' dtype.
template <typename stats_t, typename value_t, typename compute_t>
void update_channels(const StateArgs<stats_t>& args, int64_t begin, int64_t end) {
  const int64_t m = args.m;
  const bool sliding = args.mode == StateMode::kSliding;
  const bool ema = args.mode == StateMode::kEma;
  const bool deferred = args.mode == StateMode::kDeferred;
  for (int64_t c = begin; c < end; ++c) {
    const stats_t mean = args.mean[c];
    const stats_t var = args.var[c];
    const stats_t batch_mean = args.batch_mean[c];
    const stats_t batch_var = args.batch_var[c];
    // A channel whose statistics are not finite enters no state (SPEC section 6).
    const bool finite = std::isfinite(mean) && std::isfinite(var) && std::isfinite(batch_mean) &&
                        std::isfinite(batch_var);
    int64_t window_total = 0;
    for (int64_t s = 0; s < args.slots; ++s) window_total += args.count_at(s, c);
    const int64_t pooled_count = window_total + m;

    if (sliding) {
      if (args.ring_slot >= 0) {  // the micro-batch's own statistics replace the oldest slot
        args.set_count(args.ring_slot, c, finite ? m : 0);
        args.window_mean.store(args.ring_slot, c, finite ? batch_mean : stats_t(0));
        args.window_var.store(args.ring_slot, c, finite ? batch_var : stats_t(0));
      }
      if (args.tracking && finite && pooled_count > 1) {
        update_running_channel<stats_t, compute_t>(args, c, pooled_count, mean, var);
      }
      continue;
    }

    // Cumulative, deferred and EMA: slot 0 holds the window so far (or the average); a non-finite
    // channel keeps it.
    int64_t count = finite ? pooled_count : args.count_at(0, c);
    value_t pooled_mean = static_cast<value_t>(mean);
    value_t pooled_var = static_cast<value_t>(var);
    if (!finite || deferred) {
      pooled_mean = args.window_mean.template load<value_t>(0, c);
      pooled_var = args.window_var.template load<value_t>(0, c);
    }
    if (finite && deferred) {  // normalized alone: the window pools the micro-batch's own statistics
      merge_micro_batch<value_t>(args.count_at(0, c), pooled_mean, pooled_var, m,
                                 static_cast<value_t>(batch_mean), static_cast<value_t>(batch_var));
    }
    if (ema) {  // the running statistics are the pooled ones themselves
      if (args.tracking && finite) {
        args.running_mean.store(0, c, pooled_mean);
        args.running_var.store(0, c, pooled_var);
      }
    } else if (args.every && args.tracking && finite && count > 1) {  // Darknet: every micro-batch
      update_running_channel<value_t, compute_t>(args, c, count, pooled_mean, pooled_var);
    } else if (args.commit && args.tracking && count > 1) {
      update_running_channel<value_t, compute_t>(args, c, count, pooled_mean, pooled_var);
    }
    if (args.full) {
      count = 0;
      pooled_mean = value_t(0);
      pooled_var = value_t(0);
    }
    for (int64_t s = 0; s < args.slots; ++s) {  // the reference writes every slot (S is 1 here)
      args.set_count(s, c, count);
      args.window_mean.store(s, c, pooled_mean);
      args.window_var.store(s, c, pooled_var);
    }
  }
}

int64_t* scalar_data(const at::Tensor& t) {
  return static_cast<int64_t*>(t.data_ptr());  // one value: its only element, whatever the strides
}

// Runs the channels of one instantiation: serial for the channel counts of real layers (a few
// thousand at most cost microseconds), spread over threads beyond. Channels are independent, so the
// result is the same for any thread count.
template <typename stats_t, typename value_t, typename compute_t>
void run_channels(const StateArgs<stats_t>& args, int64_t channels) {
  constexpr int64_t kGrain = 32768;
  at::parallel_for(0, channels, kGrain, [&](int64_t begin, int64_t end) {
    update_channels<stats_t, value_t, compute_t>(args, begin, end);
  });
}

}  // namespace

// The update with m known on the host (the op's count tensor read, or cmbn_train_forward's, from x's
// shape).
void cmbn_update_state_host_count_cpu(
    at::Tensor& window_count, at::Tensor& window_mean, at::Tensor& window_var,
    at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, int64_t m, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& batch_mean, const at::Tensor& batch_var,
    std::string_view layer_mode, std::optional<int64_t> window, std::optional<double> momentum,
    bool every_micro_batch) {
  const StateArguments state = check_state_arguments(
      window_count, window_mean, window_var, window_step, running_mean, running_var,
      num_batches_tracked, mean, var, batch_mean, batch_var, layer_mode, c10::DeviceType::CPU);
  check_host_count(m);
  const StateMode mode = state.mode;
  const int64_t slots = state.slots;
  const int64_t channels = state.channels;
  const bool tracking = state.tracking;
  if (m == 0) return;  // an empty micro-batch leaves the state as it is

  // The scalars, and what this micro-batch makes of them. Cumulative and deferred: window_step counts
  // it, then the window ends if it is full; it commits then, unless the running statistics took
  // every micro-batch already. A tracked batch: every micro-batch in sliding and EMA modes (and with
  // every_micro_batch), each commit otherwise.
  int64_t* step_data = scalar_data(window_step);
  int64_t* tracked_data = tracking ? scalar_data(*num_batches_tracked) : nullptr;
  const int64_t step = *step_data;
  const int64_t tracked = tracking ? *tracked_data : 0;
  const bool sliding = mode == StateMode::kSliding;
  const bool ema = mode == StateMode::kEma;
  const bool every = !sliding && !ema && every_micro_batch;
  const bool full = !sliding && !ema && window.has_value() && step + 1 >= *window;
  const bool commit = full && !every;
  const int64_t new_step = full ? 0 : step + 1;
  const int64_t new_tracked = tracked + ((sliding || ema || every || commit) ? 1 : 0);
  int64_t ring_slot = -1;  // Python's %, non-negative
  if (sliding && slots > 0) ring_slot = ((step % slots) + slots) % slots;

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
  const bool value_double = stats_double || (!sliding && window_mean.scalar_type() == at::kDouble);
  const bool compute_double = value_double || (tracking && running_mean->scalar_type() == at::kDouble);

  const auto fill = [&](auto& args) {
    using stats_t = std::remove_const_t<std::remove_pointer_t<decltype(args.mean.data)>>;
    args.window_count = window_count.const_data_ptr<int64_t>();
    args.count_slot_stride = window_count.stride(0);
    args.count_stride = window_count.stride(1);
    args.window_count_out = window_count.mutable_data_ptr<int64_t>();
    args.window_mean = float_buffer(window_mean);
    args.window_var = float_buffer(window_var);
    args.tracking = tracking;
    args.running_mean = tracking ? float_buffer(*running_mean) : FloatBuffer{};
    args.running_var = tracking ? float_buffer(*running_var) : FloatBuffer{};
    args.mean = stats_of<stats_t>(mean_c);
    args.var = stats_of<stats_t>(var_c);
    args.batch_mean = stats_of<stats_t>(batch_mean_c);
    args.batch_var = stats_of<stats_t>(batch_var_c);
    args.slots = slots;
    args.m = m;
    args.mode = mode;
    args.every = every;
    args.full = full;
    args.commit = commit;
    args.ring_slot = ring_slot;
    // momentum=None: the cumulative average over tracked batches, as in BatchNorm.
    args.factor = momentum.has_value()
                      ? *momentum
                      : 1.0 / static_cast<double>(new_tracked > 1 ? new_tracked : 1);
  };
  if (stats_double) {
    StateArgs<double> args{};
    fill(args);
    run_channels<double, double, double>(args, channels);
  } else {
    StateArgs<float> args{};
    fill(args);
    if (value_double) {
      run_channels<float, double, double>(args, channels);
    } else if (compute_double) {
      run_channels<float, float, double>(args, channels);
    } else {
      run_channels<float, float, float>(args, channels);
    }
  }
  // Even for C == 0 the scalars advance.
  *step_data = new_step;
  if (tracking) *tracked_data = new_tracked;
}

void cmbn_update_state_cpu(at::Tensor& window_count, at::Tensor& window_mean, at::Tensor& window_var,
                           at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var,
                           const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& m,
                           const at::Tensor& mean, const at::Tensor& var,
                           const at::Tensor& batch_mean, const at::Tensor& batch_var,
                           std::string_view layer_mode, std::optional<int64_t> window,
                           std::optional<double> momentum, bool every_micro_batch) {
  check_count_tensor(m);
  TORCH_CHECK(m.device().is_cpu(), kUpdateStateOp, ": m is on ", m.device(), " but window_count is on ",
              window_count.device());
  cmbn_update_state_host_count_cpu(window_count, window_mean, window_var, window_step, running_mean,
                                   running_var, num_batches_tracked, *m.const_data_ptr<int64_t>(),
                                   mean, var, batch_mean, batch_var, layer_mode, window, momentum,
                                   every_micro_batch);
}

}  // namespace cmbn
