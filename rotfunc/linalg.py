"""Small batched linear algebra for rotation adapters: skew-symmetric packing and the Cayley transform.

OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", arXiv 2306.07280) and
OFTv2 (Qiu et al. 2025, arXiv 2506.19847) parametrize each orthogonal block by a skew-symmetric ``Q`` (``Qᵀ = -Q``)
through the Cayley transform. Everything here is batched over leading dimensions, builds tensors out of place
(no writes into fresh tensors, no ``.item()``, static loop counts), and so composes with ``torch.func.grad``,
``vmap``, ``jvp`` and ``torch.compile``.

Conventions, matching HuggingFace PEFT 0.21.2's ``tuners/oft`` exactly:

* :func:`skew` unpacks ``b(b-1)/2`` entries in ``torch.triu_indices(b, b, 1)`` (row-major) order into the strictly
  upper triangle ``U`` and returns ``Q = U - Uᵀ``.
* :func:`cayley` is PEFT's exact path, ``R = (I - Q)(I + Q)⁻¹``.
* :func:`cayley_neumann` is PEFT's truncated series ``I + 2Q + 2Q² + ... + 2Q^(n-2) + Q^(n-1)``, which approximates
  ``(I + Q)(I - Q)⁻¹ = cayley(Q)ᵀ`` -- the *transpose* of the exact path. Switching between the two modes in PEFT
  (and so here) gives the transposed rotation for the same parameters.

How the exact path is computed. PEFT calls ``torch.linalg.solve`` (LU with partial pivoting). On this project's
2-core machine a batched LU solve of 256x256 blocks and larger was seen to fail intermittently inside MKL ("Pivots
given to lu_solve must all be greater or equal to 1"). :func:`cayley` never pivots: since ``Q`` is skew,
``(I + Q)ᵀ(I + Q) = (I - Q)(I + Q) = I - Q²`` is symmetric positive definite with every eigenvalue ``>= 1``, and all
these matrices are polynomials in ``Q`` and commute, so

    ``R = (I - Q)(I + Q)⁻¹ = (I - Q²)⁻¹ (I - Q)²  with  (I - Q)² = I - 2Q + Q²``

is one matrix product, one Cholesky factorization (which cannot fail: the matrix is SPD with eigenvalues >= 1) and
one Cholesky solve. Its float32 error against a float64 reference is the same order as LU's (measured ~3e-7 at
``||Q||₂ ~ 0.2``, ~4e-6 at ``||Q||₂ ~ 20``, blocks of 64 to 512).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_finite_eager, check_float

__all__ = ["skew", "skew_inv", "cayley", "cayley_neumann", "block_inverse"]


# ----------------------------------------------------------------------------------------------- helpers


def _num_packed(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


def _skew_gather_index(block_size: int, device: torch.device) -> Tensor:
    """(b*b,) indices into ``[0, q..., -q...]`` that lay out ``Q = U - Uᵀ`` row-major."""
    b = block_size
    n = _num_packed(b)
    rows, cols = torch.triu_indices(b, b, 1, device=device)
    k = torch.arange(n, device=device)
    index = torch.zeros(b, b, dtype=torch.long, device=device)
    # Built once per call from constants (not from any input tensor): a plain index_put on a constant is fine.
    index = index.index_put((rows, cols), 1 + k).index_put((cols, rows), 1 + n + k)
    return index.reshape(b * b)


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types have no CPU LAPACK kernels; PEFT's exact path also ends up in float32 for them (its identity is a
    # float32 eye, which promotes), then casts back.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ----------------------------------------------------------------------------------------------- public


def skew(q: Tensor, /, *, block_size: int) -> Tensor:
    """Skew-symmetric blocks from packed strictly-upper entries, PEFT's ordering.

    Args:
        q: "... n" with ``n = block_size * (block_size - 1) // 2``: entries of the strictly upper triangle in
            ``torch.triu_indices(block_size, block_size, 1)`` order (PEFT's ``oft_R.weight`` rows).
        block_size: ``b``, the side of each block.

    Returns:
        "... b b" tensor ``Q = U - Uᵀ`` (same dtype and device as ``q``).

    Example:
        >>> skew(torch.tensor([1.0, 2.0, 3.0]), block_size=3)
        tensor([[ 0.,  1.,  2.],
                [-1.,  0.,  3.],
                [-2., -3.,  0.]])
    """
    _check_block_size(block_size)
    n = _num_packed(block_size)
    if q.ndim < 1 or q.shape[-1] != n:
        raise ValueError(
            f"q has shape={tuple(q.shape)}, expected (..., {n}) = block_size*(block_size-1)/2 for "
            f"block_size={block_size}"
        )
    index = _skew_gather_index(block_size, q.device)
    padded = torch.cat([q.new_zeros(*q.shape[:-1], 1), q, -q], dim=-1)
    return padded.index_select(-1, index).reshape(*q.shape[:-1], block_size, block_size)


def skew_inv(Q: Tensor, /) -> Tensor:
    """Packed strictly-upper entries of "... b b" blocks, PEFT's ``triu_indices`` order: "... b(b-1)/2"."""
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"Q has shape={tuple(Q.shape)}, expected (..., b, b) square blocks")
    b = Q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=Q.device)
    return Q[..., rows, cols]


