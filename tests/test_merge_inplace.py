"""Float merges through the shims write into the weight's own storage: the same storage holds W' while merged
(tied references see it), unmerge copies the backup back bitwise, a kept backup buffer is reused, the out=
forms of road_merge / oft_merge equal the out-of-place ones, their in-place forms (out=weight, backup=) save the
original on the way, over several pieces of rows, and leave the weight as it was when interrupted, and a weight
rewritten since the merge is refused."""

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
    whole = road_merge(RoadParams(*(t.clone().requires_grad_() for t in p)), W, None, variant="road_2", group_size=8)
    assert got is out and torch.equal(out, whole[0].detach())  # the whole-tensor (autograd) form
    for share in (False, True):
        q = OFTParams(0.1 * torch.randn(1 if share else 4, 16 * 15 // 2, generator=g))
        got = oft_merge(q, W, block_size=16, block_share=share, out=out)
        assert got is out
        whole = oft_merge(OFTParams(q.q.clone().requires_grad_()), W, block_size=16, block_share=share)
        torch.testing.assert_close(out, whole.detach(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="overlaps weight"):
        road_merge(p, W, None, variant="road_2", group_size=8, out=W)
    with pytest.raises(ValueError, match=r"shape=\(64, 32\)"):
        road_merge(p, W, None, variant="road_2", group_size=8, out=torch.empty(N, 32))


@pytest.mark.parametrize("rows", [80, 2048])  # 2048 x 4096 fp32 = 32 MiB: the huge-page advice applies
def test_out_of_place_merges_without_autograd_go_piece_by_piece_bitwise(monkeypatch, rows):
    """Eagerly without autograd, road_merge/road_unmerge and oft_merge/oft_unmerge write their new result piece by
    piece into a fresh buffer (rotfunc._memory.writes_out); with grad flowing they take the whole-tensor ops. Both
    give the same values (RoAD bitwise: the same elementwise operations), both match float64, and inputs are
    untouched."""
    from rotfunc import _memory, oft_unmerge, road_unmerge

    taken = []
    fresh = _memory.fresh_like
    monkeypatch.setattr(rotfunc.road, "fresh_like", lambda t: taken.append("road") or fresh(t))
    monkeypatch.setattr(rotfunc.oft, "fresh_like", lambda t: taken.append("oft") or fresh(t))
    g = torch.Generator().manual_seed(6)
    in_f = 24 if rows == 80 else 4096
    W = torch.randn(rows, in_f, generator=g)
    W0 = W.clone()
    p = RoadParams(0.3 * torch.randn(rows, generator=g), 1 + 0.1 * torch.randn(rows, generator=g))  # well conditioned
    kw = dict(variant="road_2", group_size=16)
    fast = road_merge(p, W, None, **kw)[0]
    slow = road_merge(RoadParams(*(t.clone().requires_grad_() for t in p)), W, None, **kw)[0]
    assert taken == ["road"] and fast.is_contiguous() and torch.equal(W, W0)
    assert torch.equal(fast, slow.detach())
    R64 = rotfunc.road_matrix(RoadParams(p.theta.double(), p.alpha.double()), **kw)
    torch.testing.assert_close(fast.double(), R64 @ W.double(), rtol=1e-5, atol=1e-5)
    taken.clear()
    back = road_unmerge(p, fast, None, **kw)[0]
    assert taken == ["road"]
    slow_back = road_unmerge(RoadParams(*(t.clone().requires_grad_() for t in p)), fast, None, **kw)[0]
    assert torch.equal(back, slow_back.detach())
    torch.testing.assert_close(back, W, rtol=1e-5, atol=1e-5)
    taken.clear()

    b = 8 if rows == 80 else 64
    q = OFTParams(0.8 / b * torch.randn(in_f // b, b * (b - 1) // 2, generator=g))  # ||Q||_2 about 0.2
    fast = oft_merge(q, W, block_size=b)
    slow = oft_merge(OFTParams(q.q.clone().requires_grad_()), W, block_size=b)
    assert taken == ["oft"] and torch.equal(W, W0)
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)
    M64 = rotfunc.oft_matrix(OFTParams(q.q.double()), in_features=in_f, block_size=b)
    torch.testing.assert_close(fast.double(), W.double() @ M64.mT, rtol=1e-5, atol=1e-5)
    taken.clear()
    back = oft_unmerge(q, fast, block_size=b)
    assert taken == ["oft"]
    torch.testing.assert_close(back, oft_unmerge(OFTParams(q.q.clone().requires_grad_()), fast, block_size=b).detach(),
                               rtol=0, atol=0)
    torch.testing.assert_close(back, W, rtol=1e-5, atol=1e-5)


# ------------------------------------------------- merges in place with a backup (one pass over the weight)

ROAD_VARIANTS = {"road_1": 0.5, "road_2": 1, "road_4": 2}


def _road_params(variant, out_features, g):
    n = int(out_features * ROAD_VARIANTS[variant])
    return RoadParams(torch.randn(n, generator=g), 1 + 0.3 * torch.randn(n, generator=g))


# (chunk bytes, out, in, group size) for RoAD: pieces of 2 of a group's 8 row pairs (3 fit; 2 divides 8), and pieces of
# 2 whole groups out of 5 (the last one 1)
ROAD_PIECES = {"pairs": (3 * 2 * 24 * 4, 80, 24, 16), "groups": (2 * 16 * 24 * 4, 80, 24, 16)}


@pytest.mark.parametrize("variant", list(ROAD_VARIANTS))
@pytest.mark.parametrize("pieces", list(ROAD_PIECES))
def test_road_merge_in_place_over_several_pieces(monkeypatch, variant, pieces):
    chunk, out_f, in_f, gs = ROAD_PIECES[pieces]
    monkeypatch.setattr(rotfunc.road, "_CHUNK_BYTES", chunk)
    g = torch.Generator().manual_seed(4)
    W, b = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
    p = _road_params(variant, out_f, g)
    ref = road_merge(p, W, b, variant=variant, group_size=gs)
    R64 = rotfunc.road_matrix(RoadParams(p.theta.double(), p.alpha.double()), variant=variant, group_size=gs)
    w, backup = W.clone(), torch.empty_like(W)
    got_w, got_b = road_merge(p, w, b, variant=variant, group_size=gs, out=w, backup=backup)
    assert got_w is w and torch.equal(backup, W)
    assert torch.equal(w, ref[0]) and torch.equal(got_b, ref[1])  # the same operations as the out-of-place merge
    torch.testing.assert_close(w.double(), R64 @ W.double(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(w, W)


@pytest.mark.parametrize("share", [False, True])
def test_oft_merge_in_place_over_several_pieces(monkeypatch, share):
    monkeypatch.setattr(rotfunc.oft, "_CHUNK_BYTES", 7 * 64 * 4)  # pieces of 7 rows of 100: the last one 2
    g = torch.Generator().manual_seed(5)
    W = torch.randn(100, 64, generator=g)
    q = OFTParams(0.2 * torch.randn(1 if share else 4, 16 * 15 // 2, generator=g))
    M64 = rotfunc.oft_matrix(OFTParams(q.q.double()), in_features=64, block_size=16, block_share=share)
    w, backup = W.clone(), torch.empty_like(W)
    got = oft_merge(q, w, block_size=16, block_share=share, out=w, backup=backup)
    assert got is w and torch.equal(backup, W)
    torch.testing.assert_close(w.double(), W.double() @ M64.mT, rtol=1e-6, atol=1e-6)
    assert not torch.equal(w, W)


def test_interrupted_merges_in_place_leave_the_weight_bitwise(monkeypatch):
    g = torch.Generator().manual_seed(6)
    W = torch.randn(80, 24, generator=g)
    pieces = rotfunc.road._pieces
    # three good pieces, then one that is not a tensor (AttributeError): the first three were merged in place
    monkeypatch.setattr(rotfunc.road, "_pieces", lambda *a: pieces(*a)[:3] + (None,))
    monkeypatch.setattr(rotfunc.road, "_CHUNK_BYTES", 3 * 2 * 24 * 4)  # 20 pieces
    w = W.clone()
    with pytest.raises(AttributeError):
        road_merge(_road_params("road_2", 80, g), w, None, variant="road_2", group_size=16, out=w,
                   backup=torch.empty_like(W))
    assert torch.equal(w, W)

    monkeypatch.setattr(rotfunc.oft, "_CHUNK_BYTES", 7 * 64 * 4)
    blocks = torch.linalg.qr(torch.randn(4, 16, 16, generator=g))[0]
    calls, bmm = [], torch.bmm

    def bmm_failing_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return bmm(*a, **kw)

    monkeypatch.setattr(torch, "bmm", bmm_failing_third)
    W = torch.randn(100, 64, generator=g)
    w = W.clone()
    with pytest.raises(RuntimeError, match="interrupted"):
        rotfunc.oft._block_matmul_rows(w, blocks, 16, w, torch.empty_like(W))
    assert len(calls) == 3 and torch.equal(w, W)


def test_merge_into_calls_a_backup_taking_merge_fn_in_place():
    layer = nn.Linear(N, N)
    W0 = layer.weight.detach().clone()
    seen = {}

    def double(w, b, out=None, backup=None):
        seen.update(w=w, out=out)
        backup.copy_(w)
        return torch.mul(backup, 2.0, out=out), b

    record = quant.merge_into(layer, double, in_place=True)
    assert seen["w"].data_ptr() == seen["out"].data_ptr() == layer.weight.data_ptr()
    assert torch.equal(layer.weight, 2 * W0)
    quant.restore(layer, record)
    assert torch.equal(layer.weight, W0)

    def fails_untouched(w, b, out=None, backup=None):
        raise RuntimeError("boom")  # before saving anything: the backup holds no copy to put back

    with pytest.raises(RuntimeError, match="boom"):
        quant.merge_into(layer, fails_untouched, in_place=True)
    assert torch.equal(layer.weight, W0)


def test_backup_needs_a_merge_in_place():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(N, N, generator=g)
    p = _road_params("road_2", N, g)
    with pytest.raises(ValueError, match="pass out=weight"):
        road_merge(p, W, None, variant="road_2", group_size=8, out=torch.empty_like(W), backup=torch.empty_like(W))
    with pytest.raises(ValueError, match="overlaps weight"):
        road_merge(p, W, None, variant="road_2", group_size=8, out=W, backup=W[:, :])
    with pytest.raises(ValueError, match="pass out=weight"):
        oft_merge(OFTParams(torch.zeros(4, 120)), W, block_size=16, backup=torch.empty_like(W))
