"""The quantized seam: bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers as pure functions.

This is the only module of rotfunc that imports :mod:`bitsandbytes`. It gives the rest of the library three
things, all adapter-agnostic:

1. **A torch.func-safe quantized linear.** :class:`QuantWeight` is a pytree whose leaves are the packed weight
   and its scales and whose static aux data (:class:`QuantSpec`) holds quant type, blocksize, shape, dtypes.
   :func:`quantized_linear` computes ``F.linear(x, dequantize(W), b)`` in the layer's compute dtype — exactly
   what bitsandbytes' ``Linear4bit.forward`` computes on CPU (``gemm_4bit`` = dequantize + ``F.linear``) and
   what ``Linear8bitLt.forward`` computes in training mode (``MatMul8bitFp``: ``CB * SCB / 127`` +
   ``F.linear``). bitsandbytes' own forwards go through old-style ``autograd.Function`` s, so
   ``torch.func.grad``/``vmap``/``vjp`` raise on them and ``jvp`` through ``Linear4bit`` silently returns a
   zero tangent. rotfunc's path is one ``autograd.Function`` with ``setup_context``, a ``jvp`` and
   ``generate_vmap_rule=True`` that saves the *packed* weight for backward and dequantizes again there, so
   the dequantized float weight (4x-8x the packed bytes) never stays alive between forward and backward.

   rotfunc's 8-bit forward does **not** quantize activations: bitsandbytes' eval-mode 8-bit path
   (``MatMul8bitLt``) also rounds the input to int8 per row, which is ~6e-3 relative off the dequantized
   float product; rotfunc always computes the training-mode product.

2. **dequantize / requantize** with the layer's own settings (quant type, blocksize, double quantization,
   storage dtype, weight dtype, compute dtype, device), and :func:`assign_quantized` to install a payload.
   ``requantize(layer, dequantize(layer))`` reproduces the layer's bytes where bitsandbytes' quantizer is
   idempotent: nf4 without double quantization and int8 bit-exactly; with double quantization the 4-bit codes
   are kept but the 8-bit-quantized absmax moves (its offset is the mean of the re-derived absmax); fp4 flips
   a fraction of a percent of the bytes (+0 / -0 and ties).

3. **Atomic merge, lossless unmerge.** :func:`merge_into` dequantizes, calls a pure
   ``merge_fn(weight_f, bias) -> (weight_f', bias')``, requantizes and assigns — all or nothing: if anything
   raises (or ``safe_merge=True`` and a value is non-finite) the layer is untouched. The returned
   :class:`MergeRecord` keeps the layer's original packed weight and quant state (one extra *quantized* copy
   per merged layer, ~1/8 of the float weight for 4-bit) and the requantization error of the merge;
   :func:`restore` puts the original back bit for bit, so no inverse is ever computed for a quantized layer
   and merge/unmerge cycles never drift. Plain ``nn.Linear`` layers go through the same call; their record keeps
   the original weight and bias tensors (the merge assigns new ones), so their restore is bitwise as well.

bitsandbytes repacks a 4-bit weight into a CPU layout on CPUs with AVX512-BF16 the first time an eval-mode
``Linear4bit`` runs without grad (``quant_state.packing_format_for_cpu``: codes transposed into 32-row
tiles, absmax transposed and rounded to bfloat16, double quantization undone). :func:`quant_weight_of`
reads that layout without touching the layer (it unpacks the codes exactly and takes the bf16 absmax the
layer now holds), and :func:`patch_forward` keeps bitsandbytes' forward from running at all.

Example::

    qw = quant_weight_of(layer)                              # Linear4bit or Linear8bitLt
    y = quantized_linear(qw, x, layer.bias)                  # grad / vmap / jvp / compile safe
    rec = merge_into(layer, lambda w, b: (w * 1.01, b))      # atomic; rec.max_abs_error ...
    restore(layer, rec)                                      # bitwise the original bytes again
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import logging

# bitsandbytes logs a notice at import on CPUs when the optional `kernels` package (a faster eval-mode 4-bit
# CPU kernel rotfunc does not use) is absent; drop only that message so command lines stay one-line clean.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in str(record.msg)
)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbf
import optree
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._checks import check_float, check_shape
from ._memory import fresh_like

__all__ = [
    "QuantSpec",
    "QuantWeight",
    "MergeRecord",
    "is_quantized",
    "quant_weight_of",
    "dequantize",
    "quantized_linear",
    "quant_forward",
    "patch_forward",
    "unpatch_forward",
    "requantize",
    "assign_quantized",
    "merge_into",
    "restore",
    "unmerge_from",
]

MergeFn = Callable[[Tensor, "Tensor | None"], "tuple[Tensor, Tensor | None]"]

_QUANT_TYPES = ("nf4", "fp4", "int8")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------- the pytree


class QuantSpec(NamedTuple):
    """Static description of a quantized weight (hashable; never a pytree leaf)."""

    quant_type: str  # "nf4" | "fp4" | "int8"
    shape: tuple[int, int]  # (out_features, in_features) of the float weight
    dtype: torch.dtype  # dtype dequantize() returns by default: 4-bit quant_state.dtype, float32 for int8
    blocksize: int  # 4-bit block size (64 by default); 0 for int8
    nested_blocksize: int  # 256 with double quantization (compress_statistics), else 0
    compute_dtype: torch.dtype | None  # Linear4bit.compute_dtype; None: compute in the input's dtype
    quant_storage: torch.dtype  # dtype the packed 4-bit codes are stored in (uint8 by default); int8 for int8


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A quantized linear weight as a pytree: tensor leaves + a static :class:`QuantSpec`.

    Leaves (``None`` where a field does not apply; ``n = out * in``):

    - ``data``: 4-bit: packed codes, ``((n + 1) // 2, 1)`` in ``spec.quant_storage`` (two codes a byte in
      bitsandbytes' row-major order, whatever layout the layer currently holds); int8: ``(out, in)`` int8.
    - ``absmax``: 4-bit: per-block absmax, ``(ceil(n / blocksize),)`` float32, or its 8-bit codes (uint8)
      with double quantization; int8: the row scales ``SCB``, ``(out,)`` float32.
    - ``nested_absmax``, ``nested_code``, ``offset``: double quantization's second-level absmax
      ``(ceil(blocks / 256),)`` float32, its 256-entry code and the scalar offset added back.

    The packed leaves are integer tensors: differentiating w.r.t. them is meaningless and
    :func:`quantized_linear` returns no gradient for any leaf.
    """

    data: Tensor
    absmax: Tensor
    nested_absmax: Tensor | None
    nested_code: Tensor | None
    offset: Tensor | None
    spec: QuantSpec

    def tensors(self) -> tuple[Tensor | None, ...]:
        """The leaves in field order (``None`` kept)."""
        return (self.data, self.absmax, self.nested_absmax, self.nested_code, self.offset)


