"""Many adapters on one frozen base: stacked params, vmapped ensemble steps and mixed-batch training, each
pinned against K separate runs, on float, int8 and nf4 layers (the small model holds all three kinds)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call, grad

import rotfunc
from shim_models import LINEARS, WIDTH, mixed_model

METHODS = ("road", "oft", "randlora")


def _config(method, targets=LINEARS, **kw):
    targets = list(targets)
    if method == "road":
        return rotfunc.RoadConfig(variant=kw.pop("variant", "road_2"), group_size=8, init_weights=False,
                                  target_modules=targets, **kw)
    if method == "oft":
        return rotfunc.OFTConfig(oft_block_size=8, r=0, init_weights=False, target_modules=targets, **kw)
    return rotfunc.RandLoraConfig(r=4, randlora_alpha=4, init_weights=False, target_modules=targets, **kw)


def _perturbed(model, g, scale):
    """Every adapter's params moved by ``scale`` * N(0, 1): no adapter is near another or near the identity."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            if ".rotfunc." in k:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _x(n, g, seq=None):
    shape = (n, WIDTH) if seq is None else (n, seq, WIDTH)
    return torch.randn(shape, generator=g)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------ stacking helpers


def test_stack_unstack_round_trip_and_rename(gen):
    model = mixed_model()
    cfg = _config("road")
    for n in ("s0", "s1", "s2"):
        rotfunc.attach(model, cfg, adapter_name=n, generator=gen)
    ps = [rotfunc.adapter_params(model, n) for n in ("s0", "s1", "s2")]
    stacked = rotfunc.stack_params(ps)
    assert list(stacked) == list(ps[0])  # keyed like the first adapter
    for k, v in stacked.items():
        assert v.shape[0] == 3
    back = rotfunc.unstack_params(stacked, ["s0", "s1", "s2"])
    for got, want in zip(back, ps):
        assert got.keys() == want.keys()
        for k in got:
            assert torch.equal(got[k], want[k])
    # a stacked value shares no storage with its inputs
    k0 = next(iter(stacked))
    stacked[k0].add_(1.0)
    assert not torch.equal(stacked[k0][0], ps[0][k0])
    # load a member into another adapter
    rotfunc.load_params(model, rotfunc.unstack_params(rotfunc.stack_params([ps[2]]), ["s0"])[0])
    for k, v in rotfunc.adapter_params(model, "s0").items():
        assert torch.equal(v, ps[2][k.replace(".s0.", ".s2.")])


def test_stack_params_refuses_mismatched_members(gen):
    model = mixed_model()
    rotfunc.attach(model, _config("road"), adapter_name="a", generator=gen)
    rotfunc.attach(model, _config("road", targets=("0", "2")), adapter_name="b", generator=gen)
    rotfunc.attach(model, _config("road", variant="road_1"), adapter_name="c", generator=gen)
    a, b, c = (rotfunc.adapter_params(model, n) for n in "abc")
    with pytest.raises(ValueError, match=r"params\[1\] has other layers/fields"):
        rotfunc.stack_params([a, b])
    with pytest.raises(ValueError, match=r"params\[1\]\[.*has shape="):
        rotfunc.stack_params([a, c])
    with pytest.raises(TypeError, match="non-empty sequence"):
        rotfunc.stack_params(a)
    with pytest.raises(ValueError, match="must be a sequence of 1 names"):
        rotfunc.unstack_params(rotfunc.stack_params([a]), ["x", "y"])
    with pytest.raises(ValueError, match="is not an adapter param key"):
        rotfunc.rename_params({"0.weight": torch.zeros(1)}, "a")


