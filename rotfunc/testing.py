"""Hypothesis strategies for rotfunc's adapters: configs, layer shapes, params and whole adapted layers.

A thin, composable layer over :mod:`hypothesis.strategies`, so that users can property-test their own variants
the way rotfunc tests its adapters. Every strategy draws small sizes and bounded, finite values, chosen so that
the adapters' invariants hold exactly in real arithmetic (and to round-off in floating point):

- RoAD: scales ``alpha`` in ``[min_alpha, max_alpha]`` (bounded away from 0) and angles small enough that every
  2x2 block has ``det >= min_alpha**2 / 2`` (road_1: any angle, det = alpha^2; road_2: ``|theta| <= pi/6``;
  road_4: ``|theta| <= atan(min_alpha / (2 max_alpha))``), so unmerge is always well conditioned;
- OFT: packed entries bounded so that each block's ``||Q||_F <= max_norm`` (default 0.5), where the
  Cayley-Neumann series converges and its error falls with the number of terms;
- RandLoRA: ``|lambda_| <= max_lambda``, ``|gamma| <= max_gamma`` (default ``1 / max(in, out)``, PEFT's init
  scale);
- any other registered adapter: its ``config.init`` params plus a bounded perturbation (see :func:`params_for`).

Strategies (all return ``SearchStrategy`` objects):

- configs: :func:`road_configs`, :func:`oft_configs`, :func:`randlora_configs`, :func:`adapter_configs` (any
  adapter in :data:`rotfunc.adapter.REGISTRY`);
- shapes: :func:`layer_shapes`, :func:`shapes_for` (the shapes a given config accepts);
- tensors: :func:`tensors`, :func:`linear_weights`;
- params: :func:`road_params`, :func:`oft_params`, :func:`randlora_params`, :func:`params_for` (any config);
- everything at once: :func:`adapter_cases` -> :class:`AdapterCase` (config, shape, params, shared, weight, bias).

:func:`random_params` draws the same kind of params from a ``torch.Generator`` instead (any size, no
hypothesis), e.g. for deterministic contract tests.

hypothesis is a test extra: importing this module without it raises an ImportError that says
``pip install rotfunc[test]``. ``import rotfunc`` never imports this module.

Example:
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from rotfunc.testing import adapter_cases
    >>> @settings(max_examples=10, deadline=None)
    ... @given(adapter_cases())
    ... def test_merge_round_trip(case):
    ...     c = case.config
    ...     w, b = c.merge(case.params, case.weight, case.bias, shared=case.shared)
    ...     w0, b0 = c.unmerge(case.params, w, b, shared=case.shared)
    ...     torch.testing.assert_close(w0, case.weight)
    >>> test_merge_round_trip()

Extending: register a fourth adapter's strategies with :func:`register_strategies` (all three parts are
optional; without them :func:`adapter_configs` draws the config class's defaults, :func:`shapes_for` any shape
and :func:`params_for` perturbs ``config.init``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

try:
    from hypothesis import strategies as st
    from hypothesis.strategies import SearchStrategy
except ImportError as e:  # pragma: no cover - exercised in tests by hiding hypothesis
    raise ImportError(
        "rotfunc.testing needs hypothesis, which is a test extra: pip install rotfunc[test] "
        "(or pip install hypothesis)"
    ) from e

from . import adapter as _adapter
from .oft import OFTConfig
from .randlora import RandLoraConfig
from .road import VARIANTS, RoadConfig

__all__ = [
    "LayerShape",
    "LinearWeights",
    "AdapterCase",
    "AdapterStrategies",
    "STRATEGIES",
    "register_strategies",
    "tensors",
    "layer_shapes",
    "shapes_for",
    "linear_weights",
    "road_configs",
    "oft_configs",
    "randlora_configs",
    "adapter_configs",
    "road_params",
    "oft_params",
    "randlora_params",
    "params_for",
    "adapter_cases",
    "random_params",
]



class LayerShape(NamedTuple):
    """A linear layer's sizes (note the order: the Adapter protocol's ``init(in_features, out_features)``)."""

    in_features: int
    out_features: int


class LinearWeights(NamedTuple):
    """A plain linear layer's weight "out in" and bias "out" (or None)."""

    weight: Tensor
    bias: Tensor | None


