#pragma once
// Which packs of x a thread visits, for each layout. The walkers hand out kUnroll packs at a time
// (several loads in flight) and cover every value exactly once over the grid (channel_groups, splits):
// a thread starts at its own index and strides by the number of threads sharing its channel(s).
// Reversed, a thread takes the same packs from its last to its first: a second pass over x then
// starts with what the first pass read last, which the L2 cache is the likeliest to still hold.
#include <cstdint>

#include "device_utils.cuh"
#include "kernel_types.h"

namespace cmbn {

template <Layout L, int VEC>
struct Walker;

// A thread's (plane, pack in plane) positions over the planes of one channel: it takes packs
// split * kBlockThreads + threadIdx.x, then every splits * kBlockThreads packs, advanced by a
// precomputed (step_outer, step_inner) so the loop has no 64-bit division.
struct PlaneCursor {
  int64_t plane;
  int64_t pack;
  int64_t planes;
  int64_t inner_packs;
  int64_t step_outer;
  int64_t step_inner;
  int64_t first_plane;  // where the thread's first pack lies (the end of a reversed walk)
  int64_t first_pack;
  bool reverse;

  __device__ PlaneCursor(const Geometry& geo, int split, bool reversed)
      : planes(geo.outer),
        inner_packs(geo.inner_packs),
        step_outer(geo.step_outer),
        step_inner(geo.step_inner),
        reverse(reversed) {
    const int64_t first = static_cast<int64_t>(split) * kBlockThreads + threadIdx.x;
    const int64_t total = planes * inner_packs;
    if (first >= total) {
      plane = first_plane = planes;  // nothing to visit
      pack = first_pack = 0;
      return;
    }
    first_plane = first / inner_packs;
    first_pack = first - first_plane * inner_packs;
    int64_t start = first;
    if (reversed) {
      const int64_t stride = static_cast<int64_t>(geo.splits) * kBlockThreads;
      start = first + (total - 1 - first) / stride * stride;  // the thread's last pack
    }
    plane = start / inner_packs;
    pack = start - plane * inner_packs;
  }

  __device__ __forceinline__ bool done() const { return plane >= planes; }

  __device__ __forceinline__ void advance() {
    if (!reverse) {
      pack += step_inner;
      plane += step_outer;
      if (pack >= inner_packs) {
        pack -= inner_packs;
        ++plane;
      }
    } else if (plane == first_plane && pack == first_pack) {
      plane = planes;  // the thread's first pack was the last to hand out
    } else {
      pack -= step_inner;
      plane -= step_outer;
      if (pack < 0) {
        pack += inner_packs;
        --plane;
      }
    }
  }
};

// kPlanes: one channel per block; a pack never crosses a plane (VEC > 1 only when inner % VEC == 0).
template <int VEC>
struct Walker<Layout::kPlanes, VEC> {
  PlaneCursor cursor;
  int64_t channel_offset;  // channel * inner_packs
  int64_t plane_stride;    // C * inner_packs

  __device__ Walker(const Geometry& geo, int64_t group, int split, bool reversed = false)
      : cursor(geo, split, reversed),
        channel_offset(group * geo.inner_packs),
        plane_stride(geo.channels * geo.inner_packs) {}

  // Element offsets of the next kUnroll packs; false when this thread has none left. The first
  // pack handed out is always valid.
  __device__ __forceinline__ bool next(int64_t (&offset)[kUnroll], bool (&valid)[kUnroll]) {
    if (cursor.done()) return false;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      valid[u] = !cursor.done();
      offset[u] = (cursor.plane * plane_stride + channel_offset + cursor.pack) * VEC;
      if (valid[u]) cursor.advance();
    }
    return true;
  }

  // Which values of pack u belong to the thread's channel: all of them.
  __device__ __forceinline__ uint32_t kept(int) const { return (1u << VEC) - 1; }
};

// kPlanesMasked: planes whose size is not a multiple of the pack. A plane is covered by the aligned
// 16-byte packs that overlap it, `inner_packs` slots per plane (the most any alignment needs); value
// v of a pack belongs to the plane when bit v of kept() is set. A plane's first and last packs may
// hold a neighbouring plane's values: they are read (x is dense, so the memory exists) but never
// written. A slot past the plane's last pack keeps nothing and is not valid.
template <int VEC>
struct Walker<Layout::kPlanesMasked, VEC> {
  PlaneCursor cursor;
  int64_t channel_start;  // channel * inner: where the channel's plane starts in sample 0
  int64_t plane_stride;   // C * inner
  int64_t inner;
  uint32_t keep[kUnroll];

