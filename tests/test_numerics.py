"""Numerical quality: large offsets (no E[x^2] - E[x]^2), determinism (bitwise across runs
and CPU thread counts), each vector build of the CPU kernels against the baseline, and the
non-temporal stores against plain ones."""
import glob
import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from helpers import DEVICES, make_input

import fastbn
import fastbn.functional as FF


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", [((64, 8, 12, 12), "contiguous"), ((64, 8, 12, 12), "channels_last"),
                                          ((5000, 16), "contiguous"), ((3, 2, 300, 300), "contiguous")])
def test_large_offset_float32(device, shape, layout):
    """x = 1e4 + N(0, 1) in float32 matches a float64 reference to 1e-3 relative."""
    x = (1e4 + torch.randn(shape, device=device, dtype=torch.float64)).float()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    rm64, rv64 = rm.double(), rv.double()
    xo = x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    y = FF.batch_norm(xo, rm, rv, training=True, momentum=1.0)
    y64 = torch.nn.functional.batch_norm(x64, rm64, rv64, training=True, momentum=1.0)
    assert _rel(y, y64) < 1e-3
    assert _rel(rv, rv64) < 1e-3
    assert _rel(rm, rm64) < 1e-6
    g = torch.randn_like(y64)
    y.backward(g.float())
    y64.backward(g)
    assert _rel(xo.grad, x64.grad) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic(device, layout):
    m = fastbn.BatchNorm2d(16, device=device)
    x = make_input((8, 16, 20, 20), torch.float32, device, layout)
    g = torch.randn_like(x)
    results = []
    for _ in range(3):
        xi = x.clone().requires_grad_()
        m.weight.grad = m.bias.grad = None
        y = m(xi)
        y.backward(g)
        results.append((y, xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape,layout", [((8, 3, 40, 40), "contiguous"), ((8, 64, 9, 9), "contiguous"),
                                          ((8, 6, 20, 20), "channels_last"), ((300, 24), "contiguous"),
                                          ((4, 600, 5, 5), "channels_last"), ((40, 1040), "contiguous")])
def test_same_bits_any_thread_count(shape, layout):
    """Partial results are merged in a fixed order: 1 thread and all threads agree exactly."""
    x = make_input(shape, torch.float32, "cpu", layout)
    g = torch.randn_like(x)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])

    def run():
        xi = x.clone().requires_grad_()
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = FF.batch_norm(xi, None, None, wi, bi, training=True)
        y.backward(g)
        return y, xi.grad, wi.grad, bi.grad

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(n)
    many = run()
    for a, b_ in zip(one, many):
        assert torch.equal(a, b_)


_ISA_SCRIPT = r"""
import torch, fastbn, fastbn.functional as FF
from fastbn.testing import acc_dtype
torch.manual_seed(7)
out = {"isa": fastbn.cpu_isa()}
# (3, 520, 3, 3) channels-last: 520 channels make strips for 8 lanes, not for 16.
for shape in ((4, 12, 9, 11), (3, 520, 3, 3)):
  for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for cl in (False, True):
        x = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).to(dt)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        r = torch.randn_like(x)
        y = FF.batch_norm(x, None, None, torch.rand(shape[1], dtype=acc_dtype(dt)) + .5,
                          None, training=True, activation="relu", residual=r)
        y.backward(torch.randn_like(y))
        out[(shape, str(dt), cl)] = (y.detach(), x.grad)
torch.save(out, __import__("sys").argv[1])
"""


def _cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _isa_expected(isa):
    """The kernels FASTBN_CPU_ISA=isa must select on this CPU (the best it has, capped)."""
    flags = _cpu_flags()
    best = "base"
    if {"avx2", "fma", "f16c"} <= flags:
        best = "avx512" if {"avx512f", "avx512bw", "avx512vl"} <= flags else "avx2"
        if best == "avx512" and {"avx512dq", "avx512_bf16"} <= flags:
            best = "avx512bf16"
    order = ["base", "avx2", "avx512", "avx512bf16"]
    return order[min(order.index(isa), order.index(best))]


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512bf16"])
def test_isa_matches_baseline(tmp_path, isa):
    """Each vector build (FASTBN_CPU_ISA caps the choice) gives the baseline (any x86-64)
    kernels' results, to rounding; skipped where this CPU lacks the instruction set."""
    if _isa_expected(isa) != isa:
        pytest.skip(f"this CPU has no {isa}")
    results = {}
    for name in ("base", isa):
        path = tmp_path / f"{name}.pt"
        env = dict(os.environ, FASTBN_CPU_ISA=name)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env, timeout=300)
        results[name] = torch.load(path)
    assert results["base"]["isa"] == "base"
    assert results[isa]["isa"] == isa
    for key, val in results["base"].items():
        if key == "isa":
            continue
        y, gx = val
        dt = y.dtype
        t = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dt]
        y2, gx2 = results[isa][key]
        torch.testing.assert_close(y2, y, rtol=t, atol=t)
        torch.testing.assert_close(gx2, gx, rtol=t, atol=t * 10)


