"""Thin stateful shims: put the pure adapters onto the layers of a real model.

``attach`` replaces each targeted ``nn.Linear`` / bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` with one small
:class:`AdaptedLinear` that holds the original layer object (never a copy of its weights) as ``base_layer``
and the adapter params as ``nn.Parameter``s, and whose forward calls the config's pure ``apply`` through the
:class:`~rotfunc.adapter.Adapter` protocol, nothing else. Every bitsandbytes layer of the model, targeted or
not, is routed through :func:`rotfunc.quant.quantized_linear` so ``torch.func`` transforms see through it.

Training goes through ``torch.func``::

    params = rotfunc.adapter_params(model)                  # {"encoder...query.rotfunc.default.theta": ...}
    def loss_fn(p, batch):
        out = torch.func.functional_call(model, p, args=(), kwargs=batch)
        return ...
    grads = torch.func.grad(loss_fn)(params, batch)

Mixed-adapter batches: ``model(**inputs, adapter_names=["a", "b", BASE_ADAPTER, ...])`` (one name per sample,
as PEFT; :data:`BASE_ADAPTER` means "no adapter"), or the :func:`adapter_batch` context manager. Each wrapper
groups the rows by adapter (``index_select`` / ``index_copy``): one call per distinct adapter, never per sample.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from . import quant
from .adapter import Adapter

__all__ = [
    "BASE_ADAPTER",
    "AdaptedLinear",
    "attach",
    "detach",
    "prepare",
    "unprepare",
    "adapter_params",
    "load_params",
    "set_adapter",
    "active_adapter",
    "adapter_names",
    "disable_adapters",
    "enable_adapters",
    "disabled",
    "adapter_batch",
    "merge",
    "unmerge",
    "merge_and_unload",
    "num_trainable",
    "adapted_layers",
]

BASE_ADAPTER = "__base__"
"""Reserved adapter name meaning "the base layer, no adapter" in a mixed-adapter batch (PEFT's name)."""

_SLOTS = "rotfunc"  # attribute holding the per-adapter parameter slots: keys look like "<path>.rotfunc.<name>.<field>"


class _Batch:
    """One mixed-adapter batch, grouped once for every layer: rows per adapter and the permutation back."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        rows: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            rows.setdefault(n, []).append(i)
        self.groups = {n: torch.tensor(r) for n, r in rows.items()}
        # outputs are computed group after group; this puts sample i back at row i
        self.inverse = torch.argsort(torch.cat(list(self.groups.values()))) if rows else torch.zeros(0, dtype=torch.long)


_BATCH_NAMES: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar("rotfunc_batch", default=None)


class _Slot(nn.Module):
    """One adapter's params on one layer: the NamedTuple's fields as ``nn.Parameter``s (and frozen buffers)."""

    def __init__(self, params: tuple[Tensor, ...], shared: tuple[Tensor, ...] | None) -> None:
        super().__init__()
        self.params_type = type(params)
        for field, value in zip(params._fields, params):
            self.register_parameter(field, nn.Parameter(value))
        self.shared_type = type(shared) if shared is not None else None
        if shared is not None:
            # The same tensor objects on every layer: one model-wide copy (named_buffers de-duplicates them).
            for field, value in zip(shared._fields, shared):
                self.register_buffer(f"shared_{field}", value, persistent=False)

    def params(self) -> tuple[Tensor, ...]:
        return self.params_type(*(getattr(self, f) for f in self.params_type._fields))

    def shared(self) -> tuple[Tensor, ...] | None:
        if self.shared_type is None:
            return None
        return self.shared_type(*(getattr(self, f"shared_{f}") for f in self.shared_type._fields))


@dataclass
class _Merged:
    name: str
    record: Any  # quant.MergeRecord for quantized bases, None for float ones


class AdaptedLinear(nn.Module):
    """A linear layer with named adapters: ``base_layer`` is the original module object, untouched."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        setattr(self, _SLOTS, nn.ModuleDict())
        self.configs: dict[str, Adapter] = {}
        self.active: str | None = None
        self.enabled = True
        self.merged: _Merged | None = None

    @property
    def slots(self) -> nn.ModuleDict:
        return getattr(self, _SLOTS)

    def extra_repr(self) -> str:
        kinds = {n: type(c).__name__ for n, c in self.configs.items()}
        return f"adapters={kinds}, active={self.active!r}, merged={self.merged.name if self.merged else None}"

    def _base(self, x: Tensor) -> Tensor:
        if quant.is_quantized(self.base_layer):
            return quant.quant_forward(self.base_layer, x)
        return self.base_layer(x)

    def _apply_one(self, name: str, x: Tensor, base: Callable[[Tensor], Tensor]) -> Tensor:
        slot = self.slots[name]
        return self.configs[name].apply(
            slot.params(),
            x,
            base,
            in_features=self.in_features,
            out_features=self.out_features,
            shared=slot.shared(),
            training=self.training,
        )

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        batch = _BATCH_NAMES.get()
        if self.merged is not None:
            if batch is not None:
                raise RuntimeError(
                    f"mixed-adapter batch on a merged layer (adapter {self.merged.name!r} merged): unmerge first"
                )
            return self._base(x)
        if batch is not None:
            return self._forward_mixed(x, batch)
        if not self.enabled or self.active is None:
            return self._base(x)
        return self._apply_one(self.active, x, self._base)

    def _forward_mixed(self, x: Tensor, batch: _Batch) -> Tensor:
        names = batch.names
        if x.shape[0] != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} samples")
        unknown = sorted(set(batch.groups) - set(self.configs) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(f"adapter_names contains {unknown}, not attached here; known: {sorted(self.configs)}")
        base = _dequantized_once(self.base_layer)
        if len(batch.groups) == 1:
            (name,) = batch.groups
            return base(x) if name == BASE_ADAPTER else self._apply_one(name, x, base)
        # Adapters that call base on the group's own input (RoAD, RandLoRA, the "__base__" group) share one
        # full-batch base matmul, computed on first use, instead of one small matmul per group; adapters that
        # transform the input first (OFT) call the base on their own input as usual.
        full: list[Tensor] = []

        def group_base(idx: Tensor, xs: Tensor) -> Callable[[Tensor], Tensor]:
            def call(inp: Tensor) -> Tensor:
                if inp is not xs:
                    return base(inp)
                if not full:
                    full.append(base(x))
                return full[0].index_select(0, idx)

            return call

        outs = []
        for name, idx in batch.groups.items():
            idx = idx.to(x.device)
            xs = x.index_select(0, idx)
            b = group_base(idx, xs)
            outs.append(b(xs) if name == BASE_ADAPTER else self._apply_one(name, xs, b))
        # one gather back into sample order (not one full-size index_copy per group)
        return torch.cat(outs, 0).index_select(0, batch.inverse.to(x.device))


def _dequantized_once(layer: nn.Module) -> Callable[[Tensor], Tensor]:
    """The base layer as a callable that dequantizes a quantized weight once for all groups of a mixed batch
    (bitwise what :func:`rotfunc.quant.quantized_linear` computes, which dequantizes on every call)."""
    if not quant.is_quantized(layer):
        return layer
    qw = quant.quant_weight_of(layer)
    cache: dict[torch.dtype, Tensor] = {}

    def base(x: Tensor) -> Tensor:
        dtype = qw.spec.compute_dtype or x.dtype
        if dtype not in cache:
            cache[dtype] = quant.dequantize(qw, dtype=dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), cache[dtype], bias).to(x.dtype)

    return base


