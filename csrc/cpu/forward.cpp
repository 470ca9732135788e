// The CmBN forward family on the CPU (SPEC sections 1 to 3, reference.forward):
//   cmbn_forward:        the micro-batch's statistics (two passes: the mean, then the sum of squared
//                        deviations), the pooling with the history, and y, in one op;
//   cmbn_batch_stats:    the statistics alone;
//   cmbn_pooled_forward: the pooling and y from statistics the caller gives (the whole group's).
// Contiguous planes are spread over threads by channel and each channel's three passes run back to
// back, so the second and third read the channel from the cache; rows of C channels (channels_last)
// are reduced in chunks of rows fixed by the shape, merged in chunk order, then normalized row by row.
#include <ATen/Dispatch.h>

#include <cmath>

#include "cmbn_cpu.h"
#include "cpu_kernel_utils.h"

namespace cmbn {
namespace {

using namespace cmbn::cpu;

// SPEC section 2: pool (mean_a, var_a) weighing 1 - b with (mean_b, var_b) weighing b, rounded step by
// step as reference.pool is.
template <typename acc_t>
inline void pool_pair(acc_t mean_a, acc_t var_a, acc_t mean_b, acc_t var_b, acc_t b, acc_t& mean,
                      acc_t& var) {
  const acc_t a = acc_t(1) - b;
  mean = a * mean_a + b * mean_b;
  const acc_t delta_a = mean_a - mean;
  const acc_t delta_b = mean_b - mean;
  var = a * (var_a + delta_a * delta_a) + b * (var_b + delta_b * delta_b);
}

// What the pooling of one call reads and writes, per channel.
template <typename acc_t>
struct Pooling {
  const int64_t* history_count;  // (S, C) contiguous
  const acc_t* history_mean;     // (S, C) contiguous, in the statistics' dtype
  const acc_t* history_var;
  int64_t slots;
  int64_t channels;
  bool has_ema;
  double ema_momentum;
  const acc_t* weight;  // null when absent
  const acc_t* bias;
  acc_t eps;
  acc_t* mean;  // outputs, (C,)
  acc_t* var;
  acc_t* current_weight;
};

// reference.merge_history, current_weight and pool for channel c, given the micro-batch's statistics
// over `count` values per channel; writes the pooled statistics and b, and returns y's per-channel
// scale and shift: y = (x - mean) * scale + shift, centered first so that a large mean does not
// cancel digits away.
template <typename acc_t>
void pool_channel(const Pooling<acc_t>& p, int64_t c, int64_t count, acc_t batch_mean,
                  acc_t batch_var, acc_t& center, acc_t& scale, acc_t& shift) {
  int64_t total = 0;
  acc_t history_mean = 0;
  acc_t history_var = 0;
  if (p.slots > 0) {  // slot 0 as it is, then each later slot with its share of the running count
    total = p.history_count[c];
    history_mean = p.history_mean[c];
    history_var = p.history_var[c];
    for (int64_t slot = 1; slot < p.slots; ++slot) {
      const int64_t i = slot * p.channels + c;
      total += p.history_count[i];
      const double share = static_cast<double>(p.history_count[i]) /
                           static_cast<double>(std::max<int64_t>(total, 1));
      pool_pair(history_mean, history_var, p.history_mean[i], p.history_var[i],
                static_cast<acc_t>(share), history_mean, history_var);
    }
  }
  acc_t b;
  if (p.has_ema) {
    b = total > 0 ? static_cast<acc_t>(p.ema_momentum) : acc_t(1);
  } else {  // in fp64, a reciprocal then a product, as the reference writes it
    b = static_cast<acc_t>((1.0 / static_cast<double>(total + count)) * static_cast<double>(count));
  }
  acc_t mean, var;
  pool_pair(history_mean, history_var, batch_mean, batch_var, b, mean, var);
  p.mean[c] = mean;
  p.var[c] = var;
  p.current_weight[c] = b;
  const acc_t invstd = acc_t(1) / std::sqrt(var + p.eps);
  center = mean;
  scale = p.weight != nullptr ? invstd * p.weight[c] : invstd;
  shift = p.bias != nullptr ? p.bias[c] : acc_t(0);
}

// y = (x - center) * scale + shift over n values.
template <typename scalar_t, typename acc_t>
void normalize_span(const scalar_t* x, scalar_t* y, int64_t n, acc_t center, acc_t scale,
                    acc_t shift) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const Vec vc(center), va(scale), vb(shift);
  int64_t i = 0;
  for (; i + 2 * K <= n; i += 2 * K) {
    IO::store(y + i, (IO::load(x + i) - vc) * va + vb);
    IO::store(y + i + K, (IO::load(x + i + K) - vc) * va + vb);
  }
  for (; i + K <= n; i += K) IO::store(y + i, (IO::load(x + i) - vc) * va + vb);
  for (; i < n; ++i) {
    y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - center) * scale + shift);
  }
}

