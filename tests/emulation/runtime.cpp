// The parts of the emulated runtime (cuda_runtime.h) that are defined once, not in every unit.
#include <string>

// The launch counts of this process as text, for emulation.launch_counts(): one
// "kernel<TAB>phase<TAB>launches" line per kernel instantiation and phase, sorted.
extern "C" const char* cmbn_emulation_launch_counts() {
  static std::string text;
  text.clear();
  for (const auto& [kernel, phases] : cmbn_emu::launch_counts()) {
    for (const auto& [phase, launches] : phases) {
      text += kernel + "\t" + phase + "\t" + std::to_string(launches) + "\n";
    }
  }
  return text.c_str();
}

#if defined(__x86_64__)
// cmbn_emu_switch_context(save, load): pushes the callee-saved registers and the SSE and x87 control
// words, stores the stack pointer to *save, takes `load` as the stack pointer and pops the same from
// it. cmbn_emu_context_start: where a new context (make_context) begins, calling the entry in r13.
asm(R"(
    .text
    .globl cmbn_emu_switch_context
    .type cmbn_emu_switch_context, @function
cmbn_emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cmbn_emu_switch_context, .-cmbn_emu_switch_context

    .globl cmbn_emu_context_start
    .type cmbn_emu_context_start, @function
cmbn_emu_context_start:
    callq *%r13
    ud2
    .size cmbn_emu_context_start, .-cmbn_emu_context_start
)");
#endif
