// The vectorized loops of the CPU kernels, both directions (forward.cpp and backward.cpp call them
// through run_forward / run_backward). This header is compiled once per instruction set: the includer
// defines CMBN_CPU_LOOPS, the namespace of that build (baseline or avx2, see cpu_kernel_utils.h).
//
// Contiguous planes are spread over threads by channel, and each channel's passes run back to back,
// so that the later ones read the channel from the cache. Rows of C channels (channels_last) are
// reduced in chunks of rows that the shape alone fixes, merged in chunk order, then written row by
// row. Either way each channel is reduced in one order whatever the thread count.
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <vector>

#include "activation.h"
#include "cpu_kernel_utils.h"

#ifndef CMBN_CPU_LOOPS
#error "define CMBN_CPU_LOOPS (the namespace of this build of the loops) before including cpu_loops.h"
#endif

namespace cmbn {
namespace cpu {
namespace CMBN_CPU_LOOPS {

// Vectorized loads and stores in the statistics' dtype

template <typename scalar_t, typename acc_t>
struct VecIO {
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();

  // Half and BFloat16 convert in registers in the avx2 build (F16C, and bf16's upper half of fp32),
  // rounding to nearest even as c10's scalar conversions do (the builds' bits differ only in NaN
  // payloads); elsewhere value by value.
  static Vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
#ifdef CPU_CAPABILITY_AVX2
    } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
      return Vec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
#endif
    } else {
      acc_t wide[kSize];
      for (int64_t i = 0; i < kSize; ++i) wide[i] = static_cast<acc_t>(p[i]);
      return Vec::loadu(wide);
    }
  }

  static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
#ifdef CPU_CAPABILITY_AVX2
    } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                       _mm256_cvtps_ph(__m256(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      // c10::BFloat16(float): (bits + 0x7fff + lsb) >> 16, NaN as 0x7fc0.
      const __m256i bits = _mm256_castps_si256(__m256(v));
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_srli_epi32(
          _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
      const __m256 nan = _mm256_cmp_ps(__m256(v), __m256(v), _CMP_UNORD_Q);
      rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xd8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#endif
    } else {
      acc_t wide[kSize];
      v.store(wide);
      for (int64_t i = 0; i < kSize; ++i) p[i] = static_cast<scalar_t>(wide[i]);
    }
  }
};

// The lanes of v added in a fixed order.
template <typename acc_t>
acc_t sum_lanes(const at::vec::Vectorized<acc_t>& v) {
  constexpr int64_t kSize = at::vec::Vectorized<acc_t>::size();
  acc_t lanes[kSize];
  v.store(lanes);
  acc_t total = 0;
  for (int64_t i = 0; i < kSize; ++i) total += lanes[i];
  return total;
}

// The activations on a vector (activation.h's scalar functions lane by lane, the same operations in
// the same order): a switch on the code per vector, never a template parameter per activation. The
// piecewise ones give the scalar functions' bits; exp, log1p and tanh are at::vec's (SLEEF's in the
// avx2 build), which may differ from the scalar ones in the last bit.
template <typename acc_t>
struct VecActivation {
  using Vec = at::vec::Vectorized<acc_t>;

  static Vec sigmoid(const Vec& z) { return Vec(acc_t(1)) / (Vec(acc_t(1)) + z.neg().exp()); }

  static Vec softplus(const Vec& z) {
    return Vec::blendv(z.exp().log1p(), z, z > Vec(acc_t(20)));
  }

  // act(z)
  static Vec apply(const Vec& z, int64_t code, acc_t param) {
    const Vec zero(acc_t(0));
    switch (code) {
      case kRelu:
        return Vec::blendv(zero, z, z > zero);
      case kLeakyRelu:
        return Vec::blendv(z * Vec(param), z, z > zero);
      case kElu:
        return Vec::blendv(Vec(param) * (z.exp() - Vec(acc_t(1))), z, z > zero);
      case kSilu:
        return z * sigmoid(z);
      case kMish:
        return z * softplus(z).tanh();
      case kHardswish: {
        const Vec inner = Vec::blendv(z * (z + Vec(acc_t(3))) / Vec(acc_t(6)), z, z >= Vec(acc_t(3)));
        return Vec::blendv(inner, zero, z <= Vec(acc_t(-3)));
      }
      default:
        return z;
    }
  }

  // act'(z)
  static Vec derivative(const Vec& z, int64_t code, acc_t param) {
    const Vec zero(acc_t(0)), one(acc_t(1));
    switch (code) {
      case kRelu:
        return Vec::blendv(zero, one, z > zero);
      case kLeakyRelu:
        return Vec::blendv(Vec(param), one, z > zero);
      case kElu:
        return Vec::blendv(Vec(param) * z.exp(), one, z > zero);
      case kSilu: {
        const Vec s = sigmoid(z);
        return s * (one + z * (one - s));
      }
      case kMish: {
        const Vec t = softplus(z).tanh();
        return t + z * sigmoid(z) * (one - t * t);
      }
      case kHardswish: {
        const Vec inner = Vec::blendv(one, z / Vec(acc_t(3)) + Vec(acc_t(0.5)), z <= Vec(acc_t(3)));
        return Vec::blendv(inner, zero, z < Vec(acc_t(-3)));
      }
      default:
        return one;
    }
  }

  // z from act(z), for the invertible activations.
  static Vec invert(const Vec& out, int64_t code, acc_t param) {
    switch (code) {
      case kLeakyRelu:
        return Vec::blendv(out / Vec(param), out, out > Vec(acc_t(0)));
      case kElu:
        return Vec::blendv((out / Vec(param)).log1p(), out, out > Vec(acc_t(0)));
      default:
        return out;
    }
  }

  // act'(z) from act(z), for the invertible activations.
  static Vec derivative_from_output(const Vec& out, int64_t code, acc_t param) {
    const Vec one(acc_t(1));
    switch (code) {
      case kLeakyRelu:
        return Vec::blendv(Vec(param), one, out > Vec(acc_t(0)));
      case kElu:
        return Vec::blendv(out + Vec(param), one, out > Vec(acc_t(0)));
      default:
        return one;
    }
  }
};

// Sums f(v) over the values of one channel, given as spans (its planes), in a fixed order: four
// vector accumulators and a scalar one for the ends of the spans, folded into outer accumulators
// every kFold values so that no accumulator adds up more than a few thousand values (accuracy of a
// long fp32 sum).
template <typename scalar_t, typename acc_t>
struct SpanSum {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  static constexpr int64_t K = IO::kSize;
  static constexpr int64_t kFold = 4096;

