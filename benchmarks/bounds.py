"""What bounds each missed target: the analysis behind RESULTS.md's last section.

Each entry records what a ``torch.profiler`` run of that row showed on this machine (1 thread, so that the
OpenMP barrier stalls of a loaded 2-core machine do not hide the op costs) and what would move it.
``bounds_text(rows)`` returns the list of missed targets of a run followed by the entries for them.
"""

from __future__ import annotations

__all__ = ["bounds_text", "BOUNDS"]

_TRAIN = """\
**Training step (time <= 0.8x PEFT, peak <= PEFT).** The functorch grad transform was the cost of the old
functional step, not the adapters: `torch.func.grad(functional_call)` wraps every op of the whole model (on an
Intel Xeon: +30 % time, +67 % peak live tensor memory over plain autograd on the same model).
`rotfunc.value_and_grad` keeps the functional interface and runs plain autograd underneath when no `torch.func`
transform is active: 0.99-1.01x PEFT's time at 0.85-1.02x its peak on the nf4 MiniLM in this run. **The floor**
(measured on this CPU, 1 thread, PEFT's RoAD step interleaved in the same process, 9-15 rounds): the frozen nf4
MiniLM's own forward + backward with no adapter at all (grads flowing from the first layer's q/k/v outputs, the
same matmuls, attention and dequantizations any adapter's step runs) took 0.64-0.76x PEFT's RoAD step eagerly and
0.64-0.69x with `compile_blocks`; for OFT 0.63-0.64x, for RandLoRA 0.37x (PEFT's RandLoRA step is 2.7x the bare
model's: its update adds matmuls the size of the base's). So 0.8x leaves RoAD 0.11-0.16x of PEFT's step for its
own work, and OFT 0.16x for three extra block matmuls per layer (`(r, N, b) @ (r, b, b)`: ~19 % more GEMM FLOPs on
MiniLM at about 40 instead of 60 GFLOP/s) plus its Cayley-Neumann series; RandLoRA's extra matmuls are PEFT's too
(rotfunc 790 ms of `mm` per step against PEFT's 829), so 0.8x needs fewer FLOPs, e.g. folding the update into the
dequantized weight on large batches (not built). What compiling fuses: on RoAD, inductor had inlined `alpha *
cos(theta)` into every elementwise kernel (a cosine and a sine per output element per row) and AOTAutograd saved a
swapped copy of every output; RoAD now has its own backward (`_RoadMix`, saving only the layer output) and one
opaque coefficient op under compile (`rotfunc::road_pq`), which took the RoAD step from 0.84x to 0.79x PEFT with
`compile_blocks` and from 1.00x to 0.92-0.94x with plain autograd in 5-side interleaved runs (15 rounds) -- and to
0.91x / 1.01x in a 6-side run, whose rounds spread by +-15 % (PEFT 0.49-0.65 s). Where RoAD's remaining time goes (profile, `compile_blocks`, 1 thread, 2026-11-30: 0.476 s against the floor's 0.389 and PEFT's 0.560): the fused mixing kernels ~25 ms per step (their backward's column sums over the batch run at ~1.4 ms per 1536-wide layer, 3-5x an eager `sum(0)`), the coefficient op and its backward ~12-29 ms (36 calls each, mostly the ~10 small ops inside), and the matmuls ~20 ms slower than the floor's (same shapes). A second profile (13:15Z, against the floor compiled with `compile_blocks` too, in one process: rotfunc 0.524-0.541 s, floor 0.433-0.463, PEFT 0.620-0.652, i.e. 0.80x and 0.87x PEFT in two runs minutes apart) put the matmuls equal (330 vs 344 ms of `mm`/`addmm` per step) and rotfunc's fused kernels ~35 ms above the floor's. Two candidates measured by same-process A/B and not kept: replacing the coefficient op and its backward by cached outputs (an upper bound on anything that makes them cheaper) saved 12.4 ms per step (2 %); summing the compiled column sums in two stages: 0.998x (24 rounds, median of per-round ratios). Eagerly, `_RoadMix` now mixes with one product and two half `addcmul_`s and takes q's gradient half by half (no `flip` copies): same process, interleaved with the old version (15 and 25 rounds), the step took 0.962x and 0.938x the old one's time (medians of per-round ratios), and the re-run rows here show its peak at 0.85x PEFT's (0.95x before). The Cayley-Neumann series now
takes 2 block products instead of 3, and PEFT's default 5 terms are evaluated as (I + Q^2)(I + Q^2 + 2Q) (one
elementwise pass over the blocks instead of about seven): the OFT rows, re-run after it, took 0.88x PEFT with
`compile_blocks` (0.99x before, the same settings) and 1.00x eagerly. Where OFT's time over the floor goes (profile, `compile_blocks`, 1 thread, 2026-11-30: 0.654 s against the floor's 0.474 and PEFT's 0.779): the three block products per layer ~104 ms per step (~4 GFLOP; 49 GFLOP/s at 384 wide, 29-36 at 1536 wide, where the 3 MB operands stream through L3 in 24 strided runs), the Cayley-Neumann products ~23 ms, and the compiled copy kernels ~58 ms (the 1536-wide transposition took 2.3 ms in the step, 0.24 ms on cached data). Tried and not kept: an eager rotation in L2-sized pieces of rows, each piece's product copied while cached (an autograd.Function with its own backward): 0.935, 0.949, 0.978, 1.014 and 1.014x the einsum step's time in five same-process A/B runs (median of per-round ratios), no gain beyond the noise. Whole-model `value_and_grad(compile=True)`
is 0.86-0.89x for all three but keeps the compiled state resident (1.06-1.20x PEFT's peak); the compiled backward dequantizes through its own op
(`rotfunc::quantized_linear_grad_input`) so AOTAutograd cannot keep float weights. `compile_blocks` keeps the peak
at 0.93-1.05x PEFT's and compiles in 7-26 s (warm cache). On SmolLM2 (4x64 tokens, the sides interleaved in one process) `compile_blocks`
ran at 0.87x (RoAD, re-run after the eager backward change; 0.93x before), 1.02x (OFT), 0.85x (RandLoRA) of PEFT's time; the 0.88x / 0.50x / 0.89x reported before came
from sides run in separate processes one after another, which load on this shared machine moved by +-15 % and
more. There the 49,152-wide `lm_head` and its backward are ~22 % of the FLOPs, shared with PEFT. PEFT +
`torch.compile` (the second baseline) compiled with no graph break in dynamo's counter and ran at 0.88-0.98x of
PEFT eager."""

