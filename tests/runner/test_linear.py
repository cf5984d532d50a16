"""Packed oneDNN linears: the numbers of F.linear at every batch size, weights shared, visible in repr."""

import pytest
import torch
from torch import nn

from peftserve.runner import linear
from peftserve.runner.linear import MIN_ROWS, PackedLinear, onednn_usable, pack_linears

_real_packed_linear = linear.packed_linear

pytestmark = pytest.mark.skipif(not onednn_usable(torch.float32), reason="no oneDNN in this torch build")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False))


@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MIN_ROWS, 17, 300])
def test_packed_model_matches_plain(rows):
    model, reference = _model(), _model()
    assert pack_linears(model) == 2
    x = torch.randn(1, rows, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MIN_ROWS, 40])
def test_only_batches_of_min_rows_take_the_packed_weight(rows, monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args)
        return _real_packed_linear(*args)

    monkeypatch.setattr(linear, "packed_linear", counted)
    model = _model()
    pack_linears(model)
    with torch.inference_mode():
        model(torch.randn(rows, 64))
    assert len(calls) == (2 if rows >= MIN_ROWS else 0)


def test_autograd_takes_the_plain_weight():
    model = _model()
    pack_linears(model)
    x = torch.randn(MIN_ROWS + 3, 64, requires_grad=True)
    model(x).sum().backward()  # grad enabled: F.linear, so backward works
    assert x.grad is not None and model[0].weight.grad is not None


def test_linears_are_replaced_by_visible_modules_sharing_their_weights():
    model = _model()
    weight = model[0].weight
    pack_linears(model)
    assert isinstance(model[0], PackedLinear) and isinstance(model[0], nn.Linear)
    assert model[0].weight is weight and model[2].bias is None
    assert "onednn_packed=True" in repr(model)  # a replaced module, not a patched forward
    assert "forward" not in vars(model[0])
    assert set(model.state_dict()) == set(_model().state_dict())


def test_bfloat16_and_other_dtypes():
    model = _model().to(torch.bfloat16)
    packed = pack_linears(model)
    assert packed == (2 if onednn_usable(torch.bfloat16) else 0)
    assert pack_linears(_model().to(torch.float16)) == 0  # not among the packed dtypes
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), _model().to(torch.bfloat16)(x), rtol=2e-2, atol=2e-2)
