"""RoAD: 2D rotary adaptation of a layer's output, as pure functions.

RoAD (Liao & Monz, "3-in-1: 2D Rotary Adaptation for Efficient Finetuning, Efficient Batching and
Composability", NeurIPS 2024, arXiv:2409.00119; PEFT's ``tuners/road``) multiplies the output of a linear
layer by a block-structured matrix ``R``: ``y = R (W x + b)``. The output features are cut into groups of
``group_size``; inside a group, element ``i`` (first half) is paired with element ``j = i + group_size/2``
(second half), and each pair is mixed by a scaled 2D rotation

.. code-block:: text

    [y_i]   [f_i  -s_i] [x_i]        f = alpha * cos(theta)
    [y_j] = [s_j   f_j] [x_j]        s = alpha * sin(theta)

The variants differ only in how ``f`` and ``s`` are tied (shapes as PEFT's ``road_theta``/``road_alpha``):

- ``road_1``: ``theta, alpha`` of shape ``(out/2,)``; a pair shares one angle and one scale (f_i = f_j,
  s_i = s_j), so the block is ``alpha`` times a rotation and ``det = alpha^2``.
- ``road_2``: shape ``(out,)``; one angle and scale per element, ``det = alpha_i alpha_j cos(theta_i -
  theta_j)``, which is 0 when the two angles differ by pi/2 (mod pi) even with nonzero scales.
- ``road_4``: shape ``(2*out,)`` viewed as ``(out/group_size, 2, group_size)``: ``[:, 0]`` gives the cosine
  angle and scale (``f``), ``[:, 1]`` the sine angle and scale (``s``); ``det = f_i f_j + s_i s_j``.

Since ``R`` acts on the output elementwise, merging is ``W' = R W`` and ``b' = R b``; this module does both
row-pair by row-pair (O(out * in) work and memory, ``R`` is never built) and unmerges with the closed-form
inverse of each 2x2 block, ``[[f_j, s_i], [-s_j, f_i]] / det``, refusing blocks too close to singular for
the working dtype instead of returning inf/NaN.

Scales and angles are turned into the per-pair mixing coefficients in at least float32 (float64 for float64
params) and then cast to the working dtype, so bfloat16/float16 results are as close to the exact math as
that dtype allows (PEFT computes them in the params' dtype).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import torch
from torch import Tensor

from ._checks import check_choice, check_same_dtype_device, check_shape, plain_eager
from ._memory import fresh_like, writes_out
from .adapter import peft_dict, peft_kwargs, register

__all__ = [
    "VARIANTS",
    "RoadParams",
    "road_init",
    "apply_road",
    "road_matrix",
    "road_merge",
    "road_unmerge",
    "RoadConfig",
]

VARIANTS: tuple[str, ...] = ("road_1", "road_2", "road_4")


class RoadParams(NamedTuple):
    """RoAD's trainable params for one layer: PEFT's ``road_theta`` and ``road_alpha``.

    Both have the same shape and dtype: ``(out/2,)`` for road_1, ``(out,)`` for road_2, ``(2*out,)`` for
    road_4 (layout ``(out/group_size, 2, group_size)``, see the module docstring).
    """

    theta: Tensor  # shape=(n,), angles in radians; identity init 0
    alpha: Tensor  # shape=(n,), scales; identity init 1


# ----------------------------------------------------------------------------------------------- helpers


def _check_group_size(group_size: Any, /) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got group_size={group_size!r} ({type(group_size).__name__})")
    if group_size <= 0 or group_size % 2 != 0:
        raise ValueError(
            f"group_size={group_size} must be a positive even integer (RoAD pairs element i with i + group_size/2)"
        )


def _check_statics(variant: Any, group_size: Any, out_features: int, /) -> None:
    check_choice("variant", variant, VARIANTS)
    _check_group_size(group_size)
    if out_features % group_size != 0:
        raise ValueError(f"out_features={out_features} is not divisible by group_size={group_size}")


def _param_size(variant: str, out_features: int, /) -> int:
    return {"road_1": out_features // 2, "road_2": out_features, "road_4": 2 * out_features}[variant]


def _out_features_of(params: RoadParams, variant: str, /) -> int:
    """out_features implied by the params' length (road_matrix has no other source)."""
    check_choice("variant", variant, VARIANTS)
    theta = params.theta
    if not isinstance(theta, Tensor):
        raise TypeError(f"params.theta must be a torch.Tensor, got {type(theta).__name__}")
    if theta.dim() != 1:
        raise ValueError(f"params.theta has shape={tuple(theta.shape)}, expected a 1-D tensor")
    n = theta.shape[0]
    if variant == "road_4" and n % 2 != 0:
        raise ValueError(f"params.theta has shape={(n,)}, which is not (2*out_features,) as variant='road_4' needs")
    return {"road_1": 2 * n, "road_2": n, "road_4": n // 2}[variant]


def _check_params(params: Any, variant: str, out_features: int, /) -> None:
    if not (isinstance(params, tuple) and len(params) == 2):
        raise TypeError(f"params must be a RoadParams(theta, alpha), got {type(params).__name__}")
    theta, alpha = params
    expected = (_param_size(variant, out_features),)
    why = f"variant={variant!r}, out_features={out_features}"
    check_shape("params.theta", theta, expected, why=why)
    check_shape("params.alpha", alpha, expected, why=why)
    if not theta.is_floating_point():
        raise TypeError(f"params.theta.dtype={theta.dtype} is not a floating-point dtype")
    check_same_dtype_device("params.theta", theta, "params.alpha", alpha)


def _check_float(name: str, t: Any, /) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}.dtype={t.dtype} is not a floating-point dtype")


