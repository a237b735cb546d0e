"""rotfunc.quant against real bitsandbytes 0.50.2 layers on CPU.

Merge functions here are simple but non-trivial stand-ins for the adapters (W -> R W with a random
orthogonal R, W -> W + small delta); the adapter-on-quantized contract tests live in the lead's suite.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import optree
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rotfunc import quant as Q

# torch scripts its own jvp decompositions (torch/_decomp/decompositions_for_jvp.py) and inductor helpers
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script(_method)?` is deprecated:DeprecationWarning")

IN, OUT = 128, 64
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


# ------------------------------------------------------------------------------------------- builders


def _float_linear(in_f=IN, out_f=OUT, *, bias=True, seed=0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return lin


def make4(quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32, *, bias=True, in_f=IN,
          out_f=OUT, seed=0, blocksize=None, **kw) -> bnb.nn.Linear4bit:
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=compress_statistics, quant_type=quant_type, **kw)
    layer.load_state_dict(_float_linear(in_f, out_f, bias=bias, seed=seed).state_dict())
    if blocksize is not None:  # Linear4bit has no blocksize argument; Params4bit does
        layer.weight.blocksize = blocksize
    return layer.to("cpu")


def make8(*, bias=True, in_f=IN, out_f=OUT, seed=0) -> bnb.nn.Linear8bitLt:
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False)
    layer.load_state_dict(_float_linear(in_f, out_f, bias=bias, seed=seed).state_dict())
    return layer.to("cpu")


def make(kind: str, **kw):
    return make8(**kw) if kind == "int8" else make4(kind, **kw)


def fingerprint(layer) -> dict:
    """Every tensor and static field a merge could touch, for bitwise comparisons."""
    fp = {"bias": None if layer.bias is None else layer.bias.data.clone(), "data": layer.weight.data.clone()}
    if isinstance(layer, bnb.nn.Linear8bitLt):
        for k, t in [("w_cb", layer.weight.CB), ("w_scb", layer.weight.SCB), ("s_cb", layer.state.CB),
                     ("s_scb", layer.state.SCB)]:
            fp[k] = None if t is None else t.clone()
        return fp
    qs = layer.weight.quant_state
    fp["module_qs_same"] = layer.quant_state is qs
    for k in ("absmax", "code", "offset"):
        t = getattr(qs, k, None)
        fp[k] = None if t is None else t.clone()
    fp["static"] = (qs.blocksize, qs.dtype, tuple(qs.shape), qs.quant_type, qs.nested,
                    getattr(qs, "packing_format_for_cpu", False))
    s2 = getattr(qs, "state2", None)
    fp["state2"] = None if s2 is None else (s2.absmax.clone(), s2.code.clone(), s2.blocksize, s2.dtype)
    return fp


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), k
        elif isinstance(x, tuple):
            assert len(x) == len(y), k
            for u, v in zip(x, y):
                assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, k
        else:
            assert x == y, k


def rotation(n: int, *, seed=1) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def rotate_out(n: int, *, seed=1):
    """merge_fn W -> R W, b -> R b with a random orthogonal R (RoAD-like)."""
    R = rotation(n, seed=seed)

    def fn(w, b):
        return R.to(w.dtype) @ w, None if b is None else R.to(b.dtype) @ b

    return fn


def add_delta(shape, *, scale=0.01, seed=2):
    """merge_fn W -> W + small random delta (RandLoRA-like)."""
    d = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale

    def fn(w, b):
        return w + d.to(w.dtype), b

    return fn


def xin(*shape, seed=3, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ------------------------------------------------------------------------------------ forward equality


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_equals_linear4bit(quant_type, compress_statistics, compute_dtype, bias):
    layer = make4(quant_type, compress_statistics, compute_dtype, bias=bias)
    x = xin(2, 3, IN)
    y = Q.quant_forward(layer, x)
    # bitsandbytes in training mode (its default): dequantize in the compute dtype + F.linear
    assert torch.equal(y, layer(x))
    ref = F.linear(x.to(compute_dtype), Q.dequantize(layer, dtype=compute_dtype),
                   None if layer.bias is None else layer.bias.to(compute_dtype)).float()
    assert torch.equal(y, ref)
    assert y.dtype == x.dtype


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_linear8bit_training(bias):
    layer = make8(bias=bias)
    x = xin(5, IN)
    assert layer.weight.SCB is not None and layer.state.SCB is None  # scales on the weight before a forward
    y0 = Q.quant_forward(layer, x).detach()
    y_bnb = layer(x).detach()  # training mode: MatMul8bitFp; moves SCB into layer.state
    assert layer.weight.SCB is None and layer.state.SCB is not None
    assert torch.equal(y0, y_bnb)
    assert torch.equal(Q.quant_forward(layer, x), y_bnb)
    # documented difference: the eval-mode path rounds the activations to int8 as well
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    rel = float((y_eval - y0).norm() / y0.norm())
    assert 1e-4 < rel < 5e-2


def test_bnb_layers_fail_under_torch_func():
    """The motivation: bitsandbytes' forwards raise under grad/vmap, and 4-bit jvp returns a zero tangent."""
    x, t = xin(4, IN), xin(4, IN, seed=9)
    for layer in (make4("nf4"), make8()):
        with pytest.raises(RuntimeError, match="setup_context"):
            torch.func.grad(lambda x: layer(x).sum())(x)
        with pytest.raises(RuntimeError, match="setup_context"):
            torch.func.vmap(layer)(x)
    l4 = make4("nf4")
    _, tangent = torch.func.jvp(l4, (x,), (t,))
    assert torch.count_nonzero(tangent) == 0
    _, tangent = torch.func.jvp(lambda x: Q.quant_forward(l4, x), (x,), (t,))
    assert torch.count_nonzero(tangent) > 0


