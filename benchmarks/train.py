"""One training step (forward + backward + Adam update) on the 4-bit MiniLM with each adapter, rotfunc vs PEFT.

Model: all-MiniLM-L6-v2 loaded in nf4 by transformers (``rotfunc.demo.load_minilm(quantize="nf4")``, fp32
compute), eval mode (no dropout) on both sides; adapter on ``target_modules=["query", "key", "value", "dense"]``
(every linear layer: attention q/k/v/output, intermediate, output, pooler), the same config fields on both sides
(``benchmarks._common.FIELDS``). Batch: 16 stdlib sentences padded to 32 tokens (the demo's defaults); loss:
squared distance of the mean-pooled normalized embeddings (``rotfunc.demo.embed``) to a fixed random target.
Each step ends with an Adam update of the adapter params on both sides.

Sides (each a full step):

* ``rotfunc``: ``rotfunc.value_and_grad(loss_fn)(params, batch)`` over ``functional_call`` on the
  ``rotfunc.attach``-ed model, then ``rotfunc.adam`` (pure, over the params dict). Called outside any
  ``torch.func`` transform, so it runs plain autograd underneath (``rotfunc.train``).
* ``rotfunc compiled``: the same with ``value_and_grad(loss_fn, compile=True, fullgraph=True)`` (inductor
  compiles the forward, AOTAutograd the backward); its first call (the compile) is reported separately.
* ``rotfunc + compile_blocks``: the ``rotfunc`` side on a model whose transformer layers went through
  ``rotfunc.compile_blocks(model, fullgraph=True)`` (regional compilation: one graph per layer class, the rest
  eager); its first call (the compile) is reported separately.
* ``rotfunc torch.func.grad`` (no target, for reference): ``torch.func.grad`` of the same loss, as before.
* ``PEFT``: ``get_peft_model`` then ``loss.backward()`` and ``torch.optim.Adam.step()`` (bitsandbytes' own
  ``Linear4bit`` forward/backward inside), ``zero_grad(set_to_none=True)`` between steps: the baseline.
* ``PEFT compiled`` (second baseline): the same with ``torch.compile(peft_model)``; dynamo graph-breaks on
  bitsandbytes' layers (the count is in the row).

Time: every side lives in **one process per method**, warmed up (compiled) first, then ``rounds`` rounds in
which every side takes one step in turn; medians over the rounds. So load from other jobs hits all sides alike.
Peak memory: rotfunc and PEFT each in a **fresh subprocess** (so that no side inherits another's allocator
state): the process's resident high-water mark (``VmHWM``, reset after the warm-up steps) over two more steps,
model included (the same nf4 model and imports on every side). rotfunc compiled: measured the same way in the
timing process, as the first side built there (before any other side's model exists), not compiled twice.

Run: ``python -m benchmarks.train`` (``--quick`` for a small in-process smoke run without compiling).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from benchmarks._common import LABEL, METHODS, THREADS, configs, quiet, row
from benchmarks._harness import _status_kb, format_table, interleaved_rounds, peak_rss_bytes

__all__ = ["rows", "COLUMNS", "build_step"]

TARGET_MODULES = ["query", "key", "value", "dense"]
SIDES = ("rotfunc_compiled", "rotfunc", "rotfunc_blocks", "rotfunc_funcgrad", "peft", "peft_compiled")  # build order, see time_sides
LR = 1e-3
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


def _rotfunc_step(method: str, batch_size: int, max_length: int, how: str):
    from torch.func import functional_call

    import rotfunc
    from rotfunc.demo import embed

    tok, model = _minilm()
    rcfg, _ = configs(method, TARGET_MODULES)
    rotfunc.attach(model, rcfg)
    if how == "blocks":
        rotfunc.compile_blocks(model, fullgraph=True)
    batch, target = _batch(tok, batch_size, max_length), _target(batch_size)

    def loss_fn(p, batch):
        emb = embed(lambda **kw: functional_call(model, p, args=(), kwargs=kw), batch)
        return ((emb - target) ** 2).sum()

    if how == "funcgrad":
        g = torch.func.grad_and_value(loss_fn)
        vg = lambda p, b: g(p, b)[::-1]  # noqa: E731
    else:
        vg = rotfunc.value_and_grad(loss_fn, **(dict(compile=True, fullgraph=True) if how == "compiled" else {}))
    opt = rotfunc.adam(LR)
    state = {"params": rotfunc.adapter_params(model)}
    state["opt"] = opt.init(state["params"])

    def step():
        _, grads = vg(state["params"], batch)
        state["params"], state["opt"] = opt.update(grads, state["opt"], state["params"])

    return step, rotfunc.num_trainable(model)


def _peft_step(method: str, batch_size: int, max_length: int, compiled: bool):
    import peft

    from rotfunc.demo import embed

    tok, model = _minilm()
    _, pcfg = configs(method, TARGET_MODULES)
    with quiet():
        pm = peft.get_peft_model(model, pcfg)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=LR)
    run = torch.compile(pm) if compiled else pm
    batch, target = _batch(tok, batch_size, max_length), _target(batch_size)

    def step():
        with quiet():
            loss = ((embed(run, batch) - target) ** 2).sum()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in trainable)


def build_step(side: str, method: str, *, batch_size: int, max_length: int):
    """(step thunk, trainable parameter count) for ``side`` (one of ``SIDES``)."""
    if side.startswith("rotfunc"):
        how = {"rotfunc": "eager", "rotfunc_compiled": "compiled", "rotfunc_blocks": "blocks",
               "rotfunc_funcgrad": "funcgrad"}[side]
        return _rotfunc_step(method, batch_size, max_length, how)
    return _peft_step(method, batch_size, max_length, compiled=side == "peft_compiled")


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def time_sides(method: str, *, batch_size: int, max_length: int, rounds: int, sides=SIDES) -> dict:
    """Per side: first-call seconds (the compile for compiled sides), graph breaks, and the step times of
    ``rounds`` interleaved rounds, all in this process. The first side built (``rotfunc_compiled``) also gets its
    peak memory measured before any other side exists, which saves compiling it again in a fresh process."""
    torch.set_num_threads(THREADS)
    steps, out = {}, {}
    for side in sides:
        try:
            breaks = _graph_breaks()
            step, n = build_step(side, method, batch_size=batch_size, max_length=max_length)
            t0 = time.perf_counter()
            with quiet():
                step()
            first = time.perf_counter() - t0
            step()  # a second warm-up (a compiled side may recompile once on its second call)
            steps[side] = step
            out[side] = {"first_s": first, "graph_breaks": _graph_breaks() - breaks, "trainable_params": n}
            if not steps.keys() - {side}:  # the first side built: nothing else allocated yet, as a fresh process
                out[side]["step_peak_bytes"] = peak_rss_bytes(step)  # resets the high-water mark
                step()
                out[side]["peak_bytes"] = _status_kb("VmHWM") * 1024
        except Exception as e:  # a failing side is a result
            out[side] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
    for side, t in interleaved_rounds(steps, rounds).items():
        out[side]["time"] = t
    return out


def peak_memory(side: str, method: str, *, batch_size: int, max_length: int) -> dict:
    """The process's resident high-water mark over two steps after a warm-up step (fresh process expected)."""
    torch.set_num_threads(THREADS)
    step, _ = build_step(side, method, batch_size=batch_size, max_length=max_length)
    with quiet():
        step()
    step()
    step_peak = peak_rss_bytes(step)  # resets the high-water mark, then one step
    step()
    return {"peak_bytes": _status_kb("VmHWM") * 1024, "step_peak_bytes": step_peak}


