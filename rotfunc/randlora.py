r"""RandLoRA: full-rank updates from shared random bases with trainable diagonal scales, as pure functions.

Paper: Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", ICLR 2025,
arXiv:2502.00987. The math and conventions are those of HuggingFace PEFT's ``tuners/randlora`` (0.21.2), so an
adapter trained here and one trained with PEFT are interchangeable.

The math
--------
One model-wide pair of frozen random bases (:class:`RandLoraBases`)

* ``A`` of shape ``(r, 1, min_dim)`` and ``B`` of shape ``(max_dim, num_bases, r)``,

sized from the element-wise largest ``(out, in)`` over all adapted layers (:func:`randlora_dims`), serves
every layer. A layer with ``lo = min(in, out)``, ``hi = max(in, out)`` and ``nb = ceil(lo / r)`` slices
``A[:, 0, :lo]`` and ``B[:hi, :nb, :]`` and owns two small trainable tensors (:class:`RandLoraParams`):
``lambda_`` ``(r, nb)`` and ``gamma`` ``(nb, lo)``. Its scaled bases are

.. math::

    S_{k b j} = \lambda_{k b} \, A_{k j} \, \gamma_{b j}, \qquad
    M = \mathrm{flat}_{(b,k)}(B) \; \mathrm{flat}_{(k,b)}(S) \in \mathbb{R}^{hi \times lo},

and the update is ``ΔW = M`` when ``in <= out`` and ``ΔW = Mᵀ`` when ``in > out`` (the trainable side always
acts on the smaller dimension); the layer computes ``y = W x + b + s ΔW x`` with ``s = randlora_alpha / r``.

Note the two flatten orders: PEFT flattens ``B`` base-major, ``(b, k) -> b*r + k``, but the scaled ``A``
rank-major, ``(k, b) -> k*nb + b``, so the column of ``B`` for (base ``b``, rank ``k``) meets the row of ``S``
for a *different* (rank, base) pair than the paper's ``sum_b B_b Λ_b A Γ_b`` pairing. Both are full-rank
random bases; only PEFT's order gives PEFT's outputs (the paper's pairing differs by O(1)), so rotfunc uses
PEFT's.

Computing ``s ΔW x`` never builds the ``(out, in)`` ``ΔW``: it is two thin contractions through the
``r * nb``-dimensional space, ``O(batch * (in + out) * r * nb)``. For small batches even the ``(r * nb, lo)``
scaled basis ``S`` is not built (``x`` is scaled by ``A`` row-wise and contracted with ``gamma``).

The random bases are exactly PEFT's (bit for bit, see :func:`randlora_bases`): dense ones are drawn in
bfloat16 with ``kaiming_uniform_(a=sqrt(5))`` from ``torch.Generator("cpu").manual_seed(projection_prng_key)``
(``A`` first, then ``nb`` chunks of ``B``), each divided by its own std in bfloat16; sparse ones are ternary
``{-1, 0, 1}`` thresholds of float32 ``torch.rand`` draws, divided by their float32 std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from ._checks import check_choice, check_float, check_same_device
from .adapter import normalize_layer_selection, peft_dict, peft_kwargs, register

__all__ = [
    "RandLoraBases",
    "RandLoraParams",
    "randlora_dims",
    "randlora_bases",
    "randlora_init",
    "apply_randlora",
    "randlora_delta",
    "randlora_merge",
    "randlora_unmerge",
    "RandLoraConfig",
]


class RandLoraBases(NamedTuple):
    """The frozen random bases shared by every RandLoRA layer of a model (never trainable).

    PEFT's ``randlora_A`` / ``randlora_B`` buffers.
    """

    A: Tensor  # shape=(r, 1, min_dim)
    B: Tensor  # shape=(max_dim, num_bases, r), num_bases = ceil(min_dim / r)


class RandLoraParams(NamedTuple):
    """One layer's trainable RandLoRA scales (PEFT's ``randlora_lambda`` / ``randlora_gamma``)."""

    lambda_: Tensor  # shape=(r, num_bases), num_bases = ceil(min(in, out) / r)
    gamma: Tensor  # shape=(num_bases, min(in, out))


# ----------------------------------------------------------------------------------------------- helpers


def _num_bases(lo: int, r: int) -> int:
    # PEFT: min_dim / r as a float, +1 unless it is an integer; exact ceil for any int below 2**53.
    return -(-lo // r)


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _check_sparse(sparse: object, very_sparse: object) -> None:
    if sparse and very_sparse:
        raise ValueError(
            f"sparse={sparse!r} and very_sparse={very_sparse!r} are both set; choose at most one "
            "(PEFT would silently use very_sparse)"
        )


def _layer_dims(params: RandLoraParams, bases: RandLoraBases, in_features: int, out_features: int):
    """Validate one layer's params and the shared bases; return (r, nb, lo, hi)."""
    _check_int("in_features", in_features, minimum=1)
    _check_int("out_features", out_features, minimum=1)
    if not isinstance(params, tuple) or len(params) != 2:
        raise TypeError(f"params must be RandLoraParams(lambda_, gamma), got {type(params).__name__}")
    if not isinstance(bases, tuple) or len(bases) != 2:
        raise TypeError(f"bases must be RandLoraBases(A, B), got {type(bases).__name__}")
    lam, gamma = params
    A, B = bases
    for name, t in (("params.lambda_", lam), ("params.gamma", gamma), ("bases.A", A), ("bases.B", B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}.dtype={t.dtype} must be a floating point dtype")
    lo, hi = min(in_features, out_features), max(in_features, out_features)
    if lam.dim() != 2 or lam.shape[0] < 1:
        raise ValueError(f"params.lambda_ has shape={tuple(lam.shape)}, expected (r, num_bases) with r >= 1")
    r = lam.shape[0]
    nb = _num_bases(lo, r)
    layer = f"in_features={in_features}, out_features={out_features}, r={r}"
    if tuple(lam.shape) != (r, nb):
        raise ValueError(
            f"params.lambda_ has shape={tuple(lam.shape)}, expected {(r, nb)} "
            f"(r, num_bases=ceil(min(in, out)/r)) for {layer}"
        )
    if tuple(gamma.shape) != (nb, lo):
        raise ValueError(
            f"params.gamma has shape={tuple(gamma.shape)}, expected {(nb, lo)} (num_bases, min(in, out)) for {layer}"
        )
    if A.dim() != 3 or A.shape[0] != r or A.shape[1] != 1 or A.shape[2] < lo:
        raise ValueError(
            f"bases.A has shape={tuple(A.shape)}, expected ({r}, 1, min_dim) with min_dim >= {lo} for {layer}"
        )
    if B.dim() != 3 or B.shape[0] < hi or B.shape[1] < nb or B.shape[2] != r:
        raise ValueError(
            f"bases.B has shape={tuple(B.shape)}, expected (max_dim, num_bases, {r}) with max_dim >= {hi} "
            f"and num_bases >= {nb} for {layer}"
        )
    if lam.device != gamma.device or A.device != lam.device or B.device != lam.device:
        raise ValueError(
            f"params and bases must share a device, got lambda_ on {lam.device}, gamma on {gamma.device}, "
            f"A on {A.device}, B on {B.device}"
        )
    return r, nb, lo, hi


def _compute_dtype(params: RandLoraParams, bases: RandLoraBases) -> torch.dtype:
    """PEFT's compute dtype: the promoted dtype of params and bases, with half precision upcast on CPU."""
    dtype = params.lambda_.dtype
    for t in (params.gamma, bases.A, bases.B):
        dtype = torch.promote_types(dtype, t.dtype)
    if params.lambda_.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # PEFT: CPU half matmuls are slow, compute in float32
    return dtype


def _pieces(params, bases, lo, hi, nb, scaling, dtype):
    """(lambda * scaling (r, nb), gamma (nb, lo), A (r, lo), B (hi, nb, r)), in ``dtype``; bases are constants."""
    lam = params.lambda_.to(dtype) * scaling
    gamma = params.gamma.to(dtype)
    A = bases.A.detach()[:, 0, :lo].to(dtype)
    B = bases.B.detach()[:hi, :nb, :].to(dtype)
    return lam, gamma, A, B


def _scaled_a(lam: Tensor, A: Tensor, gamma: Tensor) -> Tensor:
    """S flattened rank-major, (r * nb, lo): row k*nb + b is lam[k, b] * A[k] * gamma[b] (PEFT's order)."""
    r, nb = lam.shape
    return (lam[:, :, None] * A[:, None, :] * gamma[None, :, :]).reshape(r * nb, A.shape[-1])


def _flat_b(B: Tensor) -> Tensor:
    """B flattened base-major, (hi, nb * r): column b*r + k is B[:, b, k] (PEFT's order). A view."""
    return B.reshape(B.shape[0], B.shape[1] * B.shape[2])


def _dropout(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout (as ``nn.Dropout``) with randomness only from ``generator``."""
    if p >= 1.0:
        return torch.zeros_like(x)
    device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return x * (u >= p).to(x.dtype) / (1.0 - p)


def _contribution(params, bases, x, *, in_features, out_features, scaling, training, dropout, generator):
    """``scaling * ΔW x`` in the compute dtype ("*batch in" -> "*batch out"), without building ΔW."""
    r, nb, lo, hi = _layer_dims(params, bases, in_features, out_features)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape={tuple(x.shape)}, expected (*batch, in_features={in_features})")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout={dropout} must be in [0, 1]")
    dtype = _compute_dtype(params, bases)
    lam, gamma, A, B = _pieces(params, bases, lo, hi, nb, scaling, dtype)
    x = x.to(dtype)
    if training and dropout > 0.0:
        x = _dropout(x, dropout, generator)
    batch = x.shape[:-1]
    n = math.prod(batch)
    # Both routes cost O(n * (in + out) * r * nb). The elementwise route's temporary is (n, r, lo), the
    # scaled-basis route's is (r * nb, lo): take the smaller one (a static choice on shapes).
    elementwise = n < nb
    if in_features <= out_features:  # lo = in, hi = out: ΔW = flat(B) @ S
        if elementwise:
            h = (x.unsqueeze(-2) * A) @ gamma.mT * lam  # (*batch, r, nb): sum_j x_j A_kj gamma_bj, times lam
            h = h.reshape(*batch, r * nb)  # rank-major, as S's rows
        else:
            h = x @ _scaled_a(lam, A, gamma).mT  # (*batch, r * nb)
        return h @ _flat_b(B).mT  # pairs h's flat index with B's base-major flat index
    # lo = out, hi = in: ΔW = (flat(B) @ S)^T
    t = x @ _flat_b(B)  # (*batch, nb * r), read below as S's rank-major rows
    if elementwise:
        u = t.reshape(*batch, r, nb) * lam
        return ((u @ gamma) * A).sum(-2)  # sum_k A_kj sum_b u_kb gamma_bj
    return t @ _scaled_a(lam, A, gamma)


def _delta_factors(params, bases, in_features, out_features, scaling):
    """(L, R, dtype) with ``scaling * ΔW = L @ R`` ((out, r*nb) @ (r*nb, in))."""
    r, nb, lo, hi = _layer_dims(params, bases, in_features, out_features)
    dtype = _compute_dtype(params, bases)
    lam, gamma, A, B = _pieces(params, bases, lo, hi, nb, scaling, dtype)
    S, Bf = _scaled_a(lam, A, gamma), _flat_b(B)
    if in_features <= out_features:
        return Bf, S, dtype
    return S.mT, Bf.mT, dtype


def _merge_weight(params, bases, weight, scaling, sign):
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D (out_features, in_features) tensor, got "
            f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}"
        )
    out_features, in_features = weight.shape
    L, R, dtype = _delta_factors(params, bases, in_features, out_features, scaling)
    if weight.device != L.device:
        raise ValueError(f"weight.device={weight.device} differs from the params' device {L.device}; move one of them")
    if weight.dtype == dtype:
        return torch.addmm(weight, L, R, alpha=sign)  # one fused GEMM: no (out, in) temporary besides the result
    # As PEFT: the delta is computed in the compute dtype, cast to the weight's dtype, then added.
    delta = (L @ R).to(weight.dtype)
    return weight + delta if sign > 0 else weight - delta


# ------------------------------------------------------------------------------------------ bases, init


def randlora_dims(shapes: Sequence[tuple[int, int]], /) -> tuple[int, int]:
    """``(max_dim, min_dim)`` of the shared bases for layers of the given ``(out_features, in_features)`` shapes.

    As PEFT: the element-wise maximum ``(out, in)`` over all layers, then its max and min. E.g.
    ``[(48, 16), (16, 48)] -> (48, 48)``.

    Args:
        shapes: one ``(out_features, in_features)`` pair per adapted layer (at least one).

    Returns:
        ``(max_dim, min_dim)``.
    """
    shapes = list(shapes)
    if not shapes:
        raise ValueError("shapes is empty: RandLoRA needs at least one (out_features, in_features) layer shape")
    out_max = in_max = 0
    for i, shape in enumerate(shapes):
        if len(tuple(shape)) != 2:
            raise ValueError(f"shapes[{i}]={shape!r} is not an (out_features, in_features) pair")
        o, n = shape
        _check_int(f"shapes[{i}][0] (out_features)", o, minimum=1)
        _check_int(f"shapes[{i}][1] (in_features)", n, minimum=1)
        out_max, in_max = max(out_max, o), max(in_max, n)
    return max(out_max, in_max), min(out_max, in_max)


def randlora_bases(
    key: int,
    /,
    *,
    r: int,
    max_dim: int,
    min_dim: int,
    sparse: bool = False,
    very_sparse: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> RandLoraBases:
    """PEFT's shared random bases for ``projection_prng_key=key``, bit for bit.

    Draws from ``torch.Generator("cpu").manual_seed(key)``, in PEFT's order:

    * dense: ``A`` (r, 1, min_dim), then ``num_bases`` chunks (max_dim, 1, r) of ``B``, each filled by
      ``kaiming_uniform_(a=sqrt(5))`` in bfloat16; ``A / A.std()`` and ``B / B.std()`` in bfloat16;
    * ``sparse`` (threshold 3) / ``very_sparse`` (threshold ``sqrt(min_dim)``): float32 ``torch.rand`` draws
      of ``A`` then ``B``, mapped to -1 below ``1/(2t)``, +1 above ``1 - 1/(2t)``, 0 elsewhere, then divided
      by their float32 std;

    and finally cast to ``dtype``.

    Args:
        key: PEFT's ``projection_prng_key`` (an int seed).
        r: the bases' rank (PEFT's ``r``), >= 1.
        max_dim, min_dim: from :func:`randlora_dims` over the adapted layers; ``max_dim >= min_dim >= 1``.
        sparse, very_sparse: PEFT's ternary sparse bases (at most one of them).
        dtype: the bases' dtype. ``None`` means float32, what a PEFT model holds after ``get_peft_model`` for
            float32, bfloat16 and float16 models (PEFT casts the bases to the layer dtype, then upcasts half
            precision adapters to float32). Pass ``torch.float64`` to match a float64 PEFT model, or
            ``torch.bfloat16`` for PEFT's raw dense draw.
        device: where to put the bases (drawn on the CPU, as PEFT).

    Returns:
        :class:`RandLoraBases` with ``A`` (r, 1, min_dim) and ``B`` (max_dim, ceil(min_dim / r), r).
    """
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"key={key!r} (projection_prng_key) must be an int")
    _check_int("r", r, minimum=1)
    _check_int("min_dim", min_dim, minimum=1)
    _check_int("max_dim", max_dim, minimum=1)
    if max_dim < min_dim:
        raise ValueError(f"max_dim={max_dim} is smaller than min_dim={min_dim}")
    _check_sparse(sparse, very_sparse)
    nb = _num_bases(min_dim, r)
    if r * min_dim < 2:  # PEFT divides a one-element A by its std: NaN bases (and a torch warning)
        raise ValueError(
            f"r={r} and min_dim={min_dim} give a one-element basis A of shape={(r, 1, min_dim)}, whose std is "
            "undefined; use r >= 2 or layers with min(in_features, out_features) >= 2"
        )
    g = torch.Generator(device="cpu").manual_seed(key)
    if sparse or very_sparse:
        t = math.sqrt(min_dim) if very_sparse else 3
        lo_cut, hi_cut = 1 / (2 * t), 1 - 1 / (2 * t)

        def ternary(u: Tensor) -> Tensor:
            one = torch.ones_like(u)
            return torch.where(u < lo_cut, -one, torch.where(u > hi_cut, one, torch.zeros_like(u)))

        A = ternary(torch.rand((r, 1, min_dim), generator=g))
        B = ternary(torch.rand((max_dim, nb, r), generator=g))
        for name, t_ in (("A", A), ("B", B)):
            if not bool(t_.any()):  # PEFT would divide by a zero std and return NaN bases
                raise ValueError(
                    f"the {'very_sparse' if very_sparse else 'sparse'} basis {name} of shape={tuple(t_.shape)} came out "
                    f"all zero for key={key}, r={r}, max_dim={max_dim}, min_dim={min_dim}; use larger layers, "
                    "another key or dense bases"
                )
    else:
        # The draw dtype is PEFT's on a machine with bf16 support (always true on CPU).
        gain_a = math.sqrt(5)
        with torch.no_grad():
            A = torch.nn.init.kaiming_uniform_(torch.empty((r, 1, min_dim), dtype=torch.bfloat16), a=gain_a, generator=g)
            chunks = [
                torch.nn.init.kaiming_uniform_(torch.empty((max_dim, 1, r), dtype=torch.bfloat16), a=gain_a, generator=g)
                for _ in range(nb)
            ]
        B = torch.cat(chunks, dim=1)
    A, B = A / A.std(), B / B.std()
    dtype = torch.float32 if dtype is None else dtype
    return RandLoraBases(A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype))


def randlora_init(
    in_features: int,
    out_features: int,
    /,
    *,
    r: int,
    init_weights: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> RandLoraParams:
    """Fresh params for one layer, PEFT's shapes and init.

    With ``init_weights=True`` (PEFT's default): ``lambda_ = 0`` (the adapter starts as the identity) and
    ``gamma = 1 / max(gamma.shape) = 1 / max(num_bases, min(in, out))``. With ``init_weights=False``:
    ``lambda_ ~ N(0, 1)`` drawn from ``generator`` in float32 and ``gamma = 1 / max(in, out)``. Values are
    made in float32 and then cast, as PEFT casts its float32 params to the layer's dtype.

    Args:
        in_features, out_features: the layer's.
        r: RandLoRA's rank, >= 1.
        init_weights: PEFT's ``init_weights``.
        generator: randomness for ``init_weights=False``.
        dtype: params dtype (``None``: float32).
        device: params device.

    Returns:
        :class:`RandLoraParams` with ``lambda_`` (r, nb) and ``gamma`` (nb, min(in, out)), nb = ceil(min / r).
    """
    _check_int("in_features", in_features, minimum=1)
    _check_int("out_features", out_features, minimum=1)
    _check_int("r", r, minimum=1)
    lo, hi = min(in_features, out_features), max(in_features, out_features)
    nb = _num_bases(lo, r)
    if init_weights:
        lam = torch.zeros((r, nb), dtype=torch.float32)
        gamma = torch.full((nb, lo), 1 / max(nb, lo), dtype=torch.float32)
    else:
        gen_device = generator.device if generator is not None else "cpu"
        lam = torch.randn((r, nb), generator=generator, dtype=torch.float32, device=gen_device)
        gamma = torch.ones((nb, lo), dtype=torch.float32) / hi
    dtype = torch.float32 if dtype is None else dtype
    return RandLoraParams(lam.to(device=device, dtype=dtype), gamma.to(device=device, dtype=dtype))


# ------------------------------------------------------------------------------------- apply, delta, merge


def _check_params_bases(params: RandLoraParams, bases: RandLoraBases, name: str, t: Tensor, /) -> None:
    named = [(f"params.{f}", v) for f, v in zip(("lambda_", "gamma"), params)]
    named += [(f"bases.{f}", v) for f, v in zip(("A", "B"), bases)]
    for field, v in named:
        check_float(field, v)
    check_same_device((name, t), *named)


def apply_randlora(
    params: RandLoraParams,
    bases: RandLoraBases,
    x: Tensor,
    /,
    *,
    in_features: int,
    out_features: int,
    scaling: float,
    training: bool = False,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The adapter's contribution ``scaling * ΔW x`` to a layer's output, without materializing ``ΔW``.

    Two thin contractions through the ``r * num_bases`` space: ``O(batch * (in + out) * r * num_bases)`` time
    and at most ``max(batch * r, r * num_bases) * min(in, out)`` extra memory. Computed in PEFT's compute
    dtype (the promoted dtype of params and bases; float16/bfloat16 on CPU are upcast to float32).

    Args:
        params: this layer's :class:`RandLoraParams`.
        bases: the model's shared :class:`RandLoraBases` (frozen: no gradient flows into them).
        x: input, "*batch in".
        in_features, out_features: the layer's.
        scaling: ``randlora_alpha / r``.
        training, dropout: dropout with probability ``dropout`` on the input of the adapter branch only (as
            PEFT), when ``training``.
        generator: randomness for dropout.

    Returns:
        "*batch out", dtype of ``x``.
    """
    check_float("x", x)
    _check_params_bases(params, bases, "x", x)
    y = _contribution(
        params, bases, x, in_features=in_features, out_features=out_features, scaling=scaling,
        training=training, dropout=dropout, generator=generator,
    )
    return y.to(x.dtype)


def randlora_delta(
    params: RandLoraParams, bases: RandLoraBases, /, *, in_features: int, out_features: int, scaling: float
) -> Tensor:
    """The dense update ``scaling * ΔW``, (out, in): equals PEFT's ``get_delta_weight``.

    Costs one ``(max, r*nb) @ (r*nb, min)`` product; for reference, tests and merging, not for the forward.

    Args:
        params, bases: as :func:`apply_randlora`.
        in_features, out_features: the layer's.
        scaling: ``randlora_alpha / r``.

    Returns:
        (out_features, in_features), in the compute dtype (see :func:`apply_randlora`).
    """
    L, R, _ = _delta_factors(params, bases, in_features, out_features, scaling)
    return L @ R


def randlora_merge(params: RandLoraParams, bases: RandLoraBases, weight: Tensor, /, *, scaling: float) -> Tensor:
    """``weight + scaling * ΔW`` as a new tensor (weight is nn.Linear's (out, in); the bias is unchanged).

    When ``weight`` is in the compute dtype this is one fused ``addmm`` (no ``(out, in)`` temporary but the
    result); otherwise, as PEFT, the delta is cast to ``weight.dtype`` and added.

    Args:
        params, bases: as :func:`apply_randlora`.
        weight: (out_features, in_features).
        scaling: ``randlora_alpha / r``.

    Returns:
        (out_features, in_features), dtype of ``weight``.
    """
    check_float("weight", weight)
    _check_params_bases(params, bases, "weight", weight)
    return _merge_weight(params, bases, weight, scaling, 1)


def randlora_unmerge(params: RandLoraParams, bases: RandLoraBases, weight: Tensor, /, *, scaling: float) -> Tensor:
    """``weight - scaling * ΔW``: the inverse of :func:`randlora_merge` (to round-off).

    Args:
        params, bases: as :func:`apply_randlora`.
        weight: (out_features, in_features), merged.
        scaling: ``randlora_alpha / r``.

    Returns:
        (out_features, in_features), dtype of ``weight``.
    """
    return _merge_weight(params, bases, weight, scaling, -1)


# ---------------------------------------------------------------------------------------------- config

@register
@dataclass(frozen=True)
class RandLoraConfig:
    """RandLoRA's configuration: PEFT's ``RandLoraConfig`` fields and defaults, implementing ``Adapter``.

    Attributes:
        r: rank of the random bases (PEFT: fewer trainable params as r grows), >= 1.
        target_modules: module names / regex to adapt (stored as a tuple when given as a list).
        projection_prng_key: seed of the shared random bases.
        save_projection: PEFT's flag to store the bases in checkpoints.
        sparse, very_sparse: ternary sparse bases (at most one; PEFT silently prefers very_sparse).
        randlora_dropout: dropout on the adapter branch's input, in [0, 1).
        fan_in_fan_out: the weight is stored (in, out) (transformers' Conv1D); merge then works on ``weight.T``.
        randlora_alpha: ``scaling = randlora_alpha / r``.
        bias: "none", "all" or "randlora_only" (which biases train: the adapter gets its own trainable
            copy of the adapted layers' biases, used in its forward and merged into the layer's bias).
        layers_to_transform, layers_pattern: PEFT's layer-index selection (e.g. ``[0, 2]`` with ``"layer"``).
        init_weights: PEFT's init (identity) when True.
        exclude_modules: module names / regex never adapted.
    """

    peft_type: ClassVar[str] = "RANDLORA"
    # checkpoint keys: params / shared-bases field -> PEFT state-dict suffix
    peft_param_names: ClassVar[dict[str, str]] = {"lambda_": "randlora_lambda", "gamma": "randlora_gamma"}
    peft_shared_names: ClassVar[dict[str, str]] = {"A": "randlora_A", "B": "randlora_B"}

    r: int = 32
    target_modules: Any = None
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: float = 640
    bias: str = "none"
    init_weights: bool = True
    exclude_modules: Any = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        normalize_layer_selection(self)
        _check_int("r", self.r, minimum=1)
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise TypeError(f"projection_prng_key={self.projection_prng_key!r} must be an int")
        for name in ("save_projection", "sparse", "very_sparse", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a bool")
        _check_sparse(self.sparse, self.very_sparse)
        p = self.randlora_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"randlora_dropout={p!r} must be a number in [0, 1)")
        a = self.randlora_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"randlora_alpha={a!r} must be a finite number")
        check_choice("bias", self.bias, ("none", "all", "randlora_only"))
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
                if not all(isinstance(v, str) for v in items):
                    raise TypeError(f"{name}={value!r} must hold only str")
                object.__setattr__(self, name, tuple(items))
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"{name}={value!r} must be None, a str or a list of str")

    @property
    def scaling(self) -> float:
        """``randlora_alpha / r``, as PEFT."""
        return self.randlora_alpha / self.r

    # --- Adapter protocol

    def init(
        self,
        in_features: int,
        out_features: int,
        /,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> RandLoraParams:
        """Fresh :class:`RandLoraParams` for one layer (see :func:`randlora_init`)."""
        return randlora_init(
            in_features, out_features, r=self.r, init_weights=self.init_weights,
            generator=generator, dtype=dtype, device=device,
        )

    def init_shared(
        self,
        shapes: Sequence[tuple[int, int]],
        /,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> RandLoraBases:
        """The model's shared :class:`RandLoraBases` for layers of these (out, in) shapes, PEFT's exactly."""
        max_dim, min_dim = randlora_dims(shapes)
        return randlora_bases(
            self.projection_prng_key, r=self.r, max_dim=max_dim, min_dim=min_dim,
            sparse=self.sparse, very_sparse=self.very_sparse, dtype=dtype, device=device,
        )

    def apply(
        self,
        params: RandLoraParams,
        x: Tensor,
        base: Callable[[Tensor], Tensor],
        /,
        *,
        in_features: int,
        out_features: int,
        shared: RandLoraBases | None = None,
        training: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``base(x) + scaling * ΔW x`` ("*batch in" -> "*batch out"), dtype of ``base(x)``.

        As PEFT, the sum is formed in the promoted dtype of ``base(x)`` and the adapter's compute dtype, then
        cast back.
        """
        bases = self._bases(shared)
        y = base(x)
        delta = _contribution(
            params, bases, x, in_features=in_features, out_features=out_features, scaling=self.scaling,
            training=training, dropout=self.randlora_dropout, generator=generator,
        )
        return (y + delta).to(y.dtype)

    def apply_mixed(
        self,
        params_list: Sequence[RandLoraParams | None],
        x: Tensor,
        base: Callable[[Tensor], Tensor],
        /,
        *,
        rows: Any,
        in_features: int,
        out_features: int,
        shared: RandLoraBases | None = None,
        training: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """A mixed-adapter batch (group ``rows.index[i]`` for row ``i``; ``None``: base output): one base call
        and one product with the shared basis ``B`` on the whole batch; only the product with each group's
        scaled basis ``S_g`` (``lambda``, ``gamma`` folded into ``A``) runs per group, on the group's rows.

        Every group must use the same shared bases (adapters of one config on one model do). Row ``i`` equals
        :meth:`apply` with ``params_list[rows.index[i]]`` up to float summation order.
        """
        present = [p for p in params_list if p is not None]
        if not present:
            return base(x)
        bases = self._bases(shared)
        dims = {_layer_dims(p, bases, in_features, out_features) for p in present}
        if len(dims) != 1:
            raise ValueError(f"the groups' params have different shapes on this layer: {sorted(dims)}")
        if x.dim() < 1 or x.shape[-1] != in_features:
            raise ValueError(f"x has shape={tuple(x.shape)}, expected (*batch, in_features={in_features})")
        r, nb, lo, hi = dims.pop()
        y = base(x)
        dtype = _compute_dtype(present[0], bases)
        xc = x.to(dtype)
        if training and self.randlora_dropout > 0.0:
            xc = _dropout(xc, self.randlora_dropout, generator)
        A = bases.A.detach()[:, 0, :lo].to(dtype)
        Bf = _flat_b(bases.B.detach()[:hi, :nb, :].to(dtype))  # (hi, nb * r)
        first = xc if in_features <= out_features else xc @ Bf  # lo = out: ΔW x = S^T (flat(B)^T x)
        parts = rows.split(first)  # views when the rows come group after group
        outs = []
        for p, part in zip(params_list, parts):
            if p is None:
                outs.append(part.new_zeros(part.shape[:-1] + (r * nb if in_features <= out_features else lo,)))
                continue
            # lambda scales the rows' projections (n, r * nb) instead of the basis (r * nb, lo): one elementwise
            # pass over the (r, nb, lo) basis per group instead of two, forward and backward
            S0 = (A[:, None, :] * p.gamma.to(dtype)[None, :, :]).reshape(r * nb, lo)  # S without lambda
            lam = (p.lambda_.to(dtype) * self.scaling).reshape(r * nb)  # S's row order, rank-major
            outs.append((part @ S0.mT) * lam if in_features <= out_features else (part * lam) @ S0)
        mid = rows.join(outs)
        delta = mid @ Bf.mT if in_features <= out_features else mid
        return (y + delta).to(y.dtype)

    def merge(
        self, params: RandLoraParams, weight: Tensor, bias: Tensor | None, /, *, shared: RandLoraBases | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(W + scaling ΔW, bias)``; with ``fan_in_fan_out`` the weight is (in, out) and stays so."""
        bases = self._bases(shared)
        if self.fan_in_fan_out:
            return randlora_merge(params, bases, weight.mT, scaling=self.scaling).mT.contiguous(), bias
        return randlora_merge(params, bases, weight, scaling=self.scaling), bias

    def unmerge(
        self, params: RandLoraParams, weight: Tensor, bias: Tensor | None, /, *, shared: RandLoraBases | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(W - scaling ΔW, bias)``: the inverse of :meth:`merge`."""
        bases = self._bases(shared)
        if self.fan_in_fan_out:
            return randlora_unmerge(params, bases, weight.mT, scaling=self.scaling).mT.contiguous(), bias
        return randlora_unmerge(params, bases, weight, scaling=self.scaling), bias

    def num_params(self, in_features: int, out_features: int, /) -> int:
        """``r * nb + nb * min(in, out)`` (lambda and gamma), as PEFT counts; the bases are buffers."""
        lo = min(in_features, out_features)
        nb = _num_bases(lo, self.r)
        return self.r * nb + nb * lo

    # --- PEFT config interchange

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's ``RandLoraConfig`` fields (what its ``adapter_config.json`` holds, minus generic keys)."""
        return peft_dict(self)  # exclude_modules only when set: not a field of PEFT 0.21.2's RandLoraConfig

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], /) -> "RandLoraConfig":
        """A config from PEFT's ``adapter_config.json`` dict; ValueError naming any unknown key."""
        return cls(**peft_kwargs(cls, d))

    def _bases(self, shared: Any) -> RandLoraBases:
        if shared is None:
            raise ValueError("RandLoraConfig needs shared=RandLoraBases (from init_shared); got shared=None")
        if not isinstance(shared, RandLoraBases):
            shared = RandLoraBases(*shared)
        return shared
