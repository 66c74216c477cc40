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

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_TEACHER_CONFIG = "demo-teacher.yaml"


def config_path(name: str) -> Path:
    """A config shipped in the project's ``configs/`` folder."""
    path = CONFIGS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"shipped config {name} not found in {CONFIGS_DIR}; is raydistill installed from a checkout?")
    return path


def raydistill_home() -> Path:
    return Path(os.environ.get("RAYDISTILL_HOME", Path.home() / ".cache" / "raydistill"))


def demo_teacher_dir() -> Path:
    """Where the demo teacher for the current ``configs/demo-teacher.yaml`` lives (whether or not it exists)."""
    digest = hashlib.sha256(config_path(DEMO_TEACHER_CONFIG).read_bytes()).hexdigest()[:16]
    return raydistill_home() / "demo-teacher" / digest


def ensure_demo_teacher() -> Path:
    """The exported demo teacher, fitted first (a few minutes on 2 cores) if it is not there yet."""
    target = demo_teacher_dir()
    if (target / "config.json").is_file():
        return target
    from raydistill.config import load_config
    from raydistill.pipeline.runner import run_experiment

    print("[raydistill] fitting the demo teacher on the synthetic scenes (first use only; "
          "`raydistill run configs/demo-teacher.yaml` does the same)", file=sys.stderr, flush=True)
    cfg = load_config(config_path(DEMO_TEACHER_CONFIG), [f"output_dir={raydistill_home() / 'demo-teacher-runs'}"])
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