  __device__ Walker(const Geometry& geo, int64_t group, int split, bool reversed = false)
      : cursor(geo, split, reversed),
        channel_start(group * geo.inner),
        plane_stride(geo.channels * geo.inner),
        inner(geo.inner) {}

  // Element offsets (pack-aligned) of the next kUnroll packs; false when this thread has none left.
  // A pack handed out may keep nothing (valid false), the first one included.
  __device__ __forceinline__ bool next(int64_t (&offset)[kUnroll], bool (&valid)[kUnroll]) {
    if (cursor.done()) return false;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      keep[u] = 0;
      offset[u] = 0;
      if (!cursor.done()) {
        const int64_t start = cursor.plane * plane_stride + channel_start;  // the plane's first value
        const int64_t pack_start = (start / VEC + cursor.pack) * VEC;
        const int64_t lo = start - pack_start;          // values before it belong to another plane
        const int64_t hi = start + inner - pack_start;  // and from here on
#pragma unroll
        for (int v = 0; v < VEC; ++v) keep[u] |= (v >= lo && v < hi) ? 1u << v : 0u;
        offset[u] = pack_start;
        cursor.advance();
      }
      valid[u] = keep[u] != 0;
    }
    return true;
  }

  __device__ __forceinline__ uint32_t kept(int u) const { return keep[u]; }
};

// kRows: a block is lanes x rows_per_block threads over a tile of lanes * VEC channels; a thread
// holds VEC consecutive channels (one pack per row) and takes rows split * rows_per_block +
// threadIdx.y, then every splits * rows_per_block rows. Lanes past the last channel visit nothing.
template <int VEC>
struct Walker<Layout::kRows, VEC> {
  int64_t row;
  int64_t rows;
  int64_t stride;
  int64_t channels;
  int64_t first_channel;
  bool active;
  bool reverse;

  __device__ Walker(const Geometry& geo, int64_t group, int split, bool reversed = false)
      : row(static_cast<int64_t>(split) * geo.rows_per_block + threadIdx.y),
        rows(geo.outer),
        stride(static_cast<int64_t>(geo.splits) * geo.rows_per_block),
        channels(geo.channels),
        first_channel(group * geo.tile_width + static_cast<int64_t>(threadIdx.x) * VEC),
        active(first_channel < geo.channels),
        reverse(reversed) {
    // The thread's last row. Its first lies within the first stride, so the last is last_row_steps
    // strides on, or one fewer past the remainder: no 64-bit division (a call) in the kernel.
    if (reversed && row < rows) {
      row += (row <= geo.last_row_remainder ? geo.last_row_steps : geo.last_row_steps - 1) * stride;
    }
  }

  __device__ __forceinline__ bool next(int64_t (&offset)[kUnroll], bool (&valid)[kUnroll]) {
    // The thread's rows are its first (below stride) plus whole strides: a reversed walk is past its
    // first row once below zero, so the first row need not be kept (a register less in every loop).
    if (!active || row >= rows || row < 0) return false;
    // One step added per pack: no multiples of it to keep live across the loop.
    const int64_t step = reverse ? -stride : stride;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      valid[u] = row < rows && row >= 0;
      offset[u] = row * channels + first_channel;
      row += step;
    }
    return true;
  }

  __device__ __forceinline__ uint32_t kept(int) const { return (1u << VEC) - 1; }
};

// The pack at `offset` of a walk over `data`: a 16-byte load, except a masked pack that would reach
// past the tensor's last value (`total`), whose kept values are loaded one by one.
template <Layout L, int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_walked(const T* data, int64_t offset, uint32_t keep,
                                                    int64_t total) {
  if constexpr (L == Layout::kPlanesMasked) {
    if (offset + VEC > total) {
      Pack<T, VEC> pack;
#pragma unroll
      for (int v = 0; v < VEC; ++v) pack.v[v] = (keep >> v & 1u) ? data[offset + v] : T(0);
      return pack;
    }
  }
  return load_pack<T, VEC>(data + offset);
}

// Stores the kept values of a pack: one 16-byte store when it keeps them all, else value by value
// (the others belong to a plane another block writes).
template <Layout L, int VEC, typename T>
__device__ __forceinline__ void store_walked(T* data, int64_t offset, uint32_t keep,
                                             const Pack<T, VEC>& pack) {
  if constexpr (L == Layout::kPlanesMasked) {
    if (keep != (1u << VEC) - 1) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        if (keep >> v & 1u) data[offset + v] = pack.v[v];
      }
      return;
    }
  }
  store_pack<T, VEC>(data + offset, pack);
}

// Thread index inside the block, for both block shapes.
__device__ __forceinline__ int block_thread() {
  return static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
}

}  // namespace cmbn
