"""OFT: orthogonal finetuning by block-diagonal Cayley rotations of a layer's input, as pure functions.

Math (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", arXiv 2306.07280; OFTv2's
Cayley-Neumann series: Qiu et al. 2025, arXiv 2506.19847). The input dimension ``in`` is split into ``r`` blocks
of size ``b`` (``r * b = in``). Block ``i`` has a skew-symmetric ``Q_i`` (its ``b(b-1)/2`` free entries are the
params) and a rotation ``R_i``:

* exact Cayley (``use_cayley_neumann=False``): ``R = (I - Q)(I + Q)⁻¹`` -- orthogonal, det +1;
* Cayley-Neumann (``use_cayley_neumann=True``, PEFT's default): ``R = I + 2Q + 2Q² + ... + Q^(n-1)`` (see
  :func:`rotfunc.linalg.cayley_neumann`), which approximates ``(I + Q)(I - Q)⁻¹`` -- the **transpose** of the exact
  path. This is what PEFT 0.21.2 does and rotfunc matches it: for the same params, switching modes gives the
  transposed rotation.

The adapted linear layer is ``y = W (R_bdᵀ x) + bias`` with ``R_bd = blockdiag(R_1, ..., R_r)``; per block the
input row-vector is multiplied as ``x_i @ R_i`` (PEFT's ``einsum("...rk,rkc->...rc")``). Merged weight:
``W' = W R_bdᵀ``, computed block-wise without ever forming the dense (in, in) ``R_bd``. Unmerge multiplies by the
inverse blocks: the transpose for exact Cayley, a batched (b, b) inverse for the Neumann series (never the dense
(in, in) ``linalg.inv`` that PEFT uses).

Options, and where rotfunc differs from PEFT:

* ``block_share``: one ``Q`` (params of shape (1, b(b-1)/2)) used for all ``in/b`` blocks.
* ``coft`` (constrained OFT): each block's ``Q`` is projected into the Frobenius ball of radius ``eps / sqrt(rows)``
  (``rows`` = params' first dim, 1 with block_share). PEFT overwrites its parameter in place inside ``forward``;
  rotfunc's forward uses the projected value without writing anything (the gradient passes straight through the
  projection, which is what PEFT's in-place ``no_grad`` projection gives), and :func:`coft_project` returns the
  projected params for a training loop to keep. The radius is rounded to float32 as PEFT computes it.
* ``module_dropout``: PEFT 0.21.2 builds its multiplicative dropout layer but never calls it, so the option has no
  effect there. rotfunc implements what the paper and the option describe: while ``training`` and ``p > 0``, each
  of the ``in/b`` blocks is independently replaced by the identity with probability ``p`` (one draw per call,
  shared across the batch; randomness only from ``generator=``). With ``p = 0`` or ``training=False`` it equals
  PEFT.
* dtype: as PEFT, ``x`` is cast to the params' dtype, rotated, and cast back. Exact Cayley of half-precision
  params is computed in float32 (PEFT's too). Merges compute in float32 at least (PEFT multiplies bf16/fp16
  weights in their own dtype) and return the weight's dtype.
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

import torch
from einops import rearrange
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._checks import check_choice, check_float, check_same_device, plain_eager
from ._memory import fresh_like, writes_out
from .adapter import normalize_layer_selection, peft_dict, peft_kwargs, register
from .linalg import block_inverse, cayley, cayley_neumann, skew

__all__ = [
    "OFTParams",
    "OFTBlockSizeWarning",
    "resolve_block_size",
    "oft_init",
    "oft_blocks",
    "oft_rotate",
    "oft_matrix",
    "oft_merge",
    "oft_unmerge",
    "coft_project",
    "OFTConfig",
]


class OFTParams(NamedTuple):
    """OFT's trainable params for one layer (PEFT's ``oft_R[adapter].weight``)."""

    q: Tensor  # shape=(r, b*(b-1)//2), or (1, b*(b-1)//2) with block_share; packed triu_indices(b, b, 1) order


class OFTBlockSizeWarning(UserWarning):
    """``r`` or ``oft_block_size`` did not divide ``in_features`` and was adjusted (as PEFT adjusts it)."""


# ----------------------------------------------------------------------------------------------- helpers


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


def _check_statics(block_size: int, num_cayley_neumann_terms: int, eps: float) -> None:
    _check_int("block_size", block_size, 1)
    _check_int("num_cayley_neumann_terms", num_cayley_neumann_terms, 1)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps={eps!r} must be a finite float >= 0")


def _check_q(q: Tensor, in_features: int | None, block_size: int, block_share: bool) -> None:
    if not isinstance(q, Tensor):
        raise TypeError(f"params.q must be a torch.Tensor, got {type(q).__name__}")
    n = block_size * (block_size - 1) // 2
    if in_features is not None and in_features % block_size != 0:
        raise ValueError(f"in_features={in_features} is not divisible by block_size={block_size}")
    if block_share:
        rows = 1
    elif in_features is not None:
        rows = in_features // block_size
    else:
        rows = q.shape[0] if q.ndim == 2 else -1
    if q.ndim != 2 or q.shape[1] != n or q.shape[0] != rows:
        what = f"in_features={in_features}, " if in_features is not None else ""
        raise ValueError(
            f"params.q has shape={tuple(q.shape)}, expected ({rows if rows > 0 else 'r'}, {n}) for "
            f"{what}block_size={block_size}, block_share={block_share} (b*(b-1)/2={n} packed entries per block)"
        )


def _adjust(in_features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``in_features`` nearest ``value`` (ties go down)."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def _resolve(in_features: int, r: int, oft_block_size: int) -> tuple[int, int, str | None]:
    _check_int("in_features", in_features, 1)
    _check_int("r", r, 0)
    _check_int("oft_block_size", oft_block_size, 0)
    if (r == 0) == (oft_block_size == 0):
        raise ValueError(
            f"exactly one of r={r} and oft_block_size={oft_block_size} must be non-zero "
            f"(r * oft_block_size == in_features={in_features})"
        )
    message = None
    if r == 0:
        b = oft_block_size
        if in_features % b != 0 or b > in_features:
            b = _adjust(in_features, b)
            message = (
                f"oft_block_size={oft_block_size} does not divide in_features={in_features}; "
                f"adjusted to oft_block_size={b} (as PEFT does)"
            )
        return in_features // b, b, message
    rr = r
    if in_features % rr != 0 or rr > in_features:
        rr = _adjust(in_features, rr)
        message = f"r={r} does not divide in_features={in_features}; adjusted to r={rr} (as PEFT does)"
    return rr, in_features // rr, message


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _coft_radius(eps: float, rows: int) -> float:
    # PEFT: eps * 1 / torch.sqrt(torch.tensor(rows)) -- a float32 computation (both roundings are exact here:
    # a double result of float32 operands rounds correctly to float32).
    return _float32(_float32(eps) / _float32(math.sqrt(rows)))


def _project(q: Tensor, Q: Tensor, radius: float) -> Tensor:
    """COFT projection of packed ``q`` (skew blocks ``Q``) into the Frobenius ball of ``radius``."""
    norm = torch.linalg.vector_norm(Q, dim=(-2, -1)).unsqueeze(-1)  # (rows, 1)
    inside = norm <= radius
    safe = torch.where(inside, torch.ones_like(norm), norm)  # no 0/0 (NaN gradients) when q == 0
    return torch.where(inside, q, radius * (q / safe))


def _rotations(
    q: Tensor, *, block_size: int, use_cayley_neumann: bool, num_cayley_neumann_terms: int, coft: bool, eps: float
) -> Tensor:
    Q = skew(q, block_size=block_size)
    if coft:
        projected = skew(_project(q, Q, _coft_radius(eps, q.shape[0])), block_size=block_size)
        # The value is the projection; the gradient passes straight through it, as PEFT's in-place no_grad
        # projection of its parameter gives.
        Q = projected.detach() + (Q - Q.detach())
    if use_cayley_neumann:
        return cayley_neumann(Q, num_terms=num_cayley_neumann_terms)
    return cayley(Q)


# Inference cache of the rotation blocks, per parameter tensor (entries go with the tensor): the Cayley(-Neumann)
# evaluation is a fixed function of q, and without grad nothing needs it recomputed each call. A hit needs the
# same statics and q bitwise equal to the copy taken when the blocks were built (torch.equal: one read of q,
# which also catches writes through .data that leave q's version counter unchanged).
_BLOCK_CACHE = WeakIdKeyDictionary()


def _cacheable(q: Tensor) -> bool:
    """True where cached blocks can stand in for fresh ones: plain eager (no torch.func wrapper or transform,
    not compiling), no autograd graph to build through ``q``, and outside inference mode (an inference tensor
    cached there would fail in a later autograd call that saves it)."""
    if not plain_eager(q) or torch._C._are_functorch_transforms_active():  # first: compiling can't trace the rest
        return False
    return not (torch.is_inference_mode_enabled() or (torch.is_grad_enabled() and q.requires_grad))


def _cached_rotations(q: Tensor, **statics: Any) -> Tensor:
    """:func:`_rotations`, from the inference cache where :func:`_cacheable` allows (the caller must not write
    into the result)."""
    if not _cacheable(q):
        return _rotations(q, **statics)
    return _from_cache(q, statics)


def _from_cache(q: Tensor, statics: dict[str, Any]) -> Tensor:
    """The cached blocks of ``q`` (built and stored on a miss); only where :func:`_cacheable` holds."""
    key = (tuple(sorted(statics.items())), q.dtype, tuple(q.shape), q.device)
    hit = _BLOCK_CACHE.get(q)
    if hit is not None and hit[0] == key and torch.equal(hit[1], q):
        return hit[2]
    R = _rotations(q, **statics)
    _BLOCK_CACHE[q] = (key, q.detach().clone(), R)
    return R


# bytes of weight rows one step of a merge into ``out`` reads: the rows (and their backup, and the product)
# stay in a core's 1 MiB L2 while they are multiplied
_CHUNK_BYTES = 1 << 19


def _block_matmul_rows(
    weight: Tensor, blocks: Tensor, block_size: int, out: Tensor, backup: Tensor | None = None
) -> Tensor:
    """:func:`_block_matmul` into a contiguous ``out``, ``_CHUNK_BYTES`` of rows at a time (eager).

    Each piece of m rows is one batched product ``(r, m, b) @ (r, b, b)`` over a strided view of the rows, into
    a piece-sized scratch that is then copied into ``out``'s rows (a shared block: one (m*r, b) @ (b, b) product
    straight into ``out``). With ``backup`` (``out`` is ``weight``: in place) each piece is first copied into
    ``backup`` and multiplied from there, so ``backup`` ends up holding the original weight after one pass over
    it; an interrupted loop copies the pieces done so far back (``weight`` is left as it was).
    """
    out_features, in_features = weight.shape
    r = in_features // block_size
    m = max(1, min(out_features, _CHUNK_BYTES // (in_features * weight.element_size())))
    src_all = weight if backup is None else backup
    scratch = None if blocks.shape[0] == 1 else weight.new_empty((r, m, block_size))
    saved = 0  # rows copied into backup so far
    try:
        for r0 in range(0, out_features, m):
            r1 = min(out_features, r0 + m)
            src, dst = src_all[r0:r1], out[r0:r1]
            if backup is not None:
                src.copy_(dst)
                saved = r1
            if scratch is None:
                torch.mm(src.view(-1, block_size), blocks[0].mT, out=dst.view(-1, block_size))
                continue
            prod = scratch.view(-1)[: r * (r1 - r0) * block_size].view(r, r1 - r0, block_size)  # contiguous
            torch.bmm(src.view(r1 - r0, r, block_size).transpose(0, 1), blocks.mT, out=prod)
            dst.view(r1 - r0, r, block_size).copy_(prod.transpose(0, 1))
    except BaseException:
        if saved:
            out[:saved].copy_(src_all[:saved])
        raise
    return out


def _block_matmul(weight: Tensor, blocks: Tensor, block_size: int, out: Tensor | None = None) -> Tensor:
    """``weight @ blockdiag(blocks)ᵀ`` for (out, in) ``weight`` and (r or 1, b, b) ``blocks``, block-wise.

    Per block ``W'[:, i] = W[:, i] @ M_iᵀ``. Full-size temporaries (each costs ~50 ms at 4096x4096 here): a shared
    block is one (out*r, b) @ (b, b) product written straight into the result (one); otherwise a batched product
    over a strided view of the weight (no input copy) and its rearrangement into (out, in) (two). Into a
    contiguous ``out`` (eager): none, see :func:`_block_matmul_rows`.
    """
    out_features, in_features = weight.shape
    if out is not None:
        return _block_matmul_rows(weight, blocks, block_size, out)
    if blocks.shape[0] == 1:
        flat = weight.reshape(out_features * (in_features // block_size), block_size)
        return (flat @ blocks[0].mT).reshape(out_features, in_features)
    wb = rearrange(weight, "o (r b) -> r o b", b=block_size)  # a strided view: no copy
    return rearrange(torch.bmm(wb, blocks.mT), "r o b -> o (r b)")


def _block_matmul_fresh(weight: Tensor, blocks: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """:func:`_block_matmul` of ``weight`` in ``dtype`` as a new tensor of ``weight``'s dtype. Eagerly without
    autograd (:func:`~rotfunc._memory.writes_out`), piece by piece into a fresh huge-page buffer: no full-size
    temporary but the result, which is then written while each piece is in cache (bitwise the same values)."""
    if dtype == weight.dtype and writes_out(blocks, weight):
        return _block_matmul_rows(weight, blocks, block_size, fresh_like(weight))
    return _block_matmul(weight.to(dtype), blocks, block_size).to(weight.dtype)


def _merge_dtype(weight: Tensor, q: Tensor) -> torch.dtype:
    dtype = torch.promote_types(weight.dtype, q.dtype)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_weight(weight: Tensor, block_size: int) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"weight has shape={tuple(weight.shape)}, expected (out_features, in_features)")
    if not weight.is_floating_point():
        raise TypeError(f"weight.dtype={weight.dtype} must be floating point (dequantize first)")


# ----------------------------------------------------------------------------------------------- init


def resolve_block_size(in_features: int, /, *, r: int, oft_block_size: int) -> tuple[int, int]:
    """PEFT's resolution of ``(r, block_size)`` for a layer with ``in_features`` inputs.

    Exactly one of ``r`` and ``oft_block_size`` must be non-zero. When it does not divide ``in_features`` (or
    exceeds it) it is adjusted to the nearest divisor (ties to the smaller; at most ``in_features``) with an
    :class:`OFTBlockSizeWarning` naming the old and new values, exactly as PEFT's ``update_layer`` adjusts.

    Args:
        in_features: the layer's input size.
        r: number of blocks, or 0.
        oft_block_size: block size, or 0.

    Returns:
        ``(r, block_size)`` with ``r * block_size == in_features``.
    """
    r_out, b, message = _resolve(in_features, r, oft_block_size)
    if message is not None:
        warnings.warn(message, OFTBlockSizeWarning, stacklevel=2)
    return r_out, b


def oft_init(
    in_features: int,
    /,
    *,
    r: int = 0,
    oft_block_size: int = 32,
    block_share: bool = False,
    init_weights: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> OFTParams:
    """Fresh :class:`OFTParams` for a layer, PEFT's shapes and init.

    Args:
        in_features: the layer's input size; ``r``/``oft_block_size`` are resolved by :func:`resolve_block_size`
            (which warns when it adjusts them).
        r, oft_block_size: exactly one non-zero (PEFT's config fields).
        block_share: one shared block: params (1, b(b-1)/2).
        init_weights: True -> zeros (the identity rotation, PEFT's default); False -> N(0, 0.1²) entries
            (a random non-identity rotation, PEFT's ``init_weights=False``), drawn from ``generator``.
        generator, dtype, device: as for ``torch.randn`` (dtype defaults to the default dtype).

    Returns:
        ``OFTParams(q)`` with ``q`` of shape (r, b(b-1)/2), or (1, b(b-1)/2) with ``block_share``.
    """
    if not isinstance(init_weights, bool):
        raise ValueError(f"init_weights={init_weights!r} must be True or False")
    r_out, b = resolve_block_size(in_features, r=r, oft_block_size=oft_block_size)
    shape = (1 if block_share else r_out, b * (b - 1) // 2)
    if init_weights:
        return OFTParams(torch.zeros(shape, dtype=dtype, device=device))
    return OFTParams(torch.randn(shape, generator=generator, dtype=dtype, device=device) * 0.1)


# ----------------------------------------------------------------------------------------------- apply


def oft_blocks(
    params: OFTParams,
    /,
    *,
    block_size: int,
    block_share: bool = False,
    use_cayley_neumann: bool = True,
    num_cayley_neumann_terms: int = 5,
    coft: bool = False,
    eps: float = 6e-5,
) -> Tensor:
    """The rotation blocks ``R_i``: PEFT's ``_cayley_batch`` of the params (COFT-projected when ``coft``).

    Args:
        params: :class:`OFTParams`, ``q`` of shape (rows, b(b-1)/2).
        block_size, block_share, use_cayley_neumann, num_cayley_neumann_terms, coft, eps: see :func:`oft_rotate`.

    Returns:
        (rows, b, b) blocks, dtype of ``q`` (rows = r, or 1 with ``block_share``). Exact Cayley blocks are
        orthogonal; Cayley-Neumann blocks approximate the transposes of the exact ones (as PEFT's).
    """
    _check_statics(block_size, num_cayley_neumann_terms, eps)
    _check_q(params.q, None, block_size, block_share)
    return _rotations(
        params.q, block_size=block_size, use_cayley_neumann=use_cayley_neumann,
        num_cayley_neumann_terms=num_cayley_neumann_terms, coft=coft, eps=eps,
    )


def oft_rotate(
    params: OFTParams,
    x: Tensor,
    /,
    *,
    block_size: int,
    block_share: bool = False,
    use_cayley_neumann: bool = True,
    num_cayley_neumann_terms: int = 5,
    coft: bool = False,
    eps: float = 6e-5,
    training: bool = False,
    module_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rotate the last dim of ``x`` block-wise: block ``i`` of each row becomes ``x_i @ R_i`` (PEFT's forward).

    ``base(oft_rotate(params, x, ...))`` is PEFT's OFT ``Linear`` forward. As PEFT, ``x`` is cast to ``q``'s dtype,
    rotated, and cast back.

    Args:
        params: :class:`OFTParams`, ``q`` of shape (in/b, b(b-1)/2), or (1, b(b-1)/2) with ``block_share``.
        x: "*batch in" with ``in`` divisible by ``block_size``.
        block_size: ``b``.
        block_share: one block shared by all ``in/b`` positions.
        use_cayley_neumann: Neumann series (PEFT's default) instead of the exact Cayley transform. NB the series
            approximates the transpose of the exact rotation, as in PEFT.
        num_cayley_neumann_terms: ``n >= 1`` (3 gives the same as 4, as PEFT).
        coft: constrain each ``Q`` to the Frobenius ball of radius ``eps / sqrt(rows)`` (value projected,
            gradient straight through; nothing is written -- use :func:`coft_project` to keep the projection).
        eps: COFT radius, ``>= 0``.
        training, module_dropout: when ``training`` and ``module_dropout > 0``, each of the ``in/b`` blocks is
            replaced by the identity with probability ``module_dropout`` (PEFT 0.21.2 never applies its dropout).
        generator: the only source of randomness (dropout).

    Returns:
        "*batch in", dtype of ``x``.
    """
    _check_statics(block_size, num_cayley_neumann_terms, eps)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"x has shape={tuple(x.shape)}, expected (*batch, in_features)")
    check_float("x", x)
    check_float("params.q", params.q)
    check_same_device(("params.q", params.q), ("x", x))
    in_features = x.shape[-1]
    _check_q(params.q, in_features, block_size, block_share)
    if not isinstance(module_dropout, (int, float)) or not 0.0 <= module_dropout <= 1.0:
        raise ValueError(f"module_dropout={module_dropout!r} must be in [0, 1]")
    q = params.q
    R = _cached_rotations(
        q, block_size=block_size, use_cayley_neumann=use_cayley_neumann,
        num_cayley_neumann_terms=num_cayley_neumann_terms, coft=coft, eps=eps,
    )
    xb = rearrange(x.to(q.dtype), "... (r b) -> ... r b", b=block_size)
    if block_share:
        y = xb @ R[0]
    else:
        y = torch.einsum("...rk,rkc->...rc", xb, R)
    if training and module_dropout > 0:
        rank = in_features // block_size
        u = torch.rand(rank, generator=generator, device=x.device)
        dropped = (u < module_dropout).unsqueeze(-1)  # (r, 1): identity for these blocks
        y = torch.where(dropped, xb, y)
    return rearrange(y, "... r b -> ... (r b)").to(x.dtype)


# ----------------------------------------------------------------------------------------------- matrix


def oft_matrix(
    params: OFTParams,
    /,
    *,
    in_features: int,
    block_size: int,
    block_share: bool = False,
    use_cayley_neumann: bool = True,
    num_cayley_neumann_terms: int = 5,
    coft: bool = False,
    eps: float = 6e-5,
) -> Tensor:
    """The dense (in, in) ``blockdiag(R_1, ..., R_r)``: PEFT's ``get_delta_weight``. For reference and tests.

    ``oft_rotate(params, x) == x @ oft_matrix(params)`` and ``oft_merge(params, W) == W @ oft_matrix(params).T``.

    Returns:
        (in_features, in_features), dtype of ``q``.
    """
    _check_statics(block_size, num_cayley_neumann_terms, eps)
    _check_q(params.q, in_features, block_size, block_share)
    R = _rotations(
        params.q, block_size=block_size, use_cayley_neumann=use_cayley_neumann,
        num_cayley_neumann_terms=num_cayley_neumann_terms, coft=coft, eps=eps,
    )
    rank = in_features // block_size
    R = R.expand(rank, block_size, block_size)
    eye = torch.eye(rank, dtype=R.dtype, device=R.device)
    dense = torch.einsum("rij,rs->risj", R, eye)
    return dense.reshape(in_features, in_features)


# ----------------------------------------------------------------------------------------------- merge


def oft_merge(
    params: OFTParams,
    weight: Tensor,
    /,
    *,
    block_size: int,
    block_share: bool = False,
    use_cayley_neumann: bool = True,
    num_cayley_neumann_terms: int = 5,
    coft: bool = False,
    eps: float = 6e-5,
    out: Tensor | None = None,
    backup: Tensor | None = None,
) -> Tensor:
    """Merged weight ``W' = W blockdiag(R)ᵀ`` (PEFT's merge), block-wise: never builds the (in, in) matrix.

    ``F.linear(x, W') == F.linear(oft_rotate(params, x), W)``. Computed in float32 at least; returns a new tensor.

    Args:
        params: :class:`OFTParams`.
        weight: (out_features, in_features) float weight.
        block_size, ...: :func:`oft_rotate`'s statics.
        out: optional preallocated (out_features, in_features) tensor (``weight``'s dtype and device,
            contiguous, not overlapping ``weight``) that receives ``W'`` with no full-size temporary when the
            weight is float32/float64; returned as the result. Eager only (an in-place write).
        backup: with ``out=weight``, a merge in place: a contiguous tensor of ``weight``'s shape, dtype and device,
            not overlapping it, that receives the original weight while ``W'`` is written over it (each piece of
            rows is saved, then multiplied from the saved copy while it is in cache: one pass over the weight).
            ``weight`` must be contiguous; if the loop is interrupted, ``weight`` is left as it was. Eager only.

    Returns:
        (out_features, in_features), dtype of ``weight``.
    """
    _check_statics(block_size, num_cayley_neumann_terms, eps)
    _check_weight(weight, block_size)
    _check_q(params.q, weight.shape[1], block_size, block_share)
    if out is not None:
        from .road import _check_out

        _check_out(out, weight, backup)
    elif backup is not None:
        raise ValueError("backup= is for a merge in place: pass out=weight with it")
    dtype = _merge_dtype(weight, params.q)
    R = _rotations(
        params.q.to(dtype), block_size=block_size, use_cayley_neumann=use_cayley_neumann,
        num_cayley_neumann_terms=num_cayley_neumann_terms, coft=coft, eps=eps,
    )
    if out is not None:
        if dtype == weight.dtype:
            return _block_matmul_rows(weight, R, block_size, out, backup)
        if backup is not None:
            backup.copy_(weight)
            weight = backup
        return out.copy_(_block_matmul(weight.to(dtype), R, block_size))
    return _block_matmul_fresh(weight, R, block_size, dtype)


def oft_unmerge(
    params: OFTParams,
    weight: Tensor,
    /,
    *,
    block_size: int,
    block_share: bool = False,
    use_cayley_neumann: bool = True,
    num_cayley_neumann_terms: int = 5,
    coft: bool = False,
    eps: float = 6e-5,
) -> Tensor:
    """The exact inverse of :func:`oft_merge`: ``W = W' blockdiag(R)⁻ᵀ``, block-wise.

    Exact Cayley blocks are orthogonal, so their inverse is their transpose (no solve at all). Cayley-Neumann
    blocks are not exactly orthogonal: each small (b, b) block is inverted (Householder QR, no pivoting; see
    :func:`rotfunc.linalg.block_inverse`). PEFT instead inverts the dense (in, in) matrix in float32.

    Args:
        params: :class:`OFTParams`.
        weight: (out_features, in_features) merged float weight.
        block_size, ...: :func:`oft_rotate`'s statics.

    Returns:
        (out_features, in_features), dtype of ``weight``.
    """
    _check_statics(block_size, num_cayley_neumann_terms, eps)
    _check_weight(weight, block_size)
    _check_q(params.q, weight.shape[1], block_size, block_share)
    dtype = _merge_dtype(weight, params.q)
    R = _rotations(
        params.q.to(dtype), block_size=block_size, use_cayley_neumann=use_cayley_neumann,
        num_cayley_neumann_terms=num_cayley_neumann_terms, coft=coft, eps=eps,
    )
    inverse = block_inverse(R) if use_cayley_neumann else R.mT
    return _block_matmul_fresh(weight, inverse, block_size, dtype)


def coft_project(params: OFTParams, /, *, eps: float, block_size: int) -> OFTParams:
    """COFT's projection, returned instead of written: each block's ``Q`` scaled into the Frobenius ball of radius
    ``eps / sqrt(rows)`` (rows = ``q.shape[0]``; radius rounded to float32 as PEFT). Blocks inside are unchanged.

    A training loop keeps ``params = coft_project(params, ...)`` after each step to get PEFT's constrained
    parameter; :func:`oft_rotate` with ``coft=True`` already uses the projected value.

    Returns:
        :class:`OFTParams` of the same shape and dtype.
    """
    _check_statics(block_size, 1, eps)
    _check_q(params.q, None, block_size, False)
    q = params.q
    return OFTParams(_project(q, skew(q, block_size=block_size), _coft_radius(eps, q.shape[0])))


# ----------------------------------------------------------------------------------------------- config

@register
@dataclass(frozen=True)
class OFTConfig:
    """OFT's configuration: PEFT's ``OFTConfig`` fields and defaults, implementing ``Adapter``.

    Attributes:
        r: number of blocks per layer, or 0 (then ``oft_block_size`` decides). Exactly one of ``r`` and
            ``oft_block_size`` is non-zero; a value not dividing ``in_features`` is adjusted as PEFT does.
        oft_block_size: block size, or 0. Default 32.
        module_dropout: probability of replacing a block by the identity while training (no effect in PEFT
            0.21.2; see the module docstring).
        target_modules, exclude_modules: module names / regex (lists are stored as tuples).
        fan_in_fan_out: the weight is stored (in, out); merge then works on ``weight.T``.
        bias: "none", "all" or "oft_only" (which biases train: the adapter gets its own trainable
            copy of the adapted layers' biases, used in its forward and merged into the layer's bias).
        layers_to_transform, layers_pattern: PEFT's layer-index selection (e.g. ``[0, 2]`` with ``"layer"``).
        init_weights: True -> identity (zeros), False -> random N(0, 0.1²) params.
        coft, eps: constrained OFT and its radius.
        block_share: one block shared by all positions.
        use_cayley_neumann: the Neumann series (default True, PEFT's code default; PEFT's docstring says False).
        num_cayley_neumann_terms: terms of the series, >= 1.
    """

    peft_type: ClassVar[str] = "OFT"
    # checkpoint keys: params field -> PEFT state-dict suffix
    peft_param_names: ClassVar[dict[str, str]] = {"q": "oft_R.weight"}

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: Any = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: Any = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        normalize_layer_selection(self)
        _check_int("r", self.r, 0)
        _check_int("oft_block_size", self.oft_block_size, 0)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"exactly one of r={self.r} and oft_block_size={self.oft_block_size} must be non-zero"
            )
        if not isinstance(self.module_dropout, (int, float)) or not 0.0 <= self.module_dropout <= 1.0:
            raise ValueError(f"module_dropout={self.module_dropout!r} must be in [0, 1]")
        _check_statics(1, self.num_cayley_neumann_terms, self.eps)
        check_choice("bias", self.bias, ("none", "all", "oft_only"))
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
                if not all(isinstance(v, str) for v in items):
                    raise TypeError(f"{name}={value!r} must contain only str")
                object.__setattr__(self, name, tuple(items))
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"{name}={value!r} must be None, a str or a list of str")

    def block_size(self, in_features: int, /) -> int:
        """The resolved block size for a layer with ``in_features`` inputs (no warning; see ``init``)."""
        return _resolve(in_features, self.r, self.oft_block_size)[1]

    def _statics(self, in_features: int) -> dict[str, Any]:
        return {
            "block_size": self.block_size(in_features),
            "block_share": self.block_share,
            "use_cayley_neumann": self.use_cayley_neumann,
            "num_cayley_neumann_terms": self.num_cayley_neumann_terms,
            "coft": self.coft,
            "eps": self.eps,
        }

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
    ) -> OFTParams:
        """Fresh :class:`OFTParams` for one layer (see :func:`oft_init`; warns when the block size is adjusted)."""
        _check_int("out_features", out_features, 1)
        return oft_init(
            in_features, r=self.r, oft_block_size=self.oft_block_size, block_share=self.block_share,
            init_weights=self.init_weights, generator=generator, dtype=dtype, device=device,
        )

    def init_shared(
        self,
        shapes: Sequence[tuple[int, int]],
        /,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """OFT has no model-wide shared state: None."""
        return None

    def apply(
        self,
        params: OFTParams,
        x: Tensor,
        base: Callable[[Tensor], Tensor],
        /,
        *,
        in_features: int,
        out_features: int,
        shared: Any = None,
        training: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``base(oft_rotate(params, x))`` ("*batch in" -> "*batch out"): PEFT's OFT ``Linear`` forward."""
        if not isinstance(params, OFTParams):
            params = OFTParams(*params)
        if x.shape[-1] != in_features:
            raise ValueError(f"x has shape={tuple(x.shape)}, expected (..., in_features={in_features})")
        rotated = oft_rotate(
            params, x, **self._statics(in_features), training=training, module_dropout=self.module_dropout,
            generator=generator,
        )
        return base(rotated)

    def apply_mixed(
        self,
        params_list: Sequence[OFTParams | None],
        x: Tensor,
        base: Callable[[Tensor], Tensor],
        /,
        *,
        rows: Any,
        in_features: int,
        out_features: int,
        shared: Any = None,
        training: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """A mixed-adapter batch (group ``rows.index[i]`` for row ``i``; ``None``: base output) in one pass:
        each group's rotation blocks are built once (from the inference cache when no grad flows), the rows
        are sorted by group and each group's rows rotated by one batched matmul (``None`` rows pass through),
        then one base call runs on the whole batch.

        Row ``i`` equals :meth:`apply` with ``params_list[rows.index[i]]`` (module dropout, when training,
        draws one block mask per group, as the per-group call does).
        """
        present = [p for p in params_list if p is not None]
        if not present:
            return base(x)
        if x.shape[-1] != in_features:
            raise ValueError(f"x has shape={tuple(x.shape)}, expected (..., in_features={in_features})")
        statics = self._statics(in_features)
        b = statics["block_size"]
        rank = in_features // b
        q0 = present[0].q
        check_float("x", x)
        eye = torch.eye(b, dtype=q0.dtype, device=q0.device).expand(rank, b, b)
        qs = []
        for p in present:
            p = p if isinstance(p, OFTParams) else OFTParams(*p)
            check_float("params.q", p.q)
            check_same_device(("params.q", p.q), ("x", x))
            _check_q(p.q, in_features, b, self.block_share)
            qs.append(p.q)
        rot_statics = {k: statics[k] for k in ("block_size", "use_cayley_neumann", "num_cayley_neumann_terms",
                                                 "coft", "eps")}
        if all(_cacheable(q) for q in qs):  # without grad, each group's blocks come from the inference cache
            built = [_from_cache(q, rot_statics) for q in qs]
        elif self.coft:  # one group at a time: COFT's projection radius depends on each group's own rows
            built = [_rotations(q, **rot_statics) for q in qs]
        else:  # every group's blocks in one batched Cayley(-Neumann) evaluation
            built = list(oft_blocks(OFTParams(torch.stack(qs).flatten(0, 1)), **{**statics, "block_share": False})
                         .unflatten(0, (len(qs), -1)))
        it = iter(built)
        blocks = []
        for p in params_list:
            if p is None:
                blocks.append(None)
                continue
            R = next(it).expand(rank, b, b)
            if training and self.module_dropout > 0:
                u = torch.rand(rank, generator=generator, device=x.device)
                R = torch.where((u < self.module_dropout)[:, None, None], eye, R)
            blocks.append(R)
        return base(_rotate_groups(x.to(q0.dtype), blocks, rows, b).to(x.dtype))

    def merge(
        self, params: OFTParams, weight: Tensor, bias: Tensor | None, /, *, shared: Any = None,
        out: Tensor | None = None, backup: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(W blockdiag(R)ᵀ, bias)``; with ``fan_in_fan_out`` the weight is (in, out) and stays so.
        ``out``, ``backup``: as :func:`oft_merge`'s (the merged weight written into ``out``; with ``out=weight``
        and ``backup``, in place, the original saved into ``backup`` on the way)."""
        if not isinstance(params, OFTParams):
            params = OFTParams(*params)
        if self.fan_in_fan_out:
            w = weight.mT
            if backup is not None:
                from .road import _check_out

                _check_out(out, weight, backup)
                merged = oft_merge(params, backup.copy_(weight).mT, **self._statics(w.shape[-1])).mT
                return out.copy_(merged), bias
            merged = oft_merge(params, w, **self._statics(w.shape[-1])).mT
            return (merged.contiguous() if out is None else out.copy_(merged)), bias
        return oft_merge(params, weight, **self._statics(weight.shape[-1]), out=out, backup=backup), bias

    def unmerge(
        self, params: OFTParams, weight: Tensor, bias: Tensor | None, /, *, shared: Any = None
    ) -> tuple[Tensor, Tensor | None]:
        """The inverse of :meth:`merge`."""
        if not isinstance(params, OFTParams):
            params = OFTParams(*params)
        if self.fan_in_fan_out:
            w = weight.mT
            return oft_unmerge(params, w, **self._statics(w.shape[-1])).mT.contiguous(), bias
        return oft_unmerge(params, weight, **self._statics(weight.shape[-1])), bias

    def num_params(self, in_features: int, out_features: int, /) -> int:
        """``rows * b(b-1)/2`` with rows = r (1 with block_share), as PEFT counts ``oft_R.weight``."""
        r, b, _ = _resolve(in_features, self.r, self.oft_block_size)
        return (1 if self.block_share else r) * (b * (b - 1) // 2)

    # --- PEFT config interchange

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's ``OFTConfig`` fields (what its ``adapter_config.json`` holds, minus generic keys)."""
        return peft_dict(self, omit_if_none=())

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], /) -> "OFTConfig":
        """A config from PEFT's ``adapter_config.json`` dict; ValueError naming any unknown key.

        As PEFT's ``check_kwargs``: a dict without ``oft_block_size`` is a pre-0.14 OFT adapter, whose weights
        are incompatible (ValueError).
        """
        kwargs = peft_kwargs(cls, d)
        if "oft_block_size" not in d:
            raise ValueError(
                "this OFT config has no 'oft_block_size': it comes from PEFT < 0.14, whose OFT weights are "
                f"incompatible (keys: {sorted(d)})"
            )
        return cls(**kwargs)


def _rotate_groups(x: Tensor, blocks: Sequence[Tensor | None], rows: Any, b: int, /) -> Tensor:
    """Rows of ``x`` ("n ... (r b)") rotated by their group's blocks ("r b b"; ``None``: left as they are).

    Rows that come group after group (``rows.contiguous``): each group's rows are rotated by one ``bmm`` over
    its r blocks that reads them in place (a strided "r (n m) b" view of the group's slice), and one ``cat``
    writes the results back as "n ... (r b)": the one layout copy a single adapter's ``einsum`` makes.

    Other rows: one gather sorts them by group straight into a block-major "r n m b" layout, every group is
    rotated there (one ``bmm`` over all (block, group) pairs when every group has blocks and as many rows),
    and one gather puts them back in row order as "n ... (r b)": two copies, no separate sort.
    """
    n, r = x.shape[0], x.shape[-1] // b
    sizes = list(rows.sizes)
    if rows.contiguous:
        xs = x.reshape(n, -1, r, b)
        m = xs.shape[1]
        parts = []
        for xg, R in zip(xs.split(sizes), blocks):
            if R is None:
                parts.append(xg)
                continue
            yg = torch.bmm(xg.permute(2, 0, 1, 3).reshape(r, -1, b), R)  # a view of the group's rows, no copy
            parts.append(yg.view(r, xg.shape[0], m, b).permute(1, 2, 0, 3))
        # one copy back to "n m r b" for all groups (a block-major split and join, then a permuting copy, measured
        # slower at layer level: 16.2-17.2 ms vs 14.2 ms fwd + bwd at 1536 wide)
        return torch.cat(parts).view(x.shape)
    xs = x.reshape(n, -1, r, b).permute(2, 0, 1, 3).index_select(1, rows.order)  # "r n m b", grouped
    m = xs.shape[2]
    if all(R is not None for R in blocks) and len(set(sizes)) == 1:
        g = len(sizes)
        Rs = torch.stack(list(blocks), 1).reshape(r * g, b, b)  # "(r g) b b", matching xs's "(r g) (n m) b"
        ys = torch.bmm(xs.view(r * g, sizes[0] * m, b), Rs).view(r, n, m, b)
    else:
        ys = torch.cat([
            xg if R is None else torch.bmm(xg.reshape(r, -1, b), R).view(xg.shape)
            for xg, R in zip(xs.split(sizes, 1), blocks)
        ], 1)
    return ys.permute(1, 2, 0, 3).index_select(0, rows.inverse).view(x.shape)
