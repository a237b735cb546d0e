"""rotfunc.testing: its strategies keep their promises, and rotfunc's own property tests run on them."""

from __future__ import annotations

import doctest
import importlib
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import rotfunc.testing as T
from rotfunc import REGISTRY
from rotfunc.linalg import cayley, cayley_neumann, skew
from rotfunc.oft import OFTParams
from rotfunc.randlora import RandLoraParams
from rotfunc.road import RoadParams, apply_road, road_matrix

EPS64 = torch.finfo(torch.float64).eps
K = 8  # as in test_contract: error allowed in units of eps * ||reference||


def fro(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.to(torch.float64)))


def close(got: torch.Tensor, want: torch.Tensor, *, scale: float | None = None) -> bool:
    """||got - want||_F <= K eps64 * scale (default ||want||_F); float64 results."""
    return fro(got - want) <= K * EPS64 * (fro(want) if scale is None else scale)


# ------------------------------------------------------------------------------------------- the module


def test_import_without_hypothesis_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    monkeypatch.setitem(sys.modules, "hypothesis.strategies", None)
    monkeypatch.delitem(sys.modules, "rotfunc.testing")
    with pytest.raises(ImportError, match=r"pip install rotfunc\[test\]"):
        importlib.import_module("rotfunc.testing")


def test_rotfunc_itself_never_imports_hypothesis():
    import pathlib

    import rotfunc

    for path in pathlib.Path(rotfunc.__file__).parent.glob("*.py"):
        if path.name != "testing.py":
            src = path.read_text()
            assert "hypothesis" not in src and ".testing" not in src, f"{path.name} imports the test extra"


def test_docstring_example_runs():
    result = doctest.testmod(T, raise_on_error=False, verbose=False)
    assert result.attempted >= 4 and result.failed == 0


def test_public_names_are_exported():
    assert set(T.__all__) <= set(dir(T))
    assert {"ROAD", "OFT", "RANDLORA"} <= set(T.STRATEGIES)


def test_bad_arguments_name_the_values():
    with pytest.raises(ValueError, match="in_multiple_of=64"):
        T.layer_shapes(max_features=32, in_multiple_of=64)
    with pytest.raises(ValueError, match="in_features=10 is not divisible by block_size=4"):
        T.oft_params(10, block_size=4)
    with pytest.raises(ValueError, match="min_alpha=0"):
        T.road_params(8, variant="road_1", group_size=4, min_alpha=0.0)
    with pytest.raises(ValueError, match="NOPE"):
        T.adapter_configs(peft_types=["NOPE"])


# ------------------------------------------------------------------------------ configs, shapes, bounds


@given(st.data())
def test_configs_and_shapes_fit(data):
    config = data.draw(T.adapter_configs())
    assert type(config) is REGISTRY[config.peft_type]
    in_f, out_f = data.draw(T.shapes_for(config, max_features=24))
    params = config.init(in_f, out_f)  # would warn (an error here) if OFT had to adjust its block size
    assert config.num_params(in_f, out_f) == sum(t.numel() for t in params)


@given(st.data())
def test_params_for_has_init_shapes_and_bounded_finite_values(data):
    config = data.draw(T.adapter_configs())
    in_f, out_f = data.draw(T.shapes_for(config, max_features=16))
    params = data.draw(T.params_for(config, in_f, out_f))
    template = config.init(in_f, out_f, dtype=torch.float64)
    assert type(params) is type(template)
    for p, t in zip(params, template):
        assert p.shape == t.shape and p.dtype == torch.float64 and torch.isfinite(p).all()


@given(st.sampled_from(("road_1", "road_2", "road_4")), st.sampled_from((2, 4, 8)), st.integers(1, 3), st.data())
def test_road_params_keep_every_block_invertible(variant, group_size, groups, data):
    out_f = group_size * groups
    p = data.draw(T.road_params(out_f, variant=variant, group_size=group_size))
    assert isinstance(p, RoadParams) and ((0.5 <= p.alpha) & (p.alpha <= 1.5)).all()
    R = road_matrix(p, variant=variant, group_size=group_size)
    h = group_size // 2
    i = torch.tensor([g * group_size + k for g in range(groups) for k in range(h)])
    det = R[i, i] * R[i + h, i + h] - R[i, i + h] * R[i + h, i]
    assert (det >= 0.5**2 / 2 - 1e-12).all(), f"a block has det={float(det.min())}"


@given(st.sampled_from((2, 3, 4, 8)), st.integers(1, 3), st.booleans(), st.floats(0.0, 0.9), st.data())
def test_oft_params_bound_each_block_norm(block_size, blocks, share, max_norm, data):
    p = data.draw(T.oft_params(block_size * blocks, block_size=block_size, block_share=share, max_norm=max_norm))
    assert isinstance(p, OFTParams) and p.q.shape[0] == (1 if share else blocks)
    norms = torch.linalg.matrix_norm(skew(p.q, block_size=block_size))
    assert (norms <= max_norm * (1 + 1e-12)).all()


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.data())
def test_randlora_params_bounds(in_f, out_f, r, data):
    p = data.draw(T.randlora_params(in_f, out_f, r=r, max_lambda=2.0))
    assert isinstance(p, RandLoraParams)
    assert p.lambda_.abs().max() <= 2.0 and p.gamma.abs().max() <= 1 / max(in_f, out_f)


