"""Ensembles: K = 8 adapters trained at once on one frozen MiniLM (vmapped) against a loop of 8 steps.

For each adapter type and base kind, one adapter config (``target_modules=["query", "key", "value",
"dense"]``) is attached to all-MiniLM-L6-v2 loaded with ``attn_implementation="eager"`` (its attention ops have
batching rules; CPU SDPA's backward has none and would fall back to a per-member loop, with a warning). K = 8
members start from 8 seeds and train with 8 learning rates on the same batch of 8 stdlib sentences x 32 tokens
(``--quick``: K = 2, 2 x 8):

* ``vmapped``: one :func:`rotfunc.ensemble_step` call (grad + Adam, vmapped over the stacked params and state);
* ``loop``: 8 x (:func:`rotfunc.value_and_grad`, plain autograd underneath, + :func:`rotfunc.adam` update),
  the honest alternative: the fastest single-adapter step rotfunc has.

On the nf4 causal LM (``causal_ensemble_row``, SmolLM2-135M, eager attention): the demo's adapter config on all 210
projections, K = 8 members with random non-identity params of a trained adapter's size, 8 learning rates, the
causal-LM loss on 2 blocks of 32 tokens, then on 1 block of 16.

``ratio = time(loop) / time(vmapped)`` (target >= 2x). Peak memory (process RSS high-water mark above the
resident size before the call) of one vmapped step is reported against one single-adapter step: K members cost
one base plus K adapters' params, grads, Adam state and activations. The two variants alternate in one
process; medians; the load average is recorded per row.

Run: ``python -m benchmarks.ensemble`` (``--quick`` for a small run; ``--models``, ``--methods``, ``--json`` as
``benchmarks.mixed``).
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks._common import LABEL, METHODS, THREADS, quiet, row
from benchmarks._harness import format_table, peak_rss_bytes
from benchmarks.mixed import _config, _load, _model, _stats

__all__ = ["rows", "COLUMNS", "plan"]

KINDS = ("nf4", "int8", "float")


def _return_freed_memory() -> None:
    """Make glibc return every large freed block to the OS at once (a fixed mmap threshold of 64 KiB), so the RSS
    high-water mark of a call measures what it needs, not what an earlier call left cached in the heap."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def ensemble_row(method: str, kind: str, *, k: int, batch_size: int, max_length: int, repeats: int) -> dict:
    import rotfunc
    from benchmarks.train import _batch
    from rotfunc.demo import embed

    tok, model = _model(kind)
    model.set_attn_implementation("eager")
    rotfunc.attach(model, _config(method), generator=torch.Generator().manual_seed(0))
    members = [rotfunc.init_params(model, generator=torch.Generator().manual_seed(s)) for s in range(k)]
    if method == "oft":  # PEFT's N(0, 0.1^2) init is far from a trained OFT; scale it like benchmarks.oft does
        members = [{n: v * 0.1 for n, v in m.items()} for m in members]
    batch = _batch(tok, batch_size, max_length)
    with torch.no_grad(), rotfunc.disabled(model):
        target = embed(model, batch).roll(1, 0)  # a fixed target: another sentence's base embedding

    def loss_fn(p, batch):
        out = embed(lambda **kw: torch.func.functional_call(model, p, args=(), kwargs=kw), batch)
        return (1.0 - (out * target).sum(-1)).mean()

    return _time_ensemble(model, loss_fn, members, batch, repeats=repeats, method=method, kind=kind,
                          name=f"{LABEL[method]} ensemble {kind} MiniLM: K={k} vmapped train steps vs a loop, "
                               f"{batch_size}x{max_length} tokens")


def causal_ensemble_row(method: str, *, k: int, batch_size: int, block: int, repeats: int,
                        n_layers: int | None = None) -> dict:
    """The same on the nf4 causal LM (SmolLM2-135M, ``benchmarks.causal_lm``'s model, eager attention): the demo's
    adapter config on all 210 projections, K members with random non-identity params of a trained adapter's size
    (K seeds), K learning rates, the causal-LM loss on ``batch_size`` blocks of ``block`` tokens."""
    import rotfunc
    from benchmarks.causal_lm import _batch as lm_batch, _model as lm_model, _randomize
    from rotfunc.causal_lm import adapter_config, causal_lm_loss

    tok, model = lm_model(n_layers)
    model.set_attn_implementation("eager")
    rotfunc.attach(model, adapter_config(method))
    start = rotfunc.adapter_params(model)
    members = [_randomize(start, seed=s) for s in range(k)]
    ids = lm_batch(tok, batch_size, block)

    def loss_fn(p, ids):
        out = torch.func.functional_call(model, p, args=(), kwargs={"input_ids": ids, "use_cache": False})
        return causal_lm_loss(out.logits, ids)

    depth = "" if n_layers is None else f" ({n_layers} layers)"
    return _time_ensemble(model, loss_fn, members, ids, repeats=repeats, method=method, kind="nf4",
                          model_name="SmolLM2-135M",
                          name=f"{LABEL[method]} ensemble nf4 SmolLM2-135M{depth}: K={k} vmapped train steps vs a "
                               f"loop, {batch_size}x{block} tokens")