  Vec a0 = Vec(acc_t(0)), a1 = Vec(acc_t(0)), a2 = Vec(acc_t(0)), a3 = Vec(acc_t(0));
  Vec outer = Vec(acc_t(0));
  acc_t tail = 0, outer_tail = 0;
  int64_t pending = 0;

  template <typename VecF, typename ScalarF>
  void add(const scalar_t* p, int64_t n, const VecF& f, const ScalarF& sf) {
    int64_t i = 0;
    for (; i + 4 * K <= n; i += 4 * K) {
      a0 += f(IO::load(p + i));
      a1 += f(IO::load(p + i + K));
      a2 += f(IO::load(p + i + 2 * K));
      a3 += f(IO::load(p + i + 3 * K));
    }
    for (; i + K <= n; i += K) a0 += f(IO::load(p + i));
    for (; i < n; ++i) tail += sf(static_cast<acc_t>(p[i]));
    pending += n;
    if (pending >= kFold) fold();
  }

  void fold() {
    outer += (a0 + a1) + (a2 + a3);
    a0 = a1 = a2 = a3 = Vec(acc_t(0));
    outer_tail += tail;
    tail = 0;
    pending = 0;
  }

  acc_t result() {
    fold();
    return sum_lanes(outer) + outer_tail;
  }
};

// ---------------------------------------------------------------------------------------------------
// Forward

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

// y = act((x - center) * scale + shift) over n values, act applied in the statistics' dtype before
// the store; the identity has a loop of its own.
template <typename scalar_t, typename acc_t>
void normalize_span(const scalar_t* x, scalar_t* y, int64_t n, acc_t center, acc_t scale,
                    acc_t shift, int64_t activation, acc_t param) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const Vec vc(center), va(scale), vb(shift);
  int64_t i = 0;
  if (activation != kIdentity) {
    for (; i + K <= n; i += K) {
      IO::store(y + i, VecActivation<acc_t>::apply((IO::load(x + i) - vc) * va + vb, activation, param));
    }
    for (; i < n; ++i) {
      y[i] = static_cast<scalar_t>(
          activate((static_cast<acc_t>(x[i]) - center) * scale + shift, activation, param));
    }
    return;
  }
  for (; i + 2 * K <= n; i += 2 * K) {
    IO::store(y + i, (IO::load(x + i) - vc) * va + vb);
    IO::store(y + i + K, (IO::load(x + i + K) - vc) * va + vb);
  }
  for (; i + K <= n; i += K) IO::store(y + i, (IO::load(x + i) - vc) * va + vb);
  for (; i < n; ++i) {
    y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - center) * scale + shift);
  }
}

// How much of x the statistics reduce while it stays in the cache. A channel of at most
// kCachedChannel values (planes) or an x of at most kCachedRows values (rows) gets two passes over
// all of it: the mean, then the squared deviations from it, the second pass reading from the cache.
// Larger ones are cut into blocks of about kStatsBlock values, each reduced in two passes while it
// is cached, and the blocks' (count, mean, M2) are merged with Chan's formula in block order: the
// statistics then read x from memory once, and the normalization once more.
constexpr int64_t kCachedChannel = 65536;
constexpr int64_t kCachedRows = 262144;
constexpr int64_t kStatsBlock = 16384;

// The weights of Chan's merge of a block of count_b values into count values (see chan_merge),
// computed once for all the channels that share the counts.
template <typename acc_t>
struct ChanWeights {
  acc_t share;  // count_b / total
  acc_t cross;  // count * count_b / total
  bool first;   // count == 0: the block is taken as it is
};

template <typename acc_t>
ChanWeights<acc_t> chan_weights(int64_t count, int64_t count_b) {
  const double total = static_cast<double>(count + count_b);
  return ChanWeights<acc_t>{static_cast<acc_t>(static_cast<double>(count_b) / total),
                            static_cast<acc_t>(static_cast<double>(count) *
                                               static_cast<double>(count_b) / total),
                            count == 0};
}

// Chan's merge of a block's (mean_b, m2_b) into (mean, m2).
template <typename acc_t>
inline void chan_merge(const ChanWeights<acc_t>& w, acc_t& mean, acc_t& m2, acc_t mean_b,
                       acc_t m2_b) {
  if (w.first) {
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const acc_t delta = mean_b - mean;
  mean += delta * w.share;
  m2 += m2_b + delta * delta * w.cross;
}

// Mean and M2 (the sum of squared deviations from that mean) of `count` values given as spans:
// spans(f) calls f(pointer, length) for each, always in the same order.
template <typename scalar_t, typename acc_t, typename Spans>
void two_pass_stats(const Spans& spans, int64_t count, acc_t& mean, acc_t& m2) {
  using Vec = at::vec::Vectorized<acc_t>;
  SpanSum<scalar_t, acc_t> sum;
  spans([&](const scalar_t* p, int64_t n) {
    sum.add(p, n, [](const Vec& v) { return v; }, [](acc_t v) { return v; });
  });
  mean = sum.result() / static_cast<acc_t>(count);
  const Vec vmean(mean);
  const acc_t smean = mean;
  SpanSum<scalar_t, acc_t> squares;
  spans([&](const scalar_t* p, int64_t n) {
    squares.add(
        p, n,
        [&](const Vec& v) {
          const Vec d = v - vmean;
          return d * d;
        },
        [&](acc_t v) {
          const acc_t d = v - smean;
          return d * d;
        });
  });
  m2 = squares.result();
}

// Mean and biased variance of channel c of a plane layout.
template <typename scalar_t, typename acc_t>
void plane_channel_stats(const LayoutInfo& L, const scalar_t* x, int64_t c, acc_t& mean, acc_t& var) {
  const int64_t m = L.values_per_channel();
  if (m == 0) {  // an empty micro-batch has zero statistics (reference.batch_stats)
    mean = 0;
    var = 0;
    return;
  }
  const int64_t plane_stride = L.channels * L.inner;
  const scalar_t* channel = x + c * L.inner;
  // Planes [n0, n1) of the channel, or the part [offset, offset + length) of plane n0.
  const auto planes = [&](int64_t n0, int64_t n1) {
    return [=](const auto& f) {
      for (int64_t n = n0; n < n1; ++n) f(channel + n * plane_stride, L.inner);
    };
  };
  acc_t m2;
  if (m <= kCachedChannel) {
    two_pass_stats<scalar_t>(planes(0, L.outer), m, mean, m2);
  } else {
    int64_t count = 0;
    mean = 0;
    m2 = 0;
    acc_t block_mean, block_m2;
    if (L.inner >= kStatsBlock) {  // blocks within each plane
      for (int64_t n = 0; n < L.outer; ++n) {
        for (int64_t offset = 0; offset < L.inner; offset += kStatsBlock) {
          const int64_t length = std::min(kStatsBlock, L.inner - offset);
          const scalar_t* part = channel + n * plane_stride + offset;
          two_pass_stats<scalar_t>([=](const auto& f) { f(part, length); }, length, block_mean,
                                   block_m2);
          chan_merge(chan_weights<acc_t>(count, length), mean, m2, block_mean, block_m2);
          count += length;
        }
      }
    } else {  // blocks of whole planes
      const int64_t planes_per_block = kStatsBlock / L.inner;
      for (int64_t n0 = 0; n0 < L.outer; n0 += planes_per_block) {
        const int64_t n1 = std::min(L.outer, n0 + planes_per_block);
        two_pass_stats<scalar_t>(planes(n0, n1), (n1 - n0) * L.inner, block_mean, block_m2);
        chan_merge(chan_weights<acc_t>(count, (n1 - n0) * L.inner), mean, m2, block_mean, block_m2);
        count += (n1 - n0) * L.inner;
      }
    }
  }
  var = m2 / static_cast<acc_t>(m);
}

template <typename scalar_t, typename acc_t>
void forward_planes(const ForwardCall<scalar_t, acc_t>& call) {
  const LayoutInfo& L = call.info;
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
        normalize_span(call.x + offset, call.y + offset, L.inner, center, scale, shift,
                       call.activation, static_cast<acc_t>(call.activation_param));
      }
    }
  });
}

