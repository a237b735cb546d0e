"""rotfunc.value_and_grad and the pure optimizers: the autograd path gives torch.func's gradients on real float,
int8 and nf4 models, every torch.func composition takes the functorch path and still works, no autograd graph
outlives a step, and the optimizers' updates equal torch.optim's."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

import rotfunc
from rotfunc import RoadParams, apply_road, road_init
from rotfunc.demo import embed
from rotfunc.train import uses_autograd

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")

STATICS = dict(variant="road_2", group_size=4)


def _road_problem(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 6, generator=g, dtype=dtype)
    x, y = torch.randn(5, 6, generator=g, dtype=dtype), torch.randn(5, 8, generator=g, dtype=dtype)
    p = road_init(8, **STATICS, dtype=dtype)
    p = RoadParams(p.theta + 0.3 * torch.randn(p.theta.shape, generator=g, dtype=dtype),
                   p.alpha + 0.2 * torch.randn(p.alpha.shape, generator=g, dtype=dtype))
    return W, x, y, p


def _road_loss(W):
    def loss(p, x, y):
        return ((apply_road(p, x @ W.T, **STATICS) - y) ** 2).mean()

    return loss


# ----------------------------------------------------------------------------------------- the two paths


def test_eager_path_on_a_pytree_equals_torch_func_and_leaves_inputs_alone():
    W, x, y, p = _road_problem()
    loss = _road_loss(W)
    seen = []

    def spy(p, x, y):
        seen.append(uses_autograd())
        return loss(p, x, y)

    before = [t.clone() for t in p]
    value, g = rotfunc.value_and_grad(spy)(p, x, y)
    assert seen == [True]
    assert isinstance(g, RoadParams)
    ref_g, ref_v = grad_and_value(loss)(p, x, y)
    torch.testing.assert_close(value, ref_v, rtol=1e-6, atol=0)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert value.grad_fn is None and all(t.grad_fn is None and not t.requires_grad for t in g)
    assert all(torch.equal(a, b) and a.grad is None for a, b in zip(p, before))


def test_has_aux_argnums_and_unused_leaves():
    W, x, y, p = _road_problem()
    extra = torch.ones(3)

    def loss(scale, params, x):
        out = apply_road(params["road"], x @ W.T, **STATICS)
        return scale * (out**2).mean(), {"out": out}

    params = {"road": p, "unused": extra}
    (value, aux), g = rotfunc.value_and_grad(loss, argnums=1, has_aux=True)(2.0, params, x)
    ref_g, (ref_v, _) = grad_and_value(loss, argnums=1, has_aux=True)(2.0, params, x)
    torch.testing.assert_close(value, ref_v)
    assert aux["out"].grad_fn is None
    torch.testing.assert_close(g["road"].theta, ref_g["road"].theta, rtol=1e-5, atol=1e-7)
    assert torch.equal(g["unused"], torch.zeros(3))  # as torch.func: zeros for a leaf the loss does not use


def test_errors_name_the_problem():
    W, x, y, p = _road_problem()
    with pytest.raises(ValueError, match=r"scalar tensor, got shape=\(5, 8\)"):
        rotfunc.value_and_grad(lambda p: apply_road(p, x @ W.T, **STATICS))(p)
    with pytest.raises(TypeError, match="dtype=torch.int64"):
        rotfunc.value_and_grad(lambda p: p["a"].sum())({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="argnums=2"):
        rotfunc.value_and_grad(lambda p: p.sum(), argnums=2)(torch.ones(2))


@pytest.mark.parametrize("kind", [None, "int8", "nf4"])
def test_real_model_grads_equal_torch_func(minilm, kind):
    model, batch = minilm.model(kind), minilm.batch(n=2, max_length=8)
    rotfunc.attach(model, rotfunc.RoadConfig(variant="road_2", group_size=32, target_modules=["query", "dense"]))
    g0 = torch.Generator().manual_seed(1)
    params = {k: v + 0.2 * torch.randn(v.shape, generator=g0) for k, v in rotfunc.adapter_params(model).items()}
    target = torch.nn.functional.normalize(torch.randn(2, 384, generator=g0), dim=-1)

    def make_loss(m, t):
        def loss(p, batch):
            emb = embed(lambda **kw: functional_call(m, p, args=(), kwargs=kw), batch)
            return ((emb - t) ** 2).sum()

        return loss

    loss = make_loss(model, target)
    value, g = rotfunc.value_and_grad(loss)(params, batch)
    ref_g, ref_v = grad_and_value(loss)(params, batch)
    assert g.keys() == params.keys()
    assert all(p.grad is None for p in model.parameters())
    if kind is None:  # both float32 engines against a float64 recomputation
        m64 = copy.deepcopy(model).double()
        p64 = {k: v.double() for k, v in params.items()}
        ref_g = grad(make_loss(m64, target.double()))(p64, batch)
    for k in params:
        scale = ref_g[k].abs().max().item()
        torch.testing.assert_close(g[k].double(), ref_g[k].double(), rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(value, ref_v, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------- composition


def test_inside_transforms_it_takes_the_functorch_path_and_composes():
    W, x, y, p = _road_problem()
    loss = _road_loss(W)
    seen = []

    def spy(p, x, y):
        seen.append(uses_autograd())
        return loss(p, x, y)

    vg = rotfunc.value_and_grad(spy)

    # per-sample gradients under vmap
    per_sample = vmap(lambda xi, yi: vg(p, xi[None], yi[None])[1], in_dims=(0, 0))(x, y)
    ref = vmap(lambda xi, yi: grad(loss)(p, xi[None], yi[None]))(x, y)
    for a, b in zip(per_sample, ref):
        torch.testing.assert_close(a, b)

    # grad of a function of the gradient (second order)
    def gnorm(p):
        return sum((t**2).sum() for t in vg(p, x, y)[1])

    def gnorm_ref(p):
        return sum((t**2).sum() for t in grad(loss)(p, x, y))

    for a, b in zip(grad(gnorm)(p), grad(gnorm_ref)(p)):
        torch.testing.assert_close(a, b)

    # forward-over-reverse: jvp of the gradient
    tangent = RoadParams(*(torch.ones_like(t) for t in p))
    _, got = jvp(lambda q: vg(q, x, y)[1], (p,), (tangent,))
    _, want = jvp(lambda q: grad(loss)(q, x, y), (p,), (tangent,))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert seen and not any(seen)


def test_compiled_eager_path_equals_uncompiled():
    W, x, y, p = _road_problem()
    loss = _road_loss(W)
    value, g = rotfunc.value_and_grad(loss, compile=True, fullgraph=True)(p, x, y)
    ref_v, ref_g = rotfunc.value_and_grad(loss)(p, x, y)
    torch.testing.assert_close(value, ref_v)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- no leaks


def test_no_graph_outlives_a_step():
    W, x, y, p = _road_problem()
    saved = []

    def loss(p, x, y):
        h = apply_road(p, x @ W.T, **STATICS)
        saved.append(weakref.ref(h))  # h is saved by mul's backward: alive as long as the graph
        return (h * h).mean(), h

    vg = rotfunc.value_and_grad(loss, has_aux=True)
    kept = [vg(p, x, y) for _ in range(3)]  # every returned value, aux and grad kept alive
    gc.collect()
    assert len(saved) == 3 and all(r() is None for r in saved)
    assert all(v.grad_fn is None and aux.grad_fn is None for (v, aux), _ in kept)


def test_real_model_steps_do_not_grow_memory(minilm):
    model, batch = minilm.model("nf4"), minilm.batch(n=2, max_length=8)
    rotfunc.attach(model, rotfunc.OFTConfig(oft_block_size=32, target_modules=["query"]))
    params = rotfunc.adapter_params(model)
    live = []

    def loss(p, batch):
        out = functional_call(model, p, args=(), kwargs=batch).last_hidden_state
        live.append(weakref.ref(out))
        return out.square().mean()

    vg, opt = rotfunc.value_and_grad(loss), rotfunc.adam(1e-2)
    state = opt.init(params)
    for _ in range(3):
        value, g = vg(params, batch)
        params, state = opt.update(g, state, params)
    gc.collect()
    assert all(r() is None for r in live)  # every step's activations (and graph) freed
    assert all(p.grad is None for p in model.parameters())
    assert all(t.grad_fn is None for t in list(params.values()) + list(state.mu) + list(state.nu))


# ---------------------------------------------------------------------------------------------- optimizers


def _torch_reference(make, params, grads_seq):
    ps = [torch.nn.Parameter(t.clone()) for t in params]
    opt = make(ps)
    for grads in grads_seq:
        for q, g in zip(ps, grads):
            q.grad = g.clone()
        opt.step()
    return [q.detach() for q in ps]


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: rotfunc.sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
        (lambda: rotfunc.sgd(0.1, momentum=0.9, weight_decay=0.01),
         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)),
        (lambda: rotfunc.adam(1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
        (lambda: rotfunc.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1),
         lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ],
    ids=["sgd", "sgd-momentum-wd", "adam", "adamw"],
)
def test_optimizer_updates_equal_torch_optim(ours, theirs):
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
    grads_seq = [{k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()} for _ in range(4)]
    opt = ours()
    state, p = opt.init(params), params
    before = {k: v.clone() for k, v in params.items()}
    for grads in grads_seq:
        p, state = opt.update(grads, state, p)
    want = _torch_reference(theirs, list(params.values()), [list(gr.values()) for gr in grads_seq])
    for k, w in zip(p, want):
        torch.testing.assert_close(p[k], w, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(params[k], before[k]) for k in params)  # inputs untouched
    assert not torch.equal(p["a"], params["a"])


def test_optimizer_refuses_mismatched_trees():
    opt = rotfunc.sgd(0.1)
    with pytest.raises(ValueError, match="different structures"):
        opt.update({"a": torch.ones(2)}, opt.init({"b": torch.ones(2)}), {"b": torch.ones(2)})
    with pytest.raises(ValueError, match="learning_rate=-1"):
        rotfunc.adam(-1)
