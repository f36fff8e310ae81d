"""Module plumbing is PyTorch's: constructor, state_dict (both directions, old checkpoints),
repr, deepcopy, pickle, reset methods, isinstance, dtype/device moves."""
import copy
import io
import pickle

import pytest
import torch
from helpers import DEVICES, FAST_BN, TORCH_BN, make_input, make_pair, randomize_

import fastbn

KWARGS = [dict(), dict(affine=False), dict(bias=False), dict(momentum=None), dict(track_running_stats=False),
          dict(eps=1e-3, momentum=0.01)]
SHAPES = {1: (6, 4), 2: (3, 4, 5, 5), 3: (2, 4, 3, 3, 3)}


@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize("kw", KWARGS, ids=str)
def test_state_dict_interchange(kind, kw):
    ref = randomize_(TORCH_BN[kind](4, **kw))
    ours = FAST_BN[kind](4, **kw)
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    assert repr(ours) == repr(ref)
    assert isinstance(ours, TORCH_BN[kind])
    ours.load_state_dict(ref.state_dict())  # torch -> fastbn
    back = TORCH_BN[kind](4, **kw)
    back.load_state_dict(ours.state_dict())  # fastbn -> torch
    x = torch.randn(SHAPES[kind])
    for m in (ref, ours, back):
        m.eval()
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(back(x), ref(x))


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_old_checkpoint_without_num_batches_tracked(kind):
    ref = randomize_(TORCH_BN[kind](4))
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    ours = FAST_BN[kind](4)
    ours.load_state_dict(sd)
    assert int(ours.num_batches_tracked) == 0
    torch.testing.assert_close(ours.running_mean, ref.running_mean)


@pytest.mark.parametrize("device", DEVICES)
def test_deepcopy_pickle_save(device):
    m = randomize_(fastbn.BatchNorm2d(5, device=device))
    x = make_input((3, 5, 4, 4), torch.float32, device)
    m(x)  # a training step
    m.eval()
    expected = m(x)
    clones = [copy.deepcopy(m), pickle.loads(pickle.dumps(m))]
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    clones.append(torch.load(buf, weights_only=False))
    for c in clones:
        assert type(c) is fastbn.BatchNorm2d
        torch.testing.assert_close(c(x), expected)


def test_reset_methods_and_constructor():
    m = randomize_(fastbn.BatchNorm2d(4, eps=1e-3, momentum=0.2, affine=True, track_running_stats=True,
                                      dtype=torch.float64, bias=False))
    assert m.bias is None and m.weight.dtype == torch.float64 and m.eps == 1e-3 and m.momentum == 0.2
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(m.running_var, torch.ones(4, dtype=torch.float64))
    assert int(m.num_batches_tracked) == 0
    randomize_(m)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(4, dtype=torch.float64))
    assert torch.equal(m.running_var, torch.ones(4, dtype=torch.float64))


def test_dtype_moves_and_momentum_none_counts():
    ref, ours = TORCH_BN[2](3, momentum=None), FAST_BN[2](3, momentum=None)
    for step in range(4):
        x = torch.randn(4, 3, 3, 3)
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 4
    ours.double()
    ref.double()
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


def test_parametrized_and_functional_call_parameters_are_used():
    """The module reads its weight, bias and buffers the way nn.Module resolves them: a
    parametrized weight (a property) and torch.func.functional_call's substitutes are used."""
    import torch.nn.utils.parametrize as P

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    ref, ours = make_pair(2, 4)
    for m in (ref, ours):
        P.register_parametrization(m, "weight", Double())
    x = make_input((3, 4, 5, 5), torch.float32)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    subs = {"bias": torch.randn(4), "running_mean": torch.randn(4), "running_var": torch.rand(4) + 0.5}
    for m in (ref, ours):
        m.eval()
    got = torch.func.functional_call(ours, subs, (x,))
    torch.testing.assert_close(got, torch.func.functional_call(ref, subs, (x,)))
    assert not torch.allclose(got, ours(x))  # the substitutes made a difference
