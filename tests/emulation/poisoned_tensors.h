#pragma once
// Force-included after cuda_runtime.h: the tensors the launchers allocate (outputs and workspaces)
// start as 0xFF bytes, NaN in every float dtype and -1 in int64, so an element a kernel never writes
// fails the comparison with the reference. Each lies between two guard zones of 0xFF bytes that
// every launch must leave untouched (cuda_runtime.h checks them). translate.py wraps each at::empty
// / at::empty_like in poisoned().
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

namespace cmbn_emu {

inline at::Tensor poisoned(const at::Tensor& t) {
  const size_t bytes = t.defined() ? t.storage().nbytes() : 0;
  if (bytes == 0) return t;
  // The same sizes and strides (and storage offset 0, as the fake tensors have) in memory of our own
  // with the guard zones around it.
  const size_t total = (bytes + 2 * kGuardBytes + 63) / 64 * 64;
  auto* base = static_cast<unsigned char*>(std::aligned_alloc(64, total));
  if (base == nullptr) throw std::bad_alloc();
  std::memset(base, 0xFF, total);
  unsigned char* data = base + kGuardBytes;
  {
    std::lock_guard<std::mutex> lock(guard_mutex());
    guarded_tensors()[data] = bytes;
  }
  const auto release = [data](void*) {
    {
      std::lock_guard<std::mutex> lock(guard_mutex());
      guarded_tensors().erase(data);
    }
    std::free(data - kGuardBytes);
  };
  return at::from_blob(data, t.sizes(), t.strides(), release, t.options());
}

}  // namespace cmbn_emu
