"""The shims on a real pretrained model (all-MiniLM-L6-v2), plain, int8 and nf4."""


import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import rotfunc
from rotfunc import bind
from rotfunc.demo import embed

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")

QUANT = [None, "int8", "nf4"]


def configs(targets=("query", "value")):
    t = list(targets)
    return {
        "road": rotfunc.RoadConfig(variant="road_2", group_size=32, target_modules=t),
        "oft": rotfunc.OFTConfig(r=0, oft_block_size=32, target_modules=t, use_cayley_neumann=False),
        "randlora": rotfunc.RandLoraConfig(r=32, randlora_alpha=64, target_modules=t),
    }


def perturb(model, *, scale=0.2, seed=0, adapter_name=None):
    """Give the adapter random non-identity params (in place) and return them."""
    g = torch.Generator().manual_seed(seed)
    params = bind.adapter_params(model, adapter_name)
    new = {}
    for k, v in params.items():
        noise = torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype)
        s = scale * (0.25 if k.endswith(".q") else 1.0)
        new[k] = v + s * noise * (v.abs().mean() + 1e-2 if k.endswith("gamma") else 1.0)
    bind.load_params(model, new)
    return new


def outputs(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


# -------------------------------------------------------------------------------------------------- attach / detach


def test_attach_wraps_the_same_layer_objects(minilm):
    model = minilm.model()
    query = model.encoder.layer[0].attention.self.query
    ptr = query.weight.data_ptr()
    bind.attach(model, configs()["road"])
    wrapped = model.encoder.layer[0].attention.self.query
    assert isinstance(wrapped, bind.AdaptedLinear)
    assert wrapped.base_layer is query and query.weight.data_ptr() == ptr
    assert len(list(bind.adapted_layers(model))) == 12


def test_attach_errors_name_the_module_and_leave_the_model_alone(minilm):
    model = minilm.model()
    before = [(n, m) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matched no module of BertModel"):
        bind.attach(model, rotfunc.RoadConfig(target_modules=["nope"]))
    with pytest.raises(TypeError, match=r"module 'embeddings.LayerNorm' is a torch.nn.modules.normalization.LayerNorm"):
        bind.attach(model, rotfunc.RoadConfig(target_modules=["LayerNorm"], group_size=2))
    assert [(n, m) for n, m in model.named_modules()] == before


def test_all_linear_and_exclude_modules(minilm):
    model = minilm.model()
    bind.attach(model, rotfunc.RoadConfig(target_modules="all-linear", exclude_modules=["pooler.dense"]))
    paths = [p for p, _ in bind.adapted_layers(model)]
    assert len(paths) == 36 and "pooler.dense" not in paths


def test_several_adapters_set_disable_detach(minilm):
    model, batch = minilm.model(), minilm.batch()
    base_out = outputs(model, batch)
    originals = {n: m for n, m in model.named_modules()}
    bind.attach(model, configs()["road"], adapter_name="a")
    perturb(model, seed=1)
    bind.attach(model, configs()["oft"], adapter_name="b")
    perturb(model, seed=2, adapter_name="b")
    assert bind.adapter_names(model) == ["a", "b"] and bind.active_adapter(model) == "a"
    out_a = outputs(model, batch)
    bind.set_adapter(model, "b")
    out_b = outputs(model, batch)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base_out)
    with bind.disabled(model):
        torch.testing.assert_close(outputs(model, batch), base_out, rtol=0, atol=0)
    torch.testing.assert_close(outputs(model, batch), out_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"adapter_name='c' is not attached"):
        bind.set_adapter(model, "c")
    bind.detach(model, "b")
    assert bind.adapter_names(model) == ["a"]
    torch.testing.assert_close(outputs(model, batch), out_a, rtol=0, atol=0)
    bind.detach(model)
    after = {n: m for n, m in model.named_modules()}
    assert after.keys() == originals.keys() and all(after[n] is originals[n] for n in after)
    torch.testing.assert_close(outputs(model, batch), base_out, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- torch.func training


@pytest.mark.parametrize("kind", QUANT)
@pytest.mark.parametrize("method", ["road", "oft", "randlora"])
def test_functional_training_lowers_the_loss(minilm, kind, method):
    teacher, student = minilm.model(), minilm.model(kind)
    batch = minilm.batch(n=4)
    with torch.no_grad():  # a target the untrained student is far from: other sentences' embeddings
        target = embed(teacher, minilm.batch(n=4, offset=40))
    bind.attach(student, configs()[method])
    params = bind.adapter_params(student)

    def loss_fn(p):
        emb = embed(lambda **kw: functional_call(student, p, args=(), kwargs=kw), batch)
        return (1 - (emb * target).sum(-1)).mean()

    lr = {"road": 5e-3, "oft": 5e-3, "randlora": 2e-3}[method]
    first = loss_fn(params).item()
    for _ in range(4):
        g = grad(loss_fn)(params)
        assert all(torch.isfinite(v).all() for v in g.values())
        params = {k: v - lr * g[k] / (g[k].abs().max() + 1e-12) for k, v in params.items()}
    assert loss_fn(params).item() < first


def test_grad_flows_through_untargeted_4bit_layers(minilm):
    import bitsandbytes as bnb

    model, batch = minilm.model("nf4"), minilm.batch(n=2)
    key = model.encoder.layer[0].attention.self.key
    assert isinstance(key, bnb.nn.Linear4bit)
    bind.attach(model, rotfunc.RoadConfig(group_size=64, target_modules=["encoder.layer.0.attention.self.query"]))
    params = bind.adapter_params(model)

    def loss_fn(p):
        return functional_call(model, p, args=(), kwargs=batch).last_hidden_state.square().mean()

    g = grad(loss_fn)(params)
    (gt,) = [v for k, v in g.items() if k.endswith("theta")]
    assert torch.isfinite(gt).all() and gt.abs().sum() > 0
    # The same gradient by ordinary autograd through a dequantized float copy of the model.
    ref = minilm.model()
    bind.attach(ref, rotfunc.RoadConfig(group_size=64, target_modules=["encoder.layer.0.attention.self.query"]))
    for (n, m), (_, mq) in zip(ref.named_modules(), model.named_modules()):
        if isinstance(mq, bnb.nn.Linear4bit):
            m.weight.data = rotfunc.quant.dequantize(mq).to(m.weight.dtype)
    p_ref = {k: v.clone().requires_grad_(True) for k, v in bind.adapter_params(ref).items()}
    loss_fn_ref = functional_call(ref, p_ref, args=(), kwargs=batch).last_hidden_state.square().mean()
    loss_fn_ref.backward()
    (gr,) = [v.grad for k, v in p_ref.items() if k.endswith("theta")]
    torch.testing.assert_close(gt, gr, rtol=2e-3, atol=1e-6)


# -------------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("kind", QUANT)
@pytest.mark.parametrize("method", ["road", "oft", "randlora"])
def test_merge_equals_unmerged_and_differs_from_base(minilm, kind, method):
    model, batch = minilm.model(kind), minilm.batch()
    base_out = outputs(model, batch)
    bind.attach(model, configs()[method])
    perturb(model, seed=3)
    adapted = outputs(model, batch)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    records = bind.merge(model)
    merged = outputs(model, batch)

    def rel(u, v):
        return ((u - v).norm() / v.norm()).item()

    if kind is None:
        assert rel(merged, adapted) < 1e-5
        assert rel(base_out, adapted) > 1e-2
    else:
        # A merged quantized layer is requantized: its output may move by what the requantization moved the
        # weights (the records report it), and no further; the adapter's effect must be clearly larger.
        requant = max(r.rel_fro_error for r in records.values())
        assert 0 < requant and rel(merged, adapted) < 2 * requant
        assert rel(base_out, adapted) > 2 * rel(merged, adapted)
    bind.unmerge(model)
    after = model.state_dict()
    for k, v in before.items():
        if kind is None:
            torch.testing.assert_close(after[k], v, rtol=1e-5, atol=1e-5)
        else:  # quantized: the original packed bytes come back exactly
            assert torch.equal(after[k], v), k
    torch.testing.assert_close(outputs(model, batch), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [None, "nf4"])
def test_merge_and_unload_leaves_a_plain_model(minilm, kind):
    import bitsandbytes as bnb

    model, batch = minilm.model(kind), minilm.batch()
    bind.attach(model, configs()["road"])
    perturb(model, seed=4)
    adapted = outputs(model, batch)
    bind.merge_and_unload(model)
    assert not list(bind.adapted_layers(model))
    q = model.encoder.layer[0].attention.self.query
    assert type(q) is (nn.Linear if kind is None else bnb.nn.Linear4bit)
    out = outputs(model, batch)
    assert ((out - adapted).norm() / adapted.norm()).item() < (1e-5 if kind is None else 0.2)


def test_merge_is_all_or_nothing_across_layers(minilm):
    model = minilm.model("nf4")
    bind.attach(model, configs()["road"])
    perturb(model, seed=5)
    # Poison the last layer's params: safe_merge must refuse and restore every layer merged before it.
    last = [k for k in bind.adapter_params(model) if "layer.5.attention.self.value" in k and k.endswith("alpha")]
    with torch.no_grad():
        dict(model.named_parameters())[last[0]][0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="non-finite"):
        bind.merge(model, safe_merge=True)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    assert bind.adapter_state(model).merged is None


# -------------------------------------------------------------------------------------------------- mixed batches


@pytest.mark.parametrize("kind", [None, "nf4"])
@pytest.mark.parametrize("method", ["road", "oft", "randlora"])
def test_mixed_adapter_batch_equals_each_sample_alone(minilm, kind, method):
    model, batch = minilm.model(kind), minilm.batch(n=5)
    cfg = configs()[method]
    bind.attach(model, cfg, adapter_name="a")
    perturb(model, seed=6, adapter_name="a")
    bind.attach(model, cfg, adapter_name="b")
    perturb(model, seed=7, adapter_name="b")
    names = ["a", "b", bind.BASE_ADAPTER, "b", "a"]
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).last_hidden_state
    for i, n in enumerate(names):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        if n == bind.BASE_ADAPTER:
            with bind.disabled(model):
                alone = outputs(model, one)
        else:
            bind.set_adapter(model, n)
            alone = outputs(model, one)
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-4, atol=1e-5)
    # The names really reached the wrappers: a mixed batch differs from the active adapter alone.
    bind.set_adapter(model, "a")
    assert not torch.allclose(mixed, outputs(model, batch))
    with pytest.raises(ValueError, match=r"adapter_names contains \['zz'\]"):
        with torch.no_grad():
            model(**batch, adapter_names=["a", "b", "zz", "a", "a"])