// acc[c] += f(x[r][c], c) over the rows [r0, r1) of a row layout of C channels, each channel in row
// order; four rows a sweep, so that acc is loaded and stored once per four rows.
template <typename scalar_t, typename acc_t, typename VecF, typename ScalarF>
void accumulate_rows(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, acc_t* acc, const VecF& f,
                     const ScalarF& sf) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const scalar_t* x0 = x + r * C;
    const scalar_t* x1 = x0 + C;
    const scalar_t* x2 = x1 + C;
    const scalar_t* x3 = x2 + C;
    int64_t c = 0;
    for (; c + K <= C; c += K) {
      Vec a = Vec::loadu(acc + c);
      a = a + f(IO::load(x0 + c), c);
      a = a + f(IO::load(x1 + c), c);
      a = a + f(IO::load(x2 + c), c);
      a = a + f(IO::load(x3 + c), c);
      a.store(acc + c);
    }
    for (; c < C; ++c) {
      acc_t a = acc[c];
      a += sf(static_cast<acc_t>(x0[c]), c);
      a += sf(static_cast<acc_t>(x1[c]), c);
      a += sf(static_cast<acc_t>(x2[c]), c);
      a += sf(static_cast<acc_t>(x3[c]), c);
      acc[c] = a;
    }
  }
  for (; r < r1; ++r) {
    const scalar_t* row = x + r * C;
    int64_t c = 0;
    for (; c + K <= C; c += K) (Vec::loadu(acc + c) + f(IO::load(row + c), c)).store(acc + c);
    for (; c < C; ++c) acc[c] += sf(static_cast<acc_t>(row[c]), c);
  }
}

// Per-channel sums over the rows of a row layout: each chunk of rows into its own row of `partial`
// (chunks x C), then the chunks added in chunk order into `total`.
template <typename scalar_t, typename acc_t, typename VecF, typename ScalarF>
void row_sums(const LayoutInfo& L, const scalar_t* x, acc_t* partial, acc_t* total, const VecF& f,
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
      accumulate_rows(x, C, k * chunk_rows, std::min(L.outer, (k + 1) * chunk_rows), acc, f, sf);
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

// Mean and biased variance per channel of a row layout larger than the cache: each chunk of rows
// (rows_per_chunk) is reduced block by block (about kStatsBlock values, two passes while cached) and
// the blocks merged in order (Chan); then the chunks are merged in chunk order, in fp64.
template <typename scalar_t, typename acc_t>
void row_block_stats(const LayoutInfo& L, const scalar_t* x, acc_t* mean, acc_t* var) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const int64_t C = L.channels;
  const int64_t rows = L.outer;
  const int64_t chunk_rows = rows_per_chunk(rows);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  // At most 1024 rows a block: each channel's sums are sequential over the rows of a block.
  const int64_t block_rows = std::clamp<int64_t>(kStatsBlock / std::max<int64_t>(C, 1), 1, 1024);
  // Per chunk: its mean and M2, then the current block's sum (then mean), M2 and shift.
  std::vector<acc_t> partial(static_cast<size_t>(chunks * 5 * C));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* chunk_mean = partial.data() + k * 5 * C;
      acc_t* chunk_m2 = chunk_mean + C;
      acc_t* block_mean = chunk_m2 + C;
      acc_t* block_m2 = block_mean + C;
      acc_t* shift = block_m2 + C;
      const int64_t row_end = std::min(rows, (k + 1) * chunk_rows);
      int64_t count = 0;
      for (int64_t r0 = k * chunk_rows; r0 < row_end; r0 += block_rows) {
        const int64_t r1 = std::min(row_end, r0 + block_rows);
        const int64_t block_count = r1 - r0;
        // The block's mean from sums of x minus its first row: a large mean does not cancel the
        // digits of a long sum.
        for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc_t>(x[r0 * C + c]);
        std::fill(block_mean, block_mean + 2 * C, acc_t(0));
        accumulate_rows(
            x, C, r0, r1, block_mean,
            [shift](const Vec& v, int64_t c) { return v - Vec::loadu(shift + c); },
            [shift](acc_t v, int64_t c) { return v - shift[c]; });
        for (int64_t c = 0; c < C; ++c) {
          block_mean[c] = shift[c] + block_mean[c] / static_cast<acc_t>(block_count);
        }
        accumulate_rows(
            x, C, r0, r1, block_m2,
            [block_mean](const Vec& v, int64_t c) {
              const Vec d = v - Vec::loadu(block_mean + c);
              return d * d;
            },
            [block_mean](acc_t v, int64_t c) {
              const acc_t d = v - block_mean[c];
              return d * d;
            });
        const ChanWeights<acc_t> weights = chan_weights<acc_t>(count, block_count);
        for (int64_t c = 0; c < C; ++c) {
          chan_merge(weights, chunk_mean[c], chunk_m2[c], block_mean[c], block_m2[c]);
        }
        count += block_count;
      }
    }
  });
  std::vector<ChanWeights<double>> chunk_weights(static_cast<size_t>(chunks));
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t chunk_count = std::min(rows, (k + 1) * chunk_rows) - k * chunk_rows;
    chunk_weights[k] = chan_weights<double>(k * chunk_rows, chunk_count);
  }
  for (int64_t c = 0; c < C; ++c) {
    double total_mean = 0, total_m2 = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      chan_merge(chunk_weights[k], total_mean, total_m2, static_cast<double>(partial[k * 5 * C + c]),
                 static_cast<double>(partial[k * 5 * C + C + c]));
    }
    mean[c] = static_cast<acc_t>(total_mean);
    var[c] = static_cast<acc_t>(total_m2 / static_cast<double>(rows));
  }
}

