// The CmBN backward family on the CPU (SPEC section 4, reference.backward):
//   cmbn_backward:      the per-channel sums sum(dy) and sum(dy * (x - batch_mean)) in one pass over x
//                       and dy, then dx = coef_dy * dy + coef_xc * (x - batch_mean) + const for either
//                       gradient, and grad_weight, grad_bias;
//   cmbn_backward_sums: the two sums alone;
//   cmbn_backward_dx:   dx alone, from sums the caller gives (all-reduced across processes).
// Contiguous planes are spread over threads by channel, each channel's two passes back to back (the
// second reads it from the cache); rows of C channels are reduced in chunks of rows fixed by the
// shape, merged in chunk order, then dx is written row by row.
#include <ATen/Dispatch.h>

#include <cmath>

#include "cmbn_cpu.h"
#include "cpu_kernel_utils.h"

namespace cmbn {
namespace {

using namespace cmbn::cpu;

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
};

template <typename acc_t>
struct DxCoefficients {
  acc_t coef_dy, coef_xc, constant;
};

// reference.backward_dx's per-channel coefficients for channel c (and reference.parameter_grads),
// written in the reference's order of operations.
template <typename acc_t>
DxCoefficients<acc_t> dx_coefficients(const GradParams<acc_t>& p, int64_t c, acc_t sum_dy,
                                      acc_t sum_dy_xc) {
  const acc_t count = static_cast<acc_t>(p.count);
  const acc_t invstd = acc_t(1) / std::sqrt(p.var[c] + p.eps);
  const acc_t shift = p.batch_mean[c] - p.mean[c];  // pooled xhat = ((x - batch_mean) + shift) * invstd
  const acc_t sum_dy_xhat = invstd * (sum_dy_xc + shift * sum_dy);
  if (p.grad_weight != nullptr) {
    p.grad_weight[c] = sum_dy_xhat;
    p.grad_bias[c] = sum_dy;
  }
  DxCoefficients<acc_t> k;
  k.coef_dy = p.weight != nullptr ? invstd * p.weight[c] : invstd;
  if (p.exact) {
    // dx = invstd * (g - (b/m) sum(g) - xhat (b/m) sum(g * xhat))
    const acc_t b_over_m = p.current_weight[c] / count;
    k.coef_xc = -k.coef_dy * b_over_m * sum_dy_xhat * invstd;
    k.constant = -k.coef_dy * b_over_m * sum_dy + k.coef_xc * shift;
  } else {
    // dx = invstd * (g - sum(g)/m - xhat_b sum(g * xhat_b)/m), xhat_b = (x - batch_mean) * invstd_b
    k.coef_xc = -k.coef_dy * sum_dy_xc / (count * (p.batch_var[c] + p.eps));
    k.constant = -k.coef_dy * sum_dy / count;
  }
  return k;
}

// dx = (constant + (x - batch_mean) * coef_xc) + dy * coef_dy over n values.
template <typename scalar_t, typename acc_t>
void dx_span(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, acc_t batch_mean,
             const DxCoefficients<acc_t>& k) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const Vec vmean(batch_mean), vdy(k.coef_dy), vxc(k.coef_xc), vconst(k.constant);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    IO::store(dx + i, (vconst + (IO::load(x + i) - vmean) * vxc) + IO::load(dy + i) * vdy);
  }
  for (; i < n; ++i) {
    const acc_t centered = static_cast<acc_t>(x[i]) - batch_mean;
    dx[i] = static_cast<scalar_t>((k.constant + centered * k.coef_xc) +
                                  static_cast<acc_t>(dy[i]) * k.coef_dy);
  }
}

// sum(dy) and sum(dy * (x - batch_mean)) over spans of one channel, in a fixed order (see SpanSum).
template <typename scalar_t, typename acc_t>
struct GradSpanSums {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  static constexpr int64_t K = IO::kSize;
  static constexpr int64_t kFold = 4096;

  Vec dy0 = Vec(acc_t(0)), dy1 = Vec(acc_t(0)), xc0 = Vec(acc_t(0)), xc1 = Vec(acc_t(0));
  Vec outer_dy = Vec(acc_t(0)), outer_xc = Vec(acc_t(0));
  acc_t tail_dy = 0, tail_xc = 0, outer_tail_dy = 0, outer_tail_xc = 0;
  int64_t pending = 0;

