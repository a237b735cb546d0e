"""Float merges through the shims write into the weight's own storage: the same storage holds W' while merged
(tied references see it), unmerge copies the backup back bitwise, a kept backup buffer is reused, the out=
forms of road_merge / oft_merge equal the out-of-place ones, and a weight rewritten since the merge is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rotfunc
from rotfunc import OFTParams, RoadParams, oft_merge, quant, road_merge

N = 64


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(N, N), nn.Tanh(), nn.Linear(N, N))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    params = rotfunc.adapter_params(model)
    rotfunc.load_params(model, {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in params.items()})


CONFIGS = {
    "road": lambda: rotfunc.RoadConfig(variant="road_2", group_size=8, target_modules=["0", "2"]),
    "oft": lambda: rotfunc.OFTConfig(oft_block_size=16, target_modules=["0", "2"]),
    "randlora": lambda: rotfunc.RandLoraConfig(r=8, target_modules=["0", "2"]),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_merge_writes_into_the_weight_storage_and_unmerge_is_bitwise(method):
    model = _model()
    rotfunc.attach(model, CONFIGS[method]())
    _perturb(model)
    x = torch.randn(5, N, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = model(x)
    layer = model[0].base_layer
    tied = layer.weight.data  # another reference to the same storage, as a tied weight would be
    W0, b0, ptr = layer.weight.detach().clone(), layer.bias.detach().clone(), layer.weight.data_ptr()
    rotfunc.merge(model)
    assert layer.weight.data_ptr() == ptr  # merged in place, not a new tensor
    assert not torch.equal(tied, W0) and torch.equal(tied, layer.weight.detach())
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)
    rotfunc.unmerge(model)
    assert layer.weight.data_ptr() == ptr
    assert torch.equal(layer.weight, W0) and torch.equal(layer.bias, b0) and torch.equal(tied, W0)


def test_kept_buffer_is_reused_and_freed_by_default():
    model = _model()
    rotfunc.attach(model, CONFIGS["road"]())
    _perturb(model)
    W0 = model[0].base_layer.weight.detach().clone()
    buf = rotfunc.merge(model)["0"].original["data"]
    rotfunc.unmerge(model, keep_buffers=True)
    assert model[0].__dict__["_rotfunc_backup"] is buf
    again = rotfunc.merge(model)["0"].original["data"]
    assert again is buf  # the same backup tensor, no new allocation
    rotfunc.unmerge(model)
    assert "_rotfunc_backup" not in model[0].__dict__
    assert torch.equal(model[0].base_layer.weight, W0)


def test_a_weight_rewritten_while_merged_is_refused():
    model = _model()
    rotfunc.attach(model, CONFIGS["road"]())
    _perturb(model)
    rotfunc.merge(model)
    layer = model[2].base_layer
    layer.load_state_dict(nn.Linear(N, N).state_dict())  # writes into the same storage: the version moves
    kept = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="no longer holds the weight merge"):
        rotfunc.unmerge(model)
    assert torch.equal(layer.weight, kept)


def test_failing_in_place_merge_leaves_the_weight_bitwise():
    layer = nn.Linear(N, N)
    W0 = layer.weight.detach().clone()

    def half_then_raise(w, b, out=None):
        out.mul_(2.0)  # a partial write into the weight, then an error
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        quant.merge_into(layer, half_then_raise, in_place=True)
    assert torch.equal(layer.weight, W0)
    with pytest.raises(ValueError, match="non-finite"):
        quant.merge_into(layer, lambda w, b, out=None: (out.fill_(float("nan")), b), in_place=True, safe_merge=True)
    assert torch.equal(layer.weight, W0)


def test_out_forms_equal_the_out_of_place_merges():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(N, N, generator=g)
    p = RoadParams(torch.randn(N, generator=g), 1 + 0.1 * torch.randn(N, generator=g))
    out = torch.empty_like(W)
    got, _ = road_merge(p, W, None, variant="road_2", group_size=8, out=out)
    assert got is out and torch.equal(out, road_merge(p, W, None, variant="road_2", group_size=8)[0])
    for share in (False, True):
        q = OFTParams(0.1 * torch.randn(1 if share else 4, 16 * 15 // 2, generator=g))
        got = oft_merge(q, W, block_size=16, block_share=share, out=out)
        assert got is out
        torch.testing.assert_close(out, oft_merge(q, W, block_size=16, block_share=share), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="overlaps weight"):
        road_merge(p, W, None, variant="road_2", group_size=8, out=W)
    with pytest.raises(ValueError, match=r"shape=\(64, 32\)"):
        road_merge(p, W, None, variant="road_2", group_size=8, out=torch.empty(N, 32))
