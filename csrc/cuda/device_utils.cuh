#pragma once
// Device building blocks shared by the forward and backward kernels: Welford/Chan summaries,
// fixed-order shared-memory tree reductions, 16-byte packs and per-channel loads of any float dtype.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernel_types.h"

namespace cmbn {

// Rounds of packs a thread of a single-read kernel holds (kHeldRoundsForward, kHeldRoundsBackward),
// halved where nvcc keeps the values in more registers than their bytes (bfloat16, and 16-bit values
// on the masked walk, both converted to fp32 up front), so the kernel fits 128 registers unspilled.
template <typename scalar_t, Layout L>
constexpr int held_rounds(int rounds) {
  const bool widened = sizeof(scalar_t) == 2 &&
                       (L == Layout::kPlanesMasked || std::is_same_v<scalar_t, c10::BFloat16>);
  return widened ? rounds / 2 : rounds;
}

// (count, mean, M2) of a set of values; variance = M2 / count. A POD so it can live in __shared__.
template <typename acc_t>
struct WelfordState {
  acc_t mean;
  acc_t m2;
  int64_t count;  // int64: a channel may hold more values than fp32 counts exactly (2^24)
};

template <typename acc_t>
__device__ __forceinline__ WelfordState<acc_t> welford_empty() {
  return WelfordState<acc_t>{acc_t(0), acc_t(0), 0};
}

// Chan et al.'s merge of two summaries. Never rebuilds M2 from E[x^2] - E[x]^2, which cancels for
// inputs with a large mean. Empty sides pass the other through unchanged.
template <typename acc_t>
__device__ __forceinline__ WelfordState<acc_t> welford_merge(const WelfordState<acc_t>& a,
                                                             const WelfordState<acc_t>& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const int64_t count = a.count + b.count;
  const acc_t share_b = static_cast<acc_t>(b.count) / static_cast<acc_t>(count);
  const acc_t delta = b.mean - a.mean;
  WelfordState<acc_t> merged;
  merged.mean = a.mean + delta * share_b;
  merged.m2 = a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * share_b;
  merged.count = count;
  return merged;
}

// VEC consecutive values moved as one 16-byte (or narrower) memory transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* address) {
  return *reinterpret_cast<const Pack<T, VEC>*>(address);
}

// A 16-byte pack is stored with one 128-bit instruction (STG.E.128). Assigned as a struct, nvcc splits
// the store of a pack whose values were computed one by one (channels_last: one channel per value)
// into four 32-bit stores rather than gather its registers; the vector store is spelled out in PTX.
// Elsewhere (the CPU emulation), a plain store.
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* address, const Pack<T, VEC>& pack) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    uint32_t word[4];
    memcpy(word, &pack, 16);
    // st.global takes a global-space address: converted from the generic pointer, as PTX requires.
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(address)),
                 "r"(word[0]), "r"(word[1]), "r"(word[2]), "r"(word[3])
                 : "memory");
    return;
  }
#endif
  *reinterpret_cast<Pack<T, VEC>*>(address) = pack;
}

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T value) {
  return static_cast<acc_t>(static_cast<float>(value));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double value) {
  return value;
}
template <>
__device__ __forceinline__ float to_acc<float, float>(float value) {
  return value;
}
// bfloat16 is the top half of a float: a shift of its bits, which keeps held packs packed in registers
// (c10's conversion unpacks them all up front and spills).
template <>
__device__ __forceinline__ float to_acc<float, c10::BFloat16>(c10::BFloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float result;
  memcpy(&result, &bits, sizeof(result));
  return result;
}

// One thread's values of each of its ACCS channels as sums shifted by the channel's first value seen:
// a subtraction and a multiply-add per value, and one conversion to (count, mean, M2) per thread
// instead of a division and a merge per chunk. The shift keeps the sums small for inputs with a large
// mean (M2 = S2 - S1^2 / n cancels only as much as the first value lies from the mean), so the
// variance stays accurate where E[x^2] - E[x]^2 would lose it.
template <typename acc_t, int ACCS>
struct ShiftedSums {
  acc_t shift[ACCS];
  acc_t sum[ACCS];     // S1 = sum(x - shift)
  acc_t sum_sq[ACCS];  // S2 = sum((x - shift)^2)
  int64_t count;       // values per channel so far (the same for all ACCS channels)
};

template <typename acc_t, int ACCS>
__device__ __forceinline__ ShiftedSums<acc_t, ACCS> shifted_sums_empty() {
  ShiftedSums<acc_t, ACCS> sums;
#pragma unroll
  for (int a = 0; a < ACCS; ++a) sums.shift[a] = sums.sum[a] = sums.sum_sq[a] = acc_t(0);
  sums.count = 0;
  return sums;
}

// a * b + c rounded once, on every path and in the emulation alike: the kernels that must agree bit
// for bit (two-pass and single-read, fused and phase ops) leave nothing to the compiler's contraction.
__device__ __forceinline__ float multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double multiply_add(double a, double b, double c) { return fma(a, b, c); }

