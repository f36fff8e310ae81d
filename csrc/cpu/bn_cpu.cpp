// CPU backend: splits the tensor into fixed units (planar runs or channels-last row
// blocks), runs the ISA kernels over them with at::parallel_for, and merges partial results
// per channel in unit order. Unit boundaries depend only on the shape, so results are
// bitwise identical whatever the thread count or the path taken.
//
// Planar paths: when there are enough channels, each thread owns whole channels and runs
// stats + normalise (or reduce + dx) on a channel while it is still in its cache (2 passes
// over memory instead of 3; 3 instead of 5 backward), prefetching the channels ahead of it
// (PlanarDriver::prefetch_units). Otherwise units are spread over all threads and merged
// afterwards.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "../dispatch.h"
#include "../op_impl.h"
#include "kernels.h"

namespace fastbn {
namespace cpu {

// The last-level cache's size in bytes: the highest-level data cache the kernel lists for
// CPU 0 (/sys/devices/system/cpu/cpu0/cache), else sysconf's L3 or L2, else 32 MB. sysfs comes
// first because glibc's sysconf can be far off in a VM (320 MB for a 32 MB L3 on a 2-vCPU
// AMD EPYC guest).
int64_t last_level_cache_bytes() {
  int best_level = 0;
  int64_t best = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    int level = 0;
    std::string type, size;
    if (!(level_file >> level) || !(type_file >> type) || !(size_file >> size)) break;
    if (type == "Instruction" || size.empty() || level < best_level) continue;
    int64_t value = 0;
    size_t digits = 0;
    while (digits < size.size() && std::isdigit(static_cast<unsigned char>(size[digits])))
      value = value * 10 + (size[digits++] - '0');
    const char unit = digits < size.size() ? size[digits] : ' ';
    value <<= unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
    if (value > 0) {
      best_level = level;
      best = value;
    }
  }
  if (best > 0) return best;
  long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (v <= 0) v = sysconf(_SC_LEVEL2_CACHE_SIZE);
  return v > 0 ? static_cast<int64_t>(v) : int64_t(32) << 20;
}

namespace {

constexpr int64_t kRunMax = 2048;        // values per planar run (normalised while still in L1/L2)
constexpr int64_t kBlockValues = 65536;  // values per channels-last row block, about
constexpr int64_t kMinBlocks = 16;       // channels-last blocks, at least (when there are rows enough)
constexpr int64_t kMaxLaneTerms = 1024;  // periods (values a vector lane sees) per row block, at most
constexpr int64_t kTaskValues = 32768;   // values per parallel task, at least
constexpr int64_t kFoldTaskValues = 4096;  // partials per task of a channels-last fold, at least
constexpr int64_t kPlanarPrefetchBytes = 65536;  // fused per-channel paths: prefetch distance, at most
constexpr int64_t kStripChannels = 256;  // channels a channels-last strip (see RowBlocks)
constexpr int64_t kStripMinRows = 128;   // rows a channels-last block, below which wide rows are cut into strips

// last_level_cache_bytes, read once.
int64_t llc_bytes() {
  static const int64_t llc = last_level_cache_bytes();
  return llc;
}

// An on/off switch from the environment for measuring and testing both ways: -1 when `name` is
// unset, 0 when it is "0", else 1.
int env_switch(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr ? -1 : (std::strcmp(env, "0") == 0 ? 0 : 1);
}

// Whether a pass that reads and writes `bytes` in all (an elementwise pass, or a fused
// per-channel reduction and elementwise pass) stores its outputs non-temporally: when that
// exceeds the last-level cache. The output's lines are then not in
// the cache before the pass, so a plain store first reads each one from memory (the pass
// moves 3 tensors instead of 2 for one input and one output, 4 instead of 3 backward), and
// only the part of the output the cache still holds afterwards is spared its next reader:
// plain stores never move fewer bytes to and from memory. FASTBN_CPU_STREAM=0 or 1 turns it
// off or on for every size (read once; to measure both ways).
bool stream_outputs(int64_t bytes) {
  static const int forced = env_switch("FASTBN_CPU_STREAM");
  return forced >= 0 ? forced == 1 : bytes > llc_bytes();
}

// Whether a channels-last elementwise pass prefetches inputs of `bytes` in all: unless a
// reduction pass has just read them (`just_read`) and they fit in the last-level cache, where
// that pass left them (kernels_impl.h AheadInBlock; measured slower there).
bool prefetch_inputs(bool just_read, int64_t bytes) { return !just_read || bytes > llc_bytes(); }

// Whether a channels-last elementwise pass that re-reads inputs of `bytes` in all, which a
// reduction pass has just read (`just_read`), visits its blocks last-read first: where the
// inputs exceed half the last-level cache. The cache then holds the reduction's most recent
// lines, which a pass in the reduction's order would reach last, after its misses had evicted
// them (Zen 4, 2 threads, cold backward, the variants interleaved in one process: 1.05-1.13x
// faster for 25.6-51 MB of x and dy; forwards and smaller inputs within the noise). Addresses
// only: the results are the same. FASTBN_CPU_REVERSE=0 or 1 turns it off or on for every
// elementwise pass (read once; to measure and test both ways).
bool reverse_blocks(bool just_read, int64_t bytes) {
  static const int forced = env_switch("FASTBN_CPU_REVERSE");
  return forced >= 0 ? forced == 1 : just_read && bytes > llc_bytes() / 2;
}

// stream_outputs for a pass reading `inputs` and writing `outputs` tensors shaped like the
// input (storage type T).
template <class T> bool stream_for(const Geometry& g, int inputs, int outputs) {
  return stream_outputs((inputs + outputs) * g.numel() * int64_t(sizeof(T)));
}

// Tensors shaped like the input that a backward pass reads: x and dy, and the residual only
// under relu (to recompute the relu mask; effective_dy ignores it otherwise).
inline int backward_reads(const void* r, bool relu) { return 2 + (relu && r != nullptr); }

bool channel_per_thread(int64_t C) {
  const int64_t nt = at::get_num_threads();
  return C >= nt && (C % nt == 0 || C >= 4 * nt);
}

// Planar units of one channel, in a fixed order: groups of whole (n, c) planes when a plane
// is small (nseg planes, n-major), else pieces of one plane.
struct PlanarUnits {
  int64_t N, C, S, planes, pieces, run_len, per_channel;
  explicit PlanarUnits(const Geometry& g) : N(g.N), C(g.C), S(g.S) {
    if (S <= kRunMax) {
      planes = std::max<int64_t>(1, kRunMax / std::max<int64_t>(S, 1));
      pieces = 1;
      run_len = S;
      per_channel = (N + planes - 1) / planes;
    } else {
      planes = 1;
      pieces = (S + kRunMax - 1) / kRunMax;
      run_len = (S + pieces - 1) / pieces;
      per_channel = N * pieces;
    }
  }
  // Offset of unit u of channel c and its run.
  Run unit(int64_t c, int64_t u, int64_t& off) const {
    if (pieces == 1) {
      const int64_t n0 = u * planes;
      off = (n0 * C + c) * S;
      return Run{std::min(planes, N - n0), S, C * S};
    }
    const int64_t n = u / pieces, s0 = (u % pieces) * run_len;
    off = (n * C + c) * S + s0;
    return Run{1, std::min(run_len, S - s0), 0};
  }
  int64_t unit_values() const { return planes * run_len; }
  int64_t grain_units() const { return std::max<int64_t>(1, kTaskValues / std::max<int64_t>(unit_values(), 1)); }
};

// Channels-last tasks: row blocks of `rows` rows (a multiple of the pattern period) times
// strips of `width` channels. One strip of all C channels, unless a block would have fewer
// than kStripMinRows rows (wide rows, few of them) and C is a multiple of the lanes: then
// strips of kStripChannels, so that a task's vector lanes each see more values (fewer, longer
// accumulations and fewer partials to merge) and there are still tasks for every thread.
// Depends on the shape only (results do not depend on threads).
struct RowBlocks {
  int64_t M, C, L, width, strips, rows, count;
  int64_t erows, ecount;  // the elementwise passes' blocks of whole rows
  RowBlocks(const Geometry& g, int lanes) : M(g.rows()), C(g.C) {
    L = std::lcm<int64_t>(C, lanes);
    width = C;
    strips = 1;
    rows = erows = rows_for(L / C, kMinBlocks);
    ecount = (M + erows - 1) / erows;
    if (L == C && C > kStripChannels && rows < kStripMinRows) {
      width = kStripChannels;  // a multiple of every lane count: a strip's pattern is its channels
      strips = (C + width - 1) / width;
      rows = rows_for(1, (kMinBlocks + strips - 1) / strips);
    }
    count = (M + rows - 1) / rows;
  }
  // Rows per block: about kBlockValues values a task, at most kMaxLaneTerms periods, few enough
  // rows for `blocks` blocks, and at least one chunk of 8 periods (P rows a period).
  int64_t rows_for(int64_t P, int64_t blocks) const {
    int64_t target = std::min<int64_t>(std::max<int64_t>(1, kBlockValues / width), kMaxLaneTerms * P);
    target = std::min<int64_t>(target, (M + blocks - 1) / blocks);
    target = std::max<int64_t>(target, 8 * P);
    return ((target + P - 1) / P) * P;
  }
  // Reduction tasks (statistics, backward sums): every (block, strip).
  int64_t tasks() const { return count * strips; }
  int64_t block_of(int64_t t) const { return t / strips; }
  int64_t first_channel(int64_t t) const { return (t % strips) * width; }
  // Task t's block: its rows of its strip's channels (a strip's C is a multiple of the lanes,
  // so its pattern length is its width).
  Rows rows_of(int64_t t) const {
    const int64_t b = block_of(t), w = std::min(width, C - first_channel(t));
    return Rows{std::min(rows, M - b * rows), w, strips > 1 ? w : L, C};
  }
  int64_t offset(int64_t t) const { return block_of(t) * rows * C + first_channel(t); }
  // Where task t's per-channel partials go in a [count, C] array.
  int64_t partial(int64_t t) const { return block_of(t) * C + first_channel(t); }
  int64_t grain_tasks() const { return std::max<int64_t>(1, kTaskValues / std::max<int64_t>(rows * width, 1)); }
  // Elementwise passes need no per-channel order: ecount blocks of erows whole rows
  // (contiguous), block b at offset b * erows * C.
  Rows block(int64_t b) const { return Rows{std::min(erows, M - b * erows), C, L, C}; }
  int64_t grain_blocks() const { return std::max<int64_t>(1, kTaskValues / std::max<int64_t>(erows * C, 1)); }
  // Replicates a [C] vector to pattern length L (strips have L == C: a strip's pattern is the
  // vector from its first channel on).
  template <class Acc> std::vector<Acc> pattern(const std::vector<Acc>& v) const {
    std::vector<Acc> p(L);
    for (int64_t q = 0; q < L; q += C) std::copy(v.begin(), v.end(), p.begin() + q);
    return p;
  }
};

// Partial results of units/blocks are folded across units in double (few values per channel).
using Fold = double;

// Channel c's statistics (of its values minus `shift`) value by value in double: the
// driver's answer where the vector kernels' result is not finite. The kernels accumulate
// short runs in float, which overflows for |x| near the float range where double does not;
// and an inf or NaN input gets the plain formulas' result here by construction.
template <class T> WelfordState<Fold> exact_channel(const T* x, const Geometry& g, int64_t c, Fold shift) {
  WelfordState<Fold> st{0, 0.0, 0.0};
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t s = 0; s < g.S; ++s) {
      const int64_t i = g.channels_last ? (n * g.S + s) * g.C + c : (n * g.C + c) * g.S + s;
      welford_add(st, static_cast<Fold>(to_acc(x[i])) - shift);
    }
  return st;
}
template <class T> void check_finite(WelfordState<Fold>& st, const T* x, const Geometry& g, int64_t c, Fold shift) {
  if (!is_finite(st.mean) || !is_finite(st.m2)) st = exact_channel(x, g, c, shift);
}

// Per-channel views of an Operands' statistics and affine parameters.
template <class Acc> struct ChannelView {
  ChannelStats<Acc> st;
  Affine<Acc> af;
  explicit ChannelView(const Operands& o) {
    st.mean = cptr<Acc>(o.mean);
    st.scale_src = cptr<Acc>(o.scale_src);
    st.src_is_var = o.src_is_var;
    st.eps = static_cast<Acc>(o.eps);
    af.weight = cptr<Acc>(o.weight);
    af.bias = cptr<Acc>(o.bias);
  }
  FwdCoef<Acc> fwd(int64_t c) const { return forward_coef(st, af, c); }
};

// ---------------------------------------------------------------- planar

template <class T> struct PlanarDriver {
  using Acc = acc_t<T>;
  const Kernels<T>& K = kernels<T>();
  Geometry G;
  PlanarUnits U;
  explicit PlanarDriver(const Geometry& g) : G(g), U(g) {}

  // Channel c's shift (stats_shift of its first values, from plane (0, c) on).
  Fold shift(const T* x, int64_t c) const {
    return stats_shift<Fold>(U.N * U.S, [&](int j) { return to_acc(x[c * U.S + channel_value_offset(j, U.C, U.S)]); });
  }
  // Software prefetch in the fused per-channel paths. A channel's data is N planes far apart,
  // each a short contiguous stream the hardware prefetchers pick up only after its first
  // misses, and the channel's arithmetic is too short to hide them: so while a thread reduces
  // a unit, it prefetches into L2 the unit `prefetch_units` units further on in its range of
  // channels (channel by channel, unit by unit), of every tensor the reduction or its
  // elementwise pass reads (null pointers are skipped). The distance is one channel, at most
  // kPlanarPrefetchBytes of those tensors, at least one unit. Addresses only; no value changes.
  int64_t prefetch_units(int tensors) const {
    const int64_t unit_bytes = std::max<int64_t>(1, U.unit_values() * int64_t(sizeof(T)) * tensors);
    return std::max<int64_t>(1, std::min<int64_t>(U.per_channel, kPlanarPrefetchBytes / unit_bytes));
  }
  // Prefetches unit j (flat: channel j / per_channel) of each non-null tensor, if j < end.
  void prefetch_unit(std::initializer_list<const T*> tensors, int64_t j, int64_t end) const {
    if (j >= end) return;
    int64_t off;
    const Run run = U.unit(j / U.per_channel, j % U.per_channel, off);
    constexpr int64_t line = 64 / int64_t(sizeof(T));
    for (const T* t : tensors) {
      if (t == nullptr) continue;
      for (int64_t k = 0; k < run.nseg; ++k) {
        const T* p = t + off + k * run.stride;
        for (int64_t i = 0; i < run.len; i += line) __builtin_prefetch(p + i, 0, 2);
        __builtin_prefetch(p + run.len - 1, 0, 2);
      }
    }
  }
  WelfordState<Fold> unit_stats(const T* x, int64_t c, int64_t u, Fold shift) const {
    int64_t off;
    const Run run = U.unit(c, u, off);
    return K.run_stats(x + off, run, shift);
  }
  void unit_affine(const T* x, T* y, const T* r, bool relu, int64_t c, int64_t u, const FwdCoef<Acc>& k,
                   bool stream) const {
    int64_t off;
    const Run run = U.unit(c, u, off);
    K.run_affine(x + off, y + off, run, k, r ? r + off : nullptr, relu, stream);
  }
  void unit_sums(const T* dy, const T* x, const T* r, bool relu, int64_t c, int64_t u, const FwdCoef<Acc>& k,
                 Fold& s1, Fold& s2) const {
    int64_t off;
    const Run run = U.unit(c, u, off);
    K.run_grad_sums(dy + off, x + off, run, k, r ? r + off : nullptr, relu, s1, s2);
  }
  void unit_grad(const T* dy, const T* x, const T* r, bool relu, int64_t c, int64_t u, const BwdCoef<Acc>& gk,
                 const FwdCoef<Acc>& k, bool stream, T* dx, T* dr) const {
    int64_t off;
    const Run run = U.unit(c, u, off);
    K.run_grad_input(dy + off, x + off, run, gk, k, r ? r + off : nullptr, relu, stream, dx ? dx + off : nullptr,
                     dr ? dr + off : nullptr);
  }
  // Whether a planar pass reading `inputs` and writing `outputs` tensors stores non-temporally:
  // stream_for's rule, and only when every plane starts on a 64-byte line (S values a whole
  // number of lines; put streams only aligned vectors, and a line taking both kinds of store,
  // as 14x14 planes' lines would, measured up to 1.5x slower than plain stores).
  bool stream(int inputs, int outputs) const {
    return (U.S * int64_t(sizeof(T))) % 64 == 0 && stream_for<T>(G, inputs, outputs);
  }

  // Per-channel Welford states of all units, folded in unit order.
  std::vector<WelfordState<Fold>> stats(const T* x) const {
    const int64_t C = U.C, n = U.per_channel;
    std::vector<WelfordState<Fold>> parts(C * n), out(C);
    std::vector<Fold> shifts(C);
    const int64_t cgrain = std::max<int64_t>(1, kTaskValues / std::max<int64_t>(64 * n, 1));
    at::parallel_for(0, C, cgrain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) shifts[c] = shift(x, c);
    });
    at::parallel_for(0, C * n, U.grain_units(), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) parts[i] = unit_stats(x, i / n, i % n, shifts[i / n]);
    });
    at::parallel_for(0, C, cgrain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        WelfordState<Fold> st{0, 0.0, 0.0};
        for (int64_t u = 0; u < n; ++u) st = chan_merge(st, parts[c * n + u]);
        check_finite(st, x, G, c, shifts[c]);
        add_shift(st, shifts[c]);
        out[c] = st;
      }
    });
    return out;
  }

  // Elementwise passes need no per-channel order: walk (n, c) planes in memory order
  // (streaming, prefetcher-friendly), each task a range of consecutive planes:
  // f(first plane's channel, its offset, number of planes).
  template <class F> void for_all_planes(F&& f) const {
    const int64_t planes = U.N * U.C;
    const int64_t grain = std::max<int64_t>(1, kTaskValues / std::max<int64_t>(U.S, 1));
    at::parallel_for(0, planes, grain, [&](int64_t b, int64_t e) { f(b % U.C, b * U.S, e - b); });
  }

  // y over every plane; k(c) gives channel c's forward coefficients (evaluated once a channel).
  template <class FK> void affine_planes(const T* x, T* y, const T* r, bool relu, FK&& k) const {
    std::vector<FwdCoef<Acc>> kc(U.C);
    for (int64_t c = 0; c < U.C; ++c) kc[c] = k(c);
    const bool stream = this->stream(1 + (r != nullptr), 1);
    for_all_planes([&](int64_t c0, int64_t off, int64_t n) {
      K.planes_affine(x + off, y + off, n, U.S, c0, U.C, kc.data(), r ? r + off : nullptr, relu, stream);
    });
  }

  // dx / dr over every plane; g(c) and k(c) give channel c's backward and forward coefficients
  // (evaluated once a channel).
  template <class FG, class FK>
  void grad_planes(const T* dy, const T* x, const T* r, bool relu, T* dx, T* dr, FG&& g, FK&& k) const {
    std::vector<FwdCoef<Acc>> kc(U.C);
    std::vector<BwdCoef<Acc>> gc(U.C);
    for (int64_t c = 0; c < U.C; ++c) {
      kc[c] = k(c);
      gc[c] = g(c);
    }
    const bool stream = this->stream(backward_reads(r, relu), (dx != nullptr) + (dr != nullptr));
    for_all_planes([&](int64_t c0, int64_t off, int64_t n) {
      K.planes_grad_input(dy + off, x + off, n, U.S, c0, U.C, gc.data(), kc.data(), r ? r + off : nullptr, relu,
                          stream, dx ? dx + off : nullptr, dr ? dr + off : nullptr);
    });
  }

  // Channels per task in the channel-per-thread paths: enough values to be worth a thread.
  int64_t channel_grain() const {
    return std::max<int64_t>(1, kTaskValues / std::max<int64_t>(U.N * U.S, 1));
  }

  template <class F> void for_all_units(F&& f) const {
    const int64_t n = U.per_channel;
    at::parallel_for(0, U.C * n, U.grain_units(), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) f(i / n, i % n);
    });
  }

  void forward_train(const Operands& o, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd, at::Tensor& var) const {
    const T* x = cptr<T>(o.x);
    const T* r = cptr<T>(o.residual);
    T* yp = mptr<T>(y);
    Acc *m = mptr<Acc>(mean), *v = mptr<Acc>(var), *is = mptr<Acc>(invstd);
    ChannelStats<Acc> st{m, is, false, Acc(0)};
    Affine<Acc> af{cptr<Acc>(o.weight), cptr<Acc>(o.bias)};
    const int64_t n = U.per_channel;
    if (channel_per_thread(U.C)) {
      const bool nt = stream(1 + (r != nullptr), 1);
      at::parallel_for(0, U.C, channel_grain(), [&](int64_t c0, int64_t c1) {
        const int64_t ahead = prefetch_units(1 + (r != nullptr));
        for (int64_t j = c0 * n; j < c0 * n + ahead; ++j) prefetch_unit({x, r}, j, c1 * n);
        for (int64_t c = c0; c < c1; ++c) {
          WelfordState<Fold> s{0, 0.0, 0.0};
          const Fold sh = shift(x, c);
          for (int64_t u = 0; u < n; ++u) {
            prefetch_unit({x, r}, c * n + u + ahead, c1 * n);
            s = chan_merge(s, unit_stats(x, c, u, sh));
          }
          check_finite(s, x, G, c, sh);
          add_shift(s, sh);
          finalize_stats(s, static_cast<Acc>(o.eps), m, v, is, c);
          const FwdCoef<Acc> k = forward_coef(st, af, c);
          for (int64_t u = 0; u < n; ++u) unit_affine(x, yp, r, o.relu, c, u, k, nt);
        }
        if (nt) K.stream_fence();
      });
      return;
    }
    const auto s = stats(x);
    for (int64_t c = 0; c < U.C; ++c) finalize_stats(s[c], static_cast<Acc>(o.eps), m, v, is, c);
    affine_planes(x, yp, r, o.relu, [&](int64_t c) { return forward_coef(st, af, c); });
  }

  void normalize(const Operands& o, at::Tensor& y) const {
    const T* x = cptr<T>(o.x);
    const T* r = cptr<T>(o.residual);
    T* yp = mptr<T>(y);
    ChannelView<Acc> cv(o);
    affine_planes(x, yp, r, o.relu, [&](int64_t c) { return cv.fwd(c); });
  }

  void backward(const Operands& o, const at::Tensor& dy_t, bool training, bool sums, at::Tensor& sum_dy,
                at::Tensor& sum_dy_xhat, at::Tensor& dx_t, at::Tensor& dr_t) const {
    const T* x = cptr<T>(o.x);
    const T* dy = cptr<T>(dy_t);
    const T* r = cptr<T>(o.residual);
    T* dx = mptr<T>(dx_t);
    T* dr = mptr<T>(dr_t);
    Acc* sdy = mptr<Acc>(sum_dy);
    Acc* sdx = mptr<Acc>(sum_dy_xhat);
    ChannelView<Acc> cv(o);
    const int64_t n = U.per_channel;
    const int64_t m = o.g.count();
    const bool elementwise = dx || dr;
    auto coef = [&](int64_t c) {
      return backward_coef(cv.st, cv.af, c, training, sums ? sdy[c] : Acc(0), sums ? sdx[c] : Acc(0), m);
    };
    if (channel_per_thread(U.C)) {
      const T* rp = o.relu ? r : nullptr;  // the residual is read only to recompute the relu mask
      const bool nt = stream(backward_reads(r, o.relu), (dx != nullptr) + (dr != nullptr));
      at::parallel_for(0, U.C, channel_grain(), [&](int64_t c0, int64_t c1) {
        const int64_t ahead = prefetch_units(backward_reads(r, o.relu));
        for (int64_t j = c0 * n; j < c0 * n + ahead; ++j) prefetch_unit({x, dy, rp}, j, c1 * n);
        for (int64_t c = c0; c < c1; ++c) {
          const FwdCoef<Acc> k = cv.fwd(c);
          if (sums) {
            Fold a = 0, b = 0;
            for (int64_t u = 0; u < n; ++u) {
              prefetch_unit({x, dy, rp}, c * n + u + ahead, c1 * n);
              Fold s1, s2;
              unit_sums(dy, x, r, o.relu, c, u, k, s1, s2);
              a += s1;
              b += s2;
            }
            finalize_grad_sums(a, b, cv.st, c, sdy, sdx);
          }
          if (elementwise) {
            const BwdCoef<Acc> gk = coef(c);
            for (int64_t u = 0; u < n; ++u) {
              if (!sums) prefetch_unit({x, dy, rp}, c * n + u + ahead, c1 * n);
              unit_grad(dy, x, r, o.relu, c, u, gk, k, nt, dx, dr);
            }
          }
        }
        if (nt) K.stream_fence();
      });
      return;
    }
    if (sums) {
      std::vector<Fold> p1(U.C * n), p2(U.C * n);
      for_all_units([&](int64_t c, int64_t u) { unit_sums(dy, x, r, o.relu, c, u, cv.fwd(c), p1[c * n + u], p2[c * n + u]); });
      for (int64_t c = 0; c < U.C; ++c) {
        Fold a = 0, b = 0;
        for (int64_t u = 0; u < n; ++u) {
          a += p1[c * n + u];
          b += p2[c * n + u];
        }
        finalize_grad_sums(a, b, cv.st, c, sdy, sdx);
      }
    }
    if (elementwise) {
      std::vector<BwdCoef<Acc>> gk(U.C);
      for (int64_t c = 0; c < U.C; ++c) gk[c] = coef(c);
      grad_planes(dy, x, r, o.relu, dx, dr, [&](int64_t c) { return gk[c]; }, [&](int64_t c) { return cv.fwd(c); });
    }
  }

  void grad_input(const Operands& o, const at::Tensor& dy_t, const Acc* sdy, const Acc* sdx, int64_t count,
                  at::Tensor& dx_t, at::Tensor& dr_t) const {
    const T* x = cptr<T>(o.x);
    const T* dy = cptr<T>(dy_t);
    const T* r = cptr<T>(o.residual);
    T* dx = mptr<T>(dx_t);
    T* dr = mptr<T>(dr_t);
    ChannelView<Acc> cv(o);
    grad_planes(
        dy, x, r, o.relu, dx, dr, [&](int64_t c) { return backward_coef(cv.st, cv.af, c, true, sdy[c], sdx[c], count); },
        [&](int64_t c) { return cv.fwd(c); });
  }
};

