"""fastbn.LazyBatchNorm1d/2d/3d against torch.nn.LazyBatchNorm1d/2d/3d, and
fastbn.FrozenBatchNorm2d against torchvision's (where torchvision imports) and against
torch.nn.BatchNorm2d in eval mode; convert and revert of both."""
import pytest
import torch
from helpers import assert_states_equal, assert_step_matches, make_input, randomize_

import fastbn
from fastbn.testing import FASTBN, TORCH_BN, tol

LAZY = {1: fastbn.LazyBatchNorm1d, 2: fastbn.LazyBatchNorm2d, 3: fastbn.LazyBatchNorm3d}
TORCH_LAZY = {1: torch.nn.LazyBatchNorm1d, 2: torch.nn.LazyBatchNorm2d, 3: torch.nn.LazyBatchNorm3d}
SHAPE = {1: (6, 5, 4), 2: (6, 5, 3, 2), 3: (6, 5, 2, 2, 2)}
TOL = tol(torch.float32)


@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(affine=False), dict(track_running_stats=False),
                                    dict(momentum=None)])
def test_lazy_matches_torch(kind, kwargs):
    ref, ours = TORCH_LAZY[kind](**kwargs), LAZY[kind](**kwargs)
    assert isinstance(ours, TORCH_LAZY[kind])
    assert ours.has_uninitialized_params() or not (ours.affine or ours.track_running_stats)
    for train in (True, True, False):
        ref.train(train)
        ours.train(train)
        assert_step_matches(ours, ref, make_input(SHAPE[kind], torch.float32), **TOL)
    assert type(ours) is FASTBN[kind] and type(ref) is TORCH_BN[kind]
    assert ours.num_features == 5 and repr(ours) == repr(ref)
    assert_states_equal(ours, ref, **TOL)


def test_convert_and_revert_lazy():
    """convert swaps a torch lazy layer not yet materialised for fastbn's, sharing its
    uninitialised parameters (materialised in place at the first call); revert goes back."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.LazyBatchNorm2d(momentum=0.3, bias=False))
    weight = model[1].weight
    out = fastbn.convert(model)
    assert type(out[1]) is fastbn.LazyBatchNorm2d and out[1].momentum == 0.3 and out[1].bias is None
    assert out[1].weight is weight
    back = fastbn.revert(torch.nn.Sequential(fastbn.LazyBatchNorm3d()))
    assert type(back[0]) is torch.nn.LazyBatchNorm3d
    out(torch.randn(2, 3, 4, 4))
    assert type(out[1]) is fastbn.BatchNorm2d and out[1].weight is weight and weight.shape == (4,)


def _frozen_pair():
    ref = randomize_(torch.nn.BatchNorm2d(5)).eval()
    ours = fastbn.FrozenBatchNorm2d(5, eps=1e-3)
    ref.eps = 1e-3
    ours.load_state_dict(ref.state_dict())  # num_batches_tracked is dropped, as torchvision does
    return ref, ours


def test_frozen_is_batchnorm_eval():
    """In eval and in training mode: torch's BatchNorm2d in eval mode; the input's gradient as
    torch's; nothing updated; torchvision's buffers, state_dict and repr."""
    ref, ours = _frozen_pair()
    assert list(ours.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert not list(ours.parameters()) and repr(ours) == "FrozenBatchNorm2d(5, eps=0.001)"
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for train in (True, False):
        ours.train(train)
        assert_step_matches(ours, ref, make_input((4, 5, 3, 3), torch.float32, layout="channels_last"), **TOL)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_half_input_float_buffers():
    ref, ours = _frozen_pair()
    x = make_input((4, 5, 3, 3), torch.float16)
    torch.testing.assert_close(ours(x), ref(x.float()).half(), **tol(torch.float16))


def test_frozen_matches_torchvision_and_converts():
    ops = pytest.importorskip("torchvision.ops")
    tv = ops.FrozenBatchNorm2d(5, eps=1e-3)
    ref, ours = _frozen_pair()
    tv.load_state_dict(ref.state_dict())
    x = make_input((4, 5, 3, 3), torch.float32)
    torch.testing.assert_close(ours(x), tv(x), **TOL)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1), tv)
    out = fastbn.convert(model)
    assert type(out[1]) is fastbn.FrozenBatchNorm2d and out[1].running_var is tv.running_var and out[1].eps == 1e-3
    back = fastbn.revert(out)
    assert type(back[1]) is ops.FrozenBatchNorm2d and back[1].weight is tv.weight
