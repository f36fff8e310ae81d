"""A fastbn training step makes no host synchronisation: no tensor value is read on the host
(counted on the CPU with dist_worker.count_host_reads; on a GPU, torch.cuda's sync debug mode
raises on any synchronisation), so a whole training step, momentum=None included, can be
captured in a CUDA graph and replayed. SyncBatchNorm's ranks are checked in test_sync.py."""
import pytest
import torch
from dist_worker import count_host_reads
from helpers import make_input, make_pair, requires_cuda

import fastbn


def _step(m, x, dy):
    x.grad = None
    m(x).backward(dy)


@pytest.mark.parametrize("module", ["bn2d", "bn2d-cma", "bn1d", "act2d", "no-tracking"])
def test_training_step_reads_nothing_on_the_host(module):
    m = {"bn2d": lambda: fastbn.BatchNorm2d(4), "bn2d-cma": lambda: fastbn.BatchNorm2d(4, momentum=None),
         "bn1d": lambda: fastbn.BatchNorm1d(4), "act2d": lambda: fastbn.BatchNormAct2d(4),
         "no-tracking": lambda: fastbn.BatchNorm2d(4, track_running_stats=False)}[module]()
    shape = (6, 4) if module == "bn1d" else (3, 4, 5, 5)
    x = make_input(shape, torch.float32, "cpu").requires_grad_()
    with count_host_reads() as reads:
        for _ in range(2):
            _step(m, x, torch.randn_like(x))
        m.eval()
        m(x)
    assert reads == []


def test_host_read_counter_can_fail():
    """torch's own BatchNorm with momentum=None reads num_batches_tracked on the host."""
    m = torch.nn.BatchNorm2d(4, momentum=None)
    x = make_input((3, 4, 5, 5), torch.float32, "cpu").requires_grad_()
    with count_host_reads() as reads:
        _step(m, x, torch.randn_like(x))
    assert "__float__" in reads


@requires_cuda
@pytest.mark.parametrize("momentum", [0.1, None])
def test_cuda_training_step_syncs_nothing(momentum):
    _, m = make_pair(2, 8, "cuda", momentum=momentum)
    x = make_input((4, 8, 6, 6), torch.float32, "cuda").requires_grad_()
    dy = torch.randn_like(x)
    _step(m, x, dy)  # lazy initialisation outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(m, x, dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.parametrize("momentum", [0.1, None])
def test_cuda_graph_replays_training_steps(momentum):
    """A captured forward+backward step, replayed, gives what eager steps give: outputs,
    gradients, running statistics and num_batches_tracked (the cumulative factor is read on
    the device at each replay)."""
    _, m = make_pair(2, 8, "cuda", momentum=momentum)
    eager = fastbn.BatchNorm2d(8, momentum=momentum, device="cuda")
    eager.load_state_dict(m.state_dict())
    xs = [make_input((4, 8, 6, 6), torch.float32, "cuda") for _ in range(3)]
    dys = [torch.randn_like(x) for x in xs]
    static_x = xs[0].clone().requires_grad_()
    static_dy = dys[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.cuda.stream(side):  # warm-up outside the capture, then the state restored
        for _ in range(2):
            _step(m, static_x, static_dy)
    torch.cuda.current_stream().wait_stream(side)
    m.load_state_dict(state)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    m.weight.grad = m.bias.grad = None
    with torch.cuda.graph(graph):
        static_y = m(static_x)
        static_y.backward(static_dy)
    m.load_state_dict(state)  # capture does not run the kernels, but start from a known state anyway
    for x, dy in zip(xs, dys):
        static_x.data.copy_(x)
        static_dy.copy_(dy)
        graph.replay()
        xe = x.clone().requires_grad_()
        eager.weight.grad = eager.bias.grad = None
        ye = eager(xe)
        ye.backward(dy)
        torch.testing.assert_close(static_y, ye)
        torch.testing.assert_close(static_x.grad, xe.grad)
        torch.testing.assert_close(m.weight.grad, eager.weight.grad)
        torch.testing.assert_close(m.running_mean, eager.running_mean)
        torch.testing.assert_close(m.running_var, eager.running_var)
        assert int(m.num_batches_tracked) == int(eager.num_batches_tracked)