# --------------------------------------------------------------------------------- transforms: values


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_gradcheck_float64(kind):
    layer = make(kind, in_f=64, out_f=32, **({} if kind == "int8" else {"compute_dtype": None}))
    qw = Q.quant_weight_of(layer)
    x = xin(2, 64, dtype=torch.float64).requires_grad_()
    b = layer.bias.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: Q.quantized_linear(qw, x, b), (x, b))
    assert torch.autograd.gradgradcheck(lambda x, b: Q.quantized_linear(qw, x, b), (x, b))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_grad_upstream_matches_dequantized_float(kind):
    layer = make(kind)
    qw = Q.quant_weight_of(layer)
    W64, b64 = Q.dequantize(qw).double(), layer.bias.detach().double()
    A = (torch.eye(IN) + 0.1 * xin(IN, IN, seed=4)).requires_grad_(False)
    x = xin(6, IN)

    def loss(A, b):
        return (Q.quantized_linear(qw, x @ A, b) ** 2).sum()

    gA, gb = torch.func.grad(loss, argnums=(0, 1))(A, layer.bias.detach())
    A64 = A.double().requires_grad_()
    b64 = b64.requires_grad_()
    ref = (F.linear(x.double() @ A64, W64, b64) ** 2).sum()
    rA, rb = torch.autograd.grad(ref, (A64, b64))
    tol = 64 * EPS[torch.float32]
    assert torch.allclose(gA.double(), rA, rtol=tol, atol=tol * float(rA.abs().max()))
    assert torch.allclose(gb.double(), rb, rtol=tol, atol=tol * float(rb.abs().max()))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_vmap_and_per_sample_grad_match_loop(kind):
    layer = make(kind)
    qw = Q.quant_weight_of(layer)
    xs = xin(5, 3, IN)
    b = layer.bias.detach()
    tol = 8 * EPS[torch.float32]
    out = torch.func.vmap(lambda x: Q.quantized_linear(qw, x, b))(xs)
    loop = torch.stack([Q.quantized_linear(qw, x, b) for x in xs])
    assert torch.allclose(out, loop, rtol=0, atol=tol * float(loop.abs().max()))
    # vmap over the bias too, and per-sample grads w.r.t. x and bias
    bs = xin(5, OUT, seed=7)
    out = torch.func.vmap(lambda x, b: Q.quantized_linear(qw, x, b))(xs, bs)
    loop = torch.stack([Q.quantized_linear(qw, x, bb) for x, bb in zip(xs, bs)])
    assert torch.allclose(out, loop, rtol=0, atol=tol * float(loop.abs().max()))
    g = torch.func.vmap(torch.func.grad(lambda x, b: Q.quantized_linear(qw, x, b).square().sum(), argnums=(0, 1)))
    gx, gb = g(xs, bs)
    for i in range(5):
        lx, lb = torch.func.grad(lambda x, b: Q.quantized_linear(qw, x, b).square().sum(), argnums=(0, 1))(xs[i],
                                                                                                           bs[i])
        assert torch.allclose(gx[i], lx, rtol=0, atol=tol * float(lx.abs().max()))
        assert torch.allclose(gb[i], lb, rtol=0, atol=tol * float(lb.abs().max()))


