// fastbn._C.cuda_launch_plan: the CUDA launch plans of a training step (cuda/plan.h, the
// functions the launchers call), described on any machine, GPU or not.
//
//   cuda_launch_plan(N, C, S, channels_last, dtype, aligned, sm_count, registers) -> list of dict
//
// dtype: "float", "double", "f16" or "bf16" (the kernels' storage type names); aligned: every
// tensor 16-byte aligned; registers: {kernel name: registers a thread} for the reduction
// kernels' occupancy (plan.h blocks_per_sm), as scripts/ptxas_report.py names them
// ("stats_cl_kernel<f16, 8>"); a kernel missing from it counts as kMaxResident blocks an SM
// (the most partials a split can have). One dict per kernel launch, in launch order:
//   pass ("forward" / "backward"), kernel, grid (x, y), block (x, y), smem, blocks,
//   resident (blocks an SM holds; 0 where registers are unknown), waves, splits (reductions),
//   vec_bytes (bytes a thread loads at once), per_thread (values a thread loads, at most),
//   chain (longest serial chain of merges of partial states a thread performs),
//   bytes_read, bytes_written.
#include <Python.h>

#include <string>
#include <vector>

#include "cuda/plan.h"

namespace fastbn {
namespace cuda {
namespace {

struct Launch {
  const char* pass;
  std::string kernel;
  unsigned gx, gy;
  int bx, by;
  size_t smem;
  int resident;
  int64_t splits, vec_bytes, per_thread, chain, bytes_read, bytes_written;
};

std::string tmpl(const std::string& name, const std::string& a, int v = -1) {
  return name + "<" + a + (v >= 0 ? ", " + std::to_string(v) : "") + ">";
}

PyObject* describe(const Launch& l, int sm_count) {
  const int64_t blocks = static_cast<int64_t>(l.gx) * l.gy;
  const double waves = l.resident > 0 ? static_cast<double>(blocks) / (static_cast<double>(l.resident) * sm_count) : 0.0;
  return Py_BuildValue("{s:s,s:s,s:(II),s:(ii),s:n,s:L,s:i,s:d,s:L,s:L,s:L,s:L,s:L,s:L}", "pass", l.pass, "kernel",
                       l.kernel.c_str(), "grid", l.gx, l.gy, "block", l.bx, l.by, "smem",
                       static_cast<Py_ssize_t>(l.smem), "blocks", static_cast<long long>(blocks), "resident",
                       l.resident, "waves", waves, "splits", static_cast<long long>(l.splits), "vec_bytes",
                       static_cast<long long>(l.vec_bytes), "per_thread", static_cast<long long>(l.per_thread),
                       "chain", static_cast<long long>(l.chain), "bytes_read", static_cast<long long>(l.bytes_read),
                       "bytes_written", static_cast<long long>(l.bytes_written));
}

// Blocks an SM holds of `kernel` with `smem` bytes of shared memory, from `registers`; 0 if unknown.
int resident_of(PyObject* registers, const std::string& kernel, size_t smem) {
  PyObject* r = registers ? PyDict_GetItemString(registers, kernel.c_str()) : nullptr;
  if (r == nullptr || !PyLong_Check(r)) return 0;
  return blocks_per_sm(static_cast<int>(PyLong_AsLong(r)), kThreads, smem);
}

PyObject* launch_plan(PyObject*, PyObject* args) {
  long long N, C, S;
  int channels_last, aligned, sm_count;
  const char* dtype;
  PyObject* registers = nullptr;
  if (!PyArg_ParseTuple(args, "LLLpspi|O", &N, &C, &S, &channels_last, &dtype, &aligned, &sm_count, &registers))
    return nullptr;
  const std::string t = dtype;
  int elem;
  if (t == "float") elem = 4;
  else if (t == "double") elem = 8;
  else if (t == "f16" || t == "bf16") elem = 2;
  else {
    PyErr_SetString(PyExc_ValueError, "cuda_launch_plan: dtype must be float, double, f16 or bf16");
    return nullptr;
  }
  if (N < 1 || C < 1 || S < 1 || sm_count < 1) {
    PyErr_SetString(PyExc_ValueError, "cuda_launch_plan: N, C, S and sm_count must be positive");
    return nullptr;
  }
  if (registers != nullptr && registers != Py_None && !PyDict_Check(registers)) {
    PyErr_SetString(PyExc_TypeError, "cuda_launch_plan: registers must be a dict");
    return nullptr;
  }
  if (registers == Py_None) registers = nullptr;
  Geometry g;
  g.N = N;
  g.C = C;
  g.S = S;
  g.channels_last = channels_last != 0;
  const std::string acc = elem == 8 ? "double" : "float";
  const int acc_size = elem == 8 ? 8 : 4;
  const int align = aligned ? 16 : elem;
  const int64_t numel = g.numel();
  std::vector<Launch> out;

  // A reduction (statistics or backward sums): its partial kernel and its finalize.
  const auto reduction = [&](const char* pass, const std::string& partial, const std::string& finalize,
                             int tensors, int64_t partial_bytes) {
    const ReduceShape sh = reduce_shape(g, elem, align);
    const bool cl = sh.walk == Walk::channels_last, grouped = sh.walk == Walk::grouped;
    const std::string name = grouped ? tmpl(partial + "_grouped_kernel", t)
                                     : tmpl(partial + (cl ? "_cl_kernel" : "_planar_kernel"), t, sh.vec);
    const auto smem_of = [&](int bx, int by) -> size_t {  // the launchers' dynamic shared memory
      return cl ? cl_reduce_smem(bx, by, sh.vec, acc_size, partial == "stats") : 0;
    };
    const int known = resident_of(registers, name, smem_of(1, kThreads));
    const ReducePlan p = reduce_plan(g, sh, sm_count, known > 0 ? known : kMaxResident);
    Launch l{pass, name, p.grid_x, p.grid_y, p.block_x, p.block_y, smem_of(p.block_x, p.block_y)};
    l.resident = resident_of(registers, name, l.smem);
    l.splits = p.splits;
    l.vec_bytes = static_cast<int64_t>(sh.vec) * elem;
    if (cl) {
      const int64_t rows = ceil_div(g.rows(), p.splits * p.block_y);
      l.per_thread = rows * sh.vec;
      l.chain = log2_pow2(p.block_y);  // the block's tree over its rows of threads
    } else if (grouped) {
      const int64_t q = group_vectors(sh, S), rows_at_once = kThreads / q;
      l.per_thread = ceil_div(g.N, rows_at_once * p.splits) * sh.vec;
      // GroupedWalk::merge: a lane's share of a channel's states (at most S / vec + 2 vectors
      // a row), then 5 shuffle levels.
      l.chain = ceil_div((S / sh.vec + 2) * rows_at_once, 32) + 5;
    } else {
      l.per_thread = ceil_div(ceil_div(g.count(), p.splits), kThreads);
      l.chain = 10;  // block_merge / block_sum2: two 5-level shuffle trees
    }
    l.bytes_read = numel * elem * tensors;
    l.bytes_written = p.splits * C * partial_bytes + (partial == "stats" ? C * 8 : 0);
    out.push_back(l);
    const FinalizePlan f = finalize_plan(C, p.splits);
    Launch fl{pass, tmpl(finalize + "_finalize_kernel", acc), f.blocks, 1, kThreads, 1,
              static_cast<size_t>(kThreads) * (partial == "stats" ? 24 : 16)};  // the tree's states
    fl.resident = resident_of(registers, fl.kernel, fl.smem);
    fl.splits = p.splits;
    fl.vec_bytes = 8;
    fl.per_thread = f.per_lane;
    fl.chain = f.chain;
    fl.bytes_read = p.splits * C * partial_bytes;
    fl.bytes_written = C * acc_size * (partial == "stats" ? 3 : 2);
    out.push_back(fl);
  };
  const auto elementwise = [&](const char* pass, const std::string& kernel, int reads, int writes) {
    const ElemPlan p = elementwise_plan(g, elem, align, sm_count);
    const char* walk = p.walk == Walk::channels_last ? "_cl_kernel" : p.walk == Walk::flat ? "_flat_kernel" : "_planar_kernel";
    Launch l{pass, tmpl(kernel + walk, t, p.vec), p.grid_x, p.grid_y, p.block_x, p.block_y, 0};
    l.resident = resident_of(registers, l.kernel, 0);
    l.splits = 0;
    l.vec_bytes = static_cast<int64_t>(p.vec) * elem;
    l.per_thread = ceil_div(numel, static_cast<int64_t>(p.grid_x) * p.grid_y * kThreads);
    l.chain = 0;
    l.bytes_read = numel * elem * reads;
    l.bytes_written = numel * elem * writes;
    out.push_back(l);
  };
  reduction("forward", "stats", "stats", 1, 8 + 2 * 8);
  elementwise("forward", "normalize", 1, 1);
  reduction("backward", "grad_reduce", "grad", 2, 2 * acc_size);
  elementwise("backward", "grad_input", 2, 1);

  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  for (const Launch& l : out) {
    PyObject* d = describe(l, sm_count);
    if (d == nullptr || PyList_Append(list, d) != 0) {
      Py_XDECREF(d);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(d);
  }
  return list;
}

}  // namespace
}  // namespace cuda
}  // namespace fastbn

PyObject* fastbn_cuda_launch_plan(PyObject* self, PyObject* args) { return fastbn::cuda::launch_plan(self, args); }
