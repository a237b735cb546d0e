"""The shims' contract, item by item: atomic merges, adapters on different layer sets, singular blocks, mixed
batches, load_params, PEFT config fields (fan_in_fan_out, biases, layers_to_transform, modules_to_save),
float32 params on half-precision layers, refused layer kinds, torch.compile, mixed-adapter generate, and named
errors for bad inputs to the pure core."""

from __future__ import annotations

import copy
import dataclasses

import bitsandbytes as bnb
import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, grad_and_value

import rotfunc
import rotfunc.testing
from rotfunc import BASE_ADAPTER, quant
from shim_models import WIDTH, assert_same, base_layer, fingerprint, full_fingerprint, mixed_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:peft"),
]

X = torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(2))


def out(model, x=X, **kw):
    with torch.no_grad():
        return model(x, **kw)


def perturb(model, name, *, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    params = rotfunc.adapter_params(model, name)
    new = {k: v + scale * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in params.items()}
    rotfunc.load_params(model, new)
    return new


def road(targets, **kw):
    return rotfunc.RoadConfig(variant="road_2", group_size=8, target_modules=list(targets), **kw)


# ------------------------------------------------------------------------------------------ 1. atomic merges


@pytest.mark.parametrize("how", ["safe_merge", "merge_raises"])
def test_a_failing_merge_restores_every_layer_bitwise(monkeypatch, how):
    model = mixed_model()
    base_out = out(model)
    rotfunc.attach(model, road(["0", "2", "4", "6"]))
    perturb(model, "default")
    adapted = out(model)
    before = full_fingerprint(model)
    if how == "safe_merge":  # the last layer (a float nn.Linear) meets a NaN after the first three merged
        rotfunc.load_params(model, {"6.rotfunc.default.alpha": torch.full((WIDTH,), float("nan"))})
        before = full_fingerprint(model)
        expected, match = ValueError, "non-finite"
    else:
        real = quant.merge_into

        def merge_into(layer, fn, **kw):
            if layer is base_layer(model, "6"):
                raise ArithmeticError("boom in the last layer")
            return real(layer, fn, **kw)

        monkeypatch.setattr(quant, "merge_into", merge_into)
        expected, match = ArithmeticError, "boom"
    with pytest.raises(expected, match=match) as info:
        rotfunc.merge(model, safe_merge=True)
    assert "layer '6' failed; the 3 layer(s) merged before it were restored" in str(info.value.__notes__)
    assert_same(full_fingerprint(model), before)
    assert rotfunc.adapter_state(model).merged is None
    if how == "merge_raises":
        torch.testing.assert_close(out(model), adapted, rtol=0, atol=0)
    rotfunc.detach(model)
    torch.testing.assert_close(out(model), base_out, rtol=0, atol=0)


# ------------------------------------------------------------------------------ 2. different layer sets


def test_adapters_on_different_layer_sets():
    model = mixed_model()
    rotfunc.attach(model, road(["0", "2"]), adapter_name="two")
    rotfunc.attach(model, road(["2"]), adapter_name="one")
    perturb(model, "two", seed=1)
    perturb(model, "one", seed=2)
    only_one = copy.deepcopy(model)
    rotfunc.detach(only_one, "two")
    rotfunc.set_adapter(model, "one")
    assert rotfunc.active_adapter(model) == "one"
    # layer "0" has no "one": it runs its base layer (as PEFT), not "two"
    torch.testing.assert_close(out(model), out(only_one), rtol=0, atol=0)
    assert sorted(rotfunc.adapter_params(model)) == ["2.rotfunc.one.alpha", "2.rotfunc.one.theta"]
    rotfunc.merge(model)
    assert rotfunc.adapter_state(model).merged == "one"
    before = full_fingerprint(model)
    with pytest.raises(RuntimeError, match="adapter 'one' is already merged: unmerge"):
        rotfunc.merge(model, "two")
    assert_same(full_fingerprint(model), before)
    rotfunc.unmerge(model)
    rotfunc.merge(model, "two")
    assert rotfunc.adapter_state(model).merged == "two"


# ----------------------------------------------------------------------------- 3. singular blocks


@pytest.mark.parametrize(
    "config,singular",
    [
        # RoAD with alpha = 0 on a group: R is singular
        (road(["0", "2", "4", "6"]), {"alpha": lambda a: a.index_fill(0, torch.arange(8), 0.0)}),
        # OFT's 5-term Cayley-Neumann series with q = 1 on a 2x2 block: R = I + 2Q + 2Q^2 + 2Q^3 + Q^4 = 0
        (rotfunc.OFTConfig(oft_block_size=2, target_modules=["0", "2", "4", "6"]), {"q": lambda q: q.index_fill(0, torch.tensor([0]), 1.0)}),
    ],
    ids=["road_alpha0", "oft_neumann_q1"],
)
def test_singular_blocks_merge_and_unmerge_exactly(config, singular):
    def attach_singular(model, targets):
        rotfunc.attach(model, dataclasses.replace(config, target_modules=targets))
        perturb(model, "default", scale=0.05)
        params = rotfunc.adapter_params(model)
        last = lambda k: k.rpartition(".")[2]  # noqa: E731
        rotfunc.load_params(model, {k: singular[last(k)](v) for k, v in params.items() if last(k) in singular})
        return out(model)

    # float layers: the merged model computes exactly what the singular adapter computes
    model = mixed_model()
    adapted = attach_singular(model, ["0", "6"])
    rotfunc.merge(model)
    torch.testing.assert_close(out(model), adapted, rtol=1e-5, atol=1e-5)
    # every layer kind: unmerge and detach give back the original bytes (no inverse of a singular block is taken)
    model = mixed_model()
    original = fingerprint(model)
    attach_singular(model, ["0", "2", "4", "6"])
    rotfunc.merge(model)
    rotfunc.unmerge(model)
    assert_same(fingerprint(model), original)
    rotfunc.merge(model)
    rotfunc.detach(model)
    assert_same(fingerprint(model), original)


# ------------------------------------------------------------------------------ 4. mixed batches


def test_mixed_batch_with_an_adapter_on_some_layers_only():
    model = mixed_model()
    rotfunc.attach(model, road(["0", "2", "4"]), adapter_name="a")
    rotfunc.attach(model, rotfunc.OFTConfig(oft_block_size=8, target_modules=["4"], init_weights=False), adapter_name="o")
    perturb(model, "a")
    names = ["o", "a", BASE_ADAPTER, "o", "a", "a"]
    mixed = out(model, adapter_names=names)
    for i, n in enumerate(names):
        if n == BASE_ADAPTER:
            with rotfunc.disabled(model):
                alone = out(model, X[i : i + 1])
        else:
            rotfunc.set_adapter(model, n)
            alone = out(model, X[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    before = full_fingerprint(model)
    with pytest.raises(ValueError, match=r"adapter_names contains \['zz'\], not attached"):
        out(model, adapter_names=["zz"] * 6)
    with pytest.raises(TypeError, match="adapter_names must be a sequence of str"):
        out(model, adapter_names="a")
    assert_same(full_fingerprint(model), before)


# ------------------------------------------------------------------------------ 5. load_params


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (lambda p: {**p, "0.rotfunc.default.theta": p["0.rotfunc.default.theta"].long()}, TypeError, "dtype=torch.int64"),
        (lambda p: {**p, "0.rotfunc.default.theta": p["0.rotfunc.default.theta"] > 0}, TypeError, "dtype=torch.bool"),
        (lambda p: {**p, "0.rotfunc.default.theta": p["0.rotfunc.default.theta"].to(torch.complex64)}, TypeError, "complex64"),
        (lambda p: {**p, "0.base_layer.weight": torch.zeros(WIDTH, WIDTH)}, KeyError, "a base-model parameter"),
        (lambda p: {**p, "4.base_layer.weight": torch.zeros(512, 1, dtype=torch.uint8)}, KeyError, "a base-model parameter"),
        (lambda p: {**p, "0.rotfunc.default.theta": [0.0] * WIDTH}, TypeError, "is a list, expected a torch.Tensor"),
        (lambda p: {**p, "4.rotfunc.default.alpha": torch.empty(WIDTH, device="meta")}, ValueError, "meta device"),
        (lambda p: {**p, "9.rotfunc.default.alpha": torch.zeros(WIDTH)}, KeyError, "not a parameter of the model"),
        (lambda p: [1, 2], TypeError, "params must be a mapping"),
    ],
    ids=["int64", "bool", "complex", "base_weight", "packed_4bit", "list", "meta_last", "unknown", "not_a_dict"],
)
def test_load_params_refuses_and_changes_nothing(bad, exc, match):
    model = mixed_model()
    rotfunc.attach(model, road(["0", "2", "4"]))
    good = {k: v + 0.5 for k, v in rotfunc.adapter_params(model).items()}
    before = full_fingerprint(model)
    with pytest.raises(exc, match=match):
        rotfunc.load_params(model, bad(good))
    assert_same(full_fingerprint(model), before)


def test_load_params_while_merged_is_refused_and_params_are_copies():
    model = mixed_model()
    original = fingerprint(model)
    rotfunc.attach(model, road(["0", "2", "4", "6"]))
    params = rotfunc.adapter_params(model)
    params["0.rotfunc.default.theta"].add_(1.0)  # the loop's own copy: the model does not move
    assert not torch.equal(params["0.rotfunc.default.theta"], rotfunc.adapter_params(model)["0.rotfunc.default.theta"])
    perturb(model, "default")
    rotfunc.merge(model)
    before = full_fingerprint(model)
    with pytest.raises(RuntimeError, match="which is merged into the base weights"):
        rotfunc.load_params(model, params)
    assert_same(full_fingerprint(model), before)
    rotfunc.unmerge(model)
    assert_same(fingerprint(model), original)


# ------------------------------------------------------------------------ 6. PEFT config fields


def test_oft_fan_in_fan_out_is_forced_off_as_peft():
    model = mixed_model()
    with pytest.warns(UserWarning, match="fan_in_fan_out=True.*setting fan_in_fan_out=False, as PEFT"):
        rotfunc.attach(model, rotfunc.OFTConfig(oft_block_size=8, target_modules=["0", "6"], fan_in_fan_out=True,
                                                init_weights=False))
    adapted = out(model)
    rotfunc.merge(model)
    torch.testing.assert_close(out(model), adapted, rtol=1e-5, atol=1e-5)


def _bias_configs(method, bias, targets):
    if method == "oft":
        rf = rotfunc.OFTConfig(oft_block_size=32, target_modules=targets, bias=bias, use_cayley_neumann=False)
    else:
        rf = rotfunc.RandLoraConfig(r=32, randlora_alpha=64, target_modules=targets, bias=bias)
    return rf, {"oft": peft.OFTConfig, "randlora": peft.RandLoraConfig}[method](**rf.to_peft_dict())


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.02 if "oft_R" in k or k.endswith(".q") else 0.3
                if "gamma" in k:  # RandLoRA's gamma starts at 1/max(shape): move it on its own scale
                    scale *= float(p.abs().mean()) + 1e-2
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", ["oft", "randlora"])
def test_trained_biases_equal_peft_both_ways(minilm, tmp_path, method):
    bias = f"{method}_only"
    targets = ["query", "value"]
    rf, pc = _bias_configs(method, bias, targets)
    batch = minilm.batch()
    pm = peft.get_peft_model(minilm.model(), pc)
    assert any(k.endswith("base_layer.bias") for k, p in pm.named_parameters() if p.requires_grad)
    _randomize(pm, 1)
    with torch.no_grad():
        expected = pm(**batch).last_hidden_state
    pm.save_pretrained(tmp_path / "peft")
    model = minilm.model()
    rotfunc.load_adapter(model, tmp_path / "peft")
    params = rotfunc.adapter_params(model)
    assert sum(k.endswith(".bias") for k in params) == 12  # one trainable bias per adapted layer
    with torch.no_grad():
        got = model(**batch).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the biases train: a grad reaches them, and the base model's own biases never move
    layer0 = model.encoder.layer[0].attention.self.query
    base_bias = layer0.base_layer.bias.detach().clone()

    def loss(p):
        return functional_call(model, p, args=(), kwargs=batch).last_hidden_state.square().mean()

    g = grad(loss)(params)
    assert g["encoder.layer.0.attention.self.query.rotfunc.default.bias"].abs().max() > 0
    # merged into the layer's bias, and back
    rotfunc.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(layer0.base_layer.bias, base_bias)
    rotfunc.unmerge(model)
    assert torch.equal(layer0.base_layer.bias, base_bias)
    # and back to PEFT
    rotfunc.save_adapter(model, tmp_path / "rf")
    back = peft.PeftModel.from_pretrained(minilm.model(), tmp_path / "rf")
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).last_hidden_state, expected, rtol=1e-4, atol=1e-4)


