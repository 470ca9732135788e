#pragma once
// Emulated stand-in for torch's header: the current stream and device properties the launchers ask for.
#include <ATen/ATen.h>

namespace at::cuda {

struct EmulatedDeviceProperties {
  int multiProcessorCount;
  int cooperativeLaunch;  // cudaLaunchCooperativeKernel is emulated
  char name[256];
  int major;  // compute capability: an H100's, as the SM count
  int minor;
};

inline EmulatedDeviceProperties* getCurrentDeviceProperties() {
  static EmulatedDeviceProperties properties{cmbn_emu::multiprocessor_count(), 1, "emulated GPU", 9, 0};
  return &properties;
}

// Every emulated device has the same properties.
inline EmulatedDeviceProperties* getDeviceProperties(c10::DeviceIndex) {
  return getCurrentDeviceProperties();
}

inline cudaStream_t getCurrentCUDAStream() { return nullptr; }

}  // namespace at::cuda
