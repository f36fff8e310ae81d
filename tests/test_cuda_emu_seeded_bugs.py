"""The emulator and its sanitizer builds can fail.

First the emulator's own tests (tests/cuda_emu/src/selftest.cu): CUDA's warp-operation,
atomic and conversion semantics, and every fault the emulator must report; shared-memory
overflows reported by AddressSanitizer; a missing barrier reported by ThreadSanitizer, which
stays silent on correct barriers, __syncwarp and atomics.

Then copies of csrc/ with one seeded bug each, which must be rejected by every checker listed
for that bug.

Checkers:
  plain  the emulated kernel-path tests (values against the CPU, bitwise agreement of the
         forward / reverse / random schedules, emulator faults), on the selected paths;
  asan   the same tests on the AddressSanitizer + UBSan build;
  tsan   the torch-free driver on the ThreadSanitizer build.
Each bug is a textual edit that must apply exactly once (so the list fails loudly when the
kernels change under it), and each checker must fail with output matching its pattern.
"""
import dataclasses
import os
import re
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emu"))
import emu_build  # noqa: E402
import emu_harness  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VALUES = r"Mismatched elements|differs bitwise"


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    path: str  # relative to csrc/
    old: str
    new: str
    checkers: tuple  # ((checker, pytest -k selection or None, pattern its failure must show), ...)


BUGS = [
    Bug("barrier removed from the channels-last statistics merge loop", "cuda/stats.cu",
        "      }\n    }\n    __syncthreads();\n    if (ty < stride && tx == 0) sm_n[ty] = sm_n[ty] + sm_n[ty + stride];",
        "      }\n    }\n    if (ty < stride && tx == 0) sm_n[ty] = sm_n[ty] + sm_n[ty + stride];",
        (("plain", "float32-channels_last-vector", VALUES), ("tsan", None, r"ThreadSanitizer: data race"))),
    Bug("barrier removed between the warp partials' store and the block merge", "cuda/common.cuh",
        "  if (lane == 0) shared[warp] = s;\n  __syncthreads();",
        "  if (lane == 0) shared[warp] = s;",
        (("plain", "float32-planar-vector", VALUES), ("tsan", None, r"ThreadSanitizer: data race"))),
    Bug("shuffle under a divergent branch (half the warp skips it)", "cuda/common.cuh",
        "  const int lane = flat_tid() % 32, warp = flat_tid() / 32;\n#pragma unroll\n"
        "  for (int off = 16; off > 0; off >>= 1) s = chan_merge(s, shfl_down(s, off));",
        "  const int lane = flat_tid() % 32, warp = flat_tid() / 32;\n#pragma unroll\n"
        "  for (int off = 16; off > 0; off >>= 1)\n    if (lane < 16) s = chan_merge(s, shfl_down(s, off));",
        (("plain", "float32-planar-vector", r"divergent warp: lanes 0-15 wait at __shfl_down_sync .* but lane 16 went to __syncthreads"),)),
    Bug("bounds guard removed from the channels-last normalisation", "cuda/normalize.cu",
        "  if (c0 >= C) return;\n", "",
        (("asan", "float32-channels_last-scalar", r"AddressSanitizer: heap-buffer-overflow"),)),
    Bug("off-by-one bound: the last vector of a planar reduction skipped", "cuda/common.cuh",
        "else if (j0 + static_cast<int64_t>(k) * kThreads < vecs) part(o);",
        "else if (j0 + static_cast<int64_t>(k) * kThreads + 1 < vecs) part(o);",
        (("plain", "float32-planar-vector", VALUES),)),
    Bug("a split dropped from the finalize merges", "cuda/common.cuh",
        "        if (k0 + static_cast<int64_t>(lanes) * j < splits) use(j);",
        "        if (k0 + static_cast<int64_t>(lanes) * j + 1 < splits) use(j);",
        (("plain", "float32-planar-vector", VALUES),)),
    Bug("the finalize tree stops a level short (lane 1's partials lost)", "cuda/common.cuh",
        "  for (int off = fl.lanes < 32 ? fl.lanes / 2 : 16; off > 0; off /= 2) {",
        "  for (int off = fl.lanes < 32 ? fl.lanes / 2 : 16; off > 1; off /= 2) {",
        (("plain", "float32-channels_last-vector", VALUES),)),
    Bug("the backward-sum finalize adds sum dy into sum dy * xhat", "cuda/grad.cu",
        "          s.b += static_cast<double>(pb[j]);",
        "          s.b += static_cast<double>(pa[j]);",
        (("plain", "float32-channels_last-vector", VALUES),)),
    Bug("16-byte vector loads of a misaligned input (alignment check dropped)", "cuda/normalize.cu",
        "pointer_alignment({x, y, r})",
        "pointer_alignment({y, r})",
        (("asan", "float32-planar-misaligned", r"runtime error: (load|reference binding|member access).*misaligned"),)),
    Bug("the grouped reduction merges a vector's first channel's state into the next channel", "cuda/common.cuh",
        "        s = merge_fn(s, qq * V >= g * S ? shared[tt] : shared[kThreads + tt]);",
        "        s = merge_fn(s, shared[tt]);",
        (("plain", "float32-planar-grouped", VALUES),)),
    Bug("the cumulative running-statistics factor takes num_batches_tracked before its increment", "bn_math.h",
        "1.0 / static_cast<double>(*r.batches)", "1.0 / static_cast<double>(*r.batches + 1)",
        (("plain", "float32-planar-vector", VALUES),)),
    Bug("the merge's guard for non-finite means dropped (an inf turns the mean into NaN)", "bn_math.h",
        "  mean = where_finite(delta, near, weighted);",
        "  mean = near;",
        (("plain", "nonfinite and float32", r"(NaN|inf) pattern differs"),)),
]

