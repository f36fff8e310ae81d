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

// Exact two-pass statistics of a run (a run is meant to fit in L1/L2: <= kRunMax values).
template <class T>
WelfordState<acc_t<T>> run_stats(const T* x, Run run) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  const int64_t len = run.len;
  WelfordState<Acc> out{run.nseg * len, Acc(0), Acc(0)};
  if (out.n <= 0) return out;
  V s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
  Acc sum = 0;
  for (int64_t k = 0; k < run.nseg; ++k) {
    const T* p = x + k * run.stride;
    int64_t i = 0;
    for (; i + 4 * W <= len; i += 4 * W) {
      s0 = s0 + V::load(p + i);
      s1 = s1 + V::load(p + i + W);
      s2 = s2 + V::load(p + i + 2 * W);
      s3 = s3 + V::load(p + i + 3 * W);
    }
    for (; i + W <= len; i += W) s0 = s0 + V::load(p + i);
    for (; i < len; ++i) sum += to_acc(p[i]);
  }
  sum += hsum((s0 + s1) + (s2 + s3));
  const Acc mean = sum / static_cast<Acc>(out.n);

  const V vm = V::set1(mean);
  s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
  Acc m2 = 0;
  for (int64_t k = 0; k < run.nseg; ++k) {
    const T* p = x + k * run.stride;
    int64_t i = 0;
    for (; i + 4 * W <= len; i += 4 * W) {
      const V d0 = V::load(p + i) - vm, d1 = V::load(p + i + W) - vm;
      const V d2 = V::load(p + i + 2 * W) - vm, d3 = V::load(p + i + 3 * W) - vm;
      s0 = V::madd(d0, d0, s0);
      s1 = V::madd(d1, d1, s1);
      s2 = V::madd(d2, d2, s2);
      s3 = V::madd(d3, d3, s3);
    }
    for (; i + W <= len; i += W) {
      const V d = V::load(p + i) - vm;
      s0 = V::madd(d, d, s0);
    }
    for (; i < len; ++i) {
      const Acc d = to_acc(p[i]) - mean;
      m2 = smadd(d, d, m2);
    }
  }
  out.mean = mean;
  out.m2 = m2 + hsum((s0 + s1) + (s2 + s3));
  return out;
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

// Cascade summation over the periods of a block: `fresh` collects up to kCascade periods,
// then is added into `total` (rounding error grows with kCascade + periods / kCascade
// instead of with the number of periods).
constexpr int64_t kCascade = 16;

template <class Acc> inline void cascade_flush(Acc* total, Acc* fresh, int64_t L) {
  using V = Vec<Acc>;
  for (int64_t p = 0; p < L; p += V::W) {
    (V::load(total + p) + V::load(fresh + p)).store(total + p);
    V::zero().store(fresh + p);
  }
}

// Two-pass per-channel statistics of a block: mean[c], m2[c] over `rows` rows (rows >= 1).
// scratch: 3 * L accumulators.
template <class T>
void rows_stats(const T* x, int64_t rows, int64_t C, int64_t L, acc_t<T>* mean, acc_t<T>* m2, acc_t<T>* scratch) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  const int64_t P = L / C;
  const int64_t periods = rows / P;
  const int64_t flat_end = periods * L;
  Acc* total = scratch;        // [L]
  Acc* fresh = scratch + L;    // [L]
  Acc* mpat = scratch + 2 * L;  // [L] mean replicated
  for (int64_t p = 0; p < L; ++p) total[p] = fresh[p] = Acc(0);
  for (int64_t k = 0; k < periods; ++k) {
    const T* xs = x + k * L;
    for (int64_t p = 0; p < L; p += W) (V::load(fresh + p) + V::load(xs + p)).store(fresh + p);
    if ((k + 1) % kCascade == 0) cascade_flush(total, fresh, L);
  }
  cascade_flush(total, fresh, L);
  for (int64_t c = 0; c < C; ++c) mean[c] = Acc(0);
  for (int64_t p = 0; p < L; ++p) mean[p % C] += total[p];
  for (int64_t i = flat_end; i < rows * C; ++i) mean[i % C] += to_acc(x[i]);
  const Acc inv_rows = Acc(1) / static_cast<Acc>(rows);
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv_rows;

  for (int64_t p = 0; p < L; ++p) {
    mpat[p] = mean[p % C];
    total[p] = Acc(0);
  }
  for (int64_t k = 0; k < periods; ++k) {
    const T* xs = x + k * L;
    for (int64_t p = 0; p < L; p += W) {
      const V d = V::load(xs + p) - V::load(mpat + p);
      V::madd(d, d, V::load(fresh + p)).store(fresh + p);
    }
    if ((k + 1) % kCascade == 0) cascade_flush(total, fresh, L);
  }
  cascade_flush(total, fresh, L);
  for (int64_t c = 0; c < C; ++c) m2[c] = Acc(0);
  for (int64_t p = 0; p < L; ++p) m2[p % C] += total[p];
  for (int64_t i = flat_end; i < rows * C; ++i) {
    const Acc d = to_acc(x[i]) - mean[i % C];
    m2[i % C] = smadd(d, d, m2[i % C]);
  }
}