// Adds the valid values of kUnroll packs: kPlanes (ACCS == 1) all values to the thread's one channel,
// kRows value v of a pack to channel v. Pack 0 is always valid (the walkers hand out a valid first
// pack), so the shift comes from the thread's first pack.
template <typename acc_t, typename scalar_t, int VEC, int ACCS>
__device__ __forceinline__ void accumulate_packs(ShiftedSums<acc_t, ACCS>& sums,
                                                 const Pack<scalar_t, VEC> (&pack)[kUnroll],
                                                 const bool (&valid)[kUnroll]) {
  if (sums.count == 0) {
#pragma unroll
    for (int a = 0; a < ACCS; ++a) sums.shift[a] = to_acc<acc_t>(pack[0].v[a]);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (!valid[u]) continue;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int a = ACCS == 1 ? 0 : v;
      const acc_t d = to_acc<acc_t>(pack[u].v[v]) - sums.shift[a];
      sums.sum[a] += d;
      sums.sum_sq[a] = multiply_add(d, d, sums.sum_sq[a]);
    }
    sums.count += ACCS == 1 ? VEC : 1;
  }
}

// The same for packs of which only some values count (bit v of keep[u]: value v of pack u), all of
// one channel: the shift is the first value kept.
template <typename acc_t, typename scalar_t, int VEC>
__device__ __forceinline__ void accumulate_kept(ShiftedSums<acc_t, 1>& sums,
                                                const Pack<scalar_t, VEC> (&pack)[kUnroll],
                                                const uint32_t (&keep)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (!(keep[u] >> v & 1u)) continue;
      const acc_t x = to_acc<acc_t>(pack[u].v[v]);
      if (sums.count == 0) sums.shift[0] = x;
      const acc_t d = x - sums.shift[0];
      sums.sum[0] += d;
      sums.sum_sq[0] = multiply_add(d, d, sums.sum_sq[0]);
      ++sums.count;
    }
  }
}

// Channel a's sums as a (count, mean, M2) summary for the Chan merges across threads and blocks.
template <typename acc_t, int ACCS>
__device__ __forceinline__ WelfordState<acc_t> to_welford(const ShiftedSums<acc_t, ACCS>& sums, int a) {
  if (sums.count == 0) return welford_empty<acc_t>();
  const acc_t n = static_cast<acc_t>(sums.count);
  const acc_t mean_offset = sums.sum[a] / n;
  WelfordState<acc_t> state;
  state.mean = sums.shift[a] + mean_offset;
  const acc_t m2 = sums.sum_sq[a] - sums.sum[a] * mean_offset;
  state.m2 = m2 > acc_t(0) ? m2 : acc_t(0);  // rounding can leave a tiny negative for equal values
  state.count = sums.count;
  return state;
}

// The two per-channel sums of the backward pass.
template <typename acc_t>
struct GradSums {
  acc_t dy;     // sum(dy)
  acc_t dy_xc;  // sum(dy * (x - batch_mean))
};

template <typename acc_t>
__device__ __forceinline__ GradSums<acc_t> grad_sums_add(const GradSums<acc_t>& a,
                                                         const GradSums<acc_t>& b) {
  return GradSums<acc_t>{a.dy + b.dy, a.dy_xc + b.dy_xc};
}

// Reduces `parts` summaries of each of `width` channels, stored at entries[part * width + channel],
// into entries[channel]. A fixed pairing tree (part p takes part p + half), so the result is the same
// bits on every run. `parts` is a power of two; every thread of the block must call it.
template <typename T, typename Merge>
__device__ __forceinline__ void tree_reduce(T* entries, int parts, int width, int thread,
                                            Merge merge) {
  __syncthreads();
  for (int half = parts / 2; half > 0; half /= 2) {
    for (int e = thread; e < half * width; e += kBlockThreads) {
      entries[e] = merge(entries[e], entries[e + half * width]);
    }
    __syncthreads();
  }
}

// Element i of a per-channel vector, in the accumulation type; `fallback` when the vector is absent.
template <typename acc_t>
__device__ __forceinline__ acc_t load_any_float(const AnyFloatVector& vector, int64_t i,
                                                acc_t fallback) {
  switch (vector.kind) {
    case FloatKind::kHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(vector.data)[i]));
    case FloatKind::kBFloat16:
      return static_cast<acc_t>(
          static_cast<float>(static_cast<const c10::BFloat16*>(vector.data)[i]));
    case FloatKind::kFloat:
      return static_cast<acc_t>(static_cast<const float*>(vector.data)[i]);
    case FloatKind::kDouble:
      return static_cast<acc_t>(static_cast<const double*>(vector.data)[i]);
    default:
      return fallback;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_any_float(const AnyFloatBuffer& buffer, int64_t i,
                                                acc_t fallback) {
  return load_any_float<acc_t>(AnyFloatVector{buffer.data, buffer.kind}, i, fallback);
}

// Stores `value` rounded to the buffer's dtype, as a tensor's .to(dtype) rounds it (fp64 goes through
// fp32 on its way to half, on the CPU as here). Nothing is stored into an absent buffer.
template <typename acc_t>
__device__ __forceinline__ void store_any_float(const AnyFloatBuffer& buffer, int64_t i, acc_t value) {
  switch (buffer.kind) {
    case FloatKind::kHalf:
      static_cast<c10::Half*>(buffer.data)[i] = c10::Half(static_cast<float>(value));
      break;
    case FloatKind::kBFloat16:
      static_cast<c10::BFloat16*>(buffer.data)[i] = c10::BFloat16(static_cast<float>(value));
      break;
    case FloatKind::kFloat:
      static_cast<float*>(buffer.data)[i] = static_cast<float>(value);
      break;
    case FloatKind::kDouble:
      static_cast<double*>(buffer.data)[i] = static_cast<double>(value);
      break;
    default:
      break;
  }
}

__device__ __forceinline__ float reciprocal_sqrt(float value) { return rsqrtf(value); }
__device__ __forceinline__ double reciprocal_sqrt(double value) { return rsqrt(value); }

}  // namespace cmbn
