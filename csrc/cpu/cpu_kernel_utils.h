#pragma once
// Shared pieces of the CPU kernels: argument checks whose messages name the argument, how the values
// of x are laid out, per-channel vectors in the statistics' dtype, what one call of the vectorized
// loops (cpu_loops.h) reads and writes, and which build of those loops runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "activation.h"

namespace cmbn {
namespace cpu {

// Statistics and arithmetic run in fp64 for fp64 input, in fp32 for everything else (SPEC section 3).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

// ---------------------------------------------------------------------------------------------------
// Argument checks

inline void check_input(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 2, op, ": ", name, " must have shape (N, C, *), got ", x.dim(),
              " dimension(s)");
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
}

inline void check_same_device(const char* op, const at::Tensor& t, const char* name,
                              const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// A (C,) float vector on x's device (a statistic, a sum, or weight/bias).
inline void check_channel_vector(const char* op, const at::Tensor& t, const char* name,
                                 const at::Tensor& x) {
  check_same_device(op, t, name, x);
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, " must be a float tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape (C,) = (",
              x.size(1), ",), got ", t.sizes());
}

// weight and bias may be absent (affine=False).
inline void check_optional_channel_vector(const char* op, const std::optional<at::Tensor>& t,
                                          const char* name, const at::Tensor& x) {
  if (t.has_value() && t->defined()) check_channel_vector(op, *t, name, x);
}

inline void check_history(const char* op, const at::Tensor& x, const at::Tensor& count,
                          const at::Tensor& mean, const at::Tensor& var) {
  const int64_t channels = x.size(1);
  TORCH_CHECK(count.scalar_type() == at::kLong, op, ": history_count must be int64, got ",
              count.scalar_type());
  TORCH_CHECK(count.dim() == 2 && count.size(1) == channels, op,
              ": history_count must have shape (S, C) with C = ", channels, ", got ", count.sizes());
  const auto check_like_count = [&](const at::Tensor& t, const char* name) {
    check_same_device(op, t, name, x);
    TORCH_CHECK(t.sizes() == count.sizes(), op, ": ", name, " must have the shape of history_count ",
                count.sizes(), ", got ", t.sizes());
  };
  check_like_count(count, "history_count");
  check_like_count(mean, "history_mean");
  check_like_count(var, "history_var");
  TORCH_CHECK(is_supported_float(mean.scalar_type()), op,
              ": history_mean must be a float tensor, got ", mean.scalar_type());
  TORCH_CHECK(is_supported_float(var.scalar_type()), op,
              ": history_var must be a float tensor, got ", var.scalar_type());
}

inline void check_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x) {
  check_same_device(op, grad_y, "grad_y", x);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have the shape of x ", x.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK(is_supported_float(grad_y.scalar_type()), op, ": grad_y must be a float tensor, got ",
              grad_y.scalar_type());
}

// An activation code of activation.h (cmbn_ext/activations.py), and, when the backward reads the
// output (from_output), one whose output determines its input.
inline void check_activation(const char* op, int64_t activation, double activation_param,
                             bool from_output = false) {
  TORCH_CHECK(activation >= 0 && activation < kActivationCount, op,
              ": activation must be a code from 0 to ", kActivationCount - 1,
              " (cmbn_ext.activations: identity, relu, leaky_relu, elu, silu, mish, hardswish), got ",
              activation);
  TORCH_CHECK(!from_output || activation_invertible(activation, activation_param), op,
              ": from_output needs an invertible activation (identity, leaky_relu with a positive "
              "slope, elu with a positive alpha), got activation ", activation,
              " with activation_param ", activation_param);
}

// The value of a 0-dim (or one-element) int64 count: the whole group's values per channel.
inline int64_t read_count(const char* op, const at::Tensor& count) {
  TORCH_CHECK(count.scalar_type() == at::kLong, op, ": count must be int64, got ", count.scalar_type());
  TORCH_CHECK(count.numel() == 1, op, ": count must hold one value, got shape ", count.sizes());
  TORCH_CHECK(count.device().is_cpu(), op, ": count must be a CPU tensor, got one on ",
              count.device());
  return *count.const_data_ptr<int64_t>();
}

