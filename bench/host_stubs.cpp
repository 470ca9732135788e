// Trivial CPU bodies for bench/host_overhead.py's CPU proxy: the ops a training step of
// CrossMiniBatchNorm2d (either path: cmbn_train_forward, or cmbn_forward and cmbn_update_state) and
// of torch.nn.BatchNorm2d calls return outputs of the right shapes without
// computing them, so that what is timed is the host path alone (Python, dispatch, autograd,
// allocation), as on a GPU where the arithmetic runs asynchronously. Loaded only by that benchmark:
// registered last, it overrides the CPU kernels of the whole process (the pure-PyTorch ones of
// cmbn_ext/ops.py, those of cmbn_ext._C, ATen's). Each stub counts its calls
// (torch.ops.cmbn_host_stubs.calls(name)), so the benchmark can check that the stubs, not the real
// kernels, ran.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

namespace {

using at::Tensor;
using Six = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

constexpr std::array<std::string_view, 6> kStubbed = {
    "cmbn_train_forward", "cmbn_forward", "cmbn_update_state", "cmbn_backward",
    "native_batch_norm", "native_batch_norm_backward"};
std::array<int64_t, kStubbed.size()> calls{};  // the benchmark runs on one thread

constexpr size_t stub_index(std::string_view name) {
  for (size_t i = 0; i < kStubbed.size(); ++i) {
    if (kStubbed[i] == name) return i;
  }
  return kStubbed.size();
}

template <size_t Index>
void count() {
  static_assert(Index < kStubbed.size());
  ++calls[Index];
}

int64_t stub_calls(std::string_view name) {
  const size_t i = stub_index(name);
  TORCH_CHECK(i < kStubbed.size(), "cmbn_host_stubs.calls: no stub named '", name, "'");
  return calls[i];
}

Tensor channel_stats(const Tensor& x) {
  const auto dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({x.size(1)}, x.options().dtype(dtype));
}

Six train_forward(const Tensor& x, const std::optional<Tensor>&, const std::optional<Tensor>&,
                  Tensor&, Tensor&, Tensor&, Tensor&, const std::optional<Tensor>&,
                  const std::optional<Tensor>&, const std::optional<Tensor>&, double,
                  std::optional<double>, bool, std::string_view, std::optional<int64_t>,
                  std::optional<double>, bool, int64_t, double, bool) {
  count<stub_index("cmbn_train_forward")>();
  return {at::empty_like(x), channel_stats(x), channel_stats(x), channel_stats(x),
          channel_stats(x), channel_stats(x)};
}

Six forward(const Tensor& x, const std::optional<Tensor>&, const std::optional<Tensor>&,
            const Tensor&, const Tensor&, const Tensor&, double, std::optional<double>, bool, int64_t,
            double) {
  count<stub_index("cmbn_forward")>();
  return {at::empty_like(x), channel_stats(x), channel_stats(x), channel_stats(x),
          channel_stats(x), channel_stats(x)};
}

void update_state(Tensor&, Tensor&, Tensor&, Tensor&, const std::optional<Tensor>&,
                  const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                  const Tensor&, const Tensor&, const Tensor&, std::string_view,
                  std::optional<int64_t>, std::optional<double>, bool) {
  count<stub_index("cmbn_update_state")>();
}

std::tuple<Tensor, Tensor, Tensor> cmbn_backward(const Tensor& grad_y, const Tensor& x,
                                                 const std::optional<Tensor>&, const Tensor& mean,
                                                 const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, double, bool,
                                                 const std::optional<Tensor>&, int64_t, double, bool) {
  count<stub_index("cmbn_backward")>();
  return {at::empty_like(x), at::empty_like(mean), at::empty_like(mean)};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm(const Tensor& x, const std::optional<Tensor>&,
                                              const std::optional<Tensor>&,
                                              const std::optional<Tensor>&,
                                              const std::optional<Tensor>&, bool, double, double) {
  count<stub_index("native_batch_norm")>();
  return {at::empty_like(x), channel_stats(x), channel_stats(x)};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(
    const Tensor& grad_out, const Tensor& x, const std::optional<Tensor>& weight,
    const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, bool, double, std::array<bool, 3>) {
  count<stub_index("native_batch_norm_backward")>();
  return {at::empty_like(x), at::empty_like(*weight), at::empty_like(*weight)};
}

}  // namespace

TORCH_LIBRARY(cmbn_host_stubs, m) {
  m.def("calls(str name) -> int", &stub_calls);
}

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
