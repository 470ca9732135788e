#pragma once
// Emulated stand-in for torch's header: a runtime call that returns an error throws, as in torch; an
// emulated launch throws its own errors, and a failed cooperative launch leaves its error for the
// next cudaGetLastError(), as CUDA does.
#include <stdexcept>
#include <string>

#define C10_CUDA_CHECK(EXPR)                                                                 \
  do {                                                                                       \
    const cudaError_t cmbn_emu_error = (EXPR);                                               \
    if (cmbn_emu_error != cudaSuccess) {                                                     \
      throw std::runtime_error(std::string("CUDA error: ") +                                 \
                               cudaGetErrorString(cmbn_emu_error));                          \
    }                                                                                        \
  } while (false)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