_FIELDS = ("data", "absmax", "nested_absmax", "nested_code", "offset")


def _qw_flatten(qw: QuantWeight):
    present = tuple(t is not None for t in qw.tensors())
    return [t for t in qw.tensors() if t is not None], (qw.spec, present)


def _qw_unflatten(values, context) -> QuantWeight:
    spec, present = context
    it = iter(values)
    return QuantWeight(*(next(it) if p else None for p in present), spec=spec)


def _qw_flatten_with_keys(qw: QuantWeight):
    keyed = [(pytree.GetAttrKey(k), t) for k, t in zip(_FIELDS, qw.tensors()) if t is not None]
    return keyed, _qw_flatten(qw)[1]


# Leaves are the tensors present (None fields are part of the static structure, not leaves).
pytree.register_pytree_node(
    QuantWeight,
    _qw_flatten,
    _qw_unflatten,
    serialized_type_name="rotfunc.quant.QuantWeight",
    flatten_with_keys_fn=_qw_flatten_with_keys,
)
# optree: registered in the "rotfunc" namespace (pass namespace="rotfunc" to optree's tree functions).
optree.register_pytree_node(
    QuantWeight,
    lambda qw: (*_qw_flatten(qw), tuple(k for k, t in zip(_FIELDS, qw.tensors()) if t is not None)),
    lambda context, values: _qw_unflatten(values, context),
    namespace="rotfunc",
)


# ------------------------------------------------------------------------------------ private helpers


def _is_4bit(layer: object) -> bool:
    return isinstance(layer, bnb.nn.Linear4bit)


def _is_8bit(layer: object) -> bool:
    return isinstance(layer, bnb.nn.Linear8bitLt)


def _scb_of(layer: nn.Module) -> Tensor:
    # Before the first forward the scales live on the weight (Int8Params.SCB); Linear8bitLt.forward moves
    # them to layer.state.SCB (init_8bit_state) and clears weight.SCB.
    scb = getattr(layer.weight, "SCB", None)
    if scb is None:
        scb = layer.state.SCB
    if scb is None:
        raise ValueError(
            f"{type(layer).__name__}(in_features={layer.in_features}, out_features={layer.out_features}) is not "
            "quantized yet: call .to('cpu') (or a CUDA device) after loading its float weights"
        )
    return scb


