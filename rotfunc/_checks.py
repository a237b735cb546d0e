"""Small input checks shared by the adapter files: each error names the offending values."""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_shape", "check_same_dtype_device", "check_choice"]


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