// The work of one forward call. given_mean/given_var: the micro-batch's statistics come from the
// caller (cmbn_pooled_forward); else they are computed and written to batch_mean/batch_var.
// pooling null: the statistics alone (cmbn_batch_stats).
template <typename scalar_t, typename acc_t>
struct ForwardCall {
  Layout layout;
  const scalar_t* x;
  scalar_t* y;
  const acc_t* given_mean;
  const acc_t* given_var;
  acc_t* batch_mean;
  acc_t* batch_var;
  const Pooling<acc_t>* pooling;
  int64_t count;  // values per channel the statistics are over
};

// Mean and biased variance of channel c of a plane layout, two passes.
template <typename scalar_t, typename acc_t>
void plane_channel_stats(const Layout& L, const scalar_t* x, int64_t c, acc_t& mean, acc_t& var) {
  const int64_t m = L.values_per_channel();
  if (m == 0) {  // an empty micro-batch has zero statistics (reference.batch_stats)
    mean = 0;
    var = 0;
    return;
  }
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t plane_stride = L.channels * L.inner;
  SpanSum<scalar_t, acc_t> sum;
  for (int64_t n = 0; n < L.outer; ++n) {
    sum.add(x + n * plane_stride + c * L.inner, L.inner, [](const Vec& v) { return v; },
            [](acc_t v) { return v; });
  }
  mean = sum.result() / static_cast<acc_t>(m);
  const Vec vmean(mean);
  const acc_t smean = mean;
  SpanSum<scalar_t, acc_t> squares;
  for (int64_t n = 0; n < L.outer; ++n) {
    squares.add(
        x + n * plane_stride + c * L.inner, L.inner,
        [&](const Vec& v) {
          const Vec d = v - vmean;
          return d * d;
        },
        [&](acc_t v) {
          const acc_t d = v - smean;
          return d * d;
        });
  }
  var = squares.result() / static_cast<acc_t>(m);
}

template <typename scalar_t, typename acc_t>
void forward_planes(const ForwardCall<scalar_t, acc_t>& call) {
  const Layout& L = call.layout;
  const int64_t m = L.values_per_channel();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(m, 1));
  at::parallel_for(0, L.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t mean, var;
      if (call.given_mean != nullptr) {
        mean = call.given_mean[c];
        var = call.given_var[c];
      } else {
        plane_channel_stats(L, call.x, c, mean, var);
        call.batch_mean[c] = mean;
        call.batch_var[c] = var;
      }
      if (call.pooling == nullptr) continue;
      acc_t center, scale, shift;
      pool_channel(*call.pooling, c, call.count, mean, var, center, scale, shift);
      const int64_t plane_stride = L.channels * L.inner;
      for (int64_t n = 0; n < L.outer; ++n) {
        const int64_t offset = n * plane_stride + c * L.inner;
        normalize_span(call.x + offset, call.y + offset, L.inner, center, scale, shift);
      }
    }
  });
}

// Per-channel sums over the rows of a row layout: each chunk of rows into its own row of `partial`
// (chunks x C), then the chunks added in chunk order into `total`.
template <typename scalar_t, typename acc_t, typename VecF, typename ScalarF>
void row_sums(const Layout& L, const scalar_t* x, acc_t* partial, acc_t* total, const VecF& f,
              const ScalarF& sf) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const int64_t C = L.channels;
  const int64_t chunk_rows = rows_per_chunk(L.outer);
  const int64_t chunks = (L.outer + chunk_rows - 1) / chunk_rows;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* acc = partial + k * C;
      std::fill(acc, acc + C, acc_t(0));
      const int64_t row_end = std::min(L.outer, (k + 1) * chunk_rows);
      for (int64_t r = k * chunk_rows; r < row_end; ++r) {
        const scalar_t* row = x + r * C;
        int64_t c = 0;
        for (; c + K <= C; c += K) (Vec::loadu(acc + c) + f(IO::load(row + c), c)).store(acc + c);
        for (; c < C; ++c) acc[c] += sf(static_cast<acc_t>(row[c]), c);
      }
    }
  });
  // The chunks' sums added in fp64: a long fp32 sequence of large chunk sums would lose digits of
  // a channel with a large mean.
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int64_t k = 0; k < chunks; ++k) sum += static_cast<double>(partial[k * C + c]);
    total[c] = static_cast<acc_t>(sum);
  }
}

