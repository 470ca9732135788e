// The CmBN forward family, a two-pass kernel for all three ops and a single-read one for the first:
//   cmbn_forward:        per-channel Welford statistics of the micro-batch, the pooling with the history
//                        (SPEC section 2), the normalization and the activation (applied in the
//                        statistics' dtype before the store): on the single-read path in one launch
//                        that holds x in registers (cooperative, with a grid barrier, when a channel
//                        spans several blocks); on the two-pass path in one launch (small regime) or two
//                        (a partial reduction into a workspace, then a pass that merges it in a fixed
//                        order and normalizes);
//   cmbn_batch_stats:    the same reduction, stopping at the micro-batch's statistics;
//   cmbn_pooled_forward: the pooling and normalization alone, from statistics the caller gives (merged
//                        across processes in between).
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
struct ForwardArgs {
  const scalar_t* x;
  scalar_t* y;
  bool normalize;  // false: statistics only (cmbn_batch_stats), y unused
  ActivationParams<acc_t> activation;  // applied to y before the store (identity in the phase ops)
  AnyFloatVector weight;  // absent when affine=False
  AnyFloatVector bias;
  const int64_t* history_count;  // (S, C) contiguous
  AnyFloatVector history_mean;   // (S, C) contiguous, any float dtype
  AnyFloatVector history_var;
  int64_t history_slots;  // S
  acc_t eps;
  bool has_ema;
  double ema_momentum;
  const int64_t* count;          // kGiven: values per channel of the whole group (device scalar)
  const acc_t* given_batch_mean;  // kGiven: the group's micro-batch statistics, (C,)
  const acc_t* given_batch_var;
  acc_t* mean;  // outputs, (C,); statistics only writes batch_mean and batch_var alone, kGiven all
  acc_t* var;   // but those two (null)
  acc_t* batch_mean;
  acc_t* batch_var;
  acc_t* current_weight;
  int64_t* partial_count;  // workspace, (C, splits), only when splits > 1
  acc_t* partial_mean;
  acc_t* partial_m2;
  Geometry geo;
};

// reference.pool: `b` weighs the second set, 1 - b the first; the between-set terms keep it exact.
template <typename acc_t>
__device__ __forceinline__ void pool_pair(acc_t mean_a, acc_t var_a, acc_t mean_b, acc_t var_b,
                                          acc_t b, acc_t& mean, acc_t& var) {
  const acc_t a = acc_t(1) - b;
  mean = a * mean_a + b * mean_b;
  const acc_t delta_a = mean_a - mean;
  const acc_t delta_b = mean_b - mean;
  var = a * (var_a + delta_a * delta_a) + b * (var_b + delta_b * delta_b);
}

template <typename acc_t>
struct ChannelStatistics {
  acc_t mean, var, batch_mean, batch_var, b;
};

// SPEC section 2 for channel c, given the micro-batch's statistics over m values per channel: the
// history merged slot by slot as reference.merge_history does, the weight b of the micro-batch, and
// the pooled statistics.
template <typename scalar_t, typename acc_t>
__device__ ChannelStatistics<acc_t> pooled_statistics(const ForwardArgs<scalar_t, acc_t>& args,
                                                      int64_t c, acc_t batch_mean, acc_t batch_var,
                                                      int64_t m) {
  ChannelStatistics<acc_t> s;
  s.batch_mean = batch_mean;
  s.batch_var = batch_var;

  const int64_t channels = args.geo.channels;
  int64_t history_count = 0;
  acc_t history_mean = 0;
  acc_t history_var = 0;
  for (int64_t slot = 0; slot < args.history_slots; ++slot) {
    const int64_t i = slot * channels + c;
    const int64_t count = args.history_count[i];
    history_count += count;
    // The share of the slot in the running count, in fp64: counts may exceed 2^24.
    const acc_t share = static_cast<acc_t>(static_cast<double>(count) /
                                           static_cast<double>(history_count > 1 ? history_count : 1));
    pool_pair(history_mean, history_var, load_any_float<acc_t>(args.history_mean, i, acc_t(0)),
              load_any_float<acc_t>(args.history_var, i, acc_t(0)), share, history_mean,
              history_var);
  }
  if (args.has_ema) {
    s.b = history_count > 0 ? static_cast<acc_t>(args.ema_momentum) : acc_t(1);
  } else {
    s.b = static_cast<acc_t>(static_cast<double>(m) / static_cast<double>(history_count + m));
  }
  pool_pair(history_mean, history_var, s.batch_mean, s.batch_var, s.b, s.mean, s.var);
  return s;
}

