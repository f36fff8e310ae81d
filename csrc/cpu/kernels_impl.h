// CPU kernel bodies: single-threaded loops over one run or one block of rows. Torch-free.
// Included by each ISA unit inside its own namespace, after vec.h; threading and the
// deterministic merge of partial results live in the driver (bn_cpu.cpp). The maths is
// bn_math.h's, applied to vectors of lanes (Vec) in loop bodies and to scalars in tails.
//
// Two memory shapes:
//  run   : values of ONE channel (planar layout): `nseg` segments of `len` contiguous values,
//          `stride` apart (see Run in kernels.h)
//  rows  : `rows` rows of `C` channel values (channels-last layout; Rows in kernels.h: the
//          tensor's rows, or a strip of channels of them). The row kernels walk the block in
//          periods of L = lcm(C, W) values (P = L / C contiguous rows; a strip has P = 1), so
//          every vector lane keeps one channel whatever C is. Per-channel inputs arrive
//          replicated to length L ("patterns", RowBlocks::pattern in bn_cpu.cpp); `rows` % P
//          rows at the end are handled one value at a time.
//
// Statistics and backward sums: short runs of values in the accumulation type acc_t<T>, merged
// in double (Stat) whatever the storage type (PyTorch's CPU kernels accumulate in double);
// the elementwise passes compute in acc_t<T>.
#pragma once

using std::int64_t;

using Stat = double;
using SVec = Vec<Stat>;

// ------------------------------------------------------------------ runs (planar)
// A run is `nseg` segments of `len` contiguous values of one channel, `stride` values apart
// (consecutive planes of a channel, or a piece of one plane when nseg == 1).

// Lane-wise statistics, in two levels. Values arrive in chunks of K <= kChunk vectors, whose
// statistics are exact (block_stats). Up to kBlockChunks chunks form a block, accumulated in
// Acc relative to a reference s (the mean of the block's first chunk, lane by lane, so the
// arithmetic is at the scale of the values' spread, not of an offset) and merged with Chan's
// formula (chan_absorb without the non-finite fallbacks: a channel whose result is not
// finite is recomputed by the driver, cpu/bn_cpu.cpp exact_channel). A finished block is
// merged in double (chan_absorb) into the lane's state, which is relative to the channel's
// shift (stats_shift). The data is read once.
constexpr int kChunk = 8;
constexpr int kBlockChunks = 16;

// Calls f(std::integral_constant<int, k>{}) for a run-time k, 1 <= k <= N: loop bodies
// compiled for each count.
template <int N, class F> inline __attribute__((always_inline)) void with_count(int k, F&& f) {
  if constexpr (N > 1) {
    if (k < N) return with_count<N - 1>(k, f);
  }
  f(std::integral_constant<int, N>{});
}

template <class Acc> struct LaneWelford {
  using V = Vec<Acc>;
  static constexpr int H = V::W / SVec::W;  // double vectors per V

  // A chunk of K vectors into the block (s, bmean, bm2) of bn values a lane (bn == 0: the
  // chunk starts the block and sets s).
  template <int K> static void chunk_into_block(V& s, V& bmean, V& bm2, int64_t bn, const V* v) {
    if (bn == 0) return chunk_starts_block<K>(s, bmean, bm2, v);
    chunk_joins_block<K>(s, bmean, bm2, chan_weights<Acc>(bn, K), v);
  }
  // The first chunk of a block: s is its mean. Both chunk functions are always inlined: they
  // are the body of rows_stats' position loop, and out of line they cost a call a position
  // (measured 1.6-1.9x slower statistics).
  template <int K>
  static inline __attribute__((always_inline)) void chunk_starts_block(V& s, V& bmean, V& bm2, const V* v) {
    V cmean, cm2, r;
    block_stats<K>(v, cmean, cm2, r);
    // A non-finite chunk leaves s, t and so the block non-finite, which is all that is
    // needed: the driver recomputes such channels (exact_channel).
    s = cmean;
    const V t = r / V::set1(static_cast<Acc>(K));  // the mean's rounding: relative to s, the mean is t
    bmean = t;
    bm2 = madd(V::zero() - t, r, cm2);  // corrected two-pass: m2 - r^2 / K
  }
  // A later chunk, merged with the block's weights w = chan_weights(bn, K) (a caller walking
  // many positions with the same bn computes them once).
  template <int K>
  static inline __attribute__((always_inline)) void chunk_joins_block(const V& s, V& bmean, V& bm2,
                                                                      const ChanWeights<Acc>& w, const V* v) {
    V d[K], cmean, cm2;
    for (int j = 0; j < K; ++j) d[j] = v[j] - s;
    block_stats<K>(d, cmean, cm2);
    chan_absorb<false>(bmean, bm2, cmean, cm2, w);  // non-finite: exact_channel
  }
  // The same for a run-time K, 1 <= K <= kChunk.
  static void chunk_into_block(V& s, V& bmean, V& bm2, int64_t bn, const V* v, int K) {
    with_count<kChunk>(K, [&](auto k) { chunk_into_block<decltype(k)::value>(s, bmean, bm2, bn, v); });
  }

  // A block (s, bmean, bm2) of bn values a lane into the double state (mean, m2) of n values
  // a lane, relative to the lanes' channel shifts `shift` (H vectors).
  static void block_into_state(SVec* mean, SVec* m2, int64_t n, const V& s, const V& bmean, const V& bm2,
                               int64_t bn, const SVec* shift) {
    const ChanWeights<Stat> w = chan_weights<Stat>(n > 0 ? n : 1, bn);
    for (int h = 0; h < H; ++h) {
      const SVec bm = (part_wide(s, h) - shift[h]) + part_wide(bmean, h);
      if (n == 0) {
        mean[h] = bm;
        m2[h] = part_wide(bm2, h);
      } else {
        chan_absorb(mean[h], m2[h], bm, part_wide(bm2, h), w);
      }
    }
  }

  SVec mean[H], m2[H];
  int64_t n = 0;
  V s, bmean, bm2;
  int64_t bn = 0;
  int chunks = 0;

  void add(const V* v, int K, const SVec* shift) {
    chunk_into_block(s, bmean, bm2, bn, v, K);
    bn += K;
    if (++chunks == kBlockChunks) flush(shift);
  }
  void flush(const SVec* shift) {
    if (bn == 0) return;
    block_into_state(mean, m2, n, s, bmean, bm2, bn, shift);
    n += bn;
    bn = 0;
    chunks = 0;
  }
  // Chan merge of all lanes into one state: every lane holds n values, so the lanes merge in
  // pairs, level by level, each level with one set of weights (no division per lane).
  WelfordState<Stat> reduce(const SVec* shift) {
    flush(shift);
    if (n == 0) return WelfordState<Stat>{0, 0.0, 0.0};
    SVec vm = mean[0], vm2 = m2[0];
    int64_t count = n;
    for (int h = 1; h < H; ++h) {  // H is 1 or 2
      chan_absorb(vm, vm2, mean[h], m2[h], chan_weights<Stat>(count, count));
      count *= 2;
    }
    Stat lm[SVec::W], lm2[SVec::W];
    vm.lanes(lm);
    vm2.lanes(lm2);
    for (int width = SVec::W; width > 1; width /= 2, count *= 2) {
      const ChanWeights<Stat> w = chan_weights<Stat>(count, count);
      for (int i = 0; i < width / 2; ++i) {
        chan_absorb(lm[2 * i], lm2[2 * i], lm[2 * i + 1], lm2[2 * i + 1], w);
        lm[i] = lm[2 * i];
        lm2[i] = lm2[2 * i];
      }
    }
    return WelfordState<Stat>{count, lm[0], lm2[0]};
  }
};

