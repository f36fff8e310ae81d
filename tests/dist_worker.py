"""Worker for the multi-process SyncBatchNorm tests (spawned by test_sync.py): one rank of
a gloo group trains fastbn.SyncBatchNorm on its slice of a global batch and saves what it
saw. Every rank builds the same global data from the same seed."""
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist


# Tensor methods that read a tensor's value on the host: each is a device synchronisation on
# a GPU (and makes a step impossible to capture in a CUDA graph).
HOST_READS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """While active, every call of a HOST_READS method of a tensor is appended (by name) to
    the list it yields."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name, method):
        def call(self, *args, **kwargs):
            calls.append(name)
            return method(self, *args, **kwargs)
        return call

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counted(name, method))
        yield calls
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def global_data(cfg):
    """The global batches (inputs, upstream grads) of every step, and the initial state."""
    g = torch.Generator().manual_seed(cfg["seed"])
    total = sum(cfg["batch_sizes"])
    shape = (total, *cfg["feature_shape"])
    xs = [torch.randn(shape, generator=g) * 2 + 0.5 for _ in range(cfg["steps"] + 1)]
    gs = [torch.randn(shape, generator=g) for _ in range(cfg["steps"])]
    C = cfg["feature_shape"][0]
    state = {"weight": torch.rand(C, generator=g) + 0.5, "bias": torch.randn(C, generator=g)}
    return xs, gs, state


def layout(t, cfg):
    """The tensor on the config's device (cuda:<rank> for NCCL) and in its memory layout."""
    t = t.to(cfg.get("device", "cpu"))
    return t.to(memory_format=torch.channels_last) if cfg.get("channels_last") else t


def train_steps(model, cfg, lo, hi, fwd=None):
    """Runs cfg["steps"] training steps of `model` (called through `fwd`, default the model
    itself) on rows lo:hi of the global batches, then one eval step; returns what it saw,
    including the host reads of tensors (count_host_reads) the training steps made."""
    xs, gs, _ = global_data(cfg)
    fwd = model if fwd is None else fwd
    out = {"y": [], "dx": [], "dw": [], "db": [], "rm": [], "rv": [], "host_reads": []}
    for step in range(cfg["steps"]):
        x = layout(xs[step][lo:hi].clone(), cfg).requires_grad_()
        dy = layout(gs[step][lo:hi].clone(), cfg)
        with count_host_reads() as reads:
            y = fwd(x)
            y.backward(dy)
        out["host_reads"] += reads
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        out["dw"].append(model.weight.grad.clone())
        out["db"].append(model.bias.grad.clone())
        model.weight.grad = model.bias.grad = None
        out["rm"].append(model.running_mean.clone())
        out["rv"].append(model.running_var.clone())
    model.eval()
    out["y_eval"] = model(layout(xs[-1][lo:hi].clone(), cfg)).detach()
    out["nbt"] = int(model.num_batches_tracked)
    return out


def init_model(model, cfg):
    """Loads the config's initial weight and bias into `model`."""
    _, _, state = global_data(cfg)
    with torch.no_grad():
        model.weight.copy_(state["weight"])
        model.bias.copy_(state["bias"])
    return model


def _train_rank(rank, cfg):
    """This rank's training (train_steps on its rows), with every tensor moved to the CPU.
    The model (and its DistributedDataParallel wrapper) lives only inside this call."""
    import fastbn

    model = init_model(fastbn.SyncBatchNorm(cfg["feature_shape"][0], momentum=cfg["momentum"]), cfg)
    model.to(cfg.get("device", "cpu"))
    lo = sum(cfg["batch_sizes"][:rank])
    hi = lo + cfg["batch_sizes"][rank]
    fwd = None
    if cfg.get("compile"):
        fwd = torch.compile(model)
    elif cfg.get("ddp"):  # DistributedDataParallel on the CPU: averages weight/bias grads over ranks
        fwd = torch.nn.parallel.DistributedDataParallel(model)
    out = train_steps(model, cfg, lo, hi, fwd)

    def cpu(v):
        return v.cpu() if torch.is_tensor(v) else v

    return {k: [cpu(t) for t in v] if isinstance(v, list) else cpu(v) for k, v in out.items()}


def run(rank, world, init_file, cfg, out_dir):
    """One rank: joins the group, trains, saves rank<rank>.pt in out_dir, meets the other
    ranks at a barrier, destroys the group and, having succeeded, leaves with os._exit(0).

    Why not a normal exit: DistributedDataParallel keeps its process group alive past
    destroy_process_group (torch 2.13-2.14: the gloo worker threads are still running
    afterwards), and a gloo worker thread can drop the last reference to a finished
    collective's tensors (created in Python, so freeing them takes the GIL) after the main
    thread has moved on. If the main thread is finalizing the interpreter by then, the worker
    thread is ended by pthread_exit inside C++ code and the process aborts ("terminate called
    without an active exception"; 5 of about 260 runs of the DDP test on 2 cores)."""
    backend = cfg.get("backend", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        cfg = dict(cfg, device=f"cuda:{rank}")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_train_rank(rank, cfg), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