@pytest.mark.parametrize(
    "kind,compute_dtype",
    # Linear8bitLt has no compute dtype: it computes in the input's dtype (float32 here)
    [("nf4", torch.float32), ("nf4", torch.bfloat16), ("fp4", torch.float32), ("fp4", torch.bfloat16), ("int8", torch.float32)],
)
def test_jvp_matches_dequantized_float(kind, compute_dtype):
    layer = make(kind, **({} if kind == "int8" else {"compute_dtype": compute_dtype}))
    qw = Q.quant_weight_of(layer)
    x, tx = xin(4, IN), xin(4, IN, seed=11)
    b, tb = layer.bias.detach(), xin(OUT, seed=12)
    y, ty = torch.func.jvp(lambda x, b: Q.quantized_linear(qw, x, b), (x, b), (tx, tb))
    W = Q.dequantize(qw, dtype=compute_dtype)
    ref_y, ref_t = torch.func.jvp(
        lambda x, b: F.linear(x.to(compute_dtype), W, b.to(compute_dtype)).float(), (x, b), (tx, tb))
    assert torch.equal(y, ref_y)
    assert torch.count_nonzero(ty) == ty.numel()
    assert torch.allclose(ty, ref_t, rtol=0, atol=4 * EPS[compute_dtype] * float(ref_t.abs().max()))
    # float64 reference of the tangent: W tx + tb
    t64 = tx.double() @ W.double().T + tb.double()
    assert torch.allclose(ty.double(), t64, rtol=0, atol=16 * EPS[compute_dtype] * float(t64.abs().max()))
    # jvp w.r.t. x only
    _, tx_only = torch.func.jvp(lambda x: Q.quantized_linear(qw, x, b), (x,), (tx,))
    assert torch.allclose(tx_only.double(), tx.double() @ W.double().T, rtol=0,
                          atol=16 * EPS[compute_dtype] * float(t64.abs().max()))


def _model_pair():
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(IN, IN), nn.ReLU(), nn.Linear(IN, OUT), nn.Tanh(), nn.Linear(OUT, OUT))
    qmodel = nn.Sequential(nn.Linear(IN, IN), nn.ReLU(), make4("nf4"), nn.Tanh(), make8(in_f=OUT, out_f=OUT, seed=5))
    qmodel[0].load_state_dict(float_model[0].state_dict())
    with torch.no_grad():  # reference: the dequantized weights in float
        float_model[2].weight.copy_(Q.dequantize(qmodel[2]))
        float_model[2].bias.copy_(qmodel[2].bias)
        float_model[4].weight.copy_(Q.dequantize(qmodel[4]))
        float_model[4].bias.copy_(qmodel[4].bias)
    for p in [*float_model.parameters(), *qmodel.parameters()]:
        p.requires_grad_(False)
    return float_model, qmodel


def test_patch_forward_functional_call_grad():
    float_model, qmodel = _model_pair()
    x = xin(7, IN)
    params = {k: v.detach() for k, v in qmodel[0].named_parameters(prefix="0")}

    def loss(p, model):
        return torch.func.functional_call(model, p, (x,)).square().sum()

    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(loss)(params, qmodel)
    assert Q.patch_forward(qmodel) == ["2", "4"]
    assert Q.patch_forward(qmodel) == ["2", "4"]  # idempotent
    g = torch.func.grad(loss)(params, qmodel)
    ref = torch.func.grad(loss)(params, float_model)
    for k in params:
        assert torch.allclose(g[k], ref[k], rtol=0, atol=64 * EPS[torch.float32] * float(ref[k].abs().max())), k
    # patched eval layers never run bitsandbytes' forward, so they are never repacked into the CPU layout
    qmodel.eval()
    with torch.no_grad():
        qmodel(x)
    assert not getattr(qmodel[2].weight.quant_state, "packing_format_for_cpu", False)
    assert Q.unpatch_forward(qmodel) == ["2", "4"]
    assert "forward" not in qmodel[2].__dict__
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(loss)(params, qmodel)