def _unpack_cpu_layout(packed: Tensor, qs: Any) -> tuple[Tensor, Tensor]:
    """Standard (codes, float32 absmax) from bitsandbytes' AVX512-BF16 CPU layout, without mutating anything.

    ``_convert_weight_packed_for_cpu`` turns the ``(n/2, 1)`` codes (two per byte, high nibble first) into
    ``(N, K/2)`` bytes tiled as ``[N/32, K/2, 32, 2]`` with the low nibble holding the first 32 of each 64 codes,
    and the absmax into a ``(K/blocksize, N)`` bfloat16 transpose. Codes are recovered exactly; absmax is what
    the layer now holds (bfloat16-rounded, double quantization already undone by bitsandbytes).
    """
    n_out, k_half = packed.shape
    u8 = packed.view(torch.uint8).reshape(-1, 32)
    qw = torch.cat([u8 & 0xF, u8 >> 4], dim=-1)  # (.., 64): 32 low codes then 32 high codes
    qw = qw.reshape(n_out // 32, k_half, 32, 2).transpose(1, 2).reshape(-1)  # row-major codes of (N, K)
    std = (qw[0::2] << 4) | qw[1::2]
    std = std.reshape(qs.original_qshape)
    storage = getattr(qs, "original_storage_type", None)
    if storage is not None:
        std = std.view(storage)
    absmax = qs.absmax.T.reshape(-1).to(torch.float32)
    return std, absmax


def _quant_weight_4bit(layer: nn.Module) -> QuantWeight:
    w = layer.weight
    qs = getattr(w, "quant_state", None) or getattr(layer, "quant_state", None)
    if qs is None or not getattr(w, "bnb_quantized", True):
        raise ValueError(
            f"Linear4bit(in_features={layer.in_features}, out_features={layer.out_features}) is not quantized "
            "yet: call .to('cpu') (or a CUDA device) after loading its float weights"
        )
    data = w.detach()  # not .data: torch.compile cannot trace .data of a Parameter under torch.func transforms
    if getattr(qs, "packing_format_for_cpu", False):
        data, absmax = _unpack_cpu_layout(data, qs)
        spec = QuantSpec(
            quant_type=qs.quant_type,
            shape=(int(qs.shape[0]), int(qs.shape[1])),
            dtype=qs.original_dtype,
            blocksize=int(qs.blocksize),
            nested_blocksize=0,
            compute_dtype=layer.compute_dtype,
            quant_storage=data.dtype,
        )
        return QuantWeight(data, absmax, None, None, None, spec)
    nested = qs.state2 is not None
    spec = QuantSpec(
        quant_type=qs.quant_type,
        shape=(int(qs.shape[0]), int(qs.shape[1])),
        dtype=qs.dtype,
        blocksize=int(qs.blocksize),
        nested_blocksize=int(qs.state2.blocksize) if nested else 0,
        compute_dtype=layer.compute_dtype,
        quant_storage=data.dtype,
    )
    if nested:
        return QuantWeight(data, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, spec)
    return QuantWeight(data, qs.absmax, None, None, None, spec)


def _quant_weight_8bit(layer: nn.Module) -> QuantWeight:
    if layer.state.has_fp16_weights:
        raise ValueError(
            f"Linear8bitLt(in_features={layer.in_features}, out_features={layer.out_features}) has "
            "has_fp16_weights=True: its weight is float and quantized anew on every forward; rotfunc supports "
            "has_fp16_weights=False layers only"
        )
    cb = layer.weight.detach()  # not .data (see _quant_weight_4bit)
    if cb.dtype != torch.int8:
        raise ValueError(
            f"Linear8bitLt(in_features={layer.in_features}, out_features={layer.out_features}) holds a "
            f"{cb.dtype} weight, not int8: call .to('cpu') (or a CUDA device) to quantize it"
        )
    spec = QuantSpec("int8", (int(cb.shape[0]), int(cb.shape[1])), torch.float32, 0, 0, None, torch.int8)
    return QuantWeight(cb, _scb_of(layer), None, None, None, spec)


def _absmax_f32(qw: QuantWeight) -> Tensor:
    """The 4-bit per-block absmax in float32 (double quantization undone as bitsandbytes does)."""
    if qw.nested_absmax is None:
        return qw.absmax
    deq = torch.ops.bitsandbytes.dequantize_blockwise.default(
        qw.absmax, qw.nested_absmax, qw.nested_code, qw.spec.nested_blocksize, torch.float32
    )
    return deq + qw.offset


def _dequant(qw: QuantWeight, dtype: torch.dtype) -> Tensor:
    """(out, in) float weight in ``dtype``, computed as bitsandbytes' forward computes it for that dtype."""
    spec = qw.spec
    if spec.quant_type == "int8":
        # MatMul8bitFp (Linear8bitLt training forward): CB.to(dtype) * (SCB / 127), rounded once to dtype.
        return (qw.data.to(dtype) * qw.absmax.unsqueeze(1).mul(1.0 / 127.0)).to(dtype)
    out_dtype = dtype if dtype in _FLOAT_DTYPES else spec.dtype
    w = torch.ops.bitsandbytes.dequantize_4bit.default(
        qw.data, _absmax_f32(qw), spec.blocksize, spec.quant_type, list(spec.shape), out_dtype
    )
    return w if out_dtype == dtype else w.to(dtype)


def _ql_forward(x, bias, spec, data, absmax, nested_absmax, nested_code, offset):
    qw = QuantWeight(data, absmax, nested_absmax, nested_code, offset, spec)
    return F.linear(x, _dequant(qw, x.dtype), bias)


def _ql_setup_context(ctx, inputs, output):
    x, bias, spec, *leaves = inputs
    ctx.spec = spec
    ctx.x_shape = x.shape
    ctx.save_for_backward(*leaves)  # the packed weight and its scales, never the dequantized weight


def _ql_backward(ctx, grad_out):
    leaves = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_out @ _dequant(QuantWeight(*leaves, spec=ctx.spec), grad_out.dtype)
    if ctx.needs_input_grad[1]:
        grad_b = grad_out.sum(dim=tuple(range(grad_out.dim() - 1))) if grad_out.dim() > 1 else grad_out
    return (grad_x, grad_b, None) + (None,) * len(leaves)


class _QuantLinear(torch.autograd.Function):
    """``F.linear(x, dequantize(qweight), bias)``; saves the packed leaves and re-dequantizes in backward/jvp."""

    generate_vmap_rule = True
    forward = staticmethod(_ql_forward)
    backward = staticmethod(_ql_backward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _ql_setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[3:])

    @staticmethod
    def jvp(ctx, x_t, bias_t, _spec_t, *_leaf_t):
        leaves = ctx.saved_tensors
        out = None
        if x_t is not None:
            out = F.linear(x_t, _dequant(QuantWeight(*leaves, spec=ctx.spec), x_t.dtype))
        if bias_t is not None:
            out = bias_t.expand(*ctx.x_shape[:-1], bias_t.shape[-1]) if out is None else out + bias_t
        return out


@torch.library.custom_op(
    "rotfunc::quantized_linear_grad_input",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor data, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
    "Tensor? offset, str quant_type, int out_features, int in_features, ScalarType dtype, int blocksize, "
    "int nested_blocksize) -> Tensor",
)
def _grad_input_op(grad_out, data, absmax, nested_absmax, nested_code, offset, quant_type, out_features,
                   in_features, dtype, blocksize, nested_blocksize):
    spec = QuantSpec(quant_type, (out_features, in_features), dtype, blocksize, nested_blocksize, None, data.dtype)
    return grad_out @ _dequant(QuantWeight(data, absmax, nested_absmax, nested_code, offset, spec), grad_out.dtype)


@_grad_input_op.register_fake
def _(grad_out, data, absmax, nested_absmax, nested_code, offset, quant_type, out_features, in_features, dtype,
      blocksize, nested_blocksize):
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


def _ql_backward_compiled(ctx, grad_out):
    """:func:`_ql_backward` for compiled graphs: the input gradient is one opaque op that dequantizes the saved
    packed weight itself. Written as the eager backward, AOTAutograd would see the same ``dequantize`` in the
    forward and the backward, merge the two (CSE) and save the float weight between them (it never
    recomputes a tensor the backward's matmul reads), which is the 4-8x memory the packed path exists to
    avoid."""
    leaves = ctx.saved_tensors
    s = ctx.spec
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.rotfunc.quantized_linear_grad_input(
            grad_out, *leaves, s.quant_type, s.shape[0], s.shape[1], s.dtype, s.blocksize, s.nested_blocksize
        )
    if ctx.needs_input_grad[1]:
        grad_b = grad_out.sum(dim=tuple(range(grad_out.dim() - 1))) if grad_out.dim() > 1 else grad_out
    return (grad_x, grad_b, None) + (None,) * len(leaves)


class _QuantLinearNoJvp(torch.autograd.Function):
    """:class:`_QuantLinear` for torch.compile: no ``jvp`` (Dynamo cannot trace an ``autograd.Function`` that
    defines a custom one) and the backward of :func:`_ql_backward_compiled`."""

    generate_vmap_rule = True
    forward = staticmethod(_ql_forward)
    setup_context = staticmethod(_ql_setup_context)
    backward = staticmethod(_ql_backward_compiled)


# ------------------------------------------------------------------------------------ public: read & run


def is_quantized(layer: object, /) -> bool:
    """True for a bitsandbytes ``Linear4bit`` or a ``Linear8bitLt`` with int8 weights (``has_fp16_weights=False``)."""
    if _is_4bit(layer):
        return True
    return _is_8bit(layer) and not layer.state.has_fp16_weights


def quant_weight_of(layer: nn.Module, /) -> QuantWeight:
    """The :class:`QuantWeight` of a quantized bitsandbytes linear layer (no copy, no mutation).

    Args:
      layer: a quantized ``bnb.nn.Linear4bit`` (nf4/fp4, any blocksize, with or without double quantization,
        also in bitsandbytes' AVX512-BF16 CPU layout) or ``bnb.nn.Linear8bitLt`` with
        ``has_fp16_weights=False`` (scales read from ``weight.SCB`` before the first forward and from
        ``layer.state.SCB`` after it).

    Returns:
      The pytree; its leaves share storage with the layer except in the CPU-layout case (unpacked copies).
    """
    if _is_4bit(layer):
        return _quant_weight_4bit(layer)
    if _is_8bit(layer):
        return _quant_weight_8bit(layer)
    raise TypeError(f"expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(layer).__name__}")


def dequantize(layer_or_qweight: nn.Module | QuantWeight, /, *, dtype: torch.dtype | None = None) -> Tensor:
    """The float weight ``(out, in)`` of a quantized layer or :class:`QuantWeight`.

    Args:
      layer_or_qweight: a quantized bitsandbytes layer or a :class:`QuantWeight`.
      dtype: result dtype; ``None`` -> ``spec.dtype`` (the 4-bit quant_state dtype; float32 for int8).
        float32/bfloat16/float16 are dequantized directly in that dtype, as bitsandbytes' forward does;
        other dtypes (float64) are cast from ``spec.dtype``.

    Returns:
      A fresh tensor ``(out_features, in_features)``: 4-bit ``code[q] * absmax`` per block; int8
      ``CB * SCB / 127`` per row (the training-mode forward's rounding; bitsandbytes'
      ``int8_vectorwise_dequant`` multiplies in the other order and may differ in the last bit).
    """
    qw = layer_or_qweight if isinstance(layer_or_qweight, QuantWeight) else quant_weight_of(layer_or_qweight)
    return _dequant(qw, qw.spec.dtype if dtype is None else dtype)


def quantized_linear(qweight: QuantWeight, x: Tensor, bias: Tensor | None = None, /) -> Tensor:
    """``x @ dequantize(qweight).T + bias`` in the compute dtype, safe under every torch.func transform.

    Equal to ``Linear4bit.forward`` (x and bias cast to the compute dtype, weight dequantized in it, output
    cast back to x's dtype) and to ``Linear8bitLt``'s training-mode forward (computed in x's dtype; the
    eval-mode path's int8 activation rounding is *not* reproduced, see the module docstring).

    Differentiable w.r.t. ``x`` and ``bias`` (and everything upstream of them) under ``torch.func.grad``,
    ``vjp``, ``jvp``, ``vmap`` (over ``x``/``bias``; the weight is shared), ``functional_call`` and
    ``torch.compile``; backward re-dequantizes from the packed weight instead of keeping the float weight.

    Args:
      qweight: the quantized weight (``spec.shape = (out, in)``).
      x: input ``(*batch, in)``, any float dtype.
      bias: ``(out,)`` or None.

    Returns:
      ``(*batch, out)`` in ``x.dtype``.
    """
    spec = qweight.spec
    check_float("x", x)
    if x.shape[-1] != spec.shape[1]:
        raise ValueError(f"x has shape={tuple(x.shape)}, expected last dim in_features={spec.shape[1]}")
    if bias is not None:
        check_shape("bias", bias, (spec.shape[0],))
    cd = spec.compute_dtype or x.dtype
    xc = x.to(cd)
    bc = None if bias is None else bias.to(cd)
    fn = _QuantLinearNoJvp if torch.compiler.is_compiling() else _QuantLinear
    y = fn.apply(xc, bc, spec, *qweight.tensors())
    return y.to(x.dtype)


def quant_forward(layer: nn.Module, x: Tensor, /) -> Tensor:
    """A bitsandbytes layer's output computed by :func:`quantized_linear` (reads the layer, never writes it)."""
    return quantized_linear(quant_weight_of(layer), x, layer.bias)


def _patched_forward(self: nn.Module, x: Tensor) -> Tensor:
    return quant_forward(self, x)


def patch_forward(module: nn.Module, /) -> list[str]:
    """Route every quantized bitsandbytes linear in ``module`` (itself included) through :func:`quant_forward`.

    Sets an instance ``forward`` on each such layer, so a whole model of bnb layers becomes safe under
    ``torch.func`` (bitsandbytes' own forwards raise under grad/vmap and give zero jvp tangents). Idempotent.

    Returns:
      The names (as in ``named_modules()``) of the layers now patched.
    """
    names = []
    for name, m in module.named_modules():
        if is_quantized(m):
            m.forward = types.MethodType(_patched_forward, m)
            names.append(name)
    return names


def unpatch_forward(module: nn.Module, /) -> list[str]:
    """Undo :func:`patch_forward` on ``module`` and its submodules; returns the names restored."""
    names = []
    for name, m in module.named_modules():
        f = m.__dict__.get("forward")
        if isinstance(f, types.MethodType) and f.__func__ is _patched_forward:
            del m.__dict__["forward"]
            names.append(name)
    return names


# --------------------------------------------------------------------------------- requantize & assign


def requantize(layer: nn.Module, weight_f: Tensor, /) -> QuantWeight:
    """A new quantized payload of ``weight_f`` with ``layer``'s settings; ``layer`` is not touched.

    4-bit: same quant type, blocksize, double quantization (``weight.compress_statistics``), storage dtype,
    weight dtype (``quant_state.dtype``; the pre-repack dtype for a CPU-layout layer) and device, via
    ``bitsandbytes.functional.quantize_4bit``; the result is in the standard layout. int8: row-wise absmax
    quantization of ``weight_f`` cast to float16, as ``Int8Params`` does.

    Args:
      layer: a quantized ``Linear4bit`` / ``Linear8bitLt``.
      weight_f: float weight ``(out_features, in_features)``.

    Returns:
      A :class:`QuantWeight` to pass to :func:`assign_quantized` (or :func:`quantized_linear`).
    """
    old = quant_weight_of(layer)
    spec = old.spec
    check_shape("weight_f", weight_f, spec.shape, why="the layer's (out_features, in_features)")
    if not weight_f.is_floating_point():
        raise TypeError(f"weight_f must be a float tensor, got dtype={weight_f.dtype}")
    device = old.data.device
    if spec.quant_type == "int8":
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight_f.detach().to(device=device, dtype=torch.float16).contiguous())
        return QuantWeight(cb, scb, None, None, None, spec)
    w = layer.weight
    data, qs = bnbf.quantize_4bit(
        weight_f.detach().to(device=device, dtype=spec.dtype).contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=bool(w.compress_statistics),
        quant_type=spec.quant_type,
        quant_storage=w.quant_storage,
    )
    nested = qs.state2 is not None
    new_spec = spec._replace(
        nested_blocksize=int(qs.state2.blocksize) if nested else 0, quant_storage=data.dtype, dtype=qs.dtype
    )
    if nested:
        return QuantWeight(data, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, new_spec)
    return QuantWeight(data, qs.absmax, None, None, None, new_spec)