// ---------------------------------------------------------------- channels last

template <class T> struct RowsDriver {
  using Acc = acc_t<T>;
  const Kernels<T>& K = kernels<T>();
  Geometry G;
  RowBlocks B;
  explicit RowsDriver(const Geometry& g) : G(g), B(g, kernels<T>().lanes) {}

  // Channels per task when folding the block partials (B.count values a channel): threads
  // only where each task folds at least kFoldTaskValues of them.
  int64_t fold_grain() const { return std::max<int64_t>(64, kFoldTaskValues / std::max<int64_t>(B.count, 1)); }

  // f(t, rows, scratch) for every task t (B.tasks()); rows: its block.
  template <class F> void for_all_tasks(F&& f) const {
    at::parallel_for(0, B.tasks(), B.grain_tasks(), [&](int64_t b, int64_t e) {
      // rows_stats needs 2 * L doubles + 3 * L Acc, rows_grad_sums 6 * L doubles.
      std::vector<Fold> scratch(6 * B.L);
      for (int64_t t = b; t < e; ++t) f(t, B.rows_of(t), scratch.data());
    });
  }

  // f(offset, rows) for every elementwise block (whole rows); each thread visits its range of
  // blocks in reverse order when `reversed` (reverse_blocks).
  template <class F> void for_all_blocks(F&& f, bool reversed) const {
    at::parallel_for(0, B.ecount, B.grain_blocks(), [&](int64_t b, int64_t e) {
      if (reversed)
        for (int64_t i = e - 1; i >= b; --i) f(i * B.erows * B.C, B.block(i));
      else
        for (int64_t i = b; i < e; ++i) f(i * B.erows * B.C, B.block(i));
    });
  }

  // Per-channel Welford states, block partials folded in block order.
  std::vector<WelfordState<Fold>> stats(const T* x) const {
    const int64_t C = B.C;
    // stats_shift of each channel's first values (rows 0, 1, ...), along the rows.
    std::vector<Fold> shift(C);
    at::parallel_for(0, C, 1024, [&](int64_t c0, int64_t c1) { K.rows_shifts(x, C, B.M, c0, c1, shift.data() + c0); });
    const std::vector<Fold> shift_pattern = B.pattern(shift);
    // [count, C] block partials, not zero-filled: the tasks write every element.
    const std::unique_ptr<Fold[]> pm(new Fold[B.count * C]);
    const std::unique_ptr<Fold[]> pm2(new Fold[B.count * C]);
    for_all_tasks([&](int64_t t, Rows rows, Fold* scratch) {
      const int64_t c0 = B.first_channel(t);
      K.rows_stats(x + B.offset(t), rows, shift_pattern.data() + c0, &pm[B.partial(t)], &pm2[B.partial(t)], scratch);
    });
    // Chan merge of the blocks in block order; all channels of a block share its count, so
    // the merge weights are computed once per block. chan_absorb without the non-finite
    // fallbacks, so the loop vectorises: a non-finite partial still leaves the channel
    // non-finite, and check_finite recomputes it; finite results are the same bits.
    at::parallel_for(0, C, fold_grain(), [&](int64_t c0, int64_t c1) {
      Fold* __restrict m = pm.get();
      Fold* __restrict m2 = pm2.get();
      int64_t n = B.rows_of(0).rows;
      for (int64_t b = 1; b < B.count; ++b) {
        const int64_t nb = B.rows_of(b * B.strips).rows;
        const ChanWeights<Fold> w = chan_weights<Fold>(n, nb);
        const Fold* __restrict bm = m + b * C;
        const Fold* __restrict bm2 = m2 + b * C;
        for (int64_t c = c0; c < c1; ++c) chan_absorb<false>(m[c], m2[c], bm[c], bm2[c], w);
        n += nb;
      }
    });
    std::vector<WelfordState<Fold>> out(C);
    for (int64_t c = 0; c < C; ++c) {
      out[c] = WelfordState<Fold>{B.M, pm[c], pm2[c]};
      check_finite(out[c], x, G, c, shift[c]);
      add_shift(out[c], shift[c]);
    }
    return out;
  }

  struct FwdPatterns {
    std::vector<Acc> mean, a, b;
  };
  FwdPatterns fwd_patterns(const ChannelStats<Acc>& st, const Affine<Acc>& af) const {
    std::vector<Acc> m(B.C), a(B.C), b(B.C);
    for (int64_t c = 0; c < B.C; ++c) {
      const FwdCoef<Acc> k = forward_coef(st, af, c);
      m[c] = k.mean;
      a[c] = k.a;
      b[c] = k.b;
    }
    return {B.pattern(m), B.pattern(a), B.pattern(b)};
  }

  // y = act((x - mean) * a + b [+ r]); `x_read`: the statistics pass has just read x.
  void affine(const Operands& o, const FwdPatterns& p, at::Tensor& y, bool x_read) const {
    const T* x = cptr<T>(o.x);
    const T* r = cptr<T>(o.residual);
    T* yp = mptr<T>(y);
    const bool stream = stream_for<T>(G, 1 + (r != nullptr), 1);
    const int64_t x_bytes = G.numel() * int64_t(sizeof(T));
    const bool prefetch_x = prefetch_inputs(x_read, x_bytes);
    for_all_blocks(
        [&](int64_t off, Rows rows) {
          K.rows_affine(x + off, yp + off, rows, p.mean.data(), p.a.data(), p.b.data(), r ? r + off : nullptr, o.relu,
                        stream, prefetch_x);
        },
        reverse_blocks(x_read, x_bytes));
  }

  void forward_train(const Operands& o, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd, at::Tensor& var) const {
    Acc *m = mptr<Acc>(mean), *v = mptr<Acc>(var), *is = mptr<Acc>(invstd);
    const auto s = stats(cptr<T>(o.x));
    for (int64_t c = 0; c < B.C; ++c) finalize_stats(s[c], static_cast<Acc>(o.eps), m, v, is, c);
    ChannelStats<Acc> st{m, is, false, Acc(0)};
    Affine<Acc> af{cptr<Acc>(o.weight), cptr<Acc>(o.bias)};
    affine(o, fwd_patterns(st, af), y, true);
  }

  void normalize(const Operands& o, at::Tensor& y) const {
    ChannelView<Acc> cv(o);
    affine(o, fwd_patterns(cv.st, cv.af), y, false);
  }

  void sums(const Operands& o, const T* dy, const FwdPatterns& p, const ChannelView<Acc>& cv, Acc* sdy,
            Acc* sdx) const {
    const T* x = cptr<T>(o.x);
    const T* r = cptr<T>(o.residual);
    const int64_t C = B.C;
    // [count, C] block partials, not zero-filled: the tasks write every element.
    const std::unique_ptr<Fold[]> p1(new Fold[B.count * C]);
    const std::unique_ptr<Fold[]> p2(new Fold[B.count * C]);
    for_all_tasks([&](int64_t t, Rows rows, Fold* scratch) {
      const int64_t off = B.offset(t), c0 = B.first_channel(t);
      K.rows_grad_sums(dy + off, x + off, rows, p.mean.data() + c0, p.a.data() + c0, p.b.data() + c0,
                       r ? r + off : nullptr, o.relu, &p1[B.partial(t)], &p2[B.partial(t)], scratch);
    });
    // Sums of the blocks in block order, into block 0's row (as the statistics' fold).
    at::parallel_for(0, C, fold_grain(), [&](int64_t c0, int64_t c1) {
      Fold* __restrict a = p1.get();
      Fold* __restrict s = p2.get();
      for (int64_t b = 1; b < B.count; ++b) {
        const Fold* __restrict q1 = a + b * C;
        const Fold* __restrict q2 = s + b * C;
        for (int64_t c = c0; c < c1; ++c) {
          a[c] += q1[c];
          s[c] += q2[c];
        }
      }
      for (int64_t c = c0; c < c1; ++c) finalize_grad_sums(a[c], s[c], cv.st, c, sdy, sdx);
    });
  }

  // dx, dr over all rows; `inputs_read`: the sums pass has just read x, dy (and r under relu).
  void grad(const Operands& o, const T* dy, const FwdPatterns& p, const ChannelView<Acc>& cv, bool training,
            const Acc* sdy, const Acc* sdx, int64_t count, T* dx, T* dr, bool inputs_read) const {
    const T* x = cptr<T>(o.x);
    const T* r = cptr<T>(o.residual);
    std::vector<Acc> A(B.C), Bm(B.C), D(B.C);
    bool centred = false;
    for (int64_t c = 0; c < B.C; ++c) {
      const BwdCoef<Acc> g = backward_coef(cv.st, cv.af, c, training, sdy ? sdy[c] : Acc(0), sdx ? sdx[c] : Acc(0), count);
      A[c] = g.A;
      Bm[c] = g.Bm;
      D[c] = g.D;
      centred = g.centred;
    }
    const auto pA = B.pattern(A), pB = B.pattern(Bm), pD = B.pattern(D);
    const int reads = backward_reads(r, o.relu);
    const bool stream = stream_for<T>(G, reads, (dx != nullptr) + (dr != nullptr));
    const int64_t in_bytes = reads * G.numel() * int64_t(sizeof(T));
    const bool prefetch = prefetch_inputs(inputs_read, in_bytes);
    for_all_blocks(
        [&](int64_t off, Rows rows) {
          K.rows_grad_input(dy + off, x + off, rows, p.mean.data(), pA.data(), pB.data(), pD.data(), centred,
                            p.a.data(), p.b.data(), r ? r + off : nullptr, o.relu, stream, prefetch,
                            dx ? dx + off : nullptr, dr ? dr + off : nullptr);
        },
        reverse_blocks(inputs_read, in_bytes));
  }

  void backward(const Operands& o, const at::Tensor& dy_t, bool training, bool want_sums, at::Tensor& sum_dy,
                at::Tensor& sum_dy_xhat, at::Tensor& dx, at::Tensor& dr) const {
    ChannelView<Acc> cv(o);
    const auto p = fwd_patterns(cv.st, cv.af);
    const T* dy = cptr<T>(dy_t);
    Acc* sdy = mptr<Acc>(sum_dy);
    Acc* sdx = mptr<Acc>(sum_dy_xhat);
    if (want_sums) sums(o, dy, p, cv, sdy, sdx);
    if (dx.defined() || dr.defined())
      grad(o, dy, p, cv, training, want_sums ? sdy : nullptr, want_sums ? sdx : nullptr, o.g.count(), mptr<T>(dx),
           mptr<T>(dr), want_sums);
  }

  void grad_input(const Operands& o, const at::Tensor& dy_t, const Acc* sdy, const Acc* sdx, int64_t count,
                  at::Tensor& dx, at::Tensor& dr) const {
    ChannelView<Acc> cv(o);
    grad(o, cptr<T>(dy_t), fwd_patterns(cv.st, cv.af), cv, true, sdy, sdx, count, mptr<T>(dx), mptr<T>(dr), false);
  }
};

}  // namespace

