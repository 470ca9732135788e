// Registers the CUDA kernels under the schemas that cmbn_ext/ops.py defines (never defined again here).
// Each op runs its kernels where the library holds a kernel image for the tensors' GPU; on a GPU it
// was not built for, the pure-PyTorch reference that ops.py registers as cmbn_ext_reference::<op>,
// with one warning per device (kernel_image.cpp). The check is one atomic load per call.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "cmbn_cuda.h"
#include "kernel_image.h"
#include "train_forward.h"

namespace cmbn {
namespace {

template <const char* Reference, auto Kernel>
struct OrReference;

template <const char* Reference, typename R, typename... Args, R (*Kernel)(Args...)>
struct OrReference<Reference, Kernel> {
  static R call(Args... args) {
    // Every op's first argument is a tensor on the device it runs on.
    if (C10_LIKELY(kernels_serve(std::get<0>(std::forward_as_tuple(args...))))) {
      return Kernel(std::forward<Args>(args)...);
    }
    static const auto reference =
        c10::Dispatcher::singleton().findSchemaOrThrow(Reference, "").template typed<R(Args...)>();
    return reference.call(std::forward<Args>(args)...);
  }
};

constexpr char kForward[] = "cmbn_ext_reference::cmbn_forward";
constexpr char kBackward[] = "cmbn_ext_reference::cmbn_backward";
constexpr char kBatchStats[] = "cmbn_ext_reference::cmbn_batch_stats";
constexpr char kPooledForward[] = "cmbn_ext_reference::cmbn_pooled_forward";
constexpr char kBackwardSums[] = "cmbn_ext_reference::cmbn_backward_sums";
constexpr char kBackwardDx[] = "cmbn_ext_reference::cmbn_backward_dx";
constexpr char kUpdateState[] = "cmbn_ext_reference::cmbn_update_state";
constexpr char kTrainForward[] = "cmbn_ext_reference::cmbn_train_forward";

}  // namespace

TORCH_LIBRARY_IMPL(cmbn_ext, CUDA, m) {
  m.impl("cmbn_forward", TORCH_FN((OrReference<kForward, &cmbn_forward_cuda>::call)));
  m.impl("cmbn_backward", TORCH_FN((OrReference<kBackward, &cmbn_backward_cuda>::call)));
  m.impl("cmbn_batch_stats", TORCH_FN((OrReference<kBatchStats, &cmbn_batch_stats_cuda>::call)));
  m.impl("cmbn_pooled_forward",
         TORCH_FN((OrReference<kPooledForward, &cmbn_pooled_forward_cuda>::call)));
  m.impl("cmbn_backward_sums",
         TORCH_FN((OrReference<kBackwardSums, &cmbn_backward_sums_cuda>::call)));
  m.impl("cmbn_backward_dx", TORCH_FN((OrReference<kBackwardDx, &cmbn_backward_dx_cuda>::call)));
  m.impl("cmbn_update_state", TORCH_FN((OrReference<kUpdateState, &cmbn_update_state_cuda>::call)));
  m.impl("cmbn_train_forward",
         TORCH_FN((OrReference<kTrainForward, &train_forward<&cmbn_forward_cuda,
                                                             &cmbn_update_state_host_count_cuda>>::call)));
  m.impl("cmbn_kernel_plan", TORCH_FN(cmbn_kernel_plan_cuda));
  m.impl("cmbn_kernel_image", TORCH_FN(cmbn_kernel_image_cuda));
}

}  // namespace cmbn