def test_bias_all_where_every_bias_is_adapted_equals_peft(tmp_path):
    def plain():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))

    rf = rotfunc.OFTConfig(oft_block_size=8, target_modules=["0", "2"], bias="all", use_cayley_neumann=False)
    pm = peft.get_peft_model(plain(), peft.OFTConfig(**rf.to_peft_dict()))
    _randomize(pm, 2)
    expected = out(pm)
    pm.save_pretrained(tmp_path)
    model = plain()
    rotfunc.load_adapter(model, tmp_path)
    torch.testing.assert_close(out(model), expected, rtol=1e-5, atol=1e-5)


def test_bias_all_with_biases_outside_adapted_layers_is_refused(minilm):
    model = minilm.model()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"bias='all' would train 'embeddings.LayerNorm.bias'.*use bias='oft_only'"):
        rotfunc.attach(model, rotfunc.OFTConfig(oft_block_size=32, target_modules=["query"], bias="all"))
    assert [(n, type(m)) for n, m in model.named_modules()] == before


@pytest.mark.parametrize("method", ["oft", "randlora"])
def test_layers_to_transform_equals_peft(minilm, tmp_path, method):
    rf, _ = _bias_configs(method, "none", ["query", "value"])
    rf = dataclasses.replace(rf, layers_to_transform=[0, 2], layers_pattern="layer")
    model = minilm.model()
    rotfunc.attach(model, rf)
    assert [p for p, _ in rotfunc.adapted_layers(model)] == [
        f"encoder.layer.{i}.attention.self.{t}" for i in (0, 2) for t in ("query", "value")
    ]
    batch = minilm.batch()
    pc = {"oft": peft.OFTConfig, "randlora": peft.RandLoraConfig}[method](**rf.to_peft_dict())
    pm = peft.get_peft_model(minilm.model(), pc)
    _randomize(pm, 3)
    with torch.no_grad():
        expected = pm(**batch).last_hidden_state
    pm.save_pretrained(tmp_path)
    fresh = minilm.model()
    rotfunc.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).last_hidden_state, expected, rtol=1e-4, atol=1e-4)


