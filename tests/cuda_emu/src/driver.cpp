// cuda_emu_driver: runs every launcher of csrc/cuda/launch.h under the emulator without
// PyTorch (so ThreadSanitizer, which cannot run inside Python, can watch the kernels).
// Cases: every storage type x planar / channels-last x vector / scalar access, single and
// multi-split reductions, relu + residual. Checks: launch statuses, emulator faults, batch
// statistics and backward sums against a double-precision reference, and every output
// bitwise equal between the forward schedule (2 workers) and the reverse schedule (1 worker).
// Exit status 0 when all pass; ThreadSanitizer reports make it exit non-zero on its own.
//
//   cuda_emu_driver [--quick]      --quick: the multi-split cases only
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bn_math.h"
#include "cuda/launch.h"
#include "cuda_emu.h"

using namespace fastbn;
using namespace fastbn::cuda;

namespace {

int g_failures = 0;

void fail(const std::string& what) {
  std::printf("FAIL %s\n", what.c_str());
  ++g_failures;
}

uint64_t g_rng = 0x1234567ull;
double next_uniform() {
  uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) / 9007199254740992.0;
}

template <class T> std::vector<T> random_values(size_t n, double scale, double offset) {
  std::vector<T> v(n);
  for (auto& e : v) e = from_acc<T>(static_cast<acc_t<T>>((next_uniform() * 2 - 1) * scale + offset));
  return v;
}

template <class T> const char* type_name();
template <> const char* type_name<float>() { return "float"; }
template <> const char* type_name<double>() { return "double"; }
template <> const char* type_name<f16>() { return "f16"; }
template <> const char* type_name<bf16>() { return "bf16"; }

// Everything one run of the launchers produces, as raw bytes (for bitwise comparison).
struct Outputs {
  std::vector<unsigned char> bytes;
  template <class V> void add(const std::vector<V>& v) {
    const auto* p = reinterpret_cast<const unsigned char*>(v.data());
    bytes.insert(bytes.end(), p, p + v.size() * sizeof(V));
  }
};

void check_status(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) fail(what + ": " + cudaGetErrorString(e));
  for (const std::string& f : cuda_emu::take_faults()) fail(what + ": " + f);
}

template <class T> struct Case {
  Geometry g;
  bool vector;  // 16-byte accesses (else the storage is offset by one element)
  std::string name() const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s %s N=%lld C=%lld S=%lld %s", type_name<T>(),
                  g.channels_last ? "channels_last" : "planar", static_cast<long long>(g.N),
                  static_cast<long long>(g.C), static_cast<long long>(g.S), vector ? "vector" : "scalar");
    return buf;
  }
  size_t index(int64_t n, int64_t c, int64_t s) const {
    return static_cast<size_t>(g.channels_last ? (n * g.S + s) * g.C + c : (n * g.C + c) * g.S + s);
  }
};

