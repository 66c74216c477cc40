"""The embedded demo's assets: the configs shipped with the project and the fitted demo teacher.

The demo teacher is a CLIP-architecture dual encoder fitted on the synthetic captioned scenes with the
ground-truth contrastive objective, by raydistill's own command::

    raydistill run configs/demo-teacher.yaml

:func:`find_demo_teacher` finds the shipped checkpoint or one fitted earlier under
``$RAYDISTILL_HOME/demo-teacher/<config hash>/``; :func:`raydistill.demo.ensure_demo_teacher` fits one when
there is none (the commands call it before a run whose ``teacher.kind`` is ``demo``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from raydistill.paths import raydistill_home

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_TEACHER_CONFIG = "demo-teacher.yaml"
# The checkpoint `raydistill run configs/demo-teacher.yaml` produced, shipped so the demo fits in its time
# budget on 2 cores. SOURCE.json records the config's sha256 and the synthetic generator's version: edit the
# config, or change what the generator writes, and the shipped copy is ignored (the teacher is fitted again on
# first use).
SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / "demo-teacher"


def config_path(name: str) -> Path:
    """A config shipped in the project's ``configs/`` folder."""
    path = CONFIGS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"shipped config {name} not found in {CONFIGS_DIR}; is raydistill installed from a checkout?")
    return path


def demo_teacher_config_sha256() -> str:
    return hashlib.sha256(config_path(DEMO_TEACHER_CONFIG).read_bytes()).hexdigest()


# `raydistill demo --quick` fits a smoke-test teacher in a fraction of the steps when no full one exists.
QUICK_TEACHER_OVERRIDES = ["train.steps=60", "train.checkpoint_every=60"]


def demo_teacher_dir(quick: bool = False) -> Path:
    """Where a locally fitted demo teacher for the current ``configs/demo-teacher.yaml`` and synthetic data lives."""
    from raydistill.data.synth import GENERATOR_VERSION

    suffix = "-quick" if quick else ""
    return raydistill_home() / "demo-teacher" / f"{demo_teacher_config_sha256()[:16]}-synth{GENERATOR_VERSION}{suffix}"


def shipped_demo_teacher() -> Path | None:
    """The shipped checkpoint, if it was made from the current ``configs/demo-teacher.yaml`` and synthetic data."""
    import json

    from raydistill.data.synth import GENERATOR_VERSION

    source = SHIPPED_TEACHER / "SOURCE.json"
    if not source.is_file():
        return None
    recorded = json.loads(source.read_text())
    if (recorded.get("config_sha256"), recorded.get("synth_generator_version")) != (demo_teacher_config_sha256(),
                                                                                   GENERATOR_VERSION):
        return None
    return SHIPPED_TEACHER


def find_demo_teacher(quick: bool = False) -> Path | None:
    """The demo teacher for the current ``configs/demo-teacher.yaml``: the shipped checkpoint, or one fitted
    here earlier (with ``quick``, also the smoke-test teacher of ``raydistill demo --quick``); None if none is.

    Fitting one is :func:`raydistill.demo.ensure_demo_teacher` (a training run: the commands do it, not the
    pipeline, which only needs the files).
    """
    shipped = shipped_demo_teacher()
    if shipped is not None:
        return shipped
    for candidate in [demo_teacher_dir()] + ([demo_teacher_dir(quick=True)] if quick else []):
        if (candidate / "config.json").is_file():
            return candidate
    return None
