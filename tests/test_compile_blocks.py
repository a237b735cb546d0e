"""rotfunc.compile_blocks (regional compilation of a model's repeated layers) and the compiled quantized backward.

A small transformer-shaped model (a ``ModuleList`` of blocks, each with a float, an int8 and an nf4 linear) with
RoAD, OFT and RandLoRA attached: after ``compile_blocks`` the autograd step, the forward after every adapter
state change, torch.func transforms and a deep copy all give what the uncompiled model gives; and in a compiled
graph the quantized linear's backward dequantizes from the packed weight instead of keeping the float weight
alive between forward and backward.
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from torch.func import functional_call

import rotfunc
from rotfunc import quant

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),
    # Dynamo probes `hasattr(t, "grad")` on each block's input (an activation, not a leaf) inside
    # torch._logging.hide_warnings; pytest's "error" filter turns the hidden warning into an exception first.
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"),
]

WIDTH = 32


def _fill(layer: nn.Linear, g: torch.Generator) -> nn.Linear:
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.3)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
    return layer


class Block(nn.Module):
    def __init__(self, g: torch.Generator):
        super().__init__()
        self.a = _fill(nn.Linear(WIDTH, WIDTH), g)
        self.b = bnb.nn.Linear8bitLt(WIDTH, WIDTH, has_fp16_weights=False)
        self.b.load_state_dict(_fill(nn.Linear(WIDTH, WIDTH), g).state_dict())
        self.b = self.b.to("cpu")  # quantizes the int8 weight
        self.c = bnb.nn.Linear4bit(WIDTH, WIDTH, quant_type="nf4", compress_statistics=True,
                                   compute_dtype=torch.float32)
        self.c.load_state_dict(_fill(nn.Linear(WIDTH, WIDTH), g).state_dict())
        self.c = self.c.to("cpu")
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.nn.functional.gelu(self.b(h))
        return self.norm(x + self.c(h))


class Tiny(nn.Module):
    def __init__(self, seed: int = 0, n: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(Block(g) for _ in range(n))
        self.head = _fill(nn.Linear(WIDTH, 4), g)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _model() -> nn.Module:
    model = rotfunc.prepare(Tiny())
    g = torch.Generator().manual_seed(1)
    rotfunc.attach(model, rotfunc.RoadConfig(variant="road_2", group_size=8, target_modules=["a", "c"]),
                   adapter_name="road")
    rotfunc.attach(model, rotfunc.OFTConfig(oft_block_size=8, r=0, target_modules=["b", "c"]), adapter_name="oft")
    rotfunc.attach(model, rotfunc.RandLoraConfig(r=8, target_modules=["a", "b"]), adapter_name="rl")
    for name in ("road", "oft", "rl"):  # random non-identity params for every adapter
        params = rotfunc.adapter_params(model, name)
        rotfunc.load_params(model, {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in params.items()})
    rotfunc.set_adapter(model, "road")
    return model.eval()


def _x(seed: int = 2) -> torch.Tensor:
    return torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(seed))


def _loss_fn(model):
    def loss(p, x):
        return (functional_call(model, p, (x,)) ** 2).mean()

    return loss


def _close(actual, expected):
    """Compiled vs eager float32: inductor reassociates sums, so the tolerance is relative to the tensor's scale."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_autograd_step_equals_the_uncompiled_model():
    eager = _model()
    compiled = copy.deepcopy(eager)
    names = rotfunc.compile_blocks(compiled, fullgraph=True)  # inductor, as users get it
    assert names == ["layers.0", "layers.1", "layers.2"]
    x, p = _x(), rotfunc.adapter_params(eager)
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    (v1, g1), (v2, g2) = (rotfunc.value_and_grad(_loss_fn(m))(p, x) for m in (eager, compiled))
    assert counters["stats"]["unique_graphs"] > before  # the blocks did run compiled
    _close(v2, v1)
    assert g2.keys() == g1.keys() and len(g1) == 12  # theta, alpha on "a" and "c" of 3 blocks
    for k in g1:
        _close(g2[k], g1[k])


