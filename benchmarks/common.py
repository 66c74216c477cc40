"""What every benchmark shares: machine facts, versions, result files, tables, inputs and a local Ray.

Each benchmark writes one JSON object to ``benchmarks/results/<benchmark>[-<tag>].json`` with the keys
``benchmark``, ``hardware``, ``versions``, ``config``, its measured figures and, where it compares against a
plain-PyTorch baseline measured in the same run, ``ratio``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ facts
def hardware() -> dict[str, Any]:
    """CPU model and counts, memory, GPUs: enough to tell two result files' machines apart."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gb": memory_gb, "gpus": gpus, "platform": platform.platform()}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("raydistill", "torch", "ray", "timm", "transformers", "mlflow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def result(benchmark: str, config: dict[str, Any], **figures: Any) -> dict[str, Any]:
    """A result object with the common keys first."""
    return {"benchmark": benchmark, "hardware": hardware(), "versions": versions(), "config": config,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}


def result_path(benchmark: str, out_dir: str | os.PathLike | None = None, tag: str | None = None) -> Path:
    """``<out_dir>/<benchmark>[-<tag>].json`` (``out_dir`` defaults to ``benchmarks/results``)."""
    return (Path(out_dir) if out_dir else RESULTS) / (benchmark + (f"-{tag}" if tag else "") + ".json")


def write_result(obj: dict[str, Any], out_dir: str | os.PathLike | None = None, tag: str | None = None) -> Path:
    """Write ``obj`` as ``<out_dir>/<benchmark>[-<tag>].json`` (temporary name, then rename)."""
    path = result_path(obj["benchmark"], out_dir, tag)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    log(f"wrote {path}")
    return path


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (it reads in a terminal and pastes into the README)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ Ray
def start_ray(num_cpus: int | None = None, num_gpus: int | None = None, address: str | None = None) -> None:
    """Connect to ``address`` (a real cluster) or start a local instance with explicit resources."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        from raydistill.pipeline.runner import prepare_local_ray_env

        prepare_local_ray_env()  # what `raydistill run` does for its local instances
        ray.init(address="local", num_cpus=num_cpus or max(4, 2 * (os.cpu_count() or 2)), num_gpus=num_gpus,
                 include_dashboard=False, configure_logging=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False


# ------------------------------------------------------------------------------------------------ inputs
def synth_records(n_images: int, image_size: int = 48, seed: int = 0) -> list[dict[str, Any]]:
    """Image records of the embedded synthetic dataset (every split), generated once and cached."""
    from raydistill.data.sources import read_karpathy
    from raydistill.data.synth import ensure_synth_dataset
    from raydistill.demo_assets import raydistill_home

    json_path = ensure_synth_dataset(raydistill_home() / "synth", n_images=n_images, image_size=image_size,
                                     captions_per_image=(3, 5), seed=seed)
    return read_karpathy(json_path, json_path.parent / "images")


def decoded_inputs(records: list[dict[str, Any]], size: int, repeat_to: int | None = None) -> dict[str, np.ndarray]:
    """The records decoded once to uint8 [n, size, size, 3] image rows (the teacher stage's input).

    ``repeat_to``: cycle the records to this many rows (new ids), for longer measurements on a small set.
    """
    from raydistill.pipeline.datasets import column_batch, slim
    from raydistill.pipeline.rows import decode_batch

    if repeat_to and repeat_to > len(records):
        records = [dict(r, image_id=f"{r['image_id']}#{i // len(records)}",
                        caption_ids=[f"{c}#{i // len(records)}" for c in r["caption_ids"]])
                   for i, r in enumerate(records[i % len(records)] for i in range(repeat_to))]
    batch = column_batch([slim(r) for r in records])
    return decode_batch(batch, size=size, on_bad_image="fail", max_bad_fraction=0.0, max_pixels=10**8)


def demo_teacher_spec(device: str = "cpu") -> dict[str, Any]:
    """The embedded demo's teacher (shipped, or fitted on first use)."""
    from raydistill.demo_assets import ensure_demo_teacher

    return {"kind": "raydistill", "checkpoint": str(ensure_demo_teacher()), "device": device, "dtype": "float32"}


def tiny_teacher_spec(folder: Path, dim: int = 32, image_size: int = 48) -> dict[str, Any]:
    """A tiny raydistill-format teacher saved in ``folder`` (smoke tests: seconds, not minutes)."""
    from raydistill.models.student import build_student, save_dual_encoder
    from raydistill.models.tokenizers import build_wordpiece_tokenizer

    if not (folder / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        records = synth_records(200, image_size)
        tokenizer = build_wordpiece_tokenizer([c for r in records for c in r["captions"]], vocab_size=200)
        model = build_student("test", embed_dim=dim, vocab_size=len(tokenizer),
                              image_size=image_size, resize_size=image_size)
        save_dual_encoder(model, folder, tokenizer=tokenizer)
    return {"kind": "raydistill", "checkpoint": str(folder), "device": "cpu", "dtype": "float32"}


def teacher_overrides(spec: dict[str, Any]) -> list[str]:
    """Config overrides that make a run use the teacher ``spec``."""
    out = [f"teacher.kind={spec['kind']}", f"teacher.checkpoint={spec['checkpoint']}",
           f"teacher.dtype={spec.get('dtype', 'float32')}", f"teacher.device={spec.get('device', 'auto')}"]
    for key in ("tokenizer", "size"):
        if spec.get(key):
            out.append(f"teacher.{key}={spec[key]}")
    return out


def gpu_sharing(gpu: bool) -> list[str]:
    """On one GPU the teacher actor and the Train worker each reserve half of it (both run at once)."""
    if not gpu:
        return ["teacher.pool.num_gpus=0"]
    return ["teacher.pool.num_gpus=0.5", "train.resources_per_worker={GPU: 0.5}"]


def run_config(spec: dict[str, Any], work: Path, overrides: list[str], base: str = "demo.yaml") -> Any:
    """A shipped config (default ``configs/demo.yaml``) with the teacher ``spec``, outputs under ``work``."""
    from raydistill.config import load_config
    from raydistill.demo_assets import config_path

    # Streaming, not rows held in memory (configs/demo.yaml materialises): the path large data takes.
    return load_config(config_path(base), [f"output_dir={work}", f"cache.dir={work / 'cache'}",
                                           "tracking.enabled=false", "train.materialize=false"]
                       + teacher_overrides(spec) + overrides)


class ReportRecorder:
    """A Ray Train ``UserCallback`` that appends rank 0's reported metrics to a JSON-lines file.

    Callbacks run in the Train controller (on the driver's node), not in the driver: the file carries the
    reports back. Read them with :func:`read_reports`.
    """

    def __new__(cls, path: Path):
        import ray.train

        class _Recorder(ray.train.UserCallback):
            def __init__(self, target: str) -> None:
                self.target = target

            def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
                if metrics:
                    with open(self.target, "a") as f:
                        f.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}) + "\n")

        return _Recorder(str(path))


