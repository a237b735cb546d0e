"""Timing and memory helpers shared by every benchmark module.

Each benchmark module exposes ``rows(quick: bool) -> list[dict]``; a row has at least ``name``, ``rotfunc_s``
and, when PEFT is compared in the same run, ``peft_s`` and ``target`` (text such as ">= 100x"). Times are
medians over repeats with the spread (min-max) alongside. Peak memory is the process's resident high-water
mark above its resident size right before the call (Linux ``/proc/self/clear_refs`` reset), so it counts
every allocator, not only torch's.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from typing import Callable

__all__ = ["timeit", "peak_rss_bytes", "format_table"]


def timeit(fn: Callable[[], object], /, *, repeats: int = 5, warmup: int = 1) -> dict:
    """Median and spread of ``fn()`` wall time in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": repeats}


def interleaved_rounds(steps: dict[str, Callable[[], object]], rounds: int, /) -> dict[str, dict]:
    """Per side of ``steps`` (name -> thunk, warmed up): the times of ``rounds`` rounds in which every side runs
    once in turn (so load from other jobs hits all sides alike), as median/min/max/n."""
    times: dict[str, list[float]] = {side: [] for side in steps}
    for _ in range(rounds):
        for side, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[side].append(time.perf_counter() - t0)
    return {side: {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts)}
            for side, ts in times.items()}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def peak_rss_bytes(fn: Callable[[], object], /) -> int:
    """Bytes of resident memory ``fn()`` needed at its peak above what was resident before it ran."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: fall back to the lifetime high-water mark
        pass
    before = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - before) * 1024


def format_table(rows: list[dict], columns: list[str], /) -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns`` (missing cells left blank)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
