"""RandLoRA: bit-identical bases, differential tests against PEFT, torch.func transforms, properties, errors."""

from __future__ import annotations

import dataclasses
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, reject, settings
from hypothesis import strategies as st
from torch import nn

# torch itself: torch.func.jvp imports torch._decomp.decompositions_for_jvp and inductor imports modules that
# call torch.jit.script / script_method at import time, which warn in torch 2.13.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

from rotfunc.adapter import REGISTRY, Adapter, config_for_peft_type
from rotfunc.randlora import (
    RandLoraBases,
    RandLoraConfig,
    RandLoraParams,
    apply_randlora,
    randlora_bases,
    randlora_delta,
    randlora_dims,
    randlora_init,
    randlora_merge,
    randlora_unmerge,
)

# (in_features, out_features): in < out, in > out, in == out.
LAYERS = {"up": (16, 48), "down": (48, 16), "sq": (32, 32)}
R = 5  # 16 / 5 and 32 / 5 are not integers: exercises the ceil in num_bases


def tol(dtype: torch.dtype) -> float:
    """Error allowed relative to the reference's largest magnitude, from the dtype's eps alone."""
    return 64 * torch.finfo(dtype).eps


def assert_close_to(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, scale=None) -> None:
    """Max error relative to ``scale`` (default: the reference's largest magnitude) within ``tol(dtype)``."""
    ref = ref.double()
    scale = ref.abs().max().clamp_min(1e-30) if scale is None else scale
    err = (actual.double() - ref).abs().max() / scale
    assert err <= tol(dtype), f"relative error {err.item():.3g} > {tol(dtype):.3g} for {dtype}"


class Net(nn.Module):
    """Linear layers named after LAYERS (or given shapes), applied independently."""

    def __init__(self, layers: dict[str, tuple[int, int]], dtype=torch.float32):
        super().__init__()
        for name, (i, o) in layers.items():
            setattr(self, name, nn.Linear(i, o, dtype=dtype))
        self.names = list(layers)

    def forward(self, x):
        return [getattr(self, n)(x[..., : getattr(self, n).in_features]) for n in self.names]


def peft_model(layers=LAYERS, *, r=R, dtype=torch.float32, autocast=True, **kw):
    torch.manual_seed(0)
    net = Net(layers, dtype=dtype)
    cfg = peft.RandLoraConfig(r=r, target_modules=list(layers), **kw)
    return peft.get_peft_model(net, cfg, autocast_adapter_dtype=autocast)


def peft_bases(pm) -> RandLoraBases:
    return RandLoraBases(pm.base_model.randlora_A["default"], pm.base_model.randlora_B["default"])


def randomize(pm, seed=1) -> dict[str, RandLoraParams]:
    """Random non-identity lambda/gamma in every PEFT layer; the same values as rotfunc params."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in LAYERS if hasattr(pm.base_model.model, "up") else pm.base_model.model.names:
        layer = getattr(pm.base_model.model, name)
        lam, gam = layer.randlora_lambda["default"], layer.randlora_gamma["default"]
        with torch.no_grad():
            lam.copy_(torch.randn(lam.shape, generator=g))
            gam.copy_(torch.rand(gam.shape, generator=g) + 0.5)
        out[name] = RandLoraParams(lam.detach().clone(), gam.detach().clone())
    return out


def ref_delta(params, bases, i, o, scaling) -> torch.Tensor:
    """Independent float64 reference of PEFT's delta: pair B's base-major column p with S's rank-major row p."""
    lam, gam = (t.double() for t in params)
    lo, hi = min(i, o), max(i, o)
    r, nb = lam.shape
    A, B = bases.A.double()[:, 0, :lo], bases.B.double()[:hi, :nb, :]
    M = torch.zeros(hi, lo, dtype=torch.float64)
    for p in range(r * nb):
        b, k = divmod(p, r)  # B flattened (base, rank)
        k2, b2 = divmod(p, nb)  # lambda * A * gamma flattened (rank, base)
        M += torch.outer(B[:, b, k], lam[k2, b2] * A[k2] * gam[b2])
    return scaling * (M if i <= o else M.T)


