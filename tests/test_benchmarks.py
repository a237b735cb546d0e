"""The performance report's command: ``python -m benchmarks --quick --out DIR`` writes a complete report.

One subprocess run (tiny sizes, 1 repeat, 1 torch thread so that load from other jobs on a 2-core machine
cannot stretch it) into a temporary directory, never over the committed ``benchmarks/RESULTS.md``; then checks
on what it wrote: every expected row is there in the JSON and in the markdown table, no NaN/inf anywhere, every
targeted row carries a verdict, PEFT's broken RandLoRA nf4 merge is reported as a failure rather than skipped,
and the plot is a PNG.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("RoAD", "OFT", "RandLoRA")


def _expected_names() -> list[str]:
    """Substrings of the row names the quick run must produce (one per expected row)."""
    names = []
    for m in METHODS:
        for kind in ("fp32", "nf4"):
            for n in (64, 128):
                names.append(f"{m} merge+unmerge {n}x{n} {kind}")
            names.append(f"{m} forward 128x128 {kind}")
        names.append(f"{m} merge into nf4 128x128 vs dequantize+requantize floor")
        names.append(f"{m} train step nf4 MiniLM")
        names.append(f"{m} mixed batch nf4 MiniLM: 8 adapters vs 1")
        names.append(f"{m} ensemble nf4 MiniLM: K=2 vmapped train steps vs a loop")
    names += ["quant.merge_into nf4", "RandLoRA adapter branch only (peak RSS)"]
    return names


def _no_nan(name: str) -> float:
    raise ValueError(f"results.json contains {name}")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--no-progress", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return out, proc


def test_writes_all_three_files(report):
    out, proc = report
    for f in ("RESULTS.md", "results.json", "results.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "targets met" in proc.stdout


def test_json_has_every_row_and_no_nan(report):
    out, _ = report
    data = json.loads((out / "results.json").read_text(), parse_constant=_no_nan)
    names = [r["name"] for r in data["rows"]]
    for want in _expected_names():
        assert sum(want in n for n in names) >= 1, f"no row named like {want!r} in {names}"
    for key in ("cpu", "cores", "torch_threads", "torch", "peft", "bitsandbytes", "transformers", "date",
                "load_average_start", "load_average_end"):
        assert data["machine"].get(key) not in (None, ""), key
    assert data["machine"]["torch_threads"] == 1
    for r in data["rows"]:
        for key in ("name", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "target", "met"):
            assert key in r, (r["name"], key)
        assert isinstance(r["rotfunc_s"], float) and r["rotfunc_s"] > 0, r["name"]
        for key, v in r.items():
            assert not (isinstance(v, float) and not math.isfinite(v)), (r["name"], key, v)
        if r["target"]:
            assert isinstance(r["met"], bool), r["name"]
        if r["peft_s"] is not None and r["rotfunc_s"]:
            assert r["ratio"] == pytest.approx(r["peft_s"] / r["rotfunc_s"]), r["name"]


def test_peft_failure_is_reported_not_skipped(report):
    out, _ = report
    rows = json.loads((out / "results.json").read_text())["rows"]
    (r,) = [r for r in rows if r["name"].startswith("RandLoRA merge+unmerge 64x64 nf4")]
    assert r["peft_s"] is None and r["peft_error"].startswith("PEFT fails: ")
    ok = [r for r in rows if r["name"].startswith(("RoAD merge+unmerge", "OFT merge+unmerge"))]
    assert ok and all(r["peft_s"] is not None and r["peft_s"] > 0 for r in ok)


def test_markdown_table_lists_every_row(report):
    out, _ = report
    md = (out / "RESULTS.md").read_text()
    rows = json.loads((out / "results.json").read_text())["rows"]
    table = [line for line in md.splitlines() if line.startswith("| ")]
    for r in rows:
        assert any(line.startswith(f"| {r['name'].replace('|', '/')} |") for line in table), r["name"]
    assert "PEFT fails" in md and "load average" in md and "results.png" in md
    assert "nan" not in md.lower().replace("nanoseconds", "")


@pytest.mark.parametrize("model, slug", [
    ("AMD EPYC", "amd_epyc"),
    ("Intel(R) Xeon(R) Platinum 8488C CPU @ 2.40GHz", "intel_xeon_platinum_8488c"),
    ("AMD EPYC 7763 64-Core Processor", "amd_epyc_7763_64_core"),
    ("", "unknown_cpu"),
])
def test_each_cpu_kind_gets_its_own_report_directory(model, slug):
    from benchmarks.report import cpu_slug

    assert cpu_slug(model) == slug


def test_default_output_is_per_cpu_and_a_quick_run_never_overwrites_the_report(monkeypatch):
    from benchmarks import __main__ as cli
    from benchmarks import report

    monkeypatch.setattr(report, "_cpu_model", lambda: "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz")
    assert cli.default_out(quick=False) == ROOT / "benchmarks" / "intel_xeon_gold_6338"
    assert cli.default_out(quick=True) == ROOT / "benchmarks" / "intel_xeon_gold_6338" / "quick"


def test_index_lists_every_cpu_kinds_report(report, tmp_path):
    """benchmarks/RESULTS.md is an index: one line per ``<cpu>/results.json`` (the quick run's report copied under
    two CPU names), with its CPU, date and targets met, linked; re-rendering one report keeps the others."""
    from benchmarks.report import write_index

    out, _ = report
    data = json.loads((out / "results.json").read_text())
    targeted = [r for r in data["rows"] if r.get("target")]
    met = sum(bool(r.get("met")) for r in targeted)
    for slug, cpu in (("amd_epyc", "AMD EPYC"), ("intel_xeon", "Intel(R) Xeon(R)")):
        (tmp_path / slug).mkdir()
        (tmp_path / slug / "results.json").write_text(json.dumps({**data, "machine": {**data["machine"], "cpu": cpu}}))
    index = write_index(tmp_path).read_text()
    lines = [ln for ln in index.splitlines() if ln.startswith("| ") and "/RESULTS.md" in ln]
    assert len(lines) == 2
    assert lines[0].startswith("| AMD EPYC |") and "[amd_epyc/RESULTS.md](amd_epyc/RESULTS.md)" in lines[0]
    assert lines[1].startswith("| Intel(R) Xeon(R) |") and "[intel_xeon/RESULTS.md](intel_xeon/RESULTS.md)" in lines[1]
    assert all(f"| {met} of {len(targeted)} |" in ln for ln in lines)


def test_committed_reports_are_indexed():
    """Every committed ``benchmarks/<cpu>/results.json`` is listed in the committed index, and the index lists
    nothing else (``python -m benchmarks --render benchmarks/<cpu>/results.json`` rewrites both)."""
    index = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    committed = sorted(p.parent.name for p in (ROOT / "benchmarks").glob("*/results.json"))
    assert committed, "no committed per-CPU report"
    listed = sorted(ln.split("](")[1].split("/")[0] for ln in index.splitlines() if "/RESULTS.md](" in ln)
    assert listed == committed