# ---------------------------------------------------------------------------------------------------------------
# matching and attaching


def _matches(key: str, spec: Any) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{k}") for k in spec)


def _is_output_head(model: nn.Module, module: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        head = None
    return head is not None and head is module


def _targets(model: nn.Module, config: Adapter) -> list[tuple[str, nn.Module]]:
    spec = config.target_modules
    if spec is None:
        raise ValueError(f"{type(config).__name__}.target_modules is None: name the layers to adapt, e.g. ['query', 'value']")
    all_linear = isinstance(spec, str) and spec.lower() == "all-linear"
    found = []
    for name, module in model.named_modules():
        if not name or _is_inside_wrapper(model, name):
            continue
        if any(name.startswith(p + ".") for p, _ in found):  # never adapt inside a matched layer
            continue
        if all_linear:
            layer = _layer_of(module)
            hit = isinstance(layer, nn.Linear) and not _is_output_head(model, layer)
        else:
            hit = _matches(name, spec)
        if hit and _matches(name, config.exclude_modules):
            continue
        if hit:
            found.append((name, module))
    if not found:
        shown = spec if isinstance(spec, str) else sorted(spec)
        raise ValueError(
            f"target_modules={shown!r} matched no module of {type(model).__name__}"
            + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
        )
    for name, module in found:
        layer = _layer_of(module)
        if not isinstance(layer, nn.Linear):
            raise TypeError(
                f"module {name!r} is a {type(layer).__module__}.{type(layer).__name__}; rotfunc adapts "
                "torch.nn.Linear and bitsandbytes Linear8bitLt / Linear4bit layers only"
            )
    return found


def _is_inside_wrapper(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), AdaptedLinear):
            return True
    return False


