#pragma once
// The part of the CUDA runtime the kernels in csrc/ use, on the CPU: force-included (g++ -include)
// into every translated source. Each block runs alone, its threads as fibers on one OS thread that
// switch only at __syncthreads(). Blocks, and the threads between two barriers, run in an order
// shuffled by a fixed-seed generator, so a missing barrier or a dependence between blocks shows in
// whichever direction it reads, and the same program gives the same results. Besides:
//   - every thread of a block must reach the same barriers: a thread that returns while others wait
//     at a barrier is reported as a divergent __syncthreads (a hang or worse on a GPU);
//   - shared memory starts as 0xFF bytes (NaN) in every block, so a read before any write shows;
//   - tensors the launchers allocate start as 0xFF bytes too (poisoned_tensors.h);
//   - an access through a pointer not aligned to its type stops the process, as it stops a kernel.
// It checks the kernels' indexing, reductions and math, not timing or memory ordering between
// threads: compute-sanitizer on a GPU does that.
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
typedef struct CUstream_st* cudaStream_t;

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cmbn_emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSharedBytes = 48 * 1024;  // static shared memory per block on every CUDA GPU
constexpr unsigned kMaxThreads = 1024;

enum class FiberState { kRunnable, kAtBarrier, kDone };

struct Fiber {
  ucontext_t context;
  FiberState state;
  uint3 index;
  size_t shared_cursor;  // where this thread's next __shared__ declaration lies in the arena
};

// The block being run: its threads, their stacks and its shared memory.
struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  size_t stack_count = 0;
  alignas(16) unsigned char shared[kSharedBytes];
  const std::function<void()>* kernel = nullptr;
  size_t current = 0;
  std::vector<size_t> order;  // the order the threads run in until the next barrier
  std::mt19937_64 shuffle{20261128};
};

inline Block& block() {
  static Block* the_block = new Block();  // never freed: fibers may still reference it at exit
  return *the_block;
}

inline void fiber_main() {
  Block& b = block();
  (*b.kernel)();
  b.fibers[b.current].state = FiberState::kDone;  // returning resumes the scheduler (uc_link)
}

inline void sync_threads() {
  Block& b = block();
  Fiber& fiber = b.fibers[b.current];
  fiber.state = FiberState::kAtBarrier;
  swapcontext(&fiber.context, &b.scheduler);
}

inline void run_block(const dim3& block_index, const std::function<void()>& kernel) {
  Block& b = block();
  const size_t threads = static_cast<size_t>(blockDim.x) * blockDim.y * blockDim.z;
  if (b.stack_count < threads) {
    b.stacks.reset(new char[threads * kStackBytes]);
    b.stack_count = threads;
  }
  b.kernel = &kernel;
  b.fibers.assign(threads, Fiber{});
  std::memset(b.shared, 0xFF, sizeof(b.shared));
  blockIdx = uint3{block_index.x, block_index.y, block_index.z};
  for (size_t t = 0; t < threads; ++t) {
    Fiber& fiber = b.fibers[t];
    const unsigned linear = static_cast<unsigned>(t);
    fiber.index = uint3{linear % blockDim.x, (linear / blockDim.x) % blockDim.y,
                        linear / (blockDim.x * blockDim.y)};
    fiber.state = FiberState::kRunnable;
    fiber.shared_cursor = 0;
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = b.stacks.get() + t * kStackBytes;
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = &b.scheduler;
    makecontext(&fiber.context, fiber_main, 0);
  }
  b.order.resize(threads);
  for (size_t t = 0; t < threads; ++t) b.order[t] = t;
  for (;;) {
    // Run every thread up to its next barrier (or its end), in a new order each time.
    std::shuffle(b.order.begin(), b.order.end(), b.shuffle);
    for (const size_t t : b.order) {
      if (b.fibers[t].state != FiberState::kRunnable) continue;
      b.current = t;
      threadIdx = b.fibers[t].index;
      swapcontext(&b.scheduler, &b.fibers[t].context);
    }
    size_t done = 0;
    for (const Fiber& fiber : b.fibers) done += fiber.state == FiberState::kDone;
    if (done == threads) return;
    if (done > 0) {
      throw std::runtime_error(
          "emulated CUDA: divergent __syncthreads() in block (" + std::to_string(block_index.x) + ", " +
          std::to_string(block_index.y) + "): " + std::to_string(done) + " of " +
          std::to_string(threads) + " threads returned while the others wait at a barrier");
    }
    for (Fiber& fiber : b.fibers) fiber.state = FiberState::kRunnable;
  }
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...) becomes launch(grid, block, [&] { kernel(args...); }).
inline void launch(dim3 grid, dim3 block_shape, const std::function<void()>& kernel) {
  const unsigned long long threads =
      static_cast<unsigned long long>(block_shape.x) * block_shape.y * block_shape.z;
  if (threads == 0 || threads > kMaxThreads || block_shape.z > 64) {
    throw std::runtime_error("emulated CUDA: invalid block shape (" + std::to_string(block_shape.x) +
                             ", " + std::to_string(block_shape.y) + ", " +
                             std::to_string(block_shape.z) + ")");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error("emulated CUDA: invalid grid (" + std::to_string(grid.x) + ", " +
                             std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")");
  }
  blockDim = block_shape;
  gridDim = grid;
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  std::shuffle(blocks.begin(), blocks.end(), block().shuffle);
  for (const dim3& index : blocks) run_block(index, kernel);
}

