// cuda_emu's runtime: launches, the block scheduler, barriers, warp rendezvous, shared
// memory, faults and coverage (API in include/cuda_emu.h).
//
// A launch runs every block before it returns. Blocks are handed to `workers` OS threads;
// a block runs on one of them, its CUDA threads as fibers that switch only at __syncthreads,
// warp operations and exit, in the configured order. Rules enforced (each a fault naming the
// kernel, block, thread and file:line):
//   - __syncthreads completes when every thread of the block waits at the same call site; a
//     thread waiting at another site, or a thread that has exited, is a fault;
//   - a warp operation completes when every lane of its mask has arrived at the same call site
//     with the same mask; a lane of the mask that exits, or goes to another synchronisation
//     point instead, is a fault; so is a mask without the calling lane or naming lanes the
//     block does not have, and a shuffle reading a lane outside the mask;
//   - no runnable thread left while some have not exited: a deadlock, reported with where
//     each waiting group stands;
//   - launch configuration within an H100's limits.
// ThreadSanitizer builds (CUDA_EMU_TSAN, this file itself uninstrumented) give every fiber its
// own TSan context and switch without synchronisation, so only barriers, __syncwarp and
// atomics order the threads of a block: a missing __syncthreads is reported as a data race.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <thread>

#include "cuda_emu.h"
#include "fiber.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif
#if defined(CUDA_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

namespace cuda_emu {

namespace {

constexpr size_t kStackSize = 256 * 1024;
constexpr size_t kStaticSmemLimit = 48 * 1024;
constexpr size_t kDefaultDynSmemLimit = 48 * 1024;
constexpr size_t kOptinSmemLimit = 227 * 1024;
constexpr int kMaxFaultsKept = 64;

// ---------------------------------------------------------------- sanitizer hooks
inline void tsan_acquire(void* a) {
#if defined(CUDA_EMU_TSAN)
  __tsan_acquire(a);
#else
  (void)a;
#endif
}
inline void tsan_release(void* a) {
#if defined(CUDA_EMU_TSAN)
  __tsan_release(a);
#else
  (void)a;
#endif
}

#if defined(CUDA_EMU_TSAN)
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#endif
inline void tsan_ignore_writes(bool begin) {
#if defined(CUDA_EMU_TSAN)
  if (begin) AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  else AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
#else
  (void)begin;
#endif
}

// ---------------------------------------------------------------- global state
std::mutex g_mu;
Config g_config;
std::vector<std::string> g_faults;
std::map<std::string, long> g_counts;
std::map<const void*, int> g_max_dyn_smem;
std::vector<struct Worker*> g_free_workers;

thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_error_detail;
thread_local cudaError_t t_detail_code = cudaSuccess;

thread_local std::string* t_launch_fault = nullptr;  // first fault of the launch this thread works on

void record_fault(const std::string& msg) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_faults.size() < kMaxFaultsKept) g_faults.push_back(msg);
  if (t_launch_fault && t_launch_fault->empty()) *t_launch_fault = msg;
}
void set_error(cudaError_t e, const std::string& detail) {
  if (t_last_error == cudaSuccess) t_last_error = e;
  t_detail_code = e;
  t_error_detail = detail;
}

std::string kernel_name(const char* pretty) {
  std::string s(pretty);
  const size_t at = s.find("K = ");
  if (at == std::string::npos) return s;
  s = s.substr(at + 4);
  if (!s.empty() && s.back() == ']') s.pop_back();
  return s;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::idx: return "__shfl_sync";
    case WarpOp::up: return "__shfl_up_sync";
    case WarpOp::down: return "__shfl_down_sync";
    case WarpOp::bfly: return "__shfl_xor_sync";
    case WarpOp::ballot: return "__ballot_sync";
    case WarpOp::any: return "__any_sync";
    case WarpOp::all: return "__all_sync";
    case WarpOp::sync: return "__syncwarp";
    case WarpOp::active: return "__activemask";
  }
  return "?";
}

bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || std::strcmp(f1, f2) == 0);
}

std::string where(const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  std::ostringstream o;
  o << (base ? base + 1 : file) << ":" << line;
  return o.str();
}

std::string lanes(unsigned mask) {
  std::ostringstream o;
  bool first = true;
  for (int i = 0; i < 32;) {
    if (!(mask >> i & 1u)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < 32 && (mask >> (j + 1) & 1u)) ++j;
    o << (first ? "" : ",") << i;
    if (j > i) o << "-" << j;
    first = false;
    i = j + 1;
  }
  return first ? std::string("none") : o.str();
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---------------------------------------------------------------- workers and fibers
enum class FState : uint8_t { ready, barrier, warp, exited };

struct Fiber {
  Context ctx;
  char* stack_lo = nullptr;
  uint3 tid{0, 0, 0};
  unsigned flat = 0;
  FState state = FState::ready;
  const char* file = "";  // where it waits
  int line = 0;
  WarpOp op = WarpOp::sync;
  uint64_t result = 0;
  unsigned gen = 0;     // barrier / __syncwarp generation it waits on (TSan token parity)
  bool dirty = false;   // abandoned mid-kernel: its stack shadow needs resetting
  void* tsan = nullptr;
  void* asan_fake = nullptr;
};

struct WarpGroup {
  const char* file;
  int line;
  WarpOp op;
  unsigned mask;
  unsigned arrived;
  int width;
  uint64_t values[32];
  int params[32];
};

struct SharedAlloc {
  const char* file;
  int line;
  size_t bytes;
  void* ptr;
};

struct LaunchState {
  const LaunchSpec* spec;
  KernelBody* body;
  std::string name;
  uint64_t nblocks;
  unsigned nthreads;
  uint64_t seed;
};

struct Worker {
  std::vector<std::unique_ptr<Fiber>> fibers;
  Context sched;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* sched_fake = nullptr;
  void* tsan_self = nullptr;

  // the block being run
  const LaunchState* launch = nullptr;
  uint3 bidx{0, 0, 0};
  dim3 bdim, gdim;
  unsigned n = 0;
  unsigned char* dyn_smem = nullptr;
  size_t static_bytes = 0;
  std::vector<SharedAlloc> statics;
  uint64_t ready[1024 / 64];
  unsigned live = 0, exited = 0, at_barrier = 0, bar_gen = 0;
  const char* bar_file = "";
  int bar_line = 0;
  std::vector<WarpGroup> groups[32];
  unsigned warp_gen[32];
  bool abort = false;
  uint64_t rng = 0;
  Schedule schedule = Schedule::forward;

  // TSan synchronisation objects (only their addresses matter)
  char block_start = 0, block_end = 0, bar_token[2] = {0, 0}, warp_token[32][2] = {};
};

thread_local Worker* t_worker = nullptr;
thread_local Fiber* t_fiber = nullptr;

Worker* acquire_worker() {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_free_workers.empty()) return new Worker();
  Worker* w = g_free_workers.back();
  g_free_workers.pop_back();
  return w;
}
void release_worker(Worker* w) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_free_workers.push_back(w);
}

std::string thread_desc(const Worker& w, const Fiber& f) {
  std::ostringstream o;
  o << w.launch->name << " block (" << w.bidx.x << "," << w.bidx.y << "," << w.bidx.z << ") thread (" << f.tid.x
    << "," << f.tid.y << "," << f.tid.z << ") [warp " << f.flat / 32 << " lane " << f.flat % 32 << "]";
  return o.str();
}