# Dynamo itself instantiates torch.autograd.function.Function while tracing any autograd.Function
# (torch/_dynamo/side_effects.py track_object_new), which warns in torch 2.13.
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning")
def test_compile_grad_fullgraph():
    layer = make4("nf4", compute_dtype=torch.float32)
    qw = Q.quant_weight_of(layer)
    A = torch.eye(IN) + 0.1 * xin(IN, IN, seed=4)
    x, b = xin(6, IN), layer.bias.detach()

    def loss(A, qw, b):
        return torch.tanh(Q.quantized_linear(qw, x @ A, b)).sum()

    compiled = torch.compile(torch.func.grad(loss), fullgraph=True)
    got = compiled(A, qw, b)
    want = torch.func.grad(loss)(A, qw, b)
    assert torch.allclose(got, want, rtol=0, atol=64 * EPS[torch.float32] * float(want.abs().max()))


def test_quantweight_is_a_pytree():
    qw = Q.quant_weight_of(make4("nf4", True))
    leaves, spec = pytree.tree_flatten(qw)
    assert all(isinstance(t, torch.Tensor) for t in leaves) and len(leaves) == 5
    # grad over the whole pytree: integer / scale leaves get zero gradients, the value is right
    x = xin(2, IN)
    gq = torch.func.grad(lambda qw, x: Q.quantized_linear(qw, x).sum(), argnums=1)(qw, x)
    assert torch.allclose(gq, Q.dequantize(qw).sum(0).expand_as(x), rtol=0, atol=1e-5)
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, Q.QuantWeight) and back.spec == qw.spec and back.data is qw.data
    leaves2, tree = optree.tree_flatten(qw, namespace="rotfunc")
    assert len(leaves2) == 5 and optree.tree_unflatten(tree, leaves2).spec == qw.spec
    non_nested = Q.quant_weight_of(make4("nf4", False))
    assert len(pytree.tree_leaves(non_nested)) == 2


@settings(max_examples=10)
@given(
    kind=st.sampled_from(["nf4", "fp4", "int8"]),
    out_f=st.sampled_from([32, 64]),
    in_f=st.sampled_from([64, 96]),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    bias=st.booleans(),
)
def test_property_forward_is_dequantized_linear(kind, out_f, in_f, batch, bias):
    layer = make(kind, in_f=in_f, out_f=out_f, bias=bias)
    x = xin(*batch, in_f)
    y = Q.quant_forward(layer, x)
    assert y.shape == (*batch, out_f)
    assert torch.equal(y, F.linear(x, Q.dequantize(layer), layer.bias))


def test_input_errors_name_values():
    layer = make4("nf4")
    qw = Q.quant_weight_of(layer)
    with pytest.raises(ValueError, match=f"in_features={IN}"):
        Q.quantized_linear(qw, xin(2, IN + 1))
    with pytest.raises(ValueError, match=r"shape=\(3,\)"):
        Q.quantized_linear(qw, xin(2, IN), torch.zeros(3))
    with pytest.raises(ValueError, match=r"weight_f has shape=\(4, 4\)"):
        Q.requantize(layer, torch.zeros(4, 4))
    with pytest.raises(TypeError, match="Linear4bit or Linear8bitLt"):
        Q.quant_weight_of(nn.Linear(2, 2))
    fp16 = bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=True)
    assert not Q.is_quantized(fp16) and Q.is_quantized(layer)
    with pytest.raises(ValueError, match="has_fp16_weights=True"):
        Q.quant_weight_of(fp16)


# ----------------------------------------------------------------------------------------- memory


def test_backward_saves_packed_not_dequantized_4096():
    n = 4096
    layer = make4("nf4", True, torch.float32, in_f=n, out_f=n)
    qw = Q.quant_weight_of(layer)
    x = xin(8, n).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = Q.quantized_linear(qw, x, layer.bias)
    rotfunc_saved = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y_keep = F.linear(x, Q.dequantize(qw), layer.bias)
    keep_saved = sum(saved)
    packed = sum(t.numel() * t.element_size() for t in qw.tensors() if t is not None)
    assert rotfunc_saved <= packed + 1024 < n * n  # the packed weight (~8.5 MB), nothing float-sized
    assert keep_saved >= n * n * 4  # the dequantized float weight (64 MB)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gk,) = torch.autograd.grad(y_keep.sum(), x)
    assert torch.equal(gx, gk)

    # Resident-memory peaks depend on what the allocator already holds from earlier tests in this process, so
    # they are measured in benchmarks/quant.py (fwd+bwd 3x nf4 4096²: 64 MiB vs 192 MiB keeping W), not here;
    # the saved-tensor accounting above is the exact, deterministic form of the same property.


