"""Many adapters on the nf4 causal LM (SmolLM2-135M, ``rotfunc.causal_lm``): the mixed-batch training recipe and
the vmapped ensemble step, each pinned against K separate runs, for RoAD, OFT and RandLoRA.

The nf4 model is loaded once per session (a second load beside ``test_causal_lm``'s: ~3-4 s) and cut to its first
two decoder layers for each test (a deep copy of those only): every adapted projection kind (q, k, v, o, gate, up,
down) sits in each layer, so two layers already send a gradient from one adapted layer back through attention,
norms and untargeted ops into another. 5-6 rows of 8 tokens keep each test around a second.

Tolerances (one for every method; the two sides are float32 through the same engine, so what differs is only
the summation order of the batched rows): gradients must agree to 1e-4 of their norm -- the bound
``test_causal_lm`` holds rotfunc's and PEFT's gradients to against a float64 reference on this model -- and each
test also shows that the other answer (an adapter trained on rows that are not its own, another member's
learning rate) is off by far more, so no test passes by accident.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import rotfunc
from rotfunc import bind
from rotfunc.causal_lm import adapter_config, token_blocks
from test_causal_lm import _copy, randomize_

METHODS = ("road", "oft", "randlora")
N_LAYERS, TOKENS = 2, 8
EPS32 = torch.finfo(torch.float32).eps
TEXT = (
    "Return a new list containing the items of the iterable in ascending order, without changing it. The quick "
    "brown fox jumps over the lazy dog, and then it runs back into the forest again. A context manager that "
    "temporarily changes the working directory and restores it on exit, even when an exception is raised."
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """1 torch thread here: on a loaded 2-core machine, 2-thread OpenMP barriers made these steps 3-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(tok, n):
    blocks = token_blocks(tok, [TEXT], block=TOKENS)
    assert len(blocks) >= n
    return blocks[:n]


def _row_losses(logits, ids):
    """Per-row mean next-token cross-entropy, shape (rows,)."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return nll.view(ids.shape[0], -1).mean(1)


def _model(smollm2_nf4, method, names, *, seed=0):
    """A 2-layer nf4 copy in training mode with adapters ``names`` of ``method``'s demo config on every
    projection, each with its own random non-identity params."""
    model = _copy(smollm2_nf4[1], N_LAYERS).train()
    for i, name in enumerate(names):
        bind.attach(model, adapter_config(method), adapter_name=name)
        bind.set_adapter(model, name)
        randomize_(model, seed=seed + i, scale=0.2)
    return model


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_training_step_gives_each_adapter_its_own_rows_grads(smollm2_nf4, method):
    """One ``rotfunc.value_and_grad`` step through ``model(input_ids, adapter_names=rows)`` with 3 adapters and
    BASE_ADAPTER rows, in training mode: each adapter's loss share and gradients equal a separate run of that
    adapter on its own rows."""
    tok, _ = smollm2_nf4
    names = ("a", "b", "c")
    model = _model(smollm2_nf4, method, names)
    rows = ["a", "b", rotfunc.BASE_ADAPTER, "c", "a", "b"]
    ids = _ids(tok, len(rows))
    params = {k: v for n in names for k, v in rotfunc.adapter_params(model, n).items()}

    def loss_fn(p, ids, rows):
        kwargs = {"input_ids": ids, "use_cache": False}
        if rows is not None:
            kwargs["adapter_names"] = rows
        return _row_losses(functional_call(model, p, args=(), kwargs=kwargs).logits, ids).sum()

    step = rotfunc.value_and_grad(loss_fn)
    loss, grads = step(params, ids, rows)
    grads = rotfunc.split_by_adapter(grads)
    assert set(grads) == set(names)

    total = 0.0
    for name in names:
        idx = [i for i, r in enumerate(rows) if r == name]
        bind.set_adapter(model, name)
        own = rotfunc.adapter_params(model, name)
        want_loss, want = step(own, ids[idx], None)
        total += want_loss.item()
        assert grads[name].keys() == want.keys()
        for k in want:
            assert want[k].norm() > 0, k
            assert _rel(grads[name][k], want[k]) <= 1e-4, (name, k)
        if name == "a":  # the test can fail: the same adapter trained on every row has other gradients
            _, on_all = step(own, ids, None)
            assert max(_rel(on_all[k], want[k]) for k in want) > 1e-2
    with torch.no_grad(), bind.disabled(model):  # the base rows' loss, with no adapter
        base = _row_losses(model(input_ids=ids[[2]], use_cache=False).logits, ids[[2]]).sum().item()
    assert loss.item() == pytest.approx(total + base, rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_vmapped_ensemble_step_equals_k_separate_steps(smollm2_nf4, method):
    """K = 3 members (3 seeds, 3 learning rates) trained at once by ``rotfunc.ensemble_step`` (vmap over the
    stacked params and Adam state, eager attention) equal 3 separate ``value_and_grad`` + ``adam`` loops: the
    losses of both steps and the params after them."""
    tok, _ = smollm2_nf4
    model = _model(smollm2_nf4, method, ("e",))
    model.set_attn_implementation("eager")  # CPU SDPA's backward has no batching rule (a warning = an error here)
    ids = _ids(tok, 2)
    start = rotfunc.adapter_params(model)
    members = []
    for s in range(3):  # three seeds around the randomized adapter
        g = torch.Generator().manual_seed(100 + s)
        members.append({k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in start.items()})
    lrs = torch.tensor([1e-4, 3e-4, 1e-3])

    def loss_fn(p, ids):
        out = functional_call(model, p, args=(), kwargs={"input_ids": ids, "use_cache": False})
        return _row_losses(out.logits, ids).mean()

    step = rotfunc.ensemble_step(loss_fn)
    stacked = rotfunc.stack_params(members)
    state = rotfunc.ensemble_init(stacked)
    losses = []
    for _ in range(2):
        stacked, state, loss = step(stacked, state, lrs, ids)
        losses.append(loss)
    assert losses[0].shape == (3,)

    vg = rotfunc.value_and_grad(loss_fn)
    for i, p in enumerate(members):
        opt = rotfunc.adam(float(lrs[i]))
        s = opt.init(p)
        for t in range(2):
            loss, g = vg(p, ids)
            p, s = opt.update(g, s, p)
            assert losses[t][i].item() == pytest.approx(loss.item(), rel=1e-5), (i, t)
        for k in p:
            moved = (p[k] - members[i][k]).double()
            assert moved.norm() > 0, k
            # the params after two Adam steps: the same to 1e-4 of how far the steps moved them, plus float32's
            # rounding of the params themselves (both sides round p - lr * update, computed in another order)
            err = (stacked[k][i].double() - p[k].double()).norm()
            assert err <= 1e-4 * moved.norm() + 2 * EPS32 * p[k].double().norm(), (i, k)
    # the members differ: another member's learning rate moves the params elsewhere
    k = next(iter(stacked))
    assert (stacked[k][0] - stacked[k][2]).norm() > 0.1 * (stacked[k][2] - members[2][k]).norm()