// Fiber side: give control back to the scheduler (for good when exiting).
void yield_to_scheduler(Worker& w, Fiber& f, bool exiting) {
#if defined(CUDA_EMU_TSAN)
  __tsan_switch_to_fiber(w.tsan_self, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(EMU_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.asan_fake, w.sched_stack_bottom, w.sched_stack_size);
#else
  (void)exiting;
#endif
  context_switch(f.ctx, w.sched);
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(f.asan_fake, &w.sched_stack_bottom, &w.sched_stack_size);
#endif
}

// Fiber side: a rule was broken. The block is abandoned; this fiber never resumes.
[[noreturn]] void fiber_fault(Worker& w, Fiber& f, const std::string& what) {
  record_fault("cuda_emu: " + thread_desc(w, f) + ": " + what);
  w.abort = true;
  yield_to_scheduler(w, f, false);
  std::abort();  // unreachable: abandoned fibers are never resumed
}

void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  Worker& w = *t_worker;
#if defined(EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &w.sched_stack_bottom, &w.sched_stack_size);
#endif
  tsan_acquire(&w.block_start);
  w.launch->body->run();
  tsan_release(&w.block_end);
  f.state = FState::exited;
  yield_to_scheduler(w, f, true);
  std::abort();
}

void set_ready(Worker& w, unsigned i) {
  w.ready[i / 64] |= uint64_t(1) << (i % 64);
  w.fibers[i]->state = FState::ready;
}

int pick_ready(Worker& w) {
  const unsigned words = (w.n + 63) / 64;
  if (w.schedule == Schedule::forward) {
    for (unsigned k = 0; k < words; ++k)
      if (w.ready[k]) return static_cast<int>(k * 64 + __builtin_ctzll(w.ready[k]));
  } else if (w.schedule == Schedule::reverse) {
    for (unsigned k = words; k-- > 0;)
      if (w.ready[k]) return static_cast<int>(k * 64 + 63 - __builtin_clzll(w.ready[k]));
  } else {
    unsigned total = 0;
    for (unsigned k = 0; k < words; ++k) total += static_cast<unsigned>(__builtin_popcountll(w.ready[k]));
    if (total == 0) return -1;
    unsigned r = static_cast<unsigned>(splitmix(w.rng) % total);
    for (unsigned k = 0; k < words; ++k) {
      uint64_t bits = w.ready[k];
      const unsigned c = static_cast<unsigned>(__builtin_popcountll(bits));
      if (r >= c) {
        r -= c;
        continue;
      }
      while (r--) bits &= bits - 1;
      return static_cast<int>(k * 64 + __builtin_ctzll(bits));
    }
  }
  return -1;
}

// Where thread i stands, for fault reports.
std::string state_desc(const Fiber& f) {
  switch (f.state) {
    case FState::exited: return "exited";
    case FState::barrier: return "waits at __syncthreads (" + where(f.file, f.line) + ")";
    case FState::warp: return std::string("waits at ") + op_name(f.op) + " (" + where(f.file, f.line) + ")";
    case FState::ready: return "is runnable";
  }
  return "?";
}

// A lane arriving at a synchronisation point (or exiting) while a pending warp operation at
// another site names it: that operation can never complete.
void check_pending_warp_ops(Worker& w, Fiber& f, const char* what, const char* file, int line, bool exiting) {
  const unsigned warp = f.flat / 32, bit = 1u << (f.flat % 32);
  for (const WarpGroup& g : w.groups[warp]) {
    if (!(g.mask & bit) || (g.arrived & bit)) continue;
    if (!exiting && same_site(g.file, g.line, file, line)) continue;
    std::ostringstream o;
    o << "divergent warp: lanes " << lanes(g.arrived) << " wait at " << op_name(g.op) << " (" << where(g.file, g.line)
      << ") with mask 0x" << std::hex << g.mask << std::dec << ", but lane " << f.flat % 32
      << (exiting ? std::string(" exited without reaching it")
                   : std::string(" went to ") + what + " (" + where(file, line) + ") instead");
    if (exiting) {
      record_fault("cuda_emu: " + thread_desc(w, f) + ": " + o.str());
      w.abort = true;
      return;
    }
    fiber_fault(w, f, o.str());
  }
}