// The block-level steps of a forward launch, shared by the two-pass kernel and the single-read kernel
// so that both compute the same bits.
template <typename scalar_t, typename acc_t, Layout L, int VEC>
struct ForwardBlock {
  static constexpr bool kRowLayout = L == Layout::kRows;
  static constexpr bool kMasked = L == Layout::kPlanesMasked;
  static constexpr int kAccs = kRowLayout ? VEC : 1;  // channels one thread accumulates
  static constexpr int kEntries = kRowLayout ? kBlockThreads * VEC : kBlockThreads;
  static constexpr int kMaxTile = kRowLayout ? 32 * VEC : 1;
  using Sums = ShiftedSums<acc_t, kAccs>;

  // The block's shared memory: per-thread summaries at [part * tile_width + channel in tile], then
  // each channel's (mean, scale, bias) for the elementwise step.
  struct Shared {
    WelfordState<acc_t> entries[kEntries];
    acc_t tile_mean[kMaxTile];
    acc_t tile_scale[kMaxTile];
    acc_t tile_bias[kMaxTile];
  };

  const ForwardArgs<scalar_t, acc_t>& args;
  Shared& shared;
  WelfordState<acc_t>* entries;
  int thread;
  int width;
  int64_t group;  // blockIdx.x: the channel group
  int split;      // blockIdx.y: the block's share of it
  int64_t first_channel;

  __device__ ForwardBlock(const ForwardArgs<scalar_t, acc_t>& args_, Shared& shared_)
      : args(args_),
        shared(shared_),
        entries(shared_.entries),
        thread(block_thread()),
        width(args_.geo.tile_width),
        group(blockIdx.x),
        split(static_cast<int>(blockIdx.y)),
        first_channel(group * width) {}

  __device__ static WelfordState<acc_t> merge(const WelfordState<acc_t>& a, const WelfordState<acc_t>& b) {
    return welford_merge(a, b);
  }

  // Adds one round of packs (the values `keep` keeps, where the layout masks them) to the sums.
  __device__ __forceinline__ static void accumulate(Sums& sums, const Pack<scalar_t, VEC> (&pack)[kUnroll],
                                                    const bool (&valid)[kUnroll],
                                                    const uint32_t (&keep)[kUnroll]) {
    if constexpr (kMasked) {
      accumulate_kept<acc_t, scalar_t, VEC>(sums, pack, keep);
    } else if (valid[0]) {  // a round whose first pack is invalid is empty (and unloaded)
      accumulate_packs<acc_t, scalar_t, VEC, kAccs>(sums, pack, valid);
    }
  }

  // The thread's sums into `entries`, then the block's fixed tree: entries[channel in tile] holds the
  // block's summary of each channel of its tile.
  __device__ void reduce(const Sums& sums) {
#pragma unroll
    for (int a = 0; a < kAccs; ++a) {
      const int entry = kRowLayout ? threadIdx.y * width + threadIdx.x * VEC + a : thread;
      entries[entry] = to_welford(sums, a);
    }
    tree_reduce(entries, kRowLayout ? args.geo.rows_per_block : kBlockThreads, width, thread, merge);
  }

  // The block's summaries into the workspace, one slot per (channel, split).
  __device__ void write_partial() {
    const int64_t c = first_channel + thread;
    if (thread < width && c < args.geo.channels) {
      const int64_t slot = c * args.geo.splits + split;
      args.partial_count[slot] = entries[thread].count;
      args.partial_mean[slot] = entries[thread].mean;
      args.partial_m2[slot] = entries[thread].m2;
    }
  }

