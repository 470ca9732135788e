#pragma once
// How the values of an (N, C, *) tensor lie in memory, as both kernel families (cpu/, cuda/) walk
// them. Plain types: the CUDA kernels take them as template and kernel arguments (work_tensors.h
// finds a tensor's layout).
#include <cstdint>

namespace cmbn {

// The two layouts the kernels read without a copy, and how they walk them.
//   kPlanes:       contiguous (N, C, *) with a spatial size > 1: channel c of sample n is one
//                  contiguous plane of `inner` values at ((n * C + c) * inner).
//   kRows:         channels innermost: channels_last, channels_last_3d, (N, C) and any (N, C, 1...)
//                  input; value (row r, channel c) at (r * C + c), rows = N * prod(spatial).
//   kPlanesMasked: a walk of kPlanes, never a tensor's layout: the CUDA kernels read the planes in
//                  aligned 16-byte packs although `inner` is not a multiple of the pack (7 x 7
//                  planes), masking off the values of a pack outside the plane.
enum class Layout : int { kPlanes, kRows, kPlanesMasked };

struct LayoutInfo {
  Layout layout;
  int64_t outer;     // kPlanes: N; kRows: rows
  int64_t channels;  // C
  int64_t inner;     // kPlanes: values per plane; kRows: 1
  int64_t values_per_channel() const { return outer * inner; }
};

}  // namespace cmbn
