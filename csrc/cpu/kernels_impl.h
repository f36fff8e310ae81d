// CPU kernel bodies: single-threaded loops over one run or one block of rows. Torch-free.
// Included by each ISA unit inside its own namespace, after vec.h; threading and the
// deterministic merge of partial results live in the driver (bn_cpu.cpp).
//
// Two memory shapes:
//  run   : values of ONE channel (planar layout): `nseg` segments of `len` contiguous values,
//          `stride` apart (see Run in kernels.h)
//  rows  : `rows` rows of `C` contiguous channel values (channels-last layout). The row
//          kernels walk the block flat, in periods of L = lcm(C, W) values (P = L / C rows),
//          so every vector lane keeps one channel whatever C is. Per-channel inputs arrive
//          replicated to length L ("patterns", see make_pattern); `rows` % P rows at the end
//          are handled one value at a time.
#pragma once

using std::int64_t;

// ------------------------------------------------------------------ runs (planar)
// A run is `nseg` segments of `len` contiguous values of one channel, `stride` values apart
// (consecutive planes of a channel, or a piece of one plane when nseg == 1).

// Lane-wise Welford state: every lane of `mean`/`m2` summarises `n` values. Values arrive in
// chunks of K <= kChunk vectors; a chunk's statistics are exact (its mean, then its centred
// squares, in registers) and are merged with Chan's formula, so the data is read once.
constexpr int kChunk = 8;

template <class Acc> struct LaneWelford {
  using V = Vec<Acc>;
  V mean = V::zero(), m2 = V::zero();
  int64_t n = 0;

  static void chunk_stats(const V* v, int K, V& cmean, V& cm2) {
    V sum = v[0];
    for (int j = 1; j < K; ++j) sum = sum + v[j];
    cmean = sum * V::set1(Acc(1) / static_cast<Acc>(K));
    cm2 = V::zero();
    for (int j = 0; j < K; ++j) {
      const V d = v[j] - cmean;
      cm2 = V::madd(d, d, cm2);
    }
  }
  // Merges a chunk summary (k values a lane) into (mean, m2) with n values a lane.
  static void merge(V& mean, V& m2, int64_t n, const V& cmean, const V& cm2, int64_t k) {
    if (n == 0) {
      mean = cmean;
      m2 = cm2;
      return;
    }
    const Acc ratio = static_cast<Acc>(k) / static_cast<Acc>(n + k);
    const Acc cross = static_cast<Acc>(n) * ratio;
    const V delta = cmean - mean;
    mean = V::madd(delta, V::set1(ratio), mean);
    m2 = V::madd(delta * delta, V::set1(cross), m2 + cm2);
  }
  void add(const V* v, int K) {
    V cmean, cm2;
    chunk_stats(v, K, cmean, cm2);
    merge(mean, m2, n, cmean, cm2, K);
    n += K;
  }
  // Chan merge of all lanes (equal counts) into one state.
  WelfordState<Acc> reduce() const {
    WelfordState<Acc> out{0, Acc(0), Acc(0)};
    if (n == 0) return out;
    Acc lm[V::W], lm2[V::W];
    mean.lanes(lm);
    m2.lanes(lm2);
    for (int i = 0; i < V::W; ++i) out = chan_merge(out, WelfordState<Acc>{n, lm[i], lm2[i]});
    return out;
  }
};

// Statistics of a run, reading it once (lane-wise chunked Welford, exact within chunks).
template <class T>
WelfordState<acc_t<T>> run_stats(const T* x, Run run) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  const int64_t len = run.len;
  LaneWelford<Acc> lanes;
  WelfordState<Acc> tail{0, Acc(0), Acc(0)};
  V v[kChunk];
  for (int64_t k = 0; k < run.nseg; ++k) {
    const T* p = x + k * run.stride;
    int64_t i = 0;
    for (; i + kChunk * W <= len; i += kChunk * W) {
      for (int j = 0; j < kChunk; ++j) v[j] = V::load(p + i + j * W);
      lanes.add(v, kChunk);
    }
    const int rest = static_cast<int>((len - i) / W);
    if (rest > 0) {
      for (int j = 0; j < rest; ++j) v[j] = V::load(p + i + j * W);
      lanes.add(v, rest);
      i += rest * W;
    }
    for (; i < len; ++i) welford_add(tail, to_acc(p[i]));
  }
  return chan_merge(lanes.reduce(), tail);
}

