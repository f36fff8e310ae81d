"""Real models, converted with fastbn.convert, trained beside the unconverted model:
torchvision's resnet50 (and timm's resnet50d when timm is installed).

For each model and mode -- float32 NCHW, and autocast (float16 on a GPU, bfloat16 on a CPU)
with channels_last -- three copies start every step from the same state: the torch model, its
fastbn conversion, and a float64 copy of the torch model (the reference). Each takes the same
training step on the same random batch; the step then compares, against the float64
reference, the loss, every parameter's gradient (||g - g64|| / ||g64||) and every BatchNorm
layer's running statistics, for torch and for fastbn. fastbn passes when its largest error is
at most 3x torch's (plus a floor at rounding level): float training amplifies rounding, so the
two float models are compared by their accuracy, not with each other. The torch model then
takes an SGD step, and the next step starts from its new state. The profiler also checks that
the converted model calls no ATen batch norm. Exit status 1 if any check fails.

    python scripts/gpu_models.py [--device cuda] [--batch 32] [--size 224] [--steps 3]
"""
import argparse
import contextlib
import copy
import sys
import time

import torch
import torch.nn.functional as F

import fastbn

ATEN_BN = ("aten::batch_norm", "aten::native_batch_norm", "aten::cudnn_batch_norm", "aten::_batch_norm_impl_index",
           "aten::_native_batch_norm_legit", "aten::miopen_batch_norm")
RATIO = 3.0
FLOOR = {"float32": 1e-5, "autocast": 1e-3}


def make_models(name):
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(num_classes=100)
    if name == "timm:resnet50d":
        import timm

        return timm.create_model("resnet50d", num_classes=100, pretrained=False)
    raise ValueError(name)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bn_ops_called(model, x, y, amp):
    """Names of ATen batch-norm ops one training step of `model` calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with amp():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return sorted({e.key for e in prof.key_averages() if e.key in ATEN_BN})


def bn_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def run(name, mode, a, device):
    torch.manual_seed(0)
    ref = make_models(name).to(device)
    fast = fastbn.convert(copy.deepcopy(ref))
    f64 = copy.deepcopy(ref).double()
    n_fast = sum(isinstance(m, fastbn.BatchNorm2d) for m in fast.modules())
    n_bn = len(bn_layers(ref))
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    if mode == "autocast":
        ref = ref.to(memory_format=torch.channels_last)
        fast = fast.to(memory_format=torch.channels_last)

        def amp():
            return torch.autocast(device, dtype=amp_dtype)
    else:
        amp = contextlib.nullcontext
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    err = {k: {"torch": 0.0, "fastbn": 0.0} for k in ("loss", "gradient", "running stats")}
    failures = []
    for step in range(a.steps):
        state = ref.state_dict()
        fast.load_state_dict(state)
        f64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        x = torch.randn(a.batch, 3, a.size, a.size, generator=gen).to(device)
        y = torch.randint(0, 100, (a.batch,), generator=gen).to(device)
        loss64 = F.cross_entropy(f64(x.double()), y)
        loss64.backward()
        if mode == "autocast":
            x = x.to(memory_format=torch.channels_last)
        for side, m in (("torch", ref), ("fastbn", fast)):
            m.zero_grad(set_to_none=True)
            with amp():
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            if not torch.isfinite(loss):
                failures.append(f"step {step}: {side} loss is {loss.item()}")
            err["loss"][side] = max(err["loss"][side], abs(loss.item() - loss64.item()) / abs(loss64.item()))
            for (pn, p), q in zip(f64.named_parameters(), m.parameters()):
                if q.grad is None or not torch.isfinite(q.grad).all():
                    failures.append(f"step {step}: {side} gradient of {pn} missing or not finite")
                    continue
                err["gradient"][side] = max(err["gradient"][side], rel(q.grad, p.grad))
            for (bn, b64), (_, bm) in zip(bn_layers(f64), bn_layers(m)):
                for buf in ("running_mean", "running_var"):
                    err["running stats"][side] = max(err["running stats"][side],
                                                     rel(getattr(bm, buf), getattr(b64, buf)))
        f64.zero_grad(set_to_none=True)
        opt.step()
    for k, v in err.items():
        if not v["fastbn"] <= RATIO * v["torch"] + FLOOR[mode]:
            failures.append(f"{k}: fastbn's error {v['fastbn']:.2e} > {RATIO:g} x torch's {v['torch']:.2e} "
                            f"+ {FLOOR[mode]:.0e}")
    called = bn_ops_called(fast, x, y, amp)
    if called and n_fast == n_bn:
        failures.append(f"the converted model still calls {called}")
    label = f"{name} {mode if mode == 'float32' else f'autocast({str(amp_dtype)[6:]})+channels_last'}"
    errs = "; ".join(f"{k} {v['fastbn']:.1e} (torch {v['torch']:.1e})" for k, v in err.items())
    print(f"{'PASS' if not failures else 'FAIL'} {label}: {n_fast}/{n_bn} BatchNorm layers converted, {a.steps} steps "
          f"of batch {a.batch}x3x{a.size}x{a.size}; largest error vs float64: {errs}; ATen batch norm calls in the "
          f"converted model: {', '.join(called) or 'none'}", flush=True)
    for f in failures:
        print(f"    {f}", flush=True)
    return not failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="resnet50,timm:resnet50d")
    a = ap.parse_args()
    t0 = time.time()
    ok = True
    ran = 0
    for name in a.models.split(","):
        try:
            make_models(name)
        except ImportError as e:
            print(f"SKIP {name}: {e}")
            continue
        for mode in ("float32", "autocast"):
            ok &= run(name, mode, a, a.device)
            ran += 1
    print(f"gpu_models: {ran} model/mode runs on {a.device} in {time.time() - t0:.0f} s: {'PASS' if ok and ran else 'FAIL'}")
    return 0 if ok and ran else 1


if __name__ == "__main__":
    sys.exit(main())