void report_deadlock(Worker& w) {
  std::ostringstream o;
  o << "cuda_emu: " << w.launch->name << " block (" << w.bidx.x << "," << w.bidx.y << "," << w.bidx.z
    << "): deadlock, no thread can run:";
  if (w.at_barrier) o << " " << w.at_barrier << " thread(s) wait at __syncthreads (" << where(w.bar_file, w.bar_line) << ");";
  for (unsigned warp = 0; warp < 32; ++warp) {
    for (const WarpGroup& g : w.groups[warp]) {
      o << " warp " << warp << " lanes " << lanes(g.arrived) << " wait at " << op_name(g.op) << " ("
        << where(g.file, g.line) << ") for lanes " << lanes(g.mask & ~g.arrived);
      for (unsigned l = 0; l < 32; ++l) {
        if (!((g.mask & ~g.arrived) >> l & 1u)) continue;
        const unsigned i = warp * 32 + l;
        if (i < w.n) o << " [lane " << l << " " << state_desc(*w.fibers[i]) << "]";
      }
      o << ";";
    }
  }
  record_fault(o.str());
  w.abort = true;
}

// Scheduler side: bookkeeping after fiber f exited.
void on_exit(Worker& w, Fiber& f) {
  --w.live;
  ++w.exited;
  check_pending_warp_ops(w, f, "", "", 0, /*exiting=*/true);
  if (!w.abort && w.at_barrier > 0) {
    record_fault("cuda_emu: " + thread_desc(w, f) + ": exited while " + std::to_string(w.at_barrier) +
                 " thread(s) wait at __syncthreads (" + where(w.bar_file, w.bar_line) + ")");
    w.abort = true;
  }
}

void init_fiber(Worker& w, unsigned i) {
  while (w.fibers.size() <= i) {
    auto f = std::make_unique<Fiber>();
    f->stack_lo = stack_alloc(kStackSize);
#if defined(CUDA_EMU_TSAN)
    f->tsan = __tsan_create_fiber(0);
#endif
    w.fibers.push_back(std::move(f));
  }
  Fiber& f = *w.fibers[i];
#if defined(EMU_ASAN)
  // Frames left by an abandoned run, or by the last frames of a finished one.
  const size_t reset = f.dirty ? kStackSize : 32 * 1024;
  __asan_unpoison_memory_region(f.stack_lo + kStackSize - reset, reset);
#endif
  f.dirty = false;
  f.flat = i;
  f.tid = uint3{i % w.bdim.x, (i / w.bdim.x) % w.bdim.y, i / (w.bdim.x * w.bdim.y)};
  f.state = FState::ready;
  f.asan_fake = nullptr;
  context_init(f.ctx, f.stack_lo, kStackSize, &fiber_main, &f);
}

void free_shared(Worker& w) {
  std::free(w.dyn_smem);
  w.dyn_smem = nullptr;
  for (SharedAlloc& a : w.statics) std::free(a.ptr);
  w.statics.clear();
  w.static_bytes = 0;
}