def test_random_params_match_the_strategies_bounds():
    g = torch.Generator().manual_seed(0)
    from rotfunc import OFTConfig, RandLoraConfig, RoadConfig

    p = T.random_params(RoadConfig(variant="road_2", group_size=4), 8, 8, generator=g)
    assert p.theta.dtype == torch.float32 and p.theta.abs().max() <= math.pi / 6 + 1e-6
    assert ((p.alpha >= 0.5) & (p.alpha <= 1.5)).all() and not torch.equal(p.alpha, torch.ones(8))
    q = T.random_params(OFTConfig(oft_block_size=4), 16, 8, generator=g, dtype=torch.float64).q
    assert (torch.linalg.matrix_norm(skew(q, block_size=4)) <= 0.5).all()
    lam, gamma = T.random_params(RandLoraConfig(r=2), 6, 10, generator=g)
    assert lam.shape == (2, 3) and gamma.abs().max() <= 0.1


# ------------------------------------------------------------------------ rotfunc's own property tests


@given(T.adapter_cases())
def test_apply_equals_merged_linear(case):
    x = torch.linspace(-1, 1, 3 * case.in_features, dtype=torch.float64).reshape(3, case.in_features)
    base = lambda x: F.linear(x, case.weight, case.bias)  # noqa: E731
    c = case.config
    y = c.apply(case.params, x, base, in_features=case.in_features, out_features=case.out_features, shared=case.shared)
    w, b = c.merge(case.params, case.weight, case.bias, shared=case.shared)
    want = F.linear(x, w, b)
    scale = fro(x) * (fro(w) + fro(case.weight)) + (0.0 if b is None else fro(b))
    assert y.dtype == torch.float64 and close(y, want, scale=scale)


@given(T.adapter_cases())
def test_merge_unmerge_round_trip(case):
    c = case.config
    w, b = c.merge(case.params, case.weight, case.bias, shared=case.shared)
    w0, b0 = c.unmerge(case.params, w, b, shared=case.shared)
    # the inverse, to float64 round-off; the blocks' conditioning is bounded by the strategies (<= ~10)
    assert close(w0, case.weight, scale=10 * (fro(case.weight) + fro(w)))
    assert (b0 is None) == (case.bias is None)
    if b0 is not None:
        assert close(b0, case.bias, scale=10 * (fro(case.bias) + fro(b)))


@given(T.adapter_cases())
def test_identity_at_init(case):
    c = case.config
    params0 = c.init(case.in_features, case.out_features, dtype=torch.float64)
    w, b = c.merge(params0, case.weight, case.bias, shared=case.shared)
    assert close(w, case.weight) and (b is None or close(b, case.bias))


@given(st.sampled_from((2, 3, 4, 8)), st.integers(1, 3), st.floats(0.0, 50.0), st.data())
def test_exact_cayley_blocks_are_rotations(block_size, blocks, max_norm, data):
    p = data.draw(T.oft_params(block_size * blocks, block_size=block_size, max_norm=max_norm))
    R = cayley(skew(p.q, block_size=block_size))
    eye = torch.eye(block_size, dtype=torch.float64)
    assert close(R.mT @ R, eye.expand_as(R), scale=block_size * (1 + max_norm))
    assert torch.allclose(torch.linalg.det(R), torch.ones(blocks, dtype=torch.float64), rtol=0, atol=1e-10)


@given(st.sampled_from((2, 4, 8)), st.integers(1, 3), st.data())
def test_road_1_with_unit_alpha_preserves_norms(group_size, groups, data):
    out_f = group_size * groups
    p = data.draw(T.road_params(out_f, variant="road_1", group_size=group_size, min_alpha=1.0, max_alpha=1.0))
    y = data.draw(T.tensors((5, out_f), low=-10.0, high=10.0))
    z = apply_road(p, y, variant="road_1", group_size=group_size)
    norms = torch.linalg.vector_norm(y, dim=-1)
    assert torch.allclose(torch.linalg.vector_norm(z, dim=-1), norms, rtol=0, atol=K * EPS64 * float(norms.max()))


@given(st.sampled_from((2, 3, 4, 8)), st.floats(0.01, 0.5), st.data())
def test_cayley_neumann_error_is_the_power_of_q_and_falls_with_terms(block_size, max_norm, data):
    p = data.draw(T.oft_params(block_size, block_size=block_size, max_norm=max_norm))
    Q = skew(p.q, block_size=block_size)[0]
    exact_t = cayley(Q).mT  # what PEFT's series approximates
    errors = [fro(cayley_neumann(Q, num_terms=n) - exact_t) for n in range(1, 9)]
    assert all(b <= a + 1e-14 for a, b in zip(errors, errors[1:])), errors
    for n in range(3, 9):  # the tail is Q^(m-1) (I+Q)(I-Q)^-1 with an orthogonal factor: ||tail||_F = ||Q^(m-1)||_F
        m = max(n, 4)
        assert abs(errors[n - 1] - fro(torch.linalg.matrix_power(Q, m - 1))) <= 64 * EPS64


def test_randlora_one_element_basis_is_refused_and_never_drawn():
    from rotfunc import RandLoraConfig

    # PEFT divides a one-element A by its std (NaN bases); rotfunc refuses with the values named
    with pytest.raises(ValueError, match=r"r=1 and min_dim=1"):
        RandLoraConfig(r=1).init_shared([(1, 5)])

    @given(T.shapes_for(RandLoraConfig(r=1), max_features=3))
    def never_drawn(shape):
        assert min(shape) >= 2

    never_drawn()