template <typename scalar_t, typename acc_t>
void forward_rows(const ForwardCall<scalar_t, acc_t>& call) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const LayoutInfo& L = call.info;
  const int64_t C = L.channels;
  const int64_t m = L.outer;
  const acc_t* mean = call.given_mean;
  const acc_t* var = call.given_var;
  if (mean == nullptr) {
    if (m == 0) {  // an empty micro-batch has zero statistics (reference.batch_stats)
      std::fill(call.batch_mean, call.batch_mean + C, acc_t(0));
      std::fill(call.batch_var, call.batch_var + C, acc_t(0));
    } else if (m * C <= kCachedRows) {
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
    } else {
      row_block_stats(L, call.x, call.batch_mean, call.batch_var);
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
  const int64_t activation = call.activation;
  const acc_t param = static_cast<acc_t>(call.activation_param);
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = call.x + r * C;
      scalar_t* out = call.y + r * C;
      int64_t c = 0;
      if (activation != kIdentity) {
        for (; c + K <= C; c += K) {
          const Vec z = (IO::load(row + c) - Vec::loadu(center + c)) * Vec::loadu(scale + c) +
                        Vec::loadu(shift + c);
          IO::store(out + c, VecActivation<acc_t>::apply(z, activation, param));
        }
        for (; c < C; ++c) {
          const acc_t z = (static_cast<acc_t>(row[c]) - center[c]) * scale[c] + shift[c];
          out[c] = static_cast<scalar_t>(activate(z, activation, param));
        }
        continue;
      }
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
  if (call.info.layout == Layout::kRows) {
    forward_rows(call);
  } else {
    forward_planes(call);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward

template <typename acc_t>
struct DxCoefficients {
  acc_t coef_dy, coef_xc, constant;
};

// reference.backward_dx's per-channel coefficients for channel c (and reference.parameter_grads),
// written in the reference's order of operations.
// From the output (p.from_output) the sums are sum(g) and sum(g * xhat) with the pooled xhat the
// output gives back, and dx is linear in xhat rather than in x - batch_mean: coef_xc is per unit of
// xhat (see dx_coefficients_from_output).
template <typename acc_t>
DxCoefficients<acc_t> dx_coefficients_from_output(const GradParams<acc_t>& p, int64_t c, acc_t sum_g,
                                                  acc_t sum_g_xhat);

template <typename acc_t>
DxCoefficients<acc_t> dx_coefficients(const GradParams<acc_t>& p, int64_t c, acc_t sum_dy,
                                      acc_t sum_dy_xc) {
  if (p.from_output) return dx_coefficients_from_output(p, c, sum_dy, sum_dy_xc);
  const acc_t count = static_cast<acc_t>(p.count);
  const acc_t invstd = acc_t(1) / std::sqrt(p.var[c] + p.eps);
  // Pooled xhat = ((x - batch_mean) + shift) * invstd.
  const acc_t shift = p.batch_mean[c] - p.mean[c];
  const acc_t sum_dy_xhat = invstd * (sum_dy_xc + shift * sum_dy);
  if (p.grad_weight != nullptr) {
    p.grad_weight[c] = sum_dy_xhat;
    p.grad_bias[c] = sum_dy;
  }
  DxCoefficients<acc_t> k;
  k.coef_dy = p.weight != nullptr ? invstd * p.weight[c] : invstd;
  if (p.exact) {
    // dx = invstd * (g - (b/m) sum(g) - xhat (b/m) sum(g * xhat))
    const acc_t b_over_m = p.current_weight[c] / count;
    k.coef_xc = -k.coef_dy * b_over_m * sum_dy_xhat * invstd;
    k.constant = -k.coef_dy * b_over_m * sum_dy + k.coef_xc * shift;
  } else {
    // dx = invstd * (g - sum(g)/m - xhat_b sum(g * xhat_b)/m), xhat_b = (x - batch_mean) * invstd_b
    k.coef_xc = -k.coef_dy * sum_dy_xc / (count * (p.batch_var[c] + p.eps));
    k.constant = -k.coef_dy * sum_dy / count;
  }
  return k;
}

// The same formulas in the pooled xhat = (x - mean) * invstd, as the output gives it back:
//   exact:  dx = coef_dy * (g - (b/m) sum(g) - xhat (b/m) sum(g * xhat));
//   renorm: x - batch_mean = xhat * std + (mean - batch_mean), so sum(g * (x - batch_mean)) =
//           std * sum(g * xhat) + (mean - batch_mean) * sum(g), and its term of dx is split into one
//           per unit of xhat and a constant.
template <typename acc_t>
DxCoefficients<acc_t> dx_coefficients_from_output(const GradParams<acc_t>& p, int64_t c, acc_t sum_g,
                                                  acc_t sum_g_xhat) {
  const acc_t count = static_cast<acc_t>(p.count);
  const acc_t invstd = acc_t(1) / std::sqrt(p.var[c] + p.eps);
  if (p.grad_weight != nullptr) {
    p.grad_weight[c] = sum_g_xhat;
    p.grad_bias[c] = sum_g;
  }
  DxCoefficients<acc_t> k;
  k.coef_dy = p.weight != nullptr ? invstd * p.weight[c] : invstd;
  if (p.exact) {
    const acc_t b_over_m = p.current_weight[c] / count;
    k.coef_xc = -k.coef_dy * b_over_m * sum_g_xhat;
    k.constant = -k.coef_dy * b_over_m * sum_g;
  } else {
    const acc_t std_dev = std::sqrt(p.var[c] + p.eps);
    const acc_t offset = p.mean[c] - p.batch_mean[c];
    const acc_t sum_g_xc = std_dev * sum_g_xhat + offset * sum_g;
    const acc_t coef_xc = -k.coef_dy * sum_g_xc / (count * (p.batch_var[c] + p.eps));
    k.coef_xc = coef_xc * std_dev;
    k.constant = -k.coef_dy * sum_g / count + coef_xc * offset;
  }
  return k;
}

// What the backward through an activation takes per channel: z = (x - center) * scale + shift as the
// forward computed it, batch_mean, and 1 / lean_weight(weight) (from the output).
template <typename acc_t>
struct GradChannel {
  acc_t center, scale, shift, batch_mean, inv_weight;
};

template <typename acc_t>
GradChannel<acc_t> grad_channel(const GradParams<acc_t>& p, int64_t c) {
  const acc_t invstd = acc_t(1) / std::sqrt(p.var[c] + p.eps);
  GradChannel<acc_t> ch;
  ch.center = p.mean[c];
  ch.scale = p.weight != nullptr ? invstd * p.weight[c] : invstd;
  ch.shift = p.bias != nullptr ? p.bias[c] : acc_t(0);
  ch.batch_mean = p.batch_mean[c];
  ch.inv_weight = p.weight != nullptr ? acc_t(1) / lean_weight(p.weight[c]) : acc_t(1);
  return ch;
}

// g = dy * act'(z), and u, the value dx is linear in: x - batch_mean with z recomputed from x, or,
// from the output s = act(z), the pooled xhat = (act^-1(s) - shift) / lean_weight(weight).
template <typename acc_t>
struct ActivationGrad {
  using Vec = at::vec::Vectorized<acc_t>;
  using Act = VecActivation<acc_t>;
  int64_t code;
  acc_t param;
  bool from_output;

  void vec(const Vec& dy, const Vec& s, const Vec& center, const Vec& scale, const Vec& shift,
           const Vec& batch_mean, const Vec& inv_weight, Vec& g, Vec& u) const {
    if (from_output) {
      g = dy * Act::derivative_from_output(s, code, param);
      u = (Act::invert(s, code, param) - shift) * inv_weight;
    } else {
      g = dy * Act::derivative((s - center) * scale + shift, code, param);
      u = s - batch_mean;
    }
  }

  void scalar(acc_t dy, acc_t s, const GradChannel<acc_t>& ch, acc_t& g, acc_t& u) const {
    if (from_output) {
      g = dy * activation_derivative_from_output(s, code, param);
      u = (invert_activation(s, code, param) - ch.shift) * ch.inv_weight;
    } else {
      g = dy * activation_derivative((s - ch.center) * ch.scale + ch.shift, code, param);
      u = s - ch.batch_mean;
    }
  }

  // Whether the plain loops (g = dy, u = x - batch_mean) serve.
  bool plain() const { return code == kIdentity && !from_output; }

  // Whether the sums' pass keeps, for the dx pass, what takes an exp or log1p to compute: g (ELU, SiLU,
  // Mish), or from the output u (ELU's inverse). Kept in grad_x, when it holds the statistics' dtype,
  // so the dx pass reads it back with the same bits instead of computing it again.
  bool keeps() const { return code == kElu || code == kSilu || code == kMish; }
  static const Vec& kept_one(const Vec& g, const Vec& u, bool from_output) {
    return from_output ? u : g;
  }

  // g and u with the kept one read back (keeps()).
  void vec_from_kept(const Vec& dy, const Vec& s, const Vec& kept, const Vec& batch_mean, Vec& g,
                     Vec& u) const {
    if (from_output) {
      g = dy * Act::derivative_from_output(s, code, param);
      u = kept;
    } else {
      g = kept;
      u = s - batch_mean;
    }
  }

  void scalar_from_kept(acc_t dy, acc_t s, acc_t kept, const GradChannel<acc_t>& ch, acc_t& g,
                        acc_t& u) const {
    if (from_output) {
      g = dy * activation_derivative_from_output(s, code, param);
      u = kept;
    } else {
      g = kept;
      u = s - ch.batch_mean;
    }
  }
};

// Where the sums' pass keeps g or u for the dx pass (ActivationGrad::keeps): grad_x itself when it
// holds the statistics' dtype, else nowhere (null: the dx pass computes them again).
template <typename scalar_t, typename acc_t>
acc_t* kept_in(const ActivationGrad<acc_t>& act, scalar_t* grad_x) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (act.keeps()) return grad_x;
  }
  return nullptr;
}

template <typename acc_t>
ActivationGrad<acc_t> activation_grad(const GradParams<acc_t>& p) {
  return ActivationGrad<acc_t>{p.activation, static_cast<acc_t>(p.activation_param), p.from_output};
}

// dx = (constant + (x - batch_mean) * coef_xc) + dy * coef_dy over n values.
template <typename scalar_t, typename acc_t>
void dx_span(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, acc_t batch_mean,
             const DxCoefficients<acc_t>& k) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const Vec vmean(batch_mean), vdy(k.coef_dy), vxc(k.coef_xc), vconst(k.constant);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    IO::store(dx + i, (vconst + (IO::load(x + i) - vmean) * vxc) + IO::load(dy + i) * vdy);
  }
  for (; i < n; ++i) {
    const acc_t centered = static_cast<acc_t>(x[i]) - batch_mean;
    dx[i] = static_cast<scalar_t>((k.constant + centered * k.coef_xc) +
                                  static_cast<acc_t>(dy[i]) * k.coef_dy);
  }
}

