"""OFT benchmarks: structured merge + unmerge vs PEFT's dense merge / ``linalg.inv`` unmerge, and forward overhead.

Rows:

* ``merge+unmerge`` at (n, n) float32, block size 64, exact Cayley and Cayley-Neumann: rotfunc's block-wise
  ``oft_merge`` then ``oft_unmerge`` vs PEFT's OFT ``Linear.merge()`` then ``.unmerge()`` (dense block-diagonal
  matmul, then a dense (in, in) ``torch.linalg.inv``) in the same run. Target at the largest size: >= 30x.
* ``forward``: ``F.linear(oft_rotate(params, x), W)`` against the bare ``F.linear(x, W)`` (64 tokens, 4096x4096),
  target <= 25 % overhead; PEFT's OFT ``Linear`` forward is timed alongside.

Run ``python -m benchmarks.oft`` from the repository root for the table.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from benchmarks._harness import format_table, peak_rss_bytes, timeit
from rotfunc.oft import OFTParams, oft_merge, oft_rotate, oft_unmerge

__all__ = ["rows"]

BLOCK = 64


def _peft_layer(n: int, *, use_cayley_neumann: bool):
    from peft import OFTConfig
    from peft.tuners.oft.layer import Linear

    torch.manual_seed(0)
    base = torch.nn.Linear(n, n, bias=False)
    cfg = OFTConfig(oft_block_size=BLOCK, use_cayley_neumann=use_cayley_neumann, init_weights=False,
                    target_modules=["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = Linear(base, "default", config=cfg, r=0)
    layer.requires_grad_(False)
    with torch.no_grad():  # PEFT's random init is N(0, 0.1²): at b=64 that is ||Q||₂ ~ 1.6; trained OFT is smaller
        layer.oft_R["default"].weight.mul_(0.1)
    return layer


def _spread(t: dict) -> str:
    return f"{t['min']:.4g}-{t['max']:.4g}"


def _merge_row(n: int, *, use_cayley_neumann: bool, quick: bool, target: str) -> dict:
    layer = _peft_layer(n, use_cayley_neumann=use_cayley_neumann)
    params = OFTParams(layer.oft_R["default"].weight.detach().clone())
    weight = layer.base_layer.weight.detach().clone()
    kw = dict(block_size=BLOCK, use_cayley_neumann=use_cayley_neumann)

    def ours():
        return oft_unmerge(params, oft_merge(params, weight, **kw), **kw)

    def theirs():
        with torch.no_grad():
            layer.merge()
            layer.unmerge()

    big = n >= 4096
    t_ours = timeit(ours, repeats=2 if quick else 7, warmup=1)
    t_peft = timeit(theirs, repeats=2 if (quick or big) else 3, warmup=0 if big else 1)
    restored = ours()
    error = (restored - weight).abs().max().item()
    ratio = t_peft["median"] / t_ours["median"]
    mode = "Cayley-Neumann(5)" if use_cayley_neumann else "exact Cayley"
    return {
        "name": f"merge+unmerge {n}x{n} fp32 b={BLOCK} {mode}",
        "rotfunc_s": t_ours["median"], "rotfunc_spread": _spread(t_ours),
        "peft_s": t_peft["median"], "peft_spread": _spread(t_peft),
        "ratio": ratio, "target": target, "met": (ratio >= 30) if target else None,
        "rotfunc_peak_bytes": peak_rss_bytes(ours), "peft_peak_bytes": peak_rss_bytes(theirs),
        "roundtrip_max_abs_err": error,
    }


def _forward_row(n: int, tokens: int, *, use_cayley_neumann: bool, quick: bool) -> dict:
    layer = _peft_layer(n, use_cayley_neumann=use_cayley_neumann)
    params = OFTParams(layer.oft_R["default"].weight.detach().clone())
    weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(0))
    kw = dict(block_size=BLOCK, use_cayley_neumann=use_cayley_neumann)
    repeats = 2 if quick else 30

    def bare():
        return F.linear(x, weight)

    def ours():
        return F.linear(oft_rotate(params, x, **kw), weight)

    def theirs():
        with torch.no_grad():
            return layer(x)

    with torch.no_grad():
        t_bare = timeit(bare, repeats=repeats, warmup=2)
        t_ours = timeit(ours, repeats=repeats, warmup=2)
    t_peft = timeit(theirs, repeats=repeats, warmup=2)
    overhead = t_ours["median"] / t_bare["median"] - 1
    mode = "Cayley-Neumann(5)" if use_cayley_neumann else "exact Cayley"
    return {
        "name": f"forward oft_rotate+F.linear {tokens} tok {n}x{n} b={BLOCK} {mode}",
        "rotfunc_s": t_ours["median"], "rotfunc_spread": _spread(t_ours),
        "peft_s": t_peft["median"], "peft_spread": _spread(t_peft),
        "ratio": t_peft["median"] / t_ours["median"],
        "bare_linear_s": t_bare["median"], "overhead_vs_bare": f"{100 * overhead:.1f}%",
        "target": "<= 25% over bare F.linear", "met": overhead <= 0.25,
    }


def rows(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring). ``quick``: two small rows, few repeats (seconds)."""
    if quick:  # one merge row and one forward row at small sizes: a smoke run
        return [
            _merge_row(128, use_cayley_neumann=False, quick=True, target=""),
            _forward_row(256, 16, use_cayley_neumann=True, quick=True),
        ]
    out = [
        _merge_row(1024, use_cayley_neumann=False, quick=False, target=""),
        _merge_row(4096, use_cayley_neumann=False, quick=False, target=">= 30x"),
        _merge_row(4096, use_cayley_neumann=True, quick=False, target=">= 30x"),
    ]
    for use_cn in (True, False):
        out.append(_forward_row(4096, 64, use_cayley_neumann=use_cn, quick=False))
    return out


COLUMNS = [
    "name", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "target", "met",
    "rotfunc_peak_bytes", "peft_peak_bytes", "bare_linear_s", "overhead_vs_bare", "roundtrip_max_abs_err",
]

if __name__ == "__main__":
    import sys

    print(format_table(rows(quick="--quick" in sys.argv[1:]), COLUMNS))