// Statistics of the run's values minus `shift` (stats_shift), reading it once (LaneWelford).
template <class T>
WelfordState<Stat> run_stats(const T* x, const Run& run, Stat shift) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  // Segments that do not end on whole vectors and fit in kPack values (small planes) are
  // first packed end to end, widened to Acc, and their statistics taken there as one
  // segment: whole vectors but the last < W values, not a partial vector a segment.
  constexpr int64_t kPack = 2048;
  if (run.nseg > 1 && run.len % W != 0 && run.nseg * run.len <= kPack) {
    Acc packed[kPack];
    Acc* q = packed;
    for (int64_t k = 0; k < run.nseg; ++k, q += run.len) {
      const T* p = x + k * run.stride;
      int64_t i = 0;
      for (; i + W <= run.len; i += W) V::load(p + i).store(q + i);
      for (; i < run.len; ++i) q[i] = to_acc(p[i]);
    }
    return run_stats<Acc>(packed, Run{1, run.nseg * run.len, 0}, shift);
  }
  SVec vs[LaneWelford<Acc>::H];
  for (auto& h : vs) h = SVec::set1(shift);
  const int64_t len = run.len;
  LaneWelford<Acc> lanes;
  // Segment tails (len % W values each) are gathered into whole vectors; the last < W
  // values go through the scalar Welford update.
  Acc gathered[W];
  int ng = 0;
  V v[kChunk];
  for (int64_t k = 0; k < run.nseg; ++k) {
    const T* p = x + k * run.stride;
    int64_t i = 0;
    for (; i + kChunk * W <= len; i += kChunk * W) {
      for (int j = 0; j < kChunk; ++j) v[j] = V::load(p + i + j * W);
      lanes.add(v, kChunk, vs);
    }
    const int rest = static_cast<int>((len - i) / W);
    if (rest > 0) {
      for (int j = 0; j < rest; ++j) v[j] = V::load(p + i + j * W);
      lanes.add(v, rest, vs);
      i += rest * W;
    }
    for (; i < len; ++i) {
      gathered[ng++] = to_acc(p[i]);
      if (ng == W) {
        v[0] = V::load(gathered);
        lanes.add(v, 1, vs);
        ng = 0;
      }
    }
  }
  // The last ng < W values: their two-pass statistics in double (one division, not one a
  // value), merged last.
  WelfordState<Stat> tail{0, 0.0, 0.0};
  if (ng > 0) {
    Stat d[W];
    for (int j = 0; j < ng; ++j) d[j] = static_cast<Stat>(gathered[j]) - shift;
    tail.n = ng;
    with_count<W>(ng, [&](auto k) { block_stats<decltype(k)::value>(d, tail.mean, tail.m2); });
  }
  return chan_merge(lanes.reduce(vs), tail);
}

