"""Forward overhead of each adapter over the bare layer, fp32 and nf4, with PEFT's forward alongside.

For each adapter and base kind at 4096x4096 with 64 tokens (``--quick``: 128, 8 tokens), on the layers of
``benchmarks._common.pair``, under ``torch.no_grad()``:

* ``bare``: the base layer alone as rotfunc runs it (``nn.Linear``; nf4: rotfunc's dequantize + ``F.linear``,
  :func:`rotfunc.quant.quant_forward`);
* ``rotfunc``: the attached model's forward (``AdaptedLinear`` -> the config's pure ``apply``);
* ``PEFT``: PEFT's adapted layer on its copy of the same base (nf4: PEFT's bnb path, bitsandbytes' own
  ``Linear4bit`` forward inside).

The three are sampled in turn (one sample = ``k`` back-to-back calls, per-call time) so load from other
processes hits them alike; medians over the samples. ``overhead = rotfunc / bare - 1`` carries the target
(RoAD <= 5 %, OFT <= 25 %; RandLoRA has none); ``ratio = PEFT / rotfunc``. The bare and rotfunc samples are
then repeated with 1 torch thread (``overhead_1thread``, shown alongside, not judged): on a loaded 2-core
machine every parallel op of the adapter path can stall at its OpenMP barrier, which the 1-thread figure is
free of.

Run: ``python -m benchmarks.forward`` (``--quick`` for small sizes).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

from benchmarks._common import LABEL, METHODS, THREADS, pair, quiet, row
from benchmarks._harness import format_table

__all__ = ["rows", "COLUMNS"]

TARGETS = {"road": 0.05, "oft": 0.25}


def _per_call(fn, k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) / k


def forward_row(method: str, n: int, kind: str, *, tokens: int, repeats: int, k: int) -> dict:
    from rotfunc import quant

    pm, layer, model = pair(method, n, kind)
    base = model.lin.base_layer
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(2))
    bare = (lambda: quant.quant_forward(base, x)) if kind == "nf4" else (lambda: base(x))
    fns = {"bare": bare, "rotfunc": lambda: model(x), "peft": lambda: pm(x)}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad(), quiet():
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in fns.items():
                samples[name].append(_per_call(fn, k))
        # the same interleaved samples with 1 thread: no OpenMP barrier for a descheduled thread to stall
        old_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = {name: [] for name in ("bare", "rotfunc")}
            for _ in range(max(1, repeats // 2)):
                for name in one:
                    one[name].append(_per_call(fns[name], k))
        finally:
            torch.set_num_threads(old_threads)
    t_bare, t_ours, t_peft = ({"median": statistics.median(v), "min": min(v), "max": max(v)} for v in samples.values())
    overhead = t_ours["median"] / t_bare["median"] - 1
    overhead_1t = statistics.median(one["rotfunc"]) / statistics.median(one["bare"]) - 1
    peft_overhead = t_peft["median"] / t_bare["median"] - 1
    target = f"overhead <= {TARGETS[method]:.0%}" if method in TARGETS else ""
    return row(
        f"{LABEL[method]} forward {n}x{n} {kind}, {tokens} tokens", t_ours, t_peft, target=target,
        met=(overhead <= TARGETS[method]) if target else None,
        measured=f"{overhead:+.1%} over bare ({overhead_1t:+.1%} with 1 thread)", overhead_1thread=overhead_1t,
        vs="PEFT", bare_s=t_bare["median"], bare_spread=f"{t_bare['min']:.4g}-{t_bare['max']:.4g}",
        overhead=overhead, peft_overhead=peft_overhead, method=method, size=n, kind=kind, section="forward",
    )


def plan(quick: bool = False) -> list[tuple[str, callable]]:
    n, tokens = (128, 8) if quick else (4096, 64)
    kw = dict(tokens=tokens, repeats=1 if quick else 15, k=1 if quick else 3)
    return [(f"forward {m} {kind}", lambda m=m, kind=kind: forward_row(m, n, kind, **kw))
            for m in METHODS for kind in ("fp32", "nf4")]


def rows(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring)."""
    torch.set_num_threads(THREADS)
    return [thunk() for _, thunk in tqdm(plan(quick), desc="forward", file=sys.stderr)]


COLUMNS = ["name", "vs", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "bare_s", "measured",
           "target", "met"]

if __name__ == "__main__":
    print(format_table(rows(quick="--quick" in sys.argv[1:]), COLUMNS))
