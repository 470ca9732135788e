#pragma once
// Device building blocks shared by the forward and backward kernels: Welford/Chan summaries,
// fixed-order shared-memory tree reductions, 16-byte packs and per-channel loads of any float dtype.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "kernel_types.h"

namespace cmbn {

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

// VEC consecutive values moved as one 16-byte (or narrower) memory transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* address) {
  return *reinterpret_cast<const Pack<T, VEC>*>(address);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* address, const Pack<T, VEC>& pack) {
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
