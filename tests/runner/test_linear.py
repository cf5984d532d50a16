"""Packed oneDNN linears: the numbers of F.linear at every batch size, one copy of each weight."""

import gc
import weakref

import pytest
import torch
from torch import nn

from peftserve.runner import linear
from peftserve.runner.linear import PackedLinear, onednn_usable, pack, pack_linears, unpack

_real_packed_linear = linear.packed_linear

pytestmark = pytest.mark.skipif(not onednn_usable(torch.float32), reason="no oneDNN in this torch build")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 17, 300])
def test_packed_model_matches_plain(rows):
    model, reference = _model(), _model()
    assert pack_linears(model) == 2
    x = torch.randn(1, rows, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_every_batch_takes_the_packed_weight(rows, monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args)
        return _real_packed_linear(*args)

    monkeypatch.setattr(linear, "packed_linear", counted)
    model = _model().requires_grad_(False)
    pack_linears(model)
    model(torch.randn(rows, 64))  # grad mode on, but nothing requires grad
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpack_gives_the_weight_bit_for_bit(dtype):
    if not onednn_usable(dtype):
        pytest.skip(f"no packed {dtype} here")
    weight = torch.randn(300, 200).to(dtype)
    assert torch.equal(unpack(pack(weight)), weight)


def test_the_plain_weight_is_freed_and_read_back_unpacked():
    model = _model()
    plain = model[0].weight.detach().clone()
    freed = weakref.ref(model[0].weight)
    pack_linears(model)
    gc.collect()
    assert freed() is None  # one copy: the packed one
    assert set(model.state_dict()) == {"0.bias"}
    assert torch.equal(model[0].weight, plain) and model[0].weight.shape == (96, 64)


def test_autograd_through_a_packed_layer():
    model, reference = _model(), _model()
    pack_linears(model)
    x = torch.randn(7, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(x1).sum().backward()
    reference(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(model[0].bias.grad, reference[0].bias.grad)


def test_linears_are_replaced_by_visible_modules():
    model = _model()
    pack_linears(model)
    assert isinstance(model[0], PackedLinear) and isinstance(model[0], nn.Linear)
    assert model[2].bias is None
    assert "onednn_packed=True" in repr(model)  # a replaced module, not a patched forward
    assert "forward" not in vars(model[0])
    assert pack_linears(model) == 0  # already packed


def test_a_tied_weight_is_not_packed():
    model = _model()
    embedding = nn.Embedding(32, 96)
    embedding.weight = model[2].weight  # [32, 96]: an output head tied to the embeddings
    tied = nn.ModuleDict({"embed": embedding, "net": model})
    assert pack_linears(tied) == 1
    assert type(model[2]) is nn.Linear and model[2].weight is embedding.weight


def test_bfloat16_and_other_dtypes():
    model = _model().to(torch.bfloat16)
    packed = pack_linears(model)
    assert packed == (2 if onednn_usable(torch.bfloat16) else 0)
    assert pack_linears(_model().to(torch.float16)) == 0  # not among the packed dtypes
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), _model().to(torch.bfloat16)(x), rtol=2e-2, atol=2e-2)


def test_pages_of_a_weight_mapped_from_a_file_are_released_and_still_read_right(tmp_path):
    path = tmp_path / "weights.bin"
    values = torch.randn(3 * linear.PAGE)  # 12 pages of float32
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=values.numel())  # a private mapping
    weight = mapped[1000 : 1000 + 160 * 64].view(160, 64)  # starts and ends inside a page
    mappings = linear.file_mappings()
    assert any(s <= weight.data_ptr() < e for s, e in mappings)
    linear.release_file_pages(weight, mappings)
    assert torch.equal(mapped, values)  # dropped pages come back from the file
