"""A run's folder: where its config, tokenizer, checkpoints and results go, and how a resume finds it."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from raydistill.config import Config, ConfigError, config_from_dict
from raydistill.paths import is_uri

RUN_RESULT = "result.json"
RUN_CONFIG = "config.yaml"
#: The run this process is working on (its folder and MLflow run id, once they exist): what a failed command
#: reports with ``--json``.
CURRENT_RUN: dict[str, str | None] = {"run_dir": None, "run_id": None}


def find_run_dir(resume: str, output_dir: str | None) -> Path:
    """A run folder given by path, or by name under ``<output_dir>/runs`` (default ./raydistill_runs/runs)."""
    path = Path(resume)
    if not (path / RUN_CONFIG).is_file():
        path = Path(output_dir or "raydistill_runs") / "runs" / resume
    if not (path / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"--resume {resume}: no run folder holding {RUN_CONFIG} (tried {resume} and {path})")
    return path.resolve()


def new_run_dir(cfg: Config, resume: str | None) -> tuple[str, Path]:
    """The run's name and folder: a fresh ``<name>-<time>``, or the resumed run's."""
    runs = Path(cfg.output_dir) / "runs"
    if resume:
        path = find_run_dir(resume, cfg.output_dir)
        return path.name, path
    name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = runs / name
    k = 1
    while path.exists():
        path = runs / f"{name}.{k}"
        k += 1
    path.mkdir(parents=True)
    return path.name, path


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run was started with."""
    import yaml

    raw = yaml.safe_load((run_dir / RUN_CONFIG).read_text())
    return config_from_dict(raw, origin=str(run_dir / RUN_CONFIG))


def planned_steps(cfg: Config, n_train_captions: int) -> int:
    """Total optimizer steps: ``train.steps``, or epochs x full global batches per epoch."""
    if cfg.train.steps:
        return cfg.train.steps
    per_epoch = n_train_captions // (cfg.train.batch_size * cfg.train.num_workers)
    if per_epoch == 0:
        raise ValueError(
            f"the training split has {n_train_captions} captions, fewer than one global batch of "
            f"{cfg.train.batch_size} x {cfg.train.num_workers} workers; lower train.batch_size"
        )
    return cfg.train.epochs * per_epoch


def train_storage(cfg: Config) -> str:
    """Where Ray Train keeps the run's checkpoints: ``train.storage_path`` or ``<output_dir>/ray_train``."""
    return cfg.train.storage_path or str(Path(cfg.output_dir) / "ray_train")


def require_writable(folder: str, key: str) -> None:
    """Fail fast, naming the config key, when a local output folder cannot be written.

    Writes and removes a probe file (permission bits alone say nothing for root, read-only mounts or a full
    disk). Object-store URIs are left to the run: probing them would need credentials here.

    Raises:
        ConfigError: the folder cannot be created or written, with the reason.
    """
    if is_uri(folder):
        return
    path = Path(folder)
    probe = path / f".raydistill-write-probe-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{key}={folder}: cannot write there ({err.strerror or err}); point {key} at a writable folder"
        ) from None
