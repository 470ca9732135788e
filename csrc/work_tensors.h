#pragma once
// The layout of a tensor (layout.h) and the tensors a kernel reads and writes, so that it never meets
// a layout or dtype it does not expect: both kernel families (cpu/, cuda/) call these before any work.
#include <ATen/ATen.h>

#include <optional>

#include "layout.h"

namespace cmbn {

// The layout the kernels can read `x` in without a copy, or nullopt (then the caller copies). Reads
// sizes and strides only: no dispatch, which a small CPU call would feel.
inline std::optional<LayoutInfo> describe_layout(const at::Tensor& x) {
  const int64_t batch = x.size(0);
  const int64_t channels = x.size(1);
  int64_t inner = 1;
  for (int64_t d = 2; d < x.dim(); ++d) inner *= x.size(d);
  if (x.is_contiguous()) {
    // One value per plane (or nothing at all): channels are innermost, which the row walks read
    // best.
    if (inner <= 1 || x.numel() == 0) return LayoutInfo{Layout::kRows, batch * inner, channels, 1};
    return LayoutInfo{Layout::kPlanes, batch, channels, inner};
  }
  // channels_last, channels_last_3d, or any (N, *, C) storage of an (N, C, *) tensor: dense in the
  // order C, then the spatial dimensions from the last, then N (a dimension of one value may have
  // any stride).
  int64_t expected = 1;
  const auto dense = [&](int64_t d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
    return true;
  };
  bool rows = dense(1);
  for (int64_t d = x.dim() - 1; rows && d >= 2; --d) rows = dense(d);
  if (rows && dense(0)) return LayoutInfo{Layout::kRows, batch * inner, channels, 1};
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

// `t` in the dtype and layout of `like`: `t` itself when it already is, else a copy.
inline at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.scalar_type() == like.scalar_type() && same_layout(t, like)) return t;
  at::Tensor copy = at::empty_like(like);
  copy.copy_(t);
  return copy;
}

// `t` as contiguous values of `dtype`: `t` itself when it already is (the common case costs no
// dispatch, which `t.to(dtype)` always does), else a converted copy (a few values per channel).
inline at::Tensor as_dtype_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.to(dtype).contiguous();
}

inline at::Tensor optional_as_dtype(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return as_dtype_contiguous(*t, dtype);
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

}  // namespace cmbn