  // Every split's summaries of each channel of the tile: thread (part, channel) takes splits part,
  // part + parts, ... in order, then the fixed tree; every block of the group gets the same bits.
  __device__ void merge_partials() {
    const int parts = kBlockThreads / width;
    const int channel_in_tile = thread % width;
    const int part = thread / width;
    const int64_t c = first_channel + channel_in_tile;
    WelfordState<acc_t> state = welford_empty<acc_t>();
    if (c < args.geo.channels) {
      for (int s = part; s < args.geo.splits; s += parts) {
        const int64_t slot = c * args.geo.splits + s;
        state = welford_merge(state, WelfordState<acc_t>{args.partial_mean[slot], args.partial_m2[slot],
                                                         args.partial_count[slot]});
      }
    }
    entries[thread] = state;  // == part * width + channel_in_tile
    tree_reduce(entries, parts, width, thread, merge);
  }

  // One thread per channel of the tile: the micro-batch's statistics (reduced into entries, or given),
  // then the pooled ones; the split-0 block writes the per-channel outputs. With an output, each
  // channel's (mean, scale, bias) go to the tile arrays for the elementwise step.
  __device__ void finalize(bool given) {
    if (thread >= width) return;
    const int64_t c = first_channel + thread;
    if (c >= args.geo.channels) return;
    acc_t batch_mean;
    acc_t batch_var;
    int64_t m;
    if (given) {
      batch_mean = args.given_batch_mean[c];
      batch_var = args.given_batch_var[c];
      m = *args.count;
    } else {
      // An empty micro-batch has zero statistics (reference.batch_stats): they weigh nothing beside
      // its count of 0.
      const WelfordState<acc_t>& batch = entries[thread];
      batch_mean = batch.count > 0 ? batch.mean : acc_t(0);
      batch_var = batch.count > 0 ? batch.m2 / static_cast<acc_t>(batch.count) : acc_t(0);
      m = args.geo.values_per_channel;
    }
    if (!args.normalize) {
      if (split == 0) {
        args.batch_mean[c] = batch_mean;
        args.batch_var[c] = batch_var;
      }
      return;
    }
    const ChannelStatistics<acc_t> s = pooled_statistics(args, c, batch_mean, batch_var, m);
    if (split == 0) {
      args.mean[c] = s.mean;
      args.var[c] = s.var;
      args.current_weight[c] = s.b;
      if (args.batch_mean != nullptr) {
        args.batch_mean[c] = s.batch_mean;
        args.batch_var[c] = s.batch_var;
      }
    }
    const acc_t scale = reciprocal_sqrt(s.var + args.eps);
    shared.tile_mean[thread] = s.mean;
    shared.tile_scale[thread] = scale * load_any_float<acc_t>(args.weight, c, acc_t(1));
    shared.tile_bias[thread] = load_any_float<acc_t>(args.bias, c, acc_t(0));
  }
};

// y = act((x - mean) * (invstd * weight) + bias) for each channel of the thread, in x's dtype: one
// pack. The activation is one uniform branch per pack; the identity's is the plain normalization.
template <typename scalar_t, typename acc_t, int VEC, bool ROWS, int ACCS = ROWS ? VEC : 1>
struct Normalizer {
  acc_t mean[ACCS];
  acc_t scale[ACCS];
  acc_t bias[ACCS];
  ActivationParams<acc_t> activation;

  // The thread's channels' coefficients from the tile arrays (after finalize and a barrier).
  template <typename Block>
  __device__ explicit Normalizer(const Block& block) {
    const auto& tile_mean = block.shared.tile_mean;
    const auto& tile_scale = block.shared.tile_scale;
    const auto& tile_bias = block.shared.tile_bias;
    activation = block.args.activation;
#pragma unroll
    for (int a = 0; a < ACCS; ++a) {
      const int index = ROWS ? threadIdx.x * VEC + a : 0;  // kRows: the thread's channels
      const bool exists = block.first_channel + index < block.args.geo.channels;
      mean[a] = exists ? tile_mean[index] : acc_t(0);
      scale[a] = exists ? tile_scale[index] : acc_t(0);
      bias[a] = exists ? tile_bias[index] : acc_t(0);
    }
  }

