// The per-device answer to "does the loaded library hold a kernel image for this GPU", and the warning
// a GPU without one gets once.
#include "kernel_image.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <string>
#include <string_view>

#include "host_utils.h"

namespace cmbn {

bool has_kernel_image(c10::DeviceIndex index) {
  static PerDevice<bool> has_image;
  return has_image.get(index, [index] {
    const c10::cuda::CUDAGuard device_guard(c10::Device(c10::DeviceType::CUDA, index));
    const cudaError_t status = probe_kernel_image();
    if (status == cudaErrorInvalidDeviceFunction || status == cudaErrorNoKernelImageForDevice ||
        status == cudaErrorUnsupportedPtxVersion) {
      (void)cudaGetLastError();  // answered here: not an error for the next runtime call to find
      return false;
    }
    C10_CUDA_CHECK(status);
    return true;
  });
}

bool kernels_serve(const at::Tensor& t) {
  const c10::DeviceIndex index = device_index(t);
  if (C10_LIKELY(has_kernel_image(index))) return true;
  static std::array<std::atomic<bool>, PerDevice<bool>::kMaxDevices> warned{};
  if (!warned[index].exchange(true)) {
    const auto* properties = at::cuda::getDeviceProperties(index);
    const int major = properties->major;
    const int minor = properties->minor;
    const std::string message = c10::str(
        "cmbn_ext: the compiled CUDA kernels (cmbn_ext._C) hold no kernel image for cuda:", int(index),
        " (", properties->name, ", compute capability ", major, ".", minor,
        "): they were built for other GPU architectures. CUDA tensors on this device use the "
        "pure-PyTorch implementation, which is slower. To compile the kernels for it, rebuild on a "
        "machine that sees this GPU with TORCH_CUDA_ARCH_LIST unset, or with TORCH_CUDA_ARCH_LIST=\"",
        major, ".", minor,
        "\" pip install --no-build-isolation -e . (add the architectures of your other GPUs).");
    // Through cmbn_ext/ops.py, so that it is a Python warning (filters, warnings as errors).
    static const auto warn = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("cmbn_ext_reference::warn_no_kernel_image", "")
                                 .typed<void(const at::Tensor&, std::string_view)>();
    warn.call(t, message);
  }
  return false;
}

bool cmbn_kernel_image_cuda(const at::Tensor& x) { return has_kernel_image(device_index(x)); }

}  // namespace cmbn
