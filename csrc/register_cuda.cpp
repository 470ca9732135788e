// Registers the CUDA kernels under the schemas that cmbn_ext/ops.py defines (never defined again here).
#include <torch/library.h>

#include "cmbn_cuda.h"

TORCH_LIBRARY_IMPL(cmbn_ext, CUDA, m) {
  m.impl("cmbn_forward", TORCH_FN(cmbn::cmbn_forward_cuda));
  m.impl("cmbn_backward", TORCH_FN(cmbn::cmbn_backward_cuda));
  m.impl("cmbn_batch_stats", TORCH_FN(cmbn::cmbn_batch_stats_cuda));
  m.impl("cmbn_pooled_forward", TORCH_FN(cmbn::cmbn_pooled_forward_cuda));
  m.impl("cmbn_backward_sums", TORCH_FN(cmbn::cmbn_backward_sums_cuda));
  m.impl("cmbn_backward_dx", TORCH_FN(cmbn::cmbn_backward_dx_cuda));
  m.impl("cmbn_update_state", TORCH_FN(cmbn::cmbn_update_state_cuda));
  m.impl("cmbn_train_forward", TORCH_FN(cmbn::cmbn_train_forward_cuda));
  m.impl("cmbn_kernel_plan", TORCH_FN(cmbn::cmbn_kernel_plan_cuda));
}