// y = (x - mean) * a + b [+ r] [relu], one channel. y and r are laid out like x.
template <class T>
void run_affine(const T* x, T* y, Run run, FwdCoef<acc_t<T>> k, const T* r, bool relu) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  const V vm = V::set1(k.mean), va = V::set1(k.a), vb = V::set1(k.b);
  const int64_t len = run.len;
  for (int64_t seg = 0; seg < run.nseg; ++seg) {
    const int64_t o = seg * run.stride;
    const T* xs = x + o;
    T* ys = y + o;
    const T* rs = r ? r + o : nullptr;
    int64_t i = 0;
    if (rs == nullptr && !relu) {
      for (; i + W <= len; i += W) V::madd(V::load(xs + i) - vm, va, vb).store(ys + i);
      for (; i < len; ++i) ys[i] = from_acc<T>(smadd(to_acc(xs[i]) - k.mean, k.a, k.b));
      continue;
    }
    for (; i + W <= len; i += W) {
      V v = V::madd(V::load(xs + i) - vm, va, vb);
      if (rs) v = v + V::load(rs + i);
      if (relu) v = V::relu(v);
      v.store(ys + i);
    }
    for (; i < len; ++i) {
      Acc v = smadd(to_acc(xs[i]) - k.mean, k.a, k.b);
      if (rs) v += to_acc(rs[i]);
      if (relu) v = v > Acc(0) ? v : Acc(0);
      ys[i] = from_acc<T>(v);
    }
  }
}

// Effective upstream gradient: dy, masked by the relu of the recomputed pre-activation.
template <class V, class T>
inline V masked_dy(const V& dy, const V& x, const V& vm, const V& va, const V& vb, const T* r, int64_t i, bool relu) {
  if (!relu) return dy;
  V pre = V::madd(x - vm, va, vb);
  if (r) pre = pre + V::load(r + i);
  return V::where_positive(pre, dy);
}
template <class Acc, class T>
inline Acc masked_dy_scalar(Acc dy, Acc x, const FwdCoef<Acc>& k, const T* r, int64_t i, bool relu) {
  if (!relu) return dy;
  Acc pre = smadd(x - k.mean, k.a, k.b);
  if (r) pre += to_acc(r[i]);
  return pre > Acc(0) ? dy : Acc(0);
}

// sum dy_eff and sum dy_eff * (x - mean) over one run of one channel.
template <class T>
void run_grad_sums(const T* dy, const T* x, Run run, FwdCoef<acc_t<T>> k, const T* r, bool relu,
                   acc_t<T>& sum_dy, acc_t<T>& sum_dy_xmu) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  const V vm = V::set1(k.mean), va = V::set1(k.a), vb = V::set1(k.b);
  V a0 = V::zero(), a1 = V::zero(), b0 = V::zero(), b1 = V::zero();
  Acc sdy = 0, sdx = 0;
  const int64_t len = run.len;
  for (int64_t seg = 0; seg < run.nseg; ++seg) {
    const int64_t o = seg * run.stride;
    const T* xs = x + o;
    const T* gs = dy + o;
    const T* rs = r ? r + o : nullptr;
    int64_t i = 0;
    for (; i + 2 * W <= len; i += 2 * W) {
      const V x0 = V::load(xs + i), x1 = V::load(xs + i + W);
      const V g0 = masked_dy(V::load(gs + i), x0, vm, va, vb, rs, i, relu);
      const V g1 = masked_dy(V::load(gs + i + W), x1, vm, va, vb, rs, i + W, relu);
      a0 = a0 + g0;
      a1 = a1 + g1;
      b0 = V::madd(g0, x0 - vm, b0);
      b1 = V::madd(g1, x1 - vm, b1);
    }
    for (; i + W <= len; i += W) {
      const V x0 = V::load(xs + i);
      const V g0 = masked_dy(V::load(gs + i), x0, vm, va, vb, rs, i, relu);
      a0 = a0 + g0;
      b0 = V::madd(g0, x0 - vm, b0);
    }
    for (; i < len; ++i) {
      const Acc xv = to_acc(xs[i]);
      const Acc g = masked_dy_scalar(to_acc(gs[i]), xv, k, rs, i, relu);
      sdy += g;
      sdx = smadd(g, xv - k.mean, sdx);
    }
  }
  sum_dy = sdy + hsum(a0 + a1);
  sum_dy_xmu = sdx + hsum(b0 + b1);
}

