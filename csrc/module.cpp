// The Python module fastbn._C: loading it registers every op (TORCH_LIBRARY in ops.cpp and
// the per-device TORCH_LIBRARY_IMPLs). It also reports how the library was built.
#include <Python.h>

#include <cstdint>

namespace fastbn {
namespace cpu {
const char* isa_name();
int64_t last_level_cache_bytes();
}
}  // namespace fastbn

PyObject* fastbn_cuda_launch_plan(PyObject* self, PyObject* args);  // plan_binding.cpp

namespace {
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(fastbn::cpu::isa_name()); }

PyObject* cpu_cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(fastbn::cpu::last_level_cache_bytes()));
}

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef FASTBN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels in use: 'avx512bf16', 'avx512', 'avx2' or 'base'."},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS,
     "Last-level cache size in bytes the CPU kernels use: elementwise passes moving more take non-temporal "
     "stores."},
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cuda_launch_plan", fastbn_cuda_launch_plan, METH_VARARGS,
     "cuda_launch_plan(N, C, S, channels_last, dtype, aligned, sm_count, registers=None): the CUDA kernel "
     "launches of a training step (csrc/plan_binding.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastbn native ops (registered under torch.ops.fastbn)", -1,
                          methods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