def test_modules_to_save_is_refused_clearly(minilm, tmp_path):
    d = rotfunc.RoadConfig(target_modules=["query"]).to_peft_dict() | {"modules_to_save": ["pooler"]}
    with pytest.raises(ValueError, match=r"modules_to_save=\['pooler'\] is not supported by RoadConfig"):
        rotfunc.RoadConfig.from_peft_dict(d)
    d = rotfunc.RoadConfig(target_modules=["query"]).to_peft_dict() | {"layers_to_transform": [1]}
    with pytest.raises(ValueError, match=r"layers_to_transform=\[1\] is not supported by RoadConfig"):
        rotfunc.RoadConfig.from_peft_dict(d)


# ------------------------------------------------------------------- 7. float32 params on half layers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_get_float32_params_that_train(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH)).to(dtype)
    rotfunc.attach(model, road(["0", "2"]))
    params = rotfunc.adapter_params(model)
    assert {v.dtype for v in params.values()} == {torch.float32}
    x = X.to(dtype)

    def loss(p):
        y = functional_call(model, p, (x,))
        assert y.dtype == dtype  # computed in the layer's dtype
        return y.float().square().mean()

    g = grad(loss)(params)
    stepped = {k: v - 1e-3 * g[k].sign() for k, v in params.items()}
    rotfunc.load_params(model, stepped)
    moved = sum(int((a != b).sum()) for a, b in zip(rotfunc.adapter_params(model).values(), params.values()))
    assert moved == sum(v.numel() for v in params.values())  # every alpha and theta moved
    same = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH)).to(dtype)
    rotfunc.attach(same, road(["0", "2"]), autocast_adapter_dtype=False)
    assert {v.dtype for v in rotfunc.adapter_params(same).values()} == {dtype}