def cayley(Q: Tensor, /) -> Tensor:
    """Exact Cayley transform ``R = (I - Q)(I + Q)⁻¹`` of skew-symmetric blocks, PEFT's exact convention.

    ``R`` is orthogonal with determinant +1 for every skew ``Q``. Computed without pivoting as
    ``(I - Q²)⁻¹ (I - Q)²`` by a Cholesky factorization of the SPD matrix ``I - Q² = (I + Q)ᵀ(I + Q)`` (see the
    module docstring for why: batched LU solves of large blocks were unreliable on this machine). Half-precision
    inputs are computed in float32 and cast back, as PEFT does.

    Args:
        Q: "... b b" skew-symmetric blocks (only skew inputs give the Cayley transform; not checked).

    Returns:
        "... b b" orthogonal blocks, dtype of ``Q``. Note: the transpose of what :func:`cayley_neumann`
        approximates, as in PEFT.
    """
    check_float("Q", Q)
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"Q has shape={tuple(Q.shape)}, expected (..., b, b) square blocks")
    check_finite_eager("Q", Q)  # a NaN would otherwise surface as a raw LinAlgError from the factorization
    dtype = Q.dtype
    Qc = Q.to(_compute_dtype(dtype))
    eye = torch.eye(Q.shape[-1], dtype=Qc.dtype, device=Q.device)
    Q2 = Qc @ Qc
    spd = eye - Q2  # (I + Q)ᵀ (I + Q): eigenvalues 1 + s² >= 1
    rhs = eye - 2.0 * Qc + Q2  # (I - Q)²
    L = torch.linalg.cholesky(spd)
    return torch.cholesky_solve(rhs, L).to(dtype)


def cayley_neumann(Q: Tensor, /, *, num_terms: int = 5) -> Tensor:
    """PEFT's truncated Cayley-Neumann series, with PEFT's coefficients.

    ``n = num_terms``:

    * ``n = 1``: ``I``;
    * ``n = 2``: ``I + 2Q``;
    * ``n >= 3``: ``I + 2Q + 2Q² + ... + 2Q^(m-2) + Q^(m-1)`` with ``m = max(n, 4)`` -- so 3 terms give the same
      matrix as 4 (``I + 2Q + 2Q² + Q³``), exactly as PEFT 0.21.2 computes it.

    The full series ``I + 2Σ Q^k`` is ``(I + Q)(I - Q)⁻¹ = cayley(Q)ᵀ`` for ``||Q|| < 1``: this approximates the
    *transpose* of :func:`cayley`, as PEFT's two modes do. The result is only approximately orthogonal; its error
    falls as ``n`` grows for small ``||Q||``. Computed in ``Q``'s dtype (as PEFT).

    Args:
        Q: "... b b" skew-symmetric blocks.
        num_terms: ``n >= 1``, a static int.

    Returns:
        "... b b", dtype of ``Q``.
    """
    if not isinstance(num_terms, int) or isinstance(num_terms, bool) or num_terms < 1:
        raise ValueError(f"num_terms={num_terms!r} must be an int >= 1")
    check_float("Q", Q)
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"Q has shape={tuple(Q.shape)}, expected (..., b, b) square blocks")
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    if num_terms == 1:
        return eye.expand(Q.shape).clone()
    if num_terms == 2:
        return eye + 2.0 * Q
    # Otherwise R = sum_k c_k Q^k, c = (1, 2, ..., 2, 1) up to degree d = m - 1, evaluated as a polynomial in Q²:
    # R = A_0 + Q²(A_1 + Q²(A_2 + ...)) with A_j = c_2j I + c_2j+1 Q. That takes 1 + (d - 1) // 2 block products
    # instead of d - 1 (5 terms: 2 instead of 3); the same polynomial, up to rounding.
    d = max(num_terms, 4) - 1
    if d == 4:  # PEFT's default, 5 terms: I + 2Q + 2Q² + 2Q³ + Q⁴ = (I + Q²)(I + Q² + 2Q), 2 products and 1 sum
        # (I + Q² in one baddbmm): fewer elementwise passes over the blocks, forward and backward, than Horner's
        Q3 = Q.reshape(-1, Q.shape[-2], Q.shape[-1])
        T = torch.baddbmm(eye, Q3, Q3)
        return torch.bmm(T, torch.add(T, Q3, alpha=2.0)).reshape(Q.shape)
    coef = [1.0] + [2.0] * (d - 1) + [1.0]
    Q2 = Q @ Q
    j = d // 2
    if 2 * j + 1 <= d:  # the top pair has an odd term: A_j is a full matrix
        acc = Q2 @ (coef[2 * j] * eye + coef[2 * j + 1] * Q)
    else:  # A_j = c_2j I: Q² A_j is a scaling
        acc = coef[2 * j] * Q2
    for j in range(j - 1, 0, -1):
        acc = Q2 @ (coef[2 * j] * eye + coef[2 * j + 1] * Q + acc)
    return acc + coef[1] * Q + eye


_LARGE_BLOCK = 256  # from this block size on, avoid MKL's batched LU (see block_inverse)


def block_inverse(R: Tensor, /) -> Tensor:
    """Inverses of "... b b" blocks, dtype of ``R``.

    Blocks smaller than 256: batched LU (``torch.linalg.inv``), the fastest here. Blocks of 256 and more: by
    Householder QR (no pivoting), ``R = QₕTₕ`` gives ``R⁻¹ = Tₕ⁻¹ Qₕᵀ`` by one triangular solve — backward
    stable, and it avoids MKL's batched LU, which was seen to fail intermittently for such blocks with 2 threads
    ("Pivots given to lu_solve must all be greater or equal to 1"). A singular block gives non-finite entries.
    """
    if R.ndim < 2 or R.shape[-1] != R.shape[-2]:
        raise ValueError(f"R has shape={tuple(R.shape)}, expected (..., b, b) square blocks")
    dtype = R.dtype
    Rc = R.to(_compute_dtype(dtype))
    if R.shape[-1] < _LARGE_BLOCK:
        return torch.linalg.inv(Rc).to(dtype)
    Qh, Th = torch.linalg.qr(Rc)
    return torch.linalg.solve_triangular(Th, Qh.mT, upper=True).to(dtype)