def _check_payload(layer: nn.Module, payload: QuantWeight) -> None:
    if not isinstance(payload, QuantWeight):
        raise TypeError(f"payload must be a QuantWeight, got {type(payload).__name__}")
    kind = "int8" if _is_8bit(layer) else "4bit"
    pkind = "int8" if payload.spec.quant_type == "int8" else "4bit"
    if kind != pkind:
        raise ValueError(
            f"payload quant_type={payload.spec.quant_type!r} does not fit a {type(layer).__name__} layer"
        )
    shape = (layer.out_features, layer.in_features)
    if payload.spec.shape != shape:
        raise ValueError(f"payload spec.shape={payload.spec.shape} differs from the layer's (out, in)={shape}")


def _quant_state_of(payload: QuantWeight) -> Any:
    spec = payload.spec
    device = payload.data.device
    state2 = None
    if payload.nested_absmax is not None:
        state2 = bnbf.QuantState(
            absmax=payload.nested_absmax,
            code=payload.nested_code,
            blocksize=spec.nested_blocksize,
            dtype=torch.float32,
        )
    return bnbf.QuantState(
        absmax=payload.absmax,
        shape=torch.Size(spec.shape),
        code=bnbf.get_4bit_type(spec.quant_type, device=device),
        blocksize=spec.blocksize,
        quant_type=spec.quant_type,
        dtype=spec.dtype,
        offset=payload.offset,
        state2=state2,
    )


