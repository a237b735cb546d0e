"""One contract over every adapter in ``rotfunc.adapter.REGISTRY`` x every kind of base layer.

Everything here goes through the ``Adapter`` protocol only (``init``, ``init_shared``, ``apply``, ``merge``,
``unmerge``, ``num_params``) and, for bitsandbytes bases, through ``rotfunc.quant``. An adapter added to the
registry gets every test: its configs come from :data:`EXAMPLES` (or its ``contract_examples()`` classmethod,
or its defaults), its random params from ``rotfunc.testing.random_params``.

Tolerances are derived, never tuned per case: a float result must be within ``K * eps(dtype) * ||reference||``
(Frobenius; ``K`` below covers the handful of roundings in a working dtype); a merge into a quantized layer
additionally within the requantization error that ``rotfunc.quant.merge_into`` measures and reports.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import rotfunc
from rotfunc import quant
from rotfunc.adapter import REGISTRY, Adapter, _load_builtin
from rotfunc.oft import OFTConfig, oft_matrix
from rotfunc.randlora import RandLoraConfig, randlora_delta
from rotfunc.road import RoadConfig, road_matrix
from rotfunc.testing import adapter_cases, adapter_configs, random_params

pytestmark = [
    # torch scripts its jvp decompositions (torch/_decomp/decompositions_for_jvp.py) on first use of jvp
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

_load_builtin()

# ------------------------------------------------------------------------------------------------ the table

# One small table keyed by peft_type: the configs every contract test runs (ids for the test names). The most
# general variant of each adapter: RoAD's road_4 (independent f/s per element), OFT's two rotation paths.
EXAMPLES: dict[str, list[tuple[str, Adapter]]] = {
    "ROAD": [("road_4", RoadConfig(variant="road_4", group_size=8))],
    "OFT": [
        ("neumann", OFTConfig(oft_block_size=16)),
        ("cayley_share", OFTConfig(oft_block_size=16, use_cayley_neumann=False, block_share=True)),
    ],
    "RANDLORA": [("r8", RandLoraConfig(r=8, randlora_alpha=8.0))],
}


def _examples() -> list[tuple[str, Adapter]]:
    out = []
    for peft_type in sorted(REGISTRY):
        cls = REGISTRY[peft_type]
        if peft_type in EXAMPLES:
            pairs = EXAMPLES[peft_type]
        elif hasattr(cls, "contract_examples"):
            pairs = [(f"ex{i}", c) for i, c in enumerate(cls.contract_examples())]
        else:
            pairs = [("default", cls())]
        out += [(f"{peft_type}-{name}", config) for name, config in pairs]
    return out


CASES = _examples()
CASE_IDS = [name for name, _ in CASES]
KINDS = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4")
FLOAT_KINDS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = ((128, 64), (64, 128))  # (in_features, out_features): both orientations (RandLoRA transposes)
BATCH = 4
K = 8  # error allowed in a working dtype, in units of eps * ||reference||_F: one constant for every case

case_param = pytest.mark.parametrize("case", [c for _, c in CASES], ids=CASE_IDS)
kind_param = pytest.mark.parametrize("kind", KINDS)
shape_param = pytest.mark.parametrize("shape", SHAPES, ids=[f"{i}x{o}" for i, o in SHAPES])


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# ------------------------------------------------------------------------------------------------ helpers


def fro(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().to(torch.float64)))


def assert_rel(got, want, dtype: torch.dtype, what: str, *, extra: float = 0.0) -> None:
    """||got - want||_F <= K eps(dtype) ||want||_F + extra (want in float64)."""
    err = fro(got.to(torch.float64) - want.to(torch.float64))
    tol = K * eps(dtype) * fro(want) + extra
    assert err <= tol, f"{what}: ||got - want||_F = {err:.3g} > tol {tol:.3g} (dtype={dtype}, ||want||={fro(want):.3g})"


def rebuild(template, leaves):
    return type(template)(*leaves) if hasattr(type(template), "_fields") else tuple(leaves)


def to64(tree):
    return None if tree is None else rebuild(tree, [t.detach().to(torch.float64) for t in tree])


def _float_linear(in_f: int, out_f: int, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f))
        lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return lin.requires_grad_(False)


def make_layer(kind: str, in_f: int, out_f: int, seed: int = 0) -> nn.Module:
    lin = _float_linear(in_f, out_f, seed)
    if kind in FLOAT_KINDS:
        return lin.to(FLOAT_KINDS[kind])
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=True, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32, quant_type=kind)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu").requires_grad_(False)


def base_of(layer: nn.Module):
    """The base callable ``x -> W x + b`` (bitsandbytes layers through rotfunc.quant: torch.func-safe)."""
    if quant.is_quantized(layer):
        return lambda x: quant.quant_forward(layer, x)
    return layer


def float64_weights(layer: nn.Module):
    """(W, b) in float64: the dequantized weight for bitsandbytes layers."""
    b = None if layer.bias is None else layer.bias.detach().to(torch.float64)
    if quant.is_quantized(layer):
        return quant.dequantize(layer, dtype=torch.float64), b
    return layer.weight.detach().to(torch.float64), b


def fingerprint(layer: nn.Module) -> list:
    """Every tensor a quantized merge replaces, for bitwise comparisons."""
    out = [layer.weight.data, layer.bias.data]
    if isinstance(layer, bnb.nn.Linear8bitLt):
        out += [layer.weight.CB, layer.weight.SCB, layer.state.CB, layer.state.SCB]
    else:
        qs = layer.weight.quant_state
        out += [qs.absmax, qs.code, qs.offset, layer.quant_state is qs]
        if qs.state2 is not None:
            out += [qs.state2.absmax, qs.state2.code]
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in out]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y))
        or (not isinstance(x, torch.Tensor) and x == y)
        for x, y in zip(a, b)
    )


@dataclasses.dataclass
class Setup:
    """One adapter config on one base layer, with non-identity float32 params and an input."""

    config: Adapter
    kind: str
    in_f: int
    out_f: int
    layer: nn.Module
    params: tuple
    shared: tuple | None
    x: torch.Tensor
    seed: int

    @property
    def dtype(self) -> torch.dtype:
        """The working dtype of the output (the base's float dtype; float32 compute for bitsandbytes)."""
        return self.x.dtype

    def apply(self, params, x=None, base=None, shared=None):
        return self.config.apply(
            params, self.x if x is None else x, base_of(self.layer) if base is None else base,
            in_features=self.in_f, out_features=self.out_f, shared=self.shared if shared is None else shared,
        )

    def reference(self, x64=None) -> torch.Tensor:
        """Dense float64 reference: the float64 (dequantized) weight merged in float64, then F.linear."""
        w64, b64 = float64_weights(self.layer)
        w, b = self.config.merge(to64(self.params), w64, b64, shared=to64(self.shared))
        return F.linear(self.x.to(torch.float64) if x64 is None else x64, w, b)

    def base64(self):
        w64, b64 = float64_weights(self.layer)
        return lambda x: F.linear(x, w64, b64)

    def merge_fn(self, params=None):
        p = self.params if params is None else params
        return lambda w, b: self.config.merge(p, w, b, shared=self.shared)

    def unmerge_fn(self, params=None):
        p = self.params if params is None else params
        return lambda w, b: self.config.unmerge(p, w, b, shared=self.shared)


def setup(case: Adapter, kind: str, shape=SHAPES[0], seed: int = 0) -> Setup:
    in_f, out_f = shape
    g = torch.Generator().manual_seed(1000 + seed)
    layer = make_layer(kind, in_f, out_f, seed)
    params = random_params(case, in_f, out_f, generator=g, dtype=torch.float32)
    shared = case.init_shared([(out_f, in_f)], dtype=torch.float32)
    xdtype = FLOAT_KINDS.get(kind, torch.float32)
    x = torch.randn(BATCH, in_f, generator=g).to(xdtype)
    return Setup(case, kind, in_f, out_f, layer, params, shared, x, seed)


def random_like(params, seed: int):
    g = torch.Generator().manual_seed(seed)
    return rebuild(params, [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in params])


def cotangent(s: Setup) -> torch.Tensor:
    return torch.randn(BATCH, s.out_f, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def loss_of(s: Setup, ct: torch.Tensor):
    ct32 = ct.to(torch.float32)
    return lambda params: (s.apply(params).to(torch.float32) * ct32).sum()


def grad_reference(s: Setup, ct: torch.Tensor) -> list[torch.Tensor]:
    """d/dparams of <apply(params, x), ct> in float64 by plain autograd (float64 params, x and weights)."""
    p64 = [t.detach().to(torch.float64).requires_grad_(True) for t in s.params]
    y = s.config.apply(
        rebuild(s.params, p64), s.x.to(torch.float64), s.base64(),
        in_features=s.in_f, out_features=s.out_f, shared=to64(s.shared),
    )
    (y * ct).sum().backward()
    return [t.grad for t in p64]


# ------------------------------------------------------------------------------------------------ the contract


def test_every_registered_adapter_is_covered():
    assert {name.split("-")[0] for name in CASE_IDS} == set(REGISTRY) >= {"ROAD", "OFT", "RANDLORA"}
    for _, config in CASES:
        assert isinstance(config, Adapter), f"{type(config).__name__} does not implement the Adapter protocol"
    assert rotfunc.REGISTRY is REGISTRY


@case_param
@shape_param
def test_num_params(case, shape):
    in_f, out_f = shape
    params = case.init(in_f, out_f)
    assert case.num_params(in_f, out_f) == sum(t.numel() for t in params) > 0


@case_param
@kind_param
def test_identity_at_init(case, kind):
    s = setup(case, kind)
    params0 = case.init(s.in_f, s.out_f, dtype=torch.float32)
    base_y = base_of(s.layer)(s.x)
    y = s.apply(params0)
    assert y.dtype == base_y.dtype
    assert_rel(y, base_y, s.dtype, "apply at init vs base")
    # merging the identity changes nothing either (to round-off)
    w64, b64 = float64_weights(s.layer)
    w, b = case.merge(to64(params0), w64, b64, shared=to64(s.shared))
    assert_rel(w, w64, torch.float64, "merged identity weight")
    assert b is None or b64 is None or fro(b - b64) <= K * eps(torch.float64) * fro(b64)


@case_param
@kind_param
@shape_param
def test_apply_matches_float64_reference(case, kind, shape):
    s = setup(case, kind, shape)
    y = s.apply(s.params)
    assert y.dtype == s.x.dtype and y.shape == (BATCH, s.out_f)
    ref = s.reference()
    assert_rel(y, ref, s.dtype, "apply vs dense float64 reference")
    # any "*batch": two batch dims, none, an empty batch
    y2 = s.apply(s.params, x=s.x.reshape(2, BATCH // 2, s.in_f))
    assert_rel(y2.reshape(BATCH, s.out_f), ref, s.dtype, "2-D batch")
    assert_rel(s.apply(s.params, x=s.x[0]), ref[0], s.dtype, "no batch dim")
    assert s.apply(s.params, x=s.x[:0]).shape == (0, s.out_f)
    # the params are not the identity: the adapter's effect is above that tolerance
    assert fro(ref - s.base64()(s.x.to(torch.float64))) > K * eps(s.dtype) * fro(ref)


@case_param
@kind_param
@shape_param
def test_merged_equals_unmerged_and_unmerge_restores(case, kind, shape):
    s = setup(case, kind, shape)
    layer = s.layer
    y_base = base_of(layer)(s.x)
    y_adapted = s.apply(s.params)
    w0_64, b0_64 = float64_weights(layer)
    if quant.is_quantized(layer):
        before = fingerprint(layer)
    else:
        before = (layer.weight.detach().clone(), layer.bias.detach().clone())

    record = quant.merge_into(layer, s.merge_fn())
    y_merged = base_of(layer)(s.x)
    assert y_merged.dtype == s.x.dtype
    x64 = s.x.to(torch.float64)
    w_merged64, b_merged64 = s.config.merge(to64(s.params), w0_64, b0_64, shared=to64(s.shared))
    if quant.is_quantized(layer):
        # the requantization error merge_into reports is the true one (to float32 round-off) ...
        assert record.quant_type == kind and record.restorable and 0 < record.rel_fro_error < 1
        wq64, _ = float64_weights(layer)
        err_w = fro(wq64 - w_merged64)
        assert err_w <= (record.rel_fro_error + K * eps(torch.float32)) * fro(w_merged64), (
            f"requantization error {err_w:.3g} above the reported {record.rel_fro_error:.3g} * ||W'||")
        # ... and it is all the merged output may differ by, besides round-off: x (Q(W') - W')^T exactly
        requant = fro(x64 @ (wq64 - w_merged64).T)
    else:
        assert record.quant_type is None and record.rel_fro_error == 0.0
        requant = 0.0
    assert_rel(y_merged, y_adapted, s.dtype, "merged vs unmerged", extra=requant)
    diff = fro(y_merged.to(torch.float64) - y_base.to(torch.float64))
    assert diff > K * eps(s.dtype) * fro(y_adapted) + requant, "merged output does not differ from the base"

    out = quant.unmerge_from(layer, record, s.unmerge_fn())
    if quant.is_quantized(layer):
        assert out is None
        assert same(fingerprint(layer), before), "unmerge did not restore the quantized layer bitwise"
        assert torch.equal(base_of(layer)(s.x), y_base)
    else:
        w0, b0 = before
        assert layer.weight.dtype == w0.dtype and layer.bias.dtype == b0.dtype
        # the adapter's inverse, to round-off: two roundings (merge, unmerge) of weights of norm <= max(||W||, ||W'||)
        assert_rel(layer.weight, w0, s.dtype, "unmerged weight", extra=K * eps(s.dtype) * fro(w_merged64))
        assert_rel(layer.bias, b0, s.dtype, "unmerged bias", extra=K * eps(s.dtype) * fro(b_merged64))


@case_param
@kind_param
def test_dtype_preserved(case, kind):
    s = setup(case, kind)
    x_dtypes = [s.x.dtype] if kind in FLOAT_KINDS else [torch.float32, torch.bfloat16]
    for x_dtype in x_dtypes:
        x = s.x.to(x_dtype)
        for p_dtype in {torch.float32, x_dtype}:
            params = rebuild(s.params, [t.to(p_dtype) for t in s.params])
            shared = None if s.shared is None else rebuild(s.shared, [t.to(p_dtype) for t in s.shared])
            y = s.apply(params, x=x, shared=shared)
            assert y.dtype == x_dtype, f"apply({p_dtype} params, {x_dtype} x) returned {y.dtype}"
            assert torch.isfinite(y).all()
    if kind in FLOAT_KINDS:
        w, b = s.layer.weight.detach(), s.layer.bias.detach()
        mw, mb = case.merge(s.params, w, b, shared=s.shared)
        assert mw.dtype == w.dtype and mw.shape == w.shape and (mb is None or mb.dtype == b.dtype)
        uw, ub = case.unmerge(s.params, mw, mb, shared=s.shared)
        assert uw.dtype == w.dtype and (ub is None or ub.dtype == b.dtype)
        assert torch.equal(s.layer.weight, w), "merge/unmerge mutated their input"


@case_param
@kind_param
def test_grad_matches_float64_autograd(case, kind):
    s = setup(case, kind)
    ct = cotangent(s)
    g = torch.func.grad(loss_of(s, ct))(s.params)
    assert type(g) is type(s.params)
    for got, want in zip(g, grad_reference(s, ct)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert_rel(got, want, s.dtype, "grad")


@case_param
@kind_param
def test_vmap_over_params_matches_loop(case, kind):
    s = setup(case, kind)
    stack = [random_params(case, s.in_f, s.out_f, generator=torch.Generator().manual_seed(50 + i)) for i in range(3)]
    batched = rebuild(s.params, [torch.stack(ts) for ts in zip(*stack)])
    got = torch.func.vmap(lambda p: s.apply(p))(batched)
    want = torch.stack([s.apply(p) for p in stack])
    assert got.shape == (3, BATCH, s.out_f) and got.dtype == s.x.dtype
    assert_rel(got, want, s.dtype, "vmap vs loop")
    # and vmap over the inputs too (params shared)
    xs = torch.randn(3, BATCH, s.in_f, generator=torch.Generator().manual_seed(9)).to(s.x.dtype)
    got_x = torch.func.vmap(lambda x: s.apply(s.params, x=x))(xs)
    assert_rel(got_x, torch.stack([s.apply(s.params, x=x) for x in xs]), s.dtype, "vmap over x vs loop")


# Contract failures found by this suite in files this suite may not edit: (peft_type, test) -> reason.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def with_known_failures(test: str):
    params = []
    for name, config in CASES:
        reason = KNOWN_FAILURES.get((config.peft_type, test))
        marks = [pytest.mark.xfail(strict=True, raises=RuntimeError, reason=reason)] if reason else []
        params.append(pytest.param(config, id=name, marks=marks))
    return pytest.mark.parametrize("case", params)


@with_known_failures("vmap_merge_unmerge")
@pytest.mark.parametrize("kind", list(FLOAT_KINDS))
def test_vmap_merge_unmerge_over_params(case, kind):
    """merge/unmerge are pure functions of the params: vmap merges a stack of adapters into one weight at once."""
    s = setup(case, kind)
    w, b = s.layer.weight.detach(), s.layer.bias.detach()
    stack = [random_params(case, s.in_f, s.out_f, generator=torch.Generator().manual_seed(60 + i)) for i in range(3)]
    batched = rebuild(s.params, [torch.stack(ts) for ts in zip(*stack)])
    mw, mb = torch.func.vmap(lambda p: case.merge(p, w, b, shared=s.shared))(batched)
    for i, p in enumerate(stack):
        ww, bb = case.merge(p, w, b, shared=s.shared)
        assert_rel(mw[i], ww, s.dtype, "vmap merge weight")
        assert_rel(mb[i], bb, s.dtype, "vmap merge bias")
    uw, ub = torch.func.vmap(lambda p, w, b: case.unmerge(p, w, b, shared=s.shared))(batched, mw, mb)
    for i, p in enumerate(stack):
        ww, bb = case.unmerge(p, mw[i], mb[i], shared=s.shared)
        assert_rel(uw[i], ww, s.dtype, "vmap unmerge weight")
        assert_rel(ub[i], bb, s.dtype, "vmap unmerge bias")


@case_param
@kind_param
def test_jvp_matches_finite_differences(case, kind):
    s = setup(case, kind)
    tangent = random_like(s.params, seed=11)
    y, dy = torch.func.jvp(lambda p: s.apply(p), (s.params,), (tangent,))
    assert_rel(y, s.apply(s.params), s.dtype, "jvp primal")
    # central differences of the float64 reference: truncation O(h^2), far below any working eps
    h = 1e-6
    p64, t64, base64, shared64 = to64(s.params), to64(tangent), s.base64(), to64(s.shared)

    def f64(p):
        return s.config.apply(p, s.x.to(torch.float64), base64, in_features=s.in_f, out_features=s.out_f,
                              shared=shared64)

    plus = f64(rebuild(p64, [a + h * b for a, b in zip(p64, t64)]))
    minus = f64(rebuild(p64, [a - h * b for a, b in zip(p64, t64)]))
    assert_rel(dy, (plus - minus) / (2 * h), s.dtype, "jvp tangent vs finite differences")


class Adapted(nn.Module):
    """A tiny stateful wrapper: adapter params as Parameters, shared state as buffers, the base layer."""

    def __init__(self, config: Adapter, params, shared, layer: nn.Module) -> None:
        super().__init__()
        self.config, self.params_template, self.shared_template = config, params, shared
        self.adapter = nn.Module()
        self.names = getattr(type(params), "_fields", None) or [f"p{i}" for i in range(len(params))]
        for name, t in zip(self.names, params):
            self.adapter.register_parameter(name, nn.Parameter(t.detach().clone()))
        for i, t in enumerate(shared or ()):
            self.register_buffer(f"shared{i}", t)
        self.base_layer = layer

    def forward(self, x):
        params = rebuild(self.params_template, [getattr(self.adapter, n) for n in self.names])
        shared = None
        if self.shared_template is not None:
            n = len(self.shared_template)
            shared = rebuild(self.shared_template, [getattr(self, f"shared{i}") for i in range(n)])
        return self.config.apply(
            params, x, base_of(self.base_layer), in_features=self.base_layer.in_features,
            out_features=self.base_layer.out_features, shared=shared,
        )


@case_param
@kind_param
def test_functional_call(case, kind):
    s = setup(case, kind)
    module = Adapted(case, case.init(s.in_f, s.out_f), s.shared, s.layer)
    names = [f"adapter.{n}" for n in module.names]
    assert sorted(n for n, p in module.named_parameters() if p.requires_grad) == sorted(names)
    own = [p.detach().clone() for p in module.adapter.parameters()]
    new = dict(zip(names, s.params))
    y = torch.func.functional_call(module, new, (s.x,))
    assert_rel(y, s.reference(), s.dtype, "functional_call vs float64 reference")
    ct = cotangent(s).to(torch.float32)

    def loss(d):
        return (torch.func.functional_call(module, d, (s.x,)).to(torch.float32) * ct).sum()

    g = torch.func.grad(loss)(new)
    for name, want in zip(names, grad_reference(s, cotangent(s))):
        assert_rel(g[name], want, s.dtype, f"grad through functional_call, {name}")
    assert all(torch.equal(a, b) for a, b in zip(own, module.adapter.parameters())), "functional_call mutated"


# ----------------------------------------------------------------------------------- torch.compile (one graph)

COMPILE_KINDS = ("fp32", "nf4")
COMPILE_CASES = [next((n, c) for n, c in CASES if n.split("-")[0] == t) for t in sorted(REGISTRY)]  # one per adapter


@pytest.fixture(scope="module")
def compiled_grads():
    """torch.compile(torch.func.grad(f), fullgraph=True) of ONE loss summing every case on every COMPILE_KINDS
    base (one compile for the whole registry: a first compile costs ~20 s here), and the eager grad."""
    setups = [setup(c, k) for _, c in COMPILE_CASES for k in COMPILE_KINDS]
    cts = [cotangent(s).to(torch.float32) for s in setups]

    def loss(all_params):
        total = 0.0
        for s, ct, p in zip(setups, cts, all_params):
            total = total + (s.apply(p).to(torch.float32) * ct).sum()
        return total

    all_params = tuple(s.params for s in setups)
    compiled = torch.compile(torch.func.grad(loss), fullgraph=True)
    got = compiled(all_params)
    return setups, got, torch.func.grad(loss)(all_params)


# Dynamo instantiates torch.autograd.function.Function while tracing rotfunc.quant's autograd.Function
# (torch/_dynamo/side_effects.py), which warns in torch 2.13.
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning"
)
@pytest.mark.parametrize("index", range(len(COMPILE_CASES) * len(COMPILE_KINDS)),
                         ids=[f"{n}-{k}" for n, _ in COMPILE_CASES for k in COMPILE_KINDS])
def test_compile_grad_fullgraph(compiled_grads, index):
    setups, got, eager = compiled_grads
    s = setups[index]
    want64 = grad_reference(s, cotangent(s))
    for g_c, g_e, w in zip(got[index], eager[index], want64):
        assert g_c.dtype == g_e.dtype and g_c.shape == g_e.shape
        assert_rel(g_c, w, s.dtype, "compiled grad vs float64 autograd")
        assert_rel(g_c, g_e.double(), s.dtype, "compiled grad vs eager grad")


# ------------------------------------------------------------------------- the float64 reference itself

# The dense float64 matrices of each built-in adapter (module functions, not the protocol): the reference the
# contract compares against is itself checked against them. Adapters missing here skip this one test.
DENSE = {
    "ROAD": lambda c, p, w, b, sh: (road_matrix(p, variant=c.variant, group_size=c.group_size) @ w,
                                    road_matrix(p, variant=c.variant, group_size=c.group_size) @ b),
    "OFT": lambda c, p, w, b, sh: (w @ oft_matrix(p, in_features=w.shape[1], **c._statics(w.shape[1])).T, b),
    "RANDLORA": lambda c, p, w, b, sh: (
        w + randlora_delta(p, sh, in_features=w.shape[1], out_features=w.shape[0], scaling=c.scaling), b),
}


@case_param
@shape_param
def test_float64_merge_matches_dense_matrix(case, shape):
    if case.peft_type not in DENSE:
        pytest.skip(f"no dense matrix known for {case.peft_type}")
    s = setup(case, "fp32", shape)
    w64, b64 = float64_weights(s.layer)
    p64, sh64 = to64(s.params), to64(s.shared)
    w, b = case.merge(p64, w64, b64, shared=sh64)
    dw, db = DENSE[case.peft_type](case, p64, w64, b64, sh64)
    assert_rel(w, dw, torch.float64, "merged weight vs dense matrix")
    assert_rel(b, db, torch.float64, "merged bias vs dense matrix")


# --------------------------------------------------------------------------- a fourth adapter gets it all


class ToyScaleParams(NamedTuple):
    s: torch.Tensor  # shape=(out,), identity init 1


@dataclasses.dataclass(frozen=True)
class ToyScaleConfig:
    """A fourth adapter in a dozen lines, ``y = s * (W x + b)`` per output feature: registered, it must pass
    the whole contract with no edit of the tests above (it has no EXAMPLES entry nor strategies)."""

    peft_type: ClassVar[str] = "TOYSCALE"
    target_modules: Any = None
    exclude_modules: Any = None

    def init(self, in_features, out_features, /, *, dtype=None, device=None, generator=None):
        return ToyScaleParams(torch.ones(out_features, dtype=dtype, device=device))

    def init_shared(self, shapes, /, *, dtype=None, device=None):
        return None

    def apply(self, params, x, base, /, *, in_features, out_features, shared=None, training=False, generator=None):
        y = base(x)
        return (y.to(params.s.dtype) * params.s).to(y.dtype)

    def _scale(self, s, weight, bias):
        dt = torch.promote_types(s.dtype, weight.dtype)
        w = (weight.to(dt) * s.to(dt)[:, None]).to(weight.dtype)
        return w, None if bias is None else (bias.to(dt) * s.to(dt)).to(bias.dtype)

    def merge(self, params, weight, bias, /, *, shared=None):
        return self._scale(params.s, weight, bias)

    def unmerge(self, params, weight, bias, /, *, shared=None):
        return self._scale(params.s.reciprocal(), weight, bias)

    def num_params(self, in_features, out_features, /):
        return out_features


def test_a_new_adapter_gets_the_whole_contract(monkeypatch):
    monkeypatch.setitem(REGISTRY, "TOYSCALE", ToyScaleConfig)
    cases = dict(_examples())
    assert "TOYSCALE-default" in cases and set(CASE_IDS) <= set(cases)
    toy = cases["TOYSCALE-default"]
    for shape in SHAPES:
        test_num_params(toy, shape)
    for kind in KINDS:
        test_identity_at_init(toy, kind)
        test_apply_matches_float64_reference(toy, kind, SHAPES[0])
        test_merged_equals_unmerged_and_unmerge_restores(toy, kind, SHAPES[1])
        test_dtype_preserved(toy, kind)
        test_grad_matches_float64_autograd(toy, kind)
        test_vmap_over_params_matches_loop(toy, kind)
        test_jvp_matches_finite_differences(toy, kind)
        test_functional_call(toy, kind)
    test_vmap_merge_unmerge_over_params(toy, "bf16")

    # and rotfunc.testing's strategies cover it too (defaults + perturbed init)
    @settings(max_examples=10)
    @given(adapter_cases(adapter_configs(peft_types=["TOYSCALE"])))
    def round_trip(case):
        w, b = case.config.merge(case.params, case.weight, case.bias)
        w0, b0 = case.config.unmerge(case.params, w, b)
        assert_rel(w0, case.weight, torch.float64, "toy round trip")

    round_trip()


def test_the_contract_can_fail():
    """A wrong adapter (merge forgets the bias) is caught by the contract."""

    @dataclasses.dataclass(frozen=True)
    class Broken(ToyScaleConfig):
        def merge(self, params, weight, bias, /, *, shared=None):
            return self._scale(params.s, weight, None)[0], bias

    with pytest.raises(AssertionError, match="merged vs unmerged"):
        test_merged_equals_unmerged_and_unmerge_restores(Broken(), "fp32", SHAPES[0])


# ------------------------------------------------------------------------- the shims, generic over adapters


def _attached(case: Adapter, dtype: torch.dtype, seed: int, **changes: Any) -> nn.Module:
    """A one-layer model of ``dtype`` with ``case`` attached (``changes`` replace config fields), random params."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(*SHAPES[0])).to(dtype)
    config = dataclasses.replace(case, target_modules=["0"], **changes)
    rotfunc.attach(model, config)
    g = torch.Generator().manual_seed(seed)
    params = random_params(config, *SHAPES[0], generator=g)
    new = {f"0.rotfunc.default.{f}": v for f, v in zip(params._fields, params)}
    if "0.rotfunc.default.bias" in rotfunc.adapter_params(model):
        new["0.rotfunc.default.bias"] = torch.randn(SHAPES[0][1], generator=g)
    rotfunc.load_params(model, new)
    return model


def _assert_merge_exact(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items() if ".rotfunc." not in k}
    with torch.no_grad():
        adapted = model(x)
        rotfunc.merge(model)
        merged = model(x)
    err = (merged.double() - adapted.double()).norm() / adapted.double().norm()
    assert err <= 4 * K * torch.finfo(dtype).eps, f"merged vs unmerged: rel err {err:.2e}"
    rotfunc.unmerge(model)
    after = {k: v for k, v in model.state_dict().items() if ".rotfunc." not in k}
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bitwise, no inverse taken


@case_param
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_shim_half_precision_layer_keeps_float32_params(case, dtype):
    model = _attached(case, dtype, seed=3)
    params = rotfunc.adapter_params(model)
    assert {v.dtype for v in params.values()} == {torch.float32}
    x = torch.randn(BATCH, SHAPES[0][0]).to(dtype)

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).float().square().mean()

    g = torch.func.grad(loss)(params)
    assert all(v.dtype == torch.float32 and v.abs().max() > 0 for v in g.values())
    with torch.no_grad():
        assert model(x).dtype == dtype
    _assert_merge_exact(model, x, dtype)


@pytest.mark.parametrize(
    "case", [c for _, c in CASES if "bias" in {f.name for f in dataclasses.fields(c)}],
    ids=[n for n, c in CASES if "bias" in {f.name for f in dataclasses.fields(c)}],
)
def test_shim_trained_bias_is_an_adapter_param_merged_into_the_bias(case):
    model = _attached(case, torch.float32, seed=4, bias=f"{case.peft_type.lower()}_only")
    params = rotfunc.adapter_params(model)
    assert "0.rotfunc.default.bias" in params
    base_bias = model[0].base_layer.bias.detach().clone()
    x = torch.randn(BATCH, SHAPES[0][0])

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).square().mean()

    assert torch.func.grad(loss)(params)["0.rotfunc.default.bias"].abs().max() > 0
    with torch.no_grad():
        with rotfunc.disabled(model):
            torch.testing.assert_close(model(x), F.linear(x, model[0].base_layer.weight, base_bias))
    _assert_merge_exact(model, x, torch.float32)
    assert torch.equal(model[0].base_layer.bias, base_bias)