def _worker(args: list[str]) -> dict:
    kind, method, bs, ml, n = args[:5]
    if kind == "time":
        return time_sides(method, batch_size=int(bs), max_length=int(ml), rounds=int(n))
    return peak_memory(args[5], method, batch_size=int(bs), max_length=int(ml))


def _in_subprocess(*args: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train", "--worker", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_rows(method: str, *, batch_size: int, max_length: int, rounds: int, subprocess_each: bool) -> list[dict]:
    """The rows of one method: rotfunc and rotfunc compiled against PEFT's eager step (targets), then the
    torch.func.grad and PEFT-compiled references."""
    shape = f"{batch_size}x{max_length}"
    if subprocess_each:
        timed = _in_subprocess("time", method, str(batch_size), str(max_length), str(rounds))
        mem = {}
        mem["rotfunc_compiled"] = timed.get("rotfunc_compiled", {})
        for side in ("rotfunc", "rotfunc_blocks", "peft"):
            try:
                mem[side] = _in_subprocess("mem", method, str(batch_size), str(max_length), "0", side)
            except Exception as e:
                mem[side] = {"error": str(e).strip().splitlines()[-1][:200]}
    else:  # --quick: in-process, no compile
        timed = time_sides(method, batch_size=batch_size, max_length=max_length, rounds=rounds,
                           sides=("rotfunc", "rotfunc_funcgrad", "peft"))
        mem = {}
    peft_t = timed["peft"].get("time")
    peft_mem = mem.get("peft", {}).get("peak_bytes")
    base = dict(vs="PEFT", method=method, kind="nf4", section="train", batch=shape,
                peft_peak_bytes=peft_mem, peft_trainable_params=timed["peft"].get("trainable_params"))
    target = "time <= 0.8x PEFT and peak <= PEFT"
    out = []
    labels = {"rotfunc": "rotfunc.value_and_grad (autograd)",
              "rotfunc_blocks": "value_and_grad + compile_blocks", "rotfunc_compiled": "value_and_grad(compile=True)",
              "rotfunc_funcgrad": "torch.func.grad", "peft_compiled": "PEFT + torch.compile"}
    for side, label in labels.items():
        if side not in timed:
            continue
        res = timed[side]
        name = f"{LABEL[method]} train step nf4 MiniLM {shape}: {label} vs PEFT eager"
        targeted = side in ("rotfunc", "rotfunc_blocks", "rotfunc_compiled")
        if "error" in res or peft_t is None:
            err = res.get("error") or timed["peft"].get("error")
            out.append(row(name, res.get("time"), peft_t, target=target if targeted else "",
                           met=False if targeted else None, measured=f"fails: {err}", error=err, **base))
            continue
        ratio_t = res["time"]["median"] / peft_t["median"]
        m = mem.get(side, {}).get("peak_bytes")
        mem_ratio = m / peft_mem if (m and peft_mem) else None
        notes = []
        if side.endswith(("compiled", "blocks")):
            notes.append(f"first call (compile) {res['first_s']:.1f} s, {res['graph_breaks']} graph break(s)")
        measured = f"time {ratio_t:.2f}x PEFT" + (f", peak {mem_ratio:.2f}x PEFT" if mem_ratio is not None else "")
        met = None
        if targeted:
            met = bool(ratio_t <= 0.8 and mem_ratio is not None and mem_ratio <= 1.0) if subprocess_each else None
        out.append(row(name, res["time"], peft_t, target=target if targeted and subprocess_each else "", met=met,
                       measured=measured, time_ratio=ratio_t, mem_ratio=mem_ratio, rotfunc_peak_bytes=m,
                       rotfunc_step_peak_bytes=mem.get(side, {}).get("step_peak_bytes"),
                       first_call_s=res["first_s"], graph_breaks=res["graph_breaks"],
                       trainable_params=res["trainable_params"], notes="; ".join(notes), **base))
    return out


def plan(quick: bool = False) -> list[tuple[str, callable]]:
    kw = (dict(batch_size=2, max_length=8, rounds=1, subprocess_each=False) if quick
          else dict(batch_size=16, max_length=32, rounds=7, subprocess_each=True))
    return [(f"train {m}", lambda m=m: train_rows(m, **kw)) for m in METHODS]


def rows(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(THREADS)
    return [r for _, thunk in tqdm(plan(quick), desc="train", file=sys.stderr) for r in thunk()]


COLUMNS = ["name", "vs", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "measured", "target",
           "met", "rotfunc_peak_bytes", "peft_peak_bytes", "notes"]

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(sys.argv[2:])))
    else:
        print(format_table(rows(quick="--quick" in sys.argv[1:]), COLUMNS))