// `__shared__ T name[N];` becomes `auto& name = shared_array<T, N>();`: every thread of the block
// declares the same arrays in the same order, so the same cursor gives them the same memory.
template <typename T, long long N>
T (&shared_array())[N] {
  Block& b = block();
  Fiber& fiber = b.fibers[b.current];
  size_t offset = (fiber.shared_cursor + alignof(T) - 1) / alignof(T) * alignof(T);
  if (offset + sizeof(T) * N > kSharedBytes) {
    std::fprintf(stderr, "emulated CUDA: more than %zu bytes of static shared memory\n", kSharedBytes);
    std::abort();  // inside a fiber: no exception can unwind to the launcher
  }
  fiber.shared_cursor = offset + sizeof(T) * N;
  return *reinterpret_cast<T(*)[N]>(b.shared + offset);
}

// `reinterpret_cast<T*>(p)` becomes `aligned_reinterpret_cast<T*>(p)`: a GPU faults on an access through
// a pointer that is not aligned to its type (a misaligned 16-byte pack), which a CPU would allow.
template <typename To, typename From>
To aligned_reinterpret_cast(From from) {
  if constexpr (std::is_pointer_v<To> && std::is_pointer_v<From>) {
    constexpr size_t alignment = alignof(std::remove_cv_t<std::remove_pointer_t<To>>);
    if (reinterpret_cast<uintptr_t>(from) % alignment != 0) {
      std::fprintf(stderr, "emulated CUDA: misaligned address %p for an access aligned to %zu bytes\n",
                   static_cast<const void*>(from), alignment);
      std::abort();  // as a GPU stops the kernel ("misaligned address")
    }
  }
  return reinterpret_cast<To>(from);
}

// The SM count make_geometry sizes its grids by: an H100 SXM's by default, CMBN_EMULATED_SMS to change.
inline int multiprocessor_count() {
  static const int count = [] {
    const char* text = std::getenv("CMBN_EMULATED_SMS");
    return text ? std::atoi(text) : 132;
  }();
  return count;
}

}  // namespace cmbn_emu

inline void __syncthreads() { cmbn_emu::sync_threads(); }

// Device math: the GPU's rounding-mode intrinsics round to nearest, as the CPU does.
inline float rsqrtf(float value) { return 1.0f / std::sqrt(value); }
inline double rsqrt(double value) { return 1.0 / std::sqrt(value); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
using std::isfinite;
