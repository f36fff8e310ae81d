"""How the benchmark measures time: timers, input rotation past the cache, the copy bandwidth the
% copy column refers to, the torch.compile'd reference modules, and how much CPU other
processes took during a run.

Contracts:
- time_case(case, mode, modules, reps, min_time_s) -> (times, errors): the median ms per call of
  each module (name -> module) in `mode` on the same inputs, rotated over up to MAX_INPUT_SETS
  input sets when one call's working set is under twice the cache: one rotation shared by every
  call of every module, so each call reads the set read longest ago, never one the calls just
  before it read. A module whose first call raises gets an error message (name -> "Type: first
  line") instead of a time; OutOfMemoryError propagates. On the CPU the modules' calls are
  interleaved, >= reps rounds, more (up to 10 x reps) until min_time_s has passed; in a round
  each module makes an untimed lead-in call and then its timed one, so no timed call follows a
  call of another module (whose aftermath, freed memory the allocator returned to the system
  and dirty cache lines, it would otherwise pay: as in a model whose BatchNorm layers are all
  one library's). On CUDA each module is timed with CUDA events (triton's do_bench when
  importable), >= reps calls after warm-up.
- Tiny cases (Case.tiny) measure the per-call host overhead, on both devices: the same
  interleaved rounds, but each sample is a batch of back-to-back calls meant to last
  >= TINY_SAMPLE_S (the batch size, at most MAX_BATCH, from the median of 5 timed calls after
  warm-up), then on CUDA a torch.cuda.synchronize(), all inside the timed span; the time per call
  is the sample's wall time / batch size (host wall-clock, not CUDA-event GPU time).
- copy_bandwidth_gbps(device) is 2 x bytes / median time of dst.copy_(src) on CUDA_COPY_BYTES
  (GPU) or CPU_COPY_BYTES (CPU), in 1e9 bytes/s.
- compiled_module(case, mode, state_dict) returns torch.compile(TORCH_BN[kind], dynamic=False,
  fullgraph=True), one per (device, kind, shape, dtype, layout, mode) for the process, loaded
  with state_dict and in train mode unless mode is "eval"; compilation happens on its first call.
- others_cpu_share(cpu_seconds(), cpu_seconds()) is the fraction of the machine's CPU time other
  processes used in between (None where /proc/stat is unavailable).
"""
import itertools
import math
import os
import statistics
import time

import torch

import fastbn
from fastbn.testing import TORCH_BN

from .cases import MODE_TENSORS, random_tensor
from .checking import first_line, step

MAX_INPUT_SETS = 16
TINY_SAMPLE_S = 1e-3  # a tiny case's sample: calls back to back for at least this long
MAX_BATCH = 1024
CPU_COPY_BYTES = 64 << 20
CUDA_COPY_BYTES = 256 << 20

_COMPILED = {}  # (device, kind, shape, dtype, layout, mode) -> torch.compile'd torch BatchNorm


def compiled_module(case, mode, state_dict):
    """torch.compile'd torch BatchNorm for (case, mode), cached, loaded with `state_dict`.
    Compilation itself happens on the first call."""
    key = (case.device, case.kind, case.shape, case.dtype, case.layout, mode)
    if key not in _COMPILED:
        module = TORCH_BN[case.kind](case.num_features, device=case.device)
        _COMPILED[key] = torch.compile(module, dynamic=False, fullgraph=True)
    compiled = _COMPILED[key]
    compiled._orig_mod.load_state_dict(state_dict)
    compiled.train(mode != "eval")
    return compiled


def _batch_size(fn, min_sample_s, sync, tries=5):
    """Calls of `fn` a sample needs to last >= min_sample_s, from the median of `tries` timed
    calls (each followed by `sync`), at most MAX_BATCH; 1 when min_sample_s is 0."""
    if min_sample_s <= 0:
        return 1
    typical = statistics.median(_time_batch(fn, 1, sync) for _ in range(tries))
    return max(1, min(MAX_BATCH, math.ceil(min_sample_s / max(typical, 1e-9))))