// dx = (constant + u * coef_xc) + g * coef_dy over n values, g and u through the activation.
// kept: what the sums' pass kept (kept_in), read back here before dx overwrites it (the same memory).
template <typename scalar_t, typename acc_t>
void activated_dx_span(const scalar_t* dy, const scalar_t* s, scalar_t* dx, int64_t n,
                       const ActivationGrad<acc_t>& act, const GradChannel<acc_t>& ch,
                       const DxCoefficients<acc_t>& k, const acc_t* kept) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const Vec center(ch.center), scale(ch.scale), shift(ch.shift), mean(ch.batch_mean),
      inv_weight(ch.inv_weight);
  const Vec vdy(k.coef_dy), vxc(k.coef_xc), vconst(k.constant);
  int64_t i = 0;
  if (kept != nullptr) {
    for (; i + K <= n; i += K) {
      Vec g, u;
      act.vec_from_kept(IO::load(dy + i), IO::load(s + i), Vec::loadu(kept + i), mean, g, u);
      IO::store(dx + i, (vconst + u * vxc) + g * vdy);
    }
    for (; i < n; ++i) {
      acc_t g, u;
      act.scalar_from_kept(static_cast<acc_t>(dy[i]), static_cast<acc_t>(s[i]), kept[i], ch, g, u);
      dx[i] = static_cast<scalar_t>((k.constant + u * k.coef_xc) + g * k.coef_dy);
    }
    return;
  }
  for (; i + K <= n; i += K) {
    Vec g, u;
    act.vec(IO::load(dy + i), IO::load(s + i), center, scale, shift, mean, inv_weight, g, u);
    IO::store(dx + i, (vconst + u * vxc) + g * vdy);
  }
  for (; i < n; ++i) {
    acc_t g, u;
    act.scalar(static_cast<acc_t>(dy[i]), static_cast<acc_t>(s[i]), ch, g, u);
    dx[i] = static_cast<scalar_t>((k.constant + u * k.coef_xc) + g * k.coef_dy);
  }
}