  __device__ __forceinline__ Pack<scalar_t, VEC> operator()(const Pack<scalar_t, VEC>& pack) const {
    Pack<scalar_t, VEC> out;
    if (activation.code == kIdentity) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int a = ACCS == 1 ? 0 : v;
        out.v[v] = static_cast<scalar_t>(multiply_add(to_acc<acc_t>(pack.v[v]) - mean[a], scale[a], bias[a]));
      }
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int a = ACCS == 1 ? 0 : v;
        const acc_t z = multiply_add(to_acc<acc_t>(pack.v[v]) - mean[a], scale[a], bias[a]);
        out.v[v] = static_cast<scalar_t>(activate(z, activation.code, activation.param));
      }
    }
    return out;
  }
};

// The two-pass kernel, one template for the four phases (see Phase). Block = one channel group
// (blockIdx.x) x one split (blockIdx.y). The elementwise pass reads x again, from each thread's last
// pack back to its first: what the reduction read last is the likeliest to be in L2 still.
template <typename scalar_t, typename acc_t, Layout L, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    cmbn_forward_kernel(const ForwardArgs<scalar_t, acc_t> args, const Phase phase) {
  using Block = ForwardBlock<scalar_t, acc_t, L, VEC>;
  __shared__ typename Block::Shared shared[1];
  Block block(args, shared[0]);
  const Geometry& geo = args.geo;
  const int64_t group = block.group;
  const int split = block.split;
  int64_t offset[kUnroll];
  bool valid[kUnroll];

  if (phase == Phase::kFused || phase == Phase::kPartial) {
    typename Block::Sums sums = shifted_sums_empty<acc_t, Block::kAccs>();
    Walker<L, VEC> walker(geo, group, split);
    while (walker.next(offset, valid)) {
      Pack<scalar_t, VEC> pack[kUnroll];
      uint32_t keep[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        keep[u] = walker.kept(u);
        if (valid[u]) pack[u] = load_walked<L, VEC>(args.x, offset[u], keep[u], geo.total);
      }
      Block::accumulate(sums, pack, valid, keep);
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
  if (!args.normalize) return;  // statistics only (the same for every thread of the grid)
  __syncthreads();

  const Normalizer<scalar_t, acc_t, VEC, Block::kRowLayout> normalize(block);
  Walker<L, VEC> walker(geo, group, split, /*reversed=*/true);
  while (walker.next(offset, valid)) {
    Pack<scalar_t, VEC> pack[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (valid[u]) pack[u] = load_walked<L, VEC>(args.x, offset[u], walker.kept(u), geo.total);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (valid[u]) store_walked<L, VEC>(args.y, offset[u], walker.kept(u), normalize(pack[u]));
    }
  }
}

// The single-read kernel (cmbn_forward only): each thread loads its share of x once, into registers
// (at most held_rounds rounds, which the plan guarantees), reduces it as the two-pass kernel
// does (the same geometry, sums and merges, so the same bits), and writes y from the registers.
// kGrid: the blocks of a channel group publish their partial summaries and meet at a grid barrier
// (a cooperative launch holds every block at once) before each merges all of them.
template <typename scalar_t, typename acc_t, Layout L, int VEC>
__global__ void __launch_bounds__(kBlockThreads, kHeldBlocksPerSM)
    cmbn_forward_held_kernel(const ForwardArgs<scalar_t, acc_t> args, const Residency residency) {
  constexpr int kRounds = held_rounds<scalar_t, L>(kHeldRoundsForward);
  using Block = ForwardBlock<scalar_t, acc_t, L, VEC>;
  __shared__ typename Block::Shared shared[1];
  Block block(args, shared[0]);
  const Geometry& geo = args.geo;
  const int64_t group = block.group;
  const int split = block.split;

  Pack<scalar_t, VEC> held[kRounds][kUnroll];
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
        if (valid[r][u]) held[r][u] = load_walked<L, VEC>(args.x, offset[u], keep[r][u], geo.total);
      }
    }
  }
  typename Block::Sums sums = shifted_sums_empty<acc_t, Block::kAccs>();
