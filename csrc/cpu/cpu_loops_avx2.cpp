// The avx2 build of the CPU kernels' loops (cpu_loops.h): at::vec's AVX2 vectors, for CPUs that have
// them (use_avx2_loops). Without it the extension's default x86-64 flags leave at::vec with plain
// arrays of SSE2 registers, several times slower on cached data. The target is set here, around the
// loops only, so the rest of the extension (ATen's and c10's inline functions included) keeps the
// default flags and still runs on any x86-64 CPU. No FMA: the two builds give the same bits (but for
// the transcendental activations, see cpu_kernel_utils.h).
#include "cpu_kernel_utils.h"

#ifdef CMBN_CPU_AVX2_LOOPS

#pragma GCC push_options
#pragma GCC target("avx2,f16c")
// GCC's C++ front end does not define the target's macros after the pragma, and sleef.h (included by
// at::vec's AVX2 vectors) declares its 256-bit functions only under them: defined for these headers.
#if !defined(__AVX2__)
#define CMBN_DEFINED_AVX_MACROS
#define __AVX__ 1
#define __AVX2__ 1
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define CMBN_CPU_LOOPS avx2
#include "cpu_loops.h"
#ifdef CMBN_DEFINED_AVX_MACROS
#undef __AVX__
#undef __AVX2__
#undef __F16C__
#endif

namespace cmbn {
namespace cpu {
namespace avx2 {

template void run_forward<float, float>(const ForwardCall<float, float>&);
template void run_forward<double, double>(const ForwardCall<double, double>&);
template void run_forward<at::Half, float>(const ForwardCall<at::Half, float>&);
template void run_forward<at::BFloat16, float>(const ForwardCall<at::BFloat16, float>&);
template void run_backward<float, float>(const BackwardCall<float, float>&);
template void run_backward<double, double>(const BackwardCall<double, double>&);
template void run_backward<at::Half, float>(const BackwardCall<at::Half, float>&);
template void run_backward<at::BFloat16, float>(const BackwardCall<at::BFloat16, float>&);

}  // namespace avx2
}  // namespace cpu
}  // namespace cmbn

#pragma GCC pop_options

#endif  // CMBN_CPU_AVX2_LOOPS
