// Trivial CPU bodies for bench/host_overhead.py's CPU proxy: the ops a training step of
// CrossMiniBatchNorm2d (either path: cmbn_train_forward, or cmbn_forward and cmbn_update_state) and
// of torch.nn.BatchNorm2d calls return outputs of the right shapes without
// computing them, so that what is timed is the host path alone (Python, dispatch, autograd,
// allocation), as on a GPU where the arithmetic runs asynchronously. Loaded only by that benchmark:
// it overrides real kernels for the whole process.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace {

using at::Tensor;
using Six = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Tensor channel_stats(const Tensor& x) {
  const auto dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({x.size(1)}, x.options().dtype(dtype));
}

Six train_forward(const Tensor& x, const std::optional<Tensor>&, const std::optional<Tensor>&,
                  Tensor&, Tensor&, Tensor&, Tensor&, const std::optional<Tensor>&,
                  const std::optional<Tensor>&, const std::optional<Tensor>&, double,
                  std::optional<double>, bool, std::string_view, std::optional<int64_t>,
                  std::optional<double>, bool) {
  return {at::empty_like(x), channel_stats(x), channel_stats(x), channel_stats(x),
          channel_stats(x), channel_stats(x)};
}

Six forward(const Tensor& x, const std::optional<Tensor>&, const std::optional<Tensor>&,
            const Tensor&, const Tensor&, const Tensor&, double, std::optional<double>, bool) {
  return {at::empty_like(x), channel_stats(x), channel_stats(x), channel_stats(x),
          channel_stats(x), channel_stats(x)};
}

void update_state(Tensor&, Tensor&, Tensor&, Tensor&, const std::optional<Tensor>&,
                  const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                  const Tensor&, const Tensor&, const Tensor&, std::string_view,
                  std::optional<int64_t>, std::optional<double>, bool) {}

std::tuple<Tensor, Tensor, Tensor> cmbn_backward(const Tensor& grad_y, const Tensor& x,
                                                 const std::optional<Tensor>&, const Tensor& mean,
                                                 const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, double, bool) {
  return {at::empty_like(x), at::empty_like(mean), at::empty_like(mean)};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm(const Tensor& x, const std::optional<Tensor>&,
                                              const std::optional<Tensor>&,
                                              const std::optional<Tensor>&,
                                              const std::optional<Tensor>&, bool, double, double) {
  return {at::empty_like(x), channel_stats(x), channel_stats(x)};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(
    const Tensor& grad_out, const Tensor& x, const std::optional<Tensor>& weight,
    const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, bool, double, std::array<bool, 3>) {
  return {at::empty_like(x), at::empty_like(*weight), at::empty_like(*weight)};
}

}  // namespace

TORCH_LIBRARY_IMPL(cmbn_ext, CPU, m) {
  m.impl("cmbn_train_forward", TORCH_FN(train_forward));
  m.impl("cmbn_forward", TORCH_FN(forward));
  m.impl("cmbn_update_state", TORCH_FN(update_state));
  m.impl("cmbn_backward", TORCH_FN(cmbn_backward));
}

TORCH_LIBRARY_IMPL(aten, CPU, m) {
  m.impl("native_batch_norm", TORCH_FN(batch_norm));
  m.impl("native_batch_norm_backward", TORCH_FN(batch_norm_backward));
}