_MIXED = """\
**Mixed-adapter batch (8 adapters >= 0.9x the throughput of 1, inference and training).** Layers whose adapters
share one config run the whole mixed batch in one pass (`Adapter.apply_mixed`). The 8-adapter row orders the
batch adapter after adapter (`rotfunc.group_rows`), so every layer reads each adapter's rows as a slice; the
`round_robin_ratio` column is the batch in its own order, where each OFT/RandLoRA layer gathers the rows by
adapter and back. RoAD gathers each row's (p, q) coefficients and applies one elementwise op to one full-batch
base output: 8 adapters cost what 1 does. OFT rotates each group's rows in place (a strided view per group, one
`bmm` over its blocks) and writes them back with the one layout copy a single adapter makes; RandLoRA runs the
base and the shared-basis product on the whole batch and one product per group with that group's scaled basis.
What is left over 1 adapter is the adapters' own parameter work, which grows with K while the tokens per adapter
shrink: OFT builds K Cayley-Neumann series per layer (2 products of b x b blocks per block row, forward; 4 more
backward) against rotating T/K tokens per adapter (T/K x b per block row), so with b = 32 and 64-128 tokens per
adapter the series cost 25-50 % of the rotation itself (profile, SmolLM2 nf4 16x32, 8 adapters, 1 thread:
block products 0.54 s, per-group rotations 0.81 s, of a 1.9 s difference over one adapter's 7.1-7.3 s step);
RandLoRA builds K scaled bases (r x num_bases x the layer's smaller width: as large as the weight on MiniLM,
where r x num_bases = 384 = the width) and their gradients elementwise. Cut so far: the row gathers (grouped
rows: none), PEFT's 5-term series as (I + Q^2)(I + Q^2 + 2Q) (one elementwise pass over the blocks instead of
seven), lambda applied to the rows' projections rather than to each basis (one elementwise pass instead of two).
At this machine's noise (rounds spread +-10 %; the same OFT round-robin inference code measured 0.82x and 0.91x
float in two runs minutes apart) the OFT/RandLoRA training rows sit at 0.83-0.94x."""

