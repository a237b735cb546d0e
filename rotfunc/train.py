"""A functional training step that runs at autograd's speed: ``value_and_grad`` and pure optimizers.

``torch.func.grad`` wraps every op of the whole model in functorch's grad transform. On a real model that is
the cost of a step, not the adapters: measured on the nf4 MiniLM (RoAD), ``torch.func.grad(functional_call)``
took ~30 % more time and ~67 % more peak memory than plain autograd on the same model (PEFT_NOTES.md). The
interface users want is still functional (``loss(params, batch) -> grads``, params a pytree they own), so
:func:`value_and_grad` keeps that interface and picks the engine underneath:

* **eager path** (no ``torch.func`` transform is active around the call, and not inside ``torch.compile``
  tracing): the params' leaves are detached into fresh leaf tensors that require grad, ``loss_fn`` runs once
  under ``torch.enable_grad()``, and ``torch.autograd.grad`` returns the gradients. Nothing is written to any
  ``.grad`` attribute, the caller's tensors are not modified, and the returned loss and aux are detached, so no
  graph outlives the call. With ``compile=True`` this path calls ``torch.compile(loss_fn)`` instead of
  ``loss_fn``: inductor compiles the forward and (through AOTAutograd) the backward.
* **functorch path** (called inside ``torch.func.grad`` / ``vmap`` / ``jvp`` / ``jacrev`` ..., or while
  ``torch.compile`` traces it): ``torch.func.grad_and_value(loss_fn)``, so every composition keeps working
  (higher-order grads, per-sample grads under ``vmap``, forward-over-reverse). ``loss_fn`` is never the
  compiled one here (``torch.func.grad(torch.compile(f))`` is unsupported, pytorch#128711).

Both paths compute the same gradients (up to float round-off of the two engines' summation orders).

On a transformer, :func:`compile_blocks` compiles each repeated layer in place instead of the whole loss
(regional compilation): the autograd path then runs compiled layers, for a fraction of the compile time and of
the resident compiled state of ``compile=True``; the functorch path runs the same layers eagerly.

The optimizers are optax-shaped pure functions over the same pytree: ``opt = adam(1e-3)``,
``state = opt.init(params)``, ``params, state = opt.update(grads, state, params)``; each returns new tensors
(``torch._foreach_*`` out-of-place ops, one fused call per op over all leaves) and never writes into its
inputs.

Example::

    step = rotfunc.value_and_grad(loss_fn)            # loss_fn(params, batch) -> scalar
    opt = rotfunc.adam(1e-3)
    state = opt.init(params)
    for batch in batches:
        loss, grads = step(params, batch)
        params, state = opt.update(grads, state, params)
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

__all__ = [
    "value_and_grad", "uses_autograd", "compile_blocks", "uncompile_blocks", "Optimizer", "SGDState", "AdamState",
    "sgd", "adam",
]


def uses_autograd() -> bool:
    """True where :func:`value_and_grad` takes its eager autograd path: no ``torch.func`` transform is active
    around the call and ``torch.compile`` is not tracing it."""
    if torch.compiler.is_compiling():
        return False
    return not torch._C._are_functorch_transforms_active()


def _detach_tree(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def value_and_grad(
    loss_fn: Callable[..., Any], /, *, argnums: int = 0, has_aux: bool = False, compile: bool = False,
    **compile_options: Any,
) -> Callable[..., tuple[Any, Any]]:
    """``loss_fn``'s value and its gradient with respect to argument ``argnums`` (a pytree of tensors).

    Returns a function with ``loss_fn``'s signature that returns ``(loss, grads)`` — or ``((loss, aux), grads)``
    with ``has_aux`` (``loss_fn`` then returns ``(loss, aux)``), as ``jax.value_and_grad`` — where ``grads``
    has the structure of the differentiated argument (a dict keyed like ``adapter_params``, a ``RoadParams``, ...).

    Which engine runs (see the module docstring): plain autograd when no ``torch.func`` transform is active
    around the call and ``torch.compile`` is not tracing it (:func:`uses_autograd`), else
    ``torch.func.grad_and_value``. ``compile=True`` (with ``torch.compile`` keyword ``compile_options``, e.g.
    ``fullgraph=True``) compiles ``loss_fn`` for the autograd path only; the first call pays the compile.

    Args:
        loss_fn: ``f(*args, **kwargs) -> scalar tensor`` (or ``(scalar, aux)``), pure in its differentiated
            argument: it must not write into those tensors.
        argnums: the positional argument to differentiate (one argument; pack several into one pytree).
        has_aux: ``loss_fn`` returns ``(loss, aux)``; aux is returned detached, not differentiated.
        compile: compile ``loss_fn`` with ``torch.compile`` for the autograd path.

    Raises:
        ValueError: the loss is not a scalar (a one-element tensor), naming its shape.
    """
    if not isinstance(argnums, int):
        raise TypeError(f"argnums must be an int, got {argnums!r} (pack several arguments into one pytree)")
    functorch_step = torch.func.grad_and_value(loss_fn, argnums=argnums, has_aux=has_aux)
    eager_fn = torch.compile(loss_fn, **compile_options) if compile else loss_fn

    @functools.wraps(loss_fn)
    def step(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not -len(args) <= argnums < len(args):
            raise ValueError(f"argnums={argnums} but loss_fn was called with {len(args)} positional argument(s)")
        if not uses_autograd():
            grads, value = functorch_step(*args, **kwargs)
            return value, grads
        leaves, spec = pytree.tree_flatten(args[argnums])
        for i, t in enumerate(leaves):
            if not (isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())):
                what = type(t).__name__ if not isinstance(t, Tensor) else f"a tensor of dtype={t.dtype}"
                raise TypeError(f"leaf {i} of the differentiated argument is {what}; expected floating-point tensors")
        inputs = [t.detach().requires_grad_(True) for t in leaves]
        call = list(args)
        call[argnums] = pytree.tree_unflatten(inputs, spec)
        with torch.enable_grad():
            out = eager_fn(*call, **kwargs)
            loss, aux = out if has_aux else (out, None)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"loss_fn must return a scalar tensor, got shape={shape}")
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
            else:  # the loss does not depend on the params at all
                grads = tuple(torch.zeros_like(t) for t in inputs)
        value = loss.detach().reshape(loss.shape)
        grads_tree = pytree.tree_unflatten(list(grads), spec)
        return ((value, _detach_tree(aux)) if has_aux else value), grads_tree

    return step


# --------------------------------------------------------------------------------------- regional compilation


def _repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) for every child of an ``nn.ModuleList`` whose children (at least two) share one class: a
    transformer's layers (``encoder.layer.3``, ``model.layers.11``); outermost lists only."""
    out: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or len({type(c) for c in m}) != 1:
            continue
        if any(name.startswith(t + ".") for t in taken):
            continue
        taken.append(name)
        out.extend((f"{name}.{i}" if name else str(i), c) for i, c in enumerate(m))
    return out