// sum(dy) and sum(dy * (x - batch_mean)) over spans of one channel, in a fixed order (see SpanSum).
template <typename scalar_t, typename acc_t>
struct GradSpanSums {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  static constexpr int64_t K = IO::kSize;
  static constexpr int64_t kFold = 4096;

  Vec dy0 = Vec(acc_t(0)), dy1 = Vec(acc_t(0)), xc0 = Vec(acc_t(0)), xc1 = Vec(acc_t(0));
  Vec outer_dy = Vec(acc_t(0)), outer_xc = Vec(acc_t(0));
  acc_t tail_dy = 0, tail_xc = 0, outer_tail_dy = 0, outer_tail_xc = 0;
  int64_t pending = 0;

  void add(const scalar_t* dy, const scalar_t* x, int64_t n, acc_t mean) {
    const Vec vmean(mean);
    int64_t i = 0;
    for (; i + 2 * K <= n; i += 2 * K) {
      const Vec g0 = IO::load(dy + i);
      const Vec g1 = IO::load(dy + i + K);
      dy0 += g0;
      dy1 += g1;
      xc0 += g0 * (IO::load(x + i) - vmean);
      xc1 += g1 * (IO::load(x + i + K) - vmean);
    }
    for (; i + K <= n; i += K) {
      const Vec g = IO::load(dy + i);
      dy0 += g;
      xc0 += g * (IO::load(x + i) - vmean);
    }
    for (; i < n; ++i) {
      const acc_t g = static_cast<acc_t>(dy[i]);
      tail_dy += g;
      tail_xc += g * (static_cast<acc_t>(x[i]) - mean);
    }
    pending += n;
    if (pending >= kFold) fold();
  }

  // sum(g) and sum(g * u) through the activation (ActivationGrad).
  // keep: where g or u is kept for the dx pass (kept_in), or null.
  void add_activated(const scalar_t* dy, const scalar_t* s, int64_t n,
                     const ActivationGrad<acc_t>& act, const GradChannel<acc_t>& ch, acc_t* keep) {
    const Vec center(ch.center), scale(ch.scale), shift(ch.shift), mean(ch.batch_mean),
        inv_weight(ch.inv_weight);
    int64_t i = 0;
    for (; i + K <= n; i += K) {
      Vec g, u;
      act.vec(IO::load(dy + i), IO::load(s + i), center, scale, shift, mean, inv_weight, g, u);
      if (keep != nullptr) ActivationGrad<acc_t>::kept_one(g, u, act.from_output).store(keep + i);
      dy0 += g;
      xc0 += g * u;
    }
    for (; i < n; ++i) {
      acc_t g, u;
      act.scalar(static_cast<acc_t>(dy[i]), static_cast<acc_t>(s[i]), ch, g, u);
      if (keep != nullptr) keep[i] = act.from_output ? u : g;
      tail_dy += g;
      tail_xc += g * u;
    }
    pending += n;
    if (pending >= kFold) fold();
  }

  void fold() {
    outer_dy += dy0 + dy1;
    outer_xc += xc0 + xc1;
    dy0 = dy1 = xc0 = xc1 = Vec(acc_t(0));
    outer_tail_dy += tail_dy;
    outer_tail_xc += tail_xc;
    tail_dy = tail_xc = 0;
    pending = 0;
  }

  void result(acc_t& sum_dy, acc_t& sum_dy_xc) {
    fold();
    sum_dy = sum_lanes(outer_dy) + outer_tail_dy;
    sum_dy_xc = sum_lanes(outer_xc) + outer_tail_xc;
  }
};

template <typename scalar_t, typename acc_t>
void backward_planes(const BackwardCall<scalar_t, acc_t>& call) {
  const LayoutInfo& L = call.info;
  const int64_t plane_stride = L.channels * L.inner;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L.values_per_channel(), 1));
  // Through an activation (cmbn_backward only: the phase ops have none).
  const bool activated = call.params != nullptr && !activation_grad(*call.params).plain();
  at::parallel_for(0, L.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const acc_t mean = call.batch_mean[c];
      acc_t sum_dy, sum_dy_xc;
      if (activated) {
        const ActivationGrad<acc_t> act = activation_grad(*call.params);
        const GradChannel<acc_t> ch = grad_channel(*call.params, c);
        acc_t* kept = kept_in(act, call.grad_x);
        GradSpanSums<scalar_t, acc_t> sums;
        for (int64_t n = 0; n < L.outer; ++n) {
          const int64_t offset = n * plane_stride + c * L.inner;
          sums.add_activated(call.grad_y + offset, call.x + offset, L.inner, act, ch,
                             kept != nullptr ? kept + offset : nullptr);
        }
        sums.result(sum_dy, sum_dy_xc);
        const DxCoefficients<acc_t> k = dx_coefficients(*call.params, c, sum_dy, sum_dy_xc);
        for (int64_t n = 0; n < L.outer; ++n) {
          const int64_t offset = n * plane_stride + c * L.inner;
          activated_dx_span(call.grad_y + offset, call.x + offset, call.grad_x + offset, L.inner,
                            act, ch, k, kept != nullptr ? kept + offset : nullptr);
        }
        continue;
      }
      if (call.given_sum_dy != nullptr) {
        sum_dy = call.given_sum_dy[c];
        sum_dy_xc = call.given_sum_dy_xc[c];
      } else {
        GradSpanSums<scalar_t, acc_t> sums;
        for (int64_t n = 0; n < L.outer; ++n) {
          const int64_t offset = n * plane_stride + c * L.inner;
          sums.add(call.grad_y + offset, call.x + offset, L.inner, mean);
        }
        sums.result(sum_dy, sum_dy_xc);
        call.sum_dy[c] = sum_dy;
        call.sum_dy_xc[c] = sum_dy_xc;
      }
      if (call.params == nullptr) continue;
      const DxCoefficients<acc_t> k = dx_coefficients(*call.params, c, sum_dy, sum_dy_xc);
      for (int64_t n = 0; n < L.outer; ++n) {
        const int64_t offset = n * plane_stride + c * L.inner;
        dx_span(call.grad_y + offset, call.x + offset, call.grad_x + offset, L.inner, mean, k);
      }
    }
  });
}

