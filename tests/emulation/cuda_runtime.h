#pragma once
// The part of the CUDA runtime the kernels in csrc/cuda/ use, on the CPU: force-included (g++ -include)
// into every translated source. A block's threads are fibers on one OS thread that switch only at
// barriers. A <<<>>> launch runs its blocks one at a time; a cooperative launch
// (cudaLaunchCooperativeKernel) holds every block of its grid at once, each with its own fibers and
// shared memory, and runs them one at a time up to each grid barrier (this_grid().sync(),
// cooperative_groups.h). Blocks, and the threads between two barriers, run in an order shuffled by a
// seeded generator (CMBN_EMULATION_SEED), so a missing barrier or a dependence between blocks shows
// in whichever direction it reads, and the same seed gives the same run. Besides:
//   - every thread of a block must reach the same barriers, and every block of a cooperative grid
//     the same grid barriers: a thread (or block) that returns, or waits at another barrier, while
//     others wait at one fails the launch (a hang or worse on a GPU), as does a grid barrier in a
//     <<<>>> launch;
//   - shared memory starts as 0xFF bytes (NaN) in every block, so a read before any write shows;
//   - tensors the launchers allocate start as 0xFF bytes too, between guard zones that every launch
//     must leave untouched (poisoned_tensors.h);
//   - an access through a pointer not aligned to its type stops the process, as it stops a kernel;
//   - every launch is counted per kernel instantiation and phase (runtime.cpp reports them).
// It checks the kernels' indexing, reductions and math, not timing or memory ordering between
// threads: compute-sanitizer on a GPU does that. tests/emulation/README.md lists what else differs.
#include <sys/mman.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cctype>
#include <cerrno>
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

// The error codes the emulated runtime returns (their values as in CUDA's driver_types.h).
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorUnsupportedPtxVersion = 222,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorNotSupported = 801,
};
typedef enum cudaError cudaError_t;

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cmbn_emu {

constexpr size_t kStackBytes = 256 * 1024;
// Stacks lie this far apart: not a multiple of the page size, so that their tops, where the threads'
// frames are, fall on different cache sets (a power-of-two stride makes every switch a cache miss).
constexpr size_t kStackStride = kStackBytes + 4096 + 64;
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
// Where a thread stands when it switches back to the scheduler.
enum class FiberState { kRunnable, kAtBarrier, kAtGridBarrier, kDone };

// A thread of a resident block. Fibers outlive launches: each runs the kernel once per block, then
// waits for the next one, so a launch costs no new contexts.
struct Fiber {
  Context context;
  StackBounds stack;
  FiberState state = FiberState::kDone;
  uint3 index{};
  size_t shared_cursor = 0;  // where this thread's next __shared__ declaration lies in the arena
};

// The stacks of `count` fibers in one mapping: a cooperative grid of 264 blocks of 256 threads has
// 67584 fibers, more than the mappings a process may hold (vm.max_map_count, 65530 by default).
// The pages are reserved, not committed: a stack costs only the pages its frames touch.
inline char* map_stacks(size_t count) {
  void* memory = mmap(nullptr, count * kStackStride, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    throw std::runtime_error("emulated CUDA: cannot map the stacks of " + std::to_string(count) +
                             " threads: " + std::strerror(errno));
  }
  // Not unpoisoned for AddressSanitizer, which would write a shadow of 1/8 its size: a new mapping
  // can only land where poisoned memory lay if that was unmapped with its shadow left as it was,
  // and the sanitizer clears it for the memory its allocator unmaps and for the stacks of threads
  // that end.
  return static_cast<char*>(memory);
}

// A resident block: its threads and its shared memory arena.
struct Block {
  uint3 index{};
  std::vector<Fiber> fibers;  // at least as many as the block has threads
  alignas(16) unsigned char shared[kSharedBytes];
};

// The launch being run: its kernel, its resident blocks (one at a time for a <<<>>> launch, the whole
// grid for a cooperative one), the block and thread running, and the context of the launching
// thread, which schedules them.
struct Scheduler {
  Context context;
  StackBounds stack;  // the launching thread's, learnt when a fiber starts or resumes
  const std::function<void()>* kernel = nullptr;
  Block* block = nullptr;  // the block running
  Fiber* fiber = nullptr;  // the thread running
  bool cooperative = false;
  bool skip_grid_sync = false;  // CMBN_EMULATION_SKIP_GRID_SYNC=1: this_grid().sync() does nothing
  size_t resident = 0;          // blocks[0, resident) belong to the launch
  std::vector<Block*> blocks;   // never freed: fibers may still reference them at exit
  std::vector<size_t> order;    // the order the threads run in until the next barrier
  std::mt19937_64 shuffle{shuffle_seed()};
};

inline Scheduler& scheduler() {
  static Scheduler* the_scheduler = new Scheduler();  // never freed, as its blocks
  return *the_scheduler;
}

// Back to the scheduler, from the current fiber; returns when the scheduler resumes it.
inline void yield_to_scheduler() {
  Scheduler& s = scheduler();
  s.stack = switch_context(s.fiber->context, s.context, s.stack);
}

inline void fiber_main() {
  Scheduler& s = scheduler();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &s.stack.bottom, &s.stack.bytes);
#endif
  for (;;) {
    (*s.kernel)();
    s.fiber->state = FiberState::kDone;
    yield_to_scheduler();  // resumed for the next block
  }
}