emu_harness.REPORT["seeded_total"] = len(BUGS)


def _seed(bug, root):
    src = os.path.join(root, "csrc")
    shutil.copytree(emu_build.CSRC, src)
    path = os.path.join(src, bug.path)
    with open(path) as f:
        text = f.read()
    assert text.count(bug.old) == 1, f"the seeded bug '{bug.name}' no longer applies to csrc/{bug.path}: update it"
    with open(path, "w") as f:
        f.write(text.replace(bug.old, bug.new))
    return src


def _run_checker(checker, selection, src, tag):
    if checker == "tsan":
        exe = emu_build.build_driver("tsan", src_root=src, tag=tag)
        return _run([exe, "--quick"], "tsan")
    env = emu_build.sanitizer_env(checker)
    env.update(FASTBN_EMU_FLAVOUR=checker, FASTBN_EMU_SRC=src, FASTBN_EMU_TAG=tag,
               FASTBN_EMU_SCHEDULES="3" if checker == "plain" else "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider",
           os.path.join(HERE, "test_cuda_emu.py"), "-k", selection]
    return _run(cmd, checker, env=env, cwd=HERE)


def _run(cmd, flavour, **kwargs):
    r = emu_build.run(cmd, flavour, timeout=600, **kwargs)
    return r.returncode, r.stdout + r.stderr


def test_emulator_selftest():
    rc, out = _run([emu_build.build_selftest("plain")], "plain")
    assert rc == 0, out
    assert out.count("PASS ") >= 25, out


@pytest.mark.parametrize("mode", ["--shared-overflow", "--dynamic-overflow"])
def test_asan_sees_shared_memory_overflow(mode):
    rc, out = _run([emu_build.build_selftest("asan"), mode], "asan")
    assert rc != 0 and "AddressSanitizer: heap-buffer-overflow" in out and "not detected" not in out, out


def test_tsan_sees_a_missing_barrier_and_only_that():
    exe = emu_build.build_selftest("tsan")
    rc, out = _run([exe, "--clean"], "tsan")
    assert rc == 0 and "ThreadSanitizer" not in out, out
    rc, out = _run([exe, "--race"], "tsan")
    assert rc != 0 and re.search(r"ThreadSanitizer: data race .*selftest.cu:\d+ in racy_sum_kernel", out), out


@pytest.mark.slow  # a module build a bug: about 5 minutes in all on 2 cores
@pytest.mark.parametrize("bug", BUGS, ids=[b.name.split(" (")[0].replace(" ", "_")[:60] for b in BUGS])
def test_seeded_bug_is_caught(bug, tmp_path):
    src = _seed(bug, str(tmp_path))
    tag = "seeded-" + re.sub(r"\W+", "_", bug.name)[:40]
    try:
        for checker, selection, pattern in bug.checkers:
            rc, out = _run_checker(checker, selection, src, tag)
            assert rc != 0, f"{checker} did not catch '{bug.name}':\n{out[-5000:]}"
            assert re.search(pattern, out), f"{checker} failed on '{bug.name}' but not as expected ({pattern}):\n{out[-8000:]}"
        caught = emu_harness.REPORT.setdefault("seeded", [])
        caught.append(f"{bug.name} [{', '.join(c for c, _, _ in bug.checkers)}]")
    finally:
        shutil.rmtree(os.path.join(emu_build.BUILD, f"plain-{tag}"), ignore_errors=True)
        shutil.rmtree(os.path.join(emu_build.BUILD, f"asan-{tag}"), ignore_errors=True)
        shutil.rmtree(os.path.join(emu_build.BUILD, f"tsan-{tag}"), ignore_errors=True)
