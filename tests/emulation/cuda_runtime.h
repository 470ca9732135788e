#pragma once
// The part of the CUDA runtime the kernels in csrc/ use, on the CPU: force-included (g++ -include)
// into every translated source. Each block runs alone, its threads as fibers on one OS thread that
// switch only at __syncthreads(). Blocks, and the threads between two barriers, run in an order
// shuffled by a seeded generator (CMBN_EMULATION_SEED), so a missing barrier or a dependence between
// blocks shows in whichever direction it reads, and the same seed gives the same run. Besides:
//   - every thread of a block must reach the same barriers: a thread that returns while others wait
//     at a barrier is reported as a divergent __syncthreads (a hang or worse on a GPU);
//   - shared memory starts as 0xFF bytes (NaN) in every block, so a read before any write shows;
//   - tensors the launchers allocate start as 0xFF bytes too, between guard zones that every launch
//     must leave untouched (poisoned_tensors.h);
//   - an access through a pointer not aligned to its type stops the process, as it stops a kernel;
//   - every launch is counted per kernel instantiation and phase (runtime.cpp reports them).
// It checks the kernels' indexing, reductions and math, not timing or memory ordering between
// threads: compute-sanitizer on a GPU does that. tests/emulation/README.md lists what else differs.
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
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

// The seed of the block and thread order: CMBN_EMULATION_SEED, else a fixed one, so that a run
// repeats. tests/test_emulated_kernels.py draws a new seed for each run and prints it on failure.
inline uint64_t shuffle_seed() {
  const char* text = std::getenv("CMBN_EMULATION_SEED");
  return text && *text ? std::strtoull(text, nullptr, 10) : 20261128;
}

// ------------------------------------------------------------------------------ fiber switching
// A context is what a switch saves of the code it leaves. On x86-64 that is a stack pointer: the
// callee-saved registers and the SSE and x87 control words are pushed onto the stack it leaves
// (runtime.cpp), so a switch is a few instructions; glibc's swapcontext would add two system calls
// (the signal mask) to each. Elsewhere, a ucontext_t. Under AddressSanitizer every switch is
// announced to it, so that it knows which stack is current.
#if defined(__x86_64__)
struct Context {
  void* stack_pointer = nullptr;
};
extern "C" void cmbn_emu_switch_context(void** save, void* load);
extern "C" void cmbn_emu_context_start();

// A context that, switched to, calls entry() on the given stack (entry must never return).
inline void make_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  // From the top: the return address of the switch (the start routine, which calls entry, held in
  // r13), then rbp, rbx, r12, r13, r14, r15 and the control words, as cmbn_emu_switch_context
  // pushes them. The return address lies 8 bytes below a 16-byte boundary, so that the start
  // routine calls entry with the stack aligned as the ABI requires.
  const uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15};
  auto* slots = reinterpret_cast<uint64_t*>(top - 8 - 7 * 8);
  uint32_t control[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  std::memcpy(&slots[0], control, sizeof(control));
  slots[1] = 0;                                 // r15
  slots[2] = 0;                                 // r14
  slots[3] = reinterpret_cast<uint64_t>(entry);  // r13
  slots[4] = 0;                                 // r12
  slots[5] = 0;                                 // rbx
  slots[6] = 0;                                 // rbp
  slots[7] = reinterpret_cast<uint64_t>(&cmbn_emu_context_start);
  context.stack_pointer = slots;
}

inline void jump_context(Context& save, Context& load) {
  cmbn_emu_switch_context(&save.stack_pointer, load.stack_pointer);
}
#else
struct Context {
  ucontext_t context;
};

inline void make_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = bytes;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}

inline void jump_context(Context& save, Context& load) { swapcontext(&save.context, &load.context); }
#endif

// Where each stack lies, for AddressSanitizer.
struct StackBounds {
  const void* bottom = nullptr;
  size_t bytes = 0;
};

// Switches from the context `save` (whose code calls this) to `load`, which runs on stack `to`; returns
// when something switches back to `save`, and then returns the bounds of the stack it came from.
inline StackBounds switch_context(Context& save, Context& load, const StackBounds& to) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, to.bottom, to.bytes);
  jump_context(save, load);
  StackBounds from;
  __sanitizer_finish_switch_fiber(fake_stack, &from.bottom, &from.bytes);
  return from;