def test_every_adapter_state_change_reaches_the_compiled_blocks():
    """The adapter state is guarded, not baked into the graph: each change recompiles (or hits the cache).
    Dynamo alone (a backend that runs its graphs as traced), for speed: the guards are Dynamo's."""
    eager = _model()
    compiled = copy.deepcopy(eager)
    graphs = []

    def counting_backend(gm, example_inputs):  # Dynamo alone, counting the graphs it compiles
        graphs.append(gm)
        return gm.forward

    rotfunc.compile_blocks(compiled, backend=counting_backend, fullgraph=True)
    x = _x()
    names = ["road", "oft", "rl", rotfunc.BASE_ADAPTER]
    steps = [
        lambda m: None,
        lambda m: rotfunc.disable_adapters(m),
        lambda m: rotfunc.enable_adapters(m),  # back to a cached variant
        lambda m: rotfunc.set_adapter(m, "oft"),
        lambda m: rotfunc.merge(m),
        lambda m: rotfunc.unmerge(m),
    ]
    with torch.no_grad():
        for change in steps:
            for m in (eager, compiled):
                change(m)
            _close(compiled(x), eager(x))
        # one graph per distinct state (road, disabled, oft, oft merged), shared by the 3 blocks; enabling again
        # and unmerging hit the cache
        assert len(graphs) == 4
        xs = torch.cat((x, _x(3)))  # 4 sequences, one per entry of names
        _close(compiled(xs, adapter_names=names), eager(xs, adapter_names=names))
    # training mode and grad through a mixed batch: every adapter gets its own rows' gradient
    params = {k: v for n in ("road", "oft", "rl") for k, v in rotfunc.adapter_params(eager, n).items()}
    loss = lambda m: lambda p, x: (functional_call(m, p, (x,), {"adapter_names": names}) ** 2).mean()  # noqa: E731
    (v1, g1), (v2, g2) = (rotfunc.value_and_grad(loss(m))(params, xs) for m in (eager, compiled))
    _close(v2, v1)
    for k in g1:
        _close(g2[k], g1[k])


def test_torch_func_transforms_run_the_eager_blocks_and_compose():
    eager = _model()
    compiled = copy.deepcopy(eager)
    rotfunc.compile_blocks(compiled, fullgraph=True)  # never reached: the transforms run the eager blocks
    x, p = _x(), rotfunc.adapter_params(eager)
    # the functorch path of value_and_grad, inside vmap: per-sample grads
    per_sample = [torch.func.vmap(rotfunc.value_and_grad(lambda p, xi, m=m: _loss_fn(m)(p, xi[None])),
                                  in_dims=(None, 0))(p, x) for m in (eager, compiled)]
    _close(per_sample[1][0], per_sample[0][0])
    for k in per_sample[0][1]:
        _close(per_sample[1][1][k], per_sample[0][1][k])
    tangent = {k: torch.ones_like(v) for k, v in p.items()}
    (o1, t1), (o2, t2) = (torch.func.jvp(lambda q: functional_call(m, q, (x,)), (p,), (tangent,))
                          for m in (eager, compiled))
    _close(o2, o1)
    _close(t2, t1)


def test_deepcopy_uncompile_and_models_without_blocks():
    model = _model()
    rotfunc.compile_blocks(model, backend="eager")
    clone = copy.deepcopy(model)
    assert clone.layers[0].forward.__self__ is clone.layers[0]  # the copy runs its own blocks
    x = _x()
    with torch.no_grad():
        _close(clone(x), model(x))
    assert rotfunc.uncompile_blocks(model) == ["layers.0", "layers.1", "layers.2"]
    assert "forward" not in model.layers[0].__dict__ and rotfunc.uncompile_blocks(model) == []
    assert rotfunc.compile_blocks(nn.Sequential(nn.Linear(2, 2), nn.Tanh())) == []
    with pytest.raises(TypeError, match="nn.Module"):
        rotfunc.compile_blocks(lambda x: x)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_compiled_backward_keeps_the_packed_weight_not_the_float_one(kind):
    """In the compiled joint graph, the tensors saved for backward include no (out, in) float weight, and the
    backward dequantizes through rotfunc's grad-input op; gradients equal eager autograd's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    out_f, in_f = 24, 40  # a shape no activation has
    g = torch.Generator().manual_seed(0)
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(in_f, out_f, quant_type="nf4", compute_dtype=torch.float32)
    else:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, has_fp16_weights=False)
    layer.load_state_dict({"weight": torch.randn(out_f, in_f, generator=g), "bias": torch.randn(out_f, generator=g)})
    layer = layer.to("cpu")
    layer = rotfunc.prepare(nn.Sequential(layer))[0]
    seen = {}

    def fw(gm, _):
        seen["saved"] = [n.meta["val"] for n in gm.graph.output_node().args[0][1:] if "val" in n.meta]
        return make_boxed_func(gm)

    def bw(gm, _):
        seen["bw_targets"] = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        return make_boxed_func(gm)

    def f(x):
        return torch.tanh(quant.quant_forward(layer, x)).sum()

    x = torch.randn(7, in_f, generator=g, requires_grad=True)
    (gx,) = torch.autograd.grad(torch.compile(f, backend=aot_autograd(fw_compiler=fw, bw_compiler=bw))(x), x)
    (ref,) = torch.autograd.grad(f(x), x)
    _close(gx, ref)
    floats = [t for t in seen["saved"] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert floats and not [t for t in floats if tuple(t.shape) in ((out_f, in_f), (in_f, out_f))]
    assert torch.ops.rotfunc.quantized_linear_grad_input.default in seen["bw_targets"]