def test_bf16_storage_4bit_layer_gets_float32_params():
    layer = bnb.nn.Linear4bit(WIDTH, WIDTH, quant_type="nf4", quant_storage=torch.bfloat16, compute_dtype=torch.bfloat16)
    layer.load_state_dict(nn.Linear(WIDTH, WIDTH).to(torch.bfloat16).state_dict())
    model = nn.Sequential(layer.to("cpu"))
    rotfunc.attach(model, road(["0"]))
    assert {v.dtype for v in rotfunc.adapter_params(model).values()} == {torch.float32}
    assert out(model, X.to(torch.bfloat16)).dtype == torch.bfloat16


# ------------------------------------------------------------------------- 8. refused layer kinds


def test_int8_with_fp16_weights_is_refused_at_attach():
    layer = bnb.nn.Linear8bitLt(WIDTH, WIDTH, has_fp16_weights=True)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), layer)
    with pytest.raises(TypeError, match="module '2' is a bitsandbytes Linear8bitLt with has_fp16_weights=True"):
        rotfunc.attach(model, road(["0"]))
    assert type(model[0]) is nn.Linear and rotfunc.adapter_names(model) == []


# ----------------------------------------------------------------------------------- 9. compile


def _three_adapters():
    model = mixed_model()
    rotfunc.attach(model, road(["0", "2", "4"]), adapter_name="r")
    rotfunc.attach(model, rotfunc.OFTConfig(oft_block_size=8, target_modules=["0", "2"]), adapter_name="o")
    rotfunc.attach(model, rotfunc.RandLoraConfig(r=8, randlora_alpha=16, target_modules=["2", "4"]), adapter_name="l")
    params = {}
    for i, n in enumerate(("r", "o", "l")):
        params |= perturb(model, n, seed=i, scale=0.1)
    return model, params