def _time_batch(fn, batch, sync):
    """Wall seconds of `batch` back-to-back calls of `fn`, then `sync` (when given)."""
    t0 = time.perf_counter()
    for _ in range(batch):
        fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def _median_ms_wall(fns, reps, min_time_s=0.0, warmup=2, min_sample_s=0.0, sync=None):
    """Median wall time in ms per call of each function in `fns` (name -> fn).

    Calls are interleaved (one sample of each function per round) so that a load change on
    the machine hits all of them alike; at least `reps` rounds, more (up to 10 * reps) until
    `min_time_s` has passed. Each sample comes right after an untimed lead-in call of the same
    function, so that it does not pay for what the function before it left behind (memory the
    allocator gave back to the system, which the next allocation faults in again; dirty cache
    lines). A sample is one call when min_sample_s is 0; else a batch of calls meant to last
    >= min_sample_s (see _batch_size), its time divided by the batch size. `sync` (e.g.
    torch.cuda.synchronize) ends each sample, inside the timed span.
    """
    batches = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        batches[name] = _batch_size(fn, min_sample_s, sync)
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < reps or (time.perf_counter() - start < min_time_s and rounds < 10 * reps):
        for name, fn in fns.items():
            _time_batch(fn, 1, sync)  # the lead-in call
            samples[name].append(_time_batch(fn, batches[name], sync) / batches[name])
        rounds += 1
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def _median_ms_cuda(fn, reps):
    """Median GPU time in ms of `fn` over at least `reps` calls after warm-up, with CUDA
    events: triton.testing.do_bench when triton is importable, else a per-call event loop."""
    fn()  # lazy initialisation, compilation
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=max(25, 3 * estimate_ms), rep=max(100, 1.2 * reps * estimate_ms),
                              return_mode="median"))
    for _ in range(min(1000, int(25 / estimate_ms) + 1)):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def cache_bytes(device):
    """Size of the cache input rotation must defeat: the GPU's L2 (50 MB if unknown), or the
    CPU's last-level cache as fastbn's CPU kernels size it (fastbn._C.cpu_cache_bytes: sysfs,
    else sysconf, else 32 MB)."""
    if device == "cuda":
        return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 50 << 20
    return fastbn._C.cpu_cache_bytes()


def time_case(case, mode, modules, reps, min_time_s=0.0):
    """Median time in ms per call of each module (name -> module) in `mode`, on the same inputs.

    When one call's working set is smaller than twice the cache (GPU L2, CPU last level),
    calls rotate over several input sets (up to MAX_INPUT_SETS) whose total exceeds it, so the
    inputs are not cache-resident at the start of a call. The rotation is one cycle shared by
    the calls of every module, in the order they are made: each call reads the set read
    longest ago, never the set of any of the n_sets - 1 calls before it. Tiny cases
    (Case.tiny) get the host wall-clock time per call over batches of calls (see the module
    docstring). Returns (times, errors): a module whose warm-up raises gets no time and an
    error message instead.
    """
    working_set = MODE_TENSORS[mode] * case.numel * case.torch_dtype.itemsize
    n_sets = max(1, min(MAX_INPUT_SETS, math.ceil(2 * cache_bytes(case.device) / working_set)))
    grad = mode == "fwdbwd"
    inputs = [(random_tensor(case, 100 + i, requires_grad=grad), random_tensor(case, 200 + i) if grad else None)
              for i in range(n_sets)]
    sets = itertools.cycle(inputs)
    fns, errors = {}, {}
    for name, module in modules.items():

        def fn(module=module):
            step(module, mode, *next(sets))

        try:
            fn()  # first call: compilation for torch.compile
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - reported in the row, the others still get timed
            errors[name] = f"{type(e).__name__}: {first_line(e)}"
            continue
        fns[name] = fn
    if case.tiny:
        sync = torch.cuda.synchronize if case.device == "cuda" else None
        times = _median_ms_wall(fns, reps, min_time_s, min_sample_s=TINY_SAMPLE_S, sync=sync)
    elif case.device == "cuda":
        times = {name: _median_ms_cuda(fn, reps) for name, fn in fns.items()}
    else:
        times = _median_ms_wall(fns, reps, min_time_s)
    return times, errors


def copy_bandwidth_gbps(device, reps=20):
    """Device-to-device copy bandwidth in GB/s (1e9 bytes): 2 x bytes (read + write) over the
    median time of dst.copy_(src) on a 256 MB (GPU) or 64 MB (CPU) buffer."""
    nbytes = CUDA_COPY_BYTES if device == "cuda" else CPU_COPY_BYTES
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    def fn():
        dst.copy_(src)

    ms = _median_ms_cuda(fn, reps) if device == "cuda" else _median_ms_wall({"copy": fn}, reps)["copy"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def cpu_seconds():
    """(wall time, busy CPU seconds of the whole machine, CPU seconds of this process and its
    children), or None where /proc/stat is not available."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except OSError:
        return None
    t = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def others_cpu_share(start, end):
    """Fraction of the machine's CPU time that other processes used between two cpu_seconds()."""
    if start is None or end is None:
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))
