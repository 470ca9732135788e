// cmbn_ext::cmbn_kernel_plan: what the fused forward or backward launches for an input, so tests can
// assert which path ran and benchmarks can show it. The order of the integers is the one
// cmbn_ext/kernel_plan.py reads.
#include "cmbn_cuda.h"
#include "kernel_image.h"

namespace cmbn {

std::vector<int64_t> cmbn_kernel_plan_cuda(const at::Tensor& x, bool backward) {
  TORCH_CHECK(has_kernel_image(device_index(x)), "kernel_plan: the compiled CUDA kernels hold no "
              "kernel image for ", x.device(), ": its tensors take the pure-PyTorch path");
  const LaunchPlan plan = backward ? cmbn_backward_plan(x) : cmbn_forward_plan(x);
  const Geometry& geo = plan.geo;
  const bool single_read = plan.path == KernelPath::kSingleRead;
  const int64_t inputs_held = backward ? 2 : 1;  // x, and grad_y in the backward
  return {
      single_read ? 1 : 0,
      geo.channel_groups,
      geo.splits,
      kBlockThreads,
      single_read || geo.splits == 1 ? 1 : 2,  // launches
      single_read ? x.numel() * x.element_size() * inputs_held : 0,  // bytes held on chip
      plan.vec,
      static_cast<int64_t>(plan.layout),  // kPlanes, kRows, kPlanesMasked
      plan.resident_blocks,
      plan.cooperative ? 1 : 0,
  };
}

}  // namespace cmbn
