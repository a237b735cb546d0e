"""A stateful property test of the shims: random sequences of operations on a model with a float, an int8 and an
nf4 layer and three adapters of different methods on overlapping layer sets, checked after every step against a
float64 recomputation from the stored params and the original weights."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch.nn import functional as F

import rotfunc
from rotfunc import BASE_ADAPTER
from shim_models import LINEARS, assert_same, base_layer, dequantized64, fingerprint, full_fingerprint, mixed_model

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")

CONFIGS = {
    "r": rotfunc.RoadConfig(variant="road_2", group_size=8, target_modules=["0", "2", "4"]),
    "o": rotfunc.OFTConfig(oft_block_size=8, target_modules=["2", "4", "6"], use_cayley_neumann=False, bias="oft_only"),
    "l": rotfunc.RandLoraConfig(r=8, randlora_alpha=16, target_modules=["0", "4"]),
}
NAMES = tuple(CONFIGS)
PRISTINE = mixed_model(seed=3)
X = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))


def _layer_params(params: dict[str, torch.Tensor], path: str, name: str, config) -> tuple[tuple, torch.Tensor | None]:
    prefix = f"{path}.rotfunc.{name}."
    fields = {k[len(prefix):]: v.double() for k, v in params.items() if k.startswith(prefix)}
    bias = fields.pop("bias", None)
    ptype = type(config.init(32, 32))
    return ptype(**fields), bias


def reference(originals, adapters, x, names):
    """float64 forward of the original base weights with adapter ``names[i]`` on sample ``i``."""
    h = x.double()
    for i, path in enumerate(LINEARS):
        W, b = originals[path]
        rows = []
        for j, n in enumerate(names):
            xj = h[j : j + 1]
            entry = adapters.get(n)
            if entry is None or path not in entry["layers"]:
                rows.append(F.linear(xj, W, b))
                continue
            cfg = entry["config"]
            p, own_bias = _layer_params(entry["params"], path, n, cfg)
            bb = own_bias if own_bias is not None else b
            shared = None if entry["shared"] is None else type(entry["shared"])(*(t.double() for t in entry["shared"]))
            rows.append(cfg.apply(p, xj, lambda z, bb=bb: F.linear(z, W, bb), in_features=32, out_features=32,
                                  shared=shared))
        h = torch.cat(rows)
        if i < len(LINEARS) - 1:
            h = torch.tanh(h)
    return h


def current64(model, x):
    """float64 forward of the model's *current* base weights (what a merged model must compute)."""
    h = x.double()
    for i, path in enumerate(LINEARS):
        W, b = dequantized64(base_layer(model, path))
        h = F.linear(h, W, b)
        if i < len(LINEARS) - 1:
            h = torch.tanh(h)
    return h


def assert_close64(out, ref):
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


class ShimMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = copy.deepcopy(PRISTINE)
        self.original = fingerprint(self.model)
        self.originals64 = {p: dequantized64(base_layer(self.model, p)) for p in LINEARS}
        self.adapters: dict[str, dict] = {}  # name -> config, layers, params (float32 copies), shared
        self.active = None
        self.enabled = True
        self.merged = None

    # ---------------------------------------------------------------- helpers

    def refused(self, exc, fn, *args, **kwargs):
        before = full_fingerprint(self.model)
        with pytest.raises(exc):
            fn(*args, **kwargs)
        assert_same(full_fingerprint(self.model), before)

    def names_for_forward(self):
        n = self.active if self.enabled and self.active is not None else BASE_ADAPTER
        return [n] * X.shape[0]

    # ---------------------------------------------------------------- rules

    @rule(name=st.sampled_from(NAMES))
    def attach(self, name):
        if name in self.adapters:
            self.refused(ValueError, rotfunc.attach, self.model, CONFIGS[name], adapter_name=name)
            return
        rotfunc.attach(self.model, CONFIGS[name], adapter_name=name)
        layers = {p for p, w in rotfunc.adapted_layers(self.model) if name in w.slots}
        shared = next(w.slots[name].shared() for p, w in rotfunc.adapted_layers(self.model) if name in w.slots)
        self.adapters[name] = dict(config=CONFIGS[name], layers=layers, params=rotfunc.adapter_params(self.model, name),
                                   shared=shared)
        if self.active is None:
            self.active = name

    @rule(name=st.sampled_from(NAMES + (None,)))
    def detach(self, name):
        if name is not None and name not in self.adapters:
            self.refused(ValueError, rotfunc.detach, self.model, name)
            return
        rotfunc.detach(self.model, name)
        drop = set(self.adapters) if name is None else {name}
        if self.merged in drop:
            self.merged = None
        for n in drop:
            del self.adapters[n]
        if self.active in drop:
            self.active = next(iter(self.adapters), None)
        if not self.adapters:
            self.enabled = True  # a model with no adapter has no state left

    @rule(name=st.sampled_from(NAMES))
    def set_adapter(self, name):
        if name not in self.adapters:
            self.refused(ValueError, rotfunc.set_adapter, self.model, name)
        elif self.merged is not None and self.merged != name:
            self.refused(RuntimeError, rotfunc.set_adapter, self.model, name)
        else:
            rotfunc.set_adapter(self.model, name)
            self.active = name

    @precondition(lambda self: self.adapters)
    @rule(on=st.booleans())
    def enable_or_disable(self, on):
        if not on and self.merged is not None:
            self.refused(RuntimeError, rotfunc.disable_adapters, self.model)
            return
        (rotfunc.enable_adapters if on else rotfunc.disable_adapters)(self.model)
        self.enabled = on

    @rule(name=st.sampled_from(NAMES), safe=st.booleans())
    def merge(self, name, safe):
        if name not in self.adapters:
            self.refused(ValueError, rotfunc.merge, self.model, name)
        elif self.merged is not None:
            self.refused(RuntimeError, rotfunc.merge, self.model, name, safe_merge=safe)
        else:
            rotfunc.merge(self.model, name, safe_merge=safe)
            self.merged = name

    @precondition(lambda self: self.merged is None and self.adapters)
    @rule(data=st.data())
    def failing_merge(self, data):
        name = data.draw(st.sampled_from(sorted(self.adapters)))
        good = rotfunc.adapter_params(self.model, name)
        last = max(self.adapters[name]["layers"])  # the last layer merged: everything before it must roll back
        key = next(k for k in good if k.startswith(f"{last}.rotfunc.") and not k.endswith(".bias"))
        rotfunc.load_params(self.model, {key: torch.full_like(good[key], float("nan"))})
        self.refused(ValueError, rotfunc.merge, self.model, name, safe_merge=True)
        rotfunc.load_params(self.model, good)

    @rule()
    def unmerge(self):
        rotfunc.unmerge(self.model)
        self.merged = None

    @precondition(lambda self: self.adapters)
    @rule(data=st.data(), seed=st.integers(0, 2**16), scale=st.sampled_from([0.05, 0.3]))
    def load_good(self, data, seed, scale):
        name = data.draw(st.sampled_from(sorted(self.adapters)))
        g = torch.Generator().manual_seed(seed)
        new = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in self.adapters[name]["params"].items()}
        if name == self.merged:
            self.refused(RuntimeError, rotfunc.load_params, self.model, new)
            return
        rotfunc.load_params(self.model, new)
        self.adapters[name]["params"] = new

    @precondition(lambda self: self.adapters)
    @rule(data=st.data(), kind=st.sampled_from(["int64", "bool", "complex", "base_key", "packed_key", "list", "meta"]))
    def load_bad(self, data, kind):
        name = data.draw(st.sampled_from(sorted(self.adapters)))
        params = rotfunc.adapter_params(self.model, name)
        k0 = next(iter(params))
        good = {k: v + 1.0 for k, v in params.items()}
        exc, bad = TypeError, dict(good)
        if kind in ("int64", "bool", "complex"):
            bad[k0] = params[k0].to({"int64": torch.int64, "bool": torch.bool, "complex": torch.complex64}[kind])
        elif kind == "base_key":
            exc, bad["0.base_layer.weight" if "0" in dict(rotfunc.adapted_layers(self.model)) else "0.weight"] = KeyError, torch.zeros(32, 32)
        elif kind == "packed_key":
            exc = KeyError
            key = next(n for n, p in self.model.named_parameters() if n.startswith("4.") and p.dtype == torch.uint8)
            bad[key] = torch.zeros(1)
        elif kind == "list":
            bad[k0] = params[k0].tolist()
        else:  # a meta tensor after good keys: nothing may be copied
            exc, last = ValueError, list(good)[-1]
            bad[last] = torch.empty(params[last].shape, device="meta")
        self.refused(exc, rotfunc.load_params, self.model, bad)

    @precondition(lambda self: self.adapters)
    @rule(picks=st.lists(st.sampled_from(NAMES + (BASE_ADAPTER,)), min_size=5, max_size=5), grouped=st.booleans())
    def mixed_forward(self, picks, grouped):
        names = [p if p in self.adapters or p == BASE_ADAPTER else BASE_ADAPTER for p in picks]
        if self.merged is not None:
            self.refused(RuntimeError, self.model, X, adapter_names=names)
            return
        x = X
        if grouped:  # rows ordered adapter after adapter: every layer takes views instead of gathers
            order, names = rotfunc.group_rows(names)
            x = X[order]
        with torch.no_grad():
            with rotfunc.adapter_batch(self.model, names):
                out = self.model(x)
        assert_close64(out, reference(self.originals64, self.adapters, x, names))

    @precondition(lambda self: self.adapters)
    @rule(data=st.data())
    def save_and_load_into_a_fresh_copy(self, data):
        name = data.draw(st.sampled_from(sorted(self.adapters)))
        fresh = copy.deepcopy(PRISTINE)
        with tempfile.TemporaryDirectory() as d:
            rotfunc.save_adapter(self.model, d, adapter_name=name)
            rotfunc.load_adapter(fresh, d, adapter_name=name)
        with torch.no_grad():
            out = fresh(X)
        assert_close64(out, reference(self.originals64, self.adapters, X, [name] * X.shape[0]))

    # ---------------------------------------------------------------- invariants

    @invariant()
    def state_is_the_reference_state(self):
        s = rotfunc.adapter_state(self.model)
        assert (s.active, s.merged, s.batch) == (self.active, self.merged, None)
        if self.adapters:
            assert s.enabled == self.enabled
        assert rotfunc.adapter_names(self.model) == [n for n in rotfunc.adapter_names(self.model) if n in self.adapters]
        assert set(rotfunc.adapter_names(self.model)) == set(self.adapters)
        for n, entry in self.adapters.items():
            own = rotfunc.adapter_params(self.model, n)
            assert own.keys() == entry["params"].keys()
            for k, v in own.items():
                assert torch.equal(v, entry["params"][k].to(v.dtype)), k

    @invariant()
    def output_equals_the_reference(self):
        with torch.no_grad():
            out = self.model(X)
        if self.merged is None:
            assert_close64(out, reference(self.originals64, self.adapters, X, self.names_for_forward()))
            return
        # merged: the model computes its current base weights ...
        assert_close64(out, current64(self.model, X))
        # ... which hold the merge of the original weights (float layers to round-off; quantized layers to their
        # requantization error, which bnb's nf4/int8 grids bound)
        entry = self.adapters[self.merged]
        for path in entry["layers"]:
            W0, b0 = self.originals64[path]
            p, own_bias = _layer_params(entry["params"], path, self.merged, entry["config"])
            shared = None if entry["shared"] is None else type(entry["shared"])(*(t.double() for t in entry["shared"]))
            W1, b1 = entry["config"].merge(p, W0, own_bias if own_bias is not None else b0, shared=shared)
            Wc, bc = dequantized64(base_layer(self.model, path))
            rel = ((Wc - W1).norm() / W1.norm()).item()
            reported = self.model._rotfunc_hub.records[path].rel_fro_error  # 0.0 for float layers
            assert rel <= reported * 1.001 + 1e-6 and reported < 0.15, (path, rel, reported)
            if b1 is not None:
                torch.testing.assert_close(bc, b1, rtol=1e-5, atol=1e-6)

    @invariant()
    def base_is_byte_identical_when_nothing_is_merged(self):
        if self.merged is None:
            assert_same(fingerprint(self.model), self.original)


ShimMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=20, deadline=None)
TestShims = ShimMachine.TestCase
