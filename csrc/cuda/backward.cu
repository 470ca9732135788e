// The CmBN backward family (SPEC section 4, reference.backward), a two-pass kernel for all three ops
// and a single-read one for the first:
//   cmbn_backward:      the per-channel sums sum(dy) and sum(dy * (x - batch_mean)), then
//                       dx = coef_dy * dy + coef_xc * (x - batch_mean) + const for either gradient,
//                       grad_weight and grad_bias, through the activation (dy * act'(z) in place of
//                       dy; from the output, the normalized input in place of x - batch_mean):
//                       on the single-read path in one launch that holds x
//                       and dy in registers (cooperative when a channel spans several blocks); on the
//                       two-pass path in one launch in the small regime, two otherwise (partial sums
//                       into a workspace, then a pass that adds them in a fixed order and writes dx);
//   cmbn_backward_sums: the same reduction, stopping at the two sums;
//   cmbn_backward_dx:   dx alone, from sums the caller gives (all-reduced across processes).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>

#include "activation.h"
#include "cmbn_cuda.h"
#include "device_utils.cuh"
#include "host_utils.h"
#include "kernel_types.h"
#include "walkers.cuh"

namespace cmbn {
namespace {

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* grad_y;  // in x's layout
  const scalar_t* x;      // the layer's input, or its output (from_output)
  scalar_t* grad_x;
  bool write_grad_x;      // false: the sums only (cmbn_backward_sums), grad_x unused
  AnyFloatVector weight;  // absent when affine=False
  AnyFloatVector bias;    // read only through an activation (absent: zero)
  // The forward's activation, and whether x is its output (memory="lean"); identity and false in the
  // phase ops. Through an activation the two sums weigh g = dy * act'(z) instead of dy, and from the
  // output they are sum(g) and sum(g * xhat) (xhat: the normalized input) instead of
  // sum(g * (x - batch_mean)).
  ActivationParams<acc_t> activation;
  bool from_output;
  const acc_t* mean;      // (C,) statistics saved by the forward
  const acc_t* var;
  const acc_t* batch_mean;
  const acc_t* batch_var;
  const acc_t* current_weight;
  acc_t eps;
  bool exact;
  const int64_t* count;         // kGiven: values per channel of the whole group (device scalar)
  const acc_t* given_sum_dy;     // kGiven: the group's two sums, (C,)
  const acc_t* given_sum_dy_xc;
  acc_t* grad_weight;  // outputs, (C,); null for cmbn_backward_sums and cmbn_backward_dx
  acc_t* grad_bias;
  acc_t* sum_dy;       // outputs of cmbn_backward_sums, (C,)
  acc_t* sum_dy_xc;
  acc_t* partial_sum_dy;  // workspace, (C, splits), only when splits > 1
  acc_t* partial_sum_dy_xc;
  Geometry geo;
};

template <typename acc_t>
struct GradCoefficients {
  acc_t coef_dy, coef_xc, constant;
};

// reference.backward for channel c once its two sums over m values per channel are known; the split-0
// block writes the parameter gradients. dx = coef_dy * g + coef_xc * c + constant, c being
// x - batch_mean, or xhat from the output.
template <typename scalar_t, typename acc_t>
__device__ GradCoefficients<acc_t> grad_coefficients(const BackwardArgs<scalar_t, acc_t>& args,
                                                     int64_t c, const GradSums<acc_t>& sums,
                                                     int64_t values, bool write_parameter_grads) {
  const acc_t m = static_cast<acc_t>(values);
  const acc_t invstd = reciprocal_sqrt(args.var[c] + args.eps);
  const acc_t w = load_any_float<acc_t>(args.weight, c, acc_t(1));
  // Pooled xhat = (x - mean) * invstd = ((x - batch_mean) + shift) * invstd.
  const acc_t shift = args.batch_mean[c] - args.mean[c];
  // sum(dy * xhat): from the output, the second sum itself.
  const acc_t grad_weight = args.from_output ? sums.dy_xc : invstd * (sums.dy_xc + shift * sums.dy);
  if (write_parameter_grads) {
    args.grad_weight[c] = grad_weight;
    args.grad_bias[c] = sums.dy;
  }
  GradCoefficients<acc_t> k;
  k.coef_dy = invstd * w;
  if (args.exact) {
    // dx = invstd * (g - (b/m) sum(g) - xhat (b/m) sum(g * xhat))
    const acc_t b_over_m = args.current_weight[c] / m;
    if (args.from_output) {  // coef_xc weighs xhat
      k.coef_xc = -k.coef_dy * b_over_m * grad_weight;
      k.constant = -k.coef_dy * b_over_m * sums.dy;
    } else {
      k.coef_xc = -k.coef_dy * invstd * b_over_m * grad_weight;
      k.constant = -k.coef_dy * b_over_m * sums.dy + k.coef_xc * shift;
    }
  } else {
    // dx = invstd * (g - sum(g)/m - xhat_b sum(g * xhat_b)/m), xhat_b = (x - batch_mean) * invstd_b
    const acc_t invstd_b_sq = acc_t(1) / (args.batch_var[c] + args.eps);
    k.constant = -k.coef_dy * sums.dy / m;
    if (args.from_output) {
      // x - batch_mean = xhat * sd - shift (sd = sqrt(var + eps)): its sum with g, and coef_xc
      // carried over to xhat.
      const acc_t sd = sqrt(args.var[c] + args.eps);
      const acc_t coef_xc = -k.coef_dy * invstd_b_sq * (sd * sums.dy_xc - shift * sums.dy) / m;
      k.coef_xc = coef_xc * sd;
      k.constant -= coef_xc * shift;
    } else {
      k.coef_xc = -k.coef_dy * invstd_b_sq * sums.dy_xc / m;
    }
  }
  return k;
}

// One value seen through the activation: g = dy * act'(z), and c, the value the second sum weighs g by:
//   standard:    z = (x - mean) * scale + bias, the bits the forward computed; c = x - batch_mean;
//   from_output: x is the output act(z): z = act^-1(x); c = xhat = (z - bias) / lean_weight(weight).
// Each channel's (shift, scale, offset) = (mean, invstd * weight, bias), or (-, 1 / lean_weight(weight),
// bias) from the output, lie in the block's shared memory and are read per value through volatile
// pointers: the single-read kernels have no registers left to hold them for every channel of a thread
// (a shared-memory read costs the memory-bound loop nothing).
template <typename acc_t>
struct ActivationTerms {
  const volatile acc_t* shift;
  const volatile acc_t* scale;
  const volatile acc_t* offset;
  ActivationParams<acc_t> activation;
  bool from_output;