  void add(const scalar_t* dy, const scalar_t* x, int64_t n, acc_t mean) {
    const Vec vmean(mean);
    int64_t i = 0;
    for (; i + 2 * K <= n; i += 2 * K) {
      const Vec g0 = IO::load(dy + i);
      const Vec g1 = IO::load(dy + i + K);
      dy0 += g0;
      dy1 += g1;
      xc0 += g0 * (IO::load(x + i) - vmean);
      xc1 += g1 * (IO::load(x + i + K) - vmean);
    }
    for (; i + K <= n; i += K) {
      const Vec g = IO::load(dy + i);
      dy0 += g;
      xc0 += g * (IO::load(x + i) - vmean);
    }
    for (; i < n; ++i) {
      const acc_t g = static_cast<acc_t>(dy[i]);
      tail_dy += g;
      tail_xc += g * (static_cast<acc_t>(x[i]) - mean);
    }
    pending += n;
    if (pending >= kFold) fold();
  }

  void fold() {
    outer_dy += dy0 + dy1;
    outer_xc += xc0 + xc1;
    dy0 = dy1 = xc0 = xc1 = Vec(acc_t(0));
    outer_tail_dy += tail_dy;
    outer_tail_xc += tail_xc;
    tail_dy = tail_xc = 0;
    pending = 0;
  }

