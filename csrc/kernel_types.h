#pragma once
// Plain structs shared by the host launchers and the CUDA kernels: how a tensor is laid out, how the
// work is split over blocks, and small per-channel vectors of any float dtype.
#include <cstdint>

namespace cmbn {

constexpr int kBlockThreads = 256;  // every kernel runs 256 threads per block
constexpr int kUnroll = 4;          // 16-byte packs each thread has in flight per loop iteration
constexpr int kMaxSplits = 1024;    // blocks per channel group, at most (bounds the final merge)

// The two layouts the kernels read without a copy.
//   kPlanes: contiguous (N, C, *) with a spatial size > 1: channel c of sample n is one contiguous
//            plane of `inner` values at ((n * C + c) * inner).
//   kRows:   channels innermost: channels_last, channels_last_3d, (N, C) and any (N, C, 1...) input;
//            value (row r, channel c) at (r * C + c), rows = N * prod(spatial).
enum class Layout : int { kPlanes, kRows };

// What one launch of a kernel does (one kernel template serves all four).
//   kFused:   a block owns whole channels: reduce, finalize and write the output in one launch.
//   kPartial: a block reduces its share of a channel group into the workspace.
//   kApply:   a block merges the workspace in a fixed order, finalizes and writes its share.
//   kGiven:   the caller gives the per-channel statistics (the phase ops, whose statistics were merged
//             across processes in between): no reduction, finalize and write the output.
// A launch with no elementwise output (cmbn_batch_stats, cmbn_backward_sums) stops after finalizing.
enum class Phase : int { kFused, kPartial, kApply, kGiven };

// How the values of each channel are spread over the grid: gridDim = (channel_groups, splits).
struct Geometry {
  int64_t channels;            // C
  int64_t outer;               // kPlanes: N; kRows: rows
  int64_t inner_packs;         // kPlanes: packs per plane (inner / VEC); kRows: unused
  int64_t values_per_channel;  // m
  int64_t channel_groups;      // gridDim.x: kPlanes one channel per group, kRows one tile of channels
  int64_t step_outer;          // kPlanes: one thread's stride (splits * kBlockThreads packs) as
  int64_t step_inner;          //          whole planes plus packs, so the walk needs no division
  int splits;                  // gridDim.y: blocks that share one channel group
  int lanes;                   // kRows: blockDim.x, threads across channels; kPlanes: kBlockThreads
  int rows_per_block;          // kRows: blockDim.y; kPlanes: 1
  int tile_width;              // channels one block covers: kRows lanes * VEC, kPlanes 1
};

// A per-channel vector (weight, bias, history) in whatever float dtype the caller keeps it; read once
// per channel, so a runtime switch is cheaper than converting it with an extra launch.
enum class FloatKind : int { kAbsent, kHalf, kBFloat16, kFloat, kDouble };

struct AnyFloatVector {
  const void* data;
  FloatKind kind;
};

// The same for a vector the kernel writes (the layer's buffers).
struct AnyFloatBuffer {
  void* data;
  FloatKind kind;
};

}  // namespace cmbn
