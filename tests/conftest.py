"""Shared test set-up: the environment of local Ray instances, a fresh asset folder, and seeding.

Real files the tests read are committed under tests/data (see tests/real_data.py); nothing outside the
repository is read.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

# Ray >= 2.59 turns token authentication on for local clusters; tests that start `ray start --head`
# choose their mode explicitly, everything else runs with it off.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    # What `raydistill run` sets before it starts a local instance (the tests start theirs with ray.init).
    from raydistill.pipeline.ray_env import prepare_local_ray_env

    prepare_local_ray_env()
    # Embedded assets (synthetic data, demo teacher) of the tests go to a fresh folder, never ~/.cache.
    if "RAYDISTILL_HOME" not in os.environ:
        import tempfile

        os.environ["RAYDISTILL_HOME"] = tempfile.mkdtemp(prefix="raydistill-test-home-")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
