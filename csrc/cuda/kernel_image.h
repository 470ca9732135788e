#pragma once
// Whether the loaded library holds a kernel image for a GPU: built for other architectures (and
// without PTX the GPU can compile), it has none, and its ops then serve that GPU's tensors with the
// pure-PyTorch reference instead of failing at the first launch (register_cuda.cpp).
#include <ATen/ATen.h>

#include <ATen/cuda/CUDAContext.h>

namespace cmbn {

// cudaFuncGetAttributes of one kernel of the library on the current device: every unit is compiled
// for the same architectures, so one kernel answers for all (update_state.cu).
cudaError_t probe_kernel_image();

// Whether the kernels run on device `index` (probed once per device).
bool has_kernel_image(c10::DeviceIndex index);

// The device of a tensor the CUDA ops serve (the emulation's CPU tensors stand for device 0).
inline c10::DeviceIndex device_index(const at::Tensor& t) {
  return t.device().has_index() ? t.device().index() : 0;
}

// has_kernel_image for t's device; false comes with one warning per device that says why and how to
// rebuild.
bool kernels_serve(const at::Tensor& t);

// cmbn_ext::cmbn_kernel_image: has_kernel_image for x's device, without the warning.
bool cmbn_kernel_image_cuda(const at::Tensor& x);

}  // namespace cmbn