class AdapterCase(NamedTuple):
    """One adapted layer: everything the ``Adapter`` protocol's methods take."""

    config: Any  # an Adapter config
    in_features: int
    out_features: int
    params: tuple[Tensor, ...]  # the config's params NamedTuple, non-identity in general
    shared: tuple[Tensor, ...] | None  # config.init_shared([(out, in)]), None for most adapters
    weight: Tensor  # "out in"
    bias: Tensor | None  # "out" or None


@dataclass(frozen=True)
class AdapterStrategies:
    """What rotfunc.testing knows about one adapter type (every part optional).

    Attributes:
        configs: ``() -> SearchStrategy[config]``.
        shapes: ``(config, min_features, max_features) -> SearchStrategy[LayerShape]``, the shapes it accepts.
        bounds: ``(config, in_features, out_features) -> [(low, high), ...]``, one pair per params leaf (a
            float or a tensor of the leaf's shape for each bound); :func:`params_for` and
            :func:`random_params` draw every element within them.
    """

    configs: Callable[[], SearchStrategy] | None = None
    shapes: Callable[[Any, int, int], SearchStrategy] | None = None
    bounds: Callable[[Any, int, int], Sequence[tuple[Any, Any]]] | None = None


STRATEGIES: dict[str, AdapterStrategies] = {}
"""Per ``peft_type``: the strategies of the built-in adapters, extended by :func:`register_strategies`."""


def register_strategies(
    peft_type: str,
    /,
    *,
    configs: Callable[[], SearchStrategy] | None = None,
    shapes: Callable[[Any, int, int], SearchStrategy] | None = None,
    bounds: Callable[[Any, int, int], Sequence[tuple[Any, Any]]] | None = None,
) -> None:
    """Teach :func:`adapter_configs`, :func:`shapes_for`, :func:`params_for` and :func:`random_params` about an
    adapter type (see :class:`AdapterStrategies` for the three callables)."""
    STRATEGIES[peft_type.upper()] = AdapterStrategies(configs, shapes, bounds)


# ----------------------------------------------------------------------------------------------- helpers


def _strategy(value: Any, /) -> SearchStrategy:
    """A strategy as is, a list/tuple/range as ``sampled_from``, anything else as ``just``."""
    if isinstance(value, SearchStrategy):
        return value
    if isinstance(value, (list, tuple, range)):
        if len(value) == 0:
            raise ValueError("an empty sequence of choices was given")
        return st.sampled_from(value)
    return st.just(value)


def _check_features(name: str, value: Any, /) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")


def _road_max_angle(variant: str, min_alpha: float, max_alpha: float) -> float:
    # det of a block >= min_alpha^2 / 2 (road_2: cos(2a) = 1/2; road_4: cos^2(a) (m^2 - M^2 tan^2 a) >= 0.7 m^2)
    return {"road_1": math.pi, "road_2": math.pi / 6, "road_4": math.atan(0.5 * min_alpha / max_alpha)}[variant]


def _road_bounds(variant: str, min_alpha: float, max_alpha: float, max_angle: float | None):
    if not 0.0 < min_alpha <= max_alpha or not math.isfinite(max_alpha):
        raise ValueError(f"min_alpha={min_alpha}, max_alpha={max_alpha} must satisfy 0 < min_alpha <= max_alpha < inf")
    a = _road_max_angle(variant, min_alpha, max_alpha) if max_angle is None else max_angle
    if not 0.0 <= a <= math.pi:
        raise ValueError(f"max_angle={max_angle!r} must be in [0, pi]")
    return [(-a, a), (min_alpha, max_alpha)]