def test_isa_choice_follows_cpu_and_cap():
    """fastbn.cpu_isa() is the best instruction set the CPU has, capped by FASTBN_CPU_ISA."""
    for cap in ("base", "avx2", "avx512", "avx512bf16"):
        out = subprocess.run([sys.executable, "-c", "import fastbn; print(fastbn.cpu_isa())"], check=True,
                             env=dict(os.environ, FASTBN_CPU_ISA=cap), capture_output=True, text=True, timeout=300)
        assert out.stdout.strip() == _isa_expected(cap)


_BF16_SCRIPT = r"""
import sys, torch, fastbn, fastbn.functional as FF
torch.manual_seed(11)
out = {"isa": fastbn.cpu_isa()}
nan = float("nan")
for shape in ((4, 32, 9, 9), (2, 48, 20, 20), (64, 96)):
    for cl in (False, True) if len(shape) == 4 else (False,):
        C = shape[1]
        fmt = torch.channels_last if cl else torch.contiguous_format
        x0 = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).bfloat16()
        x = x0.clone()
        x.view(-1)[::97] = nan
        x.view(torch.int16).view(-1)[5::97] = -64  # 0xFFC0: a NaN with the sign bit set
        x.view(torch.int16).view(-1)[9::97] = 0x7F81  # a signalling NaN with a payload
        x = x.contiguous(memory_format=fmt)
        r = torch.randn_like(x)
        # Weights of 1e-39 (a float denormal) in every third channel: outputs there are float
        # denormals, which the hardware rounding would flush to zero.
        w = torch.rand(C) + .5
        w[::3] = 1e-39
        b = torch.randn(C)
        b[::3] = 0
        rm, rv = torch.randn(C), torch.rand(C) + .5
        key = (shape, cl)
        out[key + ("eval",)] = FF.batch_norm(x, rm, rv, w, b, training=False)
        out[key + ("eval relu",)] = FF.batch_norm(x, rm, rv, w, b, training=False, activation="relu", residual=r)
        # Training: a NaN input or gradient makes its whole channel NaN; one of each.
        xt = x0.clone()
        xt.view(torch.int16).view(-1)[5] = -64
        xt = xt.contiguous(memory_format=fmt).requires_grad_()
        y = FF.batch_norm(xt, None, None, w, b, training=True)
        g = torch.randn(*shape).bfloat16()
        g.view(-1)[7 * shape[-1] + 1] = nan
        y.backward(g.contiguous(memory_format=fmt))
        out[key + ("train",)] = y.detach()
        out[key + ("grad",)] = xt.grad
torch.save(out, sys.argv[1])
"""


def test_bf16_hardware_rounding_same_bits(tmp_path):
    """The avx512bf16 kernels (hardware float -> bfloat16 rounding) write the same bits as the
    avx512 ones, also where the instruction alone would not: NaN lanes (either sign: the kernels
    write 0x7FC0) and float-denormal lanes (the instruction flushes them to zero)."""
    if _isa_expected("avx512bf16") != "avx512bf16":
        pytest.skip("this CPU has no AVX512_BF16")
    results = {}
    for name in ("avx512", "avx512bf16"):
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _BF16_SCRIPT, str(path)], check=True,
                       env=dict(os.environ, FASTBN_CPU_ISA=name), timeout=300)
        results[name] = torch.load(path)
        assert results[name]["isa"] == name
    nans = denormals = 0
    for key, want in results["avx512"].items():
        if key == "isa":
            continue
        got = results["avx512bf16"][key]
        bits = want.view(torch.int16)
        nans += int(want.isnan().sum())
        denormals += int(((bits & 0x7F80) == 0).logical_and((bits & 0x7F) != 0).sum())
        assert torch.equal(got.view(torch.int16), bits), key
    assert nans > 100 and denormals > 100  # both kinds of lane were written