def _close_grads(got, expected):
    for k in expected:
        scale = expected[k].abs().max()
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-4 * float(scale) + 1e-7, msg=k)


def test_attached_model_forward_and_functional_grad_compile_fullgraph():
    torch._dynamo.reset()
    model, params = _three_adapters()
    rotfunc.set_adapter(model, "o")
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(out(compiled), out(model), rtol=1e-5, atol=1e-6)

    def loss(p, x):
        return functional_call(model, p, (x,)).square().mean()

    got = torch.compile(grad_and_value(loss), fullgraph=True)(params, X)
    expected = grad_and_value(loss)(params, X)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    _close_grads(got[0], expected[0])
    assert any(expected[0][k].abs().max() > 0 for k in expected[0] if ".o." in k)


def test_mixed_batch_functional_grad_compiles_fullgraph():
    torch._dynamo.reset()
    model, params = _three_adapters()

    def loss(p, x):
        return functional_call(model, p, (x,)).square().mean()

    with rotfunc.adapter_batch(model, ["r", "o", "l", BASE_ADAPTER, "o", "r"]):
        got = torch.compile(grad(loss), fullgraph=True)(params, X)
        expected = grad(loss)(params, X)
    _close_grads(got, expected)
    for n in ("r", "o", "l"):
        assert max(float(expected[k].abs().max()) for k in expected if f".{n}." in k) > 0


# ------------------------------------------------------------------------ mixed-adapter generate