template <class T> Outputs run_launchers(const Case<T>& cs, const std::vector<T>& x_in, const std::vector<T>& dy_in,
                                         const std::vector<T>& r_in) {
  using Acc = acc_t<T>;
  const Geometry& g = cs.g;
  const size_t n = static_cast<size_t>(g.numel()), C = static_cast<size_t>(g.C);
  const size_t off = cs.vector ? 0 : 1;
  // Element-offset copies when the case asks for scalar (misaligned) access.
  std::vector<T> xb(n + 1), dyb(n + 1), rb(n + 1), yb(n + 1), dxb(n + 1), drb(n + 1), dxe(n + 1);
  std::copy(x_in.begin(), x_in.end(), xb.begin() + off);
  std::copy(dy_in.begin(), dy_in.end(), dyb.begin() + off);
  std::copy(r_in.begin(), r_in.end(), rb.begin() + off);
  const T *x = xb.data() + off, *dy = dyb.data() + off, *r = rb.data() + off;
  std::vector<Acc> w(C), b(C), mean(C), var(C), invstd(C), sdy(C), sdxh(C), rm(C), rv(C);
  for (size_t c = 0; c < C; ++c) {
    w[c] = static_cast<Acc>(0.5 + next_uniform());
    b[c] = static_cast<Acc>(next_uniform() - 0.5);
    rm[c] = static_cast<Acc>(next_uniform());
    rv[c] = static_cast<Acc>(0.5 + next_uniform());
  }
  int sm = 0;
  cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, 0);
  const LaunchEnv env{nullptr, sm};
  std::vector<unsigned char> ws(reduce_workspace_bytes(g, sizeof(T), sm), 0xFF);
  const std::string nm = cs.name();
  // Running statistics updated by the statistics' finalize, with the cumulative factor read
  // from "device" memory (num_batches_tracked = 4).
  std::vector<Acc> rm2 = rm, rv2 = rv;
  const int64_t batches = 4;
  check_status(launch_stats<T>(g, x, mean.data(), var.data(), invstd.data(), 1e-5,
                               RunningStats<Acc>{rm2.data(), rv2.data(), &batches, 0.0}, ws.data(), env),
               nm + " stats");
  const ChannelStats<Acc> st{mean.data(), invstd.data(), false, Acc(0)};
  const Affine<Acc> af{w.data(), b.data()};
  check_status(launch_normalize<T>(g, x, yb.data() + off, st, af, r, true, env), nm + " normalize");
  std::fill(ws.begin(), ws.end(), 0xFF);
  check_status(launch_grad_reduce<T>(g, dy, x, st, af, r, true, sdy.data(), sdxh.data(), ws.data(), env),
               nm + " grad_reduce");
  const int64_t count = g.count();  // read from "device" memory, as SyncBatchNorm's backward does
  check_status(launch_grad_input<T>(g, dy, x, st, af, r, true, true, sdy.data(), sdxh.data(), 0, &count,
                                    dxb.data() + off, drb.data() + off, env),
               nm + " grad_input (training)");
  const ChannelStats<Acc> run{rm.data(), rv.data(), true, Acc(1e-5)};
  check_status(launch_grad_input<T>(g, dy, x, run, af, nullptr, false, false, nullptr, nullptr, g.count(), nullptr,
                                    dxe.data() + off, nullptr, env),
               nm + " grad_input (eval)");
  const int64_t counts[3] = {g.count(), 7, g.count() / 2 + 1};
  std::vector<Acc> means(3 * C), vars(3 * C), mm(C), mi(C), mv(C);
  for (size_t k = 0; k < 3; ++k)
    for (size_t c = 0; c < C; ++c) {
      means[k * C + c] = k == 0 ? mean[c] : static_cast<Acc>(next_uniform());
      vars[k * C + c] = k == 0 ? var[c] : static_cast<Acc>(next_uniform());
    }
  std::vector<Acc> rm3 = rm, rv3 = rv;
  int64_t total = -1;
  check_status(launch_merge_stats<Acc>(counts, means.data(), vars.data(), 3, static_cast<int64_t>(C), 1e-5, mm.data(),
                                       mi.data(), mv.data(), &total,
                                       RunningStats<Acc>{rm3.data(), rv3.data(), nullptr, 0.1}, env),
               nm + " merge_stats");
  if (total != counts[0] + counts[1] + counts[2]) fail(nm + " merge_stats total count");

  // Reference statistics and sums in double.
  for (size_t c = 0; c < C; ++c) {
    double s = 0, s2 = 0, gs = 0, gs2 = 0;
    const double m_cnt = static_cast<double>(g.count());
    for (int64_t i = 0; i < g.N; ++i)
      for (int64_t p = 0; p < g.S; ++p) s += to_acc(x_in[cs.index(i, static_cast<int64_t>(c), p)]);
    const double mu = s / m_cnt;
    for (int64_t i = 0; i < g.N; ++i)
      for (int64_t p = 0; p < g.S; ++p) {
        const size_t k = cs.index(i, static_cast<int64_t>(c), p);
        const double xv = to_acc(x_in[k]);
        s2 += (xv - mu) * (xv - mu);
        const double pre = (static_cast<double>(to_acc(x_in[k])) - mean[c]) * invstd[c] * w[c] + b[c] + to_acc(r_in[k]);
        const double d = pre > 0 ? static_cast<double>(to_acc(dy_in[k])) : 0.0;
        gs += d;
        gs2 += d * (xv - mean[c]);
      }
    const double tol = sizeof(Acc) == 8 ? 1e-9 : 1e-4;
    if (std::fabs(mean[c] - mu) > tol * (1 + std::fabs(mu))) fail(nm + " mean of channel " + std::to_string(c));
    if (std::fabs(var[c] - s2 / m_cnt) > tol * (1 + s2 / m_cnt)) fail(nm + " var of channel " + std::to_string(c));
    const double f = 1.0 / static_cast<double>(batches);
    const double erm = (1 - f) * rm[c] + f * mean[c], erv = (1 - f) * rv[c] + f * var[c] * m_cnt / (m_cnt - 1);
    if (std::fabs(rm2[c] - erm) > tol * (1 + std::fabs(erm)) || std::fabs(rv2[c] - erv) > tol * (1 + erv))
      fail(nm + " running statistics of channel " + std::to_string(c));
    if (std::fabs(sdy[c] - gs) > tol * (10 + std::sqrt(m_cnt) * std::fabs(gs) / 10))
      fail(nm + " sum_dy of channel " + std::to_string(c));
    if (std::fabs(sdxh[c] - gs2 * invstd[c]) > tol * (10 + std::sqrt(m_cnt) * std::fabs(gs2 * invstd[c]) / 10))
      fail(nm + " sum_dy_xhat of channel " + std::to_string(c));
  }
  Outputs o;
  o.add(mean), o.add(var), o.add(invstd), o.add(yb), o.add(sdy), o.add(sdxh), o.add(dxb), o.add(drb), o.add(dxe);
  o.add(rm2), o.add(rv2), o.add(rm3), o.add(rv3), o.add(mm), o.add(mi), o.add(mv);
  return o;
}