// y = (x - mean) * a + b [+ r] [relu] over a block of rows. mean/a/b: patterns of length L
// (value of channel p % C at position p).
template <class T>
void rows_affine(const T* x, T* y, int64_t rows, int64_t C, int64_t L, const acc_t<T>* mean, const acc_t<T>* a,
                 const acc_t<T>* b, const T* r, bool relu) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  constexpr int W = V::W;
  const int64_t P = L / C;
  const int64_t flat_end = (rows / P) * L;
  for (int64_t base = 0; base < flat_end; base += L) {
    for (int64_t p = 0; p < L; p += W) {
      const int64_t i = base + p;
      V v = V::madd(V::load(x + i) - V::load(mean + p), V::load(a + p), V::load(b + p));
      if (r) v = v + V::load(r + i);
      if (relu) v = V::relu(v);
      v.store(y + i);
    }
  }
  for (int64_t i = flat_end; i < rows * C; ++i) {
    const int64_t c = i % C;
    Acc v = smadd(to_acc(x[i]) - mean[c], a[c], b[c]);
    if (r) v += to_acc(r[i]);
    if (relu) v = v > Acc(0) ? v : Acc(0);
    y[i] = from_acc<T>(v);
  }
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
  for (int64_t k = 0; k < periods; ++k) {
    const int64_t base = k * L;
    for (int64_t p = 0; p < L; p += W) {
      const int64_t i = base + p;
      const V vm = V::load(mean + p);
      const V xv = V::load(x + i);
      const V g = masked_dy(V::load(dy + i), xv, vm, V::load(a + p), V::load(b + p), r, i, relu);
      (V::load(f1 + p) + g).store(f1 + p);
      V::madd(g, xv - vm, V::load(f2 + p)).store(f2 + p);
    }
    if ((k + 1) % kCascade == 0) {
      cascade_flush(t1, f1, L);
      cascade_flush(t2, f2, L);
    }
  }
  cascade_flush(t1, f1, L);
  cascade_flush(t2, f2, L);
  for (int64_t c = 0; c < C; ++c) sum_dy[c] = sum_dy_xmu[c] = Acc(0);
  for (int64_t p = 0; p < L; ++p) {
    sum_dy[p % C] += t1[p];
    sum_dy_xmu[p % C] += t2[p];
  }
  for (int64_t i = flat_end; i < rows * C; ++i) {
    const int64_t c = i % C;
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
  constexpr int W = V::W;
  const int64_t P = L / C;
  const int64_t flat_end = (rows / P) * L;
  for (int64_t base = 0; base < flat_end; base += L) {
    for (int64_t p = 0; p < L; p += W) {
      const int64_t i = base + p;
      const V vm = V::load(mean + p);
      const V xv = V::load(x + i);
      const V d = masked_dy(V::load(dy + i), xv, vm, V::load(a + p), V::load(b + p), r, i, relu);
      if (dr) d.store(dr + i);
      if (dx) V::madd(d, V::load(A + p), V::madd(xv - vm, V::load(Bm + p), V::load(D + p))).store(dx + i);
    }
  }
  for (int64_t i = flat_end; i < rows * C; ++i) {
    const int64_t c = i % C;
    const FwdCoef<Acc> k{mean[c], a[c], b[c]};
    const Acc xv = to_acc(x[i]);
    const Acc d = masked_dy_scalar(to_acc(dy[i]), xv, k, r, i, relu);
    if (dr) dr[i] = from_acc<T>(d);
    if (dx) dx[i] = from_acc<T>(smadd(d, A[c], smadd(xv - k.mean, Bm[c], D[c])));
  }
}