def _oft_entry_bound(block_size: int, max_norm: float) -> float:
    if not 0.0 <= max_norm < math.inf:
        raise ValueError(f"max_norm={max_norm!r} must be a finite float >= 0")
    n = block_size * (block_size - 1) // 2
    # ||Q||_F^2 = 2 * sum(q^2) <= 2 * n * c^2 = max_norm^2
    return max_norm / math.sqrt(2 * n) if n else 0.0


def _randlora_bounds(in_features: int, out_features: int, max_lambda: float, max_gamma: float | None):
    g = 1.0 / max(in_features, out_features) if max_gamma is None else max_gamma
    return [(-max_lambda, max_lambda), (-g, g)]


def _perturbation_bounds(template: Sequence[Tensor], scale: float = 0.25):
    """Fallback: each leaf's init value +- scale * max(1, max|init|)."""
    out = []
    for t in template:
        t64 = t.detach().to(torch.float64)
        d = scale * max(1.0, float(t64.abs().max())) if t64.numel() else scale
        out.append((t64 - d, t64 + d))
    return out


def _rebuild(template: Any, leaves: Sequence[Tensor]) -> Any:
    return type(template)(*leaves) if hasattr(type(template), "_fields") else tuple(leaves)


def _bounds_of(config: Any, in_features: int, out_features: int, template: Sequence[Tensor]):
    entry = STRATEGIES.get(getattr(config, "peft_type", ""), AdapterStrategies())
    bounds = entry.bounds(config, in_features, out_features) if entry.bounds is not None else None
    if bounds is None:
        bounds = _perturbation_bounds(template)
    if len(bounds) != len(template):
        raise ValueError(
            f"{type(config).__name__}: {len(bounds)} (low, high) bounds for {len(template)} params leaves"
        )
    return bounds


# ----------------------------------------------------------------------------------------------- tensors


def tensors(
    shape: Sequence[int], /, *, low: Any = -1.0, high: Any = 1.0, dtype: torch.dtype = torch.float64
) -> SearchStrategy[Tensor]:
    """Tensors of ``shape`` with every element in ``[low, high]``, drawn element by element (keep them small).

    Args:
        shape: the tensor's shape.
        low, high: finite bounds, floats or tensors broadcastable to ``shape`` (per-element bounds).
        dtype: the result's dtype (values are drawn in float64, then cast).

    Returns:
        A strategy of "shape" tensors; with float bounds they shrink towards 0 (or the bound nearest it).
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if isinstance(low, Tensor) or isinstance(high, Tensor):
        lo = torch.as_tensor(low, dtype=torch.float64).expand(shape)
        span = torch.as_tensor(high, dtype=torch.float64).expand(shape) - lo
        unit = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)
        return st.lists(unit, min_size=n, max_size=n).map(
            lambda v: (lo + span * torch.tensor(v, dtype=torch.float64).reshape(shape)).to(dtype)
        )
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"low={low!r}, high={high!r} must be finite with low <= high")
    elems = st.floats(min_value=float(low), max_value=float(high), allow_nan=False, allow_infinity=False)
    return st.lists(elems, min_size=n, max_size=n).map(
        lambda v: torch.tensor(v, dtype=torch.float64).reshape(shape).to(dtype)
    )


def layer_shapes(
    *, min_features: int = 1, max_features: int = 32, in_multiple_of: int = 1, out_multiple_of: int = 1
) -> SearchStrategy[LayerShape]:
    """Small linear layer sizes: ``LayerShape(in_features, out_features)``.

    Args:
        min_features, max_features: inclusive size range of both dims.
        in_multiple_of, out_multiple_of: each dim is a multiple of these (e.g. OFT's block size, RoAD's group
            size); the range must contain one.
    """
    for name, v in (("min_features", min_features), ("max_features", max_features),
                    ("in_multiple_of", in_multiple_of), ("out_multiple_of", out_multiple_of)):
        _check_features(name, v)

    def sizes(m: int, name: str) -> SearchStrategy[int]:
        lo, hi = -(-min_features // m), max_features // m
        if lo > hi:
            raise ValueError(f"no multiple of {name}={m} lies in [{min_features}, {max_features}]")
        return st.integers(lo, hi).map(lambda k: k * m)

    return st.builds(LayerShape, sizes(in_multiple_of, "in_multiple_of"), sizes(out_multiple_of, "out_multiple_of"))


def shapes_for(config: Any, /, *, min_features: int = 1, max_features: int = 32) -> SearchStrategy[LayerShape]:
    """The layer shapes ``config`` accepts (e.g. ``out % group_size == 0`` for RoAD, ``in % block_size == 0``
    for OFT, so that no block size is adjusted), sizes in ``[min_features, max_features]``."""
    entry = STRATEGIES.get(getattr(config, "peft_type", ""), AdapterStrategies())
    if entry.shapes is not None:
        return entry.shapes(config, min_features, max_features)
    return layer_shapes(min_features=min_features, max_features=max_features)


def linear_weights(
    in_features: int,
    out_features: int,
    /,
    *,
    bias: bool | SearchStrategy[bool] = st.booleans(),
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> SearchStrategy[LinearWeights]:
    """A plain linear layer's ``LinearWeights(weight "out in", bias "out" | None)``, entries in ``[-scale, scale]``."""
    _check_features("in_features", in_features)
    _check_features("out_features", out_features)
    w = tensors((out_features, in_features), low=-scale, high=scale, dtype=dtype)
    b = tensors((out_features,), low=-scale, high=scale, dtype=dtype)
    return _strategy(bias).flatmap(lambda has: st.builds(LinearWeights, w, b if has else st.none()))