def _is_compiled_forward(f: Any) -> bool:
    return getattr(f, "__func__", None) is _block_forward


def _block_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    from .bind import in_mixed_batch

    compiled, eager = self.__dict__["_rotfunc_compiled_forward"]
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling() or in_mixed_batch(self):
        return eager(self, *args, **kwargs)
    return compiled(self, *args, **kwargs)


def compile_blocks(model: nn.Module, /, **compile_options: Any) -> list[str]:
    """Compile each repeated block of ``model`` (each layer of a transformer) with ``torch.compile``, in place.

    Regional compilation: one compiled forward per block class, shared by every block of that class (the
    blocks' parameters are graph inputs, so the 6 or 30 layers reuse one graph), instead of one graph of the
    whole model. Compared with ``value_and_grad(compile=True)`` it compiles in a fraction of the time and keeps
    a fraction of the compiled state resident, while fusing the same elementwise work (the adapters' math,
    norms, activations); the embeddings, the head and the loss stay eager. Works with ``functional_call``
    (parameters swapped per call are graph inputs), with :func:`value_and_grad`'s autograd path and with
    adapters attached before or after (rotfunc's adapter state is guarded: ``set_adapter``, ``disable``,
    ``merge`` ... recompile once, then hit the cache).

    Where a ``torch.func`` transform is active around the call (``torch.func.grad``, ``vmap``, ``jvp``, the
    functorch path of :func:`value_and_grad`) or an outer ``torch.compile`` is tracing, each block runs its
    eager forward, so every composition keeps working; the compiled graphs serve the plain autograd path and
    inference. Mixed batches (``adapter_names=``) also run the eager blocks: their routing is per-call data,
    and a compiled block would recompile for every distinct list of names.

    Each adapter state the blocks run under (active adapter, enabled, merged) is one compiled variant, and
    Dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (8) variants per block class: raise it
    before switching among more states than that, or a ``fullgraph=True`` block raises at the next new one.

    Args:
        model: the model; blocks are the children of every outermost ``nn.ModuleList`` of at least two
            modules of one class.
        compile_options: ``torch.compile`` keyword arguments (``fullgraph=True``, ``mode=...``, ...).

    Returns:
        The names (as in ``named_modules()``) of the blocks now compiled; ``[]`` if the model has none.
        Calling it again recompiles with the new options. :func:`uncompile_blocks` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    blocks = _repeated_blocks(model)
    compiled: dict[type, Callable[..., Any]] = {}
    for _, block in blocks:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, **compile_options)
        block.__dict__["_rotfunc_compiled_forward"] = (compiled[cls], cls.forward)
        block.forward = types.MethodType(_block_forward, block)
    return [n for n, _ in blocks]


def uncompile_blocks(model: nn.Module, /) -> list[str]:
    """Undo :func:`compile_blocks`: every block runs its class's eager forward again. Returns their names."""
    names = []
    for name, m in model.named_modules():
        if _is_compiled_forward(m.__dict__.get("forward")):
            del m.__dict__["forward"]
            del m.__dict__["_rotfunc_compiled_forward"]
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------------- optimizers


