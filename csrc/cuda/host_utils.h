#pragma once
// Host-side helpers of the CUDA launchers: per-channel vectors as the kernels take them, and how the
// work of one call is split over the grid (the checks and layouts both families share are in
// op_checks.h and work_tensors.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include "activation.h"
#include "kernel_types.h"
#include "op_checks.h"
#include "work_tensors.h"

namespace cmbn {

inline bool is_aligned_16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline FloatKind float_kind(const at::Tensor& t) {
  if (!t.defined()) return FloatKind::kAbsent;
  switch (t.scalar_type()) {
    case at::kHalf:
      return FloatKind::kHalf;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    case at::kFloat:
      return FloatKind::kFloat;
    case at::kDouble:
      return FloatKind::kDouble;
    default:
      TORCH_CHECK(false, "cmbn_ext: unsupported dtype ", t.scalar_type());
  }
  return FloatKind::kAbsent;
}

inline AnyFloatVector any_float_vector(const at::Tensor& t) {
  return AnyFloatVector{t.defined() ? t.const_data_ptr() : nullptr, float_kind(t)};
}

inline AnyFloatBuffer any_float_buffer(const at::Tensor& t) {
  return AnyFloatBuffer{t.defined() ? t.mutable_data_ptr() : nullptr, float_kind(t)};
}

template <typename acc_t>
ActivationParams<acc_t> activation_params(int64_t activation, double activation_param) {
  return ActivationParams<acc_t>{static_cast<int>(activation), static_cast<acc_t>(activation_param)};
}

inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// A 0-dim int64 count (the whole group's values per channel) as a device pointer the kernels read, so
// the host never waits for it. A count on the CPU (a caller's scalar) is copied over.
inline at::Tensor device_count(const char* op, const at::Tensor& count, const at::Tensor& x) {
  TORCH_CHECK(count.scalar_type() == at::kLong, op, ": count must be int64, got ", count.scalar_type());
  TORCH_CHECK(count.numel() == 1, op, ": count must hold one value, got shape ", count.sizes());
  TORCH_CHECK(count.is_cpu() || count.device() == x.device(), op, ": count is on ", count.device(),
              " but x is on ", x.device());
  return count.to(x.device()).contiguous();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_power_of_two(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Splits the values of each channel group over enough blocks for one wave of `resident_blocks` (the
// blocks the GPU holds at once, from the occupancy of the kernels that will run), but never so many
// that a thread has fewer than `min_items` packs (kPlanes) or rows (kRows). splits == 1 is the small regime
// (one block per channel group); a few splits the medium one; many splits over few channels the huge
// one. Both paths (two-pass and single-read) take this geometry, so they reduce the same values in the
// same blocks and threads: the statistics are the same bits whichever path ran.
inline Geometry make_geometry(const LayoutInfo& info, int vec, int element_size, int64_t resident_blocks,
                              int64_t min_items) {
  Geometry geo{};
  geo.channels = info.channels;
  geo.outer = info.outer;
  geo.inner = info.inner;
  geo.total = info.outer * info.channels * info.inner;
  int64_t items_per_group;  // packs (kPlanes) or rows (kRows) one channel group holds
  int64_t min_items_per_block;
  if (info.layout != Layout::kRows) {
    // A plane of `inner` values starting anywhere in a pack overlaps at most this many packs.
    geo.inner_packs = info.layout == Layout::kPlanes ? info.inner / vec : (info.inner + vec - 2) / vec + 1;
    geo.values_per_channel = info.values_per_channel();
    geo.lanes = kBlockThreads;
    geo.rows_per_block = 1;
    geo.tile_width = 1;
    geo.channel_groups = info.channels;
    items_per_group = info.outer * geo.inner_packs;
    min_items_per_block = static_cast<int64_t>(kBlockThreads) * min_items;
  } else {
    geo.inner_packs = 1;
    geo.values_per_channel = info.outer;
    // Lanes of one row cover 128 bytes (a whole cache line) when C allows: wider tiles would only
    // leave fewer blocks per channel and longer merges in the apply phase.
    const int64_t lanes_needed = ceil_div(info.channels, vec);
    const int64_t lanes_per_line = std::clamp<int64_t>(128 / (vec * element_size), 1, 32);
    geo.lanes = static_cast<int>(std::min(lanes_per_line, next_power_of_two(lanes_needed)));
    geo.rows_per_block = kBlockThreads / geo.lanes;
    geo.tile_width = geo.lanes * vec;
    geo.channel_groups = ceil_div(info.channels, geo.tile_width);
    items_per_group = info.outer;
    min_items_per_block = static_cast<int64_t>(geo.rows_per_block) * min_items;
  }
  const int64_t splits = std::min(resident_blocks / std::max<int64_t>(geo.channel_groups, 1),
                                  ceil_div(items_per_group, min_items_per_block));
  geo.splits = static_cast<int>(std::clamp<int64_t>(splits, 1, kMaxSplits));
  if (info.layout != Layout::kRows && geo.inner_packs > 0) {
    const int64_t stride = static_cast<int64_t>(geo.splits) * kBlockThreads;
    geo.step_outer = stride / geo.inner_packs;
    geo.step_inner = stride % geo.inner_packs;
  }
  if (info.layout == Layout::kRows && info.outer > 0) {
    const int64_t stride = static_cast<int64_t>(geo.splits) * geo.rows_per_block;
    geo.last_row_steps = (info.outer - 1) / stride;
    geo.last_row_remainder = (info.outer - 1) % stride;
  }
  return geo;
}

// Packs (kPlanes*) or rows (kRows) the busiest thread of the grid visits.
inline int64_t items_per_thread(const Geometry& geo, Layout layout) {
  const bool planes = layout != Layout::kRows;
  const int64_t items_per_group = planes ? geo.outer * geo.inner_packs : geo.outer;
  const int64_t threads_per_group =
      static_cast<int64_t>(geo.splits) * (planes ? kBlockThreads : geo.rows_per_block);
  return ceil_div(items_per_group, threads_per_group);
}

// CMBN_KERNEL_PATH: which path the fused ops take. Read at every call, so a test or benchmark can
// switch it in-process; "auto" (or unset) picks the single-read path wherever it fits.
inline KernelPath requested_path() {
  const char* text = std::getenv("CMBN_KERNEL_PATH");
  if (text == nullptr || *text == '\0' || std::strcmp(text, "auto") == 0) return KernelPath::kAuto;
  if (std::strcmp(text, "two_pass") == 0) return KernelPath::kTwoPass;
  if (std::strcmp(text, "single_read") == 0) return KernelPath::kSingleRead;
  TORCH_CHECK(false, "CMBN_KERNEL_PATH must be auto, two_pass or single_read, got '", text, "'");
  return KernelPath::kAuto;
}

// A value per device index, computed once for each device by its first caller (the others wait for
// it; a computation that throws is retried by the next caller), then read with one atomic load. A host
// may hold GPUs of different models, whose occupancy, SM count and kernel images differ.
template <typename T>
class PerDevice {
 public:
  static constexpr int kMaxDevices = std::numeric_limits<c10::DeviceIndex>::max() + 1;

  template <typename Compute>
  T get(c10::DeviceIndex device, const Compute& compute) {
    TORCH_CHECK(device >= 0 && device < kMaxDevices, "cmbn_ext: device index ", int(device),
                " out of range");
    Slot& slot = slots_[device];
    if (C10_LIKELY(slot.ready.load(std::memory_order_acquire))) return slot.value;
    std::call_once(slot.once, [&] {
      slot.value = compute();
      slot.ready.store(true, std::memory_order_release);
    });
    return slot.value;
  }

 private:
  struct Slot {
    std::once_flag once;
    std::atomic<bool> ready{false};
    T value{};
  };
  std::array<Slot, kMaxDevices> slots_;
};

// The device the launchers run on: x's, which their CUDAGuard makes current.
inline c10::DeviceIndex current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return static_cast<c10::DeviceIndex>(device);
}

// Blocks of 256 threads the current GPU holds at once for both kernels of a direction: the lower
// occupancy of the two (asked once per kernel and device, then cached) times its SM count.
template <auto TwoPassKernel, auto HeldKernel>
int64_t resident_blocks() {
  static PerDevice<int> blocks_per_sm;
  const int per_sm = blocks_per_sm.get(current_device(), [] {
    int two_pass = 0;
    int held = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&two_pass, TwoPassKernel,
                                                                 kBlockThreads, 0));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&held, HeldKernel, kBlockThreads, 0));
    return std::max(1, std::min(two_pass, held));
  });
  return static_cast<int64_t>(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// The launches of a fused op (cmbn_forward, cmbn_backward) for an input: the geometry, and the
// single-read path where every thread's share fits in its registers (at most `held_items` packs or
// rows) and, when a channel group spans several blocks, a cooperative launch can hold the whole grid.
// Blocks get two rounds of kUnroll items a thread at least (one where that is all a thread holds),
// so that a channel split over blocks for want of channels fits in registers.
inline LaunchPlan plan_launch(const LayoutInfo& info, int vec, int element_size,
                              int64_t resident_blocks, int held_items) {
  LaunchPlan plan{};
  const int64_t min_items = std::min<int64_t>(2 * kUnroll, held_items);
  plan.geo = make_geometry(info, vec, element_size, resident_blocks, min_items);
  plan.resident_blocks = resident_blocks;
  plan.layout = info.layout;
  plan.vec = vec;
  plan.path = KernelPath::kTwoPass;
  const KernelPath requested = requested_path();
  if (requested == KernelPath::kTwoPass) return plan;
  const bool fits = items_per_thread(plan.geo, info.layout) <= held_items;
  const bool several_blocks = plan.geo.splits > 1;
  const bool cooperative =
      !several_blocks || (at::cuda::getCurrentDeviceProperties()->cooperativeLaunch != 0 &&
                          plan.geo.channel_groups * plan.geo.splits <= resident_blocks);
  if (fits && cooperative) {
    plan.path = KernelPath::kSingleRead;
    plan.cooperative = several_blocks;
  }
  return plan;
}

// A refused cooperative launch (the grid does not fit on the GPU as it is now, e.g. under MPS, or
// the device cannot run one): cleared, so the caller can take the two-pass path instead. Not while
// the stream is being captured into a CUDA graph: a fallback there would record other launches into
// a capture the refused one may have invalidated. The plan takes a cooperative grid only where this
// device holds it, so a refusal during capture means other work holds its SMs: a clear error.
inline bool cooperative_launch_refused(cudaError_t status, cudaStream_t stream, const char* op,
                                       const Geometry& geo) {
  if (status != cudaErrorCooperativeLaunchTooLarge && status != cudaErrorNotSupported) return false;
  (void)cudaGetLastError();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone, op, ": the GPU refused a cooperative launch of ",
              geo.channel_groups * geo.splits, " blocks (", cudaGetErrorString(status),
              ") while a CUDA graph was being captured; other work (another process, MPS) holds "
              "its SMs. Capture with CMBN_KERNEL_PATH=two_pass, or on a GPU that runs nothing else.");
  return true;
}