struct CpuBackend {
  static void count_batch(at::Tensor& batches) { ++*mptr<int64_t>(batches); }
  static void batch_stats(const Geometry& g, const at::Tensor& x, at::Tensor& mean, at::Tensor& var) {
    FASTBN_DISPATCH(x.scalar_type(), "fastbn_batch_stats", {
      const auto s = g.channels_last ? RowsDriver<T>(g).stats(cptr<T>(x)) : PlanarDriver<T>(g).stats(cptr<T>(x));
      for (int64_t c = 0; c < g.C; ++c) finalize_stats(s[c], Acc(0), mptr<Acc>(mean), mptr<Acc>(var), (Acc*)nullptr, c);
    });
  }
  static void forward_train(const Operands& o, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd, at::Tensor& var,
                            const Running& run) {
    FASTBN_DISPATCH(o.x.scalar_type(), "fastbn_forward_train", {
      if (o.g.channels_last) RowsDriver<T>(o.g).forward_train(o, y, mean, invstd, var);
      else PlanarDriver<T>(o.g).forward_train(o, y, mean, invstd, var);
      const RunningStats<Acc> r = run.view<Acc>();
      const Acc* m = cptr<Acc>(mean);
      const Acc* v = cptr<Acc>(var);
      for (int64_t c = 0; c < o.g.C; ++c) update_running(r, c, m[c], v[c], o.g.count());
    });
  }
  static void normalize(const Operands& o, at::Tensor& y) {
    FASTBN_DISPATCH(o.x.scalar_type(), "fastbn_normalize", {
      if (o.g.channels_last) RowsDriver<T>(o.g).normalize(o, y);
      else PlanarDriver<T>(o.g).normalize(o, y);
    });
  }
  static void backward(const Operands& o, const at::Tensor& dy, bool training, bool sums, at::Tensor& sum_dy,
                       at::Tensor& sum_dy_xhat, at::Tensor& dx, at::Tensor& dr) {
    FASTBN_DISPATCH(o.x.scalar_type(), "fastbn_backward", {
      if (o.g.channels_last) RowsDriver<T>(o.g).backward(o, dy, training, sums, sum_dy, sum_dy_xhat, dx, dr);
      else PlanarDriver<T>(o.g).backward(o, dy, training, sums, sum_dy, sum_dy_xhat, dx, dr);
    });
  }
  static void grad_input(const Operands& o, const at::Tensor& dy, const at::Tensor& sum_dy,
                         const at::Tensor& sum_dy_xhat, const at::Tensor& count, at::Tensor& dx, at::Tensor& dr) {
    const int64_t n = *cptr<int64_t>(count);
    FASTBN_DISPATCH(o.x.scalar_type(), "fastbn_grad_input", {
      const Acc* sdy = cptr<Acc>(sum_dy);
      const Acc* sdx = cptr<Acc>(sum_dy_xhat);
      if (o.g.channels_last) RowsDriver<T>(o.g).grad_input(o, dy, sdy, sdx, n, dx, dr);
      else PlanarDriver<T>(o.g).grad_input(o, dy, sdy, sdx, n, dx, dr);
    });
  }
  static void merge_stats(const at::Tensor& counts, const at::Tensor& means, const at::Tensor& vars, double eps,
                          at::Tensor& mean, at::Tensor& invstd, at::Tensor& var, at::Tensor& total,
                          const Running& run) {
    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "fastbn_merge_stats", [&] {
      const int64_t W = means.size(0), C = means.size(1);
      const int64_t* n = counts.data_ptr<int64_t>();
      const scalar_t* pm = means.data_ptr<scalar_t>();
      const scalar_t* pv = vars.data_ptr<scalar_t>();
      scalar_t* om = mean.data_ptr<scalar_t>();
      scalar_t* ov = var.data_ptr<scalar_t>();
      const RunningStats<scalar_t> r = run.view<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        WelfordState<Fold> s{0, 0.0, 0.0};
        for (int64_t w = 0; w < W; ++w) s = chan_merge(s, rank_state<Fold>(n[w], pm[w * C + c], pv[w * C + c]));
        finalize_stats(s, static_cast<scalar_t>(eps), om, ov, invstd.data_ptr<scalar_t>(), c);
        update_running(r, c, om[c], ov[c], s.n);
        if (c == 0) *total.data_ptr<int64_t>() = s.n;
      }
    });
  }
};

}  // namespace cpu
}  // namespace fastbn

FASTBN_REGISTER_BACKEND(CPU, ::fastbn::cpu::CpuBackend)