def test_generate_with_adapter_names_equals_each_sequence_alone():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    rotfunc.attach(lm, rotfunc.RoadConfig(group_size=8, target_modules="all-linear", init_weights=False), adapter_name="a")
    rotfunc.attach(lm, rotfunc.OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"], init_weights=False),
                   adapter_name="b")
    perturb(lm, "a", scale=0.5)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["a", BASE_ADAPTER, "b"]
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    mixed = lm.generate(ids, adapter_names=names, **kw)
    alone = []
    for i, n in enumerate(names):
        one = dict(kw, attention_mask=kw["attention_mask"][i : i + 1])
        if n == BASE_ADAPTER:
            with rotfunc.disabled(lm):
                alone.append(lm.generate(ids[i : i + 1], **one))
        else:
            rotfunc.set_adapter(lm, n)
            alone.append(lm.generate(ids[i : i + 1], **one))
    assert torch.equal(mixed, torch.cat(alone))
    assert len({tuple(a[0, 5:].tolist()) for a in alone}) == 3  # three different continuations
    assert rotfunc.adapter_state(lm).batch is None


# ------------------------------------------------------------------- 10. named errors in the pure core


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: rotfunc.cayley_neumann(torch.zeros(2, 4, 4, dtype=torch.int64)), TypeError, "Q.dtype=torch.int64"),
        (lambda: rotfunc.cayley(torch.full((1, 2, 2), float("nan"))), ValueError, "Q has non-finite values"),
        (lambda: rotfunc.oft_rotate(rotfunc.OFTParams(torch.zeros(2, 6)), torch.ones(3, 8, dtype=torch.int64), block_size=4),
         TypeError, "x.dtype=torch.int64"),
        (lambda: rotfunc.oft_rotate(rotfunc.OFTParams(torch.zeros(2, 6, dtype=torch.bool)), torch.ones(3, 8), block_size=4),
         TypeError, "params.q.dtype=torch.bool"),
        (lambda: rotfunc.oft_rotate(rotfunc.OFTParams(torch.full((2, 6), float("nan"))), torch.ones(3, 8), block_size=4,
                                    use_cayley_neumann=False), ValueError, "non-finite"),
        (lambda: rotfunc.oft_rotate(rotfunc.OFTParams(torch.zeros(2, 6)), torch.ones(3, 8, device="meta"), block_size=4),
         ValueError, "x.device=meta differs from params.q.device=cpu"),
        (lambda: _randlora_call(x=torch.ones(2, 16, dtype=torch.int32)), TypeError, "x.dtype=torch.int32"),
        (lambda: _randlora_call(x=torch.ones(2, 16, device="meta")), ValueError, "params.lambda_.device=cpu differs from x.device=meta"),
        (lambda: _randlora_merge(torch.ones(16, 16, dtype=torch.int64)), TypeError, "weight.dtype=torch.int64"),
        (lambda: quant.quantized_linear(quant.quant_weight_of(mixed_model()[4]), torch.ones(2, WIDTH, dtype=torch.int64)),
         TypeError, "x.dtype=torch.int64"),
    ],
)
def test_bad_inputs_to_the_pure_core_get_named_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _randlora_parts():
    bases = rotfunc.randlora_bases(0, r=4, max_dim=16, min_dim=16)
    params = rotfunc.randlora_init(16, 16, r=4)
    return params, bases


def _randlora_call(x):
    params, bases = _randlora_parts()
    return rotfunc.apply_randlora(params, bases, x, in_features=16, out_features=16, scaling=1.0)


def _randlora_merge(weight):
    params, bases = _randlora_parts()
    return rotfunc.randlora_merge(params, bases, weight, scaling=1.0)


# ---------------------------------------------------------------- rotfunc.testing draws bias-training configs


@settings(max_examples=8, deadline=None)
@given(config=st.one_of(rotfunc.testing.oft_configs(oft_block_size=(4, 8), bias=("none", "oft_only")),
                        rotfunc.testing.randlora_configs(bias=("none", "randlora_only"))))
def test_drawn_configs_with_trained_biases_merge_and_unmerge_bitwise(config):
    model = mixed_model()
    original = fingerprint(model)
    rotfunc.attach(model, dataclasses.replace(config, target_modules=["0", "2", "4", "6"]))
    params = perturb(model, "default", scale=0.05)
    assert any(k.endswith(".bias") for k in params) == (config.bias != "none")
    adapted = out(model)
    rotfunc.merge(model)
    merged = out(model)
    assert ((merged - adapted).norm() / adapted.norm()) < 0.2  # int8 / nf4 requantization
    rotfunc.unmerge(model)
    assert_same(fingerprint(model), original)
