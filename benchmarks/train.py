"""One training step (forward + backward) on the 4-bit MiniLM with each adapter, rotfunc vs PEFT.

Model: all-MiniLM-L6-v2 loaded in nf4 by transformers (``rotfunc.demo.load_minilm(quantize="nf4")``, fp32
compute), eval mode (no dropout) on both sides; adapter on ``target_modules=["query", "key", "value", "dense"]``
(every linear layer: attention q/k/v/output, intermediate, output, pooler), the same config fields on both sides
(``benchmarks._common.FIELDS``). Batch: 16 stdlib sentences padded to 32 tokens (the demo's defaults); loss:
squared distance of the mean-pooled normalized embeddings (``rotfunc.demo.embed``) to a fixed random target.

* rotfunc: ``torch.func.grad`` of the loss over ``functional_call`` on the ``rotfunc.attach``-ed model (every
  nf4 layer through rotfunc's ``torch.func``-safe dequantize + matmul, which re-dequantizes in backward);
* PEFT: ``get_peft_model`` then ``loss.backward()`` (bitsandbytes' own ``Linear4bit`` forward/backward inside),
  grads reset to None between steps.

Timing: median over ``repeats`` steps after one warm-up step. Peak memory: the process's resident high-water
mark (``VmHWM``, reset after the warm-up step) over the measured steps, model included (the same nf4 model and
the same imports on both sides), i.e. what training needs in steady state; ``*_step_peak_bytes`` is one step's
peak above the resident level before it (``peak_rss_bytes``), which misses memory the allocator reuses. In the full run
each (method, side) runs in a **fresh subprocess** (``python -m benchmarks.train --worker SIDE METHOD``) so
that neither side inherits the other's allocator state; ``--quick`` runs in-process on a tiny batch.

Run: ``python -m benchmarks.train`` (``--quick`` for a small in-process smoke run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from benchmarks._common import LABEL, METHODS, THREADS, configs, quiet, row
from benchmarks._harness import _status_kb, format_table, peak_rss_bytes, timeit

__all__ = ["rows", "COLUMNS", "step_stats"]

TARGET_MODULES = ["query", "key", "value", "dense"]
_MINILM: dict = {}


def _minilm():
    """(tokenizer, nf4 model): loaded once per process, a deep copy each call."""
    import copy

    from rotfunc.demo import load_minilm

    if "nf4" not in _MINILM:
        with quiet():
            _MINILM["nf4"] = load_minilm(quantize="nf4")
    tok, model = _MINILM["nf4"]
    return tok, copy.deepcopy(model)


def _batch(tok, batch_size: int, max_length: int) -> dict:
    from rotfunc.demo import stdlib_sentences

    texts = stdlib_sentences()[:batch_size]
    return dict(tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"))


def _target(batch_size: int, dim: int = 384) -> torch.Tensor:
    t = torch.randn(batch_size, dim, generator=torch.Generator().manual_seed(3))
    return torch.nn.functional.normalize(t, dim=-1)


def _rotfunc_step(method: str, batch_size: int, max_length: int):
    from torch.func import functional_call, grad

    import rotfunc
    from rotfunc.demo import embed

    tok, model = _minilm()
    rcfg, _ = configs(method, TARGET_MODULES)
    rotfunc.attach(model, rcfg)
    params = rotfunc.adapter_params(model)
    batch, target = _batch(tok, batch_size, max_length), _target(batch_size)

    def loss_fn(p):
        emb = embed(lambda **kw: functional_call(model, p, args=(), kwargs=kw), batch)
        return ((emb - target) ** 2).sum()

    g = grad(loss_fn)
    return lambda: g(params), rotfunc.num_trainable(model)


def _peft_step(method: str, batch_size: int, max_length: int):
    import peft

    from rotfunc.demo import embed

    tok, model = _minilm()
    _, pcfg = configs(method, TARGET_MODULES)
    with quiet():
        pm = peft.get_peft_model(model, pcfg)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    batch, target = _batch(tok, batch_size, max_length), _target(batch_size)

    def step():
        with quiet():
            loss = ((embed(pm, batch) - target) ** 2).sum()
            loss.backward()
        for p in trainable:
            p.grad = None

    return step, sum(p.numel() for p in trainable)


def step_stats(side: str, method: str, *, batch_size: int, max_length: int, repeats: int) -> dict:
    """Time (timeit dict) and peak RSS of one step of ``side`` ("rotfunc" or "peft"), in this process."""
    torch.set_num_threads(THREADS)
    make = _rotfunc_step if side == "rotfunc" else _peft_step
    step, n_params = make(method, batch_size, max_length)
    step()  # warm-up
    step_peak = peak_rss_bytes(step)  # resets the high-water mark, then one step
    t = timeit(step, repeats=repeats, warmup=0)
    # the process's resident high-water mark over those steps (model included: the same model on both sides)
    peak = _status_kb("VmHWM") * 1024
    return {"time": t, "peak_bytes": peak, "step_peak_bytes": step_peak, "trainable_params": n_params}


def _in_subprocess(side: str, method: str, *, batch_size: int, max_length: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train", "--worker", side, method, str(batch_size), str(max_length),
           str(repeats)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_row(method: str, *, batch_size: int, max_length: int, repeats: int, subprocess_each: bool) -> dict:
    run = _in_subprocess if subprocess_each else step_stats
    res = {}
    errors = {}
    for side in ("rotfunc", "peft"):
        try:
            res[side] = run(side, method, batch_size=batch_size, max_length=max_length, repeats=repeats)
        except Exception as e:  # a failing side is a result
            errors[side] = str(e).strip().splitlines()[-1][:200]
    how = "fresh subprocess per side" if subprocess_each else "in-process"
    name = f"{LABEL[method]} train step nf4 MiniLM, batch {batch_size}x{max_length} tokens ({how})"
    target = "time <= 0.8x PEFT and peak <= PEFT"
    extra = dict(vs="PEFT", method=method, kind="nf4", section="train", batch=f"{batch_size}x{max_length}")
    if "rotfunc" in errors or "peft" in errors:
        ours = res.get("rotfunc", {}).get("time")
        return row(name, ours, res.get("peft", {}).get("time"), target=target, met=False,
                   measured="; ".join(f"{k} fails: {v}" for k, v in errors.items()),
                   peft_error=errors.get("peft"), rotfunc_error=errors.get("rotfunc"), **extra)
    t_r, t_p = res["rotfunc"]["time"], res["peft"]["time"]
    m_r, m_p = res["rotfunc"]["peak_bytes"], res["peft"]["peak_bytes"]
    time_ratio = t_r["median"] / t_p["median"]
    mem_ratio = m_r / m_p if m_p else None  # in-process (--quick) the second side may need no new pages
    mem_text = f"{mem_ratio:.2f}x PEFT" if mem_ratio is not None else f"{m_r / 2**20:.1f} MiB vs {m_p / 2**20:.1f} MiB"
    return row(name, t_r, t_p, target=target, met=bool(time_ratio <= 0.8 and m_r <= m_p),
               measured=f"time {time_ratio:.2f}x PEFT, peak {mem_text}",
               rotfunc_peak_bytes=m_r, peft_peak_bytes=m_p, time_ratio=time_ratio, mem_ratio=mem_ratio,
               rotfunc_step_peak_bytes=res["rotfunc"].get("step_peak_bytes"),
               peft_step_peak_bytes=res["peft"].get("step_peak_bytes"),
               trainable_params=res["rotfunc"]["trainable_params"],
               peft_trainable_params=res["peft"]["trainable_params"], **extra)


def plan(quick: bool = False) -> list[tuple[str, callable]]:
    kw = (dict(batch_size=2, max_length=8, repeats=1, subprocess_each=False) if quick
          else dict(batch_size=16, max_length=32, repeats=5, subprocess_each=True))
    return [(f"train {m}", lambda m=m: train_row(m, **kw)) for m in METHODS]


def rows(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(THREADS)
    return [thunk() for _, thunk in tqdm(plan(quick), desc="train", file=sys.stderr)]


COLUMNS = ["name", "vs", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "measured", "target",
           "met", "rotfunc_peak_bytes", "peft_peak_bytes"]

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        side, method, bs, ml, reps = sys.argv[2:7]
        stats = step_stats(side, method, batch_size=int(bs), max_length=int(ml), repeats=int(reps))
        print(json.dumps(stats))
    else:
        print(format_table(rows(quick="--quick" in sys.argv[1:]), COLUMNS))