@pytest.mark.parametrize("method", METHODS)
def test_init_params_follows_the_config_and_changes_nothing(method):
    model = mixed_model()
    rotfunc.attach(model, _config(method), adapter_name="a", generator=torch.Generator().manual_seed(3))
    before = rotfunc.adapter_params(model, "a")
    fresh = rotfunc.init_params(model, "a", generator=torch.Generator().manual_seed(3))
    assert fresh.keys() == before.keys()
    for k in fresh:  # same generator, same draws: the attach-time init
        assert torch.equal(fresh[k], before[k]), k
    other = rotfunc.init_params(model, "a", generator=torch.Generator().manual_seed(4))
    assert any(not torch.equal(other[k], before[k]) for k in before)
    for k, v in rotfunc.adapter_params(model, "a").items():
        assert torch.equal(v, before[k])


# ------------------------------------------------------------------------------------------ ensembles


def _member_loss(model, x, target):
    def loss_fn(p, x, target):
        out = functional_call(model, p, (x,))
        return ((out - target) ** 2).mean()

    return loss_fn


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("data", ["shared", "per_member"])
def test_ensemble_step_equals_k_separate_runs(method, data):
    """K seeds x K learning rates trained at once (3 vmapped Adam steps) == K separate loops."""
    k = 3
    model = mixed_model()
    rotfunc.attach(model, _config(method), adapter_name="e", generator=torch.Generator().manual_seed(0))
    members = [rotfunc.init_params(model, generator=torch.Generator().manual_seed(s)) for s in range(k)]
    g = torch.Generator().manual_seed(1)
    scale = 0.01 if method == "randlora" else 0.2  # RandLoRA's scaling (alpha/r) multiplies its params' effect
    for m in members:
        for v in m.values():
            v.add_(scale * torch.randn(v.shape, generator=g))
    lrs = torch.tensor([1e-3, 1e-2, 3e-2])
    if data == "shared":
        xs, ts = _x(6, g, seq=2), _x(6, g, seq=2)
        batch_in_dims = None
    else:
        xs, ts = _x(k * 6, g, seq=2).unflatten(0, (k, 6)), _x(k * 6, g, seq=2).unflatten(0, (k, 6))
        batch_in_dims = 0
    loss_fn = _member_loss(model, xs, ts)
    step = rotfunc.ensemble_step(loss_fn, batch_in_dims=batch_in_dims, weight_decay=0.01)
    stacked = rotfunc.stack_params(members)
    state = rotfunc.ensemble_init(stacked)
    all_losses = []
    for _ in range(3):
        stacked, state, losses = step(stacked, state, lrs, xs, ts)
        all_losses.append(losses)
    assert all_losses[0].shape == (k,) and float(state.step) == 3.0
    # the reference: K separate loops of rotfunc.value_and_grad + rotfunc.adam (plain autograd underneath)
    value_and_grad = rotfunc.value_and_grad(loss_fn)
    for i in range(k):
        opt = rotfunc.adam(float(lrs[i]), weight_decay=0.01)
        p, s = members[i], opt.init(members[i])
        for t in range(3):
            args = (xs, ts) if data == "shared" else (xs[i], ts[i])
            loss, grads = value_and_grad(p, *args)
            p, s = opt.update(grads, s, p)
            _close(all_losses[t][i], loss)
        for key in p:  # Adam steps are ~lr each; round-off of the two engines' gradients moves them by << lr
            _close(stacked[key][i], p[key], 1e-4)
    # the members really differ (different seeds and learning rates)
    key = next(iter(stacked))
    assert not torch.allclose(stacked[key][0], stacked[key][1])