# ------------------------------------------------------------------------------- requantize / assign


def test_requantize_idempotence_where_bnb_is():
    # nf4 without double quantization: bit-exact
    layer = make4("nf4", False)
    before = fingerprint(layer)
    p = Q.requantize(layer, Q.dequantize(layer))
    assert_same(fingerprint(layer), before)  # requantize never touches the layer
    qw = Q.quant_weight_of(layer)
    assert torch.equal(p.data, qw.data) and torch.equal(p.absmax, qw.absmax) and p.spec == qw.spec
    # nf4 with double quantization: the 4-bit codes are kept, the 8-bit absmax moves (offset = new mean)
    layer = make4("nf4", True)
    qw, p = Q.quant_weight_of(layer), Q.requantize(layer, Q.dequantize(layer))
    assert torch.equal(p.data, qw.data) and p.spec == qw.spec
    assert not torch.equal(Q.dequantize(p), Q.dequantize(qw))
    assert torch.allclose(Q._absmax_f32(p), Q._absmax_f32(qw), rtol=1e-2, atol=0)
    # fp4: a few bytes flip (+0 <-> -0 codes), the dequantized weight is the same
    layer = make4("fp4", False)
    qw, p = Q.quant_weight_of(layer), Q.requantize(layer, Q.dequantize(layer))
    flipped = float((p.data != qw.data).float().mean())
    assert 0 < flipped < 0.02
    assert torch.equal(Q.dequantize(p), Q.dequantize(qw))
    # int8: bit-exact, before and after the first forward moved SCB
    layer = make8()
    for _ in range(2):
        qw, p = Q.quant_weight_of(layer), Q.requantize(layer, Q.dequantize(layer))
        assert torch.equal(p.data, qw.data) and torch.equal(p.absmax, qw.absmax)
        layer(xin(2, IN))


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_requantize_keeps_settings(quant_storage):
    layer = make4("fp4", True, torch.bfloat16, blocksize=128, quant_storage=quant_storage)
    merged = add_delta((OUT, IN))(Q.dequantize(layer), None)[0]
    p = Q.requantize(layer, merged)
    qs = layer.weight.quant_state
    assert p.data.dtype == quant_storage and p.spec.blocksize == 128 and p.spec.quant_type == "fp4"
    assert p.spec.nested_blocksize == qs.state2.blocksize and p.spec.dtype == qs.dtype
    assert p.spec.compute_dtype == torch.bfloat16 and p.data.device == layer.weight.device
    Q.assign_quantized(layer, p)
    qs = layer.weight.quant_state
    assert layer.quant_state is qs and qs.blocksize == 128 and qs.nested and layer.weight.data.dtype == quant_storage
    # bitsandbytes' own forward runs on the assigned payload and agrees with rotfunc's
    x = xin(3, IN)
    assert torch.equal(layer(x), Q.quant_forward(layer, x))


# ---------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_merge_output_follows_float_merge_and_restore_is_bitwise(kind):
    layer = make(kind)
    before = fingerprint(layer)
    x = xin(6, IN)
    y0 = Q.quant_forward(layer, x)
    W, b = Q.dequantize(layer), layer.bias.detach().clone()
    for fn in (rotate_out(OUT), add_delta((OUT, IN))):
        Wm, bm = fn(W, b)
        rec = Q.merge_into(layer, fn)
        assert rec.restorable and rec.quant_type == kind
        back = Q.dequantize(layer)
        assert torch.equal(back, Q.dequantize(Q.requantize(layer, Wm)))  # deterministic requantization
        d = back - Wm
        d64 = back.double() - Wm.double()
        assert rec.max_abs_error == pytest.approx(float(d.abs().max()), rel=1e-6)
        assert rec.rel_fro_error == pytest.approx(float(d64.norm() / Wm.double().norm()), rel=1e-5)
        assert 0 < rec.rel_fro_error < (0.2 if kind != "int8" else 0.01)
        assert torch.equal(layer.bias, bm)
        y = Q.quant_forward(layer, x)
        assert not torch.allclose(y, y0, atol=1e-3)  # the merge did something
        assert torch.allclose(y, F.linear(x, Wm, bm), rtol=0, atol=3 * float(d.abs().max()) * float(x.abs().sum(-1).max()))
        Q.restore(layer, rec)
        assert_same(fingerprint(layer), before)
        assert torch.equal(Q.quant_forward(layer, x), y0)