// dx = A * dy_eff + Bm * (x - mean) + D (when dx != null); dr = dy_eff (when dr != null).
template <class T>
void run_grad_input(const T* dy, const T* x, Run run, BwdCoef<acc_t<T>> g, FwdCoef<acc_t<T>> k, const T* r,
                    bool relu, T* dx, T* dr) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  const V vm = V::set1(k.mean), va = V::set1(k.a), vb = V::set1(k.b);
  const V vA = V::set1(g.A), vB = V::set1(g.Bm), vD = V::set1(g.D);
  const int64_t len = run.len;
  for (int64_t seg = 0; seg < run.nseg; ++seg) {
    const int64_t o = seg * run.stride;
    const T* xs = x + o;
    const T* gs = dy + o;
    const T* rs = r ? r + o : nullptr;
    T* dxs = dx ? dx + o : nullptr;
    T* drs = dr ? dr + o : nullptr;
    int64_t i = 0;
    for (; i + W <= len; i += W) {
      const V xv = V::load(xs + i);
      const V d = masked_dy(V::load(gs + i), xv, vm, va, vb, rs, i, relu);
      if (drs) d.store(drs + i);
      if (dxs) V::madd(d, vA, V::madd(xv - vm, vB, vD)).store(dxs + i);
    }
    for (; i < len; ++i) {
      const Acc xv = to_acc(xs[i]);
      const Acc d = masked_dy_scalar(to_acc(gs[i]), xv, k, rs, i, relu);
      if (drs) drs[i] = from_acc<T>(d);
      if (dxs) dxs[i] = from_acc<T>(smadd(d, g.A, smadd(xv - k.mean, g.Bm, g.D)));
    }
  }
}

// ------------------------------------------------------------------ rows (channels last)

// Folds a pattern (length L = P * C; position q * C + c holds channel c) into per-channel
// sums out[c] = sum over q of pat[q * C + c] (no division per position).
template <class Acc> inline void fold_pattern(const Acc* pat, int64_t L, int64_t C, Acc* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = pat[c];
  for (int64_t q = C; q < L; q += C)
    for (int64_t c = 0; c < C; ++c) out[c] += pat[q + c];
}

// Row kernels walk pattern positions in tiles of kTile so that the per-channel patterns and
// accumulators of a tile stay in L2 while all the block's rows stream past (only very wide
// rows are cut: a tile narrower than a page would defeat the hardware prefetcher). kTile is
// a multiple of every vector width.
constexpr int64_t kTile = 8192;

// Cascade summation over the periods of a block: `fresh` collects up to kCascade periods,
// then is added into `total` (rounding error grows with kCascade + periods / kCascade
// instead of with the number of periods).
constexpr int64_t kCascade = 16;

template <class Acc> inline void cascade_flush(Acc* total, Acc* fresh, int64_t p0, int64_t p1) {
  using V = Vec<Acc>;
  for (int64_t p = p0; p < p1; p += V::W) {
    (V::load(total + p) + V::load(fresh + p)).store(total + p);
    V::zero().store(fresh + p);
  }
}