_STREAM_SCRIPT = r"""
import torch, fastbn, fastbn.functional as FF
from fastbn.testing import acc_dtype
torch.manual_seed(3)
out = {}
for shape in ((4, 32, 16, 16), (2, 4, 48, 48), (2, 48, 7, 7), (64, 96)):
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for cl in (False, True) if len(shape) == 4 else (False,):
            x = torch.randn(*shape, dtype=torch.float64).to(dt)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            C = shape[1]
            w, b = torch.rand(C, dtype=acc_dtype(dt)) + .5, torch.randn(C, dtype=acc_dtype(dt))
            rm, rv = torch.randn(C, dtype=acc_dtype(dt)), torch.rand(C, dtype=acc_dtype(dt)) + .5
            ye = FF.batch_norm(x, rm, rv, w, b, training=False)
            xg = x.clone().requires_grad_()
            r = torch.randn_like(x).requires_grad_()
            yt = FF.batch_norm(xg, None, None, w, b, training=True, activation="relu", residual=r)
            yt.backward(torch.randn_like(yt))
            xp = x.clone().requires_grad_()
            yp = FF.batch_norm(xp, None, None, w, b, training=True)
            yp.backward(torch.randn_like(yp))
            out[(shape, str(dt), cl)] = (ye, yt.detach(), xg.grad, r.grad, yp.detach(), xp.grad)
torch.save(out, __import__("sys").argv[1])
"""


def _stream_script_same_bits_both_ways(tmp_path, switch):
    """Runs _STREAM_SCRIPT with the environment switch `switch` at "0" and at "1" (each in a
    fresh process, so outputs come from fresh allocations) and asserts bitwise equal results."""
    results = {}
    for mode in ("0", "1"):
        path = tmp_path / f"{switch}{mode}.pt"
        subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, str(path)], check=True,
                       env=dict(os.environ, **{switch: mode}), timeout=300)
        results[mode] = torch.load(path)
    assert results["0"].keys() == results["1"].keys() and len(results["0"]) == 28
    for key, plain in results["0"].items():
        for a, b in zip(plain, results["1"][key]):
            assert torch.equal(a, b), key


def test_non_temporal_stores_same_bits(tmp_path):
    """The non-temporal stores of the elementwise passes and of the fused per-channel planar
    passes (FASTBN_CPU_STREAM=1 forces them for every size; by default only passes whose inputs
    and outputs together exceed the last-level cache stream) write exactly what the plain
    stores write: eval and training outputs, input and residual gradients, with and without
    the fused relu and residual; planes of one run and of several (48x48), and planes not a
    whole number of cache lines (7x7, which never stream)."""
    _stream_script_same_bits_both_ways(tmp_path, "FASTBN_CPU_STREAM")


def test_reversed_block_order_same_bits(tmp_path):
    """The channels-last elementwise passes visit their blocks last-read first after a reduction
    over inputs larger than half the last-level cache (FASTBN_CPU_REVERSE=1 forces that order
    for every size and pass, 0 the memory order): every block is written, with the same bits,
    in either order (a skipped block shows: outputs come from fresh allocations)."""
    _stream_script_same_bits_both_ways(tmp_path, "FASTBN_CPU_REVERSE")


def test_cpu_cache_bytes_is_the_last_level_cache():
    """The cache size the non-temporal stores are sized by is the highest-level data cache
    Linux lists for CPU 0 (glibc's sysconf can report ten times the L3 in a VM), else positive."""
    found = {}
    root = "/sys/devices/system/cpu/cpu0/cache"
    for index in sorted(glob.glob(os.path.join(root, "index*"))):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(index, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        if kind != "Instruction" and size:
            found[level] = int(size[:-1]) << {"K": 10, "M": 20, "G": 30}[size[-1]] if size[-1] in "KMG" else int(size)
    value = fastbn._C.cpu_cache_bytes()
    if found:
        assert value == found[max(found)]
    else:
        assert value > 0
