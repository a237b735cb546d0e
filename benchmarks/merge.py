"""Merge + unmerge of RoAD, OFT and RandLoRA, rotfunc against PEFT on the same layers, fp32 and nf4.

Rows, for each adapter at n = 1024 and 4096 (``--quick``: 64 and 128), on a float32 ``nn.Linear`` and on a
bitsandbytes nf4 ``Linear4bit`` (fp32 compute, with bias):

* ``merge+unmerge``: ``rotfunc.merge(model); rotfunc.unmerge(model)`` against PEFT's ``layer.merge();
  layer.unmerge()`` on a copy of the same layer holding the same adapter params (``benchmarks._common.pair``).
  nf4 PEFT layers come from PEFT's own dispatch (the model carries ``is_loaded_in_4bit`` as transformers sets
  it). When PEFT raises, or leaves the layer broken (a weight no longer 4-bit, a forward that raises), the
  PEFT cell says ``PEFT fails: <error>`` instead of a time. ``*_roundtrip_err`` is the largest change of the
  layer's (dequantized) weight after one merge + unmerge cycle: rotfunc's nf4 unmerge restores the packed
  weight bitwise; PEFT requantizes twice and drifts.
* ``merge into nf4 vs floor`` (n = 4096): ``rotfunc.merge`` alone against the bare ``dequantize +
  requantize`` of the same layer (the floor any merge into nf4 pays); target <= 1.3x the floor.
* an exact-Cayley OFT row at 4096 from ``benchmarks.oft`` (the default rows use PEFT's Cayley-Neumann).
* ``merge+unmerge fp32 vs copy floor`` (RoAD and OFT, n = 4096): ``rotfunc.merge`` + ``rotfunc.unmerge`` on the
  float layer (in place, one pass: each piece of W's rows is copied into a backup and merged from there into the
  weight's own storage; unmerge copies the backup back) against the floor of two in-place copies of W
  (``buf.copy_(W); W.copy_(buf)`` into an existing buffer); target <= 2x the floor. Alongside (not judged): the
  same cycle with ``unmerge(keep_buffers=True)``, which reuses the backup buffer instead of allocating a fresh
  one per merge.

Targets (fp32, 4096^2): RoAD >= 100x PEFT, OFT >= 30x. PEFT's 4096 merges take seconds: they get 2 timed
repeats (and 3 at 1024) against rotfunc's 5 (7 at 1024); the peak-memory column is measured on the warm-up
call of each side.

Run: ``python -m benchmarks.merge`` (``--quick`` for small sizes).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

from benchmarks._common import LABEL, METHODS, THREADS, error_text, pair, quiet, row
from benchmarks._harness import format_table, peak_rss_bytes, timeit

__all__ = ["rows", "COLUMNS"]

TARGETS = {"road": 100.0, "oft": 30.0}


def _weight_of(layer) -> torch.Tensor:
    """The layer's float weight (dequantized for nf4), a fresh tensor."""
    from rotfunc import quant

    if quant.is_quantized(layer):
        return quant.dequantize(layer, dtype=torch.float32)
    return layer.weight.detach().clone()


def _peft_check(pm, layer, n: int, kind: str) -> None:
    """Raise if PEFT's merge left the layer in a state that is not a working merged layer."""
    base = layer.get_base_layer()
    if kind == "nf4" and base.weight.dtype != torch.uint8:
        try:
            with torch.no_grad():
                pm(torch.zeros(1, n))
        except Exception as e:
            raise RuntimeError(f"merge leaves the 4-bit weight as {base.weight.dtype}; next forward: "
                               f"{error_text(e)}") from None
        raise RuntimeError(f"merge leaves the 4-bit weight unquantized ({base.weight.dtype})")


def merge_row(method: str, n: int, kind: str, *, repeats: int, peft_repeats: int, peak: bool) -> dict:
    """One merge+unmerge row (see the module docstring)."""
    import rotfunc

    pm, layer, model = pair(method, n, kind)
    rot_layer = model.lin.base_layer
    w0_rot, w0_peft = _weight_of(rot_layer), _weight_of(layer.get_base_layer())

    def ours():
        rotfunc.merge(model)
        rotfunc.unmerge(model)

    def theirs():
        with torch.no_grad(), quiet():
            layer.merge()
            layer.unmerge()

    # warm-up call of each side = the peak-memory measurement and the round-trip error
    rot_peak = peak_rss_bytes(ours) if peak else None
    rot_err = (_weight_of(rot_layer) - w0_rot).abs().max().item()
    t_ours = timeit(ours, repeats=repeats, warmup=0)

    name = f"{LABEL[method]} merge+unmerge {n}x{n} {kind}"
    extra = {"vs": "PEFT", "rotfunc_peak_bytes": rot_peak, "rotfunc_roundtrip_err": rot_err,
             "method": method, "size": n, "kind": kind, "section": "merge"}
    try:
        with torch.no_grad(), quiet():
            layer.merge()
            _peft_check(pm, layer, n, kind)
            layer.unmerge()
        peft_err = (_weight_of(layer.get_base_layer()) - w0_peft).abs().max().item()
        peft_peak = peak_rss_bytes(theirs) if peak else None
        t_peft = timeit(theirs, repeats=peft_repeats, warmup=0)
    except Exception as e:  # PEFT's own failure is a result, reported in the cell
        return row(name, t_ours, None, target=_target(method, n, kind), met=False if _target(method, n, kind) else None,
                   peft_error=f"PEFT fails: {error_text(e)}", measured="PEFT fails", **extra)
    target = _target(method, n, kind)
    ratio = t_peft["median"] / t_ours["median"]
    met = ratio >= TARGETS[method] if target else None
    return row(name, t_ours, t_peft, target=target, met=met, measured=f"{ratio:.3g}x faster",
               peft_peak_bytes=peft_peak, peft_roundtrip_err=peft_err, **extra)