@pytest.mark.parametrize("after_forward", [False, True])
def test_int8_merge_changes_int8_and_scales(after_forward):
    layer = make8()
    x = xin(6, IN)
    if after_forward:
        layer(x)
    qw0 = Q.quant_weight_of(layer)
    fn = add_delta((OUT, IN), scale=0.02)
    Wm, bm = fn(Q.dequantize(layer), layer.bias.detach())
    rec = Q.merge_into(layer, fn)
    qw1 = Q.quant_weight_of(layer)
    assert qw1.data.dtype == torch.int8 and not torch.equal(qw1.data, qw0.data)
    assert not torch.equal(qw1.absmax, qw0.absmax)
    assert (layer.state.SCB is qw1.absmax) == after_forward
    # the output changes as the float merge predicts, within int8 error: per row |dW| <= SCB / 254 (rounding to
    # the int8 grid) + SCB * 2**-10 (bitsandbytes quantizes W cast to float16), plus float32 accumulation
    y = Q.quant_forward(layer, x)
    row_err = qw1.absmax * (1 / 254 + 2.0**-10)
    bound = x.abs() @ row_err.expand(IN, OUT) + 1e-5
    exact = x.double() @ Wm.double().T + bm.double()
    assert torch.all((y.double() - exact).abs() <= bound.double())
    assert not torch.allclose(y, F.linear(x, Q.dequantize(qw0), layer.bias), atol=1e-3)
    # bitsandbytes' own training forward uses the new int8 weight as well
    assert torch.equal(layer(x), y)
    Q.restore(layer, rec)
    assert torch.equal(Q.quant_weight_of(layer).data, qw0.data) and torch.equal(Q.quant_weight_of(layer).absmax,
                                                                                  qw0.absmax)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_thousand_merge_restore_cycles_bitwise(kind):
    layer = make(kind, in_f=64, out_f=32)
    before = fingerprint(layer)
    fn = rotate_out(32)
    for _ in range(1000):
        rec = Q.merge_into(layer, fn)
        Q.restore(layer, rec)
    assert_same(fingerprint(layer), before)


class _Boom(Exception):
    pass


def _raising(w, b):
    raise _Boom("merge failed")


def _nan(w, b):
    return w.clone().index_fill_(0, torch.tensor([3]), float("nan")), b


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8", "int8-after-forward"])
def test_merge_is_atomic(kind, monkeypatch):
    layer = make(kind.split("-")[0])
    if kind.endswith("after-forward"):
        layer(xin(2, IN))
    before = fingerprint(layer)
    with pytest.raises(_Boom):
        Q.merge_into(layer, _raising)
    assert_same(fingerprint(layer), before)
    with pytest.raises(ValueError, match="non-finite"):
        Q.merge_into(layer, _nan, safe_merge=True)
    assert_same(fingerprint(layer), before)
    with pytest.raises(ValueError, match="bias=None"):
        Q.merge_into(layer, lambda w, b: (w * 2, None))
    assert_same(fingerprint(layer), before)

    # a failure half-way through the assignment is rolled back too
    real_assign = Q.assign_quantized

    def half_assign(layer, payload):
        layer.weight.data = payload.data
        raise _Boom("assignment failed")

    monkeypatch.setattr(Q, "assign_quantized", half_assign)
    with pytest.raises(_Boom):
        Q.merge_into(layer, add_delta((OUT, IN)))
    assert_same(fingerprint(layer), before)
    monkeypatch.setattr(Q, "assign_quantized", real_assign)
    # without safe_merge a NaN merge goes through (as PEFT), and restore still recovers the original bytes
    rec = Q.merge_into(layer, _nan)
    Q.restore(layer, rec)
    assert_same(fingerprint(layer), before)