_ENSEMBLE = """\
**Ensembles (K = 8 vmapped training steps >= 2x a loop of 8).** The attention path vmaps without a per-slice
fallback (`attn_implementation="eager"`: no "batching rule" warning, tested). What bounds the ratio is
arithmetic: a vmapped step runs the same K forward and backward passes of the base model as the loop -- the base
matmuls see K times the rows, so their FLOPs are K times one step's -- and saves only per-op overhead, K-1 of
the K dequantizations of each nf4/int8 weight, and K-1 optimizer launches. The loop's step is also the faster
engine (`rotfunc.value_and_grad`, plain autograd), while a vmapped step must run through functorch's grad
transform (measured at +30 % time over autograd on one adapter, PEFT_NOTES.md). So on a training-sized batch
(8 x 32 tokens, nf4, AMD EPYC, 1 thread) the vmapped step is FLOP-bound: 1.16x (RoAD), 1.26x (OFT), 1.02x
(RandLoRA) the loop's throughput; where overhead dominates (1 x 16 tokens) it is 2.43x, 1.87x, 1.66x. A
shared-data ensemble could share more only up to the first adapted layer (after it the members' activations
differ). Memory: the base is held once (51-53 MiB nf4), but activations dominate: a K = 8 vmapped step peaked at
11-13.5x one adapter's autograd step (8x32: 1.2-1.5 GiB vs 93-123 MiB; 1x16: 108-748 MiB vs 28-68 MiB), i.e. K
times one step's activations times functorch's grad overhead over autograd (PEFT_NOTES.md: ~1.67x live
tensors). To train K members in less memory, vmap over chunks of members or use the mixed-batch recipe (plain
autograd, each adapter on its own rows)."""

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
limit; their extra is the merge's one fresh 64 MB result and the error report. (Since 2026-11-30 12:45Z an
out-of-place merge without autograd writes its result piece by piece into a fresh huge-page buffer
(`rotfunc._memory`), one pass and no other full-size temporary: at 4096^2 fp32, 2 threads, RoAD's merge 47 -> 27
ms and OFT's 115 -> 71 ms, bitwise the same values.)