def _layer_of(module: nn.Module) -> nn.Module:
    """The linear layer itself: a wrapper's ``base_layer``, or the module."""
    return module.base_layer if isinstance(module, AdaptedLinear) else module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _param_dtype(layer: nn.Module) -> torch.dtype:
    w = layer.weight
    if w.dtype.is_floating_point:
        return w.dtype
    return torch.float32  # quantized storage: adapter params stay float32, as PEFT's


def adapted_layers(model: nn.Module, /) -> Iterator[tuple[str, AdaptedLinear]]:
    """(path, wrapper) for every :class:`AdaptedLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def attach(
    model: nn.Module,
    config: Adapter,
    /,
    *,
    adapter_name: str = "default",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Add adapter ``adapter_name`` described by ``config`` to the layers it targets, in place.

    The first adapter attached becomes active. Targeted layers are wrapped in :class:`AdaptedLinear` (a layer
    already wrapped just gains another named adapter); every bitsandbytes layer of the model is routed through
    rotfunc's ``torch.func``-safe quantized linear (:func:`prepare`). Nothing changes if an error is raised.

    Args:
        model: any ``nn.Module`` (e.g. a ``transformers`` model, plain or loaded in 4/8 bit).
        config: ``RoadConfig``, ``OFTConfig`` or ``RandLoraConfig`` (any :class:`~rotfunc.adapter.Adapter`).
        adapter_name: the name to attach under; must be new and not ``"__base__"``.
        generator: randomness for ``init_weights=False`` initializations.

    Returns:
        ``model`` itself.
    """
    if not isinstance(config, Adapter):
        raise TypeError(f"config must implement rotfunc.Adapter (RoadConfig, OFTConfig, ...), got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_ADAPTER or "." in adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r} is not allowed: use a non-empty name without '.' other than {BASE_ADAPTER!r}")
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter_name={adapter_name!r} is already attached to this model; detach it first or pick another name")
    targets = _targets(model, config)
    layers = [_layer_of(m) for _, m in targets]
    shapes = [(layer.out_features, layer.in_features) for layer in layers]
    first_layer = layers[0]
    shared = config.init_shared(shapes, dtype=_param_dtype(first_layer), device=first_layer.weight.device)
    # Build everything first, then install: an error above leaves the model untouched.
    plan = []
    for (name, module), layer in zip(targets, layers):
        params = config.init(
            layer.in_features, layer.out_features,
            dtype=_param_dtype(layer), device=layer.weight.device, generator=generator,
        )
        plan.append((name, module, _Slot(params, shared)))
    for name, module, slot in plan:
        if isinstance(module, AdaptedLinear):
            wrapper = module
        else:
            wrapper = AdaptedLinear(module)
            _set_submodule(model, name, wrapper)
        wrapper.slots[adapter_name] = slot
        wrapper.configs[adapter_name] = config
        if wrapper.active is None:
            wrapper.active = adapter_name
    _freeze_base(model)
    prepare(model)
    _install_batch_hook(model)
    return model


def _freeze_base(model: nn.Module) -> None:
    # As PEFT: only adapter params are trainable. Besides the optimizer's view, this matters for torch.func:
    # base weights that require grad make ordinary autograd record every functional forward/backward around
    # torch.func.grad, and a training loop feeding grads back into params then chains those graphs forever.
    frozen = model.__dict__.setdefault("_rotfunc_frozen", [])
    for name, p in model.named_parameters():
        if f".{_SLOTS}." not in f".{name}" and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(p)


def _unfreeze_base(model: nn.Module) -> None:
    for p in model.__dict__.pop("_rotfunc_frozen", []):
        p.requires_grad_(True)


def detach(model: nn.Module, /, adapter_name: str | None = None) -> nn.Module:
    """Remove one adapter (or all, with ``adapter_name=None``); wrappers left with none give back their base
    layer object, so a fully detached model holds exactly its original modules. Merged adapters are unmerged
    first."""
    names = adapter_names(model)
    if adapter_name is not None and adapter_name not in names:
        raise ValueError(f"adapter_name={adapter_name!r} is not attached; attached: {sorted(names)}")
    drop = set(names) if adapter_name is None else {adapter_name}
    if any(w.merged is not None and w.merged.name in drop for _, w in adapted_layers(model)):
        unmerge(model)
    for name, wrapper in list(adapted_layers(model)):
        for n in drop & set(wrapper.configs):
            del wrapper.slots[n]
            del wrapper.configs[n]
            if wrapper.active == n:
                wrapper.active = next(iter(wrapper.configs), None)
        if not wrapper.configs:
            _set_submodule(model, name, wrapper.base_layer)
    if not adapter_names(model):
        unprepare(model)
        _remove_batch_hook(model)
        _unfreeze_base(model)
    return model