// Vector V of values at p, or zeros when p is null (no residual).
template <class V, class T> inline V load_or_zero(const T* p, int64_t i) { return p ? V::load(p + i) : V::zero(); }
template <class Acc, class T> inline Acc value_or_zero(const T* p, int64_t i) { return p ? to_acc(p[i]) : Acc(0); }

// Calls f(std::bool_constant<a>{}, std::bool_constant<b>{}): loop bodies specialised on two
// flags that are constant for a whole call (relu, training), so no test is left in the loop.
template <class F> inline void with_flags(bool a, bool b, F&& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

template <class T> inline void prefetch_l2(const T* p) { __builtin_prefetch(p, 0, 2); }

// The elementwise passes' input prefetch: p + ahead into L2, clamped to `last` (the last value
// the pass may touch). Float and double only: for the 2-byte types, whose vectors cover half a
// line, the benchmark rows came out slower with it (benchmarks/NOTES.md, seventh pass).
// Addresses only: the results are unchanged.
template <class T> inline void prefetch_input(const T* p, int64_t ahead, const T* last) {
  if constexpr (sizeof(T) >= 4) prefetch_l2(std::min(p + ahead, last));
}

// The planar elementwise pass over whole planes (planes_affine: eval and normalize, which read
// cold input) prefetches its input kPlaneAheadBytes ahead (prefetch_input), clamped to the last
// value of the call's planes (Zen 4, cold eval, in one process against none: 2 KB 1.02-1.18x
// faster, 1 KB 1.03-1.09x, 8 KB and more 0.89-1.08x), under plain stores only (planes_affine
// says why).
constexpr int64_t kPlaneAheadBytes = 2048;

// y = act((x - mean) * a + b [+ r]), one channel. y and r are laid out like x. `stream`:
// non-temporal stores where aligned (put); the caller fences (planes_affine, or the driver
// after its last run_affine). `x_last`: the last value of x the pass may prefetch up to
// (kPlaneAheadBytes ahead), or null for no prefetch. Types with kPairedStores (bfloat16 with
// AVX512_BF16) go two vectors a step first (put2; not the input gradient: 7x7 and 14x14
// backwards came out slower with it). Always inlined: planes_affine calls it for every plane,
// and a call per 7x7 plane costs as much as the plane's arithmetic.
template <class T>
inline __attribute__((always_inline)) void affine_values(const T* x, T* y, Run run, FwdCoef<acc_t<T>> k, const T* r,
                                                        bool relu, bool stream, const T* x_last = nullptr) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  constexpr int64_t kAhead = kPlaneAheadBytes / static_cast<int64_t>(sizeof(T));
  const FwdCoef<V> kv = splat_coef<V>(k);
  const int64_t len = run.len;
  for (int64_t seg = 0; seg < run.nseg; ++seg) {
    const int64_t o = seg * run.stride;
    const T* xs = x + o;
    T* ys = y + o;
    const T* rs = r ? r + o : nullptr;
    int64_t i = 0;
    if constexpr (kPairedStores<T>) {  // two vectors a step (put2, one rounding); the loops below finish
      if (rs == nullptr && !relu) {
        for (; i + 2 * W <= len; i += 2 * W)
          put2(forward_value(V::load(xs + i), kv, V::zero(), false, false),
               forward_value(V::load(xs + i + W), kv, V::zero(), false, false), ys + i, stream);
      } else {
        for (; i + 2 * W <= len; i += 2 * W)
          put2(forward_value(V::load(xs + i), kv, load_or_zero<V>(rs, i), rs != nullptr, relu),
               forward_value(V::load(xs + i + W), kv, load_or_zero<V>(rs, i + W), rs != nullptr, relu), ys + i,
               stream);
      }
    }
    if (rs == nullptr && !relu && x_last != nullptr) {  // the common case of a cold pass
      for (; i + W <= len; i += W) {
        prefetch_input(xs + i, kAhead, x_last);
        put(forward_value(V::load(xs + i), kv, V::zero(), false, false), ys + i, stream);
      }
    } else if (rs == nullptr && !relu) {  // the common case, without the per-vector flag tests
      for (; i + W <= len; i += W) put(forward_value(V::load(xs + i), kv, V::zero(), false, false), ys + i, stream);
    } else {
      for (; i + W <= len; i += W) {
        if (x_last != nullptr) prefetch_input(xs + i, kAhead, x_last);
        put(forward_value(V::load(xs + i), kv, load_or_zero<V>(rs, i), rs != nullptr, relu), ys + i, stream);
      }
    }
    if (i < len) {  // the last len - i < W values: one partial vector
      const int n = static_cast<int>(len - i);
      forward_value(V::load_part(xs + i, n), kv, rs ? V::load_part(rs + i, n) : V::zero(), rs != nullptr, relu)
          .store_part(ys + i, n);
    }
  }
}

// Backward sums: vectors of Acc collect about kFresh terms a lane (never 2 * kFresh), then
// are added into (lo, hi) pairs of doubles (add_wide): the rounding of Acc sums stays that
// of a few terms.
constexpr int kFresh = 16;