def test_restore_is_lifo_checked_and_repeatable():
    layer = make4("nf4")
    before = fingerprint(layer)
    r1 = Q.merge_into(layer, rotate_out(OUT))
    mid = fingerprint(layer)
    r2 = Q.merge_into(layer, add_delta((OUT, IN)))
    with pytest.raises(ValueError, match="reverse order"):
        Q.restore(layer, r1)
    Q.restore(layer, r2)
    assert_same(fingerprint(layer), mid)
    Q.restore(layer, r1)
    assert_same(fingerprint(layer), before)
    with pytest.raises(ValueError, match="reverse order"):  # the layer no longer holds r1's merge
        Q.restore(layer, r1)
    Q.restore(layer, r1, check=False)  # the record itself stays valid
    assert_same(fingerprint(layer), before)
    with pytest.raises(ValueError, match="does not fit"):
        Q.restore(make8(), r1)


def test_float_linear_merge_same_api():
    layer = _float_linear()
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    param = layer.weight
    R = rotation(OUT)
    rec = Q.merge_into(layer, lambda w, b: (R @ w, R @ b))
    assert rec.restorable and rec.max_abs_error == 0.0
    assert layer.weight is param  # the Parameter object is kept, its data replaced
    assert torch.allclose(layer.weight, R @ W0, atol=1e-6) and torch.allclose(layer.bias, R @ b0, atol=1e-6)
    # a float record keeps the original tensors: restore (and unmerge_from) put them back bitwise, no inverse
    assert Q.unmerge_from(layer, rec, _raising) is None
    assert torch.equal(layer.weight, W0) and torch.equal(layer.bias, b0)
    with pytest.raises(ValueError, match="no longer holds"):
        Q.restore(layer, rec)  # the layer holds the original again, not what the merge installed
    rec = Q.merge_into(layer, lambda w, b: (w, b))  # a merge_fn returning its input: the record keeps a copy
    layer.weight.data.mul_(2)
    Q.restore(layer, rec)
    assert torch.equal(layer.weight, W0)
    W1 = layer.weight.detach().clone()
    with pytest.raises(_Boom):
        Q.merge_into(layer, _raising)
    with pytest.raises(ValueError, match="non-finite"):
        Q.merge_into(layer, _nan, safe_merge=True)
    assert torch.equal(layer.weight, W1)
    # the quantized path of unmerge_from is the bitwise restore
    q = make4("nf4")
    before = fingerprint(q)
    rec = Q.merge_into(q, rotate_out(OUT))
    assert Q.unmerge_from(q, rec, _raising) is None
    assert_same(fingerprint(q), before)


# ------------------------------------------------------------------------------ AVX512-BF16 CPU layout


def _repack(layer):
    """Put the layer into bitsandbytes' AVX512-BF16 CPU layout, exactly as Linear4bit.forward does."""
    if bnbf.has_avx512bf16():  # this machine: the real forward does it (eval mode, no grad)
        layer.eval()
        with torch.no_grad():
            layer(xin(2, IN))
    else:  # the same call Linear4bit.forward makes on such CPUs
        layer.weight.data, _ = bnbf._convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu


@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cpu_packed_layout(quant_type, compress_statistics):
    layer = make4(quant_type, compress_statistics, torch.float32)
    qw0 = Q.quant_weight_of(layer)
    absmax0 = Q._absmax_f32(qw0)
    W0 = Q.dequantize(layer)
    _repack(layer)
    assert layer.weight.data.shape == (OUT, IN // 2)  # really a different layout
    packed = fingerprint(layer)
    qw = Q.quant_weight_of(layer)
    assert_same(fingerprint(layer), packed)  # reading never mutates
    assert torch.equal(qw.data, qw0.data)  # codes recovered exactly
    assert torch.equal(qw.absmax, absmax0.bfloat16().float())  # the absmax the layer now holds
    assert qw.spec.dtype == torch.float32 and qw.spec.nested_blocksize == 0
    W = Q.dequantize(layer)
    assert torch.allclose(W, W0, rtol=2 * EPS[torch.bfloat16], atol=0)
    x = xin(3, IN)
    assert torch.equal(Q.quant_forward(layer, x), F.linear(x, W, layer.bias))
    # merge/restore on a repacked layer: merged in the standard layout, restored to the packed bytes
    rec = Q.merge_into(layer, add_delta((OUT, IN)))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert layer.weight.quant_state.nested == compress_statistics
    Q.restore(layer, rec)
    assert_same(fingerprint(layer), packed)
    assert torch.equal(Q.dequantize(layer), W)
