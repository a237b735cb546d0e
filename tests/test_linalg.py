"""rotfunc.linalg: skew packing, exact Cayley, PEFT's Cayley-Neumann series, block inverses.

References are float64 (per-block unbatched solves); tolerances are per dtype, from that dtype's eps.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rotfunc.linalg import block_inverse, cayley, cayley_neumann, skew, skew_inv



def tol(dtype, scale=1.0):
    """Absolute tolerance for O(1) quantities computed in ``dtype``: a few hundred ulps."""
    return 256 * torch.finfo(dtype).eps * scale


def random_skew(r, b, *, scale, gen, dtype=torch.float64):
    q = torch.randn(r, b * (b - 1) // 2, generator=gen, dtype=torch.float64) * scale
    return skew(q, block_size=b).to(dtype)


def cayley_reference(Q):
    """(I - Q)(I + Q)^-1 in float64, one unbatched LU solve per block (a different path from cayley's)."""
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    flat = Q.reshape(-1, *Q.shape[-2:])
    out = [torch.linalg.solve(eye + Qi, eye - Qi, left=False) for Qi in flat]
    return torch.stack(out).reshape(Q.shape)


def neumann_reference(Q, n):
    """PEFT's coefficients written out: I + 2Q + ... + 2Q^(m-2) + Q^(m-1), m = max(n, 4) for n >= 3."""
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    if n == 1:
        return eye.expand(Q.shape)
    if n == 2:
        return eye + 2 * Q
    m = max(n, 4)
    return eye + sum(2 * torch.linalg.matrix_power(Q, k) for k in range(1, m - 1)) + torch.linalg.matrix_power(Q, m - 1)


# ------------------------------------------------------------------------------------------------ skew


def test_skew_example_and_antisymmetry():
    Q = skew(torch.tensor([1.0, 2.0, 3.0]), block_size=3)
    assert torch.equal(Q, torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]))
    Q = skew(torch.randn(2, 3, 45), block_size=10)
    assert Q.shape == (2, 3, 10, 10)
    assert torch.equal(Q, -Q.mT)