// Per-channel statistics of a block: mean[c] and m2[c] over `rows` rows (rows >= 1), reading
// the block once: each pattern position keeps a lane-wise Welford state over chunks of up to
// kChunk periods; positions of the same channel are merged at the end. scratch: 2 * L.
template <class T>
void rows_stats(const T* x, int64_t rows, int64_t C, int64_t L, acc_t<T>* mean, acc_t<T>* m2, acc_t<T>* scratch) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  const int64_t P = L / C;
  const int64_t periods = rows / P;
  Acc* pmean = scratch;    // [L] per-position state, n values each
  Acc* pm2 = scratch + L;  // [L]
  int64_t n = 0;
  V v[kChunk];
  for (int64_t p0 = 0; p0 < L; p0 += kTile) {
    const int64_t p1 = std::min(L, p0 + kTile);
    n = 0;
    for (int64_t k = 0; k < periods; k += kChunk) {
      const int K = static_cast<int>(std::min<int64_t>(kChunk, periods - k));
      const T* xs = x + k * L;
      for (int64_t p = p0; p < p1; p += W) {
        for (int j = 0; j < K; ++j) v[j] = V::load(xs + j * L + p);
        V cmean, cm2;
        LaneWelford<Acc>::chunk_stats(v, K, cmean, cm2);
        V sm = n ? V::load(pmean + p) : V::zero(), sm2 = n ? V::load(pm2 + p) : V::zero();
        LaneWelford<Acc>::merge(sm, sm2, n, cmean, cm2, K);
        sm.store(pmean + p);
        sm2.store(pm2 + p);
      }
      n += K;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    WelfordState<Acc> st{0, Acc(0), Acc(0)};
    if (n > 0)
      for (int64_t q = 0; q < L; q += C) st = chan_merge(st, WelfordState<Acc>{n, pmean[q + c], pm2[q + c]});
    for (int64_t i = periods * L + c; i < rows * C; i += C) welford_add(st, to_acc(x[i]));
    mean[c] = st.mean;
    m2[c] = st.m2;
  }
}

// Visits a block of rows: vec(i, p) for every vector of W values at flat offset i (pattern
// position p), tile by tile, then scalar(i, c) for each value of the last rows % P rows.
template <int W, class FV, class FS>
inline void walk_rows(int64_t rows, int64_t C, int64_t L, FV&& vec, FS&& scalar) {
  const int64_t P = L / C;
  const int64_t flat_end = (rows / P) * L;
  for (int64_t p0 = 0; p0 < L; p0 += kTile) {
    const int64_t p1 = std::min(L, p0 + kTile);
    for (int64_t base = 0; base < flat_end; base += L)
      for (int64_t p = p0; p < p1; p += W) vec(base + p, p);
  }
  for (int64_t row = flat_end; row < rows * C; row += C)
    for (int64_t c = 0; c < C; ++c) scalar(row + c, c);
}

// y = (x - mean) * a + b [+ r] [relu] over a block of rows. mean/a/b: patterns of length L
// (position q * C + c holds channel c's value).
template <class T>
void rows_affine(const T* x, T* y, int64_t rows, int64_t C, int64_t L, const acc_t<T>* mean, const acc_t<T>* a,
                 const acc_t<T>* b, const T* r, bool relu) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  walk_rows<V::W>(
      rows, C, L,
      [&](int64_t i, int64_t p) {
        V v = V::madd(V::load(x + i) - V::load(mean + p), V::load(a + p), V::load(b + p));
        if (r) v = v + V::load(r + i);
        if (relu) v = V::relu(v);
        v.store(y + i);
      },
      [&](int64_t i, int64_t c) {
        Acc v = smadd(to_acc(x[i]) - mean[c], a[c], b[c]);
        if (r) v += to_acc(r[i]);
        if (relu) v = v > Acc(0) ? v : Acc(0);
        y[i] = from_acc<T>(v);
      });
}