// sum dy_eff and sum dy_eff * (x - mean) over one run of one channel (effective_dy).
template <class T>
void run_grad_sums(const T* dy, const T* x, const Run& run, FwdCoef<acc_t<T>> k, const T* r, bool relu, Stat& sum_dy,
                   Stat& sum_dy_xmu) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  SVec A_lo = SVec::zero(), A_hi = SVec::zero(), B_lo = SVec::zero(), B_hi = SVec::zero();
  Stat sdy = 0, sdx = 0;
  with_flags(relu, r != nullptr, [&](auto relu_c, auto has_r_c) {
    constexpr bool kRelu = decltype(relu_c)::value;
    constexpr bool kHasR = decltype(has_r_c)::value;
    const FwdCoef<V> kv = splat_coef<V>(k);
    const int64_t len = run.len;
    V a0 = V::zero(), a1 = V::zero(), b0 = V::zero(), b1 = V::zero();  // fresh
    int fresh = 0;  // terms a lane of the fresh accumulators holds, about
    auto flush = [&] {
      add_wide(A_lo, A_hi, a0);
      add_wide(A_lo, A_hi, a1);
      add_wide(B_lo, B_hi, b0);
      add_wide(B_lo, B_hi, b1);
      a0 = a1 = b0 = b1 = V::zero();
      fresh = 0;
    };
    for (int64_t seg = 0; seg < run.nseg; ++seg) {
      const int64_t o = seg * run.stride;
      const T* xs = x + o;
      const T* gs = dy + o;
      const T* rs = kHasR ? r + o : nullptr;
      auto two = [&](int64_t i) {
        const V x0 = V::load(xs + i), x1 = V::load(xs + i + W);
        const V g0 = effective_dy(V::load(gs + i), x0, kv, load_or_zero<V>(rs, i), kHasR, kRelu);
        const V g1 = effective_dy(V::load(gs + i + W), x1, kv, load_or_zero<V>(rs, i + W), kHasR, kRelu);
        grad_sums_add(a0, b0, g0, x0, kv.mean);
        grad_sums_add(a1, b1, g1, x1, kv.mean);
      };
      int64_t i = 0;
      for (; i + 2 * W * kFresh <= len; i += 2 * W * kFresh) {
        for (int j = 0; j < kFresh; ++j) two(i + 2 * W * j);
        flush();
      }
      for (; i + 2 * W <= len; i += 2 * W, ++fresh) two(i);
      for (; i + W <= len; i += W, ++fresh) {
        const V x0 = V::load(xs + i);
        const V g0 = effective_dy(V::load(gs + i), x0, kv, load_or_zero<V>(rs, i), kHasR, kRelu);
        grad_sums_add(a0, b0, g0, x0, kv.mean);
      }
      if (fresh >= kFresh) flush();  // so a lane never holds more than 2 * kFresh terms
      for (; i < len; ++i) {
        const Acc xv = to_acc(xs[i]);
        const Acc g = effective_dy(to_acc(gs[i]), xv, k, value_or_zero<Acc>(rs, i), kHasR, kRelu);
        grad_sums_add<Stat>(sdy, sdx, g, xv, k.mean);
      }
    }
    flush();
  });
  sum_dy = sdy + hsum(pair_total<Acc>(A_lo, A_hi));
  sum_dy_xmu = sdx + hsum(pair_total<Acc>(B_lo, B_hi));
}

// dx = grad_input(dy_eff) (when dx != null); dr = dy_eff (when dr != null). `stream`: as
// affine_values.
template <class T>
void grad_values(const T* dy, const T* x, Run run, BwdCoef<acc_t<T>> g, FwdCoef<acc_t<T>> k, const T* r, bool relu,
                 bool stream, T* dx, T* dr) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  with_flags(relu, g.centred, [&](auto relu_c, auto centred_c) {
    constexpr bool kRelu = decltype(relu_c)::value;
    BwdCoef<Acc> gs = g;
    gs.centred = decltype(centred_c)::value;
    const FwdCoef<V> kv = splat_coef<V>(k);
    const BwdCoef<V> gv = splat_coef<V>(gs);
    const int64_t len = run.len;
    for (int64_t seg = 0; seg < run.nseg; ++seg) {
      const int64_t o = seg * run.stride;
      const T* xs = x + o;
      const T* gp = dy + o;
      const T* rs = r ? r + o : nullptr;
      const bool has_r = rs != nullptr;
      T* dxs = dx ? dx + o : nullptr;
      T* drs = dr ? dr + o : nullptr;
      int64_t i = 0;
      for (; i + W <= len; i += W) {
        const V xv = V::load(xs + i);
        const V d = effective_dy(V::load(gp + i), xv, kv, load_or_zero<V>(rs, i), has_r, kRelu);
        if (drs) put(d, drs + i, stream);
        if (dxs) put(grad_input(d, xv, gv), dxs + i, stream);
      }
      if (i < len) {  // the last len - i < W values: one partial vector
        const int n = static_cast<int>(len - i);
        const V xv = V::load_part(xs + i, n);
        const V d = effective_dy(V::load_part(gp + i, n), xv, kv, has_r ? V::load_part(rs + i, n) : V::zero(), has_r,
                                 kRelu);
        if (drs) d.store_part(drs + i, n);
        if (dxs) grad_input(d, xv, gv).store_part(dxs + i, n);
      }
    }
  });
}