#pragma unroll
  for (int r = 0; r < kRounds; ++r) Block::accumulate(sums, held[r], valid[r], keep[r]);
  block.reduce(sums);
  if (residency == Residency::kGrid) {
    block.write_partial();
    cooperative_groups::this_grid().sync();
    block.merge_partials();
  }
  block.finalize(/*given=*/false);
  __syncthreads();

  // The store walks the same packs again: their offsets, validity and masks are rebuilt here rather
  // than kept live in registers across the reduction and the grid barrier.
  const Normalizer<scalar_t, acc_t, VEC, Block::kRowLayout> normalize(block);
  Walker<L, VEC> walker(geo, group, split);
  int64_t offset[kUnroll];
  bool valid_again[kUnroll];
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    if (!walker.next(offset, valid_again)) break;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (valid_again[u]) store_walked<L, VEC>(args.y, offset[u], walker.kept(u), normalize(held[r][u]));
    }
  }
}

template <typename scalar_t, typename acc_t, Layout L, int VEC>
LaunchPlan forward_plan(const LayoutInfo& info) {
  const int64_t resident = resident_blocks<&cmbn_forward_kernel<scalar_t, acc_t, L, VEC>,
                                           &cmbn_forward_held_kernel<scalar_t, acc_t, L, VEC>>();
  return plan_launch(info, VEC, sizeof(scalar_t), resident,
                     held_rounds<scalar_t, L>(kHeldRoundsForward) * kUnroll);
}