template <class T> void run_case(const Case<T>& cs) {
  const size_t n = static_cast<size_t>(cs.g.numel());
  const auto x = random_values<T>(n, 2.0, 0.5), dy = random_values<T>(n, 1.0, 0.0), r = random_values<T>(n, 1.0, 0.0);
  const uint64_t rng = g_rng;
  cuda_emu::Config c;
  c.workers = 2;
  c.schedule = cuda_emu::Schedule::forward;
  cuda_emu::configure(c);
  const Outputs a = run_launchers(cs, x, dy, r);
  g_rng = rng;
  c.workers = 1;
  c.schedule = cuda_emu::Schedule::reverse;
  cuda_emu::configure(c);
  const Outputs b = run_launchers(cs, x, dy, r);
  if (a.bytes != b.bytes) fail(cs.name() + ": results differ between the forward and the reverse schedule");
}

template <class T> void run_type(bool quick) {
  constexpr int V = 16 / sizeof(T);
  std::vector<Case<T>> cases;
  // planar: vector (S % V == 0) and scalar; 8 x 2 x 2304 values per channel: 5 splits on 132 SMs.
  cases.push_back({Geometry{8, 2, 2304, false}, true});
  cases.push_back({Geometry{8, 2, 2304, false}, false});
  // channels-last: C % V == 0 (vector) and odd C; 4608 rows: several row splits.
  cases.push_back({Geometry{4608, 2 * V, 1, true}, true});
  cases.push_back({Geometry{2304, 3, 2, true}, false});
  // planar 7x7 planes, C = 8: the grouped reductions (several splits).
  cases.push_back({Geometry{160, 8, 49, false}, true});
  if (!quick) {
    cases.push_back({Geometry{3, 5, 49, false}, false});
    cases.push_back({Geometry{4, 3, 8 * V, false}, true});
    cases.push_back({Geometry{37, V, 3, true}, true});
  }
  for (const auto& cs : cases) run_case(cs);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  run_type<float>(quick);
  run_type<double>(quick);
  run_type<f16>(quick);
  run_type<bf16>(quick);
  long launches = 0;
  for (const auto& kv : cuda_emu::launch_counts()) launches += kv.second;
  std::printf("cuda_emu_driver: %ld launches of %zu kernel instantiations, %d failure(s)\n", launches,
              cuda_emu::launch_counts().size(), g_failures);
  return g_failures ? 1 : 0;
}