  __device__ __forceinline__ void operator()(acc_t x, acc_t dy, acc_t batch_mean, int index, acc_t& g,
                                             acc_t& c) const {
    if (from_output) {
      const acc_t z = invert_activation(x, activation.code, activation.param);
      g = dy * activation_derivative_from_output(x, activation.code, activation.param);
      c = (z - offset[index]) * scale[index];
    } else {
      const acc_t z = multiply_add(x - shift[index], scale[index], offset[index]);
      g = dy * activation_derivative(z, activation.code, activation.param);
      c = x - batch_mean;
    }
  }
};

// The block-level steps of a backward launch, shared by the two-pass and the single-read kernels (see
// ForwardBlock).
template <typename scalar_t, typename acc_t, Layout L, int VEC>
struct BackwardBlock {
  static constexpr bool kRowLayout = L == Layout::kRows;
  static constexpr int kAccs = kRowLayout ? VEC : 1;  // channels one thread accumulates
  static constexpr int kEntries = kRowLayout ? kBlockThreads * VEC : kBlockThreads;
  static constexpr int kMaxTile = kRowLayout ? 32 * VEC : 1;

  // The block's shared memory: per-thread sums at [part * tile_width + channel in tile], then each
  // channel's dx coefficients for the elementwise step, and its activation terms (ActivationTerms).
  struct Shared {
    GradSums<acc_t> entries[kEntries];
    acc_t tile_coef_dy[kMaxTile];
    acc_t tile_coef_xc[kMaxTile];
    acc_t tile_constant[kMaxTile];
    acc_t act_shift[kMaxTile];
    acc_t act_scale[kMaxTile];
    acc_t act_offset[kMaxTile];
  };

  const BackwardArgs<scalar_t, acc_t>& args;
  Shared& shared;
  GradSums<acc_t>* entries;
  int thread;
  int width;
  int64_t group;  // blockIdx.x: the channel group
  int split;      // blockIdx.y: the block's share of it
  int64_t first_channel;
  bool plain;               // no activation, and x is the input: dy and x - batch_mean as they are
  acc_t batch_mean[kAccs];  // of the thread's channel(s), subtracted from x

