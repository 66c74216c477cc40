"""Shared test fixtures: the real data samples beside the checkout, and seeding."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray >= 2.59 turns token authentication on for local clusters; tests that start `ray start --head`
# choose their mode explicitly, everything else runs with it off.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config: pytest.Config) -> None:
    # What `raydistill run` sets before it starts a local instance (the tests start theirs with ray.init).
    from raydistill.pipeline.runner import prepare_local_ray_env

    prepare_local_ray_env()
    # Embedded assets (synthetic data, demo teacher) of the tests go to a fresh folder, never ~/.cache.
    if "RAYDISTILL_HOME" not in os.environ:
        import tempfile

        os.environ["RAYDISTILL_HOME"] = tempfile.mkdtemp(prefix="raydistill-test-home-")


def _shared_dir() -> Path:
    env = os.environ.get("RAYDISTILL_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """`shared/data/real` beside the checkout (CI lays a copy of shared/ there)."""
    path = _shared_dir() / "data" / "real"
    if not path.is_dir():
        raise FileNotFoundError(
            f"real test samples not found at {path}; set RAYDISTILL_SHARED to the shared/ folder"
        )
    return path


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
