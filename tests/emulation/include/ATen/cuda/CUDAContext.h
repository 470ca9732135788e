#pragma once
// Emulated stand-in for torch's header: the current stream and device properties the launchers ask for.
#include <ATen/ATen.h>

namespace at::cuda {

struct EmulatedDeviceProperties {
  int multiProcessorCount;
  int cooperativeLaunch;  // cudaLaunchCooperativeKernel is emulated
};

inline EmulatedDeviceProperties* getCurrentDeviceProperties() {
  static EmulatedDeviceProperties properties{cmbn_emu::multiprocessor_count(), 1};
  return &properties;
}

inline cudaStream_t getCurrentCUDAStream() { return nullptr; }

}  // namespace at::cuda
