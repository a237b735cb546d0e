"""Thin stateful shims: put the pure adapters onto the layers of a real model.

``attach`` replaces each targeted ``nn.Linear`` / bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` with one small
:class:`AdaptedLinear` that holds the original layer object (never a copy of its weights) as ``base_layer``
and the adapter params as ``nn.Parameter``s, and whose forward calls the config's pure ``apply`` through the
:class:`~rotfunc.adapter.Adapter` protocol, nothing else. Every bitsandbytes layer of the model, targeted or
not, is routed through :func:`rotfunc.quant.quantized_linear` so ``torch.func`` transforms see through it.

**One source of truth.** A model with adapters has exactly one :class:`AdapterState` (which adapter is active,
whether adapters are enabled, which adapter is merged, the per-sample names of a mixed batch), held by the
model and read by every wrapper; wrappers hold params, never flags. Each public operation is a transition: it
computes the next state and everything it will write, validates all of it, and only then commits, so a
refused operation changes nothing. The state is plain Python data, read as attributes in the forward, so
``torch.compile(fullgraph=True)`` traces an attached model (and recompiles when the state changes).

Training goes through ``torch.func``::

    params = rotfunc.adapter_params(model)                  # {"encoder...query.rotfunc.default.theta": ...}
    def loss_fn(p, batch):
        out = torch.func.functional_call(model, p, args=(), kwargs=batch)
        return ...
    grads = torch.func.grad(loss_fn)(params, batch)

Mixed-adapter batches: ``model(**inputs, adapter_names=["a", "b", BASE_ADAPTER, ...])`` (one name per sample,
as PEFT; :data:`BASE_ADAPTER` means "no adapter"; a layer without the named adapter gives its base output for
that sample, as PEFT), ``model.generate(input_ids, adapter_names=[...])``, or the :func:`adapter_batch` context
manager. Each wrapper groups the rows by adapter: one call per distinct adapter, never per sample. Rows that
already come adapter after adapter (:func:`group_rows` orders a batch so) are taken as views: no layer then
gathers or scatters the activations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import quant
from .adapter import Adapter, MixedRows

__all__ = [
    "BASE_ADAPTER",
    "AdapterState",
    "AdaptedLinear",
    "attach",
    "detach",
    "prepare",
    "unprepare",
    "adapter_state",
    "adapter_params",
    "load_params",
    "set_adapter",
    "active_adapter",
    "adapter_names",
    "disable_adapters",
    "enable_adapters",
    "disabled",
    "adapter_batch",
    "group_rows",
    "merge",
    "unmerge",
    "merge_and_unload",
    "num_trainable",
    "adapted_layers",
]

BASE_ADAPTER = "__base__"
"""Reserved adapter name meaning "the base layer, no adapter" in a mixed-adapter batch (PEFT's name)."""

_SLOTS = "rotfunc"  # attribute holding the per-adapter parameter slots: keys look like "<path>.rotfunc.<name>.<field>"
_BIAS = "bias"  # slot parameter holding an adapter's own trainable bias (bias="all" / "<method>_only")


class _Batch:
    """One mixed-adapter batch, grouped once for every layer: rows per adapter and the permutation back."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        rows = _rows_by_adapter(names)
        self.groups = {n: torch.tensor(r) for n, r in rows.items()}
        # group of each row; rows sorted by group (outputs are computed group after group) and the permutation back
        index = [0] * len(names)
        for g, r in enumerate(rows.values()):
            for i in r:
                index[i] = g
        order = [i for r in rows.values() for i in r]
        inverse = [0] * len(order)
        for k, i in enumerate(order):
            inverse[i] = k
        self.rows = MixedRows(torch.tensor(index, dtype=torch.long), torch.tensor(order, dtype=torch.long),
                              torch.tensor(inverse, dtype=torch.long), tuple(len(r) for r in rows.values()),
                              contiguous=order == list(range(len(names))))  # rows already group after group

    def __repr__(self) -> str:
        return f"_Batch({list(self.names)!r})"


@dataclass(frozen=True)
class AdapterState:
    """The adapter state of one model: a value, replaced whole by every transition, never mutated.

    Attributes:
        active: the adapter layers run (a layer without it runs its base), or None.
        enabled: False: every layer runs its base (refused while an adapter is merged).
        merged: the adapter merged into the base weights, or None. While merged, layers run their base layer
            (which now holds the adapter).
        batch: the per-sample adapter names of the mixed batch being computed, or None.
    """

    active: str | None = None
    enabled: bool = True
    merged: str | None = None
    batch: _Batch | None = None


class _Hub:
    """What a model with adapters holds once, shared by reference by every wrapper of that model."""

    def __init__(self) -> None:
        self.state = AdapterState()
        self.configs: dict[str, Adapter] = {}  # attach order
        self.records: dict[str, quant.MergeRecord] = {}  # layer path -> record, while an adapter is merged
        self.saved: list[AdapterState] = []  # states to go back to when a mixed-batch forward ends


class _Slot(nn.Module):
    """One adapter's params on one layer: the NamedTuple's fields as ``nn.Parameter``s (and frozen buffers),
    plus the adapter's own ``bias`` parameter when its config trains biases."""

    def __init__(self, params: tuple[Tensor, ...], shared: tuple[Tensor, ...] | None, bias: Tensor | None) -> None:
        super().__init__()
        self.params_type = type(params)
        for field, value in zip(params._fields, params):
            self.register_parameter(field, nn.Parameter(value))
        if bias is not None:
            self.register_parameter(_BIAS, nn.Parameter(bias))
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

    def own_bias(self) -> Tensor | None:
        return self._parameters.get(_BIAS)


class AdaptedLinear(nn.Module):
    """A linear layer with named adapters: ``base_layer`` is the original module object, untouched.

    It holds the adapters' params (``self.rotfunc[name]``) and reads everything else (which adapter runs,
    enabled, merged, mixed batch) from the model's one :class:`AdapterState`.
    """

    def __init__(self, base_layer: nn.Module, hub: _Hub) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        setattr(self, _SLOTS, nn.ModuleDict())
        self._hub = hub

    @property
    def slots(self) -> nn.ModuleDict:
        return getattr(self, _SLOTS)

    @property
    def configs(self) -> dict[str, Adapter]:
        """The configs of the adapters this layer has, by name."""
        return {n: self._hub.configs[n] for n in self.slots}

    def extra_repr(self) -> str:
        return f"adapters={[n for n in self.slots]}"

    def _base(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """The base layer on ``x``; with ``bias``, the adapter's own bias replaces the layer's."""
        layer = self.base_layer
        if bias is None:
            return quant.quant_forward(layer, x) if quant.is_quantized(layer) else layer(x)
        if quant.is_quantized(layer):
            return quant.quantized_linear(quant.quant_weight_of(layer), x, bias.to(x.dtype))
        return nn.functional.linear(x, layer.weight, bias.to(layer.weight.dtype))

    def _apply_one(self, name: str, x: Tensor, base: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        slot, cfg = self.slots[name], self._hub.configs[name]
        params, bias = slot.params(), slot.own_bias()
        if base is None or bias is not None:
            base = functools.partial(self._base, bias=bias)
        dtype = _compute_dtype(self.base_layer, x)
        if any(p.dtype != dtype for p in params):  # float32 params on a half-precision layer: compute in its dtype
            params = type(params)(*(p.to(dtype) for p in params))
        return cfg.apply(
            params,
            x,
            base,
            in_features=self.in_features,
            out_features=self.out_features,
            shared=slot.shared(),
            training=self.training,
        )

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        state = self._hub.state
        if state.merged is not None:
            return self._base(x)
        if state.batch is not None:
            return self._forward_mixed(x, state.batch)
        if not state.enabled or state.active is None or state.active not in self.slots:
            return self._base(x)
        return self._apply_one(state.active, x)

    def _forward_mixed(self, x: Tensor, batch: _Batch) -> Tensor:
        names = batch.names
        if x.shape[0] != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} samples")
        base = _dequantized_once(self.base_layer)
        here = [n for n in batch.groups if n in self.slots]
        if not here:
            return base(x)
        if len(batch.groups) == 1:
            return self._apply_one(here[0], x, base)
        # One pass for the whole batch when every adapter here has one config that implements apply_mixed (RoAD:
        # one gathered elementwise op; OFT: one batched rotation of the input; RandLoRA: the shared basis once)
        # and none brings its own bias: one base call, no per-group split of the layer.
        cfg = self._hub.configs[here[0]]
        key, shared = _mixed_key(cfg), self.slots[here[0]].shared()
        if getattr(cfg, "apply_mixed", None) is not None and all(
            _mixed_key(self._hub.configs[n]) == key and self.slots[n].own_bias() is None
            and _same_shapes(self.slots[n].shared(), shared) for n in here
        ):
            dtype = _compute_dtype(self.base_layer, x)

            def params_of(name: str) -> tuple[Tensor, ...]:
                params = self.slots[name].params()
                if any(p.dtype != dtype for p in params):  # float32 params on a half-precision layer, as _apply_one
                    params = type(params)(*(p.to(dtype) for p in params))
                return params

            return cfg.apply_mixed(
                [params_of(n) if n in self.slots else None for n in batch.groups],
                x,
                base,
                rows=batch.rows.to(x.device),
                in_features=self.in_features,
                out_features=self.out_features,
                shared=shared,
                training=self.training,
            )
        # Adapters that call base on the group's own input (RoAD, RandLoRA, samples without an adapter here) share
        # one full-batch base matmul, computed on first use, instead of one small matmul per group; adapters that
        # transform the input first (OFT) or bring their own bias call the base on their own input.
        # The rows go group by group through MixedRows.split/join: views when they already come group after group,
        # else one gather in and one back (not one gather per group).
        rows = batch.rows.to(x.device)
        full: list[Tensor] = []

        def group_base(g: int, xs: Tensor) -> Callable[[Tensor], Tensor]:
            def call(inp: Tensor) -> Tensor:
                if inp is not xs:
                    return base(inp)
                if not full:
                    full.extend(rows.split(base(x)))
                return full[g]

            return call

        outs = []
        for g, (name, xs) in enumerate(zip(batch.groups, rows.split(x))):
            b = group_base(g, xs)
            outs.append(self._apply_one(name, xs, b) if name in self.slots else b(xs))
        return rows.join(outs)


_SELECTION_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "init_weights"})