def test_skew_equals_peft_ordering(gen):
    from peft.tuners.oft.layer import OFTRotationModule

    b = 7
    module = OFTRotationModule(3, b * (b - 1) // 2, b, 21)
    q = torch.randn(3, b * (b - 1) // 2, generator=gen)
    assert torch.equal(skew(q, block_size=b), module._pytorch_skew_symmetric(q, b))
    assert torch.equal(skew_inv(skew(q, block_size=b)), q)


def test_skew_block_size_one_is_empty():
    assert torch.equal(skew(torch.zeros(4, 0), block_size=1), torch.zeros(4, 1, 1))


def test_skew_bad_inputs_name_values():
    with pytest.raises(ValueError, match=r"shape=\(2, 5\).*\(\.\.\., 6\).*block_size=4"):
        skew(torch.zeros(2, 5), block_size=4)
    with pytest.raises(ValueError, match="block_size=0"):
        skew(torch.zeros(2, 0), block_size=0)
    with pytest.raises(ValueError, match=r"shape=\(2, 3\)"):
        skew_inv(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------ cayley


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.01, 0.3, 3.0])
def test_cayley_matches_float64_reference(gen, dtype, scale):
    Q = random_skew(5, 12, scale=scale, gen=gen)
    R = cayley(Q.to(dtype))
    assert R.dtype == dtype
    ref = cayley_reference(Q)
    # Error grows with the conditioning of I + Q (sigma_max of Q), as for any solve.
    sigma = torch.linalg.matrix_norm(Q, ord=2).max().item()
    torch.testing.assert_close(R.double(), ref, atol=tol(dtype, 1 + sigma**2), rtol=0)


def test_cayley_equals_peft_exact_path(gen):
    from peft.tuners.oft.layer import OFTRotationModule

    b = 6
    module = OFTRotationModule(4, b * (b - 1) // 2, b, 24)
    q = torch.randn(4, b * (b - 1) // 2, generator=gen, dtype=torch.float64) * 0.5
    peft_R = module._cayley_batch(q, b, use_cayley_neumann=False)
    torch.testing.assert_close(cayley(skew(q, block_size=b)), peft_R, atol=tol(torch.float64), rtol=0)


@pytest.mark.parametrize("b,r", [(256, 3), (512, 2)])
def test_cayley_large_blocks_correct_every_time(b, r):
    """Batched LU solves of >= 256 blocks failed intermittently here (MKL pivots); cayley avoids pivoting."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        Q = random_skew(r, b, scale=0.3 / math.sqrt(b), gen=g)
        R = cayley(Q.float())
        assert torch.isfinite(R).all()
        ref = cayley_reference(Q)
        torch.testing.assert_close(R.double(), ref, atol=tol(torch.float32, 4), rtol=0)
        eye = torch.eye(b, dtype=torch.float64)
        torch.testing.assert_close(R.double().mT @ R.double(), eye.expand(r, b, b), atol=tol(torch.float32, 4), rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cayley_half_computed_in_float32(gen, dtype):
    Q = random_skew(3, 8, scale=0.2, gen=gen)
    R = cayley(Q.to(dtype))
    assert R.dtype == dtype
    expected = cayley(Q.to(dtype).float()).to(dtype)  # PEFT: float32 solve, cast back
    assert torch.equal(R, expected)


@settings(max_examples=20)
@given(
    b=st.integers(1, 9),
    r=st.integers(1, 3),
    scale=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_cayley_properties(b, r, scale, seed):
    """Orthogonal, det +1, norm preserving; inverse = transpose; identity at Q = 0."""
    g = torch.Generator().manual_seed(seed)
    Q = random_skew(r, b, scale=scale, gen=g)
    R = cayley(Q)
    eye = torch.eye(b, dtype=torch.float64).expand(r, b, b)
    torch.testing.assert_close(R.mT @ R, eye, atol=tol(torch.float64, 1 + scale**2 * b), rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(r, dtype=torch.float64), atol=1e-10, rtol=0)
    v = torch.randn(r, b, generator=g, dtype=torch.float64)
    Rv = (R @ v.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(Rv.norm(dim=-1), v.norm(dim=-1), atol=1e-10, rtol=1e-10)
    assert torch.equal(cayley(torch.zeros_like(Q)), eye)


# ------------------------------------------------------------------------------------------------ neumann


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 9])
def test_neumann_coefficients_are_peft_s(gen, n):
    from peft.tuners.oft.layer import OFTRotationModule

    b = 5
    q = torch.randn(3, b * (b - 1) // 2, generator=gen, dtype=torch.float64) * 0.4
    Q = skew(q, block_size=b)
    R = cayley_neumann(Q, num_terms=n)
    torch.testing.assert_close(R, neumann_reference(Q, n), atol=tol(torch.float64), rtol=0)
    module = OFTRotationModule(3, b * (b - 1) // 2, b, 15)
    torch.testing.assert_close(R, module._cayley_batch(q, b, True, n), atol=tol(torch.float64), rtol=0)


def test_neumann_three_terms_equal_four(gen):
    Q = random_skew(2, 6, scale=0.5, gen=gen)
    assert torch.equal(cayley_neumann(Q, num_terms=3), cayley_neumann(Q, num_terms=4))
    assert not torch.equal(cayley_neumann(Q, num_terms=4), cayley_neumann(Q, num_terms=5))


def test_neumann_approximates_the_transpose_of_cayley(gen):
    Q = random_skew(3, 8, scale=0.02, gen=gen)
    R = cayley(Q)
    N = cayley_neumann(Q, num_terms=12)
    sigma = torch.linalg.matrix_norm(Q, ord=2).max().item()
    torch.testing.assert_close(N, R.mT, atol=4 * sigma**11 + 1e-15, rtol=0)  # remainder cayley(Q)ᵀ Q^11
    assert (N - R).abs().max() > 1e-3  # not cayley itself


def neumann_orth_deviation(n, theta):
    """||NᵀN - I||₂ predicted from the eigenvalues i·θ of Q (θ up to ||Q||₂).

    For n >= 3, N = cayley(Q)ᵀ (I - Q^k) with k = max(n, 4) - 1: odd k gives ``θ^(2k)``, even k gives
    ``|(1 ∓ θ^k)² - 1|``; n = 1 is I (0) and n = 2 is I + 2Q (4θ²).
    """
    if n == 1:
        return 0.0
    if n == 2:  # I + 2Q: |1 + 2iθ|² - 1
        return 4 * theta**2
    k = max(n, 4) - 1
    if k % 2 == 1:
        return theta ** (2 * k)
    sign = -1.0 if (k // 2) % 2 == 0 else 1.0  # (iθ)^k = (-1)^(k/2) θ^k
    return abs((1 + sign * theta**k) ** 2 - 1)


@settings(max_examples=15)
@given(b=st.integers(2, 8), theta=st.floats(0.2, 0.6), seed=st.integers(0, 2**16))
def test_neumann_orthogonality_error_falls_with_terms(b, theta, seed):
    """Deviation from orthogonality matches the spectral formula and falls with n along even and odd n.

    NB PEFT's series is ``(I+Q)(I-Q)⁻¹ (I - Q^(n-1))``: odd n (>= 5) leave an error ~2||Q||^(n-1), even n only
    ~||Q||^(2n-2), so e.g. 5 terms are *less* orthogonal than 4. Both subsequences fall as n grows.
    """
    g = torch.Generator().manual_seed(seed)
    Q = random_skew(1, b, scale=1.0, gen=g)
    Q = Q * (theta / torch.linalg.matrix_norm(Q, ord=2).clamp_min(1e-30))  # ||Q||₂ = theta exactly-ish
    eye = torch.eye(b, dtype=torch.float64)
    devs = {}
    for n in [1, 2, 4, 5, 6, 7, 8, 9]:
        N = cayley_neumann(Q, num_terms=n)
        devs[n] = torch.linalg.matrix_norm(N.mT @ N - eye, ord=2).item()
        expected = neumann_orth_deviation(n, theta)
        assert abs(devs[n] - expected) <= 1e-9 * max(expected, 1e-6) + 1e-13, (n, devs[n], expected)
    assert devs[2] > devs[4] > devs[6] > devs[8]
    assert devs[5] > devs[7] > devs[9]


def test_neumann_bad_terms_named():
    with pytest.raises(ValueError, match="num_terms=0"):
        cayley_neumann(torch.zeros(2, 2), num_terms=0)
    with pytest.raises(ValueError, match=r"shape=\(2, 3\)"):
        cayley_neumann(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"shape=\(3,\)"):
        cayley(torch.zeros(3))


# ------------------------------------------------------------------------------------------------ inverse


@pytest.mark.parametrize("b,r", [(5, 4), (256, 2), (512, 1)])
def test_block_inverse(gen, b, r):
    Q = random_skew(r, b, scale=0.5 / math.sqrt(b), gen=gen)
    N = cayley_neumann(Q, num_terms=5)
    for dtype in (torch.float32, torch.float64):
        inv = block_inverse(N.to(dtype))
        assert inv.dtype == dtype
        eye = torch.eye(b, dtype=torch.float64).expand(r, b, b)
        torch.testing.assert_close(inv.double() @ N, eye, atol=tol(dtype, 4), rtol=0)