// A fresh context for `fiber`: a new one, or one a failed launch left inside the kernel.
inline void start_fiber(Fiber& fiber, bool left_inside_kernel) {
#if defined(__SANITIZE_ADDRESS__)
  if (left_inside_kernel) {
    // The frames left behind keep their poisoned redzones. They lie above the saved stack pointer
    // (anywhere where the context is a ucontext_t): unpoisoning only those leaves the shadow of the
    // rest of the stack untouched, uncommitted.
    char* bottom = static_cast<char*>(const_cast<void*>(fiber.stack.bottom));
    char* from = bottom;
#if defined(__x86_64__)
    from = std::max(bottom, static_cast<char*>(fiber.context.stack_pointer) - 256);
#endif
    __asan_unpoison_memory_region(from, bottom + fiber.stack.bytes - from);
  }
#else
  (void)left_inside_kernel;
#endif
  make_context(fiber.context, static_cast<char*>(const_cast<void*>(fiber.stack.bottom)),
               fiber.stack.bytes, fiber_main);
  fiber.state = FiberState::kDone;
}

// Gives block `b` fibers for at least `threads` threads, the new ones' stacks in one mapping.
inline void ensure_fibers(Block& b, size_t threads) {
  const size_t old = b.fibers.size();
  if (old >= threads) return;
  char* stacks = map_stacks(threads - old);
  b.fibers.resize(threads);
  for (size_t t = old; t < threads; ++t) {
    b.fibers[t].stack = StackBounds{stacks + (t - old) * kStackStride, kStackBytes};
    start_fiber(b.fibers[t], false);
  }
}

// Block `b` as block `index` of the grid starts: every thread runnable, its shared memory 0xFF.
inline void prepare_block(Block& b, const uint3& index, size_t threads) {
  b.index = index;
  std::memset(b.shared, 0xFF, sizeof(b.shared));
  for (size_t t = 0; t < threads; ++t) {
    Fiber& fiber = b.fibers[t];
    const unsigned linear = static_cast<unsigned>(t);
    fiber.index = uint3{linear % blockDim.x, (linear / blockDim.x) % blockDim.y,
                        linear / (blockDim.x * blockDim.y)};
    fiber.state = FiberState::kRunnable;
    fiber.shared_cursor = 0;
  }
}

// Throws `message`, after giving every thread the failed launch left inside the kernel a fresh
// context, so that the next launch starts clean.
[[noreturn]] inline void fail_launch(const std::string& message) {
  Scheduler& s = scheduler();
  for (size_t i = 0; i < s.resident; ++i) {
    for (Fiber& fiber : s.blocks[i]->fibers) {
      if (fiber.state != FiberState::kDone) start_fiber(fiber, true);
    }
  }
  throw std::runtime_error("emulated CUDA: " + message);
}

inline std::string block_name(const uint3& index) {
  return "block (" + std::to_string(index.x) + ", " + std::to_string(index.y) + ", " +
         std::to_string(index.z) + ")";
}

inline void sync_threads() {
  scheduler().fiber->state = FiberState::kAtBarrier;
  yield_to_scheduler();
}