// The table's one-run entries. `stream`: as affine_values; the caller fences once after its
// last run (stream_fence), not after each.
template <class T>
void run_affine(const T* x, T* y, const Run& run, FwdCoef<acc_t<T>> k, const T* r, bool relu, bool stream) {
  affine_values(x, y, run, k, r, relu, stream);
}
template <class T>
void run_grad_input(const T* dy, const T* x, const Run& run, BwdCoef<acc_t<T>> g, FwdCoef<acc_t<T>> k, const T* r, bool relu,
                    bool stream, T* dx, T* dr) {
  grad_values(dy, x, run, g, k, r, relu, stream, dx, dr);
}

// The elementwise passes over `planes` consecutive planes of S values (the planar layout's
// (n, c) planes in memory order), the first of channel c0 of C: plane j has channel
// (c0 + j) % C and that channel's coefficients k[c] (g[c]); one call for many small planes.
template <class T>
void planes_affine(const T* x, T* y, int64_t planes, int64_t S, int64_t c0, int64_t C, const FwdCoef<acc_t<T>>* k,
                   const T* r, bool relu, bool stream) {
  // Prefetch (kPlaneAheadBytes) under plain stores only: with non-temporal stores the
  // benchmark's eval rows came out slower.
  const T* x_last = stream ? nullptr : x + planes * S - 1;
  for (int64_t j = 0, c = c0; j < planes; ++j, c = c + 1 == C ? 0 : c + 1) {
    const int64_t o = j * S;
    affine_values(x + o, y + o, Run{1, S, 0}, k[c], r ? r + o : nullptr, relu, stream, x_last);
  }
  if (stream) stream_fence();
}
template <class T>
void planes_grad_input(const T* dy, const T* x, int64_t planes, int64_t S, int64_t c0, int64_t C,
                       const BwdCoef<acc_t<T>>* g, const FwdCoef<acc_t<T>>* k, const T* r, bool relu, bool stream, T* dx,
                       T* dr) {
  for (int64_t j = 0, c = c0; j < planes; ++j, c = c + 1 == C ? 0 : c + 1) {
    const int64_t o = j * S;
    grad_values(dy + o, x + o, Run{1, S, 0}, g[c], k[c], r ? r + o : nullptr, relu, stream, dx ? dx + o : nullptr,
                dr ? dr + o : nullptr);
  }
  if (stream) stream_fence();
}

// ------------------------------------------------------------------ rows (channels last)

// Folds a pattern (length L = P * C; position q * C + c holds channel c) into per-channel
// sums out[c] = sum over q of pat[q * C + c] (no division per position).
template <class Acc> inline void fold_pattern(const Acc* pat, int64_t L, int64_t C, Acc* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = pat[c];
  for (int64_t q = C; q < L; q += C)
    for (int64_t c = 0; c < C; ++c) out[c] += pat[q + c];
}

// stats_shift (bn_math.h) of channels [c0, c1) of rows of C values (row j at x + j * C), from rows
// 0, 1, ...: bn_math.h's stats_shifts over pieces of kPiece channels, reading each row's piece in
// memory order (a short last piece is padded with zeros, whose shifts are dropped), with the
// channel loops vectorised by the compiler. shift: [c1 - c0].
template <class T> void rows_shifts(const T* x, int64_t C, int64_t count, int64_t c0, int64_t c1, Stat* shift) {
  constexpr int kPiece = 256;  // channels at a time: values, sums and spreads stay in L1
  for (int64_t p0 = c0; p0 < c1; p0 += kPiece) {
    const int64_t n = std::min<int64_t>(kPiece, c1 - p0);
    Stat out[kPiece];
    stats_shifts<kPiece>(count, [&](int j, Stat (&v)[kPiece]) {
      const T* row = x + j * C + p0;
      for (int64_t c = 0; c < n; ++c) v[c] = static_cast<Stat>(to_acc(row[c]));
      for (int64_t c = n; c < kPiece; ++c) v[c] = Stat(0);
    }, out);
    std::copy(out, out + n, shift + (p0 - c0));
  }
}

// Row kernels walk pattern positions in tiles of kTile so that the per-channel patterns and
// accumulators of a tile stay in L2 while all the block's rows stream past (only very wide
// rows are cut: a tile narrower than a page would defeat the hardware prefetcher). kTile is
// a multiple of every vector width.
constexpr int64_t kTile = 8192;

// The reductions over rows read a group of periods position by position (each position's
// values of kChunk periods together), so within a page the addresses jump back and forth by a
// row; the hardware prefetchers then fetch about half as fast as for a sequential read when a
// row is 0.5-4 KB (measured on Zen 4: 8.5-12 against 18-21 GB/s a thread, cold). So each load
// is paired with a prefetch into L2 of the value `ahead_periods` periods further on: whole
// groups, at least one and at least kPrefetchBytes ahead (float rows of 0.25-8 KB, one thread:
// 8 KB within 5% of the best distance tried, 16-64 KB up to 15% slower, 2 KB 30% slower on
// 0.25 KB rows). Same values, same order: the results are unchanged.
constexpr int64_t kPrefetchBytes = 8192;
template <class T> inline int64_t ahead_periods(int64_t period_stride, int group) {
  const int64_t group_bytes = group * period_stride * static_cast<int64_t>(sizeof(T));
  return group * std::max<int64_t>(1, (kPrefetchBytes + group_bytes - 1) / group_bytes);
}
// The first period the loads of the group of `group` periods starting at period k prefetch:
// `ahead` periods on when that whole group lies in the block, else (near its end) k itself,
// which costs nothing: no prefetch address leaves the block.
inline int64_t prefetch_period(int64_t k, int64_t ahead, int64_t periods, int group) {
  return k + ahead + group <= periods ? k + ahead : k;
}

