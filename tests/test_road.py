"""Tests of rotfunc.road: PEFT differential tests against a float64 reference, properties, torch.func, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import peft
from peft.tuners.road import layer as peft_road

from rotfunc.adapter import Adapter, config_for_peft_type
from rotfunc.road import (
    VARIANTS,
    RoadConfig,
    RoadParams,
    apply_road,
    road_init,
    road_matrix,
    road_merge,
    road_unmerge,
)

# torch's own first use of forward-mode AD (decompositions_for_jvp) and of inductor calls torch.jit.script
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
GROUP_SIZES = [2, 4, 16]
OUT = 32


# --------------------------------------------------------------------------- float64 reference, independent


def ref_cols(params: RoadParams, variant: str, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, s) per output element in float64, by the paper's/PEFT's definitions, one element at a time."""
    t, a = params.theta.double(), params.alpha.double()
    n = t.shape[0]
    out = {"road_1": 2 * n, "road_2": n, "road_4": n // 2}[variant]
    h = gs // 2
    f, s = [], []
    for e in range(out):
        g, r = divmod(e, gs)
        if variant == "road_1":
            p = g * h + r % h
            f.append(a[p] * torch.cos(t[p]))
            s.append(a[p] * torch.sin(t[p]))
        elif variant == "road_2":
            f.append(a[e] * torch.cos(t[e]))
            s.append(a[e] * torch.sin(t[e]))
        else:
            pc, ps = g * 2 * gs + r, g * 2 * gs + gs + r
            f.append(a[pc] * torch.cos(t[pc]))
            s.append(a[ps] * torch.sin(t[ps]))
    return torch.stack(f), torch.stack(s)


def ref_matrix(params: RoadParams, variant: str, gs: int) -> torch.Tensor:
    f, s = ref_cols(params, variant, gs)
    out, h = f.shape[0], gs // 2
    R = torch.zeros(out, out, dtype=torch.float64)
    for g in range(out // gs):
        for k in range(h):
            i, j = g * gs + k, g * gs + k + h
            R[i, i], R[i, j], R[j, i], R[j, j] = f[i], -s[i], s[j], f[j]
    return R


def ref_block_dets(params: RoadParams, variant: str, gs: int) -> torch.Tensor:
    f, s = ref_cols(params, variant, gs)
    h = gs // 2
    f4, s4 = f.view(-1, 2, h), s.view(-1, 2, h)
    return (f4[:, 0] * f4[:, 1] + s4[:, 0] * s4[:, 1]).flatten()


def ref_block_fro2(params: RoadParams, variant: str, gs: int) -> torch.Tensor:
    f, s = ref_cols(params, variant, gs)
    h = gs // 2
    return (f.view(-1, 2, h) ** 2 + s.view(-1, 2, h) ** 2).sum(1).flatten()


def rand_params(out, variant, gs, dtype, gen, *, theta_std=1.0):
    n = {"road_1": out // 2, "road_2": out, "road_4": 2 * out}[variant]
    theta = torch.randn(n, generator=gen, dtype=torch.float64) * theta_std
    alpha = 1.0 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    return RoadParams(theta.to(dtype), alpha.to(dtype))


def assert_vs_ref(ours, peft_out, ref, dtype, scale=None):
    """rotfunc's error against the float64 reference is within 2x PEFT's own error, or 4 eps * scale.

    ``scale`` is the magnitude the rounding errors are relative to: max |ref| by default, max (|A| |B|) for a
    product A B (the textbook componentwise bound; it grows with the condition number of an inverse).
    """
    assert ours.dtype == dtype
    eps = torch.finfo(dtype).eps
    scale = ref.abs().max().item() if scale is None else scale
    err = (ours.double() - ref).abs().max().item()
    err_peft = (peft_out.double() - ref).abs().max().item()
    assert err <= max(2.0 * err_peft, 4.0 * eps * scale), (err, err_peft, eps * scale)


def clone_all(*ts):
    return [None if t is None else t.clone() for t in ts]


# ------------------------------------------------------------------------------------ differential vs PEFT


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs", GROUP_SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_apply_and_matrix_match_peft(variant, gs, dtype, gen):
    p = rand_params(OUT, variant, gs, dtype, gen)
    y = torch.randn(3, 2, OUT, generator=gen, dtype=torch.float64).to(dtype)
    R64 = ref_matrix(p, variant, gs)
    ref = y.double() @ R64.T

    ours = apply_road(p, y, variant=variant, group_size=gs)
    theirs = peft_road._apply_road(variant, gs, p.theta, p.alpha, y)
    assert ours.shape == y.shape
    assert_vs_ref(ours, theirs, ref, dtype)
    assert (ref - y.double()).abs().max() > 0.1  # non-identity params: the test can see a wrong rotation

    R = road_matrix(p, variant=variant, group_size=gs)
    R_peft = peft_road._get_delta_weight(variant, gs, p.theta, p.alpha)
    assert R.shape == (OUT, OUT) and R.dtype == dtype
    assert_vs_ref(R, R_peft, R64, dtype)
    if dtype == torch.float64:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-14)
        torch.testing.assert_close(R, R_peft, rtol=0, atol=1e-15)


def _peft_linear(out, inp, variant, gs, dtype, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=True).to(dtype)
    cfg = peft.RoadConfig(variant=variant, group_size=gs, init_weights=False)
    layer = peft_road.Linear(lin, "default", config=cfg)
    p = RoadParams(layer.road_theta["default"].detach().clone(), layer.road_alpha["default"].detach().clone())
    return layer, p


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs", GROUP_SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_match_peft_linear(variant, gs, dtype):
    layer, p = _peft_linear(OUT, 24, variant, gs, dtype, seed=1)
    base = layer.get_base_layer()
    assert p.theta.dtype == dtype
    W0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    R64 = ref_matrix(p, variant, gs)

    layer.merge()
    Wm_peft, bm_peft = base.weight.detach().clone(), base.bias.detach().clone()
    Wm, bm = road_merge(p, W0, b0, variant=variant, group_size=gs)
    assert_vs_ref(Wm, Wm_peft, R64 @ W0.double(), dtype)
    assert_vs_ref(bm, bm_peft, R64 @ b0.double(), dtype)

    # unmerge the same merged weights both ways; reference: exact float64 solve
    layer.unmerge()
    Wu_peft, bu_peft = base.weight.detach(), base.bias.detach()
    Rinv = torch.linalg.inv(R64)
    if (ref_block_dets(p, variant, gs).abs() <= torch.finfo(dtype).eps * ref_block_fro2(p, variant, gs)).any():
        # a block too ill-conditioned for this dtype (condition number >~ 1/eps): rotfunc refuses, and PEFT's
        # answer there is off by more than 1% of the weight's scale
        with pytest.raises(ValueError, match=r"too close to singular to invert in " + str(dtype)):
            road_unmerge(p, Wm_peft, bm_peft, variant=variant, group_size=gs)
        ref = Rinv @ Wm_peft.double()
        assert (Wu_peft.double() - ref).abs().max() > 0.01 * ref.abs().max()
        return
    Wu, bu = road_unmerge(p, Wm_peft, bm_peft, variant=variant, group_size=gs)
    sw, sb = (Rinv.abs() @ Wm_peft.double().abs()).max().item(), (Rinv.abs() @ bm_peft.double().abs()).max().item()
    assert_vs_ref(Wu, Wu_peft, Rinv @ Wm_peft.double(), dtype, sw)
    assert_vs_ref(bu, bu_peft, Rinv @ bm_peft.double(), dtype, sb)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_matches_get_peft_model(variant):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(5, 6)
    base_out = model(x)
    cfg = RoadConfig(variant=variant, group_size=4, init_weights=False, target_modules=["0", "2"])
    pm = peft.get_peft_model(model, peft.RoadConfig(**cfg.to_peft_dict()))
    params = {
        name: RoadParams(m.road_theta["default"].detach(), m.road_alpha["default"].detach())
        for name, m in pm.base_model.model.named_children()
        if hasattr(m, "road_theta")
    }
    assert sorted(params) == ["0", "2"]
    lin0, lin2 = pm.base_model.model[0].get_base_layer(), pm.base_model.model[2].get_base_layer()
    assert cfg.num_params(6, 8) == sum(t.numel() for t in params["0"])

    def ours(x):
        h = cfg.apply(params["0"], x, lin0, in_features=6, out_features=8)
        return cfg.apply(params["2"], torch.relu(h), lin2, in_features=8, out_features=8)

    with torch.no_grad():
        peft_out = pm(x)
        torch.testing.assert_close(ours(x), peft_out, rtol=1e-6, atol=1e-6)
        assert (peft_out - base_out).abs().max() > 1e-2  # the adapter does something
        w0, b0 = cfg.merge(params["0"], lin0.weight, lin0.bias)
        w2, b2 = cfg.merge(params["2"], lin2.weight, lin2.bias)
        merged_out = F.linear(torch.relu(F.linear(x, w0, b0)), w2, b2)
        torch.testing.assert_close(merged_out, peft_out, rtol=1e-5, atol=1e-5)
        pm.merge_adapter()
        torch.testing.assert_close(lin0.weight, w0, rtol=1e-5, atol=1e-6)
        u0, ub0 = cfg.unmerge(params["0"], w0, b0)
        pm.unmerge_adapter()
        torch.testing.assert_close(u0, lin0.weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ub0, lin0.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_apply_mixed_dtype_matches_peft_forward(variant):
    # fp32 adapter on a bf16 layer: PEFT rotates in the adapter dtype and casts back
    layer, p = _peft_linear(16, 8, variant, 4, torch.bfloat16, seed=4)
    layer.road_theta["default"].data = layer.road_theta["default"].data.float()
    layer.road_alpha["default"].data = layer.road_alpha["default"].data.float()
    p = RoadParams(p.theta.float(), p.alpha.float())
    x = torch.randn(3, 8).to(torch.bfloat16)
    cfg = RoadConfig(variant=variant, group_size=4)
    base = layer.get_base_layer()
    with torch.no_grad():
        ours = cfg.apply(p, x, base, in_features=8, out_features=16)
        theirs = layer(x)
    assert ours.dtype == torch.bfloat16
    ref = base(x).double() @ ref_matrix(p, variant, 4).T
    assert_vs_ref(ours, theirs, ref, torch.bfloat16)
    # merge with fp32 params into a bf16 weight, as PEFT casts its R to the weight dtype
    w, b = cfg.merge(p, base.weight.detach(), base.bias.detach())
    assert w.dtype == b.dtype == torch.bfloat16
    layer.merge()
    assert_vs_ref(w, base.weight.detach(), ref_matrix(p, variant, 4) @ base.weight.double(), torch.bfloat16)


def test_init_matches_peft(gen):
    for variant in VARIANTS:
        lin = nn.Linear(4, 16)
        torch.manual_seed(7)
        peft_cfg = peft.RoadConfig(variant=variant, group_size=8, init_weights=False)
        layer = peft_road.Linear(lin, "default", config=peft_cfg)
        torch.manual_seed(7)
        p = road_init(16, variant=variant, group_size=8, init_weights=False)
        torch.testing.assert_close(p.theta, layer.road_theta["default"].detach(), rtol=0, atol=0)
        torch.testing.assert_close(p.alpha, layer.road_alpha["default"].detach(), rtol=0, atol=0)
        ident = road_init(16, variant=variant, group_size=8, dtype=torch.float64)
        assert ident.theta.dtype == torch.float64
        assert bool((ident.theta == 0).all()) and bool((ident.alpha == 1).all())
        y = torch.randn(2, 16, dtype=torch.float64, generator=gen)
        torch.testing.assert_close(apply_road(ident, y, variant=variant, group_size=8), y, rtol=0, atol=0)
    a = road_init(16, variant="road_4", group_size=8, init_weights=False, generator=torch.Generator().manual_seed(1))
    b = road_init(16, variant="road_4", group_size=8, init_weights=False, generator=torch.Generator().manual_seed(1))
    c = road_init(16, variant="road_4", group_size=8, init_weights=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.theta, b.theta) and not torch.equal(a.theta, c.theta)
    assert abs(a.alpha.mean().item() - 1.0) < 0.5 and a.theta.std().item() > 0.2


# ------------------------------------------------------------------------------------------- properties

shapes = st.tuples(st.sampled_from(VARIANTS), st.sampled_from([2, 4, 6]), st.integers(1, 3), st.integers(0, 2**31 - 1))


@given(shapes)
def test_road1_unit_alpha_is_orthogonal_and_norm_preserving(case):
    _, gs, groups, seed = case
    gen = torch.Generator().manual_seed(seed)
    out = gs * groups
    theta = torch.randn(out // 2, generator=gen, dtype=torch.float64) * 3
    p = RoadParams(theta, torch.ones_like(theta))
    R = road_matrix(p, variant="road_1", group_size=gs)
    torch.testing.assert_close(R @ R.T, torch.eye(out, dtype=torch.float64), rtol=0, atol=1e-13)
    y = torch.randn(4, out, generator=gen, dtype=torch.float64)
    ry = apply_road(p, y, variant="road_1", group_size=gs)
    torch.testing.assert_close(ry.norm(dim=-1), y.norm(dim=-1), rtol=1e-13, atol=0)


@given(shapes)
def test_det_is_product_of_block_dets(case):
    variant, gs, groups, seed = case
    gen = torch.Generator().manual_seed(seed)
    p = rand_params(gs * groups, variant, gs, torch.float64, gen)
    det = torch.linalg.det(road_matrix(p, variant=variant, group_size=gs))
    expected = ref_block_dets(p, variant, gs).prod()
    torch.testing.assert_close(det, expected, rtol=1e-10, atol=1e-12)


@given(shapes, st.integers(1, 5), st.booleans())
def test_unmerge_inverts_merge_and_inputs_untouched(case, inp, with_bias):
    variant, gs, groups, seed = case
    gen = torch.Generator().manual_seed(seed)
    out = gs * groups
    p = rand_params(out, variant, gs, torch.float64, gen)
    fro2 = ref_block_fro2(p, variant, gs)
    assume(bool((ref_block_dets(p, variant, gs).abs() > 0.05 * fro2).all()))  # well conditioned blocks
    W = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    b = torch.randn(out, generator=gen, dtype=torch.float64) if with_bias else None
    y = torch.randn(2, out, generator=gen, dtype=torch.float64)
    saved = clone_all(p.theta, p.alpha, W, b, y)

    Wm, bm = road_merge(p, W, b, variant=variant, group_size=gs)
    Wu, bu = road_unmerge(p, Wm, bm, variant=variant, group_size=gs)
    R = road_matrix(p, variant=variant, group_size=gs)
    ry = apply_road(p, y, variant=variant, group_size=gs)
    torch.testing.assert_close(Wu, W, rtol=0, atol=1e-12)
    torch.testing.assert_close(Wm, R @ W, rtol=0, atol=1e-13)
    torch.testing.assert_close(ry, y @ R.T, rtol=0, atol=1e-13)
    if with_bias:
        torch.testing.assert_close(bu, b, rtol=0, atol=1e-12)
        x = torch.randn(2, inp, generator=gen, dtype=torch.float64)
        expected = apply_road(p, F.linear(x, W, b), variant=variant, group_size=gs)
        torch.testing.assert_close(F.linear(x, Wm, bm), expected, rtol=1e-12, atol=1e-12)
    else:
        assert bm is None and bu is None
    for before, after in zip(saved, (p.theta, p.alpha, W, b, y)):
        assert (before is None and after is None) or torch.equal(before, after)


def test_merged_linear_equals_apply_on_linear(gen):
    p = rand_params(8, "road_4", 4, torch.float64, gen)
    W, b = torch.randn(8, 5, dtype=torch.float64, generator=gen), torch.randn(8, dtype=torch.float64, generator=gen)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    Wm, bm = road_merge(p, W, b, variant="road_4", group_size=4)
    torch.testing.assert_close(F.linear(x, Wm, bm), apply_road(p, F.linear(x, W, b), variant="road_4", group_size=4))
    Wm2, none = road_merge(p, W, variant="road_4", group_size=4)
    assert none is None and torch.equal(Wm2, Wm)


# ---------------------------------------------------------------------------------------------- unmerge errors


def _singular_road2(dtype):
    p = rand_params(8, "road_2", 4, torch.float64, torch.Generator().manual_seed(0))
    theta = p.theta.clone()
    theta[7] = theta[5] + math.pi / 2  # group 1, pair 1 pairs rows 5 and 7
    return RoadParams(theta.to(dtype), p.alpha.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_unmerge_refuses_singular_road2_block(dtype):
    p = _singular_road2(dtype)
    W = torch.randn(8, 3, dtype=dtype)
    Wm, _ = road_merge(p, W, variant="road_2", group_size=4)
    msg = r"group 1, pair 1 \(rows 5 and 7\) has determinant det=-?[0-9.e+-]+.*1 of 4 blocks"
    with pytest.raises(ValueError, match=msg):
        road_unmerge(p, Wm, variant="road_2", group_size=4)
    with pytest.raises(ValueError, match=r"group 1, pair 1"):
        RoadConfig(variant="road_2", group_size=4).unmerge(p, Wm, None)
    # PEFT's own dense R is singular there
    assert abs(torch.linalg.det(peft_road._get_delta_weight("road_2", 4, p.theta, p.alpha))) < 1e-6


def test_unmerge_refuses_singular_road4_and_zero_scale():
    # road_4, out=4, group_size=2: theta viewed as (2 groups, 2, 2); group 1 holds rows 2 and 3, with cosine
    # angles theta[4:6] and sine angles theta[6:8]. Angles t and t + pi/2 in both give det = cos(pi/2) = 0.
    t = 0.3
    theta = torch.tensor([0.1, -0.2, 0.4, 0.5, t, t + math.pi / 2, t, t + math.pi / 2], dtype=torch.float64)
    p = RoadParams(theta, torch.full((8,), 1.5, dtype=torch.float64))
    msg = r"group 1, pair 0 \(rows 2 and 3\) has determinant det=(-?0|-?[0-9.]+e-1[5-8]),"
    with pytest.raises(ValueError, match=msg):
        road_unmerge(p, torch.eye(4, dtype=torch.float64), variant="road_4", group_size=2)
    p1 = RoadParams(torch.zeros(4), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"group 2, pair 0 \(rows 4 and 5\) has determinant det=0"):
        road_unmerge(p1, torch.eye(8), variant="road_1", group_size=2)


def test_unmerge_tolerance_follows_working_dtype():
    # angles differing by pi/2 - 1e-3: det/||B||^2 ~ 5e-4, fine in fp32/fp64, numerically singular in fp16/bf16
    theta = torch.tensor([0.3, 0.3 + math.pi / 2 - 1e-3], dtype=torch.float64)
    p64 = RoadParams(theta, torch.ones(2, dtype=torch.float64))
    W = torch.randn(2, 3, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        p = RoadParams(p64.theta.to(dtype), p64.alpha.to(dtype))
        Wu, _ = road_unmerge(p, W.to(dtype), variant="road_2", group_size=2)
        assert torch.isfinite(Wu).all()
    for dtype in (torch.float16, torch.bfloat16):
        p = RoadParams(p64.theta.to(dtype), p64.alpha.to(dtype))
        with pytest.raises(ValueError, match=rf"group 0, pair 0 .* invert in {dtype}"):
            road_unmerge(p, W.to(dtype), variant="road_2", group_size=2)
    # check=False skips the test (for vmap/compile) and gives inf/nan on exact singularity
    ps = _singular_road2(torch.float64)
    Wu, _ = road_unmerge(ps, torch.ones(8, 2, dtype=torch.float64), variant="road_2", group_size=4, check=False)
    assert Wu.abs().max() > 1e12 or not torch.isfinite(Wu).all()


# ------------------------------------------------------------------------------------------------ torch.func


def _gc_inputs(variant, gs, out, gen):
    p = rand_params(out, variant, gs, torch.float64, gen)
    return p.theta.requires_grad_(), p.alpha.requires_grad_()


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(variant, gen):
    gs, out = 4, 8
    theta, alpha = _gc_inputs(variant, gs, out, gen)
    y = torch.randn(2, out, dtype=torch.float64, generator=gen, requires_grad=True)
    W = torch.randn(out, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(out, dtype=torch.float64, generator=gen, requires_grad=True)
    kw = dict(variant=variant, group_size=gs)
    assert torch.autograd.gradcheck(lambda t, a, y: apply_road(RoadParams(t, a), y, **kw), (theta, alpha, y))
    assert torch.autograd.gradcheck(lambda t, a, W, b: road_merge(RoadParams(t, a), W, b, **kw), (theta, alpha, W, b))
    assert torch.autograd.gradcheck(
        lambda t, a, W, b: road_unmerge(RoadParams(t, a), W, b, **kw), (theta, alpha, W, b)
    )
    assert torch.autograd.gradcheck(lambda t, a: road_matrix(RoadParams(t, a), **kw), (theta, alpha))


@pytest.mark.parametrize("variant", VARIANTS)
def test_func_grad_matches_peft_autograd(variant, gen):
    gs, out = 4, 12
    p = rand_params(out, variant, gs, torch.float64, gen)
    y = torch.randn(3, out, dtype=torch.float64, generator=gen)
    w = torch.randn(3, out, dtype=torch.float64, generator=gen)

    def loss(params, y):
        return (apply_road(params, y, variant=variant, group_size=gs) * w).sum()

    g_params, g_y = torch.func.grad(loss, argnums=(0, 1))(p, y)
    assert isinstance(g_params, RoadParams)
    t, a, yy = p.theta.clone().requires_grad_(), p.alpha.clone().requires_grad_(), y.clone().requires_grad_()
    (peft_road._apply_road(variant, gs, t, a, yy) * w).sum().backward()
    torch.testing.assert_close(g_params.theta, t.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_params.alpha, a.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_y, w @ ref_matrix(p, variant, gs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap_over_params_and_inputs(variant, gen):
    gs, out, B = 4, 8, 3
    ps = [rand_params(out, variant, gs, torch.float64, gen) for _ in range(B)]
    stacked = RoadParams(torch.stack([p.theta for p in ps]), torch.stack([p.alpha for p in ps]))
    y = torch.randn(2, out, dtype=torch.float64, generator=gen)
    W = torch.randn(out, 5, dtype=torch.float64, generator=gen)
    b = torch.randn(out, dtype=torch.float64, generator=gen)
    kw = dict(variant=variant, group_size=gs)

    got = torch.func.vmap(lambda p: apply_road(p, y, **kw))(stacked)
    torch.testing.assert_close(got, torch.stack([apply_road(p, y, **kw) for p in ps]), rtol=0, atol=0)
    Wm, bm = torch.func.vmap(lambda p: road_merge(p, W, b, **kw))(stacked)
    loop = [road_merge(p, W, b, **kw) for p in ps]
    torch.testing.assert_close(Wm, torch.stack([m[0] for m in loop]), rtol=0, atol=0)
    torch.testing.assert_close(bm, torch.stack([m[1] for m in loop]), rtol=0, atol=0)
    Wu, bu = torch.func.vmap(lambda p, W, b: road_unmerge(p, W, b, check=False, **kw))(stacked, Wm, bm)
    torch.testing.assert_close(Wu, W.expand(B, -1, -1), rtol=0, atol=1e-10)
    with pytest.raises(RuntimeError, match=r"pass check=False under vmap"):
        torch.func.vmap(lambda p, W: road_unmerge(p, W, **kw))(stacked, Wm)
    got = torch.func.vmap(lambda p: road_matrix(p, **kw))(stacked)
    torch.testing.assert_close(got, torch.stack([road_matrix(p, **kw) for p in ps]), rtol=0, atol=0)

    # over inputs: the batch dim in the middle, params shared
    ys = torch.randn(2, B, out, dtype=torch.float64, generator=gen)
    got = torch.func.vmap(lambda y: apply_road(ps[0], y, **kw), in_dims=1, out_dims=1)(ys)
    loop = torch.stack([apply_road(ps[0], ys[:, i], **kw) for i in range(B)], dim=1)
    torch.testing.assert_close(got, loop, rtol=0, atol=0)
    Ws = torch.randn(B, out, 5, dtype=torch.float64, generator=gen)
    got = torch.func.vmap(lambda W: road_merge(ps[0], W, **kw)[0])(Ws)
    torch.testing.assert_close(got, torch.stack([road_merge(ps[0], Ws[i], **kw)[0] for i in range(B)]), rtol=0, atol=0)
    # both batched
    got = torch.func.vmap(lambda p, W: road_merge(p, W, **kw)[0])(stacked, Ws)
    torch.testing.assert_close(got, torch.stack([road_merge(ps[i], Ws[i], **kw)[0] for i in range(B)]), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_jvp_matches_finite_differences(variant, gen):
    gs, out = 4, 8
    p = rand_params(out, variant, gs, torch.float64, gen)
    tp = RoadParams(torch.randn_like(p.theta), torch.randn_like(p.alpha))
    y = torch.randn(2, out, dtype=torch.float64, generator=gen)
    ty = torch.randn_like(y)
    W = torch.randn(out, 3, dtype=torch.float64, generator=gen)
    tW = torch.randn_like(W)
    kw = dict(variant=variant, group_size=gs)

    def fd(f, primals, tangents, h=1e-6):
        plus = f(*[torch.utils._pytree.tree_map(lambda x, t: x + h * t, a, b) for a, b in zip(primals, tangents)])
        minus = f(*[torch.utils._pytree.tree_map(lambda x, t: x - h * t, a, b) for a, b in zip(primals, tangents)])
        return (plus - minus) / (2 * h)

    for f, primals, tangents in [
        (lambda p, y: apply_road(p, y, **kw), (p, y), (tp, ty)),
        (lambda p, W: road_merge(p, W, **kw)[0], (p, W), (tp, tW)),
        (lambda p, W: road_unmerge(p, W, **kw)[0], (p, W), (tp, tW)),
    ]:
        out_, tangent_out = torch.func.jvp(f, primals, tangents)
        torch.testing.assert_close(out_, f(*primals))
        torch.testing.assert_close(tangent_out, fd(f, primals, tangents), rtol=1e-7, atol=1e-7)


class _RoadLinear(nn.Module):
    def __init__(self, inp, out, variant, gs):
        super().__init__()
        self.base = nn.Linear(inp, out, dtype=torch.float64)
        p = road_init(out, variant=variant, group_size=gs, dtype=torch.float64)
        self.theta, self.alpha = nn.Parameter(p.theta), nn.Parameter(p.alpha)
        self.variant, self.gs = variant, gs

    def forward(self, x):
        return apply_road(RoadParams(self.theta, self.alpha), self.base(x), variant=self.variant, group_size=self.gs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_functional_call_and_grad(variant, gen):
    torch.manual_seed(0)
    m = _RoadLinear(5, 8, variant, 4)
    p = rand_params(8, variant, 4, torch.float64, gen)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    d = {"theta": p.theta, "alpha": p.alpha}
    out = torch.func.functional_call(m, d, (x,))
    expected = m.base(x).detach() @ ref_matrix(p, variant, 4).T
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (out - m(x)).abs().max() > 1e-3  # the module's own (identity) params were not used

    g = torch.func.grad(lambda d: torch.func.functional_call(m, d, (x,)).square().sum())(d)
    t, a = p.theta.clone().requires_grad_(), p.alpha.clone().requires_grad_()
    peft_road._apply_road(variant, 4, t, a, m.base(x).detach()).square().sum().backward()
    torch.testing.assert_close(g["theta"], t.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g["alpha"], a.grad, rtol=1e-12, atol=1e-12)


def test_compile_grad_fullgraph(gen):
    p = rand_params(16, "road_4", 8, torch.float32, gen)
    y = torch.randn(4, 16, generator=gen)
    W = torch.randn(16, 3, generator=gen)
    kw = dict(variant="road_4", group_size=8)

    def loss(params, y, W):
        return apply_road(params, y, **kw).square().sum() + road_merge(params, W, **kw)[0].square().sum()

    compiled = torch.compile(torch.func.grad(loss), fullgraph=True)
    got = compiled(p, y, W)
    expected = torch.func.grad(loss)(p, y, W)
    assert isinstance(got, RoadParams)
    torch.testing.assert_close(got.theta, expected.theta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.alpha, expected.alpha, rtol=1e-5, atol=1e-5)
    assert got.theta.abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_autograd_path_matches_peft_and_differentiates_twice(variant, gen):
    """Plain autograd takes rotfunc's own backward (_RoadMix): the grads equal PEFT's autograd in float64, and
    its backward is itself differentiable (create_graph: gradgradcheck)."""
    gs, out = 4, 12
    p = rand_params(out, variant, gs, torch.float64, gen)
    y = torch.randn(3, 2, out, dtype=torch.float64, generator=gen)
    w = torch.randn(3, 2, out, dtype=torch.float64, generator=gen)
    grads = []
    for f in (lambda t, a, y: apply_road(RoadParams(t, a), y, variant=variant, group_size=gs),
              lambda t, a, y: peft_road._apply_road(variant, gs, t, a, y)):
        leaves = [p.theta.clone().requires_grad_(), p.alpha.clone().requires_grad_(), y.clone().requires_grad_()]
        (f(*leaves) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    theta, alpha = _gc_inputs(variant, gs, 8, gen)
    yy = torch.randn(2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda t, a, y: apply_road(RoadParams(t, a), y, variant=variant, group_size=gs), (theta, alpha, yy)
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_autograd_uses_the_coefficient_op_and_matches_peft(variant, gen):
    """Under torch.compile (no torch.func transform) the mixing coefficients come from one opaque op, so inductor
    cannot re-evaluate cos/sin per output element; forward and grads still equal PEFT's float64 autograd."""
    gs, out = 8, 32
    p = rand_params(out, variant, gs, torch.float64, gen)
    y = torch.randn(5, out, dtype=torch.float64, generator=gen)
    w = torch.randn(5, out, dtype=torch.float64, generator=gen)

    def loss(t, a, y):
        return (apply_road(RoadParams(t, a), y, variant=variant, group_size=gs) * w).sum()

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch.compile(loss, backend=capture, fullgraph=True)(p.theta, p.alpha, y)
    assert "rotfunc.road_pq" in graphs[0]
    grads = []
    for f in (torch.compile(loss, fullgraph=True),
              lambda t, a, y: (peft_road._apply_road(variant, gs, t, a, y) * w).sum()):
        leaves = [p.theta.clone().requires_grad_(), p.alpha.clone().requires_grad_(), y.clone().requires_grad_()]
        f(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_coefficient_ops_pass_opcheck_and_vmap(variant, gen):
    from rotfunc.road import _cols, _forward_pq

    gs = 8
    p = rand_params(16, variant, gs, torch.float64, gen)
    theta, alpha = p.theta.requires_grad_(), p.alpha.requires_grad_()
    torch.library.opcheck(torch.ops.rotfunc.road_pq.default, (theta, alpha, variant, gs))
    pq = _forward_pq(*_cols(RoadParams(theta, alpha), variant=variant, group_size=gs))
    gp, gq = torch.randn_like(pq[0]), torch.randn_like(pq[1])
    expected = torch.autograd.grad(pq, (theta, alpha), (gp, gq))
    got = torch.ops.rotfunc.road_pq_backward(theta.detach(), alpha.detach(), gp, gq, variant, gs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.rotfunc.road_pq_backward.default, (theta.detach(), alpha.detach(), gp, gq,
                                                                       variant, gs))
    stacked = torch.stack([theta.detach(), theta.detach() * 0.5]), torch.stack([alpha.detach(), alpha.detach()])
    batched = torch.vmap(lambda t, a: torch.ops.rotfunc.road_pq(t, a, variant, gs))(*stacked)
    for k in range(2):
        one = torch.ops.rotfunc.road_pq(stacked[0][k], stacked[1][k], variant, gs)
        torch.testing.assert_close(batched[0][k], one[0], rtol=0, atol=0)
        torch.testing.assert_close(batched[1][k], one[1], rtol=0, atol=0)
    gs_ = torch.stack([gp, 2 * gp]), torch.stack([gq, gq])
    batched = torch.vmap(lambda t, a, x, z: torch.ops.rotfunc.road_pq_backward(t, a, x, z, variant, gs))(*stacked, *gs_)
    for k in range(2):
        one = torch.ops.rotfunc.road_pq_backward(stacked[0][k], stacked[1][k], gs_[0][k], gs_[1][k], variant, gs)
        torch.testing.assert_close(batched[0][k], one[0], rtol=0, atol=0)
        torch.testing.assert_close(batched[1][k], one[1], rtol=0, atol=0)


def test_dtype_preserved_and_batch_dims(gen):
    for dtype in DTYPES:
        p = rand_params(8, "road_2", 4, dtype, gen)
        for shape in [(8,), (2, 8), (2, 3, 1, 8)]:
            y = torch.randn(shape, generator=gen).to(dtype)
            out = apply_road(p, y, variant="road_2", group_size=4)
            assert out.dtype == dtype and out.shape == y.shape
        W = torch.randn(8, 3, generator=gen).to(dtype)
        Wm, bm = road_merge(p, W, torch.zeros(8, dtype=dtype), variant="road_2", group_size=4)
        assert Wm.dtype == bm.dtype == dtype and Wm.shape == W.shape


# ------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_values():
    p = road_init(8, variant="road_1", group_size=4)
    y = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"group_size=3 must be a positive even integer"):
        apply_road(p, y, variant="road_1", group_size=3)
    with pytest.raises(ValueError, match=r"group_size=0 must be"):
        road_init(8, variant="road_1", group_size=0)
    with pytest.raises(ValueError, match=r"out_features=12 is not divisible by group_size=8"):
        apply_road(road_init(12, variant="road_1", group_size=4), torch.randn(12), variant="road_1", group_size=8)
    with pytest.raises(ValueError, match=r"out_features=12 is not divisible by group_size=8"):
        road_init(12, variant="road_2", group_size=8)
    with pytest.raises(TypeError, match=r"group_size=4.0"):
        apply_road(p, y, variant="road_1", group_size=4.0)
    with pytest.raises(TypeError, match=r"group_size=True"):
        RoadConfig(group_size=True)
    with pytest.raises(ValueError, match=r"variant='road_3' is not supported"):
        apply_road(p, y, variant="road_3", group_size=4)
    msg = r"params.theta has shape=\(4,\), expected \(8,\) \(variant='road_2', out_features=8\)"
    with pytest.raises(ValueError, match=msg):
        apply_road(p, y, variant="road_2", group_size=4)
    with pytest.raises(ValueError, match=r"params.alpha has shape=\(3,\), expected \(4,\)"):
        apply_road(RoadParams(p.theta, torch.ones(3)), y, variant="road_1", group_size=4)
    with pytest.raises(TypeError, match=r"params.theta.dtype=torch.float32 differs from y.dtype=torch.float64"):
        apply_road(p, y.double(), variant="road_1", group_size=4)
    msg = r"params.theta.dtype=torch.float64 differs from params.alpha.dtype=torch.float32"
    with pytest.raises(TypeError, match=msg):
        apply_road(RoadParams(p.theta.double(), p.alpha), y, variant="road_1", group_size=4)
    with pytest.raises(ValueError, match=r"params.theta.device=cpu differs from y.device=meta"):
        apply_road(p, y.to("meta"), variant="road_1", group_size=4)
    with pytest.raises(TypeError, match=r"y.dtype=torch.int64 is not a floating-point dtype"):
        apply_road(p, torch.ones(8, dtype=torch.long), variant="road_1", group_size=4)
    with pytest.raises(TypeError, match=r"params must be a RoadParams"):
        apply_road((p.theta,), y, variant="road_1", group_size=4)
    W = torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"weight has shape=\(8,\), expected a 2-D"):
        road_merge(p, torch.randn(8), variant="road_1", group_size=4)
    with pytest.raises(ValueError, match=r"bias has shape=\(7,\), expected \(8,\)"):
        road_merge(p, W, torch.randn(7), variant="road_1", group_size=4)
    with pytest.raises(ValueError, match=r"params.theta has shape=\(4,\), expected \(6,\)"):
        road_unmerge(p, torch.randn(12, 3), variant="road_1", group_size=4)
    with pytest.raises(TypeError, match=r"params.theta.dtype=torch.float32 differs from weight.dtype=torch.float16"):
        road_merge(p, W.half(), variant="road_1", group_size=4)
    with pytest.raises(TypeError, match=r"weight.dtype=torch.float32 differs from bias.dtype=torch.float64"):
        road_unmerge(p, W, torch.zeros(8, dtype=torch.float64), variant="road_1", group_size=4)
    with pytest.raises(ValueError, match=r"params.theta.device=cpu differs from weight.device=meta"):
        road_merge(p, W.to("meta"), variant="road_1", group_size=4)
    with pytest.raises(ValueError, match=r"params.theta has shape=\(5,\), which is not \(2\*out_features,\)"):
        road_matrix(RoadParams(torch.zeros(5), torch.ones(5)), variant="road_4", group_size=2)
    with pytest.raises(ValueError, match=r"out_features=0 must be a positive int"):
        road_init(0, variant="road_1", group_size=2)
    with pytest.raises(TypeError, match=r"dtype=torch.int32 is not a floating-point dtype"):
        road_init(4, variant="road_1", group_size=2, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------- config


def test_config_defaults_and_validation_match_peft():
    ours, theirs = RoadConfig(), peft.RoadConfig()
    for name in ("variant", "group_size", "init_weights", "target_modules"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.exclude_modules is None and RoadConfig.peft_type == "ROAD" == theirs.peft_type.value
    assert isinstance(ours, Adapter)
    assert config_for_peft_type("road") is RoadConfig
    for bad in (0, -2, 3):
        with pytest.raises(ValueError, match=rf"group_size={bad} must be a positive even integer"):
            RoadConfig(group_size=bad)
        with pytest.raises(ValueError, match="group_size"):
            peft.RoadConfig(group_size=bad)  # PEFT refuses the same values
    with pytest.raises(ValueError, match=r"variant='road_8' is not supported"):
        RoadConfig(variant="road_8")
    with pytest.raises(TypeError, match=r"init_weights=1 must be a bool"):
        RoadConfig(init_weights=1)
    with pytest.raises(TypeError, match=r"target_modules=3 must be None"):
        RoadConfig(target_modules=3)
    cfg = RoadConfig(target_modules=["q", "v", "q"])
    assert cfg.target_modules == frozenset({"q", "v"}) and hash(cfg) == hash(RoadConfig(target_modules=("v", "q")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.group_size = 8
    # PEFT rejects out_features not divisible by group_size when it builds the layer; so do we
    with pytest.raises(ValueError, match="divisible by group_size"):
        peft_road.Linear(nn.Linear(4, 12), "default", config=peft.RoadConfig(group_size=8))
    with pytest.raises(ValueError, match=r"out_features=12 is not divisible by group_size=8"):
        RoadConfig(group_size=8).init(4, 12)
    with pytest.raises(ValueError, match=r"out_features=12 is not divisible by group_size=8"):
        RoadConfig(group_size=8).num_params(4, 12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_protocol_methods(variant, gen):
    cfg = RoadConfig(variant=variant, group_size=4, init_weights=False)
    p = cfg.init(3, 8, dtype=torch.float64, generator=gen)
    layer = peft_road.Linear(nn.Linear(3, 8), "default", config=peft.RoadConfig(variant=variant, group_size=4))
    peft_count = sum(t.numel() for name, t in layer.named_parameters() if "road_" in name)
    assert cfg.num_params(3, 8) == peft_count == {"road_1": 8, "road_2": 16, "road_4": 32}[variant]
    assert p.theta.numel() + p.alpha.numel() == peft_count
    assert cfg.init_shared([(8, 3)]) is None
    lin = nn.Linear(3, 8, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    out = cfg.apply(p, x, lin, in_features=3, out_features=8, training=True, generator=gen)
    torch.testing.assert_close(out, lin(x) @ ref_matrix(p, variant, 4).T)
    w, b = cfg.merge(p, lin.weight.detach(), lin.bias.detach())
    torch.testing.assert_close(F.linear(x, w, b), out)
    w0, b0 = cfg.unmerge(p, w, b)
    torch.testing.assert_close(w0, lin.weight.detach())
    torch.testing.assert_close(b0, lin.bias.detach())
    with pytest.raises(ValueError, match=r"base\(x\) has shape=\(2, 8\), expected last dim out_features=16"):
        cfg.apply(p, x, lin, in_features=3, out_features=16)


def test_peft_dict_round_trip(tmp_path):
    cfg = RoadConfig(variant="road_4", group_size=32, init_weights=False, target_modules=["q_proj", "v_proj"])
    d = cfg.to_peft_dict()
    assert d == {
        "peft_type": "ROAD",
        "variant": "road_4",
        "group_size": 32,
        "init_weights": False,
        "target_modules": ["q_proj", "v_proj"],
    }
    theirs = peft.RoadConfig(**d)
    theirs.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "base_model_name_or_path" in saved and "peft_version" in saved
    assert RoadConfig.from_peft_dict(saved) == cfg
    assert RoadConfig.from_peft_dict(theirs.to_dict()) == cfg  # enum peft_type and a set of modules
    assert RoadConfig.from_peft_dict({}) == RoadConfig()
    assert RoadConfig(target_modules=".*attn.*", exclude_modules=["x"]).to_peft_dict()["exclude_modules"] == ["x"]
    with pytest.raises(ValueError, match=r"unknown RoadConfig config key\(s\) \['r', 'zzz'\]"):
        RoadConfig.from_peft_dict({**saved, "zzz": 1, "r": 8})
    with pytest.raises(ValueError, match=r"peft_type='LORA' is not 'ROAD'"):
        RoadConfig.from_peft_dict({**saved, "peft_type": "LORA"})


def test_benchmark_quick_rows():
    from benchmarks import road as bench

    rows = bench.rows(quick=True)
    assert len(rows) >= 3
    for r in rows:
        assert {"name", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "target", "met"} <= set(r)
        assert r["rotfunc_s"] > 0
