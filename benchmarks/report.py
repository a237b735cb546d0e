"""Render the benchmark rows: machine description, ``RESULTS.md``, ``results.json`` and ``results.png``."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["machine", "write_all", "render_markdown", "plot", "COLUMNS", "check_rows"]

# (key, header) of the full table
COLUMNS = [
    ("name", "row"),
    ("vs", "compared with"),
    ("rotfunc_s", "rotfunc s"),
    ("rotfunc_spread", "rotfunc min-max"),
    ("peft_s", "other s"),
    ("peft_spread", "other min-max"),
    ("ratio", "ratio other/rotfunc"),
    ("measured", "measured"),
    ("target", "target"),
    ("met", "met"),
    ("rotfunc_peak_bytes", "rotfunc peak MiB"),
    ("peft_peak_bytes", "other peak MiB"),
    ("notes", "notes"),
]


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# the CPU features that change which kernels torch and bitsandbytes run (vector width, bf16/fp16 dot products, AMX)
_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
          "amx_int8")


def cpu_flags() -> str:
    """The kernel-relevant flags of /proc/cpuinfo present on this CPU (``_FLAGS``), space-separated."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(fl for fl in _FLAGS if fl in have) or "none of " + " ".join(_FLAGS)
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine(*, threads: int) -> dict:
    """CPU, cores, versions, date, torch threads, load average (1, 5, 15 min) now."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "transformers": _version("transformers"),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }


def check_rows(rows: list[dict]) -> list[str]:
    """Problems with the rows: missing keys, NaN/inf numbers. Empty when the rows are well formed."""
    problems = []
    for r in rows:
        for key in ("name", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "target", "met"):
            if key not in r:
                problems.append(f"{r.get('name', '?')}: missing key {key!r}")
        for key, v in r.items():
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{r.get('name', '?')}: {key}={v}")
    return problems


def _cell(key: str, r: dict) -> str:
    v = r.get(key)
    if key == "notes":
        bits = [r.get("peft_error"), r.get("rotfunc_error")]
        if r.get("rotfunc_roundtrip_err") is not None:
            bits.append(f"round-trip max abs dW: rotfunc {r['rotfunc_roundtrip_err']:.2g}"
                        + (f", PEFT {r['peft_roundtrip_err']:.2g}" if r.get("peft_roundtrip_err") is not None else ""))
        if r.get("bare_s") is not None:
            bits.append(f"bare layer {r['bare_s'] * 1e3:.3g} ms; PEFT {r['peft_overhead']:+.1%} over bare")
        return "; ".join(b for b in bits if b).replace("|", "/")
    if key == "peft_s" and v is None and r.get("peft_error"):
        return "PEFT fails"
    if key == "met":
        return "" if v is None else ("yes" if v else "**no**")
    if key.endswith("_peak_bytes"):
        return "" if v is None else f"{v / 2**20:.1f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "/")


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(k, r) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(rows: list[dict], info: dict, *, bounds: str = "", png: str | None = "results.png") -> str:
    targeted = [r for r in rows if r.get("target")]
    met = sum(1 for r in targeted if r.get("met"))
    m = info
    out = [
        "# rotfunc vs PEFT: performance report",
        "",
        "Generated by `make bench` (`.venv/bin/python -m benchmarks`"
        + (" --quick" if m.get("quick") else "") + "); do not edit by hand. Every row runs rotfunc and its"
        " comparison side by side in the same process on the same layers (the training rows: every side in one"
        " process per method, rounds interleaved; peak memory in fresh subprocesses, see `benchmarks/train.py`)."
        " Times are medians in seconds over the repeats, with the min-max spread.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']} |",
        f"| CPU flags (kernel-relevant) | {m.get('cpu_flags', 'not recorded')} |",
        f"| cores | {m['cores']} |",
        f"| torch threads | {m['torch_threads']} (`torch.set_num_threads`) |",
        f"| THP_MEM_ALLOC_ENABLE | {m.get('THP_MEM_ALLOC_ENABLE', 'unset')} (torch's CPU allocator uses huge pages for large tensors) |",
        f"| python / torch / peft / bitsandbytes / transformers | {m['python']} / {m['torch']} / {m['peft']} / "
        f"{m['bitsandbytes']} / {m['transformers']} |",
        f"| date | {m['date']} |",
        f"| load average (1/5/15 min) at start / end | {m['load_average_start']} / {m.get('load_average_end', '')} |",
        f"| wall time of the run | {m.get('wall_s', 0):.0f} s |",
        *([f"| sections in this report | {m['sections']} |"] if m.get("sections") else []),
        "",
        "The machine is shared: other jobs were running during the run (see the load average). Under load, each",
        "parallel torch op with 2 threads can wait ~10-25 ms at its OpenMP barrier when the other thread is",
        "descheduled, which inflates small ops on both sides; spreads show how much.",
        "",
        f"## Targets: {met} of {len(targeted)} met",
        "",
        _table(targeted, [("name", "row"), ("measured", "measured"), ("target", "target"), ("met", "met")]),
        "",
    ]
    if png:
        out += [f"![rotfunc vs PEFT: time vs size, and ratio against target]({png})", ""]
    out += [
        "## All rows",
        "",
        "`compared with` names what the `other` columns hold: PEFT, the bare dequantize + requantize `floor`, the"
        " same model with `1 adapter`, or a baseline named in the row. `ratio` is always other / rotfunc (above 1:"
        " rotfunc is faster); `measured` states the quantity the target is about. Peak memory is resident memory"
        " above the level right before the call (`benchmarks._harness.peak_rss_bytes`), measured on the first"
        " (warm-up) call for merges; for training it is the process's resident high-water mark over the timed"
        " steps (reset after a warm-up step; the same nf4 model and imports on both sides).",
        "",
        _table(rows, COLUMNS),
        "",
        "Notes on method: PEFT's 4096x4096 merges take seconds, so they get 2 timed repeats (3 at 1024) against"
        " rotfunc's 5 (7 at 1024). nf4 layers are bitsandbytes `Linear4bit` (nf4, fp32 compute, blocksize 64); PEFT"
        " gets its own bnb layer classes through its dispatch (the model carries `is_loaded_in_4bit`, as"
        " transformers sets it). A `PEFT fails: ...` cell is PEFT's own error (or a merge that leaves the layer"
        " unusable), not a skipped row. Training rows time every side in one process per method (interleaved"
        " rounds, so load hits all sides alike) and measure peak resident memory in fresh subprocesses, so that"
        " it is not affected by another side's allocator state.",
        "",
    ]
    if bounds:
        out += ["## What bounds the rest", "", bounds.strip(), ""]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Two panels: merge+unmerge time vs size (log-log, rotfunc vs PEFT, fp32 and nf4); ratio vs target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 1.3]})
    colors = {"road": "tab:blue", "oft": "tab:orange", "randlora": "tab:green"}
    merge_rows = [r for r in rows if r.get("section") == "merge" and r.get("size") and "exact" not in r["name"]]
    for method in colors:
        for kind, ls in (("fp32", "-"), ("nf4", ":")):
            rs = sorted((r for r in merge_rows if r["method"] == method and r["kind"] == kind), key=lambda r: r["size"])
            if not rs:
                continue
            xs = [r["size"] for r in rs]
            ax1.plot(xs, [r["rotfunc_s"] for r in rs], ls, marker="o", color=colors[method],
                     label=f"rotfunc {method} {kind}")
            px = [(r["size"], r["peft_s"]) for r in rs if r.get("peft_s")]
            if px:
                ax1.plot(*zip(*px), ls, marker="x", color=colors[method], alpha=0.45, label=f"PEFT {method} {kind}")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("layer size n (n x n)")
    ax1.set_ylabel("merge + unmerge time (s)")
    ax1.set_title("merge + unmerge: rotfunc (o) vs PEFT (x); RandLoRA nf4: PEFT fails")
    ax1.grid(True, which="both", alpha=0.3)
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=7, ncol=2)

    # ratio panel: the quantity each target is about, normalized so that the target line is at 1
    targeted = [r for r in rows if r.get("target") and _score(r) is not None]
    names = [r["name"] for r in targeted]
    scores = [_score(r) for r in targeted]
    ys = range(len(targeted))
    ax2.barh(list(ys), scores, color=["tab:green" if r.get("met") else "tab:red" for r in targeted])
    ax2.axvline(1.0, color="k", lw=1)
    ax2.set_xscale("log")
    ax2.set_yticks(list(ys))
    ax2.set_yticklabels([n[:60] for n in names], fontsize=6)
    ax2.invert_yaxis()
    ax2.set_xlabel("measured / target (>= 1: met)")
    ax2.set_title("each target: green met, red missed")
    ax2.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _score(r: dict) -> float | None:
    """How far a row is from its target, as a factor (>= 1 means met)."""
    t = r.get("target", "")
    try:
        if r.get("section") == "merge" and r.get("ratio"):
            return r["ratio"] / float(t.split()[1].rstrip("x"))
        if r.get("section") == "floor":
            return 1.3 / (r["rotfunc_s"] / r["peft_s"])
        if r.get("section") == "forward" and "overhead" in r:
            limit = float(t.split("<=")[1].strip().rstrip("%")) / 100
            return (1 + limit) / (1 + r["overhead"])
        if r.get("section") == "train" and r.get("time_ratio"):
            return min(0.8 / r["time_ratio"], 1 / r["mem_ratio"] if r.get("mem_ratio") else 1.0)
        if r.get("section") == "mixed":
            return r["ratio"] / 0.9
    except (ValueError, IndexError, KeyError, ZeroDivisionError, TypeError):
        return None
    return None


def write_all(rows: list[dict], info: dict, out: Path, *, bounds: str = "") -> dict[str, Path]:
    """Write RESULTS.md, results.json and results.png into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "RESULTS.md", "json": out / "results.json", "png": out / "results.png"}
    plot(rows, paths["png"])
    paths["md"].write_text(render_markdown(rows, info, bounds=bounds, png=paths["png"].name))
    paths["json"].write_text(json.dumps({"machine": info, "rows": rows}, indent=2, default=str) + "\n")
    return paths
