"""The floor of a training step on the nf4 MiniLM: the frozen model's own forward + backward, no adapter.

Any adapter's step runs the base model's matmuls, attention, norms and 4-bit dequantizations; this measures them
alone against PEFT's step and rotfunc's (the ``benchmarks.train`` sides), all built in one process and stepped in
turn for ``--rounds`` rounds (medians; the machine is shared, so load hits every side alike). The floor's grads
flow from the first layer's q/k/v outputs (a zero scalar leaf added to them), so every layer's input gradient is
computed, as in an adapted model; nothing else requires grad.

Run: ``python -m benchmarks.step_floor [--method road] [--rounds 15]`` (1 torch thread); prints a table. The
figures are quoted in ``benchmarks/bounds.py`` (what bounds the training step).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import train
from benchmarks._common import THREADS
from benchmarks._harness import interleaved_rounds


def floor_step(*, compiled: bool, batch_size: int = 16, max_length: int = 32):
    """One forward + backward of the frozen nf4 MiniLM (``benchmarks.train``'s batch and loss), no adapter."""
    import rotfunc
    from rotfunc.demo import embed

    tok, model = train._minilm()
    for p in model.parameters():
        p.requires_grad_(False)
    z = torch.zeros((), requires_grad=True)
    attn = model.encoder.layer[0].attention.self
    for lin in (attn.query, attn.key, attn.value):
        lin.register_forward_hook(lambda m, i, o: o + z)
    if compiled:
        rotfunc.compile_blocks(model, fullgraph=True)
    batch, target = train._batch(tok, batch_size, max_length), train._target(batch_size)

    def step():
        ((embed(model, batch) - target) ** 2).sum().backward()
        z.grad = None

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_floor")
    p.add_argument("--method", default="road", choices=("road", "oft", "randlora"))
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    kw = dict(batch_size=16, max_length=32)
    steps = {side: train.build_step(side, a.method, **kw)[0] for side in ("peft", "rotfunc", "rotfunc_blocks")}
    steps["floor (no adapter)"] = floor_step(compiled=False)
    steps["floor + compile_blocks"] = floor_step(compiled=True)
    for step in steps.values():  # warm-up (compiles)
        step()
        step()
    times = interleaved_rounds(steps, a.rounds)
    peft = times["peft"]
    print(f"| {a.method} nf4 MiniLM 16x32 | median s | vs PEFT | min vs PEFT's min |\n|---|---|---|---|")
    for side, t in times.items():
        print(f"| {side} | {t['median']:.3f} | {t['median'] / peft['median']:.2f}x | {t['min'] / peft['min']:.2f}x |")


if __name__ == "__main__":
    main()