#else
  (void)to;
  jump_context(save, load);
  return StackBounds{};
#endif
}

// ----------------------------------------------------------------------------------------- blocks
enum class FiberState { kRunnable, kAtBarrier, kDone };

// A thread of the block being run. Fibers outlive blocks: each runs the kernel once per block, then
// waits for the next one, so a block costs no new contexts.
struct Fiber {
  Context context;
  StackBounds stack;
  std::unique_ptr<char[]> stack_memory;
  FiberState state = FiberState::kDone;
  uint3 index{};
  size_t shared_cursor = 0;  // where this thread's next __shared__ declaration lies in the arena
};

// The block being run: its threads and its shared memory.
struct Block {
  Context scheduler;
  StackBounds scheduler_stack;  // the launching thread's, learnt when a fiber starts or resumes
  std::vector<Fiber> fibers;    // at least as many as the block has threads
  alignas(16) unsigned char shared[kSharedBytes];
  const std::function<void()>* kernel = nullptr;
  size_t current = 0;
  std::vector<size_t> order;  // the order the threads run in until the next barrier
  std::mt19937_64 shuffle{shuffle_seed()};
};

inline Block& block() {
  static Block* the_block = new Block();  // never freed: fibers may still reference it at exit
  return *the_block;
}

// Back to the scheduler, from the current fiber; returns when the scheduler resumes it.
inline void yield_to_scheduler() {
  Block& b = block();
  Fiber& fiber = b.fibers[b.current];
  b.scheduler_stack = switch_context(fiber.context, b.scheduler, b.scheduler_stack);
}

inline void fiber_main() {
  Block& b = block();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack.bottom, &b.scheduler_stack.bytes);
#endif
  for (;;) {
    (*b.kernel)();
    b.fibers[b.current].state = FiberState::kDone;
    yield_to_scheduler();  // resumed for the next block
  }
}

// A fresh fiber: new, or one left waiting at a barrier by a block that failed.
inline void start_fiber(Fiber& fiber) {
  if (!fiber.stack_memory) fiber.stack_memory.reset(new char[kStackBytes]);
#if defined(__SANITIZE_ADDRESS__)
  __asan_unpoison_memory_region(fiber.stack_memory.get(), kStackBytes);  // frames left behind
#endif
  fiber.stack = StackBounds{fiber.stack_memory.get(), kStackBytes};
  make_context(fiber.context, fiber.stack_memory.get(), kStackBytes, fiber_main);
  fiber.state = FiberState::kDone;
}

inline void sync_threads() {
  block().fibers[block().current].state = FiberState::kAtBarrier;
  yield_to_scheduler();
}

inline void run_block(const dim3& block_index, const std::function<void()>& kernel) {
  Block& b = block();
  const size_t threads = static_cast<size_t>(blockDim.x) * blockDim.y * blockDim.z;
  if (b.fibers.size() < threads) {
    const size_t old = b.fibers.size();
    b.fibers.resize(threads);
    for (size_t t = old; t < threads; ++t) start_fiber(b.fibers[t]);
  }
  b.kernel = &kernel;
  std::memset(b.shared, 0xFF, sizeof(b.shared));
  blockIdx = uint3{block_index.x, block_index.y, block_index.z};
  for (size_t t = 0; t < threads; ++t) {
    Fiber& fiber = b.fibers[t];
    const unsigned linear = static_cast<unsigned>(t);
    fiber.index = uint3{linear % blockDim.x, (linear / blockDim.x) % blockDim.y,
                        linear / (blockDim.x * blockDim.y)};
    fiber.state = FiberState::kRunnable;
    fiber.shared_cursor = 0;
  }
  b.order.resize(threads);
  for (size_t t = 0; t < threads; ++t) b.order[t] = t;
  for (;;) {
    // Run every thread up to its next barrier (or its end), in a new order each time.
    std::shuffle(b.order.begin(), b.order.end(), b.shuffle);
    for (const size_t t : b.order) {
      Fiber& fiber = b.fibers[t];
      if (fiber.state != FiberState::kRunnable) continue;
      b.current = t;
      threadIdx = fiber.index;
      switch_context(b.scheduler, fiber.context, fiber.stack);
    }
    size_t done = 0;
    for (size_t t = 0; t < threads; ++t) done += b.fibers[t].state == FiberState::kDone;
    if (done == threads) return;
    if (done > 0) {
      for (size_t t = 0; t < threads; ++t) {
        if (b.fibers[t].state != FiberState::kDone) start_fiber(b.fibers[t]);
      }
      throw std::runtime_error(
          "emulated CUDA: divergent __syncthreads() in block (" + std::to_string(block_index.x) + ", " +
          std::to_string(block_index.y) + "): " + std::to_string(done) + " of " +
          std::to_string(threads) + " threads returned while the others wait at a barrier");
    }
    for (size_t t = 0; t < threads; ++t) b.fibers[t].state = FiberState::kRunnable;
  }
}