def _compute_dtype(dtype: torch.dtype, /) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _cols(
    params: RoadParams, /, *, variant: str, group_size: int, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(f_i, s_i, f_j, s_j), each "groups half" = (out/group_size, group_size/2), in ``dtype`` (default: at
    least float32).

    ``i`` runs over the first half of each group, ``j = i + group_size/2`` over the second half.
    """
    dt = _compute_dtype(params.theta.dtype) if dtype is None else dtype
    theta, alpha = params.theta.to(dt), params.alpha.to(dt)
    h = group_size // 2
    if variant == "road_1":
        theta, alpha = theta.unflatten(-1, (-1, h)), alpha.unflatten(-1, (-1, h))
        f, s = alpha * theta.cos(), alpha * theta.sin()
        return f, s, f, s
    if variant == "road_2":
        theta, alpha = theta.unflatten(-1, (-1, 2, h)), alpha.unflatten(-1, (-1, 2, h))
        f, s = alpha * theta.cos(), alpha * theta.sin()
    else:  # road_4: (groups, 2, group_size); [:, 0] -> cos part, [:, 1] -> sin part
        theta, alpha = theta.unflatten(-1, (-1, 2, group_size)), alpha.unflatten(-1, (-1, 2, group_size))
        f = (alpha[..., 0, :] * theta[..., 0, :].cos()).unflatten(-1, (2, h))
        s = (alpha[..., 1, :] * theta[..., 1, :].sin()).unflatten(-1, (2, h))
    return f[..., 0, :], s[..., 0, :], f[..., 1, :], s[..., 1, :]


def _forward_pq(fi: Tensor, si: Tensor, fj: Tensor, sj: Tensor, /) -> tuple[Tensor, Tensor]:
    """(p, q), each (groups, 2, half), such that ``out = p * x + q * swap(x)`` elementwise, where ``swap``
    exchanges the two halves of every group: out_i = f_i x_i - s_i x_j, out_j = f_j x_j + s_j x_i."""
    return torch.stack((fi, fj), dim=-2), torch.stack((-si, sj), dim=-2)


@torch.library.custom_op("rotfunc::road_pq", mutates_args=())
def _road_pq_op(theta: Tensor, alpha: Tensor, variant: str, group_size: int) -> tuple[Tensor, Tensor]:
    """:func:`_forward_pq` of the params, as one opaque op for compiled graphs (see :func:`_pq`)."""
    return _forward_pq(*_cols(RoadParams(theta, alpha), variant=variant, group_size=group_size))


@_road_pq_op.register_fake
def _(theta: Tensor, alpha: Tensor, variant: str, group_size: int) -> tuple[Tensor, Tensor]:
    shape, dt = _pq_shape(theta, variant, group_size), _compute_dtype(theta.dtype)
    return theta.new_empty(shape, dtype=dt), theta.new_empty(shape, dtype=dt)


def _pq_shape(theta: Tensor, variant: str, group_size: int, /) -> tuple[int, ...]:
    """The shape of p and q, (*batch, groups, 2, half), for params ``theta`` of shape (*batch, n)."""
    n = theta.shape[-1]
    out_features = {"road_1": 2 * n, "road_2": n, "road_4": n // 2}[variant]
    return (*theta.shape[:-1], out_features // group_size, 2, group_size // 2)


@torch.library.custom_op("rotfunc::road_pq_backward", mutates_args=())
def _road_pq_backward_op(
    theta: Tensor, alpha: Tensor, grad_p: Tensor, grad_q: Tensor, variant: str, group_size: int
) -> tuple[Tensor, Tensor]:
    """The gradients of :func:`_road_pq_op` with respect to ``theta`` and ``alpha``, in closed form: with
    ``f = alpha cos(theta)`` and ``s = alpha sin(theta)``, ``df = -s dtheta + cos dalpha`` and ``ds = f dtheta
    + sin dalpha``; ``p = (f_i, f_j)`` and ``q = (-s_i, s_j)`` per group (:func:`_forward_pq`)."""
    dt = _compute_dtype(theta.dtype)
    t, a = theta.to(dt), alpha.to(dt)
    g_s = torch.stack((-grad_q[..., 0, :], grad_q[..., 1, :]), dim=-2)  # d/d(s_i, s_j)
    if variant == "road_1":  # one (theta, alpha) per pair: f_i = f_j, s_i = s_j
        g_f, g_s = grad_p.sum(-2).flatten(-2), g_s.sum(-2).flatten(-2)
        c, s = t.cos(), t.sin()
        g_t, g_a = a * (g_s * c - g_f * s), g_f * c + g_s * s
    elif variant == "road_2":  # one per element, laid out as p and q
        c, s = t.cos(), t.sin()
        g_f, g_s = grad_p.flatten(-3), g_s.flatten(-3)
        g_t, g_a = a * (g_s * c - g_f * s), g_f * c + g_s * s
    else:  # road_4: (groups, 2, group_size), [:, 0] the cosine part, [:, 1] the sine part
        t4, a4 = t.unflatten(-1, (-1, 2, group_size)), a.unflatten(-1, (-1, 2, group_size))
        g_f, g_s = grad_p.flatten(-2), g_s.flatten(-2)  # (groups, group_size)
        c0, s0, c1, s1 = t4[..., 0, :].cos(), t4[..., 0, :].sin(), t4[..., 1, :].cos(), t4[..., 1, :].sin()
        g_t = torch.stack((-a4[..., 0, :] * s0 * g_f, a4[..., 1, :] * c1 * g_s), dim=-2).flatten(-3)
        g_a = torch.stack((c0 * g_f, s1 * g_s), dim=-2).flatten(-3)
    return g_t.to(theta.dtype), g_a.to(alpha.dtype)


@_road_pq_backward_op.register_fake
def _(theta, alpha, grad_p, grad_q, variant, group_size):
    return torch.empty_like(theta), torch.empty_like(alpha)


def _road_pq_setup_context(ctx, inputs, output):
    theta, alpha, ctx.variant, ctx.group_size = inputs
    ctx.save_for_backward(theta, alpha)


def _road_pq_backward(ctx, grad_p, grad_q):
    theta, alpha = ctx.saved_tensors
    shape, dt = _pq_shape(theta, ctx.variant, ctx.group_size), _compute_dtype(theta.dtype)
    grad_p = theta.new_zeros(shape, dtype=dt) if grad_p is None else grad_p
    grad_q = theta.new_zeros(shape, dtype=dt) if grad_q is None else grad_q
    gt, ga = torch.ops.rotfunc.road_pq_backward(theta, alpha, grad_p, grad_q, ctx.variant, ctx.group_size)
    return gt, ga, None, None


_road_pq_op.register_autograd(_road_pq_backward, setup_context=_road_pq_setup_context)


def _batched(info, in_dims, tensors):
    """``tensors`` with their vmapped dim moved to the front (broadcast where it has none)."""
    return [t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape) for t, d in zip(tensors, in_dims)]


@_road_pq_op.register_vmap
def _(info, in_dims, theta, alpha, variant, group_size):
    theta, alpha = _batched(info, in_dims[:2], (theta, alpha))
    return torch.ops.rotfunc.road_pq(theta, alpha, variant, group_size), (0, 0)


@_road_pq_backward_op.register_vmap
def _(info, in_dims, theta, alpha, grad_p, grad_q, variant, group_size):
    theta, alpha, grad_p, grad_q = _batched(info, in_dims[:4], (theta, alpha, grad_p, grad_q))
    return torch.ops.rotfunc.road_pq_backward(theta, alpha, grad_p, grad_q, variant, group_size), (0, 0)


def _pq(params: RoadParams, /, *, variant: str, group_size: int) -> tuple[Tensor, Tensor]:
    """(p, q) of :func:`_forward_pq`. While ``torch.compile`` traces, one opaque op computes them: written as
    plain ops, inductor inlines ``alpha * cos(theta)`` into the elementwise kernel over the whole output and
    evaluates a cosine and a sine per output element (per row of the batch) instead of once per feature; on the
    nf4 MiniLM that made RoAD's fused kernels ~3x the cost of the layer's own GELU/LayerNorm kernels."""
    if _compiling_plain():
        return torch.ops.rotfunc.road_pq(params.theta, params.alpha, variant, group_size)
    return _forward_pq(*_cols(params, variant=variant, group_size=group_size))


def _inverse_pq(fi: Tensor, si: Tensor, fj: Tensor, sj: Tensor, det: Tensor, /) -> tuple[Tensor, Tensor]:
    """(p, q) as in :func:`_forward_pq` for the inverse blocks [[f_j, s_i], [-s_j, f_i]] / det."""
    r = det.reciprocal().unsqueeze(-2)
    return torch.stack((fj, fi), dim=-2) * r, torch.stack((si, -sj), dim=-2) * r


def _mix_last(p: Tensor, q: Tensor, y: Tensor, /, *, group_size: int) -> Tensor:
    """``p * y + q * swap(y)`` over the last dim of ``y`` ("*batch out"), out of place.

    Eager inference (no grad needed, no torch.func wrapper, not compiling): ``p * y`` and then each half's
    ``addcmul_`` with the other half of ``y``, so no swapped copy of ``y`` is made (one full-size pass less;
    the same elementwise operations, so the same values bitwise).
    """
    y4 = y.unflatten(-1, (-1, 2, group_size // 2))
    needs_grad = torch.is_grad_enabled() and (p.requires_grad or q.requires_grad or y.requires_grad)
    if not needs_grad and plain_eager(p, q, y):
        return _mix_halves(y4, p, q, swapped=False).flatten(-3)
    if needs_grad and (plain_eager(p, q, y) or _compiling_plain()):
        return _RoadMix.apply(p, q, y, group_size)
    swapped = torch.stack((y4[..., 1, :], y4[..., 0, :]), dim=-2).flatten(-3)
    return torch.addcmul(y * p.flatten(-3), swapped, q.flatten(-3))


def _compiling_plain() -> bool:
    """True while ``torch.compile`` traces outside any ``torch.func`` transform."""
    return torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


class _RoadMix(torch.autograd.Function):
    """:func:`_mix_last` for plain autograd and compiled graphs, with its backward written out: only ``y`` (and
    the small ``p``, ``q``) is saved, not a swapped copy (:func:`_swap`); the backward is ``dy = p g + swap(q g)``,
    ``dp = sum(y g)``, ``dq = sum(swap(y) g)`` over the batch dims, instead of autograd replaying the generic
    form's stack, products and addcmul (and keeping the swapped copy alive until the backward). Differentiable
    again (its backward is made of differentiable ops), so ``create_graph`` works; ``torch.func`` transforms take
    the plain ops instead.

    Measured on the nf4 MiniLM training step (AMD EPYC, 1 thread, against PEFT's eager step in the same process):
    plain autograd 1.00x -> 0.92-0.94x PEFT, ``compile_blocks`` 0.84x -> 0.79x."""

    @staticmethod
    def forward(p: Tensor, q: Tensor, y: Tensor, group_size: int) -> Tensor:
        return _mix_halves(y.unflatten(-1, (-1, 2, group_size // 2)), p, q, swapped=False).flatten(-3)

    @staticmethod
    def setup_context(ctx, inputs, output):
        p, q, y, ctx.group_size = inputs
        ctx.save_for_backward(p, q, y)

    @staticmethod
    def backward(ctx, g: Tensor):
        p, q, y = ctx.saved_tensors
        g4 = g.unflatten(-1, (-1, 2, ctx.group_size // 2))
        y4 = y.unflatten(-1, (-1, 2, ctx.group_size // 2))
        gp = gq = gy = None
        if ctx.needs_input_grad[0]:
            gp = (y4 * g4).sum_to_size(p.shape)
        if ctx.needs_input_grad[1]:
            if torch.compiler.is_compiling():
                gq = (_swap(y4) * g4).sum_to_size(q.shape)
            else:  # swap(y) * g half by half: no swapped copy of y
                q0, q1 = q[..., 0, :], q[..., 1, :]
                gq = torch.stack(
                    ((y4[..., 1, :] * g4[..., 0, :]).sum_to_size(q0.shape),
                     (y4[..., 0, :] * g4[..., 1, :]).sum_to_size(q1.shape)), dim=-2)
        if ctx.needs_input_grad[2]:
            gy = _mix_halves(g4, p, q, swapped=True).flatten(-3)
        return gp, gq, gy, None


def _mix_halves(t4: Tensor, p: Tensor, q: Tensor, /, *, swapped: bool) -> Tensor:
    """``t4 * p + swap(t4) * q`` (``swapped=False``) or ``t4 * p + swap(t4 * q)`` (``swapped=True``) over
    "... 2 half" views. Eagerly: one product into a fresh tensor, then each half's ``addcmul_`` with the other half
    of ``t4`` -- three passes over memory and one allocation, where the generic form makes a swapped copy
    (``flip``) and two more full-size temporaries. While compiling: the generic form, one fused kernel reading the
    swap (:func:`_swap`) in place."""
    if torch.compiler.is_compiling():
        return t4 * p + (_swap(t4 * q) if swapped else _swap(t4) * q)
    out = t4 * p
    for i in (0, 1):  # half i takes the other half of t4, times q's other half (swapped) or its own half
        out[..., i, :].addcmul_(t4[..., 1 - i, :], q[..., 1 - i if swapped else i, :])
    return out


def _swap(t4: Tensor, /) -> Tensor:
    """``t4`` ("... 2 half") with its two halves exchanged, for compiled graphs (eager code mixes half by half
    instead, :func:`_mix_halves`): a ``where`` between the two broadcast halves, which AOTAutograd may recompute
    in the backward (``flip`` is not on its list of recomputable ops, so it would save a swapped copy of every
    layer's output) and inductor reads in place inside the fused kernel."""
    first = torch.arange(2, device=t4.device).unsqueeze(-1) == 0
    return torch.where(first, t4[..., 1:, :], t4[..., :1, :])


# bytes of rows one in-place merge step reads: the step's rows of the weight, of the backup and the products
# stay in the 1 MiB L2 of a core while they are mixed (one pass over memory per tensor)
_CHUNK_BYTES = 1 << 19


def _pieces(t: Tensor, row_bytes: int, /) -> tuple[Tensor, ...]:
    """Views cutting ``t`` ("groups 2 half x") into pieces of ~``_CHUNK_BYTES`` of rows (``row_bytes`` each), made
    by one ``split`` (Python-level indexing per piece costs ~10 us a view): whole groups when a group is smaller
    (the last piece may hold fewer), else each group's row pairs cut into ``half / k`` pieces of k pairs (k the
    largest divisor of ``half`` that fits; such a piece has no group dim)."""
    half = t.shape[-2]
    pairs = max(1, _CHUNK_BYTES // (2 * row_bytes))
    if pairs >= half:
        return t.split(max(1, pairs // half), dim=0)
    k = max(d for d in range(1, pairs + 1) if half % d == 0)
    return tuple(piece for group in t.unflatten(-2, (half // k, k)).unbind(0) for piece in group.unbind(1))


def _mix_rows(
    p: Tensor, q: Tensor, w: Tensor, /, *, group_size: int, out: Tensor | None = None, backup: Tensor | None = None
) -> Tensor:
    """The pair mixing of :func:`_mix_last` on the rows of ``w`` ("out in"): one fresh (out, in) tensor, or
    written into ``out`` (a contiguous tensor of ``w``'s shape and dtype that does not overlap ``w``; eager,
    no autograd) with no full-size temporary at all, or with ``backup`` in place (``out`` is ``w``): each piece
    of rows is copied into the same rows of ``backup`` and mixed from there back into ``w``, so ``backup`` ends
    up holding the original weight, in one pass over ``w``. If that loop is interrupted, the rows done so far
    are copied back (``w`` is left as it was).

    Out of place eagerly without autograd (:func:`~rotfunc._memory.writes_out`), the result goes piece by piece
    into a fresh huge-page buffer as with ``out`` (at 4096x4096: 47 -> 27 ms, 2 threads). Otherwise, eagerly,
    the accumulation is written into the product this function has just made (it saves a
    full-size temporary: ~20-30 ms at 4096x4096 here), which plain autograd handles. Under torch.func
    transforms (``addcmul_`` has no batching rule) and torch.compile it is done out of place.
    """
    # out rows of the first half = p_i W_i + q_i W_j, of the second half = q_j W_i + p_j W_j
    c0 = torch.stack((p[..., 0, :], q[..., 1, :]), dim=-2).unsqueeze(-1)  # multiplies W_i (first half)
    c1 = torch.stack((q[..., 0, :], p[..., 1, :]), dim=-2).unsqueeze(-1)  # multiplies W_j (second half)
    h = group_size // 2
    w4 = w.unflatten(-2, (-1, 2, h))
    if out is None and w.dim() == 2 and writes_out(c0, c1, w):  # no autograd: piece by piece into a fresh buffer
        out = fresh_like(w)
    if out is not None:
        # a piece of rows at a time, so that addcmul_ finds the rows mul has just written still in cache: one
        # pass over memory instead of two (bitwise the same values as the whole-tensor form)
        o4 = out.unflatten(-2, (-1, 2, h))
        src4 = w4 if backup is None else backup.unflatten(-2, (-1, 2, h))
        row_bytes = w.shape[-1] * w.element_size()
        outs, srcs = _pieces(o4, row_bytes), _pieces(src4, row_bytes)
        tops, bottoms = _pieces(src4[:, 0:1], row_bytes), _pieces(src4[:, 1:2], row_bytes)
        c0s, c1s = _pieces(c0, row_bytes), _pieces(c1, row_bytes)
        saved = 0  # pieces copied into backup so far
        try:
            for o, src, top, bottom, a, b in zip(outs, srcs, tops, bottoms, c0s, c1s):
                if backup is not None:
                    src.copy_(o)
                    saved += 1
                torch.mul(a, top, out=o)
                o.addcmul_(b, bottom)
        except BaseException:
            for o, src in zip(outs[:saved], srcs[:saved]):  # put back what was overwritten (the rest is untouched)
                o.copy_(src)
            raise
        return out
    top, bottom = w4[..., 0:1, :, :], w4[..., 1:2, :, :]
    if plain_eager(c0, c1, w):
        out = (c0 * top).addcmul_(c1, bottom)
    else:
        out = torch.addcmul(c0 * top, c1, bottom)
    return out.flatten(-4, -2)


def _check_invertible(fi: Tensor, si: Tensor, fj: Tensor, sj: Tensor, det: Tensor, dtype: torch.dtype, /) -> None:
    """ValueError naming the first block whose inverse is meaningless in ``dtype`` (|det| <= eps ||B||_F^2).

    ``||B||_F^2 / |det| = sigma_max/sigma_min + sigma_min/sigma_max`` bounds the block's condition number,
    so this refuses blocks whose condition number reaches ~1/eps, as well as zero or non-finite ones.
    """
    fro2 = fi * fi + si * si + fj * fj + sj * sj
    eps = torch.finfo(dtype).eps
    bad = ~(det.abs() > eps * fro2)  # also true for NaN/inf
    try:
        any_bad = bool(bad.any())
    except RuntimeError as e:  # vmap cannot branch on values
        raise RuntimeError(
            "road_unmerge(check=True) reads the blocks' determinants, which torch.func.vmap cannot do: pass "
            "check=False under vmap (near-singular blocks then give inf/NaN instead of an error)"
        ) from e
    if any_bad:
        h = det.shape[-1]
        flat = bad.flatten().nonzero()
        first = int(flat[0, 0])
        g, k = divmod(first, h)
        i, j = g * 2 * h + k, g * 2 * h + k + h
        d = float(det.flatten()[first])
        raise ValueError(
            f"cannot unmerge: the 2x2 RoAD block of group {g}, pair {k} (rows {i} and {j}) has determinant "
            f"det={d:.6g}, too close to singular to invert in {dtype} (|det| <= eps * ||block||_F^2 = "
            f"{eps * float(fro2.flatten()[first]):.3g}); {int(flat.shape[0])} of {bad.numel()} blocks are. "
            "For road_2/road_4 a block is singular when its two angles differ by pi/2 (mod pi) or a scale is 0."
        )


def _merge(
    params: RoadParams, weight: Tensor, bias: Tensor | None, /, *, variant: str, group_size: int,
    out: Tensor | None = None, backup: Tensor | None = None,
):
    """road_merge without the same-dtype check (coefficients cast to the weight's dtype, as PEFT casts R)."""
    p, q = _forward_pq(*_cols(params, variant=variant, group_size=group_size))
    return _apply_rows(p, q, weight, bias, group_size=group_size, out=out, backup=backup)


def _apply_rows(
    p: Tensor, q: Tensor, weight: Tensor, bias: Tensor | None, /, *, group_size: int, out: Tensor | None = None,
    backup: Tensor | None = None,
):
    # the bias first: once an in-place merge (``backup``) has written the weight, nothing else may fail
    new_b = None if bias is None else _mix_last(p.to(bias.dtype), q.to(bias.dtype), bias, group_size=group_size)
    new_w = _mix_rows(p.to(weight.dtype), q.to(weight.dtype), weight, group_size=group_size, out=out, backup=backup)
    return new_w, new_b


def _unmerge(
    params: RoadParams, weight: Tensor, bias: Tensor | None, /, *, variant: str, group_size: int, check: bool
):
    # f_i f_j + s_i s_j cancels for ill-conditioned blocks: form it and the inverse coefficients in float64
    # (O(out) work) so that the only rounding left is that of the working dtype
    dt = torch.float32 if params.theta.device.type == "mps" else torch.float64
    fi, si, fj, sj = _cols(params, variant=variant, group_size=group_size, dtype=dt)
    det = fi * fj + si * sj
    if check:
        dtypes = [weight.dtype] if bias is None else [weight.dtype, bias.dtype]
        coarsest = max(dtypes, key=lambda d: torch.finfo(d).eps)
        _check_invertible(fi, si, fj, sj, det, coarsest)
    p, q = _inverse_pq(fi, si, fj, sj, det)
    return _apply_rows(p, q, weight, bias, group_size=group_size)


def _check_merge_inputs(params: Any, weight: Any, bias: Any, variant: Any, group_size: Any, /) -> None:
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight has shape={tuple(weight.shape)}, expected a 2-D (out_features, in_features) tensor")
    out_features = weight.shape[0]
    _check_statics(variant, group_size, out_features)
    _check_params(params, variant, out_features)
    if bias is not None:
        _check_float("bias", bias)
        check_shape("bias", bias, (out_features,), why=f"weight has shape={tuple(weight.shape)}")


def _check_same_device(params: RoadParams, weight: Tensor, bias: Tensor | None, /) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != params.theta.device:
            raise ValueError(
                f"params.theta.device={params.theta.device} differs from {name}.device={t.device}; move one of them"
            )


# -------------------------------------------------------------------------------------------------- init


def road_init(
    out_features: int,
    /,
    *,
    variant: str,
    group_size: int,
    init_weights: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> RoadParams:
    """Fresh RoAD params for a layer with ``out_features`` outputs, with PEFT's shapes and init.

    Args:
        out_features: the adapted layer's output size; must be divisible by ``group_size``.
        variant: ``"road_1"``, ``"road_2"`` or ``"road_4"``.
        group_size: a positive even integer dividing ``out_features``.
        init_weights: True (PEFT's default) gives the identity, theta = 0 and alpha = 1. False gives PEFT's
            random init theta ~ N(0, 0.5), alpha ~ N(1, 0.5) (std 0.5), drawn in that order from ``generator``
            in the default dtype and then cast, so ``generator=None`` after ``torch.manual_seed(s)`` reproduces
            PEFT's draw.
        generator: the source of randomness for ``init_weights=False``.
        dtype: floating dtype of the params (default: ``torch.get_default_dtype()``).
        device: device of the params.

    Returns:
        ``RoadParams(theta, alpha)``, each of shape ``(out/2,)``, ``(out,)`` or ``(2*out,)`` for road_1/2/4.

    Examples:
        >>> p = road_init(8, variant="road_2", group_size=4)
        >>> p.theta.shape, bool((p.alpha == 1).all())
        (torch.Size([8]), True)
    """
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features <= 0:
        raise ValueError(f"out_features={out_features!r} must be a positive int")
    _check_statics(variant, group_size, out_features)
    if not isinstance(init_weights, bool):
        raise TypeError(f"init_weights={init_weights!r} must be a bool")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype} is not a floating-point dtype")
    n = _param_size(variant, out_features)
    if init_weights:
        return RoadParams(torch.zeros(n, dtype=dtype, device=device), torch.ones(n, dtype=dtype, device=device))
    draw = dict(size=(n,), generator=generator, dtype=torch.get_default_dtype(), device=device)
    theta = torch.normal(0.0, 0.5, **draw)
    alpha = torch.normal(1.0, 0.5, **draw)
    return RoadParams(theta.to(dtype), alpha.to(dtype))


# ------------------------------------------------------------------------------------------------- apply


def apply_road(params: RoadParams, y: Tensor, /, *, variant: str, group_size: int) -> Tensor:
    """Rotate-and-scale the last dim of ``y``: ``R y`` without building ``R``.

    Equals PEFT's ``peft.tuners.road.layer._apply_road(variant, group_size, theta, alpha, y)``.

    Args:
        params: ``RoadParams`` with the same dtype and device as ``y``.
        y: "*batch out", e.g. the output of the base layer.
        variant: ``"road_1"``, ``"road_2"`` or ``"road_4"``.
        group_size: a positive even integer dividing ``out``.

    Returns:
        "*batch out", same dtype as ``y``.

    Examples:
        >>> p = road_init(4, variant="road_1", group_size=4)
        >>> apply_road(p, torch.arange(4.0), variant="road_1", group_size=4)
        tensor([0., 1., 2., 3.])
    """
    _check_float("y", y)
    if y.dim() < 1:
        raise ValueError(f"y has shape={tuple(y.shape)}, expected at least one dim (*batch out)")
    out_features = y.shape[-1]
    _check_statics(variant, group_size, out_features)
    _check_params(params, variant, out_features)
    check_same_dtype_device("params.theta", params.theta, "y", y)
    p, q = _pq(params, variant=variant, group_size=group_size)
    return _mix_last(p.to(y.dtype), q.to(y.dtype), y, group_size=group_size)


# ------------------------------------------------------------------------------------------------ matrix


def road_matrix(params: RoadParams, /, *, variant: str, group_size: int) -> Tensor:
    """The dense ``(out, out)`` matrix ``R`` (PEFT's ``_get_delta_weight``): for reference and tests only.

    ``out`` is read off the params' length (``2n``, ``n`` or ``n/2`` for road_1/2/4).

    Returns:
        "out out", in the params' dtype, with ``apply_road(params, y) == y @ R.T``.
    """
    out_features = _out_features_of(params, variant)
    _check_statics(variant, group_size, out_features)
    _check_params(params, variant, out_features)
    eye = torch.eye(out_features, dtype=params.theta.dtype, device=params.theta.device)
    return _merge(params, eye, None, variant=variant, group_size=group_size)[0]


# ------------------------------------------------------------------------------------------------- merge


def road_merge(
    params: RoadParams, weight: Tensor, bias: Tensor | None = None, /, *, variant: str, group_size: int,
    out: Tensor | None = None, backup: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Fold RoAD into a linear layer: ``(R W, R b)`` with O(out * in) work, never building ``R``.

    ``F.linear(x, W', b') == apply_road(params, F.linear(x, W, b))``. Inputs are not modified.

    Args:
        params: ``RoadParams`` with the weight's dtype and device.
        weight: "out in".
        bias: "out" or None.
        variant, group_size: as in :func:`apply_road`.
        out: optional preallocated "out in" tensor (``weight``'s dtype and device, contiguous, not overlapping
            ``weight``) that receives ``W'`` without any full-size temporary; it is returned as ``W'``. Eager only
            (an in-place write: not under ``torch.func`` transforms or autograd).
        backup: with ``out=weight``, a merge in place: a contiguous tensor of ``weight``'s shape, dtype and device,
            not overlapping it, that receives the original weight while ``W'`` is written over it, in one pass
            (each piece of rows is saved, then mixed from the saved copy while it is in cache). ``weight`` must be
            contiguous; if the loop is interrupted, ``weight`` is left as it was. Eager only.

    Returns:
        ``(W', b')``: new tensors, "out in" and "out" (``None`` when ``bias`` is None).
    """
    _check_merge_inputs(params, weight, bias, variant, group_size)
    check_same_dtype_device("params.theta", params.theta, "weight", weight)
    if bias is not None:
        check_same_dtype_device("weight", weight, "bias", bias)
    _check_out(out, weight, backup)
    return _merge(params, weight, bias, variant=variant, group_size=group_size, out=out, backup=backup)


def _check_out(out: Tensor | None, weight: Tensor, backup: Tensor | None = None, /) -> None:
    """ValueError unless ``out`` can receive a merge of ``weight`` (and, with ``backup``, ``out`` is ``weight``
    itself and ``backup`` can receive a copy of it)."""
    if backup is not None:
        key = (weight.data_ptr(), weight.shape, weight.stride())
        same = out is not None and (out.data_ptr(), out.shape, out.stride()) == key
        if not same:
            raise ValueError("backup= is for a merge in place: pass out=weight with it")
        if not weight.is_contiguous():
            raise ValueError(f"a merge in place needs a contiguous weight, got strides {weight.stride()}")
        _check_out(backup, weight)
        return
    if out is None:
        return
    if not isinstance(out, Tensor) or out.shape != weight.shape or out.dtype != weight.dtype or out.device != weight.device:
        what = f"shape={tuple(out.shape)}, dtype={out.dtype}, device={out.device}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"out has {what}; expected weight's shape={tuple(weight.shape)}, dtype={weight.dtype}, "
                         f"device={weight.device}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError("out requires grad: an in-place merge is for eager weights (use the out-of-place form under autograd)")
    a0, a1 = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
    b0, b1 = weight.data_ptr(), weight.data_ptr() + weight.numel() * weight.element_size()
    if a0 < b1 and b0 < a1:
        raise ValueError("out overlaps weight: the merge reads weight while writing out (pass a copy)")


# ----------------------------------------------------------------------------------------------- unmerge


def road_unmerge(
    params: RoadParams,
    weight: Tensor,
    bias: Tensor | None = None,
    /,
    *,
    variant: str,
    group_size: int,
    check: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Undo :func:`road_merge`: ``(R^-1 W', R^-1 b')`` from the closed-form inverse of each 2x2 block.

    Each block ``[[f_i, -s_i], [s_j, f_j]]`` is inverted as ``[[f_j, s_i], [-s_j, f_i]] / det`` with
    ``det = f_i f_j + s_i s_j`` (no ``linalg.inv``, O(out * in)).

    Args:
        params: ``RoadParams`` with the weight's dtype and device.
        weight: "out in", a merged weight.
        bias: "out" or None.
        variant, group_size: as in :func:`apply_road`.
        check: refuse near-singular blocks (the default). The check reads tensor values, so pass
            ``check=False`` under ``torch.func.vmap`` or ``torch.compile(fullgraph=True)``; singular blocks
            then give inf/NaN.

    Returns:
        ``(W, b)``: new tensors ("out in", "out" or None).

    Raises:
        ValueError: naming the first group/pair and its determinant when a block has
            ``|det| <= eps(dtype) * ||block||_F^2`` (condition number ~1/eps or worse), is zero or non-finite.
    """
    _check_merge_inputs(params, weight, bias, variant, group_size)
    check_same_dtype_device("params.theta", params.theta, "weight", weight)
    if bias is not None:
        check_same_dtype_device("weight", weight, "bias", bias)
    return _unmerge(params, weight, bias, variant=variant, group_size=group_size, check=check)


# ------------------------------------------------------------------------------------------------ config

def _normalize_modules(name: str, value: Any, /) -> str | frozenset[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return frozenset(value)  # PEFT turns a list into a set too
    raise TypeError(f"{name}={value!r} must be None, a regex string or a list of module names")


@register
@dataclasses.dataclass(frozen=True)
class RoadConfig:
    """RoAD adapter configuration: PEFT's ``RoadConfig`` fields and defaults, as an :class:`Adapter`.

    Args:
        variant: ``"road_1"`` (default), ``"road_2"`` or ``"road_4"``.
        group_size: positive even integer (default 64) dividing every targeted layer's ``out_features``.
        init_weights: True (default) for the identity init, False for PEFT's random init.
        target_modules: a regex string or a list of module names (stored as a frozenset, as PEFT stores a
            set); None lets the shims choose.
        exclude_modules: like ``target_modules``, for modules to skip. PEFT 0.21.2's RoadConfig has no such
            field; ``to_peft_dict`` writes it only when set (PEFT then warns and ignores it).

    RoAD has no dropout and no shared (model-wide) state.
    """

    peft_type: ClassVar[str] = "ROAD"
    # checkpoint keys: params field -> PEFT state-dict suffix
    peft_param_names: ClassVar[dict[str, str]] = {"theta": "road_theta", "alpha": "road_alpha"}

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: str | frozenset[str] | None = None
    exclude_modules: str | frozenset[str] | None = None

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        _check_group_size(self.group_size)
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"init_weights={self.init_weights!r} must be a bool")
        object.__setattr__(self, "target_modules", _normalize_modules("target_modules", self.target_modules))
        object.__setattr__(self, "exclude_modules", _normalize_modules("exclude_modules", self.exclude_modules))

    def _statics(self) -> dict:
        return {"variant": self.variant, "group_size": self.group_size}

    def init(
        self,
        in_features: int,
        out_features: int,
        /,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> RoadParams:
        """:func:`road_init` for a layer of ``out_features`` outputs (``in_features`` is unused)."""
        return road_init(
            out_features,
            **self._statics(),
            init_weights=self.init_weights,
            generator=generator,
            dtype=dtype,
            device=device,
        )

    def init_shared(
        self,
        shapes: Sequence[tuple[int, int]],
        /,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """RoAD has no model-wide state: always None."""
        return None

    def apply(
        self,
        params: RoadParams,
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
        """``apply_road(params, base(x))``; like PEFT's forward, ``base(x)`` is rotated in the params' dtype
        and cast back to its own dtype. RoAD has no dropout: ``training``/``generator`` change nothing.

        Args:
            x: "*batch in". Returns "*batch out" in the dtype of ``base(x)``.
        """
        y = base(x)
        if y.shape[-1] != out_features:
            raise ValueError(f"base(x) has shape={tuple(y.shape)}, expected last dim out_features={out_features}")
        out = apply_road(params, y.to(params.theta.dtype), **self._statics())
        return out.to(y.dtype)

    def apply_mixed(
        self,
        params_list: Sequence[RoadParams | None],
        x: Tensor,
        base: Callable[[Tensor], Tensor],
        /,
        *,
        rows: Any,
        in_features: int,
        out_features: int,
        shared: tuple[Tensor, ...] | None = None,
        training: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """A mixed-adapter batch (group ``rows.index[i]`` for row ``i``; ``None``: base output) in one pass:
        one base call on the whole batch, then every row's (p, q) coefficients gathered from the groups'
        stacked ones and one elementwise rotation -- batching RoAD costs one gather, as its paper points out.

        Row ``i`` equals :meth:`apply` with ``params_list[rows.index[i]]`` (bitwise: the same elementwise ops).
        """
        present = [p for p in params_list if p is not None]
        if not present:
            return base(x)
        y = base(x)
        if y.shape[-1] != out_features:
            raise ValueError(f"base(x) has shape={tuple(y.shape)}, expected last dim out_features={out_features}")
        ref = present[0].theta
        for p in present:
            _check_params(p, self.variant, out_features)
            check_same_dtype_device("params.theta", p.theta, "params[0].theta", ref)
        # identity entries (theta = 0, alpha = 1: p = 1, q = 0 exactly) for groups without this adapter
        theta = torch.stack([p.theta if p is not None else torch.zeros_like(ref) for p in params_list])
        alpha = torch.stack([p.alpha if p is not None else torch.ones_like(ref) for p in params_list])
        p, q = _forward_pq(*_cols(RoadParams(theta, alpha), **self._statics()))  # (G, groups, 2, half)
        view = (-1,) + (1,) * (y.dim() - 2) + p.shape[1:]
        yc = y.to(ref.dtype)
        p = p.to(yc.dtype).index_select(0, rows.index).view(view)
        q = q.to(yc.dtype).index_select(0, rows.index).view(view)
        return _mix_last(p, q, yc, group_size=self.group_size).to(y.dtype)

    def merge(
        self,
        params: RoadParams,
        weight: Tensor,
        bias: Tensor | None,
        /,
        *,
        shared: tuple[Tensor, ...] | None = None,
        out: Tensor | None = None,
        backup: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(R W, R b)``; params may have another float dtype than the weight (the coefficients are
        computed from the params, then cast to the weight's dtype, as PEFT casts its ``R``). ``out``, ``backup``:
        as :func:`road_merge`'s (``R W`` written into ``out``, no full-size temporary; with ``out=weight`` and
        ``backup``, in place, the original saved into ``backup`` on the way)."""
        _check_merge_inputs(params, weight, bias, self.variant, self.group_size)
        _check_same_device(params, weight, bias)
        _check_out(out, weight, backup)
        return _merge(params, weight, bias, **self._statics(), out=out, backup=backup)

    def unmerge(
        self,
        params: RoadParams,
        weight: Tensor,
        bias: Tensor | None,
        /,
        *,
        shared: tuple[Tensor, ...] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The inverse of :meth:`merge` (closed-form 2x2 inverses).

        Eagerly, near-singular blocks raise ValueError naming the group; under torch.func transforms and
        torch.compile (where reading tensor values is impossible) the check is skipped, as with ``check=False``.
        """
        _check_merge_inputs(params, weight, bias, self.variant, self.group_size)
        _check_same_device(params, weight, bias)
        return _unmerge(params, weight, bias, **self._statics(), check=plain_eager(*params, weight))

    def num_params(self, in_features: int, out_features: int, /) -> int:
        """``theta.numel() + alpha.numel()``, as PEFT counts: out, 2*out or 4*out for road_1/2/4."""
        _check_statics(self.variant, self.group_size, out_features)
        return 2 * _param_size(self.variant, out_features)

    def to_peft_dict(self) -> dict:
        """PEFT's ``RoadConfig`` fields as a JSON-ready dict (``peft.RoadConfig(**d)`` accepts it)."""
        return peft_dict(self)  # exclude_modules only when set: not a field of PEFT 0.21.2's RoadConfig

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], /) -> RoadConfig:
        """A config from what PEFT's ``adapter_config.json`` holds for RoAD.

        PEFT's generic keys (``base_model_name_or_path``, ``task_type``, ``modules_to_save``, ...) are ignored;
        any other unknown key, or a ``peft_type`` other than ROAD, raises ValueError naming it.
        """
        return cls(**peft_kwargs(cls, d))
