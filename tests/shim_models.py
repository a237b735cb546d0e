"""Small models mixing every layer kind rotfunc adapts, and bitwise fingerprints of their base weights."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

import rotfunc
from rotfunc import quant

WIDTH = 32


def _init(layer: nn.Linear, g: torch.Generator) -> nn.Linear:
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.3)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.2)
    return layer


def mixed_model(seed: int = 0, *, bias: bool = True) -> nn.Sequential:
    """float -> tanh -> int8 -> tanh -> nf4 (double quant) -> tanh -> float, all WIDTH x WIDTH, prepared.

    Module names "0", "2", "4", "6" are the linear layers (float, int8, nf4, float).
    """
    g = torch.Generator().manual_seed(seed)
    f0 = _init(nn.Linear(WIDTH, WIDTH, bias=bias), g)
    i8 = bnb.nn.Linear8bitLt(WIDTH, WIDTH, bias=bias, has_fp16_weights=False)
    i8.load_state_dict(_init(nn.Linear(WIDTH, WIDTH, bias=bias), g).state_dict())
    n4 = bnb.nn.Linear4bit(WIDTH, WIDTH, bias=bias, quant_type="nf4", compress_statistics=True,
                           compute_dtype=torch.float32)
    n4.load_state_dict(_init(nn.Linear(WIDTH, WIDTH, bias=bias), g).state_dict())
    f6 = _init(nn.Linear(WIDTH, WIDTH, bias=bias), g)
    model = nn.Sequential(f0, nn.Tanh(), i8.to("cpu"), nn.Tanh(), n4.to("cpu"), nn.Tanh(), f6)
    return rotfunc.prepare(model)


LINEARS = ("0", "2", "4", "6")


def base_layer(model: nn.Module, name: str) -> nn.Module:
    m = model.get_submodule(name)
    return m.base_layer if isinstance(m, rotfunc.AdaptedLinear) else m


def fingerprint(model: nn.Module) -> dict[str, object]:
    """Every base tensor and quant-state field of the linear layers, cloned, for bitwise comparison."""
    fp: dict[str, object] = {}
    for name in LINEARS:
        layer = base_layer(model, name)
        fp[f"{name}.bias"] = None if layer.bias is None else layer.bias.detach().clone()
        fp[f"{name}.data"] = layer.weight.detach().clone()
        if quant.is_quantized(layer):
            qw = quant.quant_weight_of(layer)
            for field, t in zip(("data", "absmax", "nested_absmax", "nested_code", "offset"), qw.tensors()):
                fp[f"{name}.qw.{field}"] = None if t is None else t.detach().clone()
            if isinstance(layer, bnb.nn.Linear4bit):
                qs = layer.weight.quant_state
                fp[f"{name}.qs"] = (qs.blocksize, qs.dtype, tuple(qs.shape), qs.quant_type, qs.nested)
    return fp


def full_fingerprint(model: nn.Module) -> dict[str, object]:
    """:func:`fingerprint` plus every adapter param and the adapter state."""
    fp = fingerprint(model)
    for path, w in rotfunc.adapted_layers(model):
        for n, slot in w.slots.items():
            for field, p in slot.named_parameters():
                fp[f"{path}.{n}.{field}"] = p.detach().clone()
    s = rotfunc.adapter_state(model)
    fp["state"] = (s.active, s.enabled, s.merged, s.batch)
    fp["modules"] = [(n, type(m).__name__) for n, m in model.named_modules()]
    return fp


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, k
            assert torch.equal(x, y) or (x.isnan() == y.isnan()).all() and torch.equal(x.nan_to_num(), y.nan_to_num()), k
        else:
            assert x == y, k


def dequantized64(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A base layer's current weight and bias in float64 (dequantized for bitsandbytes layers)."""
    w = quant.dequantize(layer, dtype=torch.float32) if quant.is_quantized(layer) else layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    return w.double(), None if b is None else b.double()