def assign_quantized(layer: nn.Module, payload: QuantWeight, /) -> None:
    """Install ``payload`` (from :func:`requantize`) as ``layer``'s quantized weight.

    4-bit: ``weight.data``, ``weight.quant_state`` and ``layer.quant_state`` (a fresh ``QuantState``, standard
    layout). int8: ``weight.data`` and the ``CB``/``SCB`` pair wherever the layer keeps it now
    (``weight.CB``/``weight.SCB`` before the first forward, ``state.CB``/``state.SCB`` after). The weight
    ``Parameter`` object itself is kept. The bias is not touched.
    """
    _check_payload(layer, payload)
    if _is_8bit(layer):
        if layer.state.SCB is not None:
            layer.weight.data = payload.data
            layer.state.CB = payload.data
            layer.state.SCB = payload.absmax
        else:
            layer.weight.data = payload.data
            layer.weight.CB = payload.data
            layer.weight.SCB = payload.absmax
        return
    qs = _quant_state_of(payload)
    layer.weight.data = payload.data
    layer.weight.quant_state = qs
    layer.quant_state = qs


# ----------------------------------------------------------------------------------- merge & restore


def _snapshot(layer: nn.Module) -> dict:
    """References to everything a quantized merge replaces (tensors are replaced, never written in place)."""
    snap: dict[str, Any] = {"bias": None if layer.bias is None else layer.bias.data}
    if _is_8bit(layer):
        w = layer.weight
        snap.update(data=w.data, w_cb=w.CB, w_scb=w.SCB, s_cb=layer.state.CB, s_scb=layer.state.SCB)
        return snap
    qs = layer.weight.quant_state
    snap.update(
        data=layer.weight.data,
        qs=_copy_quant_state(qs),
        module_qs_same=layer.quant_state is qs,
        module_qs=layer.quant_state,
    )
    return snap