  __device__ BackwardBlock(const BackwardArgs<scalar_t, acc_t>& args_, Shared& shared_)
      : args(args_),
        shared(shared_),
        entries(shared_.entries),
        thread(block_thread()),
        width(args_.geo.tile_width),
        group(blockIdx.x),
        split(static_cast<int>(blockIdx.y)),
        first_channel(group * width),
        plain(args_.activation.code == kIdentity && !args_.from_output) {
#pragma unroll
    for (int a = 0; a < kAccs; ++a) {
      const int64_t c = first_channel + (kRowLayout ? threadIdx.x * VEC + a : 0);
      batch_mean[a] = c < args.geo.channels ? args.batch_mean[c] : acc_t(0);
    }
  }

  __device__ static GradSums<acc_t> add(const GradSums<acc_t>& a, const GradSums<acc_t>& b) {
    return grad_sums_add(a, b);
  }

  // Where channel a of the thread has its entry in the tile arrays.
  __device__ __forceinline__ static int tile_index(int a) {
    return kRowLayout ? static_cast<int>(threadIdx.x) * VEC + a : 0;
  }

  __device__ __forceinline__ ActivationTerms<acc_t> terms() const {
    return ActivationTerms<acc_t>{shared.act_shift, shared.act_scale, shared.act_offset, args.activation,
                                  args.from_output};
  }

  // Each channel's activation terms into shared memory before any value is read: a uniform branch
  // (the whole grid takes it or none), nothing at all without an activation.
  __device__ void prepare_activation() {
    if (plain) return;
    const int64_t c = first_channel + thread;
    if (thread < width && c < args.geo.channels) {
      const acc_t w = load_any_float<acc_t>(args.weight, c, acc_t(1));
      shared.act_offset[thread] = load_any_float<acc_t>(args.bias, c, acc_t(0));
      if (args.from_output) {
        shared.act_shift[thread] = acc_t(0);
        shared.act_scale[thread] = acc_t(1) / lean_weight(w);
      } else {  // the forward's scale: the same bits of z
        shared.act_shift[thread] = args.mean[c];
        shared.act_scale[thread] = reciprocal_sqrt(args.var[c] + args.eps) * w;
      }
    }
    __syncthreads();
  }

  // Adds one round of packs (the values `keep` keeps, where the layout masks them) to the sums.
  __device__ __forceinline__ void accumulate(GradSums<acc_t> (&sums)[kAccs],
                                             const Pack<scalar_t, VEC> (&x)[kUnroll],
                                             const Pack<scalar_t, VEC> (&dy)[kUnroll],
                                             const bool (&valid)[kUnroll],
                                             const uint32_t (&keep)[kUnroll]) const {
    const ActivationTerms<acc_t> through = terms();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!valid[u]) continue;
      if (plain) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          if (L == Layout::kPlanesMasked && !(keep[u] >> v & 1u)) continue;
          const int a = kAccs == 1 ? 0 : v;
          const acc_t g = to_acc<acc_t>(dy[u].v[v]);
          sums[a].dy += g;
          sums[a].dy_xc = multiply_add(g, to_acc<acc_t>(x[u].v[v]) - batch_mean[a], sums[a].dy_xc);
        }
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          if (L == Layout::kPlanesMasked && !(keep[u] >> v & 1u)) continue;
          const int a = kAccs == 1 ? 0 : v;
          acc_t g;
          acc_t c;
          through(to_acc<acc_t>(x[u].v[v]), to_acc<acc_t>(dy[u].v[v]), batch_mean[a], tile_index(a), g, c);
          sums[a].dy += g;
          sums[a].dy_xc = multiply_add(g, c, sums[a].dy_xc);
        }
      }
    }
  }

  // The thread's sums into `entries`, then the block's fixed tree.
  __device__ void reduce(const GradSums<acc_t> (&sums)[kAccs]) {
#pragma unroll
    for (int a = 0; a < kAccs; ++a) {
      const int entry = kRowLayout ? threadIdx.y * width + threadIdx.x * VEC + a : thread;
      entries[entry] = sums[a];
    }
    tree_reduce(entries, kRowLayout ? args.geo.rows_per_block : kBlockThreads, width, thread, add);
  }

  __device__ void write_partial() {
    const int64_t c = first_channel + thread;
    if (thread < width && c < args.geo.channels) {
      const int64_t slot = c * args.geo.splits + split;
      args.partial_sum_dy[slot] = entries[thread].dy;
      args.partial_sum_dy_xc[slot] = entries[thread].dy_xc;
    }
  }

  // Adds the splits' partial sums in a fixed order (see ForwardBlock::merge_partials).
  __device__ void merge_partials() {
    const int parts = kBlockThreads / width;
    const int channel_in_tile = thread % width;
    const int part = thread / width;
    const int64_t c = first_channel + channel_in_tile;
    GradSums<acc_t> sums{acc_t(0), acc_t(0)};
    if (c < args.geo.channels) {
      for (int s = part; s < args.geo.splits; s += parts) {
        const int64_t slot = c * args.geo.splits + s;
        sums = grad_sums_add(sums, GradSums<acc_t>{args.partial_sum_dy[slot], args.partial_sum_dy_xc[slot]});
      }
    }
    entries[thread] = sums;  // == part * width + channel_in_tile
    tree_reduce(entries, parts, width, thread, add);
  }

  // One thread per channel of the tile: the sums (reduced, or given), then the split-0 block writes the
  // per-channel outputs; with dx, each channel's coefficients go to the tile arrays.
  __device__ void finalize(bool given) {
    if (thread >= width) return;
    const int64_t c = first_channel + thread;
    if (c >= args.geo.channels) return;
    const GradSums<acc_t> sums =
        given ? GradSums<acc_t>{args.given_sum_dy[c], args.given_sum_dy_xc[c]} : entries[thread];
    if (!args.write_grad_x) {
      if (split == 0) {
        args.sum_dy[c] = sums.dy;
        args.sum_dy_xc[c] = sums.dy_xc;
      }
      return;
    }
    const int64_t values = given ? *args.count : args.geo.values_per_channel;
    const GradCoefficients<acc_t> k =
        grad_coefficients(args, c, sums, values, split == 0 && args.grad_weight != nullptr);
    shared.tile_coef_dy[thread] = k.coef_dy;
    shared.tile_coef_xc[thread] = k.coef_xc;
    shared.tile_constant[thread] = k.constant;
  }
};

