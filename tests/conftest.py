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