def _copy_quant_state(qs: Any) -> Any:
    # Shallow: bitsandbytes' CPU repack mutates a QuantState's attributes in place but never its tensors.
    if qs is None:
        return None
    new = copy.copy(qs)
    if getattr(qs, "state2", None) is not None:
        new.state2 = copy.copy(qs.state2)
    return new


def _put_back(layer: nn.Module, snap: dict) -> None:
    if layer.bias is not None and snap["bias"] is not None:
        layer.bias.data = snap["bias"]
    if not (_is_8bit(layer) or _is_4bit(layer)):
        if snap.get("in_place"):  # the original values go back into the weight's own storage
            with torch.no_grad():
                layer.weight.data.copy_(snap["data"])
            layer.weight.__dict__.pop("_rotfunc_merge_token", None)
        else:
            layer.weight.data = snap["data"]
        return
    if _is_8bit(layer):
        w = layer.weight
        w.data = snap["data"]
        w.CB, w.SCB = snap["w_cb"], snap["w_scb"]
        layer.state.CB, layer.state.SCB = snap["s_cb"], snap["s_scb"]
        return
    qs = _copy_quant_state(snap["qs"])
    layer.weight.data = snap["data"]
    layer.weight.quant_state = qs
    layer.quant_state = qs if snap["module_qs_same"] else snap["module_qs"]


def _merged_marker(layer: nn.Module) -> Any:
    """What identifies the quantized weight a merge installed, until that weight is replaced again.

    int8: the SCB tensor object (moved between weight and state by reference, put back by reference). 4-bit: a
    token attribute on the QuantState; the CPU repack mutates that object in place and :func:`restore` puts
    back shallow copies, both of which keep the attribute.
    """
    if _is_8bit(layer):
        return layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
    if not _is_4bit(layer):
        token = layer.weight.__dict__.get("_rotfunc_merge_token")
        if token is not None:  # an in-place merge: its token, the same storage, no in-place write since
            return (token, layer.weight.untyped_storage().data_ptr(), layer.weight._version)
        return layer.weight.untyped_storage().data_ptr()  # float: the storage of the weight the merge assigned
    return getattr(layer.weight.quant_state, "_rotfunc_merge_token", None)