// dx = coef_dy * dy + (coef_xc * (x - batch_mean) + constant) for each channel of the thread: one pack;
// through an activation g and c (ActivationTerms) in place of dy and x - batch_mean, a uniform branch
// per pack.
template <typename scalar_t, typename acc_t, int VEC, bool ROWS, int ACCS = ROWS ? VEC : 1>
struct GradInput {
  acc_t coef_dy[ACCS];
  acc_t coef_xc[ACCS];
  acc_t constant[ACCS];
  acc_t batch_mean[ACCS];
  bool plain;
  ActivationTerms<acc_t> through;

  // The thread's channels' coefficients from the tile arrays (after finalize and a barrier).
  template <typename Block>
  __device__ explicit GradInput(const Block& block) : plain(block.plain), through(block.terms()) {
#pragma unroll
    for (int a = 0; a < ACCS; ++a) {
      const int index = ROWS ? threadIdx.x * VEC + a : 0;  // kRows: the thread's channels
      const bool exists = block.first_channel + index < block.args.geo.channels;
      coef_dy[a] = exists ? block.shared.tile_coef_dy[index] : acc_t(0);
      coef_xc[a] = exists ? block.shared.tile_coef_xc[index] : acc_t(0);
      constant[a] = exists ? block.shared.tile_constant[index] : acc_t(0);
      batch_mean[a] = block.batch_mean[a];
    }
  }

  __device__ __forceinline__ Pack<scalar_t, VEC> operator()(const Pack<scalar_t, VEC>& x,
                                                            const Pack<scalar_t, VEC>& dy) const {
    Pack<scalar_t, VEC> out;
    if (plain) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int a = ACCS == 1 ? 0 : v;
        const acc_t centered = to_acc<acc_t>(x.v[v]) - batch_mean[a];
        out.v[v] = static_cast<scalar_t>(multiply_add(
            coef_dy[a], to_acc<acc_t>(dy.v[v]), multiply_add(coef_xc[a], centered, constant[a])));
      }
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int a = ACCS == 1 ? 0 : v;
        acc_t g;
        acc_t c;
        through(to_acc<acc_t>(x.v[v]), to_acc<acc_t>(dy.v[v]), batch_mean[a],
                ROWS ? static_cast<int>(threadIdx.x) * VEC + a : 0, g, c);
        out.v[v] = static_cast<scalar_t>(multiply_add(coef_dy[a], g, multiply_add(coef_xc[a], c, constant[a])));
      }
    }
    return out;
  }
};