// cooperative_groups::this_grid().sync(). A thread of a <<<>>> launch gets here too, and its launch
// fails once the block has run up to it.
inline void sync_grid() {
  Scheduler& s = scheduler();
  if (s.cooperative && s.skip_grid_sync) return;
  s.fiber->state = FiberState::kAtGridBarrier;
  yield_to_scheduler();
}

enum class BlockOutcome { kDone, kAtGridBarrier };

// Runs the threads of block `b` until every one has returned or waits at the grid barrier.
inline BlockOutcome run_block(Block& b, size_t threads) {
  Scheduler& s = scheduler();
  s.block = &b;
  blockIdx = b.index;
  for (;;) {
    // Run every thread up to its next barrier (or its end), in a new order each time.
    std::shuffle(s.order.begin(), s.order.end(), s.shuffle);
    for (const size_t t : s.order) {
      Fiber& fiber = b.fibers[t];
      if (fiber.state != FiberState::kRunnable) continue;
      s.fiber = &fiber;
      threadIdx = fiber.index;
      switch_context(s.context, fiber.context, fiber.stack);
    }
    size_t done = 0, at_grid = 0;
    for (size_t t = 0; t < threads; ++t) {
      done += b.fibers[t].state == FiberState::kDone;
      at_grid += b.fibers[t].state == FiberState::kAtGridBarrier;
    }
    if (at_grid > 0 && !s.cooperative) {
      fail_launch("cooperative_groups::this_grid().sync() in a kernel launched with <<<>>>, not "
                  "with cudaLaunchCooperativeKernel (" + block_name(b.index) + ")");
    }
    if (done == threads) return BlockOutcome::kDone;
    if (at_grid == threads) return BlockOutcome::kAtGridBarrier;
    if (at_grid > 0 && done > 0) {
      fail_launch("divergent this_grid().sync() in " + block_name(b.index) + ": " +
                  std::to_string(done) + " of " + std::to_string(threads) +
                  " threads returned while the others wait at the grid barrier");
    }
    if (at_grid > 0) {
      fail_launch("divergent barriers in " + block_name(b.index) + ": " + std::to_string(at_grid) +
                  " of " + std::to_string(threads) + " threads wait at this_grid().sync() while "
                  "the others wait at __syncthreads()");
    }
    if (done > 0) {
      fail_launch("divergent __syncthreads() in " + block_name(b.index) + ": " +
                  std::to_string(done) + " of " + std::to_string(threads) +
                  " threads returned while the others wait at a barrier");
    }
    for (size_t t = 0; t < threads; ++t) b.fibers[t].state = FiberState::kRunnable;
  }
}

// The threads per block of a launch; throws on a block or grid shape no GPU launches.
inline size_t check_launch_shape(dim3 grid, dim3 block_shape) {
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
  return static_cast<size_t>(threads);
}

// Makes `resident` blocks of `threads` fibers ready for a launch of `kernel`.
inline void begin_launch(dim3 grid, dim3 block_shape, const std::function<void()>& kernel,
                         bool cooperative, size_t resident, size_t threads) {
  Scheduler& s = scheduler();
  blockDim = block_shape;
  gridDim = grid;
  s.kernel = &kernel;
  s.cooperative = cooperative;
  const char* skip = std::getenv("CMBN_EMULATION_SKIP_GRID_SYNC");
  s.skip_grid_sync = cooperative && skip && std::strcmp(skip, "1") == 0;
  s.resident = 0;  // no fiber of a block added below is inside the kernel yet
  while (s.blocks.size() < resident) s.blocks.push_back(new Block());
  for (size_t i = 0; i < resident; ++i) ensure_fibers(*s.blocks[i], threads);
  s.resident = resident;
  s.order.resize(threads);
  for (size_t t = 0; t < threads; ++t) s.order[t] = t;
}

// The blocks of `grid` in a shuffled order.
inline std::vector<uint3> shuffled_blocks(dim3 grid) {
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  std::shuffle(blocks.begin(), blocks.end(), scheduler().shuffle);
  return blocks;
}