// Per-channel statistics of a block's values minus the channel's shift (`shift`: a pattern
// of length L): mean[c] and m2[c] over `rows` rows (rows >= 1), reading the block once: each
// pattern position keeps LaneWelford's two levels (in scratch) over chunks of up to kChunk
// periods; positions of the same channel are merged at the end. scratch: 2 * L doubles
// followed by 3 * L Acc.
template <class T>
void rows_stats(const T* x, Rows R, const Stat* shift, Stat* mean, Stat* m2, Stat* scratch) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  using LW = LaneWelford<Acc>;
  constexpr int W = V::W;
  constexpr int H = LW::H;
  const int64_t C = R.C, L = R.L, ld = R.period_stride();
  const int64_t periods = R.periods();
  Stat* pmean = scratch;    // [L] per-position double state, n values each
  Stat* pm2 = scratch + L;  // [L]
  Acc* ps = reinterpret_cast<Acc*>(scratch + 2 * L);  // [L] per-position block: reference,
  Acc* pbm = ps + L;                                  // [L] mean relative to it,
  Acc* pbm2 = pbm + L;                                // [L] m2; bn values each
  int64_t n = 0;
  for (int64_t p0 = 0; p0 < L; p0 += kTile) {
    const int64_t p1 = std::min(L, p0 + kTile);
    n = 0;
    int64_t bn = 0;
    int chunks = 0;
    auto flush = [&] {
      for (int64_t p = p0; p < p1; p += W) {
        SVec sm[H], sm2[H], vs[H];
        for (int h = 0; h < H; ++h) {
          const int64_t q = p + h * SVec::W;
          vs[h] = SVec::load(shift + q);
          if (n) {
            sm[h] = SVec::load(pmean + q);
            sm2[h] = SVec::load(pm2 + q);
          }
        }
        LW::block_into_state(sm, sm2, n, V::load(ps + p), V::load(pbm + p), V::load(pbm2 + p), bn, vs);
        for (int h = 0; h < H; ++h) {
          sm[h].store(pmean + p + h * SVec::W);
          sm2[h].store(pm2 + p + h * SVec::W);
        }
      }
      n += bn;
      bn = 0;
      chunks = 0;
    };
    const int64_t ahead = ahead_periods<T>(ld, kChunk);
    for (int64_t k = 0; k < periods; k += kChunk) {
      const int K = static_cast<int>(std::min<int64_t>(kChunk, periods - k));
      const T* xs = x + k * ld;
      const T* pf = x + prefetch_period(k, ahead, periods, kChunk) * ld;
      with_count<kChunk>(K, [&](auto kc) {  // the chunk's size a constant of the position loop
        constexpr int KC = decltype(kc)::value;
        const ChanWeights<Acc> w = chan_weights<Acc>(std::max<int64_t>(bn, 1), KC);  // used where bn > 0
        for (int64_t p = p0; p < p1; p += W) {
          V v[KC];
          for (int j = 0; j < KC; ++j) {
            prefetch_l2(pf + j * ld + p);
            v[j] = V::load(xs + j * ld + p);
          }
          V sv, bm, bm2;
          if (bn) {
            sv = V::load(ps + p);
            bm = V::load(pbm + p);
            bm2 = V::load(pbm2 + p);
          }
          if (bn) LW::template chunk_joins_block<KC>(sv, bm, bm2, w, v);
          else LW::template chunk_starts_block<KC>(sv, bm, bm2, v);
          if (!bn) sv.store(ps + p);
          bm.store(pbm + p);
          bm2.store(pbm2 + p);
        }
      });
      bn += K;
      if (++chunks == kBlockChunks) flush();
    }
    if (bn) flush();
  }
  for (int64_t c = 0; c < C; ++c) {
    WelfordState<Stat> st{0, 0.0, 0.0};
    if (n > 0)
      for (int64_t q = 0; q < L; q += C) st = chan_merge(st, WelfordState<Stat>{n, pmean[q + c], pm2[q + c]});
    for (int64_t row = periods * (L / C); row < R.rows; ++row)
      welford_add(st, static_cast<Stat>(to_acc(x[row * R.ld + c])) - shift[c]);
    mean[c] = st.mean;
    m2[c] = st.m2;
  }
}

// Visits a block of rows: vec(i, p) for every vector of W values at offset i (pattern
// position p), tile by tile, then scalar(i, c) for each value of the last rows % P rows.
template <int W, class FV, class FS>
inline void walk_rows(const Rows& R, FV&& vec, FS&& scalar) {
  const int64_t L = R.L, ld = R.period_stride();
  const int64_t end = R.periods() * ld;
  for (int64_t p0 = 0; p0 < L; p0 += kTile) {
    const int64_t p1 = std::min(L, p0 + kTile);
    for (int64_t base = 0; base < end; base += ld)
      for (int64_t p = p0; p < p1; p += W) vec(base + p, p);
  }
  for (int64_t row = R.periods() * (L / R.C); row < R.rows; ++row)
    for (int64_t c = 0; c < R.C; ++c) scalar(row * R.ld + c, c);
}

