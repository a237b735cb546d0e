"""Many adapters on one frozen base: stacked params, a functional Adam, and the vmapped ensemble step.

Two ways to train K adapters on one (float, 8-bit or 4-bit) base model in one program:

* **Ensembles** (K seeds, K learning rates, K policies on the same data or on K batches): the K adapters'
  params are stacked along a new leading dim, like ``torch.func.stack_module_state``, and one training step is
  ``torch.func.vmap``-ped over them. The base weights are read once per layer for all K; each member gets its own
  params, gradients and optimizer state::

      model.set_attn_implementation("eager")          # transformers: an attention with a batching rule
      stacked = rotfunc.stack_params([rotfunc.init_params(model, generator=torch.Generator().manual_seed(s))
                                      for s in range(K)])
      state = rotfunc.ensemble_init(stacked)           # Adam's moments, stacked too
      step = rotfunc.ensemble_step(loss_fn)            # loss_fn(params, *batch) -> scalar
      stacked, state, losses = step(stacked, state, torch.tensor(lrs), batch)  # losses: (K,)
      rotfunc.load_params(model, rotfunc.unstack_params(stacked)[best])

* **Mixed batches** (K adapters on K data sources, different layers or configs per adapter allowed): attach K
  named adapters and train all their params in one forward with ``adapter_names`` (one name per sample;
  :data:`~rotfunc.BASE_ADAPTER` rows run the base). Each adapter's gradient comes only from its own rows::

      params = {k: v for n in names for k, v in rotfunc.adapter_params(model, n).items()}
      def loss_fn(p, batch, rows):
          out = functional_call(model, p, args=(), kwargs={**batch, "adapter_names": rows})
          return per_sample_loss(out).sum()
      grads = rotfunc.split_by_adapter(torch.func.grad(loss_fn)(params, batch, rows))   # {name: grads}

The pure pieces here (``stack_params``, ``unstack_params``, ``ensemble_init``, ``ensemble_step``) never touch a model;
``init_params`` reads one (its configs and layer shapes) and changes nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from . import bind

__all__ = [
    "stack_params",
    "unstack_params",
    "rename_params",
    "split_by_adapter",
    "init_params",
    "EnsembleState",
    "ensemble_init",
    "ensemble_step",
]

_SEP = f".{bind._SLOTS}."  # keys look like "<layer path>.rotfunc.<adapter name>.<field>"


def _split_key(key: str) -> tuple[str, str, str]:
    """(layer path, adapter name, field) of an adapter param key."""
    path, sep, rest = key.rpartition(_SEP)
    name, dot, field = rest.rpartition(".")
    if not sep or not dot or not name:
        raise ValueError(f"{key!r} is not an adapter param key like '<layer>{_SEP}<adapter name>.<field>'")
    return path, name, field


def rename_params(params: Mapping[str, Tensor], adapter_name: str, /) -> dict[str, Tensor]:
    """The same tensors keyed as adapter ``adapter_name``'s params (the adapter-name part of every key replaced).

    For moving params between adapters of the same config on the same layers, e.g. to train adapter ``"b"``'s
    params through adapter ``"a"``'s slots, or to :func:`~rotfunc.load_params` them into ``"b"``.
    """
    out = {}
    for k, v in params.items():
        path, _, field = _split_key(k)
        out[f"{path}{_SEP}{adapter_name}.{field}"] = v
    return out


def split_by_adapter(params: Mapping[str, Tensor], /) -> dict[str, dict[str, Tensor]]:
    """``{adapter name: {key: tensor}}`` of a dict holding several adapters' params (or grads), in key order."""
    out: dict[str, dict[str, Tensor]] = {}
    for k, v in params.items():
        out.setdefault(_split_key(k)[1], {})[k] = v
    return out