// Per-channel sum dy_eff and sum dy_eff * (x - mean) over a block of rows (outputs overwritten).
// scratch: 4 * L accumulators.
template <class T>
void rows_grad_sums(const T* dy, const T* x, int64_t rows, int64_t C, int64_t L, const acc_t<T>* mean,
                    const acc_t<T>* a, const acc_t<T>* b, const T* r, bool relu, acc_t<T>* sum_dy,
                    acc_t<T>* sum_dy_xmu, acc_t<T>* scratch) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  const int64_t P = L / C;
  const int64_t periods = rows / P;
  const int64_t flat_end = periods * L;
  Acc* t1 = scratch;
  Acc* f1 = scratch + L;
  Acc* t2 = scratch + 2 * L;
  Acc* f2 = scratch + 3 * L;
  for (int64_t p = 0; p < 4 * L; ++p) scratch[p] = Acc(0);
  for (int64_t p0 = 0; p0 < L; p0 += kTile) {
    const int64_t p1 = std::min(L, p0 + kTile);
    for (int64_t k = 0; k < periods; ++k) {
      const int64_t base = k * L;
      for (int64_t p = p0; p < p1; p += W) {
        const int64_t i = base + p;
        const V vm = V::load(mean + p);
        const V xv = V::load(x + i);
        const V g = relu ? masked_dy(V::load(dy + i), xv, vm, V::load(a + p), V::load(b + p), r, i, true) : V::load(dy + i);
        (V::load(f1 + p) + g).store(f1 + p);
        V::madd(g, xv - vm, V::load(f2 + p)).store(f2 + p);
      }
      if ((k + 1) % kCascade == 0) {
        cascade_flush(t1, f1, p0, p1);
        cascade_flush(t2, f2, p0, p1);
      }
    }
    cascade_flush(t1, f1, p0, p1);
    cascade_flush(t2, f2, p0, p1);
  }
  fold_pattern(t1, L, C, sum_dy);
  fold_pattern(t2, L, C, sum_dy_xmu);
  for (int64_t row = flat_end; row < rows * C; row += C)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = row + c;
      const FwdCoef<Acc> k{mean[c], a[c], b[c]};
      const Acc xv = to_acc(x[i]);
      const Acc g = masked_dy_scalar(to_acc(dy[i]), xv, k, r, i, relu);
      sum_dy[c] += g;
      sum_dy_xmu[c] = smadd(g, xv - k.mean, sum_dy_xmu[c]);
    }
}

// dx = A * dy_eff + Bm * (x - mean) + D, dr = dy_eff over a block of rows. All per-channel
// inputs are patterns of length L.
template <class T>
void rows_grad_input(const T* dy, const T* x, int64_t rows, int64_t C, int64_t L, const acc_t<T>* mean,
                     const acc_t<T>* A, const acc_t<T>* Bm, const acc_t<T>* D, const acc_t<T>* a,
                     const acc_t<T>* b, const T* r, bool relu, T* dx, T* dr) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  walk_rows<V::W>(
      rows, C, L,
      [&](int64_t i, int64_t p) {
        const V vm = V::load(mean + p);
        const V xv = V::load(x + i);
        const V d = relu ? masked_dy(V::load(dy + i), xv, vm, V::load(a + p), V::load(b + p), r, i, true)
                         : V::load(dy + i);
        if (dr) d.store(dr + i);
        if (dx) V::madd(d, V::load(A + p), V::madd(xv - vm, V::load(Bm + p), V::load(D + p))).store(dx + i);
      },
      [&](int64_t i, int64_t c) {
        const FwdCoef<Acc> k{mean[c], a[c], b[c]};
        const Acc xv = to_acc(x[i]);
        const Acc d = masked_dy_scalar(to_acc(dy[i]), xv, k, r, i, relu);
        if (dr) dr[i] = from_acc<T>(d);
        if (dx) dx[i] = from_acc<T>(smadd(d, A[c], smadd(xv - k.mean, Bm[c], D[c])));
      });
}