// The elementwise passes over rows read their inputs in memory order, but with three or four
// coefficient loads a vector their loop keeps too few of the inputs' misses in flight for the
// hardware prefetchers to stream at memory speed (cold float32 channels-last eval 1.1-1.4x
// slower than with the coefficient loads removed). So where the driver says the inputs are
// not in the cache, each vector's loads are paired with prefetch_input of the values
// kPrefetchBytes further on, clamped to the block's last value (Zen 4, cold float32 eval: 4-8 KB
// ahead 1.13-1.49x faster than none, 1 KB 0.98-1.29x, 64 KB less than 4-8 KB).
template <class T> struct AheadInBlock {
  int64_t ahead, last;
  explicit AheadInBlock(const Rows& R)
      : ahead(kPrefetchBytes / static_cast<int64_t>(sizeof(T))), last(R.rows * R.ld - 1) {}
  void operator()(const T* p, int64_t i) const {
    if (p != nullptr) prefetch_input(p + i, ahead, p + last);
  }
};

// Forward coefficients at pattern position p (vectors) or of channel c (scalars). With
// `scale` false only the mean is loaded (a backward without relu needs no a, b).
template <class V, class Acc>
inline FwdCoef<V> fwd_at(const Acc* mean, const Acc* a, const Acc* b, int64_t p, bool scale = true) {
  return scale ? FwdCoef<V>{V::load(mean + p), V::load(a + p), V::load(b + p)}
               : FwdCoef<V>{V::load(mean + p), V::zero(), V::zero()};
}
template <class Acc> inline FwdCoef<Acc> fwd_of(const Acc* mean, const Acc* a, const Acc* b, int64_t c) {
  return FwdCoef<Acc>{mean[c], a[c], b[c]};
}

// y = act((x - mean) * a + b [+ r]) over a block of rows. mean/a/b: patterns of length L
// (position q * C + c holds channel c's value).
template <class T>
void rows_affine(const T* x, T* y, Rows R, const acc_t<T>* mean, const acc_t<T>* a, const acc_t<T>* b, const T* r,
                 bool relu, bool stream, bool prefetch_x) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  with_flags(relu, r != nullptr, [&](auto relu_c, auto has_r_c) {
    constexpr bool kRelu = decltype(relu_c)::value;
    constexpr bool kHasR = decltype(has_r_c)::value;
    const AheadInBlock<T> prefetch(R);
    walk_rows<V::W>(
        R,
        [&](int64_t i, int64_t p) {
          if (prefetch_x) prefetch(x, i);
          if (kHasR) prefetch(r, i);
          put(forward_value(V::load(x + i), fwd_at<V>(mean, a, b, p), load_or_zero<V>(kHasR ? r : nullptr, i), kHasR,
                            kRelu),
              y + i, stream);
        },
        [&](int64_t i, int64_t c) {
          y[i] = from_acc<T>(forward_value(to_acc(x[i]), fwd_of(mean, a, b, c), value_or_zero<Acc>(r, i), kHasR, kRelu));
        });
  });
  if (stream) stream_fence();
}

