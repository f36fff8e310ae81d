// Cooperative execution contexts (one per emulated CUDA thread) on stacks of their own.
// x86-64: a hand-written switch of the callee-saved registers (no system call per switch);
// elsewhere: ucontext. Sanitizer bookkeeping for the switches lives in runtime.cpp.
#pragma once
#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emu {

struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Prepares `c` so that the first switch to it calls entry(arg) on the stack [lo, lo + size).
// entry must never return (it switches away for good instead).
void context_init(Context& c, char* lo, size_t size, void (*entry)(void*), void* arg);

// Saves the running context into `from` and resumes `to`.
void context_switch(Context& from, Context& to);

// A stack of `size` usable bytes with an inaccessible guard page below it (an overflow
// faults instead of corrupting a neighbour). Returns the low end of the usable part.
char* stack_alloc(size_t size);

}  // namespace cuda_emu
