"""Mixed-adapter batches: 8 adapters in one batch against 1 adapter, on the float, int8 and nf4 MiniLM.

For each adapter type and base kind, 8 adapters of one config (random non-identity params,
``init_weights=False``) are attached to every linear layer (``target_modules=["query", "key", "value",
"dense"]``) of all-MiniLM-L6-v2. A batch of 32 stdlib sentences padded to 32 tokens (``--quick``: 8 x 8) runs

* ``one``: adapter ``a0`` active, the plain single-adapter forward (the honest alternative: the same batch, the
  same work, one adapter);
* ``eight``: ``adapter_names=[a0, a1, ..., a7, a0, ...]`` (4 sequences per adapter), rotfunc's one-pass mixed
  path (``Adapter.apply_mixed``);
* ``per-group``: the same mixed batch through the per-group fallback (one ``apply`` per adapter on its rows,
  what every layer did before ``apply_mixed``), for reference.

Two modes: ``inference`` (``torch.no_grad`` forward) and ``training`` (loss + gradients of every adapter the
batch uses, through :func:`rotfunc.value_and_grad`: 1 adapter's params for ``one``, all 8 adapters' for
``eight``). ``ratio = time(one) / time(eight) = throughput(eight) / throughput(one)``; target >= 0.9x. PEFT has
no RoAD/OFT/RandLoRA mixed batches (its ``adapter_names`` is LoRA-family only and refused in training), so the
``peft_*`` columns hold the 1-adapter run. The three variants alternate in one process; medians; the load
average is recorded per row.

Run: ``python -m benchmarks.mixed`` (``--quick`` for a small run).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from benchmarks._common import LABEL, METHODS, THREADS, quiet, row
from benchmarks._harness import format_table

__all__ = ["rows", "COLUMNS", "plan"]

N_ADAPTERS = 8
TARGET_MODULES = ["query", "key", "value", "dense"]
KINDS = ("nf4", "int8", "float")
_MODELS: dict = {}


def _config(method: str):
    import rotfunc

    if method == "road":
        return rotfunc.RoadConfig(variant="road_1", group_size=64, init_weights=False, target_modules=TARGET_MODULES)
    if method == "oft":
        return rotfunc.OFTConfig(oft_block_size=32, r=0, init_weights=False, target_modules=TARGET_MODULES)
    return rotfunc.RandLoraConfig(r=32, init_weights=False, target_modules=TARGET_MODULES)


def _model(kind: str):
    import copy

    import rotfunc
    from rotfunc.demo import load_minilm

    if kind not in _MODELS:
        with quiet():
            tok, model = load_minilm(quantize=None if kind == "float" else kind)
        _MODELS[kind] = (tok, rotfunc.prepare(model))
    tok, model = _MODELS[kind]
    return tok, copy.deepcopy(model)


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _stats(v: list[float]) -> dict:
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def mixed_rows(method: str, kind: str, *, batch_size: int, max_length: int, repeats: int) -> list[dict]:
    """Two rows (inference, training) for one adapter type on one base kind."""
    import rotfunc
    from benchmarks.train import _batch
    from rotfunc.demo import embed

    tok, model = _model(kind)
    cfg = _config(method)
    g = torch.Generator().manual_seed(0)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    for name in names:
        rotfunc.attach(model, cfg, adapter_name=name, generator=g)
    if method == "oft":  # PEFT's N(0, 0.1^2) init is far from a trained OFT; scale it like benchmarks.oft does
        with torch.no_grad():
            for k, p in model.named_parameters():
                if ".rotfunc." in k:
                    p.mul_(0.1)
    rotfunc.set_adapter(model, names[0])
    batch = _batch(tok, batch_size, max_length)
    per_sample = [names[i % N_ADAPTERS] for i in range(batch_size)]
    one_params = rotfunc.adapter_params(model, names[0])
    all_params = {k: v for n in names for k, v in rotfunc.adapter_params(model, n).items()}

    def loss_fn(p, rows):
        kwargs = dict(batch) if rows is None else {**batch, "adapter_names": rows}
        out = embed(lambda **kw: torch.func.functional_call(model, p, args=(), kwargs=kw), kwargs)
        return out.square().mean()

    vg = rotfunc.value_and_grad(loss_fn)
    def per_group(fn):  # hide apply_mixed on this config: every layer takes the per-group fallback
        def run():
            object.__setattr__(cfg, "apply_mixed", None)
            try:
                return fn()
            finally:
                object.__delattr__(cfg, "apply_mixed")

        return run

    modes = {
        "inference": {
            "one": lambda: model(**batch),
            "eight": lambda: model(**batch, adapter_names=per_sample),
        },
        "training": {
            "one": lambda: vg(one_params, None),
            "eight": lambda: vg(all_params, per_sample),
        },
    }
    out = []
    for mode, fns in modes.items():
        fns = {**fns, "per-group": per_group(fns["eight"])}
        samples: dict[str, list[float]] = {k: [] for k in fns}
        loads = [_load()]
        ctx = torch.no_grad() if mode == "inference" else torch.enable_grad()
        with ctx, quiet():
            for fn in fns.values():
                fn()
            for _ in range(repeats):
                for key, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    samples[key].append(time.perf_counter() - t0)
        loads.append(_load())
        t8, t1, tg = _stats(samples["eight"]), _stats(samples["one"]), _stats(samples["per-group"])
        ratio = t1["median"] / t8["median"]
        out.append(row(
            f"{LABEL[method]} mixed batch {kind} MiniLM: {N_ADAPTERS} adapters vs 1, {mode}, "
            f"{batch_size}x{max_length} tokens",
            t8, t1, ratio=ratio, target=">= 0.9x throughput", met=ratio >= 0.9, measured=f"{ratio:.2f}x throughput",
            vs="1 adapter", method=method, kind=kind, mode=mode, section="mixed",
            throughput_8=batch_size / t8["median"], throughput_1=batch_size / t1["median"],
            per_group_s=tg["median"], per_group_ratio=t1["median"] / tg["median"],
            load_average=f"{loads[0]:.1f}-{loads[1]:.1f}",
        ))
    return out


def plan(quick: bool = False) -> list[tuple[str, callable]]:
    kw = dict(batch_size=8, max_length=8, repeats=1) if quick else dict(batch_size=32, max_length=32, repeats=7)
    kinds = ("nf4",) if quick else KINDS
    return [(f"mixed {m} {k}", lambda m=m, k=k: mixed_rows(m, k, **kw)) for k in kinds for m in METHODS]


def rows(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(THREADS)
    out = []
    for _, thunk in tqdm(plan(quick), desc="mixed", file=sys.stderr):
        out += thunk()
    return out


COLUMNS = ["name", "vs", "rotfunc_s", "rotfunc_spread", "peft_s", "ratio", "per_group_ratio", "measured",
           "target", "met", "load_average"]

if __name__ == "__main__":
    print(format_table(rows(quick="--quick" in sys.argv[1:]), COLUMNS))
