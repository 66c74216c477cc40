"""The embedded demo's assets: the configs shipped with the project and the fitted demo teacher.

The demo teacher is a CLIP-architecture dual encoder fitted on the synthetic captioned scenes with the
ground-truth contrastive objective, by raydistill's own command::

    raydistill run configs/demo-teacher.yaml

:func:`ensure_demo_teacher` runs exactly that on first use and keeps the exported model under
``$RAYDISTILL_HOME/demo-teacher/<config hash>/``; later runs reuse it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from raydistill.paths import raydistill_home

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_TEACHER_CONFIG = "demo-teacher.yaml"
# The checkpoint `raydistill run configs/demo-teacher.yaml` produced, shipped so the demo fits in its time
# budget on 2 cores. SOURCE.json records the config's sha256: edit the config and the shipped copy is ignored
# (the teacher is fitted again on first use).
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
    """Where a locally fitted demo teacher for the current ``configs/demo-teacher.yaml`` lives."""
    suffix = "-quick" if quick else ""
    return raydistill_home() / "demo-teacher" / (demo_teacher_config_sha256()[:16] + suffix)


def shipped_demo_teacher() -> Path | None:
    """The shipped checkpoint, if it was made from the current ``configs/demo-teacher.yaml``."""
    source = SHIPPED_TEACHER / "SOURCE.json"
    if not source.is_file():
        return None
    import json

    if json.loads(source.read_text()).get("config_sha256") != demo_teacher_config_sha256():
        return None
    return SHIPPED_TEACHER


def ensure_demo_teacher(quick: bool = False) -> Path:
    """The demo teacher: the shipped checkpoint, a locally fitted one, or one fitted now (first use only).

    Args:
        quick: accept (and, if needed, fit) the smoke-test teacher of `raydistill demo --quick` when no full
            demo teacher exists yet.
    """
    shipped = shipped_demo_teacher()
    if shipped is not None:
        return shipped
    if (demo_teacher_dir() / "config.json").is_file():
        return demo_teacher_dir()
    target = demo_teacher_dir(quick)
    if (target / "config.json").is_file():
        return target
    from raydistill.config import load_config
    from raydistill.pipeline.runner import run_experiment

    print("[raydistill] fitting the demo teacher on the synthetic scenes (first use only; "
          "`raydistill run configs/demo-teacher.yaml` does the same)", file=sys.stderr, flush=True)
    overrides = [f"output_dir={raydistill_home() / 'demo-teacher-runs'}"] + (QUICK_TEACHER_OVERRIDES if quick else [])
    cfg = load_config(config_path(DEMO_TEACHER_CONFIG), overrides)
    summary = run_experiment(cfg)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(summary["student_dir"], tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process published it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
