// Registers the CPU kernels under the schemas that cmbn_ext/ops.py defines (never defined again here).
// cmbn_ext/ops.py then leaves the CPU to them instead of the pure-PyTorch reference.
#include <torch/library.h>

#include "cmbn_cpu.h"
#include "train_forward.h"

TORCH_LIBRARY_IMPL(cmbn_ext, CPU, m) {
  m.impl("cmbn_forward", TORCH_FN(cmbn::cmbn_forward_cpu));
  m.impl("cmbn_backward", TORCH_FN(cmbn::cmbn_backward_cpu));
  m.impl("cmbn_batch_stats", TORCH_FN(cmbn::cmbn_batch_stats_cpu));
  m.impl("cmbn_pooled_forward", TORCH_FN(cmbn::cmbn_pooled_forward_cpu));
  m.impl("cmbn_backward_sums", TORCH_FN(cmbn::cmbn_backward_sums_cpu));
  m.impl("cmbn_backward_dx", TORCH_FN(cmbn::cmbn_backward_dx_cpu));
  m.impl("cmbn_update_state", TORCH_FN(cmbn::cmbn_update_state_cpu));
  m.impl("cmbn_train_forward",
         TORCH_FN((cmbn::train_forward<&cmbn::cmbn_forward_cpu,
                                       &cmbn::cmbn_update_state_host_count_cpu>)));
}