  void result(acc_t& sum_dy, acc_t& sum_dy_xc) {
    fold();
    sum_dy = sum_lanes(outer_dy) + outer_tail_dy;
    sum_dy_xc = sum_lanes(outer_xc) + outer_tail_xc;
  }
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

template <typename scalar_t, typename acc_t>
void backward_planes(const BackwardCall<scalar_t, acc_t>& call) {
  const Layout& L = call.layout;
  const int64_t plane_stride = L.channels * L.inner;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L.values_per_channel(), 1));
  at::parallel_for(0, L.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const acc_t mean = call.batch_mean[c];
      acc_t sum_dy, sum_dy_xc;
      if (call.given_sum_dy != nullptr) {
        sum_dy = call.given_sum_dy[c];
        sum_dy_xc = call.given_sum_dy_xc[c];
      } else {
        GradSpanSums<scalar_t, acc_t> sums;
        for (int64_t n = 0; n < L.outer; ++n) {
          const int64_t offset = n * plane_stride + c * L.inner;
          sums.add(call.grad_y + offset, call.x + offset, L.inner, mean);
        }
        sums.result(sum_dy, sum_dy_xc);
        call.sum_dy[c] = sum_dy;
        call.sum_dy_xc[c] = sum_dy_xc;
      }
      if (call.params == nullptr) continue;
      const DxCoefficients<acc_t> k = dx_coefficients(*call.params, c, sum_dy, sum_dy_xc);
      for (int64_t n = 0; n < L.outer; ++n) {
        const int64_t offset = n * plane_stride + c * L.inner;
        dx_span(call.grad_y + offset, call.x + offset, call.grad_x + offset, L.inner, mean, k);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_rows(const BackwardCall<scalar_t, acc_t>& call) {
  using IO = VecIO<scalar_t, acc_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t K = IO::kSize;
  const Layout& L = call.layout;
  const int64_t C = L.channels;
  const int64_t rows = L.outer;
  const acc_t* bm = call.batch_mean;
  const acc_t* sum_dy = call.given_sum_dy;
  const acc_t* sum_dy_xc = call.given_sum_dy_xc;
  if (sum_dy == nullptr) {
    // Chunks of rows into their own partial sums (chunks x 2C), then merged in chunk order.
    const int64_t chunk_rows = rows_per_chunk(rows);
    const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
    std::vector<acc_t> partial(static_cast<size_t>(chunks * 2 * C));
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        acc_t* acc_dy = partial.data() + k * 2 * C;
        acc_t* acc_xc = acc_dy + C;
        std::fill(acc_dy, acc_dy + 2 * C, acc_t(0));
        const int64_t row_end = std::min(rows, (k + 1) * chunk_rows);
        for (int64_t r = k * chunk_rows; r < row_end; ++r) {
          const scalar_t* g = call.grad_y + r * C;
          const scalar_t* xr = call.x + r * C;
          int64_t c = 0;
          for (; c + K <= C; c += K) {
            const Vec vg = IO::load(g + c);
            (Vec::loadu(acc_dy + c) + vg).store(acc_dy + c);
            (Vec::loadu(acc_xc + c) + vg * (IO::load(xr + c) - Vec::loadu(bm + c))).store(acc_xc + c);
          }
          for (; c < C; ++c) {
            const acc_t vg = static_cast<acc_t>(g[c]);
            acc_dy[c] += vg;
            acc_xc[c] += vg * (static_cast<acc_t>(xr[c]) - bm[c]);
          }
        }
      }
    });
    // The chunks' sums added in chunk order, in fp64 (see forward.cpp's row_sums).
    for (int64_t c = 0; c < C; ++c) {
      double total_dy = 0, total_xc = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        total_dy += static_cast<double>(partial[k * 2 * C + c]);
        total_xc += static_cast<double>(partial[k * 2 * C + C + c]);
      }
      call.sum_dy[c] = static_cast<acc_t>(total_dy);
      call.sum_dy_xc[c] = static_cast<acc_t>(total_xc);
    }
    sum_dy = call.sum_dy;
    sum_dy_xc = call.sum_dy_xc;
  }
  if (call.params == nullptr) return;
  std::vector<acc_t> coefficients(static_cast<size_t>(3 * C));
  acc_t* coef_dy = coefficients.data();
  acc_t* coef_xc = coef_dy + C;
  acc_t* constant = coef_xc + C;
  for (int64_t c = 0; c < C; ++c) {
    const DxCoefficients<acc_t> k = dx_coefficients(*call.params, c, sum_dy[c], sum_dy_xc[c]);
    coef_dy[c] = k.coef_dy;
    coef_xc[c] = k.coef_xc;
    constant[c] = k.constant;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = call.grad_y + r * C;
      const scalar_t* xr = call.x + r * C;
      scalar_t* out = call.grad_x + r * C;
      int64_t c = 0;
      for (; c + K <= C; c += K) {
        const Vec centered = IO::load(xr + c) - Vec::loadu(bm + c);
        IO::store(out + c, (Vec::loadu(constant + c) + centered * Vec::loadu(coef_xc + c)) +
                               IO::load(g + c) * Vec::loadu(coef_dy + c));
      }
      for (; c < C; ++c) {
        const acc_t centered = static_cast<acc_t>(xr[c]) - bm[c];
        out[c] = static_cast<scalar_t>((constant[c] + centered * coef_xc[c]) +
                                       static_cast<acc_t>(g[c]) * coef_dy[c]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void run_backward(const BackwardCall<scalar_t, acc_t>& call) {
  if (call.layout.rows) {
    backward_rows(call);
  } else {
    backward_planes(call);
  }
}

// The statistics saved by the forward, in the statistics' dtype and contiguous (kept alive for the
// call; no copies for the tensors the forward returns).
struct SavedStatistics {
  at::Tensor weight, mean, var, batch_mean, batch_var, b;
};

SavedStatistics saved_statistics(const char* op, const at::Tensor& x,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& var, const at::Tensor& batch_mean,
                                 const at::Tensor& batch_var, const at::Tensor& b) {
  check_optional_channel_vector(op, weight, "weight", x);
  check_channel_vector(op, mean, "mean", x);
  check_channel_vector(op, var, "var", x);
  check_channel_vector(op, batch_mean, "batch_mean", x);
  check_channel_vector(op, batch_var, "batch_var", x);
  check_channel_vector(op, b, "b", x);
  const at::ScalarType dtype = stats_dtype(x.scalar_type());
  return SavedStatistics{optional_as_dtype(weight, dtype),          as_dtype_contiguous(mean, dtype),
                         as_dtype_contiguous(var, dtype),           as_dtype_contiguous(batch_mean, dtype),
                         as_dtype_contiguous(batch_var, dtype),     as_dtype_contiguous(b, dtype)};
}

template <typename acc_t>
GradParams<acc_t> grad_params(const SavedStatistics& saved, double eps, bool exact, int64_t count) {
  GradParams<acc_t> p{};
  p.weight = data_or_null<acc_t>(saved.weight);
  p.mean = saved.mean.const_data_ptr<acc_t>();
  p.var = saved.var.const_data_ptr<acc_t>();
  p.batch_mean = saved.batch_mean.const_data_ptr<acc_t>();
  p.batch_var = saved.batch_var.const_data_ptr<acc_t>();
  p.current_weight = saved.b.const_data_ptr<acc_t>();
  p.eps = static_cast<acc_t>(eps);
  p.exact = exact;
  p.count = count;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmbn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, const at::Tensor& b, double eps, bool exact_grad) {
  const char* op = "cmbn_backward";
  check_input(op, x, "x");
  check_grad_y(op, grad_y, x);
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have the dtype of x (",
              x.scalar_type(), "), got ", grad_y.scalar_type());
  const SavedStatistics saved = saved_statistics(op, x, weight, mean, var, batch_mean, batch_var, b);

  const int64_t channels = x.size(1);
  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty({channels}, x.options().dtype(acc_dtype));
  at::Tensor grad_bias = at::empty({channels}, x.options().dtype(acc_dtype));
  if (channels > 0) {
    // x and grad_y are read in grad_x's layout (x's own when x is dense): a grad_y in another
    // memory format (or expanded, as from y.sum()) is copied into it first.
    const WorkTensors work = work_tensors(x, grad_x);
    const at::Tensor grad_y_work = with_layout_of(grad_y, work.out);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_backward_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      GradParams<acc_t> params =
          grad_params<acc_t>(saved, eps, exact_grad, work.layout.values_per_channel());
      params.grad_weight = grad_weight.mutable_data_ptr<acc_t>();
      params.grad_bias = grad_bias.mutable_data_ptr<acc_t>();
      // The sums land in the parameter gradients' buffers first; dx_coefficients then overwrites
      // each channel's with its gradient after reading it.
      BackwardCall<scalar_t, acc_t> call{};
      call.layout = work.layout;
      call.grad_y = grad_y_work.const_data_ptr<scalar_t>();
      call.x = work.x.const_data_ptr<scalar_t>();
      call.grad_x = work.out.mutable_data_ptr<scalar_t>();
      call.batch_mean = saved.batch_mean.const_data_ptr<acc_t>();
      call.sum_dy = params.grad_bias;
      call.sum_dy_xc = params.grad_weight;
      call.params = &params;
      run_backward(call);
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

std::tuple<at::Tensor, at::Tensor> cmbn_backward_sums_cpu(const at::Tensor& grad_y,
                                                          const at::Tensor& x,
                                                          const at::Tensor& batch_mean) {
  const char* op = "cmbn_backward_sums";
  check_input(op, x, "x");
  check_grad_y(op, grad_y, x);
  check_channel_vector(op, batch_mean, "batch_mean", x);
  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  const int64_t channels = x.size(1);
  at::Tensor sum_dy = at::empty({channels}, x.options().dtype(acc_dtype));
  at::Tensor sum_dy_xc = at::empty({channels}, x.options().dtype(acc_dtype));
  if (channels == 0) return {sum_dy, sum_dy_xc};

  const at::Tensor batch_mean_c = as_dtype_contiguous(batch_mean, acc_dtype);
  const ReadableTensor readable_x = readable(x);
  // grad_y is read in x's dtype and layout, as the reference reads it.
  const at::Tensor grad_y_work = with_layout_of(grad_y, readable_x.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_backward_sums_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    BackwardCall<scalar_t, acc_t> call{};
    call.layout = readable_x.layout;
    call.grad_y = grad_y_work.const_data_ptr<scalar_t>();
    call.x = readable_x.x.const_data_ptr<scalar_t>();
    call.batch_mean = batch_mean_c.const_data_ptr<acc_t>();
    call.sum_dy = sum_dy.mutable_data_ptr<acc_t>();
    call.sum_dy_xc = sum_dy_xc.mutable_data_ptr<acc_t>();
    run_backward(call);
  });
  return {sum_dy, sum_dy_xc};
}

at::Tensor cmbn_backward_dx_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& var, const at::Tensor& batch_mean,
                                const at::Tensor& batch_var, const at::Tensor& b,
                                const at::Tensor& sum_dy, const at::Tensor& sum_dy_xc,
                                const at::Tensor& count, double eps, bool exact_grad) {
  const char* op = "cmbn_backward_dx";
  check_input(op, x, "x");
  check_grad_y(op, grad_y, x);
  const SavedStatistics saved = saved_statistics(op, x, weight, mean, var, batch_mean, batch_var, b);
  check_channel_vector(op, sum_dy, "sum_dy", x);
  check_channel_vector(op, sum_dy_xc, "sum_dy_xc", x);
  const int64_t values = read_count(op, count);
  const at::ScalarType acc_dtype = stats_dtype(x.scalar_type());
  const at::Tensor sum_dy_c = as_dtype_contiguous(sum_dy, acc_dtype);
  const at::Tensor sum_dy_xc_c = as_dtype_contiguous(sum_dy_xc, acc_dtype);

  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return grad_x;
  const WorkTensors work = work_tensors(x, grad_x);
  const at::Tensor grad_y_work = with_layout_of(grad_y, work.out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmbn_backward_dx_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const GradParams<acc_t> params = grad_params<acc_t>(saved, eps, exact_grad, values);
    BackwardCall<scalar_t, acc_t> call{};
    call.layout = work.layout;
    call.grad_y = grad_y_work.const_data_ptr<scalar_t>();
    call.x = work.x.const_data_ptr<scalar_t>();
    call.grad_x = work.out.mutable_data_ptr<scalar_t>();
    call.batch_mean = saved.batch_mean.const_data_ptr<acc_t>();
    call.given_sum_dy = sum_dy_c.const_data_ptr<acc_t>();
    call.given_sum_dy_xc = sum_dy_xc_c.const_data_ptr<acc_t>();
    call.params = &params;
    run_backward(call);
  });
  if (!work.out.is_same(grad_x)) grad_x.copy_(work.out);
  return grad_x;
}

}  // namespace cmbn