// Runs one block to completion. False when a fault abandoned it.
bool run_block(Worker& w, const LaunchState& L, uint64_t linear) {
  const LaunchSpec& s = *L.spec;
  w.launch = &L;
  w.bdim = s.block;
  w.gdim = s.grid;
  w.bidx = uint3{static_cast<unsigned>(linear % s.grid.x), static_cast<unsigned>((linear / s.grid.x) % s.grid.y),
                 static_cast<unsigned>(linear / (static_cast<uint64_t>(s.grid.x) * s.grid.y))};
  w.n = L.nthreads;
  void* p = nullptr;
  if (posix_memalign(&p, 16, s.dynamic_smem) != 0) std::abort();
  std::memset(p, 0xFF, s.dynamic_smem);
  w.dyn_smem = static_cast<unsigned char*>(p);
  std::memset(w.ready, 0, sizeof(w.ready));
  for (unsigned i = 0; i < w.n; ++i) {
    init_fiber(w, i);
    set_ready(w, i);
  }
  w.live = w.n;
  w.exited = w.at_barrier = 0;
  w.bar_gen = 0;
  for (auto& g : w.groups) g.clear();
  std::memset(w.warp_gen, 0, sizeof(w.warp_gen));
  w.abort = false;
  uint64_t seed = L.seed ^ (linear * 0xD1B54A32D192ED03ull);
  w.rng = splitmix(seed);
  tsan_release(&w.block_start);
  while (!w.abort) {
    const int i = pick_ready(w);
    if (i < 0) {
      if (w.live > 0) report_deadlock(w);
      break;
    }
    Fiber& f = *w.fibers[static_cast<unsigned>(i)];
    w.ready[i / 64] &= ~(uint64_t(1) << (i % 64));
    t_fiber = &f;
#if defined(CUDA_EMU_TSAN)
    __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(EMU_ASAN)
    __sanitizer_start_switch_fiber(&w.sched_fake, f.stack_lo, kStackSize);
#endif
    context_switch(w.sched, f.ctx);
#if defined(EMU_ASAN)
    __sanitizer_finish_switch_fiber(w.sched_fake, nullptr, nullptr);
#endif
    t_fiber = nullptr;
    if (f.state == FState::exited) on_exit(w, f);
  }
  const bool ok = !w.abort;
  if (!ok) {
    for (unsigned i = 0; i < w.n; ++i) {
      Fiber& f = *w.fibers[i];
      if (f.state == FState::exited) continue;
      f.dirty = true;
#if defined(CUDA_EMU_TSAN)
      // An abandoned thread publishes what it did, as an exiting one does (without running).
      __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
      __tsan_release(&w.block_end);
      __tsan_switch_to_fiber(w.tsan_self, __tsan_switch_to_fiber_no_sync);
#endif
    }
  }
  tsan_acquire(&w.block_end);
  free_shared(w);
  return ok;
}

std::string config_error(const LaunchSpec& s, size_t max_dyn) {
  std::ostringstream o;
  const uint64_t threads = static_cast<uint64_t>(s.block.x) * s.block.y * s.block.z;
  if (s.grid.x == 0 || s.grid.y == 0 || s.grid.z == 0) o << "grid has a zero dimension";
  else if (s.grid.x > 2147483647u || s.grid.y > 65535u || s.grid.z > 65535u) o << "grid exceeds (2^31-1, 65535, 65535)";
  else if (s.block.x == 0 || s.block.y == 0 || s.block.z == 0) o << "block has a zero dimension";
  else if (s.block.x > 1024 || s.block.y > 1024 || s.block.z > 64) o << "block exceeds (1024, 1024, 64)";
  else if (threads > 1024) o << "block has " << threads << " threads (max 1024)";
  else if (s.dynamic_smem > max_dyn)
    o << s.dynamic_smem << " bytes of dynamic shared memory (max " << max_dyn
      << (max_dyn == kDefaultDynSmemLimit ? " without cudaFuncSetAttribute opt-in)" : ")");
  if (o.str().empty()) return std::string();
  std::ostringstream m;
  m << "invalid launch configuration: " << o.str() << "; grid (" << s.grid.x << "," << s.grid.y << "," << s.grid.z
    << ") block (" << s.block.x << "," << s.block.y << "," << s.block.z << ") smem " << s.dynamic_smem;
  return m.str();
}