def prepare(model: nn.Module, /) -> nn.Module:
    """Route every bitsandbytes layer of ``model`` through rotfunc's ``torch.func``-safe quantized linear."""
    quant.patch_forward(model)
    return model


def unprepare(model: nn.Module, /) -> nn.Module:
    """Undo :func:`prepare`: bitsandbytes layers get their own forward back."""
    quant.unpatch_forward(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# adapter selection


def adapter_names(model: nn.Module, /) -> list[str]:
    """Names of the adapters attached to ``model``, in attach order."""
    seen: dict[str, None] = {}
    for _, w in adapted_layers(model):
        for n in w.configs:
            seen[n] = None
    return list(seen)


def _require(model: nn.Module, adapter_name: str) -> None:
    names = adapter_names(model)
    if adapter_name not in names:
        raise ValueError(f"adapter_name={adapter_name!r} is not attached to this model; attached: {sorted(names)}")


def set_adapter(model: nn.Module, adapter_name: str, /) -> None:
    """Make ``adapter_name`` the active adapter on every layer that has it."""
    _require(model, adapter_name)
    if any(w.merged is not None for _, w in adapted_layers(model)):
        raise RuntimeError("cannot switch adapters while one is merged: unmerge(model) first")
    for _, w in adapted_layers(model):
        if adapter_name in w.configs:
            w.active = adapter_name


def active_adapter(model: nn.Module, /) -> str | None:
    """The active adapter's name (``None`` if nothing is attached)."""
    for _, w in adapted_layers(model):
        return w.active
    return None


def disable_adapters(model: nn.Module, /) -> None:
    """Make every wrapper compute its base layer only (merged weights stay merged)."""
    for _, w in adapted_layers(model):
        w.enabled = False


def enable_adapters(model: nn.Module, /) -> None:
    """Undo :func:`disable_adapters`."""
    for _, w in adapted_layers(model):
        w.enabled = True


@contextlib.contextmanager
def disabled(model: nn.Module, /) -> Iterator[nn.Module]:
    """Context manager: adapters off inside, the previous per-layer state restored after."""
    before = [(w, w.enabled) for _, w in adapted_layers(model)]
    disable_adapters(model)
    try:
        yield model
    finally:
        for w, e in before:
            w.enabled = e


@contextlib.contextmanager
def adapter_batch(names: Sequence[str], /) -> Iterator[None]:
    """Context manager: forwards inside use adapter ``names[i]`` for sample ``i`` (``BASE_ADAPTER``: none)."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a sequence of str, one per sample, got {names!r}")
    token = _BATCH_NAMES.set(_Batch(tuple(names)))
    try:
        yield
    finally:
        _BATCH_NAMES.reset(token)


def _batch_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    module._rotfunc_batch_cm = adapter_batch(names)
    module._rotfunc_batch_cm.__enter__()
    return args, kwargs


def _batch_hook_after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    cm = module.__dict__.pop("_rotfunc_batch_cm", None)
    if cm is not None:
        cm.__exit__(None, None, None)


def _install_batch_hook(model: nn.Module) -> None:
    # model(**inputs, adapter_names=[...]): transformers models would swallow an unknown keyword silently, so a
    # pre-hook on the top module takes it off before the model's forward sees it.
    if getattr(model, "_rotfunc_hooks", None) is None:
        model._rotfunc_hooks = (
            model.register_forward_pre_hook(_batch_hook, with_kwargs=True),
            model.register_forward_hook(_batch_hook_after, with_kwargs=True, always_call=True),
        )


def _remove_batch_hook(model: nn.Module) -> None:
    hooks = model.__dict__.pop("_rotfunc_hooks", None)
    for h in hooks or ():
        h.remove()


# ---------------------------------------------------------------------------------------------------------------
# training


def adapter_params(model: nn.Module, /, adapter_name: str | None = None) -> dict[str, Tensor]:
    """The trainable tensors of one adapter (default: the active one), keyed like ``model.named_parameters()``.

    Ready for ``torch.func.functional_call(model, params, ...)`` and ``torch.func.grad``. The values are the
    model's own parameters, detached (so a functional training loop owns its copy; write results back with
    :func:`load_params` or by ``copy_``).
    """
    name = adapter_name if adapter_name is not None else active_adapter(model)
    if name is None:
        raise ValueError("no adapter is attached to this model")
    _require(model, name)
    out = {}
    for path, w in adapted_layers(model):
        if name in w.configs:
            for field, p in w.slots[name].named_parameters():
                out[f"{path}.{_SLOTS}.{name}.{field}"] = p.detach()
    return out


def load_params(model: nn.Module, params: dict[str, Tensor], /) -> None:
    """Copy a dict from :func:`adapter_params` (e.g. after training) back into the model's parameters."""
    own = dict(model.named_parameters())
    missing = sorted(set(params) - set(own))
    if missing:
        raise KeyError(f"params has keys that are not parameters of the model, e.g. {missing[:3]}")
    for k, v in params.items():
        if own[k].shape != v.shape:
            raise ValueError(f"params[{k!r}] has shape={tuple(v.shape)}, the model's has {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in params.items():
            own[k].copy_(v)


def num_trainable(model: nn.Module, /, adapter_name: str | None = None) -> int:
    """Trainable parameter count of one adapter (default: the active one), equal to PEFT's count."""
    return sum(p.numel() for p in adapter_params(model, adapter_name).values())


# ---------------------------------------------------------------------------------------------------------------
# merging


def _pure(w: AdaptedLinear, name: str, op: str) -> Callable:
    """``(weight, bias) -> (weight', bias')``: adapter ``name``'s pure ``merge`` or ``unmerge`` (``op``) on ``w``."""
    slot, cfg = w.slots[name], w.configs[name]
    params = slot.params_type(*(t.detach() for t in slot.params()))
    fn, shared = getattr(cfg, op), slot.shared()
    return lambda weight, bias: fn(params, weight, bias, shared=shared)


def merge(model: nn.Module, /, adapter_name: str | None = None, *, safe_merge: bool = False) -> dict[str, Any]:
    """Merge one adapter (default: the active one) into the base weights of every layer that has it.

    Float layers get ``W', b'`` from the adapter's pure merge; bitsandbytes layers are dequantized, merged and
    requantized once, keeping their original packed weight for an exact :func:`unmerge`. All or nothing: if
    any layer fails (or, with ``safe_merge``, produces a non-finite value) every layer merged so far is
    restored and the error is raised.

    Returns:
        ``{layer path: merge record}``; records of quantized layers carry the requantization error.
    """
    name = adapter_name if adapter_name is not None else active_adapter(model)
    if name is None:
        raise ValueError("no adapter is attached to this model")
    _require(model, name)
    layers = [(p, w) for p, w in adapted_layers(model) if name in w.configs]
    already = [p for p, w in layers if w.merged is not None]
    if already:
        raise RuntimeError(f"layer {already[0]!r} already has adapter {layers[0][1].merged.name!r} merged: unmerge first")
    done: list[tuple[AdaptedLinear, Any]] = []
    records = {}
    try:
        for path, w in layers:
            record = quant.merge_into(w.base_layer, _pure(w, name, "merge"), safe_merge=safe_merge)
            done.append((w, record))
            records[path] = record
    except BaseException:
        for w, record in reversed(done):
            quant.restore(w.base_layer, record)
        raise
    for w, record in done:
        w.merged = _Merged(name, record)
    return records


def unmerge(model: nn.Module, /) -> None:
    """Undo :func:`merge`: quantized layers get their original packed weight back bitwise; float layers get the
    adapter's exact inverse (closed-form 2x2 blocks for RoAD, transposed/solved blocks for OFT, W - s dW for
    RandLoRA)."""
    for _, w in adapted_layers(model):
        if w.merged is not None:
            quant.unmerge_from(w.base_layer, w.merged.record, _pure(w, w.merged.name, "unmerge"))
            w.merged = None


def merge_and_unload(model: nn.Module, /, adapter_name: str | None = None, *, safe_merge: bool = False) -> nn.Module:
    """Merge, then replace every wrapper by its base layer: a plain (or quantized) model with no rotfunc left."""
    merge(model, adapter_name, safe_merge=safe_merge)
    for path, w in list(adapted_layers(model)):
        _set_submodule(model, path, w.base_layer)
    unprepare(model)
    _remove_batch_hook(model)
    _unfreeze_base(model)
    return model
