#pragma once
// Host-side helpers of the launchers: argument checks with messages that name the argument, the
// layout of a tensor, and how the work of one call is split over the grid.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernel_types.h"

namespace cmbn {

struct LayoutInfo {
  Layout layout;
  int64_t outer;     // kPlanes: N; kRows: rows
  int64_t channels;  // C
  int64_t inner;     // kPlanes: values per plane; kRows: 1
};

// The layout the kernels can read `x` in without a copy, or nullopt (then the caller copies).
inline std::optional<LayoutInfo> describe_layout(const at::Tensor& x) {
  const int64_t batch = x.size(0);
  const int64_t channels = x.size(1);
  int64_t inner = 1;
  for (int64_t d = 2; d < x.dim(); ++d) inner *= x.size(d);
  if (x.is_contiguous()) {
    // One value per plane (or nothing at all): channels are innermost, which the row kernels
    // read coalesced.
    if (inner <= 1 || x.numel() == 0) return LayoutInfo{Layout::kRows, batch * inner, channels, 1};
    return LayoutInfo{Layout::kPlanes, batch, channels, inner};
  }
  // channels_last, channels_last_3d, or any (N, *, C) storage of an (N, C, *) tensor.
  std::vector<int64_t> channels_last_order{0};
  for (int64_t d = 2; d < x.dim(); ++d) channels_last_order.push_back(d);
  channels_last_order.push_back(1);
  if (x.permute(channels_last_order).is_contiguous()) {
    return LayoutInfo{Layout::kRows, batch * inner, channels, 1};
  }
  return std::nullopt;
}

// Same element addresses: equal sizes, and equal strides wherever a dimension has more than one value.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// `t` itself when it already has the layout of `like`, else a copy of it in that layout.
inline at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (same_layout(t, like)) return t;
  at::Tensor copy = at::empty_like(like);
  copy.copy_(t);
  return copy;
}

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

inline bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

// Statistics run in fp64 for fp64 input, in fp32 for everything else (SPEC section 3).
inline at::ScalarType stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 2, op, ": ", name, " must have shape (N, C, *), got ", x.dim(),
              " dimension(s)");
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
}

// A (C,) float vector on x's device; `required` false lets it be absent (affine=False).
inline void check_per_channel(const char* op, const std::optional<at::Tensor>& t, const char* name,
                              const at::Tensor& x, bool required) {
  if (!t.has_value() || !t->defined()) {
    TORCH_CHECK(!required, op, ": ", name, " is required");
    return;
  }
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ",
              x.device());
  TORCH_CHECK(is_supported_float(t->scalar_type()), op, ": ", name, " must be a float tensor, got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name,
              " must have shape (C,) = (", x.size(1), ",), got ", t->sizes());
}

inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// Where a kernel reads `x` and writes `out` (= empty_like(x)): `out` itself when the kernels read its
// layout (x is copied only if its strides differ), else contiguous scratch tensors whose result the
// caller copies into `out` afterwards (a dense but unusual permutation).
struct WorkTensors {
  at::Tensor x;
  at::Tensor out;
  LayoutInfo info;
};

inline WorkTensors work_tensors(const at::Tensor& x, const at::Tensor& out) {
  if (std::optional<LayoutInfo> info = describe_layout(out)) {
    return WorkTensors{with_layout_of(x, out), out, *info};
  }
  at::Tensor x_contiguous = x.contiguous();
  at::Tensor out_contiguous = at::empty_like(x_contiguous);
  return WorkTensors{x_contiguous, out_contiguous, *describe_layout(out_contiguous)};
}

// `x` itself when the kernels read its layout, else a contiguous copy (for the ops that only reduce).
struct ReadableTensor {
  at::Tensor x;
  LayoutInfo info;
};

inline ReadableTensor readable(const at::Tensor& x) {
  if (std::optional<LayoutInfo> info = describe_layout(x)) return ReadableTensor{x, *info};
  at::Tensor x_contiguous = x.contiguous();
  return ReadableTensor{x_contiguous, *describe_layout(x_contiguous)};
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

inline void check_same_device(const char* op, const at::Tensor& t, const char* name,
                              const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_power_of_two(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Splits the values of each channel group over enough blocks to fill the GPU (about four blocks of
// 256 threads per SM), but never so many that a block has fewer than two rounds of kUnroll packs per
// thread. splits == 1 is the small regime (one fused launch); a few splits the medium one; many
// splits over few channels the huge one.
inline Geometry make_geometry(const LayoutInfo& info, int vec, int element_size) {
  Geometry geo{};
  geo.channels = info.channels;
  geo.outer = info.outer;
  int64_t items_per_group;  // packs (kPlanes) or rows (kRows) one channel group holds
  int64_t min_items_per_block;
  if (info.layout == Layout::kPlanes) {
    geo.inner_packs = info.inner / vec;
    geo.values_per_channel = info.outer * info.inner;
    geo.lanes = kBlockThreads;
    geo.rows_per_block = 1;
    geo.tile_width = 1;
    geo.channel_groups = info.channels;
    items_per_group = info.outer * geo.inner_packs;
    min_items_per_block = static_cast<int64_t>(kBlockThreads) * kUnroll * 2;
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
    min_items_per_block = static_cast<int64_t>(geo.rows_per_block) * kUnroll * 2;
  }
  const int64_t target_blocks =
      4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  int64_t splits = std::min(ceil_div(target_blocks, std::max<int64_t>(geo.channel_groups, 1)),
                            ceil_div(items_per_group, min_items_per_block));
  geo.splits = static_cast<int>(std::clamp<int64_t>(splits, 1, kMaxSplits));
  if (info.layout == Layout::kPlanes && geo.inner_packs > 0) {
    const int64_t stride = static_cast<int64_t>(geo.splits) * kBlockThreads;
    geo.step_outer = stride / geo.inner_packs;
    geo.step_inner = stride % geo.inner_packs;
  }
  return geo;
}

inline dim3 block_shape(const Geometry& geo, Layout layout) {
  return layout == Layout::kRows ? dim3(geo.lanes, geo.rows_per_block) : dim3(kBlockThreads);
}

inline dim3 grid_shape(const Geometry& geo) {
  return dim3(static_cast<unsigned>(geo.channel_groups), static_cast<unsigned>(geo.splits));
}

}  // namespace cmbn