// kernel<<<grid, block>>>: every block of the grid, one after another in a shuffled order, in the
// same resident block.
inline void run_grid(dim3 grid, dim3 block_shape, const std::function<void()>& kernel) {
  const size_t threads = check_launch_shape(grid, block_shape);
  begin_launch(grid, block_shape, kernel, false, 1, threads);
  Block& b = *scheduler().blocks[0];
  for (const uint3& index : shuffled_blocks(grid)) {
    prepare_block(b, index, threads);
    run_block(b, threads);  // a block at the grid barrier fails the launch
  }
}

// cudaLaunchCooperativeKernel: every block of the grid resident at once, each with its threads and
// shared memory. Between two grid barriers the blocks run one after another in a shuffled order,
// each up to the barrier; when every block waits there, all go on, in a new order.
inline void run_cooperative_grid(dim3 grid, dim3 block_shape, const std::function<void()>& kernel) {
  const size_t threads = check_launch_shape(grid, block_shape);
  const std::vector<uint3> indices = shuffled_blocks(grid);
  Scheduler& s = scheduler();
  begin_launch(grid, block_shape, kernel, true, indices.size(), threads);
  std::vector<Block*> blocks(s.blocks.begin(), s.blocks.begin() + indices.size());
  for (size_t i = 0; i < blocks.size(); ++i) prepare_block(*blocks[i], indices[i], threads);
  for (bool first = true;; first = false) {
    if (!first) std::shuffle(blocks.begin(), blocks.end(), s.shuffle);
    size_t done = 0;
    for (Block* b : blocks) done += run_block(*b, threads) == BlockOutcome::kDone;
    if (done == blocks.size()) return;
    if (done > 0) {
      fail_launch("divergent this_grid().sync(): " + std::to_string(done) + " of " +
                  std::to_string(blocks.size()) +
                  " blocks returned while the others wait at the grid barrier");
    }
    for (Block* b : blocks) {
      for (size_t t = 0; t < threads; ++t) b->fibers[t].state = FiberState::kRunnable;
    }
  }
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
constexpr size_t arity(void (*)(P...)) {
  return sizeof...(P);
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

// The error of the last failed runtime call on this host thread, until cudaGetLastError reads it.
inline thread_local cudaError_t last_error = cudaSuccess;

inline int multiprocessor_count();

// The blocks of a kernel one SM holds at once, as cudaOccupancyMaxActiveBlocksPerMultiprocessor
// reports them for any kernel and block size: CMBN_EMULATED_BLOCKS_PER_SM (read at each call, so a
// test may change it), else 2.
inline int blocks_per_multiprocessor() {
  const char* text = std::getenv("CMBN_EMULATED_BLOCKS_PER_SM");
  return text && *text ? std::atoi(text) : 2;
}

template <auto Kernel, typename... P, size_t... I>
cudaError_t launch_cooperative_unpacked(dim3 grid, dim3 block_shape, void** args, void (*)(P...),
                                        std::index_sequence<I...>) {
  static const std::string kernel = kernel_name<Kernel>();
  check_launch_shape(grid, block_shape);
  const long long blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  if (blocks > static_cast<long long>(blocks_per_multiprocessor()) * multiprocessor_count()) {
    last_error = cudaErrorCooperativeLaunchTooLarge;  // as on a GPU: nothing runs (nor is counted)
    return cudaErrorCooperativeLaunchTooLarge;
  }
  std::string phase;
  (append_enumerator(phase, *static_cast<const std::decay_t<P>*>(args[I])), ...);
  if (kKernelRegistered<Kernel>) ++launch_counts()[kernel][phase];
  run_cooperative_grid(grid, block_shape,
                       [&] { Kernel(*static_cast<const std::decay_t<P>*>(args[I])...); });
  check_guard_zones(phase.empty() ? kernel : kernel + " (" + phase + ")");
  return cudaSuccess;
}

// cudaLaunchCooperativeKernel(&kernel, grid, block, args, shared_bytes, stream) becomes
// launch_cooperative<&kernel>(grid, block, args): args[i] points to the kernel's i-th argument, of
// the type of its i-th parameter, as in CUDA; every thread of the grid calls the kernel with copies.
// A grid larger than the blocks the device holds at once (blocks_per_multiprocessor() per SM) does
// not run: cudaErrorCooperativeLaunchTooLarge, as on a GPU.
template <auto Kernel>
cudaError_t launch_cooperative(dim3 grid, dim3 block_shape, void** args) {
  return launch_cooperative_unpacked<Kernel>(grid, block_shape, args, Kernel,
                                             std::make_index_sequence<arity(Kernel)>());
}

// `__shared__ T name[N];` becomes `auto& name = shared_array<T, N>();`: every thread of the block
// declares the same arrays in the same order, so the same cursor gives them the same memory.
template <typename T, long long N>
T (&shared_array())[N] {
  Scheduler& s = scheduler();
  Fiber& fiber = *s.fiber;
  size_t offset = (fiber.shared_cursor + alignof(T) - 1) / alignof(T) * alignof(T);
  if (offset + sizeof(T) * N > kSharedBytes) {
    std::fprintf(stderr, "emulated CUDA: more than %zu bytes of static shared memory\n", kSharedBytes);
    std::abort();  // inside a fiber: no exception can unwind to the launcher
  }
  fiber.shared_cursor = offset + sizeof(T) * N;
  return *reinterpret_cast<T(*)[N]>(s.block->shared + offset);
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

// The runtime calls around a cooperative launch (cooperative_groups.h has the grid barrier).
inline cudaError_t cudaGetLastError() {
  const cudaError_t error = cmbn_emu::last_error;
  cmbn_emu::last_error = cudaSuccess;
  return error;
}

inline cudaError_t cudaPeekAtLastError() { return cmbn_emu::last_error; }

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidDeviceFunction:
      return "invalid device function";
    case cudaErrorNoKernelImageForDevice:
      return "no kernel image is available for execution on the device";
    case cudaErrorUnsupportedPtxVersion:
      return "the provided PTX was compiled with an unsupported toolchain.";
    case cudaErrorCooperativeLaunchTooLarge:
      return "too many blocks in cooperative launch";
    case cudaErrorNotSupported:
      return "operation not supported";
  }
  return "unrecognized error code";
}

// Any kernel, any block size: cmbn_emu::blocks_per_multiprocessor() (CMBN_EMULATED_BLOCKS_PER_SM).
template <class T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, T kernel, int block_size,
                                                           size_t dynamic_shared_bytes) {
  (void)kernel;
  (void)dynamic_shared_bytes;
  if (blocks == nullptr || block_size <= 0) return cmbn_emu::last_error = cudaErrorInvalidValue;
  *blocks = cmbn_emu::blocks_per_multiprocessor();
  return cudaSuccess;
}