// Runs every block of a grid, one after another in a shuffled order.
inline void run_grid(dim3 grid, dim3 block_shape, const std::function<void()>& kernel) {
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

// ------------------------------------------------------------------------------------ guard zones
// Every tensor a launcher allocates lies between two zones of kGuardBytes 0xFF bytes
// (poisoned_tensors.h) that every launch must leave as they are: a write just outside a tensor fails
// the launch even without AddressSanitizer, which cannot see a write into memory that is valid for
// it. Tensor data -> its size in bytes, for the tensors alive.
constexpr size_t kGuardBytes = 256;

inline std::mutex& guard_mutex() {
  static std::mutex* mutex = new std::mutex();
  return *mutex;
}

inline std::map<unsigned char*, size_t>& guarded_tensors() {
  static auto* tensors = new std::map<unsigned char*, size_t>();
  return *tensors;
}

// Throws, naming `launch`, if a guard zone changed (and restores it, so the next launch starts clean).
inline void check_guard_zones(const std::string& launch) {
  std::lock_guard<std::mutex> lock(guard_mutex());
  for (const auto& [data, bytes] : guarded_tensors()) {
    for (const bool before : {true, false}) {
      unsigned char* zone = before ? data - kGuardBytes : data + bytes;
      size_t first = kGuardBytes, last = 0;
      for (size_t i = 0; i < kGuardBytes; ++i) {
        if (zone[i] != 0xFF) {
          first = std::min(first, i);
          last = i;
        }
      }
      if (first == kGuardBytes) continue;
      std::memset(zone, 0xFF, kGuardBytes);
      const size_t distance_first = before ? kGuardBytes - last : first + 1;
      const size_t distance_last = before ? kGuardBytes - first : last + 1;
      throw std::runtime_error(
          "emulated CUDA: " + launch + " wrote outside a " + std::to_string(bytes) +
          "-byte tensor its launcher allocated: bytes " + std::to_string(distance_first) + " to " +
          std::to_string(distance_last) + (before ? " before its start" : " after its end"));
    }
  }
}

// ------------------------------------------------------------------------------------- launch log
// Launches are counted per kernel instantiation and phase (the value of each enum argument), and
// every instantiation compiled into the library is listed from load time on, so one never launched
// shows with a count of 0. Names are the compiler's spelling without namespaces, e.g.
// "cmbn_forward_kernel<c10::Half, float, kRows, 8>" -> "cmbn_forward_kernel<Half, float, kRows, 8>".

// The template argument `parameter` as __PRETTY_FUNCTION__ `pretty` spells it, namespaces dropped:
// GCC writes "[with auto Kernel = ns::k<...>; ...]", clang "[Kernel = &ns::k<...>]". Another
// compiler's spelling is kept whole (still one name per argument).
inline std::string template_argument(const std::string& pretty, const std::string& parameter) {
  std::string key = parameter + " = ";
  size_t begin = pretty.find(key);
  if (begin == std::string::npos) {
    key = parameter.substr(parameter.rfind(' ') + 1) + " = ";
    begin = pretty.find(key);
  }
  if (begin == std::string::npos) return pretty;
  begin += key.size();
  if (pretty[begin] == '&') ++begin;
  size_t end = begin;
  for (int depth = 0; end < pretty.size(); ++end) {
    const char c = pretty[end];
    if (c == '<' || c == '(') ++depth;
    if (c == '>' || c == ')') --depth;
    if ((c == ';' || c == ',' || c == ']') && depth == 0) break;
  }
  std::string text = pretty.substr(begin, end - begin);
  for (size_t at; (at = text.find("(anonymous namespace)")) != std::string::npos;) {
    text.replace(at, 21, "{anonymous}");
  }
  std::string name;
  size_t word = 0;  // start of the identifier being copied
  for (size_t i = 0; i < text.size(); ++i) {
    if (text.compare(i, 2, "::") == 0) {  // drop the qualifier that ends here
      name.erase(name.size() - (i - word));
      word = ++i + 1;
      continue;
    }
    if (!(std::isalnum(static_cast<unsigned char>(text[i])) || text[i] == '_' || text[i] == '{' ||
          text[i] == '}')) {
      word = i + 1;
    }
    name += text[i];
  }
  return name;
}

template <auto Kernel>
std::string kernel_name() {
  return template_argument(__PRETTY_FUNCTION__, "auto Kernel");
}

template <typename E, E V>
std::string enumerator_spelling() {
  return template_argument(__PRETTY_FUNCTION__, "E V");  // "(Phase)7" when 7 names no enumerator
}

template <typename E, int... I>
std::vector<std::string> enumerator_spellings(std::integer_sequence<int, I...>) {
  return {enumerator_spelling<E, static_cast<E>(I)>()...};
}

// The spelling of the values 0 to 15 of enum E.
template <typename E>
const std::vector<std::string>& enumerators() {
  static const std::vector<std::string> names =
      enumerator_spellings<E>(std::make_integer_sequence<int, 16>());
  return names;
}

template <typename T>
void append_enumerator(std::string& phase, const T& value) {
  if constexpr (std::is_enum_v<T>) {
    const auto index = static_cast<size_t>(value);
    if (!phase.empty()) phase += ",";
    phase += index < enumerators<T>().size() ? enumerators<T>()[index] : "(out of range)";
  }
}

// Every phase a kernel can be launched with: each combination of the enumerators of its enum
// parameters ("" for a kernel without one).
template <typename T>
void extend_phases(std::vector<std::string>& phases) {
  if constexpr (std::is_enum_v<T>) {
    std::vector<std::string> extended;
    for (const std::string& phase : phases) {
      for (const std::string& name : enumerators<T>()) {
        if (name[0] != '(') extended.push_back(phase.empty() ? name : phase + "," + name);
      }
    }
    phases = extended;
  }
}

template <typename... P>
std::vector<std::string> phases_of(void (*)(P...)) {
  std::vector<std::string> phases{""};
  (extend_phases<std::decay_t<P>>(phases), ...);
  return phases;
}

// kernel -> phase -> launches.
inline std::map<std::string, std::map<std::string, long long>>& launch_counts() {
  static auto* counts = new std::map<std::string, std::map<std::string, long long>>();
  return *counts;
}

inline bool register_kernel(const std::string& kernel, const std::vector<std::string>& phases) {
  for (const std::string& phase : phases) launch_counts()[kernel][phase] += 0;
  return true;
}

// Initialized when the library loads, for every kernel instantiation a launch site names.
template <auto Kernel>
inline const bool kKernelRegistered = register_kernel(kernel_name<Kernel>(), phases_of(Kernel));

// kernel<<<grid, block, shared_bytes, stream>>>(args...) becomes launch<&kernel>(grid, block, args...):
// the arguments are evaluated once, as on the host, and every thread of the grid calls the kernel
// with them.
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block_shape, const Args&... args) {
  static const std::string kernel = kernel_name<Kernel>();
  std::string phase;
  (append_enumerator(phase, args), ...);
  if (kKernelRegistered<Kernel>) ++launch_counts()[kernel][phase];
  run_grid(grid, block_shape, [&] { Kernel(args...); });
  check_guard_zones(phase.empty() ? kernel : kernel + " (" + phase + ")");
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