# ----------------------------------------------------------------------------------------------- configs


def road_configs(
    *, variant: Any = VARIANTS, group_size: Any = (2, 4, 8), init_weights: Any = True
) -> SearchStrategy[RoadConfig]:
    """:class:`~rotfunc.road.RoadConfig` s. Each argument is a strategy, a sequence to sample from, or a value."""
    return st.builds(
        RoadConfig, variant=_strategy(variant), group_size=_strategy(group_size), init_weights=_strategy(init_weights)
    )


def oft_configs(
    *,
    oft_block_size: Any = (2, 3, 4, 8),
    block_share: Any = (False, True),
    use_cayley_neumann: Any = (True, False),
    num_cayley_neumann_terms: Any = st.integers(1, 8),
    coft: Any = False,
    eps: Any = 6e-5,
    init_weights: Any = True,
    bias: Any = "none",
) -> SearchStrategy[OFTConfig]:
    """:class:`~rotfunc.oft.OFTConfig` s by block size (``r=0``). Arguments as in :func:`road_configs`;
    ``bias=("none", "oft_only")`` also draws adapters that train their own copy of the layers' biases."""
    return st.builds(
        OFTConfig,
        r=st.just(0),
        oft_block_size=_strategy(oft_block_size),
        block_share=_strategy(block_share),
        use_cayley_neumann=_strategy(use_cayley_neumann),
        num_cayley_neumann_terms=_strategy(num_cayley_neumann_terms),
        coft=_strategy(coft),
        eps=_strategy(eps),
        init_weights=_strategy(init_weights),
        bias=_strategy(bias),
    )


def randlora_configs(
    *,
    r: Any = st.integers(1, 6),
    randlora_alpha: Any = st.floats(0.5, 16.0),
    projection_prng_key: Any = st.integers(0, 2**16),
    sparse: Any = False,
    very_sparse: Any = False,
    init_weights: Any = True,
    bias: Any = "none",
) -> SearchStrategy[RandLoraConfig]:
    """:class:`~rotfunc.randlora.RandLoraConfig` s. Arguments as in :func:`road_configs`; ``bias`` as in
    :func:`oft_configs` (``"randlora_only"``). (Sparse bases of tiny layers can come out all zero, which
    ``init_shared`` refuses: they are off by default.)"""
    return st.builds(
        RandLoraConfig,
        r=_strategy(r),
        randlora_alpha=_strategy(randlora_alpha),
        projection_prng_key=_strategy(projection_prng_key),
        sparse=_strategy(sparse),
        very_sparse=_strategy(very_sparse),
        init_weights=_strategy(init_weights),
        bias=_strategy(bias),
    )