template <typename scalar_t, typename acc_t>
void forward_rows(const ForwardCall<scalar_t, acc_t>& call) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const Layout& L = call.layout;
  const int64_t C = L.channels;
  const int64_t m = L.outer;
  const acc_t* mean = call.given_mean;
  const acc_t* var = call.given_var;
  if (mean == nullptr) {
    if (m == 0) {  // an empty micro-batch has zero statistics (reference.batch_stats)
      std::fill(call.batch_mean, call.batch_mean + C, acc_t(0));
      std::fill(call.batch_var, call.batch_var + C, acc_t(0));
    } else {
      const int64_t chunks = (m + rows_per_chunk(m) - 1) / rows_per_chunk(m);
      std::vector<acc_t> partial(static_cast<size_t>(chunks * C));
      row_sums(L, call.x, partial.data(), call.batch_mean, [](const Vec& v, int64_t) { return v; },
               [](acc_t v, int64_t) { return v; });
      for (int64_t c = 0; c < C; ++c) call.batch_mean[c] /= static_cast<acc_t>(m);
      const acc_t* mu = call.batch_mean;
      row_sums(
          L, call.x, partial.data(), call.batch_var,
          [mu](const Vec& v, int64_t c) {
            const Vec d = v - Vec::loadu(mu + c);
            return d * d;
          },
          [mu](acc_t v, int64_t c) {
            const acc_t d = v - mu[c];
            return d * d;
          });
      for (int64_t c = 0; c < C; ++c) call.batch_var[c] /= static_cast<acc_t>(m);
    }
    mean = call.batch_mean;
    var = call.batch_var;
  }
  if (call.pooling == nullptr) return;
  std::vector<acc_t> coefficients(static_cast<size_t>(3 * C));
  acc_t* center = coefficients.data();
  acc_t* scale = center + C;
  acc_t* shift = scale + C;
  for (int64_t c = 0; c < C; ++c) {
    pool_channel(*call.pooling, c, call.count, mean[c], var[c], center[c], scale[c], shift[c]);
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = call.x + r * C;
      scalar_t* out = call.y + r * C;
      int64_t c = 0;
      for (; c + K <= C; c += K) {
        IO::store(out + c, (IO::load(row + c) - Vec::loadu(center + c)) * Vec::loadu(scale + c) +
                               Vec::loadu(shift + c));
      }
      for (; c < C; ++c) {
        out[c] = static_cast<scalar_t>((static_cast<acc_t>(row[c]) - center[c]) * scale[c] + shift[c]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void run_forward(const ForwardCall<scalar_t, acc_t>& call) {
  if (call.layout.rows) {
    forward_rows(call);
  } else {
    forward_planes(call);
  }
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
                       history_count.is_contiguous() ? history_count : history_count.contiguous(),
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

void check_pooling_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& history_count,
                        const at::Tensor& history_mean, const at::Tensor& history_var) {
  check_input(op, x, "x");
  check_optional_channel_vector(op, weight, "weight", x);
  check_optional_channel_vector(op, bias, "bias", x);
  check_history(op, x, history_count, history_mean, history_var);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmbn_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& history_count,
    const at::Tensor& history_mean, const at::Tensor& history_var, double eps,
    std::optional<double> ema_momentum, bool exact_grad) {
  (void)exact_grad;  // the forward is the same for both gradients
  const char* op = "cmbn_forward";
  check_pooling_args(op, x, weight, bias, history_count, history_mean, history_var);

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
    call.layout = work.layout;
    call.x = work.x.const_data_ptr<scalar_t>();
    call.y = work.out.mutable_data_ptr<scalar_t>();
    call.batch_mean = batch_mean.mutable_data_ptr<acc_t>();
    call.batch_var = batch_var.mutable_data_ptr<acc_t>();
    call.pooling = &pooling;
    call.count = work.layout.values_per_channel();
    run_forward(call);
  });
  if (!work.out.is_same(y)) y.copy_(work.out);
  return {y, mean, var, batch_mean, batch_var, current_weight};
}

std::tuple<at::Tensor, at::Tensor> cmbn_batch_stats_cpu(const at::Tensor& x) {
  const char* op = "cmbn_batch_stats";
  check_input(op, x, "x");
  const int64_t channels = x.size(1);
  const at::TensorOptions stat_options = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor batch_mean = at::empty({channels}, stat_options);
  at::Tensor batch_var = at::empty({channels}, stat_options);
  if (channels == 0) return {batch_mean, batch_var};

  const ReadableTensor readable_x = readable(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_batch_stats_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    ForwardCall<scalar_t, acc_t> call{};
    call.layout = readable_x.layout;
    call.x = readable_x.x.const_data_ptr<scalar_t>();
    call.batch_mean = batch_mean.mutable_data_ptr<acc_t>();
    call.batch_var = batch_var.mutable_data_ptr<acc_t>();
    call.count = readable_x.layout.values_per_channel();
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
  check_pooling_args(op, x, weight, bias, history_count, history_mean, history_var);
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
    call.layout = work.layout;
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