// backward_rows through an activation: the same chunks and order, g and u (ActivationGrad) in place
// of dy and x - batch_mean, from per-channel vectors of GradChannel's values. Up to four rows a
// sweep, so that the per-channel vectors and sums are loaded once per four rows (each channel still
// in row order).
template <typename scalar_t, typename acc_t>
void activated_backward_rows(const BackwardCall<scalar_t, acc_t>& call) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  constexpr int64_t kSweep = 4;
  const LayoutInfo& L = call.info;
  const int64_t C = L.channels;
  const int64_t rows = L.outer;
  const GradParams<acc_t>& params = *call.params;
  const ActivationGrad<acc_t> act = activation_grad(params);
  std::vector<GradChannel<acc_t>> channel(static_cast<size_t>(C));
  // Structure of arrays for the vector loads: center, scale, shift, batch_mean, inv_weight.
  std::vector<acc_t> per_channel(static_cast<size_t>(5 * C));
  for (int64_t c = 0; c < C; ++c) {
    channel[c] = grad_channel(params, c);
    per_channel[c] = channel[c].center;
    per_channel[C + c] = channel[c].scale;
    per_channel[2 * C + c] = channel[c].shift;
    per_channel[3 * C + c] = channel[c].batch_mean;
    per_channel[4 * C + c] = channel[c].inv_weight;
  }
  const acc_t* center = per_channel.data();
  const acc_t* scale = center + C;
  const acc_t* shift = scale + C;
  const acc_t* bm = shift + C;
  const acc_t* inv_weight = bm + C;
  acc_t* kept = kept_in(act, call.grad_x);

  const int64_t chunk_rows = rows_per_chunk(rows);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  std::vector<acc_t> partial(static_cast<size_t>(chunks * 2 * C));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* acc_g = partial.data() + k * 2 * C;
      acc_t* acc_gu = acc_g + C;
      std::fill(acc_g, acc_g + 2 * C, acc_t(0));
      const int64_t row_end = std::min(rows, (k + 1) * chunk_rows);
      for (int64_t r0 = k * chunk_rows; r0 < row_end; r0 += kSweep) {
        const int64_t sweep = std::min(kSweep, row_end - r0);
        int64_t c = 0;
        for (; c + K <= C; c += K) {
          const Vec vcenter = Vec::loadu(center + c), vscale = Vec::loadu(scale + c),
                    vshift = Vec::loadu(shift + c), vbm = Vec::loadu(bm + c),
                    vinv = Vec::loadu(inv_weight + c);
          Vec a_g = Vec::loadu(acc_g + c);
          Vec a_gu = Vec::loadu(acc_gu + c);
          for (int64_t i = 0; i < sweep; ++i) {
            const int64_t at = (r0 + i) * C + c;
            Vec g, u;
            act.vec(IO::load(call.grad_y + at), IO::load(call.x + at), vcenter, vscale, vshift, vbm,
                    vinv, g, u);
            if (kept != nullptr) {
              ActivationGrad<acc_t>::kept_one(g, u, act.from_output).store(kept + at);
            }
            a_g = a_g + g;
            a_gu = a_gu + g * u;
          }
          a_g.store(acc_g + c);
          a_gu.store(acc_gu + c);
        }
        for (; c < C; ++c) {
          for (int64_t i = 0; i < sweep; ++i) {
            const int64_t at = (r0 + i) * C + c;
            acc_t g, u;
            act.scalar(static_cast<acc_t>(call.grad_y[at]), static_cast<acc_t>(call.x[at]),
                       channel[c], g, u);
            if (kept != nullptr) kept[at] = act.from_output ? u : g;
            acc_g[c] += g;
            acc_gu[c] += g * u;
          }
        }
      }
    }
  });
  std::vector<acc_t> coefficients(static_cast<size_t>(3 * C));
  acc_t* coef_dy = coefficients.data();
  acc_t* coef_xc = coef_dy + C;
  acc_t* constant = coef_xc + C;
  for (int64_t c = 0; c < C; ++c) {  // the chunks' sums added in chunk order, in fp64
    double total_g = 0, total_gu = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      total_g += static_cast<double>(partial[k * 2 * C + c]);
      total_gu += static_cast<double>(partial[k * 2 * C + C + c]);
    }
    const DxCoefficients<acc_t> k = dx_coefficients(params, c, static_cast<acc_t>(total_g),
                                                    static_cast<acc_t>(total_gu));
    coef_dy[c] = k.coef_dy;
    coef_xc[c] = k.coef_xc;
    constant[c] = k.constant;
  }
  const int64_t grain = std::max<int64_t>(kSweep, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += kSweep) {
      const int64_t sweep = std::min(kSweep, end - r0);
      int64_t c = 0;
      for (; c + K <= C; c += K) {
        const Vec vcenter = Vec::loadu(center + c), vscale = Vec::loadu(scale + c),
                  vshift = Vec::loadu(shift + c), vbm = Vec::loadu(bm + c),
                  vinv = Vec::loadu(inv_weight + c);
        const Vec vconst = Vec::loadu(constant + c), vxc = Vec::loadu(coef_xc + c),
                  vdy = Vec::loadu(coef_dy + c);
        for (int64_t i = 0; i < sweep; ++i) {
          const int64_t at = (r0 + i) * C + c;
          const Vec dy = IO::load(call.grad_y + at);
          const Vec s = IO::load(call.x + at);
          Vec g, u;
          if (kept != nullptr) {  // read before grad_x, the same memory, is written
            act.vec_from_kept(dy, s, Vec::loadu(kept + at), vbm, g, u);
          } else {
            act.vec(dy, s, vcenter, vscale, vshift, vbm, vinv, g, u);
          }
          IO::store(call.grad_x + at, (vconst + u * vxc) + g * vdy);
        }
      }
      for (; c < C; ++c) {
        for (int64_t i = 0; i < sweep; ++i) {
          const int64_t at = (r0 + i) * C + c;
          const acc_t dy = static_cast<acc_t>(call.grad_y[at]);
          const acc_t s = static_cast<acc_t>(call.x[at]);
          acc_t g, u;
          if (kept != nullptr) {
            act.scalar_from_kept(dy, s, kept[at], channel[c], g, u);
          } else {
            act.scalar(dy, s, channel[c], g, u);
          }
          call.grad_x[at] = static_cast<scalar_t>((constant[c] + u * coef_xc[c]) + g * coef_dy[c]);
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_rows(const BackwardCall<scalar_t, acc_t>& call) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const LayoutInfo& L = call.info;
  const int64_t C = L.channels;
  const int64_t rows = L.outer;
  const acc_t* bm = call.batch_mean;
  const acc_t* sum_dy = call.given_sum_dy;
  const acc_t* sum_dy_xc = call.given_sum_dy_xc;
  if (call.params != nullptr && !activation_grad(*call.params).plain()) {
    return activated_backward_rows(call);
  }
  if (sum_dy == nullptr) {
    // Chunks of rows into their own partial sums (chunks x 2C), then merged in chunk order.
    const int64_t chunk_rows = rows_per_chunk(rows);
    const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
    std::vector<acc_t> partial(static_cast<size_t>(chunks * 2 * C));
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        acc_t* acc_dy = partial.data() + k * 2 * C;
        acc_t* acc_xc = acc_dy + C;
        std::fill(acc_dy, acc_dy + 2 * C, acc_t(0));
        const int64_t row_end = std::min(rows, (k + 1) * chunk_rows);
        int64_t r = k * chunk_rows;
        // Four rows a sweep (see accumulate_rows), each channel still in row order.
        for (; r + 4 <= row_end; r += 4) {
          const scalar_t* g = call.grad_y + r * C;
          const scalar_t* xr = call.x + r * C;
          int64_t c = 0;
          for (; c + K <= C; c += K) {
            const Vec mean = Vec::loadu(bm + c);
            Vec a_dy = Vec::loadu(acc_dy + c);
            Vec a_xc = Vec::loadu(acc_xc + c);
            for (int64_t i = 0; i < 4; ++i) {
              const Vec vg = IO::load(g + i * C + c);
              a_dy = a_dy + vg;
              a_xc = a_xc + vg * (IO::load(xr + i * C + c) - mean);
            }
            a_dy.store(acc_dy + c);
            a_xc.store(acc_xc + c);
          }
          for (; c < C; ++c) {
            for (int64_t i = 0; i < 4; ++i) {
              const acc_t vg = static_cast<acc_t>(g[i * C + c]);
              acc_dy[c] += vg;
              acc_xc[c] += vg * (static_cast<acc_t>(xr[i * C + c]) - bm[c]);
            }
          }
        }
        for (; r < row_end; ++r) {
          const scalar_t* g = call.grad_y + r * C;
          const scalar_t* xr = call.x + r * C;
          int64_t c = 0;
          for (; c + K <= C; c += K) {
            const Vec vg = IO::load(g + c);
            (Vec::loadu(acc_dy + c) + vg).store(acc_dy + c);
            (Vec::loadu(acc_xc + c) + vg * (IO::load(xr + c) - Vec::loadu(bm + c))).store(acc_xc + c);
          }
          for (; c < C; ++c) {
            const acc_t vg = static_cast<acc_t>(g[c]);
            acc_dy[c] += vg;
            acc_xc[c] += vg * (static_cast<acc_t>(xr[c]) - bm[c]);
          }
        }
      }
    });
    // The chunks' sums added in chunk order, in fp64 (see forward.cpp's row_sums).
    for (int64_t c = 0; c < C; ++c) {
      double total_dy = 0, total_xc = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        total_dy += static_cast<double>(partial[k * 2 * C + c]);
        total_xc += static_cast<double>(partial[k * 2 * C + C + c]);
      }
      call.sum_dy[c] = static_cast<acc_t>(total_dy);
      call.sum_dy_xc[c] = static_cast<acc_t>(total_xc);
    }
    sum_dy = call.sum_dy;
    sum_dy_xc = call.sum_dy_xc;
  }
  if (call.params == nullptr) return;
  std::vector<acc_t> coefficients(static_cast<size_t>(3 * C));
  acc_t* coef_dy = coefficients.data();
  acc_t* coef_xc = coef_dy + C;
  acc_t* constant = coef_xc + C;
  for (int64_t c = 0; c < C; ++c) {
    const DxCoefficients<acc_t> k = dx_coefficients(*call.params, c, sum_dy[c], sum_dy_xc[c]);
    coef_dy[c] = k.coef_dy;
    coef_xc[c] = k.coef_xc;
    constant[c] = k.constant;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = call.grad_y + r * C;
      const scalar_t* xr = call.x + r * C;
      scalar_t* out = call.grad_x + r * C;
      int64_t c = 0;
      for (; c + K <= C; c += K) {
        const Vec centered = IO::load(xr + c) - Vec::loadu(bm + c);
        IO::store(out + c, (Vec::loadu(constant + c) + centered * Vec::loadu(coef_xc + c)) +
                               IO::load(g + c) * Vec::loadu(coef_dy + c));
      }
      for (; c < C; ++c) {
        const acc_t centered = static_cast<acc_t>(xr[c]) - bm[c];
        out[c] = static_cast<scalar_t>((constant[c] + centered * coef_xc[c]) +
                                       static_cast<acc_t>(g[c]) * coef_dy[c]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void run_backward(const BackwardCall<scalar_t, acc_t>& call) {
  if (call.info.layout == Layout::kRows) {
    backward_rows(call);
  } else {
    backward_planes(call);
  }
}

}  // namespace CMBN_CPU_LOOPS
}  // namespace cpu
}  // namespace cmbn