// Block order of a launch: the k-th block started is order(k).
struct BlockOrder {
  uint64_t n, a = 1, b = 0;
  Schedule s;
  BlockOrder(uint64_t nblocks, Schedule sched, uint64_t seed) : n(nblocks), s(sched) {
    if (s == Schedule::random && n > 1) {
      uint64_t st = seed ^ 0x5DEECE66Dull;
      b = splitmix(st) % n;
      a = (splitmix(st) % n) | 1;
      while (std::gcd(a, n) != 1) a += 2;
    }
  }
  uint64_t operator()(uint64_t k) const {
    if (s == Schedule::reverse) return n - 1 - k;
    if (s == Schedule::random) return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * k + b) % n);
    return k;
  }
};

}  // namespace

// ---------------------------------------------------------------- API
void configure(const Config& c) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_config = c;
  if (g_config.workers < 1) g_config.workers = 1;
}
Config config() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_config;
}
std::vector<std::string> take_faults() {
  std::lock_guard<std::mutex> lk(g_mu);
  std::vector<std::string> out;
  out.swap(g_faults);
  return out;
}
std::map<std::string, long> launch_counts() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_counts;
}
void reset_launch_counts() {
  std::lock_guard<std::mutex> lk(g_mu);
  g_counts.clear();
}
void set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_max_dyn_smem[kernel] = bytes;
}

const uint3& thread_idx() { return t_fiber->tid; }
const uint3& block_idx() { return t_worker->bidx; }
const dim3& block_dim() { return t_worker->bdim; }
const dim3& grid_dim() { return t_worker->gdim; }

