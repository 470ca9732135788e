#pragma once
// Shared pieces of the CPU kernels: the count check, per-channel vectors in the statistics' dtype,
// how the row layout is chunked, what one call of the vectorized loops (cpu_loops.h) reads and
// writes, and which build of those loops runs. The checks and layouts the CUDA kernels share are in
// op_checks.h and work_tensors.h.
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
#include "op_checks.h"
#include "work_tensors.h"

namespace cmbn {
namespace cpu {

// Statistics and arithmetic run in fp64 for fp64 input, in fp32 for everything else (SPEC section 3).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ---------------------------------------------------------------------------------------------------
// Argument checks

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

template <typename acc_t>
const acc_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// ---------------------------------------------------------------------------------------------------
// Row chunks

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
  LayoutInfo info;
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
  LayoutInfo info;
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
