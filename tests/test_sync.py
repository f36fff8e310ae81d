"""fastbn.SyncBatchNorm on torch.distributed (gloo, CPU): 2 and 3 processes with unequal
batch sizes against single-process torch.nn.BatchNorm over the concatenated batch, for
outputs, input grads, weight/bias grads (summed over ranks), running statistics after
several steps, and eval; also under torch.compile and DistributedDataParallel. Processes are spawned by the tests,
rendezvous through a file (no network), and are killed after a deadline."""
import time

import pytest
import torch
import torch.multiprocessing as mp
from dist_worker import init_model, run, train_steps

import fastbn

DEADLINE_S = 240


def _spawn(cfg, tmp_path):
    world = len(cfg["batch_sizes"])
    ctx = mp.start_processes(run, args=(world, str(tmp_path / "rendezvous"), cfg, str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _reference(cfg):
    """Single-process torch.nn.BatchNorm over the concatenated batch."""
    kind = {1: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm2d, 4: torch.nn.BatchNorm3d}[len(cfg["feature_shape"])]
    ref = init_model(kind(cfg["feature_shape"][0], momentum=cfg["momentum"]), cfg)
    return train_steps(ref, cfg, 0, sum(cfg["batch_sizes"]))


def _compare(ranks, ref, cfg):
    tol = dict(rtol=1e-4, atol=1e-4)
    for step in range(cfg["steps"]):
        torch.testing.assert_close(torch.cat([r["y"][step] for r in ranks]), ref["y"][step], **tol)
        torch.testing.assert_close(torch.cat([r["dx"][step] for r in ranks]), ref["dx"][step], **tol)
        if cfg.get("ddp"):  # DDP gives every rank the average of the ranks' gradients
            for r in ranks:
                torch.testing.assert_close(r["dw"][step] * len(ranks), ref["dw"][step], **tol)
                torch.testing.assert_close(r["db"][step] * len(ranks), ref["db"][step], **tol)
        else:
            torch.testing.assert_close(sum(r["dw"][step] for r in ranks), ref["dw"][step], **tol)
            torch.testing.assert_close(sum(r["db"][step] for r in ranks), ref["db"][step], **tol)
        for r in ranks:  # every rank holds the full-batch running statistics
            torch.testing.assert_close(r["rm"][step], ref["rm"][step], **tol)
            torch.testing.assert_close(r["rv"][step], ref["rv"][step], **tol)
    torch.testing.assert_close(torch.cat([r["y_eval"] for r in ranks]), ref["y_eval"], **tol)
    assert all(r["nbt"] == cfg["steps"] for r in ranks)
    if not cfg.get("compile") and not cfg.get("ddp"):  # no host synchronisation in a training step
        assert all(r["host_reads"] == [] for r in ranks), [r["host_reads"] for r in ranks]


CONFIGS = {
    "2proc-bn2d-unequal": dict(batch_sizes=[3, 7], feature_shape=(4, 5, 5), momentum=0.1),
    "3proc-bn1d-unequal-cma": dict(batch_sizes=[2, 9, 5], feature_shape=(6,), momentum=None),
    "3proc-bn2d-channels-last": dict(batch_sizes=[1, 4, 2], feature_shape=(8, 3, 3), momentum=0.3,
                                     channels_last=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sync_batchnorm_matches_full_batch(name, tmp_path):
    cfg = dict(CONFIGS[name], seed=11, steps=3)
    _compare(_spawn(cfg, tmp_path), _reference(cfg), cfg)


def test_sync_batchnorm_under_ddp_on_gloo(tmp_path):
    """DistributedDataParallel accepts a CPU model with fastbn.SyncBatchNorm (it refuses
    torch.nn.SyncBatchNorm there: "SyncBatchNorm layers only work with GPU modules")."""
    with pytest.raises(ValueError, match="only work with GPU modules"):
        _ddp_refuses_torch_sync_batchnorm(tmp_path)
    cfg = dict(batch_sizes=[3, 5], feature_shape=(4, 3, 3), momentum=0.1, seed=7, steps=3, ddp=True)
    _compare(_spawn(cfg, tmp_path), _reference(cfg), cfg)


def _ddp_refuses_torch_sync_batchnorm(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'single'}", rank=0, world_size=1)
    try:
        torch.nn.parallel.DistributedDataParallel(torch.nn.SyncBatchNorm(4))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: fewer than 2 GPUs visible")
def test_sync_batchnorm_nccl(tmp_path):
    cfg = dict(batch_sizes=[3, 6], feature_shape=(8, 4, 4), momentum=0.1, seed=3, steps=3, backend="nccl",
               channels_last=True)
    _compare(_spawn(cfg, tmp_path), _reference(cfg), cfg)


@pytest.mark.slow
def test_sync_batchnorm_under_compile(tmp_path):
    cfg = dict(batch_sizes=[2, 5], feature_shape=(3, 4, 4), momentum=0.1, seed=5, steps=2, compile=True)
    _compare(_spawn(cfg, tmp_path), _reference(cfg), cfg)


def test_single_process_and_eval_fall_back_to_plain_batchnorm():
    """Without an initialised process group (and in eval) it is plain fastbn BatchNorm."""
    ref = torch.nn.BatchNorm2d(4)
    ours = fastbn.SyncBatchNorm(4)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for mode in (True, True, False):
        ref.train(mode)
        ours.train(mode)
        x = torch.randn(3, 4, 5, 5)
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_var, ref.running_var)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(4))


def test_convert_sync_batchnorm():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.BatchNorm1d(4)), fastbn.BatchNorm2d(4))
    bn = net[1]
    out = fastbn.SyncBatchNorm.convert_sync_batchnorm(net, process_group=None)
    assert type(out[1]) is fastbn.SyncBatchNorm and type(out[3][0]) is fastbn.SyncBatchNorm
    assert type(out[4]) is fastbn.SyncBatchNorm
    assert out[1].weight is bn.weight and out[1].running_mean is bn.running_mean
    assert type(out[0]) is torch.nn.Conv2d
    single = fastbn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm3d(2).eval())
    assert type(single) is fastbn.SyncBatchNorm and not single.training