// Per-channel sum dy_eff and sum dy_eff * (x - mean) over a block of rows (outputs
// overwritten). Each pattern position collects up to kFresh periods in Acc, then adds them
// into (lo, hi) pairs of doubles (add_wide). scratch: 6 * L doubles.
template <class T>
void rows_grad_sums(const T* dy, const T* x, Rows R, const acc_t<T>* mean, const acc_t<T>* a, const acc_t<T>* b,
                    const T* r, bool relu, Stat* sum_dy, Stat* sum_dy_xmu, Stat* scratch) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  // Where each pattern position's pair lives: a float vector's halves are SVec::W positions apart,
  // a double vector's compensation is in the array's second half.
  constexpr int64_t kHi = W == SVec::W ? -1 : SVec::W;
  const int64_t C = R.C, L = R.L, ld = R.period_stride();
  const int64_t hi_off = kHi < 0 ? L : kHi;
  const int64_t periods = R.periods();
  const bool has_r = r != nullptr;
  Stat* s1 = scratch;          // pairs of sum dy
  Stat* s2 = scratch + 2 * L;  // pairs of sum dy * (x - mean)
  Acc* f1 = reinterpret_cast<Acc*>(scratch + 4 * L);  // [L] fresh
  Acc* f2 = f1 + L;                                   // [L]
  const int64_t pair_len = kHi < 0 ? 2 * L : L;  // doubles a pair array uses
  for (int64_t p = 0; p < pair_len; ++p) s1[p] = s2[p] = 0.0;
  for (int64_t p = 0; p < 2 * L; ++p) f1[p] = Acc(0);
  auto flush = [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p += W) {
      SVec a_lo = SVec::load(s1 + p), a_hi = SVec::load(s1 + p + hi_off);
      SVec b_lo = SVec::load(s2 + p), b_hi = SVec::load(s2 + p + hi_off);
      add_wide(a_lo, a_hi, V::load(f1 + p));
      add_wide(b_lo, b_hi, V::load(f2 + p));
      a_lo.store(s1 + p);
      a_hi.store(s1 + p + hi_off);
      b_lo.store(s2 + p);
      b_hi.store(s2 + p + hi_off);
      V::zero().store(f1 + p);
      V::zero().store(f2 + p);
    }
  };
  for (int64_t p0 = 0; p0 < L; p0 += kTile) {
    const int64_t p1 = std::min(L, p0 + kTile);
    // kSumGroup periods at a time, added in period order into a position's fresh sums held in
    // registers (kFresh is a multiple of kSumGroup: a group never spans a flush).
    constexpr int kSumGroup = 8;
    static_assert(kFresh % kSumGroup == 0, "a group of periods must not span a flush");
    const int64_t ahead = ahead_periods<T>(ld, kSumGroup);
    for (int64_t k = 0; k < periods; k += kSumGroup) {
      const int n = static_cast<int>(std::min<int64_t>(kSumGroup, periods - k));
      const int64_t base = k * ld;
      const int64_t pf = prefetch_period(k, ahead, periods, kSumGroup) * ld;  // offset of the values to prefetch
      for (int64_t p = p0; p < p1; p += W) {
        const FwdCoef<V> kv = fwd_at<V>(mean, a, b, p, relu);
        V s1 = V::load(f1 + p), s2 = V::load(f2 + p);
        for (int j = 0; j < n; ++j) {
          const int64_t i = base + j * ld + p;
          prefetch_l2(x + pf + j * ld + p);
          prefetch_l2(dy + pf + j * ld + p);
          if (has_r && relu) prefetch_l2(r + pf + j * ld + p);  // read only under relu (effective_dy)
          const V xv = V::load(x + i);
          grad_sums_add(s1, s2, effective_dy(V::load(dy + i), xv, kv, load_or_zero<V>(r, i), has_r, relu), xv,
                        kv.mean);
        }
        s1.store(f1 + p);
        s2.store(f2 + p);
      }
      if ((k + n) % kFresh == 0) flush(p0, p1);
    }
    flush(p0, p1);
  }
  if (kHi < 0) {  // add the compensations (pair_total)
    for (int64_t p = 0; p < L; p += SVec::W) {
      pair_total<Acc>(SVec::load(s1 + p), SVec::load(s1 + L + p)).store(s1 + p);
      pair_total<Acc>(SVec::load(s2 + p), SVec::load(s2 + L + p)).store(s2 + p);
    }
  }
  fold_pattern(s1, L, C, sum_dy);
  fold_pattern(s2, L, C, sum_dy_xmu);
  for (int64_t row = periods * (L / C); row < R.rows; ++row)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = row * R.ld + c;
      const FwdCoef<Acc> k = fwd_of(mean, a, b, c);
      const Acc xv = to_acc(x[i]);
      const Acc g = effective_dy(to_acc(dy[i]), xv, k, value_or_zero<Acc>(r, i), has_r, relu);
      grad_sums_add<Stat>(sum_dy[c], sum_dy_xmu[c], g, xv, k.mean);
    }
}

// dx = grad_input(dy_eff), dr = dy_eff over a block of rows. All per-channel inputs are
// patterns of length L; `centred`: BwdCoef::centred (training).
template <class T>
void rows_grad_input(const T* dy, const T* x, Rows R, const acc_t<T>* mean, const acc_t<T>* A, const acc_t<T>* Bm,
                     const acc_t<T>* D, bool centred, const acc_t<T>* a, const acc_t<T>* b, const T* r, bool relu,
                     bool stream, bool prefetch_in, T* dx, T* dr) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  const bool has_r = r != nullptr;
  with_flags(relu, centred, [&](auto relu_c, auto centred_c) {
    constexpr bool kRelu = decltype(relu_c)::value;
    constexpr bool kCentred = decltype(centred_c)::value;
    const AheadInBlock<T> prefetch(R);
    walk_rows<V::W>(
        R,
        [&](int64_t i, int64_t p) {
          if (prefetch_in) {
            prefetch(x, i);
            prefetch(dy, i);
            if (kRelu && has_r) prefetch(r, i);  // the residual is read only under relu (effective_dy)
          }
          const V xv = V::load(x + i);
          const V d = effective_dy(V::load(dy + i), xv, fwd_at<V>(mean, a, b, p, kRelu), load_or_zero<V>(r, i), has_r,
                                   kRelu);
          if (dr) put(d, dr + i, stream);
          if (dx) {
            const BwdCoef<V> g{V::load(mean + p), V::load(A + p), kCentred ? V::load(Bm + p) : V::zero(),
                               kCentred ? V::load(D + p) : V::zero(), kCentred};
            put(grad_input(d, xv, g), dx + i, stream);
          }
        },
        [&](int64_t i, int64_t c) {
          const Acc xv = to_acc(x[i]);
          const Acc d = effective_dy(to_acc(dy[i]), xv, fwd_of(mean, a, b, c), value_or_zero<Acc>(r, i), has_r, kRelu);
          if (dr) dr[i] = from_acc<T>(d);
          if (dx) dx[i] = from_acc<T>(grad_input(d, xv, BwdCoef<Acc>{mean[c], A[c], Bm[c], D[c], kCentred}));
        });
  });
  if (stream) stream_fence();
}