// The device the calling host thread works on: CMBN_EMULATED_DEVICE (read at each call, so a test can
// switch devices; 0 when unset). Each device answers the occupancy query as it is set at that call.
inline cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return cmbn_emu::last_error = cudaErrorInvalidValue;
  const char* text = std::getenv("CMBN_EMULATED_DEVICE");
  *device = text && *text ? std::atoi(text) : 0;
  return cudaSuccess;
}

// Whether a stream is being captured into a CUDA graph: CMBN_EMULATED_STREAM_CAPTURE=1 says it is
// (read at each call). Launches run as usual either way.
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};

inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  if (status == nullptr) return cmbn_emu::last_error = cudaErrorInvalidValue;
  const char* text = std::getenv("CMBN_EMULATED_STREAM_CAPTURE");
  *status = text && std::strcmp(text, "1") == 0 ? cudaStreamCaptureStatusActive
                                                 : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

// A kernel's attributes. CMBN_EMULATED_NO_KERNEL_IMAGE=1 (read at each call) stands for a library
// built without an image for the device: every kernel answers cudaErrorInvalidDeviceFunction, as
// CUDA does for a GPU architecture the binary holds neither code nor compatible PTX for.
struct cudaFuncAttributes {
  int numRegs;
  int maxThreadsPerBlock;
};

template <class T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, T kernel) {
  (void)kernel;
  if (attributes == nullptr) return cmbn_emu::last_error = cudaErrorInvalidValue;
  const char* text = std::getenv("CMBN_EMULATED_NO_KERNEL_IMAGE");
  if (text && std::strcmp(text, "1") == 0) return cmbn_emu::last_error = cudaErrorInvalidDeviceFunction;
  *attributes = cudaFuncAttributes{0, 1024};
  return cudaSuccess;
}

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