// The two-pass kernel, one template for the four phases (see Phase), laid out like the forward's; the
// dx pass walks each thread's packs from last to first (see cmbn_forward_kernel).
template <typename scalar_t, typename acc_t, Layout L, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    cmbn_backward_kernel(const BackwardArgs<scalar_t, acc_t> args, const Phase phase) {
  using Block = BackwardBlock<scalar_t, acc_t, L, VEC>;
  __shared__ typename Block::Shared shared[1];
  Block block(args, shared[0]);
  const Geometry& geo = args.geo;
  const int64_t group = block.group;
  const int split = block.split;
  block.prepare_activation();
  int64_t offset[kUnroll];
  bool valid[kUnroll];

  if (phase == Phase::kFused || phase == Phase::kPartial) {
    GradSums<acc_t> sums[Block::kAccs];
#pragma unroll
    for (int a = 0; a < Block::kAccs; ++a) sums[a] = GradSums<acc_t>{acc_t(0), acc_t(0)};
    Walker<L, VEC> walker(geo, group, split);
    while (walker.next(offset, valid)) {
      Pack<scalar_t, VEC> x_pack[kUnroll];
      Pack<scalar_t, VEC> dy_pack[kUnroll];
      uint32_t keep[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        keep[u] = walker.kept(u);
        if (valid[u]) {
          x_pack[u] = load_walked<L, VEC>(args.x, offset[u], keep[u], geo.total);
          dy_pack[u] = load_walked<L, VEC>(args.grad_y, offset[u], keep[u], geo.total);
        }
      }
      block.accumulate(sums, x_pack, dy_pack, valid, keep);
    }
    block.reduce(sums);
    if (phase == Phase::kPartial) {
      block.write_partial();
      return;
    }
  } else if (phase == Phase::kApply) {
    block.merge_partials();
  }
  block.finalize(phase == Phase::kGiven);
  if (!args.write_grad_x) return;  // the sums only (the same for every thread of the grid)
  __syncthreads();

  // The walker first: its start (on planes, 64-bit divisions, calls) then has fewer values live.
  Walker<L, VEC> walker(geo, group, split, /*reversed=*/true);
  const GradInput<scalar_t, acc_t, VEC, Block::kRowLayout> grad_input(block);
  while (walker.next(offset, valid)) {
    Pack<scalar_t, VEC> x_pack[kUnroll];
    Pack<scalar_t, VEC> dy_pack[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (valid[u]) {
        x_pack[u] = load_walked<L, VEC>(args.x, offset[u], walker.kept(u), geo.total);
        dy_pack[u] = load_walked<L, VEC>(args.grad_y, offset[u], walker.kept(u), geo.total);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (valid[u]) {
        store_walked<L, VEC>(args.grad_x, offset[u], walker.kept(u), grad_input(x_pack[u], dy_pack[u]));
      }
    }
  }
}

// The single-read kernel (cmbn_backward only): each thread loads its share of x and grad_y once, into
// registers, reduces them as the two-pass kernel does and writes dx from the registers; kGrid meets
// at a grid barrier between the partial sums and their merge (see cmbn_forward_held_kernel).
template <typename scalar_t, typename acc_t, Layout L, int VEC>
__global__ void __launch_bounds__(kBlockThreads, kHeldBlocksPerSM)
    cmbn_backward_held_kernel(const BackwardArgs<scalar_t, acc_t> args, const Residency residency) {
  constexpr int kRounds = held_rounds<scalar_t, L>(kHeldRoundsBackward);
  using Block = BackwardBlock<scalar_t, acc_t, L, VEC>;
  __shared__ typename Block::Shared shared[1];
  Block block(args, shared[0]);
  const Geometry& geo = args.geo;
  const int64_t group = block.group;
  const int split = block.split;

  Pack<scalar_t, VEC> held_x[kRounds][kUnroll];
  Pack<scalar_t, VEC> held_dy[kRounds][kUnroll];
  bool valid[kRounds][kUnroll];
  uint32_t keep[kRounds][kUnroll];
  {
    Walker<L, VEC> walker(geo, group, split);
    int64_t offset[kUnroll];
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const bool more = walker.next(offset, valid[r]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        valid[r][u] = more && valid[r][u];
        keep[r][u] = more ? walker.kept(u) : 0u;
        if (valid[r][u]) {
          held_x[r][u] = load_walked<L, VEC>(args.x, offset[u], keep[r][u], geo.total);
          held_dy[r][u] = load_walked<L, VEC>(args.grad_y, offset[u], keep[r][u], geo.total);
        }
      }
    }
  }
  block.prepare_activation();  // while the loads are in flight
  GradSums<acc_t> sums[Block::kAccs];
#pragma unroll
  for (int a = 0; a < Block::kAccs; ++a) sums[a] = GradSums<acc_t>{acc_t(0), acc_t(0)};
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    block.accumulate(sums, held_x[r], held_dy[r], valid[r], keep[r]);
  }
  block.reduce(sums);
  if (residency == Residency::kGrid) {
    block.write_partial();
    cooperative_groups::this_grid().sync();
    block.merge_partials();
  }
  block.finalize(/*given=*/false);
  __syncthreads();

  const GradInput<scalar_t, acc_t, VEC, Block::kRowLayout> grad_input(block);
  // The store walks the same packs again: their offsets, validity and masks are rebuilt here rather
  // than kept live in registers across the reduction and the grid barrier.
  Walker<L, VEC> walker(geo, group, split);
  int64_t offset[kUnroll];
  bool valid_again[kUnroll];
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    if (!walker.next(offset, valid_again)) break;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (valid_again[u]) {
        store_walked<L, VEC>(args.grad_x, offset[u], walker.kept(u),
                             grad_input(held_x[r][u], held_dy[r][u]));
      }
    }
  }
}

