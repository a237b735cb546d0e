"""Shared set-up for the report's benchmarks: the same layer under PEFT and under rotfunc, row helpers.

``pair(method, n, kind)`` builds one ``n x n`` linear layer (float32 ``nn.Linear`` or bitsandbytes nf4
``Linear4bit``) twice from the same float weights (nf4 quantization is deterministic, so the two packed
weights are bitwise equal), wraps one copy with PEFT (``get_peft_model``) and the other with ``rotfunc.attach``
using the same config fields, gives PEFT's adapter random non-identity params and copies them into rotfunc's
slots. Both sides then hold the same base weight and the same adapter.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn

METHODS = ("road", "oft", "randlora")
LABEL = {"road": "RoAD", "oft": "OFT", "randlora": "RandLoRA"}
# torch intra-op threads for every benchmark (the machine has 2 cores); `python -m benchmarks --threads N` sets it
# through the environment so that subprocesses (benchmarks.train) use the same.
THREADS = int(os.environ.get("ROTFUNC_BENCH_THREADS", "2"))

# One config per method, the same fields on both sides (PEFT's names and defaults otherwise).
FIELDS = {
    "road": dict(variant="road_1", group_size=64),
    "oft": dict(oft_block_size=64, r=0, use_cayley_neumann=True),
    "randlora": dict(r=32, randlora_alpha=640),
}


def spread(t: dict) -> str:
    """'min-max' of a timeit result."""
    return f"{t['min']:.4g}-{t['max']:.4g}"


def row(name: str, ours: dict | None, theirs: dict | None, *, target: str = "", met: bool | None = None,
        ratio: float | None = None, **extra: Any) -> dict:
    """A report row: ``ratio`` defaults to peft_s / rotfunc_s (how many times faster rotfunc is)."""
    r = {
        "name": name,
        "rotfunc_s": None if ours is None else ours["median"],
        "rotfunc_spread": None if ours is None else spread(ours),
        "peft_s": None if theirs is None else theirs["median"],
        "peft_spread": None if theirs is None else spread(theirs),
        "ratio": ratio if ratio is not None or ours is None or theirs is None else theirs["median"] / ours["median"],
        "target": target,
        "met": met,
    }
    r.update(extra)
    return r


def error_text(e: BaseException) -> str:
    """One line: ``TypeName: message`` (first line of the message, at most 160 characters)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:160]}"


@contextlib.contextmanager
def quiet():
    """Silence third-party warnings (PEFT's and bitsandbytes' advice) inside benchmarks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def configs(method: str, target_modules: Any) -> tuple[Any, Any]:
    """(rotfunc config, PEFT config) with the same fields."""
    import peft

    import rotfunc

    f = FIELDS[method]
    if method == "road":
        return (rotfunc.RoadConfig(**f, target_modules=target_modules),
                peft.RoadConfig(**f, target_modules=target_modules))
    if method == "oft":
        return (rotfunc.OFTConfig(**f, target_modules=target_modules),
                peft.OFTConfig(**f, target_modules=target_modules))
    return (rotfunc.RandLoraConfig(**f, target_modules=target_modules),
            peft.RandLoraConfig(**f, target_modules=target_modules))


class One(nn.Module):
    """A model holding one linear layer ``lin``: what PEFT and rotfunc both wrap."""

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def float_state(n: int, *, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(n, n, generator=g) * 0.02, "bias": torch.randn(n, generator=g) * 0.1}


def base_layer(n: int, kind: str, *, seed: int = 0) -> nn.Module:
    """A fresh ``n x n`` layer with bias: kind "fp32" (nn.Linear) or "nf4" (bnb Linear4bit, fp32 compute)."""
    state = float_state(n, seed=seed)
    if kind == "fp32":
        lin = nn.Linear(n, n)
        lin.load_state_dict(state)
        return lin.requires_grad_(False)
    if kind == "nf4":
        import bitsandbytes as bnb

        lin = bnb.nn.Linear4bit(n, n, compute_dtype=torch.float32, quant_type="nf4")
        lin.load_state_dict(state)
        return lin.to("cpu")
    raise ValueError(f"kind={kind!r} is not 'fp32' or 'nf4'")


def _peft_tensor(module: nn.Module, suffix: str, adapter: str = "default") -> torch.Tensor:
    head, _, rest = suffix.partition(".")
    t = getattr(module, head)[adapter]
    return getattr(t, rest) if rest else t


def randomize_peft(pm: nn.Module, method: str, *, seed: int = 1) -> None:
    """Random non-identity adapter params in every PEFT layer of ``pm`` (in place, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in pm.named_modules():
            if method == "road" and hasattr(m, "road_theta") and "default" in m.road_theta:
                th, al = m.road_theta["default"], m.road_alpha["default"]
                th.copy_(torch.randn(th.shape, generator=g) * 0.5)
                al.copy_(1.0 + 0.1 * torch.randn(al.shape, generator=g))
            elif method == "oft" and hasattr(m, "oft_R") and "default" in m.oft_R:
                w = m.oft_R["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.01)  # ||Q|| well below 1, as a trained OFT
            elif method == "randlora" and hasattr(m, "randlora_lambda") and "default" in m.randlora_lambda:
                lam, gam = m.randlora_lambda["default"], m.randlora_gamma["default"]
                lam.copy_(torch.randn(lam.shape, generator=g) * 1e-2)
                gam.copy_(torch.rand(gam.shape, generator=g) / max(gam.shape))


def copy_params(pm: nn.Module, model: nn.Module, config: Any) -> None:
    """Copy PEFT's adapter tensors (``pm = get_peft_model(...)``) into rotfunc's slots of ``model``."""
    import rotfunc
    from rotfunc.bind import adapted_layers

    inner = pm.base_model.model
    params = rotfunc.adapter_params(model)
    new = {}
    for path, _ in adapted_layers(model):
        peft_layer = inner.get_submodule(path)
        for field, suffix in type(config).peft_param_names.items():
            key = f"{path}.rotfunc.default.{field}"
            new[key] = _peft_tensor(peft_layer, suffix).detach().clone().to(params[key].dtype)
    rotfunc.load_params(model, new)


def pair(method: str, n: int, kind: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(PEFT model, PEFT's adapted layer, rotfunc model) around identical ``n x n`` layers, same adapter."""
    import peft

    import rotfunc

    rcfg, pcfg = configs(method, ["lin"])
    pbase = One(base_layer(n, kind))
    if kind == "nf4":
        pbase.is_loaded_in_4bit = True  # what transformers sets; PEFT picks its bnb layer classes from it
    with quiet():
        pm = peft.get_peft_model(pbase, pcfg)
    randomize_peft(pm, method)
    model = One(base_layer(n, kind))
    rotfunc.attach(model, rcfg)
    copy_params(pm, model, rcfg)
    return pm, pm.base_model.model.lin, model