def test_ensemble_step_checks_its_arguments():
    model = mixed_model()
    rotfunc.attach(model, _config("road"), generator=torch.Generator().manual_seed(0))
    stacked = rotfunc.stack_params([rotfunc.adapter_params(model)] * 2)
    x = torch.zeros(2, WIDTH)
    step = rotfunc.ensemble_step(_member_loss(model, x, x), batch_in_dims=(None,))
    with pytest.raises(ValueError, match="has 1 entries for 2 args"):
        step(stacked, rotfunc.ensemble_init(stacked), 0.1, x, x)
    with pytest.raises(TypeError, match="must be an EnsembleState"):
        step(stacked, {}, 0.1, x)
    with pytest.raises(ValueError, match=r"lr has shape=\(2, 1\)"):
        step(stacked, rotfunc.ensemble_init(stacked), torch.ones(2, 1), x)
    with pytest.raises(TypeError, match=r"unknown Adam keyword\(s\) \['lr'\]"):
        rotfunc.ensemble_step(_member_loss(model, x, x), lr=0.1)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_vmapped_minilm_ensemble_equals_a_loop_without_fallback_warnings(minilm, kind):
    """On the quantized MiniLM with eager attention: vmap over stacked params == K separate grads, and no
    torch batching-rule fallback warning (SDPA's CPU backward has none; eager attention does)."""
    model = minilm.model(kind)
    model.set_attn_implementation("eager")
    cfg = rotfunc.RoadConfig(variant="road_1", group_size=64, init_weights=False, target_modules=["query", "value"])
    rotfunc.attach(model, cfg, generator=torch.Generator().manual_seed(0))
    members = [rotfunc.init_params(model, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    batch = minilm.batch(n=2, max_length=8)

    def loss_fn(p, batch):
        return functional_call(model, p, args=(), kwargs=batch).last_hidden_state[:, 0].square().mean()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "performance drop ... batching rule" UserWarning fails here
        got = torch.func.vmap(grad(loss_fn), in_dims=(0, None))(rotfunc.stack_params(members), batch)
    for i, p in enumerate(members):
        want = grad(loss_fn)(p, batch)
        for k in want:
            _close(got[k][i], want[k], 1e-4)


# ------------------------------------------------------------------------------------------ mixed-batch training


def _all_params(model, names):
    return {k: v for n in names for k, v in rotfunc.adapter_params(model, n).items()}


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_training_gives_each_adapter_its_own_rows_gradient(method):
    """K adapters on K data sources in one forward (BASE_ADAPTER rows and an adapter on some layers only
    included): each adapter's gradient equals its gradient on its own rows alone, in training mode."""
    g = torch.Generator().manual_seed(0)
    model = mixed_model()
    rotfunc.attach(model, _config(method), adapter_name="a", generator=g)
    rotfunc.attach(model, _config(method), adapter_name="b", generator=g)
    rotfunc.attach(model, _config(method, targets=("2", "6")), adapter_name="c", generator=g)
    _perturbed(model, g, 0.01 if method == "randlora" else 0.3)
    model.train()
    rows = ["a", "b", rotfunc.BASE_ADAPTER, "c", "a", "c", "b", "a"]
    x, target = _x(len(rows), g, seq=3), _x(len(rows), g, seq=3)
    params = _all_params(model, "abc")

    def loss_fn(p, x, target, rows):
        out = functional_call(model, p, (x,), {"adapter_names": rows})
        return ((out - target) ** 2).sum()

    grads = rotfunc.split_by_adapter(grad(loss_fn)(params, x, target, rows))
    assert set(grads) == {"a", "b", "c"}
    for name in "abc":
        idx = [i for i, r in enumerate(rows) if r == name]
        rotfunc.set_adapter(model, name)
        own = rotfunc.adapter_params(model, name)
        want = grad(lambda p: ((functional_call(model, p, (x[idx],)) - target[idx]) ** 2).sum())(own)
        assert grads[name].keys() == want.keys()
        for k in want:  # float32 sums in another order (one batched pass vs the rows alone): 1e-4 relative
            _close(grads[name][k], want[k], 1e-4)
    # the same gradients through plain autograd on the model's parameters
    out = model(x, adapter_names=rows)
    ((out - target) ** 2).sum().backward()
    table = dict(model.named_parameters())
    for name in "abc":
        for k, v in grads[name].items():
            _close(table[k].grad, v, 1e-4)


# ------------------------------------------------------------------------------------------ the one-pass mixed path


def _one_pass_model(method, g):
    """Adapters a, b on every layer and c on layers 2 and 6 only, all of one config: every adapted layer takes the
    one-pass ``apply_mixed`` path (c's rows there get the base output on layers 0 and 4)."""
    model = mixed_model()
    rotfunc.attach(model, _config(method), adapter_name="a", generator=g)
    rotfunc.attach(model, _config(method), adapter_name="b", generator=g)
    cfg_c = _config(method, targets=("2", "6"))
    rotfunc.attach(model, cfg_c, adapter_name="c", generator=g)
    _perturbed(model, g, 0.01 if method == "randlora" else 0.3)
    return model


def _one_pass_calls(model):
    calls = []
    for _, w in rotfunc.adapted_layers(model):
        for cfg in {id(c): c for c in w.configs.values()}.values():
            original = type(cfg).apply_mixed

            def spy(self, *a, _original=original, **kw):
                calls.append(type(self).__name__)
                return _original(self, *a, **kw)

            return calls, type(cfg), original, spy
    raise AssertionError("no adapted layer")


@pytest.mark.parametrize("method", METHODS)
@given(rows=st.lists(st.sampled_from(["a", "b", "c", rotfunc.BASE_ADAPTER]), min_size=1, max_size=7),
       seq=st.sampled_from([None, 3]), training=st.booleans())
def test_one_pass_mixed_batch_equals_each_row_alone(method, rows, seq, training):
    g = torch.Generator().manual_seed(len(rows))
    model = _one_pass_model(method, g)
    model.train(training)
    x = _x(len(rows), g, seq=seq)
    calls, cls, original, spy = _one_pass_calls(model)
    try:
        cls.apply_mixed = spy
        with torch.no_grad():
            mixed = model(x, adapter_names=rows)
    finally:
        cls.apply_mixed = original
    if len(set(rows)) > 1:  # every layer holding one of the rows' adapters went through the one-pass path
        assert len(calls) == (4 if set(rows) & {"a", "b"} else 2 if "c" in rows else 0)
    with torch.no_grad():
        for i, n in enumerate(rows):
            if n == rotfunc.BASE_ADAPTER:
                with rotfunc.disabled(model):
                    alone = model(x[i : i + 1])
            else:
                rotfunc.set_adapter(model, n)
                alone = model(x[i : i + 1])
            _close(mixed[i : i + 1], alone)


@pytest.mark.parametrize("method", METHODS)
@given(rows=st.lists(st.sampled_from(["a", "b", "c", rotfunc.BASE_ADAPTER]), min_size=2, max_size=7))
def test_grouped_rows_equal_the_batch_in_any_order_forward_and_grad(method, rows):
    """``group_rows`` orders a batch adapter after adapter; the grouped batch (every layer reads slices: one-pass
    layers and the per-group fallback of the two-config layer) gives the rows' outputs and the adapters' grads
    of the batch in its own order, which every layer gathers. Checked for every method, with BASE_ADAPTER rows
    and an adapter (c) on two layers only."""
    g = torch.Generator().manual_seed(len(rows))
    model = _one_pass_model(method, g)
    rotfunc.attach(model, _config("road" if method != "road" else "oft", targets=("4",)), adapter_name="d",
                   generator=g)  # a second config on layer 4: its rows take the per-group fallback there
    rows = [("d" if r == "c" and i % 2 else r) for i, r in enumerate(rows)]
    order, grouped = rotfunc.group_rows(rows)
    assert sorted(order.tolist()) == list(range(len(rows))) and grouped == [rows[i] for i in order]
    runs = [n for n, _ in itertools.groupby(grouped)]
    assert len(runs) == len(set(runs))  # each adapter's rows in one run
    x, target = _x(len(rows), g, seq=3), _x(len(rows), g, seq=3)
    params = _all_params(model, [n for n in "abcd" if n in rows])

    def loss_fn(p, x, target, rows):
        return ((functional_call(model, p, (x,), {"adapter_names": rows}) - target) ** 2).sum()

    with torch.no_grad():
        _close(model(x[order], adapter_names=grouped), model(x, adapter_names=rows)[order])
    if params:
        got, want = grad(loss_fn)(params, x[order], target[order], grouped), grad(loss_fn)(params, x, target, rows)
        for k in want:
            _close(got[k], want[k], 1e-4)


def test_group_rows_refuses_a_string():
    with pytest.raises(TypeError, match="sequence of str"):
        rotfunc.group_rows("abc")


def test_one_pass_mixed_batch_applies_oft_module_dropout_in_training_only():
    """Module dropout 1.0 (every block the identity) gives the base output in training mode, and nothing in eval."""
    g = torch.Generator().manual_seed(0)
    model = mixed_model()
    method, kw = "oft", {"module_dropout": 1.0}
    for n in "ab":
        rotfunc.attach(model, _config(method, **kw), adapter_name=n, generator=g)
    _perturbed(model, g, 0.01 if method == "randlora" else 0.3)
    x, rows = _x(4, g), ["a", "b", "b", "a"]
    model.eval()
    with torch.no_grad(), rotfunc.disabled(model):
        base = model(x)
    model.train()
    with torch.no_grad():
        trained = model(x, adapter_names=rows)
    model.eval()
    with torch.no_grad():
        evaluated = model(x, adapter_names=rows)
    _close(trained, base)
    assert not torch.allclose(evaluated, base, atol=1e-3)


def test_one_pass_mixed_batch_applies_randlora_dropout_in_training_only():
    """RandLoRA's (inverted) input dropout on the update, in training mode only: the update is linear in the
    dropped input, so its mean over many training forwards is the eval-mode update."""
    g = torch.Generator().manual_seed(0)
    model = mixed_model()
    for n in "ab":
        rotfunc.attach(model, _config("randlora", targets=("6",), randlora_dropout=0.5), adapter_name=n, generator=g)
    _perturbed(model, g, 0.05)
    model.eval()
    x, rows = _x(4, g), ["a", "b", "b", rotfunc.BASE_ADAPTER]
    with torch.no_grad(), rotfunc.disabled(model):
        base = model(x)
    with torch.no_grad():
        evaluated = model(x, adapter_names=rows)
        model.train()
        torch.manual_seed(0)
        trained = torch.stack([model(x, adapter_names=rows) for _ in range(400)])
    update = (evaluated - base).abs().max()
    assert update > 1e-2
    assert not torch.allclose(trained[0], evaluated, atol=update * 1e-2)  # dropout was applied
    assert (trained.mean(0) - evaluated).abs().max() < 0.2 * update
    _close(trained[:, 3], base[3].expand(400, -1))  # BASE_ADAPTER rows: no update at all


def test_one_pass_mixed_batch_grad_compiles_fullgraph():
    """The one-pass path (one method per layer, BASE_ADAPTER rows) under
    torch.compile(grad, fullgraph=True) equals the eager grad."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    model = mixed_model()
    # OFT's one-pass path (gather + one einsum, no host reads) is left out: it doubles this test's compile time
    for method, layers in (("road", ("0",)), ("randlora", ("6",))):
        for n in "ab":
            rotfunc.attach(model, _config(method, targets=layers), adapter_name=f"{method}_{n}", generator=g)
    _perturbed(model, g, 0.01)
    names = rotfunc.adapter_names(model)
    params = _all_params(model, names)
    rows = ["road_a", "randlora_b", rotfunc.BASE_ADAPTER, "randlora_a", "road_b", "road_a"]
    x = _x(len(rows), g)

    def loss(p, x):
        return functional_call(model, p, (x,)).square().mean()

    with rotfunc.adapter_batch(model, rows):
        got = torch.compile(grad(loss), fullgraph=True)(params, x)
        want = grad(loss)(params, x)
    for k in want:
        _close(got[k], want[k], 1e-4)
    for n in names:
        assert max(float(want[k].abs().max()) for k in want if f".{n}." in k) > 0, n