**Float merge + unmerge vs two in-place copies of W (<= 2x).** Through the shims a float merge is one pass over
W: `quant.merge_into` hands the adapter the weight, `out=weight` and a backup buffer, and the adapter copies each
~512 KiB piece of rows into the backup and merges it from there into W's own storage while it is in cache (RoAD:
`mul(out=)` + `addcmul_` per piece, the pieces' views made by one `split`/`unbind`, ~10 us per Python-indexed
view otherwise; OFT: one batched (r, m, b) x (r, b, b) product per piece into a piece-sized scratch, copied
back); unmerge copies the backup back, bitwise. Against the floor's two copies the cycle is two copies, the
merge's arithmetic and the backup's allocation. The allocation is what keeps RoAD's default cycle near 2x
(1.7-2.4x the floor over the runs at load 3-5; the copy-floor row here is one of them): `unmerge` frees the 64 MB
backup by default, so each merge maps a fresh one and faults it in on first write. With 4 KiB pages that cost ~65
ms here (16k faults, five copies' worth); `rotfunc._memory.fresh_like` advises `MADV_HUGEPAGE` on fresh backups of >= 32
MiB (~25 ms for the same allocation + copy, 13 ms being the copy; the benchmark process already runs with
`THP_MEM_ALLOC_ENABLE=1`, which does the same for every large torch tensor), and under load the fault-in of 32
huge pages still took 10-40 ms per cycle in these runs (the default cycle minus the `keep_buffers=True` one).
Interleaved runs of the old and the new code at load 3-4 (AMD EPYC, 1 thread; the floor itself moved between 25
and 49 ms): RoAD without huge pages 4.0-5.8x -> 2.1x the floor, with `THP_MEM_ALLOC_ENABLE=1` 1.75-2.2x -> 1.7x,
and with `unmerge(keep_buffers=True)` 1.4-1.7x (met). Left for the lead (rotfunc/bind.py): keeping one backup per
layer by default would make the default cycle the kept one, at the cost of one weight's memory per merged layer
while unmerged. (Torch's `THP_MEM_ALLOC_ENABLE=1` for all tensors hurts at 16 MB: a 2048^2 `clone()` took 15 ms
without it, glibc serving 16 MB from the already-faulted heap, and 33 ms with it, torch's 2 MB-aligned allocation
being unmapped on free and re-faulted; hence the 32 MiB threshold, above which glibc always maps fresh.)

OFT is bound by its product, `W blockdiag(R)^T`: 64 blocks of 64 at 4096^2 is 2.1 GFLOP. Measured on this CPU
with 1 thread (MKL 2024.2, AVX2): a plain 2048^3 `mm` ran at 58.5 GFLOP/s at load 1.5 (28.5 at load 3.7), and the
merge's own FLOPs as 64 contiguous, L2-resident (4096, 64) x (64, 64) products at 76.6 GFLOP/s (31.4 at load
3.7): ~28 ms at the very best, while 2x the floor (~48 ms quiet, two 12 ms copies making the floor) leaves ~24 ms
for the product after the backup copy and the restore copy. So OFT cannot reach 2x here even with perfect
overlap. The block product that streams W from memory reaches less: the old 64 column-strip GEMMs (ld = 4096,
each row of a strip on its own 4 KiB page) 34.6 GFLOP/s at load 1.5 and 10.2 at load 3.7; the row-piece batched
product now used 38 GFLOP/s at load 1.5 (56 ms with its copy back) and 13.9 at load 3.7 (same run as the 10.2).
Batched MKL products of (m, 64) x (64, 64) stayed at 2.1-2.6x the contiguous-strip time for m from 16 to 1024,
strided or copied into contiguous operands first, so the remaining cost is the small-GEMM rate plus streaming 64
MB through it. OFT's cycle went from 5.05-5.65x to 4.0-4.8x the floor (interleaved, `THP_MEM_ALLOC_ENABLE=1`,
load 3-3.8) and from 7.6-8.8x to 5.3-5.5x without huge pages."""

_MERGE = """\
**Merge + unmerge vs PEFT (RoAD >= 100x, OFT >= 30x at 4096^2 fp32).** rotfunc's merges are O(out x in)
(RoAD: row-pair mixing, closed-form 2x2 inverses; OFT: block-wise product, transposed or QR-inverted 64x64
blocks), PEFT's are dense O(n^3) (RoAD builds the (out, out) R and `torch.linalg.inv`s it; OFT multiplies and
inverts the dense block-diagonal (in, in) matrix). At 4096 rotfunc's time is bounded by memory, not FLOPs:
the functional `oft_merge`/`oft_unmerge` (the `benchmarks.oft` exact-Cayley row) each return a fresh 64 MB
weight, and a fresh 64 MB tensor costs ~40-60 ms of page faults here with 4 KiB pages (PEFT_NOTES.md; glibc maps
large allocations fresh and unmaps them on free). Eagerly without autograd they now write it piece by piece
into a buffer advised `MADV_HUGEPAGE` (`rotfunc._memory.fresh_like`), one pass and no second temporary: that
row went from 19.7x (load 3-5, before) to 43.5x PEFT (load about 1). Under load, 2-thread ops also stall at
OpenMP barriers. `rotfunc.linalg.block_inverse` inverts blocks below 256 by batched LU (`torch.linalg.inv`,
5-9 ms for 64 blocks of 64x64 with 1 thread) and larger ones by Householder QR (batched QR of 64 blocks of 64
took 0.05-4 s with 2 threads under load: a barrier-bound LAPACK loop). Float merges through the shims now write into the weight's own storage (the backup
saved piece by piece on the way, unmerge copies it back): no fresh 64 MB result per call, see the copy-floor
rows."""

BOUNDS: dict[tuple[str, str | None], str] = {
    ("train", None): _TRAIN,
    ("mixed", None): _MIXED,
    ("ensemble", None): _ENSEMBLE,
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