void syncthreads(const char* file, int line) {
  Worker& w = *t_worker;
  Fiber& f = *t_fiber;
  check_pending_warp_ops(w, f, "__syncthreads", file, line, false);
  if (w.exited > 0) {
    fiber_fault(w, f, "__syncthreads (" + where(file, line) + ") reached after " + std::to_string(w.exited) +
                          " thread(s) of the block exited");
  }
  if (w.at_barrier == 0) {
    w.bar_file = file;
    w.bar_line = line;
  } else if (!same_site(file, line, w.bar_file, w.bar_line)) {
    fiber_fault(w, f, "divergent __syncthreads: this thread waits at " + where(file, line) + " while " +
                          std::to_string(w.at_barrier) + " thread(s) wait at " + where(w.bar_file, w.bar_line));
  }
  f.state = FState::barrier;
  f.file = file;
  f.line = line;
  f.gen = w.bar_gen;
  ++w.at_barrier;
  tsan_release(&w.bar_token[f.gen & 1]);
  if (w.at_barrier == w.live) {
    for (unsigned i = 0; i < w.n; ++i)
      if (w.fibers[i]->state == FState::barrier) set_ready(w, i);
    w.at_barrier = 0;
    ++w.bar_gen;
  }
  yield_to_scheduler(w, f, false);
  tsan_acquire(&w.bar_token[f.gen & 1]);
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int param, int width, const char* file, int line) {
  Worker& w = *t_worker;
  Fiber& f = *t_fiber;
  const unsigned warp = f.flat / 32, lane = f.flat % 32, bit = 1u << lane;
  const unsigned base = warp * 32;
  const unsigned present = w.n - base >= 32 ? 0xffffffffu : ((1u << (w.n - base)) - 1u);
  if (op == WarpOp::active) {
    unsigned m = 0;
    for (unsigned l = 0; l < 32; ++l)
      if ((present >> l & 1u) && w.fibers[base + l]->state != FState::exited) m |= 1u << l;
    return m;
  }
  if (!(mask & bit) || (mask & ~present) || width < 1 || width > 32 || (width & (width - 1))) {
    std::ostringstream err;
    err << op_name(op) << " (" << where(file, line) << ") with mask 0x" << std::hex << mask << std::dec << " width "
        << width << ": ";
    if (!(mask & bit)) err << "the mask does not include the calling lane";
    else if (mask & ~present) err << "the mask names lanes this block does not have (" << w.n << " threads)";
    else err << "width must be a power of 2 up to 32";
    fiber_fault(w, f, err.str());
  }
  check_pending_warp_ops(w, f, op_name(op), file, line, false);
  WarpGroup* g = nullptr;
  for (WarpGroup& c : w.groups[warp])
    if (same_site(c.file, c.line, file, line)) g = &c;
  if (g && (g->mask != mask || g->op != op || g->width != width)) {
    std::ostringstream o;
    o << op_name(op) << " (" << where(file, line) << "): lanes " << lanes(g->arrived) << " use mask 0x" << std::hex
      << g->mask << std::dec << " width " << g->width << ", lane " << lane << " mask 0x" << std::hex << mask << std::dec
      << " width " << width;
    fiber_fault(w, f, o.str());
  }
  if (!g) {
    for (const WarpGroup& c : w.groups[warp]) {
      if (c.mask & mask) {
        std::ostringstream o;
        o << "divergent warp: lane " << lane << " arrives at " << op_name(op) << " (" << where(file, line)
          << ") while lanes " << lanes(c.arrived) << " wait at " << op_name(c.op) << " (" << where(c.file, c.line)
          << ") with an overlapping mask";
        fiber_fault(w, f, o.str());
      }
    }
    w.groups[warp].push_back(WarpGroup{file, line, op, mask, 0u, width, {}, {}});
    g = &w.groups[warp].back();
  }
  g->values[lane] = value;
  g->params[lane] = param;
  g->arrived |= bit;
  f.state = FState::warp;
  f.file = file;
  f.line = line;
  f.op = op;
  f.gen = w.warp_gen[warp];
  if (op == WarpOp::sync) tsan_release(&w.warp_token[warp][f.gen & 1]);
  if (g->arrived == g->mask) {
    uint64_t any = 0, all = 1, ballot = 0;
    for (unsigned l = 0; l < 32; ++l) {
      if (!(g->mask >> l & 1u)) continue;
      any |= g->values[l] != 0;
      all &= g->values[l] != 0;
      if (g->values[l] != 0) ballot |= 1u << l;
    }
    for (unsigned l = 0; l < 32; ++l) {
      if (!(g->mask >> l & 1u)) continue;
      const int seg = static_cast<int>(l) & ~(g->width - 1);
      const int p = g->params[l];
      int src = static_cast<int>(l);
      switch (op) {
        case WarpOp::idx: src = seg + (((p % g->width) + g->width) % g->width); break;
        case WarpOp::up: src = static_cast<int>(l) - p < seg ? static_cast<int>(l) : static_cast<int>(l) - p; break;
        case WarpOp::down:
          src = static_cast<int>(l) + p >= seg + g->width ? static_cast<int>(l) : static_cast<int>(l) + p;
          break;
        case WarpOp::bfly: src = (static_cast<int>(l) ^ p) >= seg + g->width ? static_cast<int>(l) : (static_cast<int>(l) ^ p); break;
        default: break;
      }
      uint64_t r = 0;
      switch (op) {
        case WarpOp::idx:
        case WarpOp::up:
        case WarpOp::down:
        case WarpOp::bfly:
          if (src < 0 || src > 31 || !(g->mask >> src & 1u)) {
            std::ostringstream o;
            o << op_name(op) << " (" << where(file, line) << "): lane " << l << " reads lane " << src
              << ", which is not in the mask 0x" << std::hex << g->mask;
            fiber_fault(w, f, o.str());
          }
          r = g->values[src];
          break;
        case WarpOp::ballot: r = ballot; break;
        case WarpOp::any: r = any; break;
        case WarpOp::all: r = all; break;
        default: break;
      }
      w.fibers[base + l]->result = r;
      set_ready(w, base + l);
    }
    w.groups[warp].erase(w.groups[warp].begin() + (g - w.groups[warp].data()));
    if (op == WarpOp::sync) ++w.warp_gen[warp];
  }
  yield_to_scheduler(w, f, false);
  if (op == WarpOp::sync) tsan_acquire(&w.warp_token[warp][f.gen & 1]);
  return f.result;
}

