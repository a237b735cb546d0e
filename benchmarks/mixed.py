"""Mixed-adapter batches: 8 adapters in one batch against 1 adapter, on the nf4 MiniLM (rotfunc only).

For each adapter type, 8 adapters (random non-identity params, ``init_weights=False``) are attached to every
linear layer (``target_modules=["query", "key", "value", "dense"]``) of all-MiniLM-L6-v2 in nf4. A batch of 32
stdlib sentences padded to 32 tokens (``--quick``: 8 x 8) runs

* with one adapter: ``model(**batch)`` with adapter ``a0`` active (the plain single-adapter forward);
* with eight: ``model(**batch, adapter_names=[a0, a1, ..., a7, a0, ...])`` (4 sequences per adapter).

``ratio = time(1) / time(8) = throughput(8) / throughput(1)``; target >= 0.9x. PEFT has no RoAD/OFT/RandLoRA
mixed batches to compare with (its ``adapter_names`` argument is LoRA-family only), so the ``peft_*`` columns
hold the 1-adapter run. Samples of the two alternate; medians.

Run: ``python -m benchmarks.mixed`` (``--quick`` for a small run).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from benchmarks._common import LABEL, METHODS, THREADS, quiet, row
from benchmarks._harness import format_table

__all__ = ["rows", "COLUMNS"]

N_ADAPTERS = 8
TARGET_MODULES = ["query", "key", "value", "dense"]


def _config(method: str):
    import rotfunc

    if method == "road":
        return rotfunc.RoadConfig(variant="road_1", group_size=64, init_weights=False, target_modules=TARGET_MODULES)
    if method == "oft":
        return rotfunc.OFTConfig(oft_block_size=32, r=0, init_weights=False, target_modules=TARGET_MODULES)
    return rotfunc.RandLoraConfig(r=32, init_weights=False, target_modules=TARGET_MODULES)


def mixed_row(method: str, *, batch_size: int, max_length: int, repeats: int) -> dict:
    import rotfunc
    from benchmarks.train import _batch, _minilm

    tok, model = _minilm()
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

    def one():
        return model(**batch)

    def eight():
        return model(**batch, adapter_names=per_sample)

    samples: dict[str, list[float]] = {"eight": [], "one": []}
    with torch.no_grad(), quiet():
        one(), eight()
        for _ in range(repeats):
            for key, fn in (("eight", eight), ("one", one)):
                t0 = time.perf_counter()
                fn()
                samples[key].append(time.perf_counter() - t0)
    t8, t1 = ({"median": statistics.median(v), "min": min(v), "max": max(v)} for v in samples.values())
    ratio = t1["median"] / t8["median"]
    return row(
        f"{LABEL[method]} mixed batch nf4 MiniLM: {N_ADAPTERS} adapters vs 1, {batch_size}x{max_length} tokens",
        t8, t1, target=">= 0.9x throughput", met=ratio >= 0.9, measured=f"{ratio:.2f}x throughput",
        vs="1 adapter", method=method, kind="nf4", section="mixed",
        throughput_8=batch_size / t8["median"], throughput_1=batch_size / t1["median"],
    )


def plan(quick: bool = False) -> list[tuple[str, callable]]:
    kw = dict(batch_size=8, max_length=8, repeats=1) if quick else dict(batch_size=32, max_length=32, repeats=7)
    return [(f"mixed {m}", lambda m=m: mixed_row(m, **kw)) for m in METHODS]


def rows(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring)."""
    from tqdm.auto import tqdm

    torch.set_num_threads(THREADS)
    return [thunk() for _, thunk in tqdm(plan(quick), desc="mixed", file=sys.stderr)]


COLUMNS = ["name", "vs", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "measured", "target",
           "met"]

if __name__ == "__main__":
    print(format_table(rows(quick="--quick" in sys.argv[1:]), COLUMNS))