// How the kernels walk a layout: the walk's layout (kPlanesMasked for planes that do not hold whole
// packs) and whether it moves 16-byte packs or single values.
struct Walk {
  LayoutInfo info;
  bool packs;
};

// 16-byte packs when every tensor the kernel reads or writes (undefined ones aside) is aligned and
// either a pack stays inside one plane (kPlanes) or one row's channels (kRows), or the planes span
// two packs or more (kPlanesMasked: the packs over each plane, masked at its ends); else one value at
// a time.
template <typename scalar_t>
Walk walk_of(const LayoutInfo& info, std::initializer_list<at::Tensor> tensors) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool aligned = true;
  for (const at::Tensor& t : tensors) aligned = aligned && (!t.defined() || is_aligned_16(t));
  if (info.layout == Layout::kRows) return Walk{info, aligned && info.channels % kVec == 0};
  if (aligned && info.inner % kVec != 0 && info.inner >= 2 * kVec) {
    LayoutInfo masked = info;
    masked.layout = Layout::kPlanesMasked;
    return Walk{masked, true};
  }
  return Walk{info, aligned && info.inner % kVec == 0};
}

// Op<scalar_t, L, VEC>::run(walk.info, args...) for the walk's layout and pack width.
template <template <typename, Layout, int> class Op, typename scalar_t, typename... Args>
decltype(auto) with_walk(const Walk& walk, Args&&... args) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  switch (walk.info.layout) {
    case Layout::kPlanesMasked:
      return Op<scalar_t, Layout::kPlanesMasked, kVec>::run(walk.info, args...);
    case Layout::kPlanes:
      return walk.packs ? Op<scalar_t, Layout::kPlanes, kVec>::run(walk.info, args...)
                        : Op<scalar_t, Layout::kPlanes, 1>::run(walk.info, args...);
    default:
      return walk.packs ? Op<scalar_t, Layout::kRows, kVec>::run(walk.info, args...)
                        : Op<scalar_t, Layout::kRows, 1>::run(walk.info, args...);
  }
}

inline dim3 block_shape(const Geometry& geo, Layout layout) {
  return layout == Layout::kRows ? dim3(geo.lanes, geo.rows_per_block) : dim3(kBlockThreads);
}

inline dim3 grid_shape(const Geometry& geo) {
  return dim3(static_cast<unsigned>(geo.channel_groups), static_cast<unsigned>(geo.splits));
}

}  // namespace cmbn