def _mixed_key(cfg: Adapter) -> tuple:
    """What of a config shapes a layer's forward: its type and fields, minus which layers it targets and how its
    params start. Adapters with equal keys on a layer run a mixed batch in one ``apply_mixed`` pass."""
    return (type(cfg),) + tuple(
        (f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in _SELECTION_FIELDS
    )


def _same_shapes(a: tuple[Tensor, ...] | None, b: tuple[Tensor, ...] | None) -> bool:
    """Shared frozen pytrees of one config drawn for the same shapes (so equal: RandLoRA's bases are a function
    of ``projection_prng_key`` and their shapes)."""
    if a is None or b is None:
        return a is b
    return all(x is y or (x.shape == y.shape and x.dtype == y.dtype and x.device == y.device) for x, y in zip(a, b))


def _compute_dtype(layer: nn.Module, x: Tensor) -> torch.dtype:
    """The dtype an adapter computes in on ``layer``: a float layer's weight dtype, else the input's."""
    w = layer.weight
    return w.dtype if w.dtype.is_floating_point and not quant.is_quantized(layer) else x.dtype


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
# the model's state


def _hub(model: nn.Module) -> _Hub | None:
    return model.__dict__.get("_rotfunc_hub")


def adapter_state(model: nn.Module, /) -> AdapterState:
    """The model's :class:`AdapterState` (an immutable value; an empty state when nothing is attached)."""
    hub = _hub(model)
    return AdapterState() if hub is None else hub.state


def in_mixed_batch(module: nn.Module, /) -> bool:
    """True while the model that ``module`` (a model or any submodule holding adapted layers) belongs to runs a
    mixed-adapter batch; the state is read from its first adapted layer, which shares the model's hub."""
    for m in module.modules():
        if isinstance(m, AdaptedLinear):
            return m._hub.state.batch is not None
    return False


def adapted_layers(model: nn.Module, /) -> Iterator[tuple[str, AdaptedLinear]]:
    """(path, wrapper) for every :class:`AdaptedLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def adapter_names(model: nn.Module, /) -> list[str]:
    """Names of the adapters attached to ``model``, in attach order."""
    hub = _hub(model)
    return [] if hub is None else list(hub.configs)


def _require(model: nn.Module, adapter_name: Any) -> _Hub:
    names = adapter_names(model)
    if not isinstance(adapter_name, str) or adapter_name not in names:
        raise ValueError(f"adapter_name={adapter_name!r} is not attached to this model; attached: {names}")
    return _hub(model)


def _not_in_batch(hub: _Hub, what: str) -> None:
    if hub.state.batch is not None:
        raise RuntimeError(f"cannot {what} inside a mixed-adapter batch ({hub.state.batch!r})")


# ---------------------------------------------------------------------------------------------------------------
# matching and attaching


def _matches(key: str, spec: Any) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{k}") for k in spec)


def _layer_index_ok(key: str, config: Adapter) -> bool:
    """PEFT's ``layers_to_transform`` / ``layers_pattern`` filter (applied to list targets matched by suffix)."""
    indexes = getattr(config, "layers_to_transform", None)
    spec = config.target_modules
    if indexes is None or isinstance(spec, str) or key in spec or (isinstance(indexes, tuple) and not indexes):
        return True
    patterns = getattr(config, "layers_pattern", None)
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in (patterns,) if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


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
            hit = _matches(name, spec) and _layer_index_ok(name, config)
        if hit and _matches(name, config.exclude_modules):
            continue
        if hit:
            found.append((name, module))
    if not found:
        shown = spec if isinstance(spec, str) else sorted(spec)
        extra = ""
        if getattr(config, "layers_to_transform", None) is not None:
            extra += f" with layers_to_transform={config.layers_to_transform!r}, layers_pattern={config.layers_pattern!r}"
        if config.exclude_modules:
            extra += f" (exclude_modules={config.exclude_modules!r})"
        raise ValueError(f"target_modules={shown!r} matched no module of {type(model).__name__}{extra}")
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


def _param_dtype(layer: nn.Module, autocast_adapter_dtype: bool) -> torch.dtype:
    w = layer.weight
    if w.dtype.is_floating_point and not quant.is_quantized(layer):
        # As PEFT's autocast_adapter_dtype=True: half-precision layers get float32 adapter params (an SGD step
        # of 1e-3 on a bf16 parameter near 1 rounds away), computed in the layer's dtype.
        if autocast_adapter_dtype and w.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return w.dtype
    return torch.float32  # quantized storage: adapter params stay float32, as PEFT's


def _check_model_layers(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if quant._is_8bit(m) and m.state.has_fp16_weights:
            raise TypeError(
                f"module {name!r} is a bitsandbytes Linear8bitLt with has_fp16_weights=True (a float weight "
                "quantized anew on every forward, whose autograd.Function torch.func cannot transform); rotfunc "
                "supports has_fp16_weights=False (load the model with BitsAndBytesConfig(load_in_8bit=True))"
            )


def _resolved_config(config: Adapter) -> Adapter:
    """What PEFT does to config fields that cannot apply to ``nn.Linear``, and refusals of what rotfunc lacks."""
    if getattr(config, "fan_in_fan_out", False):
        warnings.warn(
            f"{type(config).__name__}(fan_in_fan_out=True) does not apply to torch.nn.Linear layers (weights are "
            "(out, in)); setting fan_in_fan_out=False, as PEFT does",
            UserWarning,
            stacklevel=3,
        )
        config = dataclasses.replace(config, fan_in_fan_out=False)
    return config


def _bias_paths(model: nn.Module, config: Adapter, targets: list[tuple[str, nn.Module]]) -> set[str]:
    """Which targeted layers get an adapter-owned trainable bias (``bias="all"`` / ``"<method>_only"``)."""
    mode = getattr(config, "bias", "none")
    if mode == "none":
        return set()
    with_bias = {name for name, m in targets if _layer_of(m).bias is not None}
    if mode == "all":
        # PEFT's "all" trains every bias of the model. rotfunc trains adapter-owned copies (the base stays
        # frozen and byte-identical), which it can do for the adapted linear layers' biases.
        adapted = {f"{n}.bias" for n in with_bias} | {f"{n}.base_layer.bias" for n in with_bias}
        outside = [n for n, _ in model.named_parameters() if n.endswith("bias") and n not in adapted
                   and f".{_SLOTS}." not in f".{n}"]
        if outside:
            raise ValueError(
                f"bias='all' would train {outside[0]!r} ({len(outside)} bias(es) outside the adapted layers); "
                "rotfunc trains the biases of adapted layers only: use bias="
                f"'{type(config).peft_type.lower()}_only' or target those modules"
            )
    return with_bias


def attach(
    model: nn.Module,
    config: Adapter,
    /,
    *,
    adapter_name: str = "default",
    generator: torch.Generator | None = None,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Add adapter ``adapter_name`` described by ``config`` to the layers it targets, in place.

    The first adapter attached becomes active. Targeted layers are wrapped in :class:`AdaptedLinear` (a layer
    already wrapped just gains another named adapter); every bitsandbytes layer of the model is routed through
    rotfunc's ``torch.func``-safe quantized linear (:func:`prepare`). Nothing changes if an error is raised.

    Args:
        model: any ``nn.Module`` (e.g. a ``transformers`` model, plain or loaded in 4/8 bit).
        config: ``RoadConfig``, ``OFTConfig`` or ``RandLoraConfig`` (any :class:`~rotfunc.adapter.Adapter`).
            ``layers_to_transform`` / ``layers_pattern`` select layer indices as PEFT's do; ``bias="<method>_only"``
            (or ``"all"`` when every bias of the model is in an adapted layer) gives the adapter its own
            trainable copy of those layers' biases.
        adapter_name: the name to attach under; must be new and not ``"__base__"``.
        generator: randomness for ``init_weights=False`` initializations.
        autocast_adapter_dtype: True (default, as PEFT): float32 adapter params on bf16/fp16 layers, computed
            in the layer's dtype. False: params in the layer's dtype.

    Returns:
        ``model`` itself.
    """
    if not isinstance(config, Adapter):
        raise TypeError(f"config must implement rotfunc.Adapter (RoadConfig, OFTConfig, ...), got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_ADAPTER or "." in adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r} is not allowed: use a non-empty name without '.' other than {BASE_ADAPTER!r}")
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter_name={adapter_name!r} is already attached to this model; detach it first or pick another name")
    if getattr(config, "modules_to_save", None):
        raise ValueError(
            f"modules_to_save={config.modules_to_save!r}: rotfunc does not train or save whole modules; "
            "train them with your own loop (their params are ordinary model parameters)"
        )
    hub = _hub(model)
    if hub is not None:
        _not_in_batch(hub, "attach")
    _check_model_layers(model)
    config = _resolved_config(config)
    targets = _targets(model, config)
    layers = [_layer_of(m) for _, m in targets]
    shapes = [(layer.out_features, layer.in_features) for layer in layers]
    first_layer = layers[0]
    shared = config.init_shared(
        shapes, dtype=_param_dtype(first_layer, autocast_adapter_dtype), device=first_layer.weight.device
    )
    bias_paths = _bias_paths(model, config, targets)
    # Build everything first, then install: an error above leaves the model untouched.
    plan = []
    for (name, module), layer in zip(targets, layers):
        dtype = _param_dtype(layer, autocast_adapter_dtype)
        params = config.init(
            layer.in_features, layer.out_features, dtype=dtype, device=layer.weight.device, generator=generator,
        )
        bias = layer.bias.detach().to(dtype).clone() if name in bias_paths else None
        plan.append((name, module, _Slot(params, shared, bias)))
    if hub is None:
        hub = model.__dict__["_rotfunc_hub"] = _Hub()
    for name, module, slot in plan:
        if isinstance(module, AdaptedLinear):
            wrapper = module
        else:
            wrapper = AdaptedLinear(module, hub)
            _set_submodule(model, name, wrapper)
        wrapper.slots[adapter_name] = slot
    hub.configs[adapter_name] = config
    if hub.state.active is None:
        hub.state = dataclasses.replace(hub.state, active=adapter_name)
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
    layer object, so a fully detached model holds exactly its original modules. A merged adapter among those
    removed is unmerged first (bitwise). All or nothing."""
    names = adapter_names(model)
    if adapter_name is not None:
        hub = _require(model, adapter_name)
    elif not names:
        return model
    else:
        hub = _hub(model)
    _not_in_batch(hub, "detach")
    drop = set(names) if adapter_name is None else {adapter_name}
    if hub.state.merged in drop:
        unmerge(model)  # validates every layer before it restores any
    for name, wrapper in list(adapted_layers(model)):
        for n in drop & set(wrapper.slots):
            del wrapper.slots[n]
        if not len(wrapper.slots):
            _set_submodule(model, name, wrapper.base_layer)
    for n in drop:
        del hub.configs[n]
    active = hub.state.active
    if active in drop:
        active = next(iter(hub.configs), None)
    hub.state = dataclasses.replace(hub.state, active=active)
    if not hub.configs:
        _release(model)
    return model


def _release(model: nn.Module) -> None:
    """What a model gives back once no adapter is left: bnb forwards, the batch hook, trainable base, the hub."""
    unprepare(model)
    _remove_batch_hook(model)
    _unfreeze_base(model)
    model.__dict__.pop("_rotfunc_hub", None)


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


def set_adapter(model: nn.Module, adapter_name: str, /) -> None:
    """Make ``adapter_name`` the active adapter: layers that have it run it, the others run their base layer."""
    hub = _require(model, adapter_name)
    _not_in_batch(hub, "set_adapter")
    if hub.state.merged is not None and hub.state.merged != adapter_name:
        raise RuntimeError(
            f"cannot switch to adapter {adapter_name!r} while {hub.state.merged!r} is merged: unmerge(model) first"
        )
    hub.state = dataclasses.replace(hub.state, active=adapter_name)


def active_adapter(model: nn.Module, /) -> str | None:
    """The active adapter's name (``None`` if nothing is attached)."""
    return adapter_state(model).active


def _set_enabled(model: nn.Module, enabled: bool) -> None:
    hub = _hub(model)
    if hub is None:
        raise ValueError("no adapter is attached to this model")
    _not_in_batch(hub, "enable or disable adapters")
    if not enabled and hub.state.merged is not None:
        raise RuntimeError(
            f"adapter {hub.state.merged!r} is merged into the base weights, so disabling cannot give the base "
            "model: unmerge(model) first"
        )
    hub.state = dataclasses.replace(hub.state, enabled=enabled)


def disable_adapters(model: nn.Module, /) -> None:
    """Make every layer compute its base layer only (refused while an adapter is merged)."""
    _set_enabled(model, False)


def enable_adapters(model: nn.Module, /) -> None:
    """Undo :func:`disable_adapters`."""
    _set_enabled(model, True)


@contextlib.contextmanager
def disabled(model: nn.Module, /) -> Iterator[nn.Module]:
    """Context manager: adapters off inside, the previous state's ``enabled`` restored after."""
    before = adapter_state(model).enabled
    disable_adapters(model)
    try:
        yield model
    finally:
        _hub(model).state = dataclasses.replace(_hub(model).state, enabled=before)


def _check_names(names: Any) -> None:
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a sequence of str, one per sample, got {names!r}")


def _rows_by_adapter(names: Sequence[str]) -> dict[str, list[int]]:
    """``{adapter name: its row numbers}``, adapters in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        rows.setdefault(n, []).append(i)
    return rows


def _batch_state(model: nn.Module, names: Any) -> AdapterState:
    """The state for a mixed batch of ``names`` on ``model``, validated (nothing is changed here)."""
    _check_names(names)
    hub = _hub(model)
    if hub is None:
        raise ValueError("adapter_names given, but no adapter is attached to this model")
    unknown = sorted(set(names) - set(hub.configs) - {BASE_ADAPTER})
    if unknown:
        raise ValueError(f"adapter_names contains {unknown}, not attached to this model; attached: {list(hub.configs)}")
    if hub.state.merged is not None:
        raise RuntimeError(f"mixed-adapter batch while adapter {hub.state.merged!r} is merged: unmerge(model) first")
    return dataclasses.replace(hub.state, batch=_Batch(tuple(names)))


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str], /) -> Iterator[None]:
    """Context manager: forwards of ``model`` inside use adapter ``names[i]`` for sample ``i`` (``BASE_ADAPTER``:
    none; a layer without the named adapter gives its base output for that sample)."""
    new = _batch_state(model, names)
    hub = _hub(model)
    before = hub.state
    hub.state = new
    try:
        yield
    finally:
        hub.state = before


def group_rows(adapter_names: Sequence[str], /) -> tuple[Tensor, list[str]]:
    """``(order, names)``: a mixed batch's rows ordered adapter after adapter (a stable sort, adapters in order of
    first appearance), and the per-sample names in that order.

    Index every per-sample input with ``order`` (``x[order]``) and pass ``names`` as ``adapter_names``: then every
    layer reads each adapter's rows as a slice, where rows in any other order cost each layer a gather of the
    activations and a gather back (grouped, like Punica/S-LoRA's segmented batches). The outputs come in the
    grouped order (``torch.argsort(order)`` puts them back); a loss summed or averaged over rows is unchanged
    up to float summation order, so a training step can group its batch and go on.
    """
    _check_names(adapter_names)
    order = [i for r in _rows_by_adapter(adapter_names).values() for i in r]
    return torch.tensor(order, dtype=torch.long), [adapter_names[i] for i in order]


def _batch_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    new = _batch_state(module, names)
    hub = _hub(module)
    hub.saved.append(hub.state)
    hub.state = new
    module.__dict__["_rotfunc_batch_depth"] = module.__dict__.get("_rotfunc_batch_depth", 0) + 1
    return args, kwargs


def _batch_hook_after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    depth = module.__dict__.get("_rotfunc_batch_depth", 0)
    if depth:
        module.__dict__["_rotfunc_batch_depth"] = depth - 1
        hub = _hub(module)
        hub.state = hub.saved.pop()


def _generate(model: nn.Module, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
    """``model.generate`` taking ``adapter_names`` (one per sequence), installed on the instance by attach."""
    generate = type(model).generate
    if adapter_names is None:
        return generate(model, *args, **kwargs)
    # beams and returned sequences are laid out sequence-major: repeat each name, as PEFT does
    repeat = max(int(kwargs.get("num_beams") or 1), int(kwargs.get("num_return_sequences") or 1))
    with adapter_batch(model, [n for n in adapter_names for _ in range(repeat)]):
        return generate(model, *args, **kwargs)


def _install_batch_hook(model: nn.Module) -> None:
    # model(**inputs, adapter_names=[...]): transformers models would swallow an unknown keyword silently, so a
    # pre-hook on the top module takes it off before the model's forward sees it. generate() validates its
    # keywords before any forward runs, so it gets an instance wrapper taking adapter_names.
    if getattr(model, "_rotfunc_hooks", None) is None:
        model._rotfunc_hooks = (
            model.register_forward_pre_hook(_batch_hook, with_kwargs=True),
            model.register_forward_hook(_batch_hook_after, with_kwargs=True, always_call=True),
        )
        if callable(getattr(type(model), "generate", None)):
            # a bound method (not a closure over model), so a deepcopy of the model calls its own generate
            model.__dict__["generate"] = types.MethodType(_generate, model)


def _remove_batch_hook(model: nn.Module) -> None:
    hooks = model.__dict__.pop("_rotfunc_hooks", None)
    for h in hooks or ():
        h.remove()
    model.__dict__.pop("generate", None)
    model.__dict__.pop("_rotfunc_batch_depth", None)


# ---------------------------------------------------------------------------------------------------------------
# training


def _param_table(model: nn.Module, adapter_name: str | None = None) -> dict[str, tuple[str, nn.Parameter]]:
    """key -> (adapter name, parameter) for every adapter param (of one adapter, or all)."""
    out = {}
    for path, w in adapted_layers(model):
        for name, slot in w.slots.items():
            if adapter_name is None or name == adapter_name:
                for field, p in slot.named_parameters():
                    out[f"{path}.{_SLOTS}.{name}.{field}"] = (name, p)
    return out


def adapter_params(model: nn.Module, /, adapter_name: str | None = None) -> dict[str, Tensor]:
    """The trainable tensors of one adapter (default: the active one), keyed like ``model.named_parameters()``.

    Ready for ``torch.func.functional_call(model, params, ...)`` and ``torch.func.grad``. The values are
    copies (detached clones): the training loop owns them, and changing them changes nothing in the model until
    they are written back with :func:`load_params`. An adapter with ``bias="<method>_only"`` includes its
    trainable biases (``...rotfunc.<name>.bias``).
    """
    name = adapter_name if adapter_name is not None else active_adapter(model)
    if name is None:
        raise ValueError("no adapter is attached to this model")
    _require(model, name)
    return {k: p.detach().clone() for k, (_, p) in _param_table(model, name).items()}


def load_params(model: nn.Module, params: Mapping[str, Tensor], /) -> None:
    """Copy adapter params (a dict like :func:`adapter_params`'s, e.g. after training) into the model.

    All or nothing: every key must name an adapter parameter of the model, every value must be a real
    floating-point tensor of that parameter's shape, not on the meta device, and no adapter it names may be
    merged; otherwise nothing is copied and the error names the offending key. Values are cast to the
    parameter's dtype.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of parameter name -> tensor, got {type(params).__name__}")
    table = _param_table(model)
    own_names = {n for n, _ in model.named_parameters()}
    merged = adapter_state(model).merged
    for k, v in params.items():
        if k not in table:
            what = "a base-model parameter (frozen; rotfunc never writes it)" if k in own_names else "not a parameter of the model"
            raise KeyError(f"params[{k!r}]: {what}; expected adapter params like {next(iter(table), '<none attached>')!r}")
        own = table[k][1]
        if not isinstance(v, Tensor):
            raise TypeError(f"params[{k!r}] is a {type(v).__name__}, expected a torch.Tensor")
        if not v.dtype.is_floating_point:
            raise TypeError(f"params[{k!r}] has dtype={v.dtype}, expected a real floating-point tensor ({own.dtype})")
        if tuple(v.shape) != tuple(own.shape):
            raise ValueError(f"params[{k!r}] has shape={tuple(v.shape)}, the model's has {tuple(own.shape)}")
        if v.device.type == "meta":
            raise ValueError(f"params[{k!r}] is on the meta device (no data), expected {own.device}")
    for k in params:
        if table[k][0] == merged:
            raise RuntimeError(
                f"params[{k!r}] belongs to adapter {merged!r}, which is merged into the base weights: "
                "unmerge(model) before loading new params"
            )
    with torch.no_grad():
        for k, v in params.items():
            table[k][1].copy_(v)


def num_trainable(model: nn.Module, /, adapter_name: str | None = None) -> int:
    """Trainable parameter count of one adapter (default: the active one), equal to PEFT's count."""
    return sum(p.numel() for p in adapter_params(model, adapter_name).values())


# ---------------------------------------------------------------------------------------------------------------
# merging


def _merge_fn(w: AdaptedLinear, name: str) -> Callable:
    """``(weight, bias, out=None, backup=None) -> (weight', bias')``: adapter ``name``'s pure merge on layer ``w``,
    in float32 at least (the result is cast back to the layer's dtypes); an adapter-owned bias replaces the
    layer's. With ``out`` (an in-place float merge) an adapter whose ``merge`` takes ``out=`` (RoAD, OFT) writes
    ``W'`` there when the weight is already in the merge dtype; others return a new tensor, which the caller
    copies in. With ``backup`` (``out`` is ``weight``, see :func:`quant.merge_into`) the original weight ends up
    in ``backup``: saved piece by piece by an adapter whose ``merge`` takes ``backup=``, else copied first, and
    the weight is left as it was if the merge raises."""
    import inspect

    slot, cfg = w.slots[name], w._hub.configs[name]
    own_bias = slot.own_bias()
    sig = inspect.signature(cfg.merge).parameters
    takes_out, takes_backup = "out" in sig, "backup" in sig

    def fn(
        weight: Tensor, bias: Tensor | None, out: Tensor | None = None, backup: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        dtype = torch.promote_types(weight.dtype, torch.float32)
        if backup is not None and not (takes_backup and weight.dtype == dtype):
            backup.copy_(weight)  # no merge in place here: merge from the copy
            try:
                return fn(backup, bias, out=out)
            except BaseException:
                weight.copy_(backup)
                raise
        params = slot.params_type(*(t.detach().to(dtype) for t in slot.params()))
        b = own_bias.detach() if own_bias is not None else bias
        kw = {"out": out} if out is not None and takes_out and weight.dtype == dtype else {}
        if backup is not None:
            kw["backup"] = backup
        return cfg.merge(params, weight.to(dtype), None if b is None else b.to(dtype), shared=slot.shared(), **kw)

    return fn


def merge(model: nn.Module, /, adapter_name: str | None = None, *, safe_merge: bool = False) -> dict[str, Any]:
    """Merge one adapter (default: the active one) into the base weights of every layer that has it.

    Every layer keeps its original weight while merged (float layers: a copy of the weight, the merge written
    into the weight's own storage, so tied or shared references see it; bitsandbytes layers: the original packed
    weight and quant state), so :func:`unmerge` is exact and cannot fail, whatever the adapter's params (a
    singular RoAD or OFT block included). Quantized layers are dequantized, merged and
    requantized once. All or nothing: if any layer fails (or, with ``safe_merge``, produces a non-finite value)
    every layer merged so far is restored and the error is raised.

    Returns:
        ``{layer path: merge record}``; records of quantized layers carry the requantization error.
    """
    name = adapter_name if adapter_name is not None else active_adapter(model)
    if name is None:
        raise ValueError("no adapter is attached to this model")
    hub = _require(model, name)
    _not_in_batch(hub, "merge")
    if hub.state.merged is not None:
        raise RuntimeError(f"adapter {hub.state.merged!r} is already merged: unmerge(model) first")
    layers = [(p, w) for p, w in adapted_layers(model) if name in w.slots]
    records: dict[str, quant.MergeRecord] = {}
    try:
        for path, w in layers:
            backup = w.__dict__.pop("_rotfunc_backup", None)  # kept by unmerge(keep_buffers=True)
            records[path] = quant.merge_into(w.base_layer, _merge_fn(w, name), safe_merge=safe_merge, in_place=True,
                                             backup=backup)
    except BaseException as e:
        for path in reversed(list(records)):
            quant.restore(model.get_submodule(path).base_layer, records[path])
        failed = layers[len(records)][0] if len(records) < len(layers) else "?"
        e.add_note(f"rotfunc.merge: layer {failed!r} failed; the {len(records)} layer(s) merged before it were restored")
        raise
    hub.records = records
    hub.state = dataclasses.replace(hub.state, merged=name)
    return dict(records)


def unmerge(model: nn.Module, /, *, keep_buffers: bool = False) -> None:
    """Undo :func:`merge`, bitwise: every layer gets back the very weights (and quant state, and bias) it had.

    All or nothing: if a layer's weight was replaced since the merge (e.g. a ``load_state_dict``), nothing is
    restored and a ValueError names the layer. A model with nothing merged is left as it is.

    ``keep_buffers=True`` keeps each float layer's backup buffer (one weight-sized tensor per layer) for the
    next :func:`merge` to reuse: repeated merge/unmerge cycles then run at memory-copy speed, without the page
    faults of fresh weight-sized allocations, at the cost of that memory while unmerged. By default it is freed.
    """
    hub = _hub(model)
    if hub is None or hub.state.merged is None:
        return
    _not_in_batch(hub, "unmerge")
    for path, record in hub.records.items():
        layer = model.get_submodule(path).base_layer
        if not quant._same_marker(quant._merged_marker(layer), record.merged):
            raise ValueError(
                f"layer {path!r} no longer holds the weight merge() installed (replaced since?): nothing was "
                "unmerged; detach(model) is refused too, as the original weights would be lost"
            )
    for path, record in hub.records.items():
        wrapper = model.get_submodule(path)
        quant.restore(wrapper.base_layer, record, check=False)
        if keep_buffers and record.original.get("in_place"):
            wrapper.__dict__["_rotfunc_backup"] = record.original["data"]
    hub.records = {}
    hub.state = dataclasses.replace(hub.state, merged=None)


def merge_and_unload(model: nn.Module, /, adapter_name: str | None = None, *, safe_merge: bool = False) -> nn.Module:
    """Merge, then replace every wrapper by its base layer: a plain (or quantized) model with no rotfunc left."""
    merge(model, adapter_name, safe_merge=safe_merge)
    for path, w in list(adapted_layers(model)):
        _set_submodule(model, path, w.base_layer)
    _release(model)
    return model