void* static_shared(size_t bytes, size_t align, const char* file, int line) {
  Worker& w = *t_worker;
  for (const SharedAlloc& a : w.statics)
    if (same_site(a.file, a.line, file, line)) return a.ptr;
  if (w.static_bytes + bytes > kStaticSmemLimit) {
    fiber_fault(w, *t_fiber, "static shared memory of the block exceeds 48 KB (" + std::to_string(w.static_bytes + bytes) +
                                 " bytes, declared at " + where(file, line) + ")");
  }
  // Allocated inside a fiber: not a write of that thread as far as TSan is concerned.
  tsan_ignore_writes(true);
  void* p = nullptr;
  if (posix_memalign(&p, std::max(align, sizeof(void*)), bytes) != 0) std::abort();
  std::memset(p, 0xFF, bytes);
  tsan_ignore_writes(false);
  w.statics.push_back(SharedAlloc{file, line, bytes, p});
  w.static_bytes += bytes;
  return p;
}

unsigned char* dynamic_shared() { return t_worker->dyn_smem; }

cudaError_t launch(const LaunchSpec& spec, KernelBody& body) {
  LaunchState L;
  L.spec = &spec;
  L.body = &body;
  L.name = kernel_name(spec.kernel_name);
  Config cfg;
  size_t max_dyn = kDefaultDynSmemLimit;
  {
    std::lock_guard<std::mutex> lk(g_mu);
    ++g_counts[L.name];
    cfg = g_config;
    auto it = g_max_dyn_smem.find(spec.kernel);
    if (it != g_max_dyn_smem.end()) max_dyn = std::max<size_t>(max_dyn, std::min<size_t>(it->second, kOptinSmemLimit));
  }
  const std::string bad = config_error(spec, max_dyn);
  if (!bad.empty()) {
    const std::string msg = "cuda_emu: " + L.name + " at " + where(spec.file, spec.line) + ": " + bad;
    record_fault(msg);
    set_error(spec.dynamic_smem > max_dyn ? cudaErrorInvalidValue : cudaErrorInvalidConfiguration, msg);
    return t_last_error;
  }
  L.nblocks = static_cast<uint64_t>(spec.grid.x) * spec.grid.y * spec.grid.z;
  L.nthreads = spec.block.x * spec.block.y * spec.block.z;
  L.seed = cfg.seed;
  const BlockOrder order(L.nblocks, cfg.schedule, cfg.seed);
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::string first_fault;
  auto work = [&]() {
    Worker* w = acquire_worker();
    t_worker = w;
    t_launch_fault = &first_fault;
#if defined(CUDA_EMU_TSAN)
    w->tsan_self = __tsan_get_current_fiber();
#endif
    w->schedule = cfg.schedule;
    for (;;) {
      if (failed.load()) break;
      const uint64_t k = next.fetch_add(1);
      if (k >= L.nblocks) break;
      if (!run_block(*w, L, order(k))) failed.store(true);
    }
    t_worker = nullptr;
    t_launch_fault = nullptr;
    release_worker(w);
  };
  const int nworkers = static_cast<int>(std::min<uint64_t>(static_cast<uint64_t>(cfg.workers), L.nblocks));
  std::vector<std::thread> threads;
  for (int i = 1; i < nworkers; ++i) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  if (failed.load()) set_error(cudaErrorLaunchFailure, "launched at " + where(spec.file, spec.line) + ": " + first_fault);
  return failed.load() ? cudaErrorLaunchFailure : cudaSuccess;
}

}  // namespace cuda_emu

// ---------------------------------------------------------------- CUDA host API
cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::t_last_error;
  cuda_emu::t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return cuda_emu::t_last_error; }
const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t err) {
  if (err != cudaSuccess && err == cuda_emu::t_detail_code) return cuda_emu::t_error_detail.c_str();
  return cudaGetErrorName(err);
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = cuda_emu::config().multiprocessor_count; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