// Launches the kernels over x: `given` statistics (kGiven) take one launch; with an output, the
// single-read kernel where the plan takes it (one launch; cooperative when a channel group spans
// several blocks); otherwise x is reduced in one fused launch (one block per channel group) or a
// partial launch into a workspace and an apply launch. Without an output (statistics only) only the
// split-0 blocks of the apply launch have work.
template <typename scalar_t, typename acc_t, Layout L, int VEC>
void launch_forward(ForwardArgs<scalar_t, acc_t> args, const LayoutInfo& info, const at::Tensor& x,
                    bool given) {
  const LaunchPlan plan = forward_plan<scalar_t, acc_t, L, VEC>(info);
  args.geo = plan.geo;
  const Geometry& geo = args.geo;
  const dim3 grid = grid_shape(geo);
  const dim3 block = block_shape(geo, L);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (given) {
    cmbn_forward_kernel<scalar_t, acc_t, L, VEC><<<grid, block, 0, stream>>>(args, Phase::kGiven);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool single_read = plan.path == KernelPath::kSingleRead && args.normalize;
  if (single_read && !plan.cooperative) {
    cmbn_forward_held_kernel<scalar_t, acc_t, L, VEC>
        <<<grid, block, 0, stream>>>(args, Residency::kBlock);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (!single_read && geo.splits == 1) {
    cmbn_forward_kernel<scalar_t, acc_t, L, VEC><<<grid, block, 0, stream>>>(args, Phase::kFused);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Workspace: one (count, mean, M2) per channel and split; every entry is written (before the grid
  // barrier, or by the partial launch) before any is read, so it needs no initialization.
  const int64_t slots = geo.channels * geo.splits;
  const at::Tensor partial_count = at::empty({slots}, x.options().dtype(at::kLong));
  const at::Tensor partial_stats =
      at::empty({2, slots}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  args.partial_count = partial_count.data_ptr<int64_t>();
  args.partial_mean = partial_stats.data_ptr<acc_t>();
  args.partial_m2 = args.partial_mean + slots;
  if (single_read) {
    Residency residency = Residency::kGrid;
    void* kernel_args[] = {&args, &residency};
    const cudaError_t status = cudaLaunchCooperativeKernel(
        &cmbn_forward_held_kernel<scalar_t, acc_t, L, VEC>, grid, block, kernel_args, 0, stream);
    if (!cooperative_launch_refused(status, stream, "cmbn_forward", geo)) {
      C10_CUDA_CHECK(status);
      return;
    }
    // The GPU cannot hold the whole grid now (another process's work, MPS): the two-pass path.
  }
  cmbn_forward_kernel<scalar_t, acc_t, L, VEC><<<grid, block, 0, stream>>>(args, Phase::kPartial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 apply_grid = args.normalize ? grid : dim3(grid.x, 1);
  cmbn_forward_kernel<scalar_t, acc_t, L, VEC><<<apply_grid, block, 0, stream>>>(args, Phase::kApply);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, Layout L, int VEC>
struct ForwardLaunch {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  static void run(const LayoutInfo& info, const ForwardArgs<scalar_t, acc_t>& args, const at::Tensor& x,
                  bool given) {
    launch_forward<scalar_t, acc_t, L, VEC>(args, info, x, given);
  }
};

template <typename scalar_t, Layout L, int VEC>
struct ForwardPlan {
  static LaunchPlan run(const LayoutInfo& info) {
    return forward_plan<scalar_t, at::acc_type<scalar_t, /*is_cuda=*/true>, L, VEC>(info);
  }
};

// `y` is undefined when nothing is written.
template <typename scalar_t, typename acc_t>
void dispatch_forward(const ForwardArgs<scalar_t, acc_t>& args, const LayoutInfo& info,
                      const at::Tensor& x, const at::Tensor& y, bool given) {
  with_walk<ForwardLaunch, scalar_t>(walk_of<scalar_t>(info, {x, y}), args, x, given);
}

// The inputs of the pooling and normalization, contiguous, kept alive for the launch.
struct PoolingInputs {
  at::Tensor weight, bias, history_count, history_mean, history_var;
};

PoolingInputs pooling_inputs(const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& history_count,
                             const at::Tensor& history_mean, const at::Tensor& history_var) {
  return PoolingInputs{contiguous_or_undefined(weight), contiguous_or_undefined(bias),
                       history_count.contiguous(), history_mean.contiguous(),
                       history_var.contiguous()};
}

template <typename scalar_t, typename acc_t>
void set_pooling_args(ForwardArgs<scalar_t, acc_t>& args, const PoolingInputs& in, double eps,
                      std::optional<double> ema_momentum) {
  args.weight = any_float_vector(in.weight);
  args.bias = any_float_vector(in.bias);
  args.history_count = in.history_count.const_data_ptr<int64_t>();
  args.history_mean = any_float_vector(in.history_mean);
  args.history_var = any_float_vector(in.history_var);
  args.history_slots = in.history_count.size(0);
  args.eps = static_cast<acc_t>(eps);
  args.has_ema = ema_momentum.has_value();
  args.ema_momentum = ema_momentum.value_or(0.0);
}

// A (C,) statistic the caller gives, in the statistics' dtype and contiguous (a no-op for the
// tensors cmbn_batch_stats returns).
at::Tensor given_statistic(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_channel_vector(op, t, name, x);
  return as_dtype_contiguous(t, stats_dtype(x.scalar_type()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmbn_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& history_count,
    const at::Tensor& history_mean, const at::Tensor& history_var, double eps,
    std::optional<double> ema_momentum, bool exact_grad, int64_t activation,
    double activation_param) {
  (void)exact_grad;  // the forward is the same for both gradients
  const char* op = "cmbn_forward";
  check_pooling_args(op, x, weight, bias, history_count, history_mean, history_var,
                     c10::DeviceType::CUDA);
  check_activation(op, activation, activation_param);
  const c10::cuda::CUDAGuard device_guard(x.device());

  const int64_t channels = x.size(1);
  const at::TensorOptions stat_options = x.options().dtype(stats_dtype(x.scalar_type()));
  // y keeps x's strides exactly (as the fake does) whenever x is dense.
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({channels}, stat_options);
  at::Tensor var = at::empty({channels}, stat_options);
  at::Tensor batch_mean = at::empty({channels}, stat_options);
  at::Tensor batch_var = at::empty({channels}, stat_options);
  at::Tensor current_weight = at::empty({channels}, stat_options);
  if (channels == 0) return {y, mean, var, batch_mean, batch_var, current_weight};
  // An empty micro-batch (N == 0) still runs one launch with nothing to read: its statistics are
  // zero and the pooled ones come from the history alone, as in the reference.

  const WorkTensors work = work_tensors(x, y);
  const PoolingInputs in = pooling_inputs(weight, bias, history_count, history_mean, history_var);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    ForwardArgs<scalar_t, acc_t> args{};
    args.x = work.x.const_data_ptr<scalar_t>();
    args.y = work.out.mutable_data_ptr<scalar_t>();
    args.normalize = true;
    args.activation = activation_params<acc_t>(activation, activation_param);
    set_pooling_args(args, in, eps, ema_momentum);
    args.mean = mean.mutable_data_ptr<acc_t>();
    args.var = var.mutable_data_ptr<acc_t>();
    args.batch_mean = batch_mean.mutable_data_ptr<acc_t>();
    args.batch_var = batch_var.mutable_data_ptr<acc_t>();
    args.current_weight = current_weight.mutable_data_ptr<acc_t>();
    dispatch_forward<scalar_t, acc_t>(args, work.info, work.x, work.out, /*given=*/false);
  });
  if (!work.out.is_same(y)) y.copy_(work.out);
  return {y, mean, var, batch_mean, batch_var, current_weight};
}

std::tuple<at::Tensor, at::Tensor> cmbn_batch_stats_cuda(const at::Tensor& x) {
  const char* op = "cmbn_batch_stats";
  check_input(op, x, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t channels = x.size(1);
  const at::TensorOptions stat_options = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor batch_mean = at::empty({channels}, stat_options);
  at::Tensor batch_var = at::empty({channels}, stat_options);
  if (channels == 0) return {batch_mean, batch_var};
  // An empty x still launches once (C > 0): its statistics are zero, written by the kernel.
  const ReadableTensor readable_x = readable(x);
  const at::Tensor& x_work = readable_x.x;
  const LayoutInfo& info = readable_x.info;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_batch_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    ForwardArgs<scalar_t, acc_t> args{};
    args.x = x_work.const_data_ptr<scalar_t>();
    args.normalize = false;
    args.batch_mean = batch_mean.mutable_data_ptr<acc_t>();
    args.batch_var = batch_var.mutable_data_ptr<acc_t>();
    dispatch_forward<scalar_t, acc_t>(args, info, x_work, at::Tensor(), /*given=*/false);
  });
  return {batch_mean, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmbn_pooled_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& count, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, const at::Tensor& history_count, const at::Tensor& history_mean,
    const at::Tensor& history_var, double eps, std::optional<double> ema_momentum) {
  const char* op = "cmbn_pooled_forward";
  check_pooling_args(op, x, weight, bias, history_count, history_mean, history_var,
                     c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor count_d = device_count(op, count, x);
  const at::Tensor batch_mean_c = given_statistic(op, batch_mean, "batch_mean", x);
  const at::Tensor batch_var_c = given_statistic(op, batch_var, "batch_var", x);

  const int64_t channels = x.size(1);
  const at::TensorOptions stat_options = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({channels}, stat_options);
  at::Tensor var = at::empty({channels}, stat_options);
  at::Tensor current_weight = at::empty({channels}, stat_options);
  if (channels == 0) return {y, mean, var, current_weight};
  // x may be empty while the group's count is not (this rank had no values): the launch then only
  // writes the pooled statistics, one block per channel group.

  const WorkTensors work = work_tensors(x, y);
  const PoolingInputs in = pooling_inputs(weight, bias, history_count, history_mean, history_var);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_pooled_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    ForwardArgs<scalar_t, acc_t> args{};
    args.x = work.x.const_data_ptr<scalar_t>();
    args.y = work.out.mutable_data_ptr<scalar_t>();
    args.normalize = true;
    set_pooling_args(args, in, eps, ema_momentum);
    args.count = count_d.const_data_ptr<int64_t>();
    args.given_batch_mean = batch_mean_c.const_data_ptr<acc_t>();
    args.given_batch_var = batch_var_c.const_data_ptr<acc_t>();
    args.mean = mean.mutable_data_ptr<acc_t>();
    args.var = var.mutable_data_ptr<acc_t>();
    args.current_weight = current_weight.mutable_data_ptr<acc_t>();
    dispatch_forward<scalar_t, acc_t>(args, work.info, work.x, work.out, /*given=*/true);
  });
  if (!work.out.is_same(y)) y.copy_(work.out);
  return {y, mean, var, current_weight};
}

LaunchPlan cmbn_forward_plan(const at::Tensor& x) {
  check_input("cmbn_kernel_plan", x, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const ReadableTensor readable_x = readable(x);  // y takes x's layout, or both a contiguous one
  LaunchPlan plan{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_forward_plan", [&] {
    plan = with_walk<ForwardPlan, scalar_t>(walk_of<scalar_t>(readable_x.info, {readable_x.x}));
  });
  return plan;
}

}  // namespace cmbn