@pytest.fixture(scope="module")
def setup():
    pm = peft_model()
    params = randomize(pm)
    return pm, peft_bases(pm), params


# ------------------------------------------------------------------------------------------------ bases


SHAPE_SETS = [
    LAYERS,  # mixed in/out across layers: max (48, 48)
    {"a": (24, 40), "b": (40, 8)},  # element-wise max (40, 40)
    {"a": (7, 3)},  # r > min_dim: one base
    {"a": (64, 20), "b": (12, 30)},  # (30, 64) -> max 64, min 30
]


@pytest.mark.parametrize("mode", ["dense", "sparse", "very_sparse"])
@pytest.mark.parametrize("case", range(len(SHAPE_SETS)))
def test_bases_bit_identical_to_peft(case, mode):
    layers = SHAPE_SETS[case]
    key = [0, 1, 12345, 2**40 + 3][case]
    r = [R, 8, 4, 6][case]
    kw = {mode: True} if mode != "dense" else {}
    pm = peft_model(layers, r=r, projection_prng_key=key, **kw)
    theirs = peft_bases(pm)
    shapes = [(o, i) for i, o in layers.values()]
    max_dim, min_dim = randlora_dims(shapes)
    ours = randlora_bases(key, r=r, max_dim=max_dim, min_dim=min_dim, **kw)
    assert ours.A.dtype == theirs.A.dtype == torch.float32
    assert torch.equal(ours.A, theirs.A) and torch.equal(ours.B, theirs.B)
    cfg = RandLoraConfig(r=r, projection_prng_key=key, target_modules=list(layers), **kw)
    shared = cfg.init_shared(shapes)
    assert torch.equal(shared.A, theirs.A) and torch.equal(shared.B, theirs.B)
    if mode != "dense":
        assert torch.unique(ours.B).numel() == 3 and torch.unique(ours.A).numel() <= 3  # ternary, scaled
    # A different key gives different bases.
    other = randlora_bases(key + 1, r=r, max_dim=max_dim, min_dim=min_dim, **kw)
    assert not torch.equal(other.B, ours.B)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("model_dtype,autocast", [(torch.float64, True), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_bases_dtype_as_peft(model_dtype, autocast, mode):
    """PEFT casts the bases to the layer dtype (then upcasts half to float32): init_shared(dtype=layer dtype)."""
    kw = {"sparse": True} if mode == "sparse" else {}
    pm = peft_model(dtype=model_dtype, autocast=autocast, projection_prng_key=3, **kw)
    theirs = peft_bases(pm)
    cfg = RandLoraConfig(r=R, projection_prng_key=3, **kw)
    ours = cfg.init_shared([(o, i) for i, o in LAYERS.values()], dtype=model_dtype)
    assert ours.A.dtype == model_dtype
    assert torch.equal(ours.A.to(theirs.A.dtype), theirs.A) and torch.equal(ours.B.to(theirs.B.dtype), theirs.B)
    if mode == "dense":  # dense bases are exact bfloat16 values: the dtype never changes them
        plain = cfg.init_shared([(o, i) for i, o in LAYERS.values()])
        assert torch.equal(plain.A.to(theirs.A.dtype), theirs.A) and torch.equal(plain.B.to(theirs.B.dtype), theirs.B)


def test_dims():
    assert randlora_dims([(48, 16), (16, 48), (32, 32)]) == (48, 48)
    assert randlora_dims([(30, 12), (20, 64)]) == (64, 30)
    assert randlora_dims([(5, 9)]) == (9, 5)


# ------------------------------------------------------------------------------------------------- init


def test_init_matches_peft():
    pm = peft_model()
    trainable, _ = pm.get_nb_trainable_parameters()
    cfg = RandLoraConfig(r=R)
    total = 0
    for name, (i, o) in LAYERS.items():
        layer = getattr(pm.base_model.model, name)
        p = cfg.init(i, o)
        assert torch.equal(p.lambda_, layer.randlora_lambda["default"])
        assert torch.equal(p.gamma, layer.randlora_gamma["default"])
        nb = math.ceil(min(i, o) / R)
        assert p.lambda_.abs().sum() == 0 and torch.all(p.gamma == torch.tensor(1 / max(nb, min(i, o))))
        total += cfg.num_params(i, o)
    assert total == trainable


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_init_dtype_and_no_init_weights(dtype):
    layers = {"a": (20, 12)}
    torch.manual_seed(0)
    net = Net(layers, dtype=dtype)
    torch.manual_seed(11)
    pm = peft.get_peft_model(
        net, peft.RandLoraConfig(r=3, target_modules=["a"], init_weights=False), autocast_adapter_dtype=False
    )
    layer = pm.base_model.model.a
    p = randlora_init(20, 12, r=3, init_weights=False, generator=torch.Generator().manual_seed(11), dtype=dtype)
    assert p.lambda_.dtype == dtype
    assert torch.equal(p.lambda_, layer.randlora_lambda["default"])
    assert torch.equal(p.gamma, layer.randlora_gamma["default"])


# ------------------------------------------------------------------------------- differential vs PEFT


@pytest.mark.parametrize("name", list(LAYERS))
def test_delta_matches_peft(setup, name):
    pm, bases, params = setup
    i, o = LAYERS[name]
    layer = getattr(pm.base_model.model, name)
    s = layer.scaling["default"]
    ours = randlora_delta(params[name], bases, in_features=i, out_features=o, scaling=s)
    theirs = layer.get_delta_weight("default").detach()
    ref = ref_delta(params[name], bases, i, o, s)
    assert ours.shape == theirs.shape == (o, i)
    assert_close_to(theirs, ref, torch.float32)
    assert_close_to(ours, ref, torch.float32)
    assert ref.abs().max() > 1.0  # a real, non-identity update


@pytest.mark.parametrize("batch", [(1,), (3, 2), (40,)])  # below and above num_bases: both contraction routes
@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_matches_peft(setup, name, batch):
    pm, bases, params = setup
    i, o = LAYERS[name]
    layer = getattr(pm.base_model.model, name)
    x = torch.randn(*batch, i, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = layer(x)
        base = layer.base_layer(x)
    ours = apply_randlora(params[name], bases, x, in_features=i, out_features=o, scaling=layer.scaling["default"])
    ref = x.double() @ ref_delta(params[name], bases, i, o, layer.scaling["default"]).T
    assert ours.dtype == x.dtype and ours.shape == (*batch, o)
    assert_close_to(ours, ref, torch.float32)
    assert_close_to(theirs - base, ref, torch.float32)
    cfg = RandLoraConfig(r=R, target_modules=list(LAYERS))
    full = cfg.apply(params[name], x, layer.base_layer, in_features=i, out_features=o, shared=bases)
    assert_close_to(full, base.double() + ref, torch.float32)


@pytest.mark.parametrize("name", list(LAYERS))
def test_merge_matches_peft_and_own_forward(name):
    pm = peft_model()
    params = randomize(pm)
    bases = peft_bases(pm)
    i, o = LAYERS[name]
    layer = getattr(pm.base_model.model, name)
    W, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    cfg = RandLoraConfig(r=R, target_modules=list(LAYERS))
    W2, b2 = cfg.merge(params[name], W, b, shared=bases)
    assert b2 is b and W2 is not W
    layer.merge()
    assert_close_to(W2, layer.base_layer.weight.detach(), torch.float32)
    x = torch.randn(9, i, generator=torch.Generator().manual_seed(4))
    merged = F.linear(x, W2, b2)
    unmerged = cfg.apply(params[name], x, lambda v: F.linear(v, W, b), in_features=i, out_features=o, shared=bases)
    assert_close_to(merged, unmerged, torch.float32)
    assert (merged - F.linear(x, W, b)).abs().max() > 1.0  # the merge did something
    W3, _ = cfg.unmerge(params[name], W2, b2, shared=bases)
    assert_close_to(W3, W, torch.float32, scale=W2.abs().max())  # float32 round-off of the merged magnitudes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dtypes_as_peft(dtype):
    """Adapter computed in float32 on CPU for half inputs, result in x's dtype; merge adds the cast delta."""
    pm = peft_model()
    params = randomize(pm)
    bases = peft_bases(pm)
    i, o = LAYERS["down"]
    layer = pm.base_model.model.down
    x = torch.randn(6, i, generator=torch.Generator().manual_seed(5)).to(dtype)
    W, b = layer.base_layer.weight.detach().to(dtype), layer.base_layer.bias.detach().to(dtype)
    p = RandLoraParams(*(t.to(dtype) for t in params["down"])) if dtype == torch.float64 else params["down"]
    bs = RandLoraBases(*(t.to(dtype) for t in bases)) if dtype == torch.float64 else bases
    cfg = RandLoraConfig(r=R)
    y = cfg.apply(p, x, lambda v: F.linear(v, W, b), in_features=i, out_features=o, shared=bs)
    ref = F.linear(x.double(), W.double(), b.double()) + x.double() @ ref_delta(p, bs, i, o, cfg.scaling).T
    assert y.dtype == dtype
    assert_close_to(y, ref, dtype)
    W2, _ = cfg.merge(p, W, b, shared=bs)
    assert W2.dtype == dtype
    assert_close_to(W2, W.double() + ref_delta(p, bs, i, o, cfg.scaling), dtype)


@pytest.mark.parametrize("name", list(LAYERS))
def test_bf16_model_forward_as_peft(name):
    """A bf16 PEFT model keeps float32 adapters (autocast_adapter_dtype) and adds in float32, then casts."""
    pm = peft_model(dtype=torch.bfloat16)
    params = randomize(pm)
    bases = peft_bases(pm)
    i, o = LAYERS[name]
    layer = getattr(pm.base_model.model, name)
    x = torch.randn(5, i, generator=torch.Generator().manual_seed(15)).bfloat16()
    with torch.no_grad():
        theirs = layer(x)
        base = layer.base_layer(x)
    ours = RandLoraConfig(r=R).apply(params[name], x, layer.base_layer, in_features=i, out_features=o, shared=bases)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    ref = base.double() + x.double() @ ref_delta(params[name], bases, i, o, RandLoraConfig(r=R).scaling).T
    assert_close_to(ours, ref, torch.bfloat16)
    assert_close_to(theirs, ref, torch.bfloat16)
    assert (ours.double() - theirs.double()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * ref.abs().max()


def test_fan_in_fan_out_merge(setup):
    _, bases, params = setup
    i, o = LAYERS["up"]
    W = torch.randn(o, i, dtype=torch.float64)
    p64 = RandLoraParams(*(t.double() for t in params["up"]))
    b64 = RandLoraBases(*(t.double() for t in bases))
    plain, _ = RandLoraConfig(r=R).merge(p64, W, None, shared=b64)
    conv, _ = RandLoraConfig(r=R, fan_in_fan_out=True).merge(p64, W.T.contiguous(), None, shared=b64)
    torch.testing.assert_close(conv, plain.T, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- properties


@settings(max_examples=20)
@given(
    i=st.integers(1, 24),
    o=st.integers(1, 24),
    r=st.integers(1, 9),
    n=st.integers(1, 12),
    sparse=st.sampled_from(["dense", "sparse"]),
)
def test_property_apply_merge_delta_consistent(i, o, r, n, sparse):
    g = torch.Generator().manual_seed(i * 1000 + o * 10 + r)
    max_dim, min_dim = randlora_dims([(o, i), (3, 2)])
    try:
        bases = randlora_bases(i + o, r=r, max_dim=max_dim, min_dim=min_dim, sparse=sparse == "sparse", dtype=torch.float64)
    except ValueError as e:  # tiny sparse bases can come out all zero: PEFT would divide by a zero std
        assert "all zero" in str(e) and sparse == "sparse"
        reject()
    p = randlora_init(i, o, r=r, dtype=torch.float64)
    p = RandLoraParams(torch.randn(p.lambda_.shape, generator=g, dtype=torch.float64), p.gamma + torch.rand(p.gamma.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, i, generator=g, dtype=torch.float64)
    W = torch.randn(o, i, generator=g, dtype=torch.float64)
    d = randlora_delta(p, bases, in_features=i, out_features=o, scaling=2.5)
    torch.testing.assert_close(d, ref_delta(p, bases, i, o, 2.5), rtol=1e-12, atol=1e-12)
    y = apply_randlora(p, bases, x, in_features=i, out_features=o, scaling=2.5)
    torch.testing.assert_close(y, x @ d.T, rtol=1e-12, atol=1e-12)
    Wm = randlora_merge(p, bases, W, scaling=2.5)
    torch.testing.assert_close(F.linear(x, Wm), F.linear(x, W) + y, rtol=1e-12, atol=1e-12)
    back = randlora_unmerge(p, bases, Wm, scaling=2.5)
    assert (back - W).abs().max() <= 8 * torch.finfo(torch.float64).eps * Wm.abs().max().clamp_min(1)


# ------------------------------------------------------------------------------------------ torch.func


def _loss_inputs(setup, name, dtype=torch.float32):
    _, bases, params = setup
    i, o = LAYERS[name]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, i, generator=g).to(dtype)
    w = torch.randn(4, o, generator=g).to(dtype)
    p = RandLoraParams(*(t.to(dtype) for t in params[name]))
    b = RandLoraBases(*(t.to(dtype) for t in bases))
    return p, b, x, w, i, o


@pytest.mark.parametrize("name", list(LAYERS))
def test_grad_matches_peft_backward(setup, name):
    pm = peft_model()
    randomize(pm)
    p, b, x, w, i, o = _loss_inputs(setup, name)
    layer = getattr(pm.base_model.model, name)
    s = layer.scaling["default"]
    (layer(x) * w).sum().backward()
    theirs = (layer.randlora_lambda["default"].grad, layer.randlora_gamma["default"].grad)

    def loss(params, bases):
        return (apply_randlora(params, bases, x, in_features=i, out_features=o, scaling=s) * w).sum()

    ours = torch.func.grad(loss)(p, b)
    assert isinstance(ours, RandLoraParams)
    p64, b64 = RandLoraParams(*(t.double() for t in p)), RandLoraBases(*(t.double() for t in b))
    x64, w64 = x.double(), w.double()
    ref = torch.func.grad(
        lambda q: (apply_randlora(q, b64, x64, in_features=i, out_features=o, scaling=s) * w64).sum()
    )(p64)
    for got, want, peft_g in zip(ours, ref, theirs):
        assert_close_to(got, want, torch.float32)
        assert_close_to(peft_g, want, torch.float32)
    # The bases are constants: no gradient flows into them.
    gb = torch.func.grad(loss, argnums=1)(p, b)
    assert all(torch.count_nonzero(t) == 0 for t in gb)


@pytest.mark.parametrize("n", [2, 9])  # both contraction routes (num_bases is 4 or 7)
@pytest.mark.parametrize("name", list(LAYERS))
def test_gradcheck_float64(setup, name, n):
    p, b, _, _, i, o = _loss_inputs(setup, name, torch.float64)
    x = torch.randn(n, i, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    proj = torch.randn(o, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10))

    def f(lam, gam):  # projected to 3 outputs per row: gradcheck runs one backward per output element
        return apply_randlora(RandLoraParams(lam, gam), b, x, in_features=i, out_features=o, scaling=0.7) @ proj

    lam, gam = (t.clone().requires_grad_(True) for t in p)
    assert torch.autograd.gradcheck(f, (lam, gam))
    # torch.func.grad agrees with autograd.
    w = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    want = torch.autograd.grad((f(lam, gam) * w).sum(), (lam, gam))
    got = torch.func.grad(lambda a, c: (f(a, c) * w).sum(), argnums=(0, 1))(p.lambda_, p.gamma)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_vmap_over_stacked_params_shared_bases(setup, name):
    p, b, x, _, i, o = _loss_inputs(setup, name)
    g = torch.Generator().manual_seed(10)
    stack = RandLoraParams(
        torch.randn(3, *p.lambda_.shape, generator=g), torch.rand(3, *p.gamma.shape, generator=g) + 0.5
    )
    f = lambda q: apply_randlora(q, b, x, in_features=i, out_features=o, scaling=2.0)  # noqa: E731
    got = torch.func.vmap(f)(stack)
    want = torch.stack([f(RandLoraParams(stack.lambda_[k], stack.gamma[k])) for k in range(3)])
    torch.testing.assert_close(got, want, rtol=tol(torch.float32), atol=tol(torch.float32) * want.abs().max().item())
    assert not torch.allclose(got[0], got[1])
    # vmap over inputs too (per-sample adapters), and merge under vmap.
    xs = torch.randn(3, 5, i, generator=g)
    got2 = torch.func.vmap(lambda q, xx: apply_randlora(q, b, xx, in_features=i, out_features=o, scaling=2.0))(stack, xs)
    want2 = torch.stack([apply_randlora(RandLoraParams(stack.lambda_[k], stack.gamma[k]), b, xs[k], in_features=i, out_features=o, scaling=2.0) for k in range(3)])
    torch.testing.assert_close(got2, want2, rtol=tol(torch.float32), atol=tol(torch.float32) * want2.abs().max().item())
    W = torch.randn(o, i, generator=g)
    gotm = torch.func.vmap(lambda q: randlora_merge(q, b, W, scaling=2.0))(stack)
    wantm = torch.stack([randlora_merge(RandLoraParams(stack.lambda_[k], stack.gamma[k]), b, W, scaling=2.0) for k in range(3)])
    torch.testing.assert_close(gotm, wantm, rtol=tol(torch.float32), atol=tol(torch.float32) * wantm.abs().max().item())


@pytest.mark.parametrize("name", list(LAYERS))
def test_jvp_matches_finite_differences(setup, name):
    p, b, x, _, i, o = _loss_inputs(setup, name, torch.float64)
    g = torch.Generator().manual_seed(11)
    t = RandLoraParams(*(torch.randn(v.shape, generator=g, dtype=torch.float64) for v in p))
    f = lambda q: apply_randlora(q, b, x, in_features=i, out_features=o, scaling=1.5)  # noqa: E731
    out, tangent = torch.func.jvp(f, (p,), (t,))
    torch.testing.assert_close(out, f(p))
    eps = 1e-6
    plus = f(RandLoraParams(*(v + eps * dv for v, dv in zip(p, t))))
    minus = f(RandLoraParams(*(v - eps * dv for v, dv in zip(p, t))))
    fd = (plus - minus) / (2 * eps)  # exact up to round-off: f is bilinear in (lambda, gamma)
    torch.testing.assert_close(tangent, fd, rtol=1e-7, atol=1e-7 * fd.abs().max().item())


class _AdaptedLinear(nn.Module):
    def __init__(self, i, o, params, bases):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.lambda_ = nn.Parameter(params.lambda_.clone())
        self.gamma = nn.Parameter(params.gamma.clone())
        self.register_buffer("A", bases.A)
        self.register_buffer("B", bases.B)
        self.cfg = RandLoraConfig(r=R)
        self.i, self.o = i, o

    def forward(self, x):
        return self.cfg.apply(
            RandLoraParams(self.lambda_, self.gamma), x, self.base, in_features=self.i, out_features=self.o,
            shared=RandLoraBases(self.A, self.B),
        )


def test_functional_call(setup):
    p, b, x, w, i, o = _loss_inputs(setup, "down")
    mod = _AdaptedLinear(i, o, p, b)
    g = torch.Generator().manual_seed(12)
    new = {"lambda_": torch.randn(p.lambda_.shape, generator=g), "gamma": torch.rand(p.gamma.shape, generator=g)}

    def loss(d):
        return (torch.func.functional_call(mod, d, (x,)) * w).sum()

    out = torch.func.functional_call(mod, new, (x,))
    want = mod.base(x) + apply_randlora(RandLoraParams(new["lambda_"], new["gamma"]), b, x, in_features=i, out_features=o, scaling=mod.cfg.scaling)
    torch.testing.assert_close(out, want)
    grads = torch.func.grad(loss)(new)
    direct = torch.func.grad(
        lambda q: ((mod.base(x) + apply_randlora(q, b, x, in_features=i, out_features=o, scaling=mod.cfg.scaling)) * w).sum()
    )(RandLoraParams(new["lambda_"], new["gamma"]))
    torch.testing.assert_close(grads["lambda_"], direct.lambda_)
    torch.testing.assert_close(grads["gamma"], direct.gamma)


def test_compile_grad_fullgraph(setup):
    p, b, x, w, i, o = _loss_inputs(setup, "down")

    def loss(params):
        return (apply_randlora(params, b, x, in_features=i, out_features=o, scaling=3.0) * w).sum()

    compiled = torch.compile(torch.func.grad(loss), fullgraph=True)
    got = compiled(p)
    want = torch.func.grad(loss)(p)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=tol(torch.float32), atol=tol(torch.float32) * ww.abs().max().item())
    assert want.lambda_.abs().max() > 0


# ---------------------------------------------------------------------------------------------- dropout


def test_dropout_only_in_training_and_from_generator(setup):
    _, b, params = setup
    i, o = LAYERS["up"]
    p = params["up"]
    x = torch.randn(4, i, generator=torch.Generator().manual_seed(13))
    kw = dict(in_features=i, out_features=o, scaling=2.0)
    plain = apply_randlora(p, b, x, **kw)
    assert torch.equal(apply_randlora(p, b, x, **kw, training=False, dropout=0.5), plain)
    d1 = apply_randlora(p, b, x, **kw, training=True, dropout=0.5, generator=torch.Generator().manual_seed(1))
    d2 = apply_randlora(p, b, x, **kw, training=True, dropout=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(d1, d2) and not torch.allclose(d1, plain)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) >= 0.5
    torch.testing.assert_close(d1, apply_randlora(p, b, x * keep / 0.5, **kw))
    # The config's dropout touches the adapter branch only, never the base.
    cfg = RandLoraConfig(r=R, randlora_dropout=0.5)
    lin = nn.Linear(i, o)
    y = cfg.apply(p, x, lin, in_features=i, out_features=o, shared=b, training=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(y, lin(x) + apply_randlora(p, b, x * keep / 0.5, in_features=i, out_features=o, scaling=cfg.scaling))


# ----------------------------------------------------------------------------------------------- config


def test_config_defaults_and_peft_interchange():
    ours, theirs = RandLoraConfig(), peft.RandLoraConfig()
    for f in dataclasses.fields(RandLoraConfig):
        if hasattr(theirs, f.name):
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    assert ours.scaling == 20.0 and ours.peft_type == "RANDLORA"
    assert isinstance(ours, Adapter)
    assert REGISTRY["RANDLORA"] is RandLoraConfig and config_for_peft_type("randlora") is RandLoraConfig
    cfg = RandLoraConfig(r=8, target_modules=["q", "v"], sparse=True, randlora_alpha=64, randlora_dropout=0.1)
    d = cfg.to_peft_dict()
    pc = peft.RandLoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})
    assert pc.r == 8 and pc.sparse and pc.target_modules == {"q", "v"} and pc.randlora_alpha == 64
    back = RandLoraConfig.from_peft_dict(pc.to_dict())
    assert back == cfg
    with pytest.raises(ValueError, match="'nonsense'"):
        RandLoraConfig.from_peft_dict({"r": 4, "nonsense": 1})
    with pytest.raises(ValueError, match="'LORA'"):
        RandLoraConfig.from_peft_dict({"r": 4, "peft_type": "LORA"})


def test_config_apply_matches_peft_model_forward():
    pm = peft_model()
    params = randomize(pm)
    bases = peft_bases(pm)
    cfg = RandLoraConfig(r=R, target_modules=list(LAYERS))
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        theirs = pm(x)
    for name, y_peft in zip(pm.base_model.model.names, theirs):
        i, o = LAYERS[name]
        base = getattr(pm.base_model.model, name).base_layer
        ours = cfg.apply(params[name], x[..., :i], base, in_features=i, out_features=o, shared=bases)
        ref = base(x[..., :i]).double() + x[..., :i].double() @ ref_delta(params[name], bases, i, o, cfg.scaling).T
        assert_close_to(ours, ref, torch.float32)
        assert_close_to(y_peft, ref, torch.float32)


# ----------------------------------------------------------------------------------------------- errors


def test_errors_name_values(setup):
    _, b, params = setup
    p = params["up"]
    i, o = LAYERS["up"]
    kw = dict(in_features=i, out_features=o, scaling=1.0)
    x = torch.randn(2, i)
    with pytest.raises(ValueError, match="r=0"):
        randlora_bases(0, r=0, max_dim=4, min_dim=4)
    with pytest.raises(ValueError, match="r=-2"):
        randlora_init(4, 4, r=-2)
    with pytest.raises(ValueError, match="r=0"):
        RandLoraConfig(r=0)
    with pytest.raises(ValueError, match="sparse=True and very_sparse=True"):
        randlora_bases(0, r=2, max_dim=4, min_dim=4, sparse=True, very_sparse=True)
    with pytest.raises(ValueError, match="sparse=True and very_sparse=True"):
        RandLoraConfig(sparse=True, very_sparse=True)
    with pytest.raises(ValueError, match="max_dim=3 is smaller than min_dim=4"):
        randlora_bases(0, r=2, max_dim=3, min_dim=4)
    with pytest.raises(ValueError, match=r"params.lambda_ has shape=\(5, 3\), expected \(5, 4\)"):
        apply_randlora(RandLoraParams(p.lambda_[:, :3], p.gamma), b, x, **kw)
    with pytest.raises(ValueError, match=r"params.gamma has shape=\(4, 15\), expected \(4, 16\)"):
        randlora_delta(RandLoraParams(p.lambda_, p.gamma[:, :15]), b, **kw)
    with pytest.raises(ValueError, match=r"bases.A has shape=\(5, 1, 8\).*min_dim >= 16"):
        apply_randlora(p, RandLoraBases(b.A[..., :8], b.B), x, **kw)
    with pytest.raises(ValueError, match=r"bases.B has shape=\(40, 10, 5\).*max_dim >= 48"):
        randlora_merge(p, RandLoraBases(b.A, b.B[:40]), torch.zeros(o, i), scaling=1.0)
    with pytest.raises(ValueError, match=r"bases.B has shape=\(48, 10, 4\)"):
        apply_randlora(p, RandLoraBases(b.A, b.B[..., :4]), x, **kw)
    with pytest.raises(ValueError, match=r"x has shape=\(2, 15\).*in_features=16"):
        apply_randlora(p, b, x[:, :15], **kw)
    with pytest.raises(ValueError, match=r"params.lambda_ has shape=\(5, 4\), expected \(5, 3\).*in_features=15"):
        randlora_merge(p, b, torch.zeros(o, i - 1), scaling=1.0)  # params of a 16-input layer, weight of 15
    with pytest.raises(ValueError, match="shapes is empty"):
        randlora_dims([])
    with pytest.raises(ValueError, match="randlora_dropout=1.5"):
        RandLoraConfig(randlora_dropout=1.5)
    with pytest.raises(ValueError, match="bias='some'"):
        RandLoraConfig(bias="some")
    with pytest.raises(ValueError, match="shared=None"):
        RandLoraConfig(r=R).apply(p, x, lambda v: v, in_features=i, out_features=o)
    with pytest.raises(ValueError, match="dropout=2"):
        apply_randlora(p, b, x, **kw, training=True, dropout=2)