def stack_params(params: Sequence[Mapping[str, Tensor]], /) -> dict[str, Tensor]:
    """Stack K adapter param dicts (from :func:`~rotfunc.adapter_params` / :func:`init_params`) along a new dim 0.

    The analogue of ``torch.func.stack_module_state`` for rotfunc's param dicts. The dicts may belong to
    different adapters of the same config (``adapter_params(model, "s0")``, ``..."s1"``, ...): the result is
    keyed like the first one, so ``functional_call(model, member_params, ...)`` under ``vmap`` runs every
    member through the first adapter's slots (make it the active adapter).

    Args:
        params: K >= 1 dicts with the same layers and fields, each value of the same shape and dtype across dicts.

    Returns:
        ``{key: (K, *shape)}``, fresh tensors (no storage shared with the inputs).
    """
    if isinstance(params, Mapping) or not isinstance(params, Sequence) or not params:
        raise TypeError(f"params must be a non-empty sequence of param dicts, got {type(params).__name__}")
    first = params[0]
    name = _split_key(next(iter(first)))[1] if first else None
    if name is None:
        raise ValueError("params[0] is empty")
    renamed = [rename_params(p, name) for p in params]
    keys = list(renamed[0])
    for i, p in enumerate(renamed[1:], 1):
        if list(p) != keys:
            missing, extra = sorted(set(keys) - set(p)), sorted(set(p) - set(keys))
            raise ValueError(f"params[{i}] has other layers/fields than params[0]: missing {missing[:3]}, extra {extra[:3]}")
        for k in keys:
            a, b = renamed[0][k], p[k]
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                raise ValueError(
                    f"params[{i}][{k!r}] has shape={tuple(b.shape)} dtype={b.dtype} device={b.device}, params[0]'s "
                    f"has shape={tuple(a.shape)} dtype={a.dtype} device={a.device}"
                )
    return {k: torch.stack([p[k].detach() for p in renamed]) for k in keys}


def unstack_params(stacked: Mapping[str, Tensor], /, adapter_names: Sequence[str] | None = None) -> list[dict[str, Tensor]]:
    """The inverse of :func:`stack_params`: K dicts, member ``i`` keyed as ``adapter_names[i]`` when given.

    ``rotfunc.load_params(model, unstack_params(stacked, names)[i])`` writes member ``i`` into adapter
    ``names[i]``. The values are fresh tensors (clones), detached.
    """
    if not stacked:
        raise ValueError("stacked is empty")
    sizes = {k: v.shape[0] if v.dim() else None for k, v in stacked.items()}
    k0 = next(iter(sizes))
    if len(set(sizes.values())) != 1 or sizes[k0] is None:
        raise ValueError(f"stacked values must share a leading dim; got {dict(list(sizes.items())[:4])}")
    k = sizes[k0]
    if adapter_names is not None and (isinstance(adapter_names, str) or len(adapter_names) != k):
        raise ValueError(f"adapter_names={adapter_names!r} must be a sequence of {k} names (one per member)")
    out = [{key: v[i].detach().clone() for key, v in stacked.items()} for i in range(k)]
    if adapter_names is not None:
        out = [rename_params(p, n) for p, n in zip(out, adapter_names)]
    return out


