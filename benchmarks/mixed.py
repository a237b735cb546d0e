"""Mixed-adapter batches: 8 adapters in one batch against 1 adapter, on the float, int8 and nf4 MiniLM and on the nf4
causal LM (SmolLM2-135M).

For each adapter type and base kind, 8 adapters of one config (random non-identity params,
``init_weights=False``) are attached to every linear layer (``target_modules=["query", "key", "value",
"dense"]``) of all-MiniLM-L6-v2. A batch of 32 stdlib sentences padded to 32 tokens (``--quick``: 8 x 8) runs

* ``one``: adapter ``a0`` active, the plain single-adapter forward (the honest alternative: the same batch, the
  same work, one adapter);
* ``eight``: 8 adapters, 4 sequences each, the batch ordered adapter after adapter by
  :func:`rotfunc.group_rows` (the recipe: every layer reads each adapter's rows as a slice), rotfunc's one-pass
  mixed path (``Adapter.apply_mixed``); the target is judged on this row;
* ``round-robin``: the same 8 adapters with ``adapter_names=[a0, a1, ..., a7, a0, ...]`` on the batch as it
  comes (every layer gathers the rows by adapter and back), for reference.

On the causal LM (``causal_mixed_rows``, the model of ``benchmarks.causal_lm``): the demo's adapter config of each
method on all 210 projections, 8 adapters with random non-identity params of a trained adapter's size, 16 blocks
of 32 tokens of stdlib docstrings (2 per adapter), the causal-LM loss; the same three variants.

Two modes: ``inference`` (``torch.no_grad`` forward) and ``training`` (loss + gradients of every adapter the
batch uses, through :func:`rotfunc.value_and_grad`: 1 adapter's params for ``one``, all 8 adapters' for
``eight``; the loss is a mean over the rows, so grouping the batch leaves it unchanged up to float summation
order). ``ratio = time(one) / time(eight) = throughput(eight) / throughput(one)``; target >= 0.9x. PEFT has
no RoAD/OFT/RandLoRA mixed batches (its ``adapter_names`` is LoRA-family only and refused in training), so the
``peft_*`` columns hold the 1-adapter run. The three variants alternate in one process; medians; the load
average is recorded per row.

Run: ``python -m benchmarks.mixed`` (``--quick`` for a small run; ``--models smollm2 --methods randlora --json F`` for
some rows only, written with the machine to ``F``).
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
CAUSAL = dict(batch_size=16, block=32, repeats=5)  # SmolLM2: 2 blocks of 32 tokens per adapter
_MODELS: dict = {}


def _mixed_setup(model, names: list[str], batch_size: int) -> tuple[list[str], dict, dict]:
    """Activate ``names[0]``; return (one adapter name per row, round-robin; the first adapter's params; every
    adapter's params in one dict): what both the MiniLM and the causal-LM rows compare."""
    import rotfunc

    rotfunc.set_adapter(model, names[0])
    per_sample = [names[i % N_ADAPTERS] for i in range(batch_size)]
    one_params = rotfunc.adapter_params(model, names[0])
    all_params = {k: v for n in names for k, v in rotfunc.adapter_params(model, n).items()}
    return per_sample, one_params, all_params


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
    batch = _batch(tok, batch_size, max_length)
    per_sample, one_params, all_params = _mixed_setup(model, names, batch_size)
    order, grouped = rotfunc.group_rows(per_sample)
    batches = {None: batch, "rr": batch, "grouped": {k: v[order] for k, v in batch.items()}}
    names_of = {None: None, "rr": per_sample, "grouped": grouped}

    def loss_fn(p, which):
        kwargs = dict(batches[which]) if which is None else {**batches[which], "adapter_names": names_of[which]}
        out = embed(lambda **kw: torch.func.functional_call(model, p, args=(), kwargs=kw), kwargs)
        return out.square().mean()

    vg = rotfunc.value_and_grad(loss_fn)
    modes = {
        "inference": {
            "one": lambda: model(**batch),
            "eight": lambda: model(**batches["grouped"], adapter_names=grouped),
            "round-robin": lambda: model(**batch, adapter_names=per_sample),
        },
        "training": {
            "one": lambda: vg(one_params, None),
            "eight": lambda: vg(all_params, "grouped"),
            "round-robin": lambda: vg(all_params, "rr"),
        },
    }
    return _mode_rows(modes, repeats=repeats,
                      name=f"{LABEL[method]} mixed batch {kind} MiniLM", tokens=f"{batch_size}x{max_length}",
                      batch_size=batch_size, method=method, kind=kind)


def _mode_rows(modes: dict, *, repeats: int, name: str, tokens: str, batch_size: int, **extra) -> list[dict]:
    """Time ``modes`` (``{mode: {"one": fn, "eight": fn, "round-robin": fn}}``), interleaved; one row per mode."""
    out = []
    for mode, fns in modes.items():
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
        t8, t1, tg = _stats(samples["eight"]), _stats(samples["one"]), _stats(samples["round-robin"])
        ratio = t1["median"] / t8["median"]
        out.append(row(
            f"{name}: {N_ADAPTERS} adapters vs 1, {mode}, {tokens} tokens",
            t8, t1, ratio=ratio, target=">= 0.9x throughput", met=ratio >= 0.9, measured=f"{ratio:.2f}x throughput",
            vs="1 adapter", mode=mode, section="mixed",
            throughput_8=batch_size / t8["median"], throughput_1=batch_size / t1["median"],
            round_robin_s=tg["median"], round_robin_ratio=t1["median"] / tg["median"],
            load_average=f"{loads[0]:.1f}-{loads[1]:.1f}", **extra,
        ))
    return out


def causal_mixed_rows(method: str, *, batch_size: int, block: int, repeats: int, n_layers: int | None = None) -> list[dict]:
    """Two rows (inference, training) on the nf4 causal LM (SmolLM2-135M, ``benchmarks.causal_lm``'s model): the
    demo's adapter config on all 210 projections, 8 adapters with random non-identity params of a trained
    adapter's size, ``batch_size`` blocks of ``block`` tokens of stdlib docstrings, causal-LM loss."""
    import rotfunc
    from benchmarks.causal_lm import _batch as lm_batch, _model as lm_model, _randomize
    from rotfunc.causal_lm import adapter_config, causal_lm_loss

    tok, model = lm_model(n_layers)
    cfg = adapter_config(method)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    for i, name in enumerate(names):
        rotfunc.attach(model, cfg, adapter_name=name)
        rotfunc.load_params(model, _randomize(rotfunc.adapter_params(model, name), seed=i))
    ids = lm_batch(tok, batch_size, block)
    per_sample, one_params, all_params = _mixed_setup(model, names, batch_size)
    order, grouped = rotfunc.group_rows(per_sample)
    ids_of = {None: ids, "rr": ids, "grouped": ids[order]}
    names_of = {None: None, "rr": per_sample, "grouped": grouped}

    def loss_fn(p, which):
        kwargs = {"input_ids": ids_of[which], "use_cache": False}
        kwargs |= {} if which is None else {"adapter_names": names_of[which]}
        return causal_lm_loss(torch.func.functional_call(model, p, args=(), kwargs=kwargs).logits, ids_of[which])

    vg = rotfunc.value_and_grad(loss_fn)
    modes = {
        "inference": {
            "one": lambda: model(input_ids=ids, use_cache=False),
            "eight": lambda: model(input_ids=ids_of["grouped"], use_cache=False, adapter_names=grouped),
            "round-robin": lambda: model(input_ids=ids, use_cache=False, adapter_names=per_sample),
        },
        "training": {
            "one": lambda: vg(one_params, None),
            "eight": lambda: vg(all_params, "grouped"),
            "round-robin": lambda: vg(all_params, "rr"),
        },
    }
    depth = "" if n_layers is None else f" ({n_layers} layers)"
    return _mode_rows(modes, repeats=repeats, name=f"{LABEL[method]} mixed batch nf4 SmolLM2-135M{depth}",
                      tokens=f"{batch_size}x{block}", batch_size=batch_size, method=method, kind="nf4",
                      model="SmolLM2-135M")


def plan(quick: bool = False, *, models: tuple[str, ...] = ("minilm", "smollm2"),
         methods: tuple[str, ...] = METHODS) -> list[tuple[str, callable]]:
    """MiniLM rows (float, int8, nf4), then the causal LM's (nf4; left out of ``quick``: it needs the SmolLM2
    cache that ``benchmarks --quick`` does not build)."""
    kw = dict(batch_size=8, max_length=8, repeats=1) if quick else dict(batch_size=32, max_length=32, repeats=7)
    kinds = ("nf4",) if quick else KINDS
    out = []
    if "minilm" in models:
        out += [(f"mixed {m} {k}", lambda m=m, k=k: mixed_rows(m, k, **kw)) for k in kinds for m in methods]
    if "smollm2" in models and not quick:
        out += [(f"mixed {m} nf4 SmolLM2", lambda m=m: causal_mixed_rows(m, **CAUSAL)) for m in methods]
    return out


def rows(quick: bool = False, **selection) -> list[dict]:
    """Benchmark rows (see the module docstring); ``selection``: :func:`plan`'s ``models`` / ``methods``."""
    from tqdm.auto import tqdm

    torch.set_num_threads(THREADS)
    out = []
    for _, thunk in tqdm(plan(quick, **selection), desc="mixed", file=sys.stderr):
        out += thunk()
    return out


def main(argv: list[str] | None = None, *, rows_fn=None, columns=None, prog="python -m benchmarks.mixed") -> None:
    """``python -m benchmarks.mixed [--quick] [--models minilm,smollm2] [--methods road,oft,randlora] [--json F]``
    (``benchmarks.ensemble`` takes the same arguments)."""
    import argparse
    import json

    rows_fn, columns = rows_fn or rows, columns or COLUMNS
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json", default=None, help="also write the rows and the machine to this file")
    a = p.parse_args(argv)
    machine = _machine()
    got = rows_fn(a.quick, models=tuple(a.models.split(",")), methods=tuple(a.methods.split(",")))
    print(format_table(got, columns))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "rows": got, "load_end": " ".join(f"{v:.2f}" for v in os.getloadavg())},
                      f, indent=1, default=str)


def _machine() -> dict:
    from benchmarks import report

    return report.machine(threads=THREADS)


COLUMNS = ["name", "vs", "rotfunc_s", "rotfunc_spread", "peft_s", "ratio", "round_robin_ratio", "measured",
           "target", "met", "load_average"]

if __name__ == "__main__":
    main()