class Optimizer(NamedTuple):
    """A pure optimizer over a params pytree (optax's ``GradientTransformation``, applying its own update).

    ``init(params) -> state``; ``update(grads, state, params) -> (new_params, new_state)``. Neither writes into
    its arguments.
    """

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]


class SGDState(NamedTuple):
    momentum: tuple[Tensor, ...]  # one buffer per params leaf, each of that leaf's shape and dtype; () without momentum


class AdamState(NamedTuple):
    count: Tensor  # shape=(), dtype=int64: steps taken
    mu: tuple[Tensor, ...]  # first moments, one per params leaf (leaf shape and dtype)
    nu: tuple[Tensor, ...]  # second moments, one per params leaf


def _leaves(tree: Any, what: str) -> tuple[list[Tensor], Any]:
    leaves, spec = pytree.tree_flatten(tree)
    if not all(isinstance(t, Tensor) for t in leaves):
        raise TypeError(f"{what} must be a pytree of tensors, got leaves {[type(t).__name__ for t in leaves]}")
    return leaves, spec


def _matching(grads: Any, params: Any) -> tuple[list[Tensor], list[Tensor], Any]:
    g, gspec = _leaves(grads, "grads")
    p, pspec = _leaves(params, "params")
    if gspec != pspec:
        raise ValueError(f"grads and params have different structures: {gspec} vs {pspec}")
    return g, p, pspec


def sgd(learning_rate: float, /, *, momentum: float = 0.0, weight_decay: float = 0.0) -> Optimizer:
    """Stochastic gradient descent, as ``torch.optim.SGD`` (dampening 0, no Nesterov):
    ``b = momentum * b + (g + wd * p)``; ``p = p - lr * b``."""
    if learning_rate < 0 or momentum < 0 or weight_decay < 0:
        raise ValueError(f"got learning_rate={learning_rate}, momentum={momentum}, weight_decay={weight_decay}; "
                         "expected non-negative values")

    def init(params: Any) -> SGDState:
        p, _ = _leaves(params, "params")
        return SGDState(tuple(torch.zeros_like(t) for t in p) if momentum else ())

    def update(grads: Any, state: SGDState, params: Any) -> tuple[Any, SGDState]:
        g, p, spec = _matching(grads, params)
        if weight_decay:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        if momentum:
            buf = torch._foreach_add(torch._foreach_mul(list(state.momentum), momentum), g)
            new_p = torch._foreach_add(p, buf, alpha=-learning_rate)
            return pytree.tree_unflatten(new_p, spec), SGDState(tuple(buf))
        return pytree.tree_unflatten(torch._foreach_add(p, g, alpha=-learning_rate), spec), state

    return Optimizer(init, update)


def adam(
    learning_rate: float, /, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
) -> Optimizer:
    """Adam (``weight_decay`` > 0: AdamW's decoupled decay), as ``torch.optim.Adam`` / ``AdamW``:
    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g²``, ``p = p(1 - lr wd) - lr m̂ / (sqrt(v̂) + eps)``."""
    if not (learning_rate >= 0 and 0 <= b1 < 1 and 0 <= b2 < 1 and eps >= 0 and weight_decay >= 0):
        raise ValueError(f"got learning_rate={learning_rate}, b1={b1}, b2={b2}, eps={eps}, "
                         f"weight_decay={weight_decay}; expected lr, eps, wd >= 0 and 0 <= b1, b2 < 1")

    def init(params: Any) -> AdamState:
        p, _ = _leaves(params, "params")
        zeros = tuple(torch.zeros_like(t) for t in p)
        return AdamState(torch.zeros((), dtype=torch.int64), zeros, tuple(torch.zeros_like(t) for t in p))

    def update(grads: Any, state: AdamState, params: Any) -> tuple[Any, AdamState]:
        g, p, spec = _matching(grads, params)
        count = state.count + 1
        t = float(count)  # host value: the step count lives on the CPU (optax keeps it as a scalar too)
        mu = torch._foreach_lerp(list(state.mu), g, 1 - b1)
        nu = torch._foreach_add(torch._foreach_mul(list(state.nu), b2), torch._foreach_mul(g, g), alpha=1 - b2)
        step_size = learning_rate / (1 - b1**t)
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(nu), (1 - b2**t) ** 0.5), eps)
        base = torch._foreach_mul(p, 1 - learning_rate * weight_decay) if weight_decay else p
        new_p = torch._foreach_addcdiv(base, mu, denom, value=-step_size)
        return pytree.tree_unflatten(new_p, spec), AdamState(count, tuple(mu), tuple(nu))

    return Optimizer(init, update)
