"""RandLoRA benchmarks: merge + unmerge, forward time and forward peak memory, rotfunc vs PEFT.

Rows (fp32, r = 32, PEFT's default randlora_alpha):

* merge + unmerge of one n x n layer (n = 1024, 4096): ``randlora_unmerge(randlora_merge(W))`` vs PEFT's
  in-place ``layer.merge(); layer.unmerge()``;
* forward of the adapted layer (base + adapter) at 4096 x 4096 for a small and a large batch:
  ``RandLoraConfig.apply`` vs PEFT's ``layer(x)``;
* peak resident memory of one forward at 4096 x 4096, batch 8: ``apply_randlora`` vs PEFT's forward, and vs
  materializing the delta (``x @ randlora_delta(...).T``, the baseline in the ``peft_*`` columns of that row).

Run ``python -m benchmarks.randlora`` for the table.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from benchmarks._harness import format_table, peak_rss_bytes, timeit
from rotfunc.randlora import RandLoraConfig, RandLoraParams, apply_randlora, randlora_delta, randlora_merge, randlora_unmerge

R = 32


def _spread(t: dict) -> str:
    return f"{t['min']:.4g}-{t['max']:.4g}"


class _One(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.lin(x)


def _setup(n: int):
    """A PEFT RandLoRA layer with random non-identity params, and the same adapter as rotfunc pytrees."""
    import peft

    torch.manual_seed(0)
    pm = peft.get_peft_model(_One(n, n), peft.RandLoraConfig(r=R, target_modules=["lin"]))
    layer = pm.base_model.model.lin
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lam, gam = layer.randlora_lambda["default"], layer.randlora_gamma["default"]
        lam.copy_(torch.randn(lam.shape, generator=g) * 1e-2)
        gam.copy_(torch.rand(gam.shape, generator=g) / n)
    cfg = RandLoraConfig(r=R, target_modules=["lin"])
    bases = cfg.init_shared([(n, n)])
    params = RandLoraParams(lam.detach().clone(), gam.detach().clone())
    return layer, cfg, bases, params


def _row(name, ours, theirs, target="", **extra):
    ratio = theirs["median"] / ours["median"] if theirs else None
    met = None
    if target.startswith(">=") and ratio is not None:
        met = ratio >= float(target[2:].strip().rstrip("x"))
    row = {
        "name": name,
        "rotfunc_s": ours["median"],
        "rotfunc_spread": _spread(ours),
        "peft_s": theirs["median"] if theirs else None,
        "peft_spread": _spread(theirs) if theirs else None,
        "ratio": ratio,
        "target": target,
        "met": met,
    }
    row.update(extra)
    return row


def rows(quick: bool = False) -> list[dict]:
    """Merge + unmerge, forward and forward-memory rows (see the module docstring)."""
    out = []
    sizes = [128] if quick else [1024, 4096]
    reps = 1 if quick else 3
    for n in sizes:
        layer, cfg, bases, params = _setup(n)
        W = layer.base_layer.weight.detach().clone()
        s = cfg.scaling

        def ours():
            return randlora_unmerge(params, bases, randlora_merge(params, bases, W, scaling=s), scaling=s)

        def theirs():
            with torch.no_grad():
                layer.merge()
                layer.unmerge()

        out.append(_row(f"merge+unmerge {n}x{n} fp32 r={R}", timeit(ours, repeats=reps), timeit(theirs, repeats=reps), ">= 1x"))

    out += forward_rows(quick)
    out += memory_rows(quick)
    return out


def forward_rows(quick: bool = False) -> list[dict]:
    """Forward (base + adapter) at 4096 x 4096 (``quick``: 128) for batches of 8 and 2048, rotfunc vs PEFT."""
    out = []
    reps = 1 if quick else 3
    n = 128 if quick else 4096
    layer, cfg, bases, params = _setup(n)
    base = layer.base_layer
    for batch in [8] if quick else [8, 2048]:
        x = torch.randn(batch, n, generator=torch.Generator().manual_seed(2))

        def ours_fwd():
            with torch.no_grad():
                return cfg.apply(params, x, base, in_features=n, out_features=n, shared=bases)

        def peft_fwd():
            with torch.no_grad():
                return layer(x)

        out.append(_row(
            f"forward (base + adapter) {n}x{n} batch {batch}",
            timeit(ours_fwd, repeats=2 * reps + 1), timeit(peft_fwd, repeats=2 * reps + 1), ">= 1x",
        ))

    return out


def memory_rows(quick: bool = False) -> list[dict]:
    """Peak RSS of one adapter-only forward at 4096 x 4096, batch 8: apply_randlora vs PEFT vs the dense delta."""
    out = []
    reps = 1 if quick else 3
    n = 128 if quick else 4096
    layer, cfg, bases, params = _setup(n)
    base = layer.base_layer
    x = torch.randn(8, n, generator=torch.Generator().manual_seed(3))

    def ours_adapter():
        with torch.no_grad():
            return apply_randlora(params, bases, x, in_features=n, out_features=n, scaling=cfg.scaling)

    def peft_adapter():
        with torch.no_grad():
            return layer(x) - base(x)

    def dense_adapter():
        with torch.no_grad():
            return x @ randlora_delta(params, bases, in_features=n, out_features=n, scaling=cfg.scaling).T

    ours_peak, peft_peak, dense_peak = (
        max(peak_rss_bytes(f) for _ in range(1 if quick else 2)) for f in (ours_adapter, peft_adapter, dense_adapter)
    )
    t_ours = timeit(ours_adapter, repeats=2 * reps + 1)
    out.append(_row(
        f"RandLoRA adapter branch only (peak RSS) {n}x{n} batch 8 vs PEFT forward - base",
        t_ours, timeit(peft_adapter, repeats=2 * reps + 1), "",
        rotfunc_peak_bytes=ours_peak, peft_peak_bytes=peft_peak, vs="PEFT",
    ))
    out.append(_row(
        f"RandLoRA adapter branch only (peak RSS) {n}x{n} batch 8 vs materialized delta x @ dW.T",
        t_ours, timeit(dense_adapter, repeats=reps), "",
        rotfunc_peak_bytes=ours_peak, peft_peak_bytes=dense_peak, baseline="x @ randlora_delta(...).T",
        vs="dense delta",
    ))
    return out


COLUMNS = [
    "name", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "target", "met",
    "rotfunc_peak_bytes", "peft_peak_bytes",
]

if __name__ == "__main__":
    import sys

    print(format_table(rows(quick="--quick" in sys.argv), COLUMNS))
