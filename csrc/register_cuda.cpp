// Registers the CUDA kernels under the schemas that cmbn_ext/ops.py defines (never defined again here).
#include <torch/library.h>

#include "cmbn_cuda.h"

TORCH_LIBRARY_IMPL(cmbn_ext, CUDA, m) {
  m.impl("cmbn_forward", TORCH_FN(cmbn::cmbn_forward_cuda));
  m.impl("cmbn_backward", TORCH_FN(cmbn::cmbn_backward_cuda));
}