# -------------------------------------------------------------------------------------------------- counts, bases


@pytest.mark.parametrize("method", ["road", "oft", "randlora"])
def test_num_trainable_equals_peft(minilm, method):
    import peft

    cfg = configs(("query", "value", "intermediate.dense"))[method]
    peft_cfg = getattr(peft, type(cfg).__name__)(**cfg.to_peft_dict())
    pm = peft.get_peft_model(minilm.model(), peft_cfg)
    trainable, _ = pm.get_nb_trainable_parameters()
    model = minilm.model()
    bind.attach(model, cfg)
    assert bind.num_trainable(model) == trainable


def test_randlora_bases_are_one_shared_pytree(minilm):
    model = minilm.model()
    bind.attach(model, rotfunc.RandLoraConfig(r=32, target_modules=["query", "intermediate.dense", "output.dense"]))
    ptrs = {w.slots["default"].shared().B.data_ptr() for _, w in bind.adapted_layers(model)}
    assert len(ptrs) == 1
    shared = next(w for _, w in bind.adapted_layers(model)).slots["default"].shared()
    assert shared.B.shape[0] == 1536 and shared.A.shape[-1] == 1536  # PEFT: element-wise max of (out, in)
    assert not any("shared" in k for k in bind.adapter_params(model))


def test_attach_freezes_the_base_so_functional_grads_carry_no_graph(minilm):
    model = minilm.model()
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    bind.attach(model, configs()["road"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".rotfunc." not in n)
    params, batch = bind.adapter_params(model), minilm.batch(n=2)
    g = grad(lambda p: functional_call(model, p, args=(), kwargs=batch).last_hidden_state.square().mean())(params)
    # Without the freeze, ordinary autograd would record the whole functional step around torch.func.grad, and
    # a training loop feeding g back into params would chain every step's graph (a leak of ~300 MB/step here).
    assert all(v.grad_fn is None and not v.requires_grad for v in g.values())
    bind.detach(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
