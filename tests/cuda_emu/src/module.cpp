// Python module fastbn_cuda_emu: fastbn's CUDA backend (csrc/cuda/cuda_backend.h, the real
// binding code) over the emulated CUDA kernels, on CPU tensors. Every op has the signature of
// torch.ops.fastbn.<op>, so the tests call both and compare. Plus the emulator's controls.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "cuda/cuda_backend.h"
#include "cuda_emu.h"

namespace {

using Backend = fastbn::cuda::CudaBackend;

cuda_emu::Schedule parse_schedule(const std::string& s) {
  if (s == "forward") return cuda_emu::Schedule::forward;
  if (s == "reverse") return cuda_emu::Schedule::reverse;
  if (s == "random") return cuda_emu::Schedule::random;
  throw std::invalid_argument("schedule must be 'forward', 'reverse' or 'random', got '" + s + "'");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbn's CUDA kernels and CUDA backend, run on CPU tensors by the cuda_emu emulator";
  m.def("forward_train", &fastbn::forward_train<Backend>);
  m.def("forward_eval", &fastbn::forward_eval<Backend>);
  m.def("backward_train", &fastbn::backward_train<Backend>);
  m.def("backward_eval", &fastbn::backward_eval<Backend>);
  m.def("batch_stats", &fastbn::batch_stats<Backend>);
  m.def("merge_stats", &fastbn::merge_stats<Backend>);
  m.def("normalize", &fastbn::normalize<Backend>);
  m.def("backward_reduce", &fastbn::backward_reduce<Backend>);
  m.def("backward_elemt", &fastbn::backward_elemt<Backend>);

  m.def(
      "configure",
      [](int sm_count, int workers, const std::string& schedule, uint64_t seed) {
        cuda_emu::Config c;
        c.multiprocessor_count = sm_count;
        c.workers = workers;
        c.schedule = parse_schedule(schedule);
        c.seed = seed;
        cuda_emu::configure(c);
      },
      "Sets the emulated device's SM count, the worker threads, the thread/block schedule and its seed.",
      pybind11::arg("sm_count") = 132, pybind11::arg("workers") = 1, pybind11::arg("schedule") = "forward",
      pybind11::arg("seed") = 0);
  m.def("take_faults", &cuda_emu::take_faults, "Faults reported since the last call (clears them).");
  m.def("launch_counts", &cuda_emu::launch_counts, "Launches per kernel instantiation since the last reset.");
  m.def("reset_launch_counts", &cuda_emu::reset_launch_counts);
}
