"""``python -m benchmarks``: the whole performance report, rotfunc against PEFT, in one command.

Runs every benchmark row (merge + unmerge, merge into nf4 vs the floor, forward overhead, training step on the
4-bit MiniLM, mixed-adapter batches, vmapped ensembles, the quantized seam, RandLoRA's forward memory) with a progress bar and
writes ``RESULTS.md``, ``results.json`` and ``results.png`` into ``--out`` (default: ``benchmarks/<cpu>/``, one
directory per CPU kind, e.g. ``benchmarks/amd_epyc/``; ``benchmarks/RESULTS.md`` then lists every CPU kind's report).

    python -m benchmarks                      # the full run (about 10-20 minutes on 2 cores)
    python -m benchmarks --quick              # tiny sizes, 1 repeat: a smoke run, into benchmarks/<cpu>/quick/
    python -m benchmarks --only merge,train    # some sections only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SECTIONS = ("merge", "floor", "forward", "train", "mixed", "ensemble", "quant", "randlora", "causal_lm")
# --quick leaves out what needs the SmolLM2 model cache (converted once, 0.5 GB) unless --only names it
QUICK_SKIPS = ("causal_lm",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat (a smoke run, well under a minute)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for RESULTS.md, results.json, results.png (default: benchmarks/<cpu>/, one per CPU "
                   "kind, which benchmarks/RESULTS.md indexes; with --quick benchmarks/<cpu>/quick/)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated sections to run (default all: {','.join(SECTIONS)}; with --quick all but "
                   f"{','.join(QUICK_SKIPS)})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="run nothing: re-render RESULTS.md and results.png into --out from a results.json")
    return p


def _plan(sections: list[str], quick: bool) -> list[tuple[str, callable]]:
    """(label, thunk returning a row or a list of rows), in report order."""
    from benchmarks import forward, merge, mixed, train

    plan: list[tuple[str, callable]] = []
    if "merge" in sections or "floor" in sections:
        plan += [(label, fn) for label, fn in merge.plan(quick)
                 if (label.startswith("floor") and "floor" in sections)
                 or (not label.startswith("floor") and "merge" in sections)]
    if "forward" in sections:
        plan += forward.plan(quick)
    if "train" in sections:
        plan += train.plan(quick)
    if "mixed" in sections:
        plan += mixed.plan(quick)
    if "ensemble" in sections:
        from benchmarks import ensemble

        plan += ensemble.plan(quick)
    if "quant" in sections:
        from benchmarks import quant

        plan.append(("quant (benchmarks.quant)", lambda: _tag(quant.rows(quick), "quant")))
    if "randlora" in sections:
        from benchmarks import randlora

        plan.append(("randlora memory (benchmarks.randlora)", lambda: _tag(randlora.memory_rows(quick), "randlora")))
    if "causal_lm" in sections:
        from benchmarks import causal_lm

        plan += causal_lm.plan(quick)
    return plan


def _tag(rows: list[dict], section: str) -> list[dict]:
    for r in rows:
        r.setdefault("section", section)
        r.setdefault("vs", "PEFT" if section != "quant" else r.get("vs", ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.environ.get("THP_MEM_ALLOC_ENABLE") is None and argv is None and "torch" not in sys.modules:
        # torch's CPU allocator reads this once at start: back large tensors with transparent huge pages, for
        # rotfunc and PEFT alike (same process). At 4096x4096 first-touch page faults otherwise dominate merges.
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]])
    only = args.only if args.only is not None else ",".join(s for s in SECTIONS if not (args.quick and s in QUICK_SKIPS))
    sections = [s.strip() for s in only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"--only: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"--threads {args.threads} must be >= 1", file=sys.stderr)
        return 2
    if args.render is not None:
        return _render(args.render, args.out if args.out is not None else args.render.resolve().parent)
    if args.out is None:
        args.out = default_out(quick=args.quick)
    os.environ["ROTFUNC_BENCH_THREADS"] = str(args.threads)  # before benchmarks._common is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from tqdm.auto import tqdm

    from benchmarks import report
    from benchmarks._common import quiet
    from benchmarks.bounds import bounds_text

    torch.set_num_threads(args.threads)
    info = report.machine(threads=args.threads)
    info["quick"] = args.quick
    t0 = time.perf_counter()
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "results.partial.json"  # rows so far, in case the run is interrupted
    plan = _plan(sections, args.quick)
    bar = tqdm(plan, desc="benchmarks", unit="row", disable=args.no_progress, file=sys.stderr)
    for label, thunk in bar:
        bar.set_postfix_str(label)
        torch.set_num_threads(args.threads)
        with quiet():
            got = thunk()
        rows += got if isinstance(got, list) else [got]
        partial.write_text(json.dumps({"machine": info, "rows": rows}, indent=2, default=str) + "\n")
    bar.close()
    partial.unlink()
    info["wall_s"] = time.perf_counter() - t0
    info["load_average_end"] = report.load_average()
    problems = report.check_rows(rows)
    paths = report.write_all(rows, info, args.out, bounds=bounds_text(rows))
    _index(args.out)
    targeted = [r for r in rows if r.get("target")]
    print(f"{len(rows)} rows, {sum(bool(r.get('met')) for r in targeted)} of {len(targeted)} targets met; wrote "
          + ", ".join(str(p) for p in paths.values()))
    if problems:
        print("malformed rows:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


def _render(path: Path, out: Path) -> int:
    from benchmarks import report
    from benchmarks.bounds import bounds_text

    data = json.loads(path.read_text())
    paths = report.write_all(data["rows"], data["machine"], out, bounds=bounds_text(data["rows"]))
    _index(out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def default_out(*, quick: bool) -> Path:
    """``benchmarks/<cpu>/`` (:func:`benchmarks.report.cpu_slug`); a ``--quick`` smoke run goes into its
    ``quick/`` subdirectory (git-ignored, not indexed), never over the CPU's committed report."""
    from benchmarks.report import cpu_slug

    out = ROOT / cpu_slug()
    return out / "quick" if quick else out


def _index(out: Path) -> None:
    """Re-write ``benchmarks/RESULTS.md``, the per-CPU index, when ``out`` is one of its CPU directories."""
    from benchmarks import report

    if out.resolve().parent == ROOT:
        report.write_index(ROOT)


if __name__ == "__main__":
    sys.exit(main())