def _same_marker(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and a[0] is b[0] and a[1:] == b[1:]
    return a == b if isinstance(a, int) else a is b


def _mark_merged(layer: nn.Module) -> Any:
    if _is_8bit(layer) or not _is_4bit(layer):
        return _merged_marker(layer)
    token = object()
    layer.weight.quant_state._rotfunc_merge_token = token
    return token


@dataclass(frozen=True, eq=False)
class MergeRecord:
    """What :func:`merge_into` did to one layer.

    ``max_abs_error`` / ``rel_fro_error``: requantization error, ``max |Q(W') - W'|`` and
    ``||Q(W') - W'||_F / ||W'||_F`` with ``W'`` the merged float weight and ``Q(W')`` its dequantized
    requantization (both 0.0 for float layers). ``original`` holds the layer's pre-merge packed weight, quant
    state and bias (float layers: the original weight and bias tensors), which :func:`restore` puts back bitwise.
    """

    quant_type: str | None  # "nf4" | "fp4" | "int8", or None for a float nn.Linear
    max_abs_error: float
    rel_fro_error: float
    original: dict | None = None
    merged: Any = None

    @property
    def restorable(self) -> bool:
        """True when :func:`restore` can put the pre-merge layer back."""
        return self.original is not None


def _check_merge_output(layer: nn.Module, out: object, w_shape: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"merge_fn must return a (weight, bias) pair, got {type(out).__name__}")
    w, b = out
    check_shape("merged weight", w, w_shape, why="merge_fn must keep the layer's (out_features, in_features)")
    if not w.is_floating_point():
        raise TypeError(f"merged weight must be a float tensor, got dtype={w.dtype}")
    if layer.bias is None:
        if b is not None:
            raise ValueError("merge_fn returned a bias for a layer without one (bias=None)")
    else:
        if b is None:
            raise ValueError("merge_fn returned bias=None for a layer with a bias")
        check_shape("merged bias", b, (w_shape[0],))
    return w, b


def _all_finite(*ts: Tensor | None) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


def _requant_error(payload: QuantWeight, w: Tensor, /, *, rows: int = 1024) -> tuple[float, float]:
    """(max abs, relative Frobenius) of dequantize(payload) - w, in float32, a block of rows at a time.

    Blocks of ``rows`` (a multiple of the 4-bit blocksize) rows keep the temporaries in cache instead of
    materializing a second full-size float weight (page faults dominate at 4096x4096).
    """
    spec = payload.spec
    out_f, in_f = spec.shape
    if spec.quant_type != "int8":
        rows = max(rows, spec.blocksize) // spec.blocksize * spec.blocksize
        absmax = _absmax_f32(payload)
        codes = payload.data.view(torch.uint8).reshape(-1)
    max_abs = torch.zeros((), dtype=torch.float32, device=w.device)
    err2 = torch.zeros((), dtype=torch.float64, device=w.device)
    ref2 = torch.zeros((), dtype=torch.float64, device=w.device)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        wf = w[r0:r1].to(torch.float32)
        if spec.quant_type == "int8":
            back = payload.data[r0:r1].to(torch.float32) * payload.absmax[r0:r1].unsqueeze(1).mul(1.0 / 127.0)
        else:
            n0, n1 = r0 * in_f, r1 * in_f
            back = torch.ops.bitsandbytes.dequantize_4bit.default(
                codes[n0 // 2 : (n1 + 1) // 2],
                absmax[n0 // spec.blocksize : -(-n1 // spec.blocksize)],
                spec.blocksize,
                spec.quant_type,
                [r1 - r0, in_f],
                torch.float32,
            )
        back.sub_(wf)
        lo, hi = torch.aminmax(back)
        max_abs = torch.maximum(max_abs, torch.maximum(-lo, hi))
        err2 += torch.linalg.vector_norm(back).double().square()
        ref2 += torch.linalg.vector_norm(wf).double().square()
    err, ref = math.sqrt(float(err2)), math.sqrt(float(ref2))
    return float(max_abs), (err / ref if ref > 0 else (0.0 if err == 0 else math.inf))


def merge_into(
    layer: nn.Module, merge_fn: MergeFn, /, *, safe_merge: bool = False, in_place: bool = False,
    backup: Tensor | None = None,
) -> MergeRecord:
    """Merge ``merge_fn`` into any base linear (float, 4-bit, 8-bit), atomically.

    Quantized layers: dequantize -> ``merge_fn(W, b)`` -> :func:`requantize` -> :func:`assign_quantized`.
    The layer's original packed weight, quant state and bias are kept in the returned record (one
    quantized copy) so :func:`restore` undoes the merge bitwise. Float ``nn.Linear``: ``weight.data`` and
    ``bias.data`` are replaced by the merged tensors (cast to the layer's dtypes) and the record keeps the
    original tensors; with ``in_place`` the merged weight is written into the weight's own storage instead and
    the record keeps a copy (see below).

    Atomic: when ``merge_fn``, requantization or the assignment raises, or ``safe_merge`` finds a
    non-finite value in the merged or requantized weight or bias, the layer is exactly as before
    (same tensors, same quant state object) and the error propagates.

    Args:
      layer: ``nn.Linear``, ``bnb.nn.Linear4bit`` or ``bnb.nn.Linear8bitLt`` (``has_fp16_weights=False``).
      merge_fn: pure ``(weight_f (out, in), bias (out,) | None) -> (weight_f', bias')`` on float tensors; it
        receives detached tensors (float32 for int8, ``quant_state.dtype`` for 4-bit) and must not mutate them.
      safe_merge: check for NaN/inf before touching the layer (raises ValueError).
      in_place: float ``nn.Linear`` only (ignored for quantized layers): merge into the weight's own storage.
        The weight is copied once into a backup buffer, ``merge_fn(backup, bias, out=weight)`` is called (it may
        write ``W'`` into ``out`` and return it, or return a new tensor, which is then copied in), and the record
        keeps the backup, so :func:`restore` copies it back: bitwise, and every reference to the weight's
        storage (tied or shared weights, views) sees the merge. On failure the weight is copied back first.
        A ``merge_fn`` with a ``backup`` parameter is instead called as ``merge_fn(weight, bias, out=weight,
        backup=buffer)`` (contiguous weights): it copies the weight into ``backup`` itself while merging (one
        pass over the weight instead of two) and, if it raises, leaves the weight as it was.
      backup: a buffer of the weight's shape and dtype to keep the original in (``in_place`` only), e.g. the
        one a previous in-place record held; allocated when None (a fresh weight-sized allocation costs page
        faults, see the merge benchmark).

    Returns:
      A :class:`MergeRecord` with the requantization error.
    """
    if _is_8bit(layer) or _is_4bit(layer):
        return _merge_quantized(layer, merge_fn, safe_merge)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"merge_into expects nn.Linear, Linear4bit or Linear8bitLt, got {type(layer).__name__}")
    if in_place:
        return _merge_float_in_place(layer, merge_fn, safe_merge, backup)
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    w, b = _check_merge_output(layer, merge_fn(weight, bias), tuple(weight.shape))
    w = w.detach().to(weight.dtype)
    b = None if b is None else b.detach().to(bias.dtype)
    if safe_merge and not _all_finite(w, b):
        raise ValueError(f"merged weight of {type(layer).__name__}{tuple(weight.shape)} has non-finite values; "
                         "layer left unchanged")
    if w.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr():
        w = w.clone()  # merge_fn returned the weight itself: the record must keep the original apart
    snap = {"data": layer.weight.data, "bias": None if layer.bias is None else layer.bias.data}
    try:
        layer.weight.data = w
        if b is not None:
            layer.bias.data = b
    except BaseException:
        _put_back(layer, snap)
        raise
    return MergeRecord(None, 0.0, 0.0, snap, _mark_merged(layer))


def _finite(t: Tensor | None) -> bool:
    """No NaN/inf in ``t``, reading it once without a full-size boolean temporary (one sum; the exact check
    only when the sum is not finite, which an overflow of finite values can also cause)."""
    if t is None:
        return True
    return bool(t.sum().isfinite()) or bool(torch.isfinite(t).all())


def _takes_backup(merge_fn: Callable) -> bool:
    """``merge_fn`` has a ``backup`` parameter: it can merge in place, saving the original weight on the way."""
    import inspect

    try:
        return "backup" in inspect.signature(merge_fn).parameters
    except (TypeError, ValueError):
        return False


def _merge_float_in_place(layer: nn.Linear, merge_fn: MergeFn, safe_merge: bool, backup: Tensor | None) -> MergeRecord:
    weight = layer.weight.data  # the storage every reference sees; writes through .data leave autograd alone
    bias = None if layer.bias is None else layer.bias.data
    usable = (
        backup is not None and backup.shape == weight.shape and backup.dtype == weight.dtype
        and backup.device == weight.device and backup.is_contiguous()
        and backup.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    )
    buf = backup if usable else fresh_like(weight)
    fused = weight.is_contiguous() and _takes_backup(merge_fn)
    with torch.no_grad():
        filled = not fused  # buf holds the original weight (a fused merge_fn leaves the weight as it was on error)
        if not fused:
            buf.copy_(weight)
        try:
            if fused:  # one pass: merge_fn saves each piece of the weight into buf, then merges it from there
                res = merge_fn(weight, bias, out=weight, backup=buf)
                filled = True
            else:
                res = merge_fn(buf, bias, out=weight if weight.is_contiguous() else None)
            w, b = _check_merge_output(layer, res, tuple(weight.shape))
            if w.data_ptr() != weight.data_ptr():
                weight.copy_(w)
            del w
            new_b = None if b is None else b.detach().to(bias.dtype)
            if new_b is not None and new_b.data_ptr() == bias.data_ptr():
                new_b = new_b.clone()
            if safe_merge and not (_finite(weight) and _finite(new_b)):
                raise ValueError(f"merged weight of {type(layer).__name__}{tuple(weight.shape)} has non-finite "
                                 "values; layer left unchanged")
            if new_b is not None:
                layer.bias.data = new_b
        except BaseException:
            if filled:
                weight.copy_(buf)
            if bias is not None:
                layer.bias.data = bias
            raise
    token = object()
    layer.weight._rotfunc_merge_token = token
    return MergeRecord(None, 0.0, 0.0, {"data": buf, "bias": bias, "in_place": True}, _merged_marker(layer))


def _merge_quantized(layer: nn.Module, merge_fn: MergeFn, safe_merge: bool) -> MergeRecord:
    qw = quant_weight_of(layer)
    spec = qw.spec
    weight = _dequant(qw, torch.float32 if spec.quant_type == "int8" else spec.dtype)
    bias = None if layer.bias is None else layer.bias.detach()
    with torch.no_grad():
        w, b = _check_merge_output(layer, merge_fn(weight, bias), spec.shape)
        del weight
        if safe_merge and not _all_finite(w, b):
            raise ValueError(
                f"merged weight of {type(layer).__name__}(out={spec.shape[0]}, in={spec.shape[1]}, "
                f"quant_type={spec.quant_type!r}) has non-finite values; layer left unchanged"
            )
        payload = requantize(layer, w)
        max_abs, rel = _requant_error(payload, w)
        if safe_merge and not (math.isfinite(max_abs) and _all_finite(*payload.tensors())):
            raise ValueError(
                f"requantized weight of {type(layer).__name__}(out={spec.shape[0]}, in={spec.shape[1]}, "
                f"quant_type={spec.quant_type!r}) has non-finite values (overflow of the quantized range?); "
                "layer left unchanged"
            )
        new_b = None if b is None else b.detach().to(layer.bias.dtype)
    snap = _snapshot(layer)
    try:
        assign_quantized(layer, payload)
        if new_b is not None:
            layer.bias.data = new_b
    except BaseException:
        _put_back(layer, snap)
        raise
    return MergeRecord(spec.quant_type, max_abs, rel, snap, _mark_merged(layer))


def restore(layer: nn.Module, record: MergeRecord, /, *, check: bool = True) -> None:
    """Put back the packed weight, quant state and bias ``layer`` had before :func:`merge_into` made ``record``.

    Bitwise, no inverse. Records restore in LIFO order: with ``check=True`` a ValueError is raised (and
    nothing changes) when the layer's quantized weight was replaced after this merge (another merge, a
    reload). The record itself stays valid: ``restore(layer, record, check=False)`` again gives the same layer.

    Float ``nn.Linear`` records hold the original weight and bias tensors themselves (the merge assigned new
    ones), so a float restore is bitwise too.

    Raises:
      ValueError: the record does not fit this layer, or (``check=True``) the layer was changed since.
    """
    if not isinstance(record, MergeRecord):
        raise TypeError(f"record must be a MergeRecord, got {type(record).__name__}")
    if record.original is None:
        raise ValueError("record keeps nothing to restore (made with keep=False); undo it with the adapter's unmerge")
    kind = "int8" if _is_8bit(layer) else ("4bit" if _is_4bit(layer) else "float")
    rkind = {"int8": "int8", None: "float"}.get(record.quant_type, "4bit")
    if kind != rkind:
        raise ValueError(f"record of a quant_type={record.quant_type!r} merge does not fit a {type(layer).__name__}")
    if check and (record.merged is None or not _same_marker(_merged_marker(layer), record.merged)):
        raise ValueError(
            f"{type(layer).__name__}(in_features={layer.in_features}, out_features={layer.out_features}) no longer "
            "holds the weight this merge installed (merged again or reloaded since?); restore records in reverse "
            "order, or pass check=False"
        )
    _put_back(layer, record.original)


def unmerge_from(
    layer: nn.Module, record: MergeRecord, unmerge_fn: MergeFn, /, *, safe_merge: bool = False
) -> MergeRecord | None:
    """Undo a :func:`merge_into` on any base layer: bitwise :func:`restore` for quantized layers (``unmerge_fn``
    unused), ``merge_into(layer, unmerge_fn)`` (the adapter's exact inverse) for float layers.

    Returns:
      None when the record could be restored bitwise (always, unless it was made without a copy); the float
      merge's record otherwise.
    """
    if record.original is not None:
        restore(layer, record)
        return None
    return merge_into(layer, unmerge_fn, safe_merge=safe_merge)
