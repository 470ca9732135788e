#pragma once
// Plain structs shared by the host launchers and the CUDA kernels: how the work is split over blocks,
// what a launch does, and small per-channel vectors of any float dtype (the layouts are layout.h's).
#include <cstdint>

#include "layout.h"  // Layout, the walks the kernels are instantiated for

namespace cmbn {

constexpr int kBlockThreads = 256;  // every kernel runs 256 threads per block
constexpr int kUnroll = 4;          // 16-byte packs each thread has in flight per loop iteration
constexpr int kMaxSplits = 1024;    // blocks per channel group, at most (bounds the final merge)
// Single-read path: rounds of kUnroll packs (kPlanes) or rows (kRows) one thread holds in registers,
// x alone in the forward, x and grad_y in the backward (about 64 registers of values either way).
constexpr int kHeldRoundsForward = 4;
constexpr int kHeldRoundsBackward = 2;
// Blocks per SM the single-read kernels are compiled for (at most 128 registers a thread): their grid
// is bounded by what the GPU holds at once, so occupancy is capacity.
constexpr int kHeldBlocksPerSM = 2;

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
  int64_t inner;               // kPlanes*: values per plane; kRows: 1
  int64_t total;               // values in x (N * C * inner)
  int64_t inner_packs;         // kPlanes: packs per plane (inner / VEC); kPlanesMasked: pack slots per
                               // plane (the most any alignment of a plane takes); kRows: unused
  int64_t values_per_channel;  // m
  int64_t channel_groups;      // gridDim.x: kPlanes one channel per group, kRows one tile of channels
  int64_t step_outer;          // kPlanes: one thread's stride (splits * kBlockThreads packs) as
  int64_t step_inner;          //          whole planes plus packs, so the walk needs no division
  int64_t last_row_steps;      // kRows: (outer - 1) / (splits * rows_per_block) and its remainder,
  int64_t last_row_remainder;  //        so a reversed walk finds a thread's last row without one
  int splits;                  // gridDim.y: blocks that share one channel group
  int lanes;                   // kRows: blockDim.x, threads across channels; kPlanes: kBlockThreads
  int rows_per_block;          // kRows: blockDim.y; kPlanes: 1
  int tile_width;              // channels one block covers: kRows lanes * VEC, kPlanes 1
};

// Which kernels a fused op (cmbn_forward, cmbn_backward) runs:
//   kTwoPass:    reduce x, then read it again to normalize (one fused launch, or a partial and an
//                apply launch);
//   kSingleRead: each thread holds its share of x (and grad_y) in registers from the reduction to the
//                output, so x is read once; the blocks of a channel group meet at a grid barrier
//                (cooperative launch) when there are several.
//   kAuto:       CMBN_KERNEL_PATH unset: the single-read path wherever it fits.
enum class KernelPath : int { kAuto, kTwoPass, kSingleRead };

// How the single-read kernel is launched (its phase): kBlock one block per channel group, a plain
// launch; kGrid several blocks per channel group, a cooperative launch with a grid barrier between
// the partial reductions and their merge.
enum class Residency : int { kBlock, kGrid };

// What a fused op launches for one input (host_utils.h plan_launch; cmbn_kernel_plan reports it).
struct LaunchPlan {
  Geometry geo;
  KernelPath path;          // kTwoPass or kSingleRead
  bool cooperative;         // kSingleRead with several blocks per channel group
  Layout layout;
  int vec;                  // values per pack
  int64_t resident_blocks;  // blocks the GPU holds at once (the grid's upper bound)
};

// A per-channel vector (weight, bias, history) in whatever float dtype the caller keeps it; read once
// per channel, so a runtime switch is cheaper than converting it with an extra launch.
enum class FloatKind : int { kAbsent, kHalf, kBFloat16, kFloat, kDouble };

struct AnyFloatVector {
  const void* data;
  FloatKind kind;
};

// The activation a fused op applies after the normalization (activation.h's code) and its parameter,
// as the kernels take it: a run-time value they test with a uniform branch per pack (the identity
// runs the code it ran before activations existed), never a template parameter, so the number of
// instantiations does not grow with the activations.
template <typename acc_t>
struct ActivationParams {
  int code;  // 32 bits: one register less to keep live across the division slow paths
  acc_t param;
};

// The same for a vector the kernel writes (the layer's buffers).
struct AnyFloatBuffer {
  void* data;
  FloatKind kind;
};

}  // namespace cmbn
