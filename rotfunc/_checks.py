"""Small input checks shared by the adapter files: each error names the offending values."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_shape", "check_same_dtype_device", "check_choice", "check_float", "check_same_device", "plain_eager",
           "check_finite_eager"]


def check_float(name: str, t: object, /) -> None:
    """TypeError unless ``t`` is a real floating-point tensor (int, bool and complex inputs are refused)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}.dtype={t.dtype} is not a real floating-point dtype (float32, bfloat16, ...)")


def check_same_device(*named: tuple[str, Tensor]) -> None:
    """ValueError naming the first tensor whose device differs from the first one's."""
    (first, t0), *rest = named
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{name}.device={t.device} differs from {first}.device={t0.device}; move one of them")


def plain_eager(*ts: Tensor) -> bool:
    """True outside torch.compile tracing when no tensor is wrapped by a torch.func transform (so a check may
    read values)."""
    if torch.compiler.is_compiling():
        return False
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return is_wrapped is not None and not any(is_wrapped(t) for t in ts)


def check_finite_eager(name: str, t: Tensor, /) -> None:
    """ValueError when ``t`` holds NaN/inf, checked only eagerly (see :func:`plain_eager`)."""
    if plain_eager(t) and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name} has non-finite values (first at index {bad}: {t[tuple(bad)].item()})")


def check_shape(name: str, t: Tensor, expected: tuple[int, ...], /, *, why: str = "") -> None:
    """ValueError naming ``name``, its shape and the expected shape when they differ."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(expected):
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name} has shape={tuple(t.shape)}, expected {tuple(expected)}{extra}")


def check_same_dtype_device(name_a: str, a: Tensor, name_b: str, b: Tensor, /) -> None:
    """TypeError when two tensors differ in dtype, ValueError when they differ in device; both named."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a}.dtype={a.dtype} differs from {name_b}.dtype={b.dtype}; cast one of them")
    if a.device != b.device:
        raise ValueError(f"{name_a}.device={a.device} differs from {name_b}.device={b.device}; move one of them")


def check_choice(name: str, value: object, choices: tuple, /) -> None:
    """ValueError naming the value and the allowed ones when ``value`` is not among ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(choices)}")