def read_reports(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def steady_rate(reports: list[dict[str, float]], key: str = "samples_per_s") -> float:
    """Samples/s over every logging window but the first (start-up, first batches): total samples / time.

    Windows hold the same number of steps, so this is the harmonic mean of the windows' rates.
    """
    rates = [r[key] for r in reports if key in r]
    if len(rates) < 2:
        raise RuntimeError(f"need at least two logging windows with {key}, got {len(rates)}: raise the step count")
    steady = rates[1:]
    return len(steady) / sum(1.0 / r for r in steady)


def cached_split(cfg: Any, cache_dir: str, split: str) -> dict[str, np.ndarray]:
    """A split's image rows from the embedding cache, decoded (``image``) with ``t_img`` / ``t_txt``, in
    image-id order (the cache's part files come in the order the teacher pool finished them, which varies
    from run to run, and a student trained on the rows would follow it)."""
    from raydistill.pipeline.cache import EmbeddingCache, rows_from_cache_batch
    from raydistill.pipeline.datasets import column_batch
    from raydistill.pipeline.rows import decode_batch

    batch = column_batch(EmbeddingCache(cache_dir).read_split(split).sort_by("image_id").to_pydict())
    return decode_batch(rows_from_cache_batch(batch), size=cfg.data.decode_size, on_bad_image="fail",
                        max_bad_fraction=0.0, max_pixels=cfg.data.max_pixels)