def _time_ensemble(model, loss_fn, members: list[dict], batch, *, repeats: int, name: str, method: str, kind: str,
                   model_name: str = "MiniLM") -> dict:
    """One row: ``ensemble_step`` on the stacked ``members`` vs a loop of value_and_grad + adam, interleaved; peak
    memory of one vmapped step vs one single-adapter step."""
    import rotfunc

    k = len(members)
    lrs = torch.logspace(-4, -2, k)
    step = rotfunc.ensemble_step(loss_fn)
    vg = rotfunc.value_and_grad(loss_fn)
    opts = [rotfunc.adam(float(lr)) for lr in lrs]
    box = {"stacked": rotfunc.stack_params(members)}
    box["state"] = rotfunc.ensemble_init(box["stacked"])
    loop_params = list(members)
    loop_states = [o.init(p) for o, p in zip(opts, members)]

    def vmapped():
        box["stacked"], box["state"], _ = step(box["stacked"], box["state"], lrs, batch)

    def loop():
        for i, opt in enumerate(opts):
            _, g = vg(loop_params[i], batch)
            loop_params[i], loop_states[i] = opt.update(g, loop_states[i], loop_params[i])

    def single():
        _, g = vg(loop_params[0], batch)
        opts[0].update(g, loop_states[0], loop_params[0])

    samples: dict[str, list[float]] = {"vmapped": [], "loop": []}
    loads = [_load()]
    with quiet():
        vmapped(), loop()
        for _ in range(repeats):
            for key, fn in (("vmapped", vmapped), ("loop", loop)):
                t0 = time.perf_counter()
                fn()
                samples[key].append(time.perf_counter() - t0)
        _return_freed_memory()
        mem_1 = peak_rss_bytes(single)
        mem_k = peak_rss_bytes(vmapped)
    loads.append(_load())
    tv, tl = _stats(samples["vmapped"]), _stats(samples["loop"])
    ratio = tl["median"] / tv["median"]
    base_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    adapter_bytes = sum(v.numel() * v.element_size() for v in members[0].values())
    return row(
        name, tv, tl, ratio=ratio, target=">= 2x throughput", met=ratio >= 2.0, measured=f"{ratio:.2f}x throughput",
        vs=f"loop of {k}", method=method, kind=kind, model=model_name, section="ensemble", k=k,
        peak_mib_k=mem_k / 2**20, peak_mib_1=mem_1 / 2**20,
        memory=f"{mem_k / 2**20:.0f} MiB for K={k} vs {mem_1 / 2**20:.0f} MiB for 1 (base {base_bytes / 2**20:.0f} MiB, "
               f"one adapter's params {adapter_bytes / 2**20:.2f} MiB)",
        load_average=f"{loads[0]:.1f}-{loads[1]:.1f}",
    )


CAUSAL = [dict(k=8, batch_size=2, block=32, repeats=3), dict(k=8, batch_size=1, block=16, repeats=3)]


def plan(quick: bool = False, *, models: tuple[str, ...] = ("minilm", "smollm2"),
         methods: tuple[str, ...] = METHODS) -> list[tuple[str, callable]]:
    """MiniLM rows, then the causal LM's (nf4; not in ``quick``: it needs the SmolLM2 cache)."""
    if quick:
        sizes, kinds = [dict(k=2, batch_size=2, max_length=8, repeats=1)], ("nf4",)
    else:  # a training-sized batch (FLOP-bound), then a small one (per-op overhead and dequantization bound)
        sizes, kinds = [dict(k=8, batch_size=8, max_length=32, repeats=5), dict(k=8, batch_size=1, max_length=16,
                                                                                 repeats=5)], KINDS
    out = []
    if "minilm" in models:
        out += [(f"ensemble {m} {kd} {kw['batch_size']}x{kw['max_length']}",
                 lambda m=m, kd=kd, kw=kw: ensemble_row(m, kd, **kw)) for kw in sizes for kd in kinds for m in methods]
    if "smollm2" in models and not quick:
        out += [(f"ensemble {m} nf4 SmolLM2 {kw['batch_size']}x{kw['block']}",
                 lambda m=m, kw=kw: causal_ensemble_row(m, **kw)) for kw in CAUSAL for m in methods]
    return out


def rows(quick: bool = False, **selection) -> list[dict]:
    """Benchmark rows (see the module docstring); ``selection``: :func:`plan`'s ``models`` / ``methods``."""
    from tqdm.auto import tqdm

    torch.set_num_threads(THREADS)
    return [thunk() for _, thunk in tqdm(plan(quick, **selection), desc="ensemble", file=sys.stderr)]


COLUMNS = ["name", "vs", "rotfunc_s", "rotfunc_spread", "peft_s", "ratio", "measured", "target", "met", "memory",
           "load_average"]

if __name__ == "__main__":
    from benchmarks.mixed import main

    main(rows_fn=rows, columns=COLUMNS, prog="python -m benchmarks.ensemble")
