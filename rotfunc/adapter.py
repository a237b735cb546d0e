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

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Adapter", "MixedRows", "REGISTRY", "register", "config_for_peft_type", "GENERIC_PEFT_KEYS", "peft_dict", "peft_kwargs",
    "normalize_layer_selection",
]


class MixedRows(NamedTuple):
    """How the rows (dim 0) of a mixed-adapter batch fall into G groups, one group per adapter name.

    Computed once per batch and handed to every layer's optional ``apply_mixed``. ``sizes`` is static (Python
    ints), so a layer can split the sorted rows without reading a tensor on the host.
    """

    index: Tensor  # shape=(N,), dtype=int64: the group of each row
    order: Tensor  # shape=(N,), dtype=int64: row numbers sorted by group (stable), group after group
    inverse: Tensor  # shape=(N,), dtype=int64: puts sorted row i back at row i (argsort of ``order``)
    sizes: tuple[int, ...]  # rows per group, in group order (sum N)
    contiguous: bool = False  # static: the rows already come group after group (``order`` is 0..N-1)

    def to(self, device: torch.device) -> "MixedRows":
        return MixedRows(self.index.to(device), self.order.to(device), self.inverse.to(device), self.sizes,
                         self.contiguous)

    def split(self, t: Tensor, /, dim: int = 0) -> tuple[Tensor, ...]:
        """``t``'s rows (along ``dim``) group by group: views when the rows are already grouped, else one gather."""
        if not self.contiguous:
            t = t.index_select(dim, self.order)
        return t.split(list(self.sizes), dim)

    def join(self, parts: Sequence[Tensor], /, dim: int = 0) -> Tensor:
        """The inverse of :meth:`split`: the groups' rows back in row order."""
        out = torch.cat(list(parts), dim)
        return out if self.contiguous else out.index_select(dim, self.inverse)


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

    # (optional) apply_mixed(params_list, x, base, /, *, rows: MixedRows, in_features, out_features, shared=None,
    #     training=False, generator=None) -> Tensor: a mixed-adapter batch in one batched computation, where
    #     params_list[g] is group g's params (None: that group has no adapter on this layer and gets base(x)),
    #     every non-None entry of this same config. Row i must equal ``apply(params_list[rows.index[i]], x[i:i+1],
    #     base)``. Without it the shims call ``apply`` once per group.

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


# Keys PEFT writes into every adapter_config.json (or that other PEFT configs share) that carry no adapter math:
# accepted and ignored when reading a config.
GENERIC_PEFT_KEYS = frozenset({
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_type", "auto_mapping",
    "peft_version", "layers_to_transform", "layers_pattern", "modules_to_save",
})


def peft_dict(config: Any, /, *, omit_if_none: tuple[str, ...] = ("exclude_modules",)) -> dict[str, Any]:
    """A frozen-dataclass config as PEFT's JSON-ready config dict: its fields plus ``peft_type``.

    Module-name collections become sorted lists (tuples keep their order); fields named in ``omit_if_none``
    are left out when None (``exclude_modules`` is not a field of every PEFT 0.21.2 config).
    """
    d: dict[str, Any] = {"peft_type": config.peft_type}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None and f.name in omit_if_none:
            continue
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        d[f.name] = value
    return d


def peft_kwargs(cls: type, d: Mapping[str, Any], /) -> dict[str, Any]:
    """The constructor keywords of config class ``cls`` from PEFT's config dict ``d``.

    PEFT's generic keys are dropped; a ``peft_type`` other than ``cls.peft_type`` or any other unknown key
    raises ValueError naming it.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"expected a mapping of PEFT config fields, got {type(d).__name__}")
    peft_type = d.get("peft_type")
    if peft_type is not None and str(getattr(peft_type, "value", peft_type)).upper() != cls.peft_type:
        raise ValueError(f"peft_type={peft_type!r} is not {cls.peft_type!r}; use rotfunc.config_for_peft_type")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in ("layers_to_transform", "layers_pattern", "modules_to_save"):
        if key not in known and d.get(key) not in (None, [], ""):
            raise ValueError(
                f"{key}={d[key]!r} is not supported by {cls.__name__} in rotfunc"
                + (" (it does not train or save whole modules)" if key == "modules_to_save" else "")
            )
    unknown = sorted(k for k in d if k not in known and k not in GENERIC_PEFT_KEYS)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} config key(s) {unknown}; known fields are {sorted(known)}")
    return {k: v for k, v in d.items() if k in known}


def normalize_layer_selection(config: Any, /) -> None:
    """Check and normalize a frozen config's PEFT ``layers_to_transform`` / ``layers_pattern`` fields in place.

    ``layers_to_transform``: None, an int, or a sequence of ints (stored as a tuple); ``layers_pattern``: None,
    a str or a sequence of str (stored as a tuple), only together with ``layers_to_transform`` (as PEFT).
    """
    idx, pattern = config.layers_to_transform, config.layers_pattern
    if isinstance(idx, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx):
            raise ValueError(f"layers_to_transform={idx!r} must hold non-negative ints")
        object.__setattr__(config, "layers_to_transform", tuple(idx))
    elif idx is not None and (not isinstance(idx, int) or isinstance(idx, bool) or idx < 0):
        raise ValueError(f"layers_to_transform={idx!r} must be None, a non-negative int or a list of them")
    if isinstance(pattern, (list, tuple)):
        if not all(isinstance(p, str) and p for p in pattern):
            raise ValueError(f"layers_pattern={pattern!r} must hold non-empty str")
        object.__setattr__(config, "layers_pattern", tuple(pattern))
    elif pattern is not None and not isinstance(pattern, str):
        raise ValueError(f"layers_pattern={pattern!r} must be None, a str or a list of str")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"layers_pattern={pattern!r} needs layers_to_transform too (as PEFT)")
