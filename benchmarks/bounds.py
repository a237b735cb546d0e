"""What bounds each missed target: the analysis behind RESULTS.md's last section.

Each entry records what a ``torch.profiler`` run of that row showed on this machine (1 thread, so that the
OpenMP barrier stalls of a loaded 2-core machine do not hide the op costs) and what would move it.
``bounds_text(rows)`` returns the list of missed targets of a run followed by the entries for them.
"""

from __future__ import annotations

__all__ = ["bounds_text", "BOUNDS"]

_TRAIN = """\
**Training step on the 4-bit MiniLM (time <= 0.8x PEFT, peak <= PEFT).** Time is bound by the base model's
matmuls, which both sides run identically. Profile of one step (RoAD, batch 16x32, 1 thread): rotfunc 1.66 s of
CPU time, of which `aten::mm` + `aten::addmm` are 1.14 s (70 calls); PEFT 1.38 s, of which the same `mm` +
`addmm` are 0.98 s (67 calls: same shapes, same FLOPs; the gap is noise from other jobs). 0.8x of PEFT's step
leaves ~0.1 s for everything that is not a base matmul, while the base model's own non-matmul work (attention
`scaled_dot_product` forward and backward ~0.06-0.09 s, layer norms, GELU, nf4 dequantization) already takes
more than that on either side: no change to the adapters, the shims or the quantized seam can reach 0.8x. With
1 thread (fresh processes, 16x32): RoAD 0.56 s vs PEFT 0.49 s, OFT 0.72 vs 0.60, RandLoRA 1.28 vs 1.11 (1.14-1.2x).
What rotfunc adds: re-dequantizing each nf4 weight in backward instead of keeping it
(`bitsandbytes::dequantize_4bit` 70 calls, 78 ms vs PEFT's 67 calls, 41 ms), and functorch's per-op wrapping
plus the adapters' small elementwise ops (`aten::add` 248 calls, `aten::mul` 540, `cos`, `cat`: ~150 ms).
`torch.compile(grad(loss))` could fuse the latter (at a ~20 s first compile); it cannot touch the matmuls.
Peak memory: the process high-water mark of the rotfunc side is 10-22 % above PEFT's (about 85-190 MiB on
~850 MiB, model included). Not profiled to the tensor in this session; the candidates are what the functional
step keeps alive that PEFT's in-place `loss.backward()` frees early: the input cast `x.to(compute_dtype)` saved
by rotfunc's quantized linear for backward (PEFT's bnb path saves `x` itself), and the adapters' saved
intermediates under `torch.func.grad` (RoAD keeps both `y` and the half-swapped copy of `y` per layer). Next
step: `torch.profiler.profile(profile_memory=True)` of one step on each side, comparing the live saved tensors
per layer."""

_MIXED = """\
**Mixed-adapter batch (8 adapters >= 0.9x the throughput of 1).** Profile (RoAD, nf4 MiniLM, 32x32 tokens, 1
thread): the 8-adapter forward spends 0.26 s in `aten::copy_` (593 calls) under `aten::index_copy` (296 calls):
`AdaptedLinear._forward_mixed` (rotfunc/bind.py) scatters each group's output with an out-of-place
`out = out.index_copy(0, idx, ys)`, which copies the whole (batch, seq, out) output once per adapter per layer
(8 x 37 full copies). The matmuls are not the cost: `aten::addmm` is 0.75-0.76 s in both runs (296 group-sized
calls vs 37 full ones). Fixed since: `_forward_mixed` now groups the batch once per forward (not per layer),
shares one full-batch base matmul among the groups whose adapter calls the base on its own input (RoAD,
RandLoRA, `__base__`), and gathers the group outputs back with one `torch.cat(...).index_select(0, inverse)`
per layer (from 0.69x / 0.63x / 0.63x before these fixes to this run's numbers). What bounds the rest: the per-group fixed costs of each adapter call (8x the RoAD coefficient
construction: `cos`/`sin`/`stack`/`cat` 296-888 calls per forward; 8 Cayley-Neumann evaluations per OFT layer
instead of 1) and the gather/scatter of activations (`index_select` of each group's input and the final gather:
two activation copies per layer, large relative to MiniLM's cheap 384-wide matmuls). Reaching 0.9x needs the
adapters evaluated for all groups at once (params stacked over adapters and a `vmap`, or a segment-wise
kernel) rather than one call per group."""