def init_params(
    model: nn.Module, /, adapter_name: str | None = None, *, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Fresh params for adapter ``adapter_name`` (default: the active one), keyed like its :func:`adapter_params`.

    Each layer's params come from the adapter's config ``init`` (so ``init_weights=True`` gives the identity /
    zero init, ``False`` PEFT's random init), drawn from ``generator``, in the dtype and device of the params the
    model holds. An adapter-owned trainable bias starts as the model's current value. The model is unchanged:
    this is how to start K ensemble members from K seeds without attaching K adapters.
    """
    current = bind.adapter_params(model, adapter_name)
    name = adapter_name if adapter_name is not None else bind.active_adapter(model)
    out: dict[str, Tensor] = {}
    for path, w in bind.adapted_layers(model):
        if name not in w.slots:
            continue
        slot = w.slots[name]
        fields = slot.params_type._fields
        ref = getattr(slot, fields[0])
        fresh = w.configs[name].init(
            w.in_features, w.out_features, dtype=ref.dtype, device=ref.device, generator=generator
        )
        for field, v in zip(fields, fresh):
            out[f"{path}{_SEP}{name}.{field}"] = v
        if slot.own_bias() is not None:
            key = f"{path}{_SEP}{name}.{bind._BIAS}"
            out[key] = current[key]
    return {k: out[k] for k in current}


class EnsembleState(NamedTuple):
    """Adam's state for K stacked members (the optimizer state of :func:`ensemble_step`): a pytree."""

    step: Tensor  # shape=() (shared by the members), dtype=float32: steps taken so far
    m: dict[str, Tensor]  # first moments, like the stacked params: (K, *shape)
    v: dict[str, Tensor]  # second moments, like the stacked params


def ensemble_init(params: Mapping[str, Tensor], /) -> EnsembleState:
    """Zero Adam moments shaped like the stacked ``params`` and ``step = 0``."""
    zeros = {k: torch.zeros_like(p) for k, p in params.items()}
    device = next(iter(params.values())).device if params else None
    return EnsembleState(torch.zeros((), device=device), zeros, {k: z.clone() for k, z in zeros.items()})


def _adam_update(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: EnsembleState,
    /,
    *,
    lr: float | Tensor,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[dict[str, Tensor], EnsembleState]:
    """One Adam(W) step of one member, out of place, as ``torch.optim.AdamW`` (``rotfunc.adam``).

    Unlike :func:`rotfunc.adam` (a float learning rate closed over), ``lr`` may be a 0-d tensor: under ``vmap``,
    one learning rate per member. Pure and vmap-safe: no in-place writes, no ``.item()``.
    """
    step = state.step + 1
    c1 = 1 - torch.pow(torch.as_tensor(b1, dtype=step.dtype, device=step.device), step)
    c2 = 1 - torch.pow(torch.as_tensor(b2, dtype=step.dtype, device=step.device), step)
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        m = b1 * state.m[k] + (1 - b1) * g
        v = b2 * state.v[k] + (1 - b2) * g * g
        update = (m / c1) / ((v / c2).sqrt() + eps)
        if weight_decay:
            p = p * (1 - lr * weight_decay)
        new_p[k], new_m[k], new_v[k] = p - lr * update, m, v
    return new_p, EnsembleState(step, new_m, new_v)


def ensemble_step(
    loss_fn: Callable[..., Tensor],
    /,
    *,
    batch_in_dims: int | None | tuple = None,
    randomness: str = "error",
    **adam: Any,
) -> Callable:
    """K Adam training steps at once: the gradient of ``loss_fn`` and an Adam(W) update, vmapped over stacked
    params and optimizer state.

    Returns ``step(stacked_params, state, lr, *args) -> (stacked_params, state, losses)`` where ``state`` is
    :func:`ensemble_init` of the stacked params, ``lr`` a float (all members) or a (K,) tensor (one per member),
    and ``losses`` has shape (K,). Member ``i`` computes what ``rotfunc.value_and_grad(loss_fn)`` then
    ``rotfunc.adam(lr[i], ...).update`` compute on ``unstack_params(stacked_params)[i]`` (up to float summation
    order): the base model is read once per layer for all K members.

    Args:
        loss_fn: ``loss_fn(params, *args) -> scalar``, e.g. through ``torch.func.functional_call(model, params,
            ...)`` with the stacked params' adapter active.
        batch_in_dims: ``vmap`` in_dims for ``args``: None (default) gives every member the same data; 0 gives
            member ``i`` slice ``i`` of every arg (K data sources); a tuple sets it per arg.
        randomness: ``vmap``'s randomness flag ("error", "different", "same"): dropout in the model needs
            "different" (or "same").
        adam: Adam keywords ``b1``, ``b2``, ``eps``, ``weight_decay`` (as :func:`rotfunc.adam`).
    """
    unknown = sorted(set(adam) - {"b1", "b2", "eps", "weight_decay"})
    if unknown:
        raise TypeError(f"unknown Adam keyword(s) {unknown}; expected b1, b2, eps, weight_decay")
    value_and_grad = torch.func.grad_and_value(loss_fn)
    def step(params, state, lr, *args):
        if not isinstance(state, EnsembleState):
            raise TypeError(f"state must be an EnsembleState (ensemble_init of the stacked params), got {type(state).__name__}")
        lr_t = torch.as_tensor(lr)
        lr_dim = 0 if lr_t.dim() == 1 else None
        if lr_t.dim() > 1:
            raise ValueError(f"lr has shape={tuple(lr_t.shape)}, expected a float or a (K,) tensor")
        arg_dims = batch_in_dims if isinstance(batch_in_dims, tuple) else (batch_in_dims,) * len(args)
        if len(arg_dims) != len(args):
            raise ValueError(f"batch_in_dims={batch_in_dims!r} has {len(arg_dims)} entries for {len(args)} args")

        def member(p, m, v, lr_, *a):
            grads, loss = value_and_grad(p, *a)
            new_p, new_state = _adam_update(p, grads, EnsembleState(state.step, m, v), lr=lr_, **adam)
            return new_p, new_state.m, new_state.v, loss

        new_p, m, v, losses = torch.func.vmap(
            member, in_dims=(0, 0, 0, lr_dim, *arg_dims), randomness=randomness
        )(params, state.m, state.v, lr_t if lr_dim == 0 else lr, *args)
        return new_p, EnsembleState(state.step + 1, m, v), losses

    return step