def adapter_configs(*, peft_types: Sequence[str] | None = None) -> SearchStrategy[Any]:
    """A config of any adapter in :data:`rotfunc.adapter.REGISTRY` (or of the given ``peft_types``).

    Registered adapters without strategies (see :func:`register_strategies`) give their config class's defaults.
    """
    _adapter._load_builtin()
    types = sorted(_adapter.REGISTRY) if peft_types is None else [t.upper() for t in peft_types]
    unknown = [t for t in types if t not in _adapter.REGISTRY]
    if unknown or not types:
        raise ValueError(f"peft_types={peft_types!r}: {unknown} not registered; known: {sorted(_adapter.REGISTRY)}")
    parts = []
    for t in types:
        entry = STRATEGIES.get(t)
        has = entry is not None and entry.configs is not None
        parts.append(entry.configs() if has else st.builds(_adapter.REGISTRY[t]))
    return st.one_of(parts)


# ------------------------------------------------------------------------------------------------ params


def _leaf_strategies(template: Sequence[Tensor], bounds, dtype: torch.dtype) -> SearchStrategy:
    parts = [tensors(tuple(t.shape), low=lo, high=hi, dtype=dtype) for t, (lo, hi) in zip(template, bounds)]
    return st.tuples(*parts).map(lambda leaves: _rebuild(template, leaves))