_FORWARD = """\
**Forward overhead over the bare layer.** The adapter's own work is tiny next to a 4096x4096 matmul on 64
tokens: RoAD adds a few elementwise ops on the (64, 4096) output (`addcmul` on it takes 0.07 ms with 1 thread
here, against 80-100 ms for the `addmm`; profile of the RoAD fp32 row: `aten::addmm` 91 % of the call); OFT
adds 64 Cayley-Neumann 64x64 blocks and a block-diagonal product on the input, O(n b^2) against the matmul's
O(tokens n^2). The 2-thread misses come from the machine: with other jobs on the 2 cores, each parallel torch
op can wait ~10-25 ms at its OpenMP barrier for a descheduled thread, and the adapter path has ~10 small ops
where the bare layer has one `addmm` (the `measured` column shows the same samples repeated with 1 thread,
which have no barrier). Nothing in rotfunc bounds these rows; a quiet machine or 1 thread shows the real
overhead. For nf4 the bare layer includes the dequantize, so the relative overhead is smaller."""

_FLOOR = """\
**Merge into nf4 vs the dequantize + requantize floor (<= 1.3x).** `rotfunc.merge` = dequantize + the
adapter's merge + requantize + the requantization-error report (`quant._requant_error`: one more blockwise
dequantize and two norms, in 1024-row blocks so no second full-size temporary) + snapshot/assign. Above the
floor it pays the adapter's own merge and the error report. RandLoRA cannot meet this target: its update is
full rank by design, `scaling * dW = L @ R` with L (4096, 4096) and R (4096, 4096) at r = 32 (num_bases =
4096/32 = 128, r x num_bases = 4096), so its merge is one 4096^3 GEMM (137 GFLOP, ~2-4 s on these 2 cores, the
same GEMM PEFT runs) against an O(n^2) requantization (~0.5-1.5 s); `rotfunc.randlora` already does it as one
fused `torch.addmm` into W. RoAD (O(n^2) row-pair mixing) and OFT (64 blocks of 64: O(n^2 b)) sit near the
limit; their extra is the full-size temporaries of the merge (~50 ms of page faults per fresh 64 MB tensor
here) and the error report."""

_MERGE = """\
**Merge + unmerge vs PEFT (RoAD >= 100x, OFT >= 30x at 4096^2 fp32).** rotfunc's merges are O(out x in)
(RoAD: row-pair mixing, closed-form 2x2 inverses; OFT: block-wise product, transposed or QR-inverted 64x64
blocks), PEFT's are dense O(n^3) (RoAD builds the (out, out) R and `torch.linalg.inv`s it; OFT multiplies and
inverts the dense block-diagonal (in, in) matrix). At 4096 rotfunc's time is bounded by memory, not FLOPs:
each merge and unmerge returns a fresh 64 MB weight, and each fresh 64 MB tensor costs ~40-60 ms of page
faults here (PEFT_NOTES.md; glibc maps large allocations fresh and unmaps them on free), plus ~4 passes over
64 MB. Under load, 2-thread elementwise ops also stall at OpenMP barriers. OFT's Cayley-Neumann unmerge
inverts its 64 blocks by batched Householder QR (`rotfunc.linalg.block_inverse`): measured here with 2
threads under load, `torch.linalg.qr` of 64 blocks of 64x64 took 0.05-4 s (and 0.35 s for 2 blocks), against
3-7 ms with 1 thread: the batched LAPACK loop is barrier-bound. Fixes for the lead: (1) rotfunc/linalg.py,
`block_inverse`: for blocks < 256 use `torch.linalg.inv` on the batch (10-70 ms for 64 blocks of 64x64 here
with 2 threads under the same load, 5-9 ms with 1; keep QR for >= 256, where MKL's batched LU failed), or run
the QR under 1 thread; (2) for float layers, an `out=`
(in-place) merge path in `quant.merge_into` would save one fresh 64 MB tensor per call."""

BOUNDS: dict[tuple[str, str | None], str] = {
    ("train", None): _TRAIN,
    ("mixed", None): _MIXED,
    ("forward", None): _FORWARD,
    ("floor", None): _FLOOR,
    ("merge", None): _MERGE,
}


def bounds_text(rows: list[dict]) -> str:
    """Markdown: the missed targets of ``rows``, then what bounds each kind (nothing when all are met)."""
    missed = [r for r in rows if r.get("target") and r.get("met") is False]
    if not missed:
        return "Every target is met in this run."
    seen, parts = set(), []
    for r in missed:
        text = BOUNDS.get((r.get("section"), r.get("method"))) or BOUNDS.get((r.get("section"), None))
        if text and text not in seen:
            seen.add(text)
            parts.append(text.strip())
    listed = "\n".join(f"- {r['name']}: {r.get('measured', '')} (target {r['target']})" for r in missed)
    return "Missed in this run:\n\n" + listed + ("\n\n" + "\n\n".join(parts) if parts else "")
