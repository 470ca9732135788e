// A small CUDA program that tests/test_emulation_runtime.py translates (translate.py) and compiles
// against the emulated runtime, to check the runtime itself: cooperative launches and their grid
// barrier, the occupancy query, the launch counts, and the errors for misused barriers.
//
// grid_sum_kernel: each block sums its values into a partial; after the grid barrier every thread
// sums all the partials. The partials start as NaN, so a thread that reads one before its block
// wrote it (a missing or skipped barrier) gets a NaN total.
//
// Usage: runtime_check SCENARIO [BLOCKS [THREADS_X [THREADS_Y]]]; it prints "key: value" lines.
#include <cooperative_groups.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" const char* cmbn_emulation_launch_counts();  // runtime.cpp

// How the kernel misbehaves (the enum names the phase of each launch in the launch counts).
enum class Fault { kNone, kMixedBarriers, kThreadReturns, kBlockReturns };

struct SumArgs {
  const float* values;
  float* partials;
  float* totals;
  int* shared_kept;
};

template <int Variant>
__global__ void grid_sum_kernel(const SumArgs args, const Fault fault) {
  __shared__ float cache[1024];
  const unsigned threads = blockDim.x * blockDim.y;
  const unsigned t = threadIdx.y * blockDim.x + threadIdx.x;
  const unsigned i = blockIdx.x * threads + t;
  cache[t] = args.values[i];
  __syncthreads();
  if (t == 0) {
    float sum = 0;
    for (unsigned k = 0; k < threads; ++k) sum += cache[k];
    args.partials[blockIdx.x] = sum;
  }
  if (fault == Fault::kMixedBarriers && blockIdx.x == 1 && t == 3) {
    __syncthreads();
  } else if (fault == Fault::kThreadReturns && blockIdx.x == 1 && t == 3) {
    return;
  } else if (fault == Fault::kBlockReturns && blockIdx.x == 1) {
    return;
  }
  cooperative_groups::this_grid().sync();
  args.shared_kept[i] = cache[t] == args.values[i];  // each resident block keeps its shared memory
  float total = 0;
  for (unsigned k = 0; k < gridDim.x; ++k) total += args.partials[k];
  args.totals[i] = total;
}

struct Buffers {
  std::vector<float> values, partials, totals;
  std::vector<int> shared_kept;
  Buffers(unsigned blocks, unsigned threads)
      : values(blocks * threads), partials(blocks, NAN), totals(blocks * threads, NAN),
        shared_kept(blocks * threads, -1) {
    for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i % 7);
  }
  SumArgs args() { return SumArgs{values.data(), partials.data(), totals.data(), shared_kept.data()}; }
};

cudaError_t launch_cooperatively(Buffers& buffers, dim3 grid, dim3 block, Fault fault) {
  SumArgs args = buffers.args();
  void* kernel_args[] = {&args, &fault};
  cudaStream_t stream = nullptr;
  return cudaLaunchCooperativeKernel(&grid_sum_kernel<0>, grid, block, kernel_args, 0, stream);
}

// Never called: its instantiation is listed in the launch counts all the same, with 0 launches.
cudaError_t never_launched(SumArgs args, Fault fault) {
  void* kernel_args[] = {&args, &fault};
  return cudaLaunchCooperativeKernel(&grid_sum_kernel<1>, dim3(2), dim3(32), kernel_args, 0, nullptr);
}

// The totals against the sum of all values (summed block by block, as the kernel does: exact, the
// values being small integers), and whether every block kept its shared memory.
void report(const char* name, const Buffers& buffers) {
  double expected = 0;
  for (const float value : buffers.values) expected += value;
  size_t right = 0, nan = 0, kept = 0;
  for (size_t i = 0; i < buffers.totals.size(); ++i) {
    right += buffers.totals[i] == expected;
    nan += std::isnan(buffers.totals[i]);
    kept += buffers.shared_kept[i] == 1;
  }
  std::printf("%s: threads %zu right %zu nan %zu kept %zu\n", name, buffers.totals.size(), right,
              nan, kept);
}

int main(int argc, char** argv) {
  const std::string scenario = argc > 1 ? argv[1] : "";
  const unsigned blocks = argc > 2 ? std::atoi(argv[2]) : 8;
  const dim3 block(argc > 3 ? std::atoi(argv[3]) : 64, argc > 4 ? std::atoi(argv[4]) : 1);
  const unsigned threads = block.x * block.y;
  if (scenario == "sum") {  // twice: the second launch reuses the first one's blocks and fibers
    for (const char* name : {"first", "second"}) {
      Buffers buffers(blocks, threads);
      const cudaError_t status = launch_cooperatively(buffers, dim3(blocks), block, Fault::kNone);
      std::printf("status: %s\n", cudaGetErrorString(status));
      report(name, buffers);
    }
  } else if (scenario == "occupancy") {
    int per_sm = -1;
    const cudaError_t status =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, grid_sum_kernel<0>, threads, 0);
    std::printf("status: %s\nblocks per SM: %d\n", cudaGetErrorString(status), per_sm);
  } else if (scenario == "launch") {  // one launch, whatever its status
    Buffers buffers(blocks, threads);
    const cudaError_t status = launch_cooperatively(buffers, dim3(blocks), block, Fault::kNone);
    std::printf("status: %s\n", cudaGetErrorString(status));
    std::printf("last error: %s\n", cudaGetErrorString(cudaGetLastError()));
    std::printf("last error again: %s\n", cudaGetErrorString(cudaGetLastError()));
    report("launch", buffers);
  } else if (scenario == "misuse") {  // each fault, then a <<<>>> launch, then a good launch
    for (const Fault fault : {Fault::kMixedBarriers, Fault::kThreadReturns, Fault::kBlockReturns}) {
      Buffers buffers(blocks, threads);
      try {
        launch_cooperatively(buffers, dim3(blocks), block, fault);
        std::printf("error: none\n");
      } catch (const std::runtime_error& error) {
        std::printf("error: %s\n", error.what());
      }
    }
    Buffers buffers(blocks, threads);
    try {
      grid_sum_kernel<0><<<blocks, block>>>(buffers.args(), Fault::kNone);
      std::printf("error: none\n");
    } catch (const std::runtime_error& error) {
      std::printf("error: %s\n", error.what());
    }
    Buffers after(blocks, threads);
    launch_cooperatively(after, dim3(blocks), block, Fault::kNone);
    report("after", after);
  } else {
    std::fprintf(stderr, "unknown scenario '%s'\n", scenario.c_str());
    return 2;
  }
  std::printf("%s", cmbn_emulation_launch_counts());  // "kernel<TAB>phase<TAB>launches" lines
  return 0;
}