template <typename scalar_t, typename acc_t, Layout L, int VEC>
LaunchPlan backward_plan(const LayoutInfo& info) {
  const int64_t resident = resident_blocks<&cmbn_backward_kernel<scalar_t, acc_t, L, VEC>,
                                           &cmbn_backward_held_kernel<scalar_t, acc_t, L, VEC>>();
  return plan_launch(info, VEC, sizeof(scalar_t), resident,
                     held_rounds<scalar_t, L>(kHeldRoundsBackward) * kUnroll);
}

// Launches the kernels over x and grad_y: `given` sums (kGiven) take one launch; with dx, the
// single-read kernel where the plan takes it; otherwise the sums are reduced in one fused launch or a
// partial launch into a workspace and an apply launch. Without dx (the sums only) only the split-0
// blocks of the apply launch have work.
template <typename scalar_t, typename acc_t, Layout L, int VEC>
void launch_backward(BackwardArgs<scalar_t, acc_t> args, const LayoutInfo& info, const at::Tensor& x,
                     bool given) {
  const LaunchPlan plan = backward_plan<scalar_t, acc_t, L, VEC>(info);
  args.geo = plan.geo;
  const Geometry& geo = args.geo;
  const dim3 grid = grid_shape(geo);
  const dim3 block = block_shape(geo, L);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (given) {
    cmbn_backward_kernel<scalar_t, acc_t, L, VEC><<<grid, block, 0, stream>>>(args, Phase::kGiven);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool single_read = plan.path == KernelPath::kSingleRead && args.write_grad_x;
  if (single_read && !plan.cooperative) {
    cmbn_backward_held_kernel<scalar_t, acc_t, L, VEC>
        <<<grid, block, 0, stream>>>(args, Residency::kBlock);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (!single_read && geo.splits == 1) {
    cmbn_backward_kernel<scalar_t, acc_t, L, VEC><<<grid, block, 0, stream>>>(args, Phase::kFused);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Workspace: two sums per channel and split, all written before any is read.
  const int64_t slots = geo.channels * geo.splits;
  const at::Tensor partial_sums =
      at::empty({2, slots}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  args.partial_sum_dy = partial_sums.data_ptr<acc_t>();
  args.partial_sum_dy_xc = args.partial_sum_dy + slots;
  if (single_read) {
    Residency residency = Residency::kGrid;
    void* kernel_args[] = {&args, &residency};
    const cudaError_t status = cudaLaunchCooperativeKernel(
        &cmbn_backward_held_kernel<scalar_t, acc_t, L, VEC>, grid, block, kernel_args, 0, stream);
    if (!cooperative_launch_refused(status, stream, "cmbn_backward", geo)) {
      C10_CUDA_CHECK(status);
      return;
    }
  }
  cmbn_backward_kernel<scalar_t, acc_t, L, VEC><<<grid, block, 0, stream>>>(args, Phase::kPartial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 apply_grid = args.write_grad_x ? grid : dim3(grid.x, 1);
  cmbn_backward_kernel<scalar_t, acc_t, L, VEC><<<apply_grid, block, 0, stream>>>(args, Phase::kApply);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, Layout L, int VEC>
struct BackwardLaunch {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  static void run(const LayoutInfo& info, const BackwardArgs<scalar_t, acc_t>& args, const at::Tensor& x,
                  bool given) {
    launch_backward<scalar_t, acc_t, L, VEC>(args, info, x, given);
  }
};

template <typename scalar_t, Layout L, int VEC>
struct BackwardPlan {
  static LaunchPlan run(const LayoutInfo& info) {
    return backward_plan<scalar_t, at::acc_type<scalar_t, /*is_cuda=*/true>, L, VEC>(info);
  }
};

// `grad_x` is undefined when nothing is written.
template <typename scalar_t, typename acc_t>
void dispatch_backward(const BackwardArgs<scalar_t, acc_t>& args, const LayoutInfo& info,
                       const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& grad_x,
                       bool given) {
  with_walk<BackwardLaunch, scalar_t>(walk_of<scalar_t>(info, {x, grad_y, grad_x}), args, x, given);
}

// A (C,) statistic saved by the forward (or a sum), in the statistics' dtype and contiguous (a no-op
// for the tensors the ops return).
at::Tensor saved_statistic(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x,
                           at::ScalarType dtype) {
  check_channel_vector(op, t, name, x);
  return as_dtype_contiguous(t, dtype);
}

// The statistics saved by the forward, for the dx pass.
struct SavedStatistics {
  at::Tensor mean, var, batch_mean, batch_var, b;
};

SavedStatistics saved_statistics(const char* op, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& var, const at::Tensor& batch_mean,
                                 const at::Tensor& batch_var, const at::Tensor& b) {
  const at::ScalarType dtype = stats_dtype(x.scalar_type());
  return SavedStatistics{saved_statistic(op, mean, "mean", x, dtype),
                         saved_statistic(op, var, "var", x, dtype),
                         saved_statistic(op, batch_mean, "batch_mean", x, dtype),
                         saved_statistic(op, batch_var, "batch_var", x, dtype),
                         saved_statistic(op, b, "b", x, dtype)};
}

template <typename scalar_t, typename acc_t>
void set_saved_args(BackwardArgs<scalar_t, acc_t>& args, const SavedStatistics& saved, double eps,
                    bool exact_grad) {
  args.mean = saved.mean.const_data_ptr<acc_t>();
  args.var = saved.var.const_data_ptr<acc_t>();
  args.batch_mean = saved.batch_mean.const_data_ptr<acc_t>();
  args.batch_var = saved.batch_var.const_data_ptr<acc_t>();
  args.current_weight = saved.b.const_data_ptr<acc_t>();
  args.eps = static_cast<acc_t>(eps);
  args.exact = exact_grad;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmbn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, const at::Tensor& b, double eps, bool exact_grad,
    const std::optional<at::Tensor>& bias, int64_t activation, double activation_param,
    bool from_output) {
  const char* op = "cmbn_backward";
  check_input(op, x, "x", c10::DeviceType::CUDA);
  check_grad_y(op, grad_y, x, /*dtype_of_x=*/true);
  check_optional_channel_vector(op, weight, "weight", x);
  check_optional_channel_vector(op, bias, "bias", x);
  check_activation(op, activation, activation_param, from_output);
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  const SavedStatistics saved = saved_statistics(op, x, mean, var, batch_mean, batch_var, b);

  const int64_t channels = x.size(1);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty({channels}, x.options().dtype(acc_dtype));
  at::Tensor grad_bias = at::empty({channels}, x.options().dtype(acc_dtype));
  if (channels > 0) {
    // x and grad_y are read in grad_x's layout (x's own when x is dense): a grad_y in another
    // memory format (or expanded, as from y.sum()) is copied into it first.
    const WorkTensors work = work_tensors(x, grad_x);
    const at::Tensor grad_y_work = with_layout_of(grad_y, work.out);
    const at::Tensor weight_c = contiguous_or_undefined(weight);
    const at::Tensor bias_c = contiguous_or_undefined(bias);

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
      BackwardArgs<scalar_t, acc_t> args{};
      args.grad_y = grad_y_work.const_data_ptr<scalar_t>();
      args.x = work.x.const_data_ptr<scalar_t>();
      args.grad_x = work.out.mutable_data_ptr<scalar_t>();
      args.write_grad_x = true;
      args.weight = any_float_vector(weight_c);
      args.bias = any_float_vector(bias_c);
      args.activation = activation_params<acc_t>(activation, activation_param);
      args.from_output = from_output;
      set_saved_args(args, saved, eps, exact_grad);
      args.grad_weight = grad_weight.mutable_data_ptr<acc_t>();
      args.grad_bias = grad_bias.mutable_data_ptr<acc_t>();
      dispatch_backward<scalar_t, acc_t>(args, work.info, work.x, grad_y_work, work.out,
                                         /*given=*/false);
    });
    if (!work.out.is_same(grad_x)) grad_x.copy_(work.out);
  }
  // The fake returns empty_like(mean): match its dtype when mean came in another float dtype.
  if (mean.scalar_type() != acc_dtype) {
    grad_weight = grad_weight.to(mean.scalar_type());
    grad_bias = grad_bias.to(mean.scalar_type());
  }
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> cmbn_backward_sums_cuda(const at::Tensor& grad_y,
                                                           const at::Tensor& x,
                                                           const at::Tensor& batch_mean) {
  const char* op = "cmbn_backward_sums";
  check_input(op, x, "x", c10::DeviceType::CUDA);
  check_grad_y(op, grad_y, x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  const at::Tensor batch_mean_c = saved_statistic(op, batch_mean, "batch_mean", x, acc_dtype);

  const int64_t channels = x.size(1);
  at::Tensor sum_dy = at::empty({channels}, x.options().dtype(acc_dtype));
  at::Tensor sum_dy_xc = at::empty({channels}, x.options().dtype(acc_dtype));
  if (channels == 0) return {sum_dy, sum_dy_xc};
  // An empty x still launches once (C > 0): its sums are zero, written by the kernel. grad_y is read
  // in x's dtype and layout, as the reference reads it.
  const ReadableTensor readable_x = readable(x);
  const at::Tensor& x_work = readable_x.x;
  const LayoutInfo& info = readable_x.info;
  const at::Tensor grad_y_work = with_layout_of(grad_y, x_work);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_backward_sums_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    BackwardArgs<scalar_t, acc_t> args{};
    args.grad_y = grad_y_work.const_data_ptr<scalar_t>();
    args.x = x_work.const_data_ptr<scalar_t>();
    args.write_grad_x = false;
    args.batch_mean = batch_mean_c.const_data_ptr<acc_t>();
    args.sum_dy = sum_dy.mutable_data_ptr<acc_t>();
    args.sum_dy_xc = sum_dy_xc.mutable_data_ptr<acc_t>();
    dispatch_backward<scalar_t, acc_t>(args, info, x_work, grad_y_work, at::Tensor(), /*given=*/false);
  });
  return {sum_dy, sum_dy_xc};
}

at::Tensor cmbn_backward_dx_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& var, const at::Tensor& batch_mean,
                                 const at::Tensor& batch_var, const at::Tensor& b,
                                 const at::Tensor& sum_dy, const at::Tensor& sum_dy_xc,
                                 const at::Tensor& count, double eps, bool exact_grad) {
  const char* op = "cmbn_backward_dx";
  check_input(op, x, "x", c10::DeviceType::CUDA);
  check_grad_y(op, grad_y, x);
  check_optional_channel_vector(op, weight, "weight", x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  const SavedStatistics saved = saved_statistics(op, x, mean, var, batch_mean, batch_var, b);
  const at::Tensor sum_dy_c = saved_statistic(op, sum_dy, "sum_dy", x, acc_dtype);
  const at::Tensor sum_dy_xc_c = saved_statistic(op, sum_dy_xc, "sum_dy_xc", x, acc_dtype);
  const at::Tensor count_d = device_count(op, count, x);

  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return grad_x;  // no values to write (and C == 0 has no grid)
  const WorkTensors work = work_tensors(x, grad_x);
  const at::Tensor grad_y_work = with_layout_of(grad_y, work.out);
  const at::Tensor weight_c = contiguous_or_undefined(weight);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_backward_dx_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    BackwardArgs<scalar_t, acc_t> args{};
    args.grad_y = grad_y_work.const_data_ptr<scalar_t>();
    args.x = work.x.const_data_ptr<scalar_t>();
    args.grad_x = work.out.mutable_data_ptr<scalar_t>();
    args.write_grad_x = true;
    args.weight = any_float_vector(weight_c);
    set_saved_args(args, saved, eps, exact_grad);
    args.count = count_d.const_data_ptr<int64_t>();
    args.given_sum_dy = sum_dy_c.const_data_ptr<acc_t>();
    args.given_sum_dy_xc = sum_dy_xc_c.const_data_ptr<acc_t>();
    dispatch_backward<scalar_t, acc_t>(args, work.info, work.x, grad_y_work, work.out, /*given=*/true);
  });
  if (!work.out.is_same(grad_x)) grad_x.copy_(work.out);
  return grad_x;
}

LaunchPlan cmbn_backward_plan(const at::Tensor& x) {
  check_input("cmbn_kernel_plan", x, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  // grad_x = empty_like(x): x's layout when the kernels read it, else both contiguous; grad_y is
  // brought to that layout (aligned, when copied).
  const ReadableTensor readable_x = readable(x);
  LaunchPlan plan{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_backward_plan", [&] {
    plan = with_walk<BackwardPlan, scalar_t>(walk_of<scalar_t>(readable_x.info, {readable_x.x}));
  });
  return plan;
}

}  // namespace cmbn
