"""Benchmarks of rotfunc.quant on real bitsandbytes layers (CPU).

Rows:

- merge into nf4 vs the bare dequantize + requantize floor (the merge's own overhead: merge_fn, error report,
  snapshot, assignment). Here ``peft_s`` holds the *floor*; ``ratio`` is floor / rotfunc like every ratio, and
  ``measured`` the rotfunc / floor factor the target is about (<= 1.3x).
- forward of :func:`rotfunc.quant.quantized_linear` vs bitsandbytes' own ``Linear4bit.forward`` (training mode:
  dequantize + F.linear; and eval mode, which on AVX512-BF16 CPUs runs a bf16 fused kernel on a repacked
  weight). ``peft_s`` = bitsandbytes, ratio = bitsandbytes / rotfunc.
- forward + backward through 3 applications of a 4096x4096 nf4 layer: rotfunc (re-dequantizes in backward)
  vs keeping the dequantized weight for backward (plain dequantize + F.linear under autograd); peak RSS.
- merge + restore (bitwise unmerge) on nf4 and int8.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F

from benchmarks._harness import format_table, peak_rss_bytes, timeit
from rotfunc import quant as Q


def _float_state(n: int, *, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(n, n, generator=g) * 0.02, "bias": torch.randn(n, generator=g) * 0.1}


def _nf4(n: int):
    layer = bnb.nn.Linear4bit(n, n, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    layer.load_state_dict(_float_state(n))
    return layer.to("cpu")


def _int8(n: int):
    layer = bnb.nn.Linear8bitLt(n, n, has_fp16_weights=False)
    layer.load_state_dict(_float_state(n))
    return layer.to("cpu")


def _spread(t: dict) -> str:
    return f"{t['min']:.4g}-{t['max']:.4g}"


def _row(name, rot, other=None, *, ratio=None, target="", met=None, **extra) -> dict:
    row = {
        "name": name,
        "rotfunc_s": rot["median"],
        "rotfunc_spread": _spread(rot),
        "peft_s": None if other is None else other["median"],
        "peft_spread": None if other is None else _spread(other),
        "ratio": ratio,
        "target": target,
        "met": met,
    }
    row.update(extra)
    return row


def rows(quick: bool = False) -> list[dict]:
    """The rows listed in the module docstring; ``peft_*`` columns hold the baseline named in ``vs``."""
    n = 128 if quick else 4096
    reps = 1 if quick else 5
    out = []
    torch.manual_seed(0)

    # 1. merge into nf4 vs the dequantize + requantize floor
    layer = _nf4(n)

    def merge_restore():
        Q.restore(layer, Q.merge_into(layer, lambda w, b: (w * 1.0001, b)))

    def floor():
        Q.requantize(layer, Q.dequantize(layer))

    t_floor = timeit(floor, repeats=reps)
    t_merge = timeit(merge_restore, repeats=reps)
    r = t_merge["median"] / t_floor["median"]
    out.append(_row(f"quant.merge_into nf4 {n}x{n} (merge_fn W*1.0001) vs dequantize+requantize floor",
                    t_merge, t_floor, ratio=t_floor["median"] / t_merge["median"], target="<= 1.3x floor",
                    met=r <= 1.3, measured=f"{r:.3g}x floor", vs="floor", section="floor"))

    # 2. forward: quantized_linear vs bitsandbytes' Linear4bit.forward, batch of 64 tokens
    x = torch.randn(64, n)
    qw = Q.quant_weight_of(layer)
    with torch.no_grad():
        t_rot = timeit(lambda: Q.quantized_linear(qw, x, layer.bias), repeats=reps * 4)
        t_bnb = timeit(lambda: layer(x), repeats=reps * 4)
        out.append(_row(f"forward nf4 {n}x{n}, 64 tokens: rotfunc vs bnb Linear4bit (train mode)", t_rot, t_bnb,
                        ratio=t_bnb["median"] / t_rot["median"], vs="bnb Linear4bit"))
        eval_layer = _nf4(n).eval()
        eval_layer(x)  # on AVX512-BF16 CPUs this repacks the weight once
        packed = bool(getattr(eval_layer.weight.quant_state, "packing_format_for_cpu", False))
        t_eval = timeit(lambda: eval_layer(x), repeats=reps * 4)
        out.append(_row(f"forward nf4 {n}x{n}, 64 tokens: rotfunc vs bnb eval mode "
                        f"({'repacked bf16 kernel' if packed else 'no repack on this CPU'})", t_rot, t_eval,
                        ratio=t_eval["median"] / t_rot["median"], vs="bnb Linear4bit eval"))

    # 3. forward + backward memory: 3 applications of the layer, as in a stack of layers
    xg = torch.randn(64, n, requires_grad=True)
    bias = layer.bias.detach()

    def chain(fwd):
        def run():
            h = xg
            for _ in range(3):
                h = torch.tanh(fwd(h))
            torch.autograd.grad(h.sum(), xg)

        return run

    rot_run = chain(lambda h: Q.quantized_linear(qw, h, bias))
    keep_run = chain(lambda h: F.linear(h, Q.dequantize(qw), bias))
    t_rot = timeit(rot_run, repeats=reps)
    t_keep = timeit(keep_run, repeats=reps)
    m_rot = min(peak_rss_bytes(rot_run) for _ in range(2))
    m_keep = min(peak_rss_bytes(keep_run) for _ in range(2))
    out.append(_row(f"fwd+bwd 3x nf4 {n}x{n}, 64 tokens: rotfunc recompute vs keeping dequantized W (peft_s)",
                    t_rot, t_keep, ratio=t_keep["median"] / t_rot["median"], vs="keep dequantized W",
                    measured=f"peak {m_rot / max(m_keep, 1):.2f}x", rotfunc_peak_bytes=m_rot, peft_peak_bytes=m_keep))

    # 4. merge + restore (bitwise unmerge) on nf4 and int8
    fn = lambda w, b: (w + 1e-3, b)  # noqa: E731
    for kind, lay in (("nf4", layer), ("int8", _int8(n))):
        rec = Q.merge_into(lay, fn)
        t_r = timeit(lambda: Q.restore(lay, rec, check=False), repeats=reps)  # idempotent after the first
        t_mr = timeit(lambda: Q.restore(lay, Q.merge_into(lay, fn)), repeats=reps)
        out.append(_row(f"merge+restore {kind} {n}x{n} (restore alone {t_r['median'] * 1e3:.3g} ms; "
                        f"rel. requant error {rec.rel_fro_error:.2e})", t_mr, vs=""))
    return out


COLUMNS = ["name", "rotfunc_s", "rotfunc_spread", "peft_s", "peft_spread", "ratio", "target", "met",
           "rotfunc_peak_bytes", "peft_peak_bytes"]

if __name__ == "__main__":
    import sys

    print(format_table(rows(quick="--quick" in sys.argv[1:]), COLUMNS))
