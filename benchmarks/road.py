"""RoAD benchmarks: merge + unmerge against PEFT's RoAD ``Linear``, and the forward overhead of ``apply_road``.

PEFT builds the dense (out, out) R, multiplies it into W and unmerges with ``torch.linalg.inv(R)``; rotfunc
mixes row pairs in place of R (O(out * in)) and inverts each 2x2 block in closed form.

rotfunc's merge and unmerge each cost about one fresh (out, in) tensor: at 4096x4096 fp32 most of their time
is the kernel's page faults on those 64 MB. torch's own ``THP_MEM_ALLOC_ENABLE=1`` (read when torch starts;
it backs large CPU tensors with transparent huge pages) made them ~3x faster on this machine; PEFT, which
is dominated by a dense 4096^3 matmul and ``linalg.inv``, does not change.

Run: ``python -m benchmarks.road`` (add ``--quick`` for small sizes).
"""

from __future__ import annotations

import contextlib
import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks._harness import format_table, peak_rss_bytes, timeit
from rotfunc.road import RoadParams, apply_road, road_merge, road_unmerge

VARIANT, GROUP_SIZE = "road_1", 64


def _spread(t: dict) -> str:
    return f"{t['min']:.4g}-{t['max']:.4g}"


def _timeit_per_call(fn, /, *, k: int, repeats: int, warmup: int = 1) -> dict:
    """timeit of ``k`` back-to-back calls, divided by ``k``: per-call times of fast functions without the
    cold-cache cost of the harness's gc.collect() before every repeat."""

    def batch():
        for _ in range(k):
            fn()

    t = timeit(batch, repeats=repeats, warmup=warmup)
    return {key: (v / k if key != "n" else v) for key, v in t.items()}


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with ``n`` intra-op threads (None: leave torch's setting alone)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield f"{torch.get_num_threads()} thread" + ("s" if torch.get_num_threads() > 1 else "")
    finally:
        torch.set_num_threads(old)


def _peft_layer(out: int, inp: int, seed: int):
    from peft import RoadConfig
    from peft.tuners.road.layer import Linear as PeftRoadLinear

    torch.manual_seed(seed)
    lin = torch.nn.Linear(inp, out)
    config = RoadConfig(variant=VARIANT, group_size=GROUP_SIZE, init_weights=False)
    layer = PeftRoadLinear(lin, "default", config=config)
    params = RoadParams(layer.road_theta["default"].detach().clone(), layer.road_alpha["default"].detach().clone())
    return layer, params


def _merge_row(
    n: int, *, repeats: int, peft_repeats: int, k: int = 1, peak: bool = True, threads: int | None = None
) -> dict:
    with _threads(threads) as label:
        return _merge_row_body(n, repeats=repeats, peft_repeats=peft_repeats, k=k, peak=peak, label=label)


def _merge_row_body(n: int, *, repeats: int, peft_repeats: int, k: int, peak: bool, label: str) -> dict:
    layer, p = _peft_layer(n, n, seed=0)
    base = layer.get_base_layer()
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    kw = dict(variant=VARIANT, group_size=GROUP_SIZE)

    def ours():
        return road_unmerge(p, *road_merge(p, W, b, **kw), **kw)

    def theirs():
        with torch.no_grad():
            layer.merge()
            layer.unmerge()

    t_ours = _timeit_per_call(ours, k=k, repeats=repeats)
    t_peft = timeit(theirs, repeats=peft_repeats)
    ratio = t_peft["median"] / t_ours["median"]
    row = {
        "name": f"RoAD merge+unmerge {n}x{n} fp32 ({VARIANT}, group_size={GROUP_SIZE}, with bias; {label})",
        "rotfunc_s": t_ours["median"],
        "rotfunc_spread": _spread(t_ours),
        "peft_s": t_peft["median"],
        "peft_spread": _spread(t_peft),
        "ratio": ratio,
        "target": ">= 100x" if n >= 4096 else "",
        "met": ratio >= 100 if n >= 4096 else None,
    }
    if peak:
        row["rotfunc_peak_bytes"] = peak_rss_bytes(ours)
        row["peft_peak_bytes"] = peak_rss_bytes(theirs)
    return row


def _forward_rows(n: int, tokens: int, *, repeats: int, k: int, threads: int | None = None) -> list[dict]:
    with _threads(threads) as label:
        return _forward_rows_body(n, tokens, repeats=repeats, k=k, label=label)


def _forward_rows_body(n: int, tokens: int, *, repeats: int, k: int, label: str) -> list[dict]:
    layer, p = _peft_layer(n, n, seed=1)
    base = layer.get_base_layer()
    W, b = base.weight.detach(), base.bias.detach()
    x = torch.randn(tokens, n)
    kw = dict(variant=VARIANT, group_size=GROUP_SIZE)

    def bare():
        return F.linear(x, W, b)

    def ours():
        return apply_road(p, F.linear(x, W, b), **kw)

    def theirs():
        with torch.no_grad():
            return layer(x)

    with torch.no_grad():
        # alternate single samples of the two so that load from other processes on this shared machine
        # hits both alike, then take medians
        samples: dict[str, list[float]] = {"bare": [], "ours": [], "peft": []}
        for fn in (bare, ours, theirs):
            fn()  # warm up
        for _ in range(repeats):
            for name, fn in (("bare", bare), ("ours", ours), ("peft", theirs)):
                samples[name].append(_timeit_per_call(fn, k=k, repeats=1, warmup=0)["median"])
        t_bare, t_ours, t_peft = (
            {"median": statistics.median(v), "min": min(v), "max": max(v)} for v in samples.values()
        )
    overhead = t_ours["median"] / t_bare["median"]
    speedup = t_peft["median"] / t_ours["median"]
    return [
        {
            "name": f"forward overhead {n}x{n} fp32, {tokens} tokens, {label}: apply_road(F.linear) vs bare "
            "F.linear (peft_* = bare F.linear; ratio = rotfunc/bare)",
            "rotfunc_s": t_ours["median"],
            "rotfunc_spread": _spread(t_ours),
            "peft_s": t_bare["median"],
            "peft_spread": _spread(t_bare),
            "ratio": overhead,
            "target": "<= 1.05 (5% overhead)",
            "met": overhead <= 1.05,
        },
        {
            "name": f"forward {n}x{n} fp32, {tokens} tokens, {label}: apply_road(F.linear) vs PEFT RoAD Linear",
            "rotfunc_s": t_ours["median"],
            "rotfunc_spread": _spread(t_ours),
            "peft_s": t_peft["median"],
            "peft_spread": _spread(t_peft),
            "ratio": speedup,
            "target": "",
            "met": None,
        },
    ]


def rows(quick: bool = False) -> list[dict]:
    """Benchmark rows (see benchmarks/_harness.py); ``quick`` uses small sizes and few repeats."""
    if quick:
        return [
            _merge_row(128, repeats=1, peft_repeats=1, k=3, peak=False),
            _merge_row(256, repeats=1, peft_repeats=1, k=3, peak=False),
            *_forward_rows(256, 8, repeats=1, k=3),
        ]
    # Rows with 1 thread too: on this shared 2-core machine, other processes deschedule one of torch's two
    # OpenMP threads and every parallel elementwise op then waits ~10-25 ms at its barrier, whatever its size.
    return [
        _merge_row(1024, repeats=7, peft_repeats=3, k=5),
        _merge_row(4096, repeats=7, peft_repeats=2),
        _merge_row(4096, repeats=5, peft_repeats=1, peak=False, threads=1),
        *_forward_rows(4096, 64, repeats=15, k=5),
        *_forward_rows(4096, 64, repeats=15, k=5, threads=1)[:1],
    ]


COLUMNS = [
    "name",
    "rotfunc_s",
    "rotfunc_spread",
    "peft_s",
    "peft_spread",
    "ratio",
    "target",
    "met",
    "rotfunc_peak_bytes",
    "peft_peak_bytes",
]

if __name__ == "__main__":
    print(format_table(rows(quick="--quick" in sys.argv[1:]), COLUMNS))