// ---------------------------------------------------------------------------------------------------
// Per-channel vectors

// `t` as contiguous values of `dtype`: `t` itself when it already is (the common case costs no
// dispatch), else a converted copy (a few values per channel).
inline at::Tensor as_dtype_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.to(dtype).contiguous();
}

inline at::Tensor optional_as_dtype(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return as_dtype_contiguous(*t, dtype);
}

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// ---------------------------------------------------------------------------------------------------
// Layout

// How x's values lie in memory: planes (N, C, inner) with inner > 1 contiguous, or rows of C channels
// (channels_last, channels_last_3d, (N, C), or planes of one value).
struct Layout {
  bool rows;
  int64_t outer;     // planes: N; rows: the number of rows
  int64_t channels;  // C
  int64_t inner;     // planes: values per plane; rows: 1
  int64_t values_per_channel() const { return outer * inner; }
};

inline std::optional<Layout> describe_layout(const at::Tensor& x) {
  const int64_t batch = x.size(0);
  const int64_t channels = x.size(1);
  int64_t inner = 1;
  for (int64_t d = 2; d < x.dim(); ++d) inner *= x.size(d);
  if (x.is_contiguous()) {
    if (inner <= 1 || x.numel() == 0) return Layout{true, batch * inner, channels, 1};
    return Layout{false, batch, channels, inner};
  }
  // channels_last, channels_last_3d, or any (N, *, C) storage of an (N, C, *) tensor.
  int64_t expected = 1;
  const auto dense = [&](int64_t d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
    return true;
  };
  bool rows = dense(1);
  for (int64_t d = x.dim() - 1; rows && d >= 2; --d) rows = dense(d);
  if (rows && dense(0)) return Layout{true, batch * inner, channels, 1};
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

// Where a kernel reads x and writes out (= empty_like(x)): out itself when its layout is one the
// kernels walk (x copied only if its strides differ), else contiguous scratch tensors whose result
// the caller copies into out afterwards.
struct WorkTensors {
  at::Tensor x;
  at::Tensor out;
  Layout layout;
};

inline WorkTensors work_tensors(const at::Tensor& x, const at::Tensor& out) {
  if (std::optional<Layout> layout = describe_layout(out)) {
    return WorkTensors{with_layout_of(x, out), out, *layout};
  }
  at::Tensor x_contiguous = x.contiguous();
  at::Tensor out_contiguous = at::empty_like(x_contiguous);
  return WorkTensors{x_contiguous, out_contiguous, *describe_layout(out_contiguous)};
}

// x itself when the kernels walk its layout, else a contiguous copy (for the ops that only reduce).
struct ReadableTensor {
  at::Tensor x;
  Layout layout;
};

inline ReadableTensor readable(const at::Tensor& x) {
  if (std::optional<Layout> layout = describe_layout(x)) return ReadableTensor{x, *layout};
  at::Tensor x_contiguous = x.contiguous();
  return ReadableTensor{x_contiguous, *describe_layout(x_contiguous)};
}

// Rows per chunk of the row layout's reductions: a function of the shape alone (never of the thread
// count), so every channel is summed in the same order however the chunks are spread over threads.
// At most kMaxRowChunks chunks, so the partial sums are a small per-channel buffer.
constexpr int64_t kMaxRowChunks = 64;

inline int64_t rows_per_chunk(int64_t rows) {
  return std::max<int64_t>(16, (rows + kMaxRowChunks - 1) / kMaxRowChunks);
}

// ---------------------------------------------------------------------------------------------------
// What one call of the loops reads and writes (raw pointers, per-channel values in the statistics'
// dtype)

// What the pooling of one call reads and writes, per channel.
template <typename acc_t>
struct Pooling {
  const int64_t* history_count;  // (S, C) contiguous
  const acc_t* history_mean;     // (S, C) contiguous, in the statistics' dtype
  const acc_t* history_var;
  int64_t slots;
  int64_t channels;
  bool has_ema;
  double ema_momentum;
  const acc_t* weight;  // null when absent
  const acc_t* bias;
  acc_t eps;
  acc_t* mean;  // outputs, (C,)
  acc_t* var;
  acc_t* current_weight;
};

// The work of one forward call. given_mean/given_var: the micro-batch's statistics come from the
// caller (cmbn_pooled_forward); else they are computed and written to batch_mean/batch_var.
// pooling null: the statistics alone (cmbn_batch_stats).
template <typename scalar_t, typename acc_t>
struct ForwardCall {
  Layout layout;
  const scalar_t* x;
  scalar_t* y;
  const acc_t* given_mean;
  const acc_t* given_var;
  acc_t* batch_mean;
  acc_t* batch_var;
  const Pooling<acc_t>* pooling;
  int64_t count;  // values per channel the statistics are over
  int64_t activation;       // activation.h's code, applied to y before the store (0: none)
  double activation_param;
};

// The statistics saved by the forward, per channel, in the statistics' dtype.
template <typename acc_t>
struct GradParams {
  const acc_t* weight;  // null when absent
  const acc_t* mean;
  const acc_t* var;
  const acc_t* batch_mean;
  const acc_t* batch_var;
  const acc_t* current_weight;
  acc_t eps;
  bool exact;
  int64_t count;        // values per channel the sums are over
  acc_t* grad_weight;   // null: not wanted
  acc_t* grad_bias;
  // The activation grad_y is the gradient of (activation.h's code; 0: none), and what the backward
  // reads as x: the input, or with from_output the output act(z), from which z and the normalized
  // input are recovered. bias: null when absent.
  const acc_t* bias;
  int64_t activation;
  double activation_param;
  bool from_output;
};

// The work of one backward call. given_sum_dy/given_sum_dy_xc: the sums come from the caller
// (cmbn_backward_dx); else they are computed and written to sum_dy/sum_dy_xc. params null: the sums
// alone (cmbn_backward_sums).
template <typename scalar_t, typename acc_t>
struct BackwardCall {
  Layout layout;
  const scalar_t* grad_y;  // in x's layout
  const scalar_t* x;
  scalar_t* grad_x;
  const acc_t* batch_mean;
  const acc_t* given_sum_dy;
  const acc_t* given_sum_dy_xc;
  acc_t* sum_dy;  // null when given
  acc_t* sum_dy_xc;
  const GradParams<acc_t>* params;
};

// ---------------------------------------------------------------------------------------------------
// Which build of the loops runs

// The loops of cpu_loops.h are compiled twice: `baseline` with the compiler's default flags (SSE2 on
// x86-64, where at::vec falls back to plain arrays and spills them), and `avx2` (cpu_loops_avx2.cpp,
// GCC on x86-64 only) with at::vec's AVX2 vectors. Neither uses FMA, and both add in the same order,
// so they give the same bits, but for the exp, log1p and tanh of the ELU, SiLU and Mish activations
// (libm's lane by lane in one, SLEEF's in the other: the last bit may differ).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CMBN_CPU_AVX2_LOOPS 1
#endif

namespace baseline {
template <typename scalar_t, typename acc_t>
void run_forward(const ForwardCall<scalar_t, acc_t>& call);
template <typename scalar_t, typename acc_t>
void run_backward(const BackwardCall<scalar_t, acc_t>& call);
}  // namespace baseline

namespace avx2 {
template <typename scalar_t, typename acc_t>
void run_forward(const ForwardCall<scalar_t, acc_t>& call);
template <typename scalar_t, typename acc_t>
void run_backward(const BackwardCall<scalar_t, acc_t>& call);
}  // namespace avx2

// True when this CPU runs the avx2 loops; ATEN_CPU_CAPABILITY=default (torch's own switch) picks the
// baseline ones, as it does for torch's kernels.
inline bool use_avx2_loops() {
#ifdef CMBN_CPU_AVX2_LOOPS
  static const bool avx2 = [] {
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
    if (forced != nullptr && std::strcmp(forced, "default") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return avx2;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace cmbn