def road_params(
    out_features: int,
    /,
    *,
    variant: str,
    group_size: int,
    min_alpha: float = 0.5,
    max_alpha: float = 1.5,
    max_angle: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> SearchStrategy:
    """:class:`~rotfunc.road.RoadParams` with ``alpha`` in ``[min_alpha, max_alpha]`` and ``|theta| <= max_angle``.

    ``max_angle=None`` picks the largest angle that keeps every 2x2 block's determinant ``>= min_alpha**2 / 2``
    (pi for road_1, pi/6 for road_2, ``atan(min_alpha / (2 max_alpha))`` for road_4), so unmerge never meets a
    singular block; pass your own to explore singular ones.
    """
    config = RoadConfig(variant=variant, group_size=group_size)
    template = config.init(out_features, out_features, dtype=dtype)
    return _leaf_strategies(template, _road_bounds(variant, min_alpha, max_alpha, max_angle), dtype)


def oft_params(
    in_features: int,
    /,
    *,
    block_size: int,
    block_share: bool = False,
    max_norm: float = 0.5,
    dtype: torch.dtype = torch.float64,
) -> SearchStrategy:
    """:class:`~rotfunc.oft.OFTParams` whose every block has ``||Q||_F <= max_norm`` (so ``||Q||_2 <= max_norm``:
    for ``max_norm < 1`` the Cayley-Neumann series converges, its error falling like ``max_norm**terms``)."""
    if in_features % block_size != 0:
        raise ValueError(f"in_features={in_features} is not divisible by block_size={block_size}")
    config = OFTConfig(r=0, oft_block_size=block_size, block_share=block_share)
    template = config.init(in_features, 1, dtype=dtype)
    c = _oft_entry_bound(block_size, max_norm)
    return _leaf_strategies(template, [(-c, c)], dtype)


def randlora_params(
    in_features: int,
    out_features: int,
    /,
    *,
    r: int,
    max_lambda: float = 1.0,
    max_gamma: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> SearchStrategy:
    """:class:`~rotfunc.randlora.RandLoraParams` with ``|lambda_| <= max_lambda`` and ``|gamma| <= max_gamma``
    (default ``1 / max(in, out)``, PEFT's init value)."""
    config = RandLoraConfig(r=r)
    template = config.init(in_features, out_features, dtype=dtype)
    return _leaf_strategies(template, _randlora_bounds(in_features, out_features, max_lambda, max_gamma), dtype)


def params_for(
    config: Any, in_features: int, out_features: int, /, *, dtype: torch.dtype = torch.float64
) -> SearchStrategy:
    """Params for ``config`` on a layer of this shape: the leaves of ``config.init(...)`` (same shapes, same
    NamedTuple type), each element drawn within the adapter's bounds (the defaults of :func:`road_params`,
    :func:`oft_params`, :func:`randlora_params`; for other adapters, the init value +- 0.25 * max(1, max |init|))."""
    _check_features("in_features", in_features)
    _check_features("out_features", out_features)
    template = config.init(in_features, out_features, dtype=dtype)
    return _leaf_strategies(template, _bounds_of(config, in_features, out_features, template), dtype)


def random_params(
    config: Any,
    in_features: int,
    out_features: int,
    /,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, ...]:
    """Like :func:`params_for`, but one draw from ``generator`` (uniform within the same bounds), at any size.

    Returns:
        ``config``'s params NamedTuple, in ``dtype``; non-identity with probability 1.
    """
    template = config.init(in_features, out_features, dtype=torch.float64)
    leaves = []
    for t, (lo, hi) in zip(template, _bounds_of(config, in_features, out_features, template)):
        u = torch.rand(t.shape, generator=generator, dtype=torch.float64)
        lo = torch.as_tensor(lo, dtype=torch.float64)
        leaves.append((lo + (torch.as_tensor(hi, dtype=torch.float64) - lo) * u).to(dtype))
    return _rebuild(template, leaves)


@st.composite
def _adapter_cases(draw, configs, min_features, max_features, bias, scale, dtype) -> AdapterCase:
    config = draw(configs)
    in_f, out_f = draw(shapes_for(config, min_features=min_features, max_features=max_features))
    params = draw(params_for(config, in_f, out_f, dtype=dtype))
    shared = config.init_shared([(out_f, in_f)], dtype=dtype)
    weight, b = draw(linear_weights(in_f, out_f, bias=bias, scale=scale, dtype=dtype))
    return AdapterCase(config, in_f, out_f, params, shared, weight, b)


def adapter_cases(
    configs: SearchStrategy | None = None,
    /,
    *,
    min_features: int = 1,
    max_features: int = 16,
    bias: bool | SearchStrategy[bool] = st.booleans(),
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> SearchStrategy[AdapterCase]:
    """Whole adapted layers: a config (default :func:`adapter_configs`), a shape it accepts, params within its
    bounds, its shared state (``config.init_shared``) and a base weight/bias with entries in ``[-scale, scale]``.

    Example: ``@given(adapter_cases(road_configs(variant="road_1"), dtype=torch.float32))``.
    """
    return _adapter_cases(
        adapter_configs() if configs is None else configs, min_features, max_features, bias, scale, dtype
    )


# ------------------------------------------------------------------------------- the built-in adapters


def _road_shapes(config: RoadConfig, min_features: int, max_features: int):
    return layer_shapes(min_features=min_features, max_features=max_features, out_multiple_of=config.group_size)


def _oft_shapes(config: OFTConfig, min_features: int, max_features: int):
    # in must be a multiple of the block size (or of r), else PEFT/rotfunc adjust it with a warning
    m = config.oft_block_size if config.r == 0 else config.r
    return layer_shapes(min_features=min_features, max_features=max_features, in_multiple_of=m)


register_strategies(
    "ROAD",
    configs=road_configs,
    shapes=_road_shapes,
    bounds=lambda c, i, o: _road_bounds(c.variant, 0.5, 1.5, None),
)
register_strategies(
    "OFT",
    configs=oft_configs,
    shapes=_oft_shapes,
    bounds=lambda c, i, o: [(-(b := _oft_entry_bound(c.block_size(i), 0.5)), b)],
)
def _randlora_shapes(config: RandLoraConfig, min_features: int, max_features: int):
    # r * min(in, out) >= 2: a one-element basis A has no std (init_shared refuses it)
    lo = max(min_features, 2) if config.r == 1 else min_features
    return layer_shapes(min_features=lo, max_features=max(lo, max_features))


register_strategies(
    "RANDLORA",
    configs=randlora_configs,
    shapes=_randlora_shapes,
    bounds=lambda c, i, o: _randlora_bounds(i, o, 1.0, None),
)