def _target(method: str, n: int, kind: str) -> str:
    if n >= 4096 and kind == "fp32" and method in TARGETS:
        return f">= {TARGETS[method]:g}x faster"
    return ""


def floor_row(method: str, n: int, *, repeats: int) -> dict:
    """``rotfunc.merge`` into nf4 vs the bare dequantize + requantize floor, samples interleaved."""
    import rotfunc
    from rotfunc import quant

    _, _, model = pair(method, n, "nf4")
    lin = model.lin.base_layer

    def floor():
        quant.requantize(lin, quant.dequantize(lin))

    samples: dict[str, list[float]] = {"merge": [], "floor": []}
    floor()
    rotfunc.merge(model)
    rotfunc.unmerge(model)
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
    return row(f"{LABEL[method]} merge into nf4 {n}x{n} vs dequantize+requantize floor", t_m, t_f,
               target="<= 1.3x floor", met=over <= 1.3, measured=f"{over:.3g}x floor", vs="floor",
               method=method, size=n, kind="nf4", section="floor")


def copy_floor_row(method: str, n: int, *, repeats: int) -> dict:
    """Float merge+unmerge through the shims against two in-place copies of W, samples interleaved."""
    import rotfunc

    _, _, model = pair(method, n, "fp32")
    _, _, kept = pair(method, n, "fp32")  # its own model: a kept buffer must not be taken by the default cycle
    w = model.lin.base_layer.weight.detach()
    buf = torch.empty_like(w)

    def floor():
        buf.copy_(w)
        w.copy_(buf)

    def cycle():
        rotfunc.merge(model)
        rotfunc.unmerge(model)

    def cycle_kept():
        rotfunc.merge(kept)
        rotfunc.unmerge(kept, keep_buffers=True)

    fns = {"merge": cycle, "kept": cycle_kept, "floor": floor}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    rotfunc.merge(kept)
    rotfunc.unmerge(kept)  # frees the kept buffer
    t_m, t_k, t_f = ({"median": statistics.median(v), "min": min(v), "max": max(v)} for v in samples.values())
    over, over_k = t_m["median"] / t_f["median"], t_k["median"] / t_f["median"]
    return row(f"{LABEL[method]} merge+unmerge {n}x{n} fp32 (in place) vs two in-place copies of W", t_m, t_f,
               target="<= 2x floor", met=over <= 2.0,
               measured=f"{over:.3g}x floor ({over_k:.3g}x with unmerge(keep_buffers=True))", vs="copy floor",
               kept_s=t_k["median"], method=method, size=n, kind="fp32", section="floor")


def _oft_exact_row() -> dict:
    from benchmarks import oft

    r = oft._merge_row(4096, use_cayley_neumann=False, quick=False, target=">= 30x")
    r.update(name="OFT merge+unmerge 4096x4096 fp32, exact Cayley, no bias (benchmarks.oft)", vs="PEFT",
             measured=f"{r['ratio']:.3g}x faster", target=">= 30x faster", method="oft", size=4096, kind="fp32",
             section="merge")
    return r


def plan(quick: bool = False) -> list[tuple[str, callable]]:
    """(label, thunk) per row, so the report can show progress row by row."""
    sizes = (64, 128) if quick else (1024, 4096)
    out = []
    for method in METHODS:
        for kind in ("fp32", "nf4"):
            for n in sizes:
                big = n >= 4096
                kw = dict(repeats=1 if quick else (5 if big else 7), peft_repeats=1 if quick else (2 if big else 3),
                          peak=not quick)
                out.append((f"merge {method} {kind} {n}", lambda m=method, k=kind, s=n, kw=kw: merge_row(m, s, k, **kw)))
    n_floor = 128 if quick else 4096
    for method in METHODS:
        out.append((f"floor {method} {n_floor}", lambda m=method: floor_row(m, n_floor, repeats=1 if quick else 5)))
    for method in ("road", "oft"):
        out.append((f"floor {method} fp32 copies {n_floor}",
                    lambda m=method: copy_floor_row(m, n_floor, repeats=1 if quick else 7)))
    if not quick:
        out.append(("merge oft exact 4096", _oft_exact_row))
    return out


def rows(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring); ``quick``: small sizes, one repeat."""
    torch.set_num_threads(THREADS)
    out = []
    for label, thunk in tqdm(plan(quick), desc="merge", file=sys.stderr):
        out.append(thunk())
    return out


COLUMNS = ["name", "vs", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "measured", "target",
           "met", "rotfunc_peak_bytes", "peft_peak_bytes", "rotfunc_roundtrip_err", "peft_roundtrip_err",
           "peft_error"]

if __name__ == "__main__":
    print(format_table(rows(quick="--quick" in sys.argv[1:]), COLUMNS))
