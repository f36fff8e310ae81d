// Context switching for cuda_emu's fibers (see fiber.h).
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace cuda_emu {

#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* new_sp);
extern "C" void cuda_emu_trampoline();

// cuda_emu_switch(save, next): pushes the System V callee-saved registers, the x87 control
// word and MXCSR, stores rsp in *save, loads next and pops the same frame there.
// cuda_emu_trampoline: first frame of a new context; calls r13(r12) on an aligned stack.
asm(R"(
    .text
    .globl cuda_emu_switch
    .type cuda_emu_switch, @function
cuda_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr 8(%rsp)
    fldcw (%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_emu_switch, .-cuda_emu_switch

    .globl cuda_emu_trampoline
    .type cuda_emu_trampoline, @function
cuda_emu_trampoline:
    movq %r12, %rdi
    andq $-16, %rsp
    call *%r13
    ud2
    .size cuda_emu_trampoline, .-cuda_emu_trampoline
)");

void context_init(Context& c, char* lo, size_t size, void (*entry)(void*), void* arg) {
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  auto* p = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(lo + size)) & ~uintptr_t(15));
  *--p = 0;                                                  // alignment padding
  *--p = reinterpret_cast<uint64_t>(&cuda_emu_trampoline);   // return address of the switch
  *--p = 0;                                                  // rbp
  *--p = 0;                                                  // rbx
  *--p = reinterpret_cast<uint64_t>(arg);                    // r12
  *--p = reinterpret_cast<uint64_t>(entry);                  // r13
  *--p = 0;                                                  // r14
  *--p = 0;                                                  // r15
  *--p = mxcsr;                                              // 8(%rsp)
  *--p = fcw;                                                // (%rsp)
  c.sp = p;
}

void context_switch(Context& from, Context& to) { cuda_emu_switch(&from.sp, to.sp); }

#else

namespace {
void ucontext_entry(unsigned hi_e, unsigned lo_e, unsigned hi_a, unsigned lo_a) {
  auto entry = reinterpret_cast<void (*)(void*)>((static_cast<uintptr_t>(hi_e) << 32) | lo_e);
  auto arg = reinterpret_cast<void*>((static_cast<uintptr_t>(hi_a) << 32) | lo_a);
  entry(arg);
  std::abort();
}
}  // namespace

void context_init(Context& c, char* lo, size_t size, void (*entry)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  const auto e = reinterpret_cast<uintptr_t>(entry);
  const auto a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(ucontext_entry), 4, static_cast<unsigned>(e >> 32),
              static_cast<unsigned>(e), static_cast<unsigned>(a >> 32), static_cast<unsigned>(a));
}

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

#endif

char* stack_alloc(size_t size) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("cuda_emu: mmap of a fiber stack");
    std::abort();
  }
  mprotect(p, page, PROT_NONE);
  return static_cast<char*>(p) + page;
}

}  // namespace cuda_emu
