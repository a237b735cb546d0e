"""The one interface every adapter implements, and the registry the shims look adapters up in.

Every method is a transform of a linear map ``y = W x + b`` (see DESIGN.md):

=========  ===============================  ==============================
method     forward                          merge into (W, b)
=========  ===============================  ==============================
RoAD       ``R (W x + b)``                  ``W' = R W``, ``b' = R b``
OFT        ``W (R^T x) + b`` per block      ``W' = W blockdiag(R)^T``
RandLoRA   ``W x + b + s dW x``             ``W' = W + s dW``
=========  ===============================  ==============================

So ``apply`` only needs a callable ``base(x) -> W x + b`` (float, 8-bit or 4-bit alike), and ``merge`` only
needs a float ``W``. A config type (``RoadConfig``, ``OFTConfig``, ``RandLoraConfig``) is a frozen dataclass
with PEFT's field names that implements :class:`Adapter`; the shims in ``bind.py`` use nothing else.

Adding a fourth adapter means one new file with its params, pure functions and a config implementing
:class:`Adapter`, and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Adapter", "REGISTRY", "register", "config_for_peft_type"]


@runtime_checkable
class Adapter(Protocol):
    """What the shims need from an adapter config.

    ``params`` is the adapter's per-layer NamedTuple of tensors (the trainable pytree). ``shared`` is a
    model-wide frozen pytree, or ``None`` for adapters without one (RandLoRA's random bases are the only
    case so far). ``in_features``/``out_features`` are the wrapped layer's, keyword-only and static.
    """

    peft_type: ClassVar[str]  # PEFT's PeftType value, e.g. "ROAD", "OFT", "RANDLORA"
    peft_param_names: ClassVar[dict[str, str]]  # params field -> PEFT state-dict key suffix ("theta": "road_theta")
    # (optional) peft_shared_names: ClassVar[dict[str, str]]: shared frozen pytree field -> PEFT key suffix
    target_modules: Any
    exclude_modules: Any

    def init(
        self,
        in_features: int,
        out_features: int,
        /,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, ...]:
        """Fresh params for one layer (PEFT's init: identity/zero effect when ``init_weights`` is True)."""
        ...

    def init_shared(
        self,
        shapes: Sequence[tuple[int, int]],
        /,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, ...] | None:
        """The model-wide frozen pytree for layers of the given (out_features, in_features) shapes, or None."""
        ...

    def apply(
        self,
        params: tuple[Tensor, ...],
        x: Tensor,
        base: Callable[[Tensor], Tensor],
        /,
        *,
        in_features: int,
        out_features: int,
        shared: tuple[Tensor, ...] | None = None,
        training: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The adapted layer's output for input ``x`` ("*batch in" -> "*batch out"), dtype of ``base(x)``."""
        ...

    def merge(
        self,
        params: tuple[Tensor, ...],
        weight: Tensor,
        bias: Tensor | None,
        /,
        *,
        shared: tuple[Tensor, ...] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(W', b') such that the plain linear with them equals ``apply`` (no dropout). Never mutates."""
        ...

    def unmerge(
        self,
        params: tuple[Tensor, ...],
        weight: Tensor,
        bias: Tensor | None,
        /,
        *,
        shared: tuple[Tensor, ...] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The inverse of :meth:`merge`."""
        ...

    def num_params(self, in_features: int, out_features: int, /) -> int:
        """Trainable parameter count for one layer, equal to PEFT's."""
        ...

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's config fields (PEFT's names) for ``adapter_config.json``."""
        ...

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], /) -> "Adapter":
        """The config for what PEFT's ``adapter_config.json`` holds; unknown fields raise ValueError."""
        ...


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add an adapter config type to :data:`REGISTRY` under its ``peft_type``."""
    REGISTRY[cls.peft_type] = cls
    return cls


def config_for_peft_type(peft_type: str) -> type:
    """The config class for a PEFT ``peft_type`` string; ValueError naming the known ones otherwise."""
    _load_builtin()
    try:
        return REGISTRY[peft_type.upper()]
    except KeyError:
        raise ValueError(
            f"peft_type={peft_type!r} is not an adapter rotfunc knows; expected one of {sorted(REGISTRY)}"
        ) from None


def _load_builtin() -> None:
    # The one line per adapter: importing the module registers its config.
    from . import oft, randlora, road  # noqa: F401
