#pragma once
// Which packs of x a thread visits, for each layout. Both walkers hand out kUnroll packs at a time
// (several loads in flight) and cover every value exactly once over the grid (channel_groups, splits):
// a thread starts at its own index and strides by the number of threads sharing its channel(s).
#include <cstdint>

#include "device_utils.cuh"
#include "kernel_types.h"

namespace cmbn {

template <Layout L, int VEC>
struct Walker;

// kPlanes: one channel per block; the threads of the `splits` blocks of that channel take packs
// split * kBlockThreads + threadIdx.x, then every splits * kBlockThreads packs. The pack index is
// kept as (plane, pack in plane) and advanced by a precomputed (step_outer, step_inner), so the loop
// has no 64-bit division. A pack never crosses a plane: VEC > 1 only when inner % VEC == 0.
template <int VEC>
struct Walker<Layout::kPlanes, VEC> {
  int64_t plane;
  int64_t pack;
  int64_t planes;
  int64_t inner_packs;
  int64_t step_outer;
  int64_t step_inner;
  int64_t channel_offset;  // channel * inner_packs
  int64_t plane_stride;    // C * inner_packs

  __device__ Walker(const Geometry& geo, int64_t group, int split)
      : planes(geo.outer),
        inner_packs(geo.inner_packs),
        step_outer(geo.step_outer),
        step_inner(geo.step_inner),
        channel_offset(group * geo.inner_packs),
        plane_stride(geo.channels * geo.inner_packs) {
    const int64_t first = static_cast<int64_t>(split) * kBlockThreads + threadIdx.x;
    if (inner_packs > 0) {
      plane = first / inner_packs;
      pack = first - plane * inner_packs;
    } else {
      plane = planes;  // nothing to visit
      pack = 0;
    }
  }

  // Element offsets of the next kUnroll packs; false when this thread has none left. The first
  // pack handed out is always valid.
  __device__ __forceinline__ bool next(int64_t (&offset)[kUnroll], bool (&valid)[kUnroll]) {
    if (plane >= planes) return false;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      valid[u] = plane < planes;
      offset[u] = (plane * plane_stride + channel_offset + pack) * VEC;
      pack += step_inner;
      plane += step_outer;
      if (pack >= inner_packs) {
        pack -= inner_packs;
        ++plane;
      }
    }
    return true;
  }
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

  __device__ Walker(const Geometry& geo, int64_t group, int split)
      : row(static_cast<int64_t>(split) * geo.rows_per_block + threadIdx.y),
        rows(geo.outer),
        stride(static_cast<int64_t>(geo.splits) * geo.rows_per_block),
        channels(geo.channels),
        first_channel(group * geo.tile_width + static_cast<int64_t>(threadIdx.x) * VEC),
        active(first_channel < geo.channels) {}

  __device__ __forceinline__ bool next(int64_t (&offset)[kUnroll], bool (&valid)[kUnroll]) {
    if (!active || row >= rows) return false;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t r = row + u * stride;
      valid[u] = r < rows;
      offset[u] = r * channels + first_channel;
    }
    row += kUnroll * stride;
    return true;
  }
};

// Thread index inside the block, for both block shapes.
__device__ __forceinline__ int block_thread() {
  return static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
}

}  // namespace cmbn
