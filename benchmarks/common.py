"""What every benchmark shares: machine facts, versions, result files, tables, inputs, a local Ray, and the
split of a throughput measurement into start-up and steady state.

Each benchmark writes one JSON object to ``benchmarks/results/<benchmark>[-<tag>].json`` with the keys
``benchmark``, ``hardware``, ``versions``, ``config``, its measured figures and, where it compares against a
plain-PyTorch baseline measured in the same run, ``ratio``.

Throughput figures come in three parts (:func:`rates`): the **steady** rate (items over the time after the
first batches and the actors' or workers' start; each benchmark says where its steady window starts), the
**end-to-end** rate (items over the whole measured time), and ``startup_s``, the seconds the whole took
beyond what its items would take at the steady rate: ``seconds = startup_s + items / steady``. Ratios are
taken between steady rates: a start-up of fixed seconds says nothing about a run of hours.
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
import ray

from raydistill.pipeline.counters import Counters
from raydistill.pipeline.ray_env import prepare_local_ray_env

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
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        prepare_local_ray_env()  # what `raydistill run` does for its local instances
        ray.init(address="local", num_cpus=num_cpus or max(4, 2 * (os.cpu_count() or 2)), num_gpus=num_gpus,
                 include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def configure_data(cfg: Any) -> None:
    """This process's Ray Data settings as a run's driver has them (``run_experiment`` and ``embed`` set them
    through ``init_ray``): for the plans a benchmark builds and runs itself, so that they run as a run's do."""
    from raydistill.pipeline.plans import configure_data_context

    configure_data_context(cfg)


# ------------------------------------------------------------------------------------------------ rates
def rates(items: float, seconds: float, steady: float, unit: str) -> dict[str, float]:
    """One throughput measurement as steady rate, end-to-end rate and start-up (see the module docstring).

    Args:
        items: everything the measurement processed.
        seconds: its whole wall time.
        steady: its rate inside the steady window, per second.
        unit: ``images``, ``captions`` or ``samples`` (names the keys).

    Returns:
        ``steady_<unit>_per_s``, ``end_to_end_<unit>_per_s`` and ``startup_s``.
    """
    return {f"steady_{unit}_per_s": steady, f"end_to_end_{unit}_per_s": items / seconds,
            "startup_s": seconds - items / steady}


def window_rate(items: float, seconds: float, what: str) -> float:
    """Items per second in a steady window; refuses an empty one (too few batches were measured)."""
    if items <= 0 or seconds <= 0:
        raise RuntimeError(f"no steady window for {what} ({items} items in {seconds:.3g} s): measure more batches")
    return items / seconds


def steady_rate(reports: list[dict[str, float]], key: str = "samples_per_s") -> float:
    """Samples/s over every logging window but the first (start-up, first batches): total samples / time.

    Windows hold the same number of steps, so this is the harmonic mean of the windows' rates.
    """
    windows = [r[key] for r in reports if key in r]
    if len(windows) < 2:
        raise RuntimeError(f"need at least two logging windows with {key}, got {len(windows)}: raise the step count")
    steady = windows[1:]
    return len(steady) / sum(1.0 / r for r in steady)


def train_rates(reports: list[dict[str, float]], samples: int, seconds: float) -> dict[str, float]:
    """A Ray Train run's figures: the steady samples/s of :func:`steady_rate` (as the worker measured them), the
    end-to-end samples/s over ``seconds`` (the run's ``train_seconds``: the whole ``fit``, worker start and final
    checkpoint included), ``startup_s``, and ``samples`` and ``seconds`` themselves."""
    return {"samples": samples, "seconds": seconds} | rates(samples, seconds, steady_rate(reports), "samples")


@ray.remote(num_cpus=0)
class _BatchLog:
    """The notes of :class:`TimedCounters`, in one small actor that every process appends to."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def get(self) -> list[dict[str, Any]]:
        return list(self.events)


class TimedCounters(Counters):
    """A run's counters that also note, for every addition made by an actor, when it was made and by which.

    ``TeacherEmbedder`` adds to its counters once per batch, right after embedding it (its ``teacher_seconds``):
    handed this in place of :class:`~raydistill.pipeline.counters.Counters` (``with_teacher(..., counters=...)``),
    it timestamps each batch where it was embedded, in the actor itself. Ray Data hands the batches on to the
    consumer in bursts, so the consumer's clock would time the executor, not the teacher. Read the notes with
    :meth:`actor_calls`; :func:`pool_steady_window` turns them into a steady window.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._log = None

    def start(self) -> TimedCounters:
        super().start()
        # The handle keeps the actor alive (a named actor with no handle left is destroyed).
        self._log = _BatchLog.options(name=f"{self.name}-batches", get_if_exists=True).remote()
        return self

    def _log_handle(self) -> Any:
        if self._log is None:
            self._log = ray.get_actor(f"{self.name}-batches")
        return self._log

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._log = None

    def add_many(self, values: dict[str, float], bad: list[tuple[str, str, str, str]] | None = None
                 ) -> dict[str, float]:
        actor = ray.get_runtime_context().get_actor_id()
        if actor is not None:
            ray.get(self._log_handle().add.remote({"time": time.time(), "actor": actor, **values}))
        return super().add_many(values, bad)

    def actor_calls(self) -> list[dict[str, Any]]:
        """Every addition an actor made so far: ``time`` (epoch seconds), ``actor`` (its id), and the values."""
        return ray.get(self._log_handle().get.remote())


def pool_steady_window(actor_calls: list[dict[str, Any]], images: int, captions: int) -> dict[str, float]:
    """A teacher pool's steady window, timed in the actors: from the moment every actor had finished its first
    batch (all actors started, their models loaded, their first batch done) to the last batch finished.

    Args:
        actor_calls: :meth:`TimedCounters.actor_calls` of the pass (one per teacher batch).
        images: images the pass delivered.
        captions: captions the pass delivered.

    A batch's size is read from the call when the actors report it (``teacher_images_embedded``); otherwise
    each batch is taken to hold the mean (the pool's batches are all ``teacher.pool.batch_size`` but for a
    block's remainder).

    Returns:
        ``images``, ``captions`` and ``seconds`` of the window, and the ``batches`` finished inside it.
    """
    calls = sorted(actor_calls, key=lambda c: c["time"])
    if not calls:
        raise RuntimeError("the teacher actors noted no batch: are they handed the TimedCounters?")
    exact = all("teacher_images_embedded" in c for c in calls)
    first: dict[str, float] = {}
    for call in calls:
        first.setdefault(call["actor"], call["time"])
    ready = max(first.values())
    inside = [c for c in calls if c["time"] > ready]
    if exact:
        window_images = sum(c["teacher_images_embedded"] for c in inside)
        window_captions = sum(c.get("teacher_captions_embedded", 0) for c in inside)
    else:
        window_images = images * len(inside) / len(calls)
        window_captions = captions * len(inside) / len(calls)
    return {"images": window_images, "captions": window_captions,
            "seconds": (inside[-1]["time"] - ready) if inside else 0.0, "batches": len(inside)}


# ------------------------------------------------------------------------------------------------ inputs
def synth_records(n_images: int, image_size: int = 48, seed: int = 0) -> list[dict[str, Any]]:
    """Image records of the embedded synthetic dataset (every split), generated once and cached."""
    from raydistill.data.sources import read_karpathy
    from raydistill.data.synth import ensure_synth_dataset
    from raydistill.paths import raydistill_home

    json_path = ensure_synth_dataset(raydistill_home() / "synth", n_images=n_images, image_size=image_size,
                                     captions_per_image=(3, 5), seed=seed)
    return read_karpathy(json_path, json_path.parent / "images")


def _column(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


IMAGE_ROW_KEYS = ("image_id", "path", "data", "captions", "caption_ids", "split")


def decoded_inputs(records: list[dict[str, Any]], size: int, repeat_to: int | None = None) -> dict[str, np.ndarray]:
    """The records decoded once to uint8 [n, size, size, 3] image rows (the teacher stage's ``image`` input).

    ``repeat_to``: cycle the records to this many rows (new ids), for longer measurements on a small set.
    """
    from raydistill.pipeline.rows import decode_batch

    if repeat_to and repeat_to > len(records):
        records = [dict(r, image_id=f"{r['image_id']}#{i // len(records)}",
                        caption_ids=[f"{c}#{i // len(records)}" for c in r["caption_ids"]])
                   for i, r in enumerate(records[i % len(records)] for i in range(repeat_to))]
    batch = {k: _column([r.get(k) for r in records]) for k in IMAGE_ROW_KEYS}
    return decode_batch(batch, sizes={"image": size}, on_bad_image="fail", max_bad_fraction=0.0, max_pixels=10**8)


def cached_split(cfg: Any, cache_dir: str, split: str) -> dict[str, np.ndarray]:
    """A split's image rows read from the embedding cache in this process (no Ray), decoded at the student's
    size (``pixels``) with ``t_img`` [n, d] and ``t_txt`` (per image, n_captions x d flattened), in image-id
    order: the cache's parts come in the order the teacher pool finished them, which varies from run to run,
    and a student trained on the rows would follow it."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raydistill.pipeline.cache import EmbeddingCache
    from raydistill.pipeline.plans import student_decode_size
    from raydistill.pipeline.rows import decode_batch

    cache = EmbeddingCache(cache_dir)
    table = pa.concat_tables([pq.read_table(path, filesystem=cache.fs) for path in cache.part_files(split)])
    table = table.sort_by("image_id")
    n = table.num_rows
    batch = {k: _column(table.column(k).to_pylist()) for k in IMAGE_ROW_KEYS}
    batch["t_img"] = np.asarray(table.column("t_img").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                                np.float32).reshape(n, -1)
    t_txt = table.column("t_txt").combine_chunks()
    flat = np.asarray(t_txt.flatten().to_numpy(zero_copy_only=False), np.float32)
    batch["t_txt"] = _column(np.split(flat, np.cumsum(pc.list_value_length(t_txt).to_numpy())[:-1]))
    return decode_batch(batch, sizes={"pixels": student_decode_size(cfg)}, on_bad_image="fail",
                        max_bad_fraction=0.0, max_pixels=cfg.data.max_pixels)


def student_max_len(cfg: Any) -> int:
    """Caption tokens of the configured student (its preset's unless ``student.max_len`` is set)."""
    from raydistill.models.student import get_preset

    return cfg.student.max_len or get_preset(cfg.student.preset).max_len


# ------------------------------------------------------------------------------------------------ teachers
def demo_teacher_spec(device: str = "cpu") -> dict[str, Any]:
    """The embedded demo's teacher (shipped, or fitted on first use)."""
    from raydistill.demo import ensure_demo_teacher

    return {"kind": "raydistill", "checkpoint": str(ensure_demo_teacher()), "device": device, "dtype": "float32"}


def tiny_teacher_spec(folder: Path | None = None, dim: int = 32, image_size: int = 48) -> dict[str, Any]:
    """A tiny raydistill-format teacher (smoke tests: seconds, not minutes), made once (seeded) in ``folder``
    (default ``<RAYDISTILL_HOME>/benchmarks/tiny-teacher``): one path, so caches keyed by it can be reused."""
    from raydistill.models.student import build_student, save_dual_encoder
    from raydistill.models.tokenizers import build_wordpiece_tokenizer
    from raydistill.paths import raydistill_home

    folder = folder or raydistill_home() / "benchmarks" / "tiny-teacher"

    if not (folder / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        records = synth_records(200, image_size)
        tokenizer = build_wordpiece_tokenizer([c for r in records for c in r["captions"]], vocab_size=200)
        model = build_student("test", embed_dim=dim, vocab_size=len(tokenizer),
                              image_size=image_size, resize_size=image_size)
        save_dual_encoder(model, folder, tokenizer=tokenizer)
    return {"kind": "raydistill", "checkpoint": str(folder), "device": "cpu", "dtype": "float32"}


def teacher_side(spec: Any, dim: int, folder: Path) -> Any:
    """The teacher as the plans take it (:class:`~raydistill.pipeline.plans.TeacherSide`) for a pass that writes
    no cache (``with_teacher(..., write_through=False)``): ``folder`` is named, never written."""
    from raydistill.models.teachers import TeacherSpec
    from raydistill.pipeline.cache import EmbeddingCache
    from raydistill.pipeline.plans import TeacherSide

    typed = spec if isinstance(spec, TeacherSpec) else TeacherSpec.from_mapping(spec)
    return TeacherSide(spec=typed, dim=dim, cache=EmbeddingCache(str(folder)), key={})


def teacher_overrides(spec: dict[str, Any]) -> list[str]:
    """Config overrides that make a run use the teacher ``spec``."""
    out = [f"teacher.kind={spec['kind']}", f"teacher.checkpoint={spec['checkpoint']}",
           f"teacher.dtype={spec.get('dtype', 'float32')}", f"teacher.device={spec.get('device', 'auto')}"]
    for key in ("tokenizer", "size"):
        if spec.get(key):
            out.append(f"teacher.{key}={spec[key]}")
    return out


def student_overrides(preset: str) -> list[str]:
    """Config overrides for a student of ``preset``. The presets that DSMD starts from pretrained towers train
    from random initialisation here: throughput does not depend on the weights, and no download is needed."""
    from raydistill.config import StudentConfig

    return [f"student.preset={preset}"] + (["student.from_scratch=true"] if preset in StudentConfig.PRETRAINED_TOWERS
                                           else [])


def gpu_sharing(gpu: bool) -> list[str]:
    """On one GPU the teacher actor and the Train worker each reserve half of it (both run at once)."""
    if not gpu:
        return ["teacher.pool.num_gpus=0"]
    return ["teacher.pool.num_gpus=0.5", "train.resources_per_worker={GPU: 0.5}"]


def run_config(spec: dict[str, Any], work: Path, overrides: list[str], base: str = "demo.yaml") -> Any:
    """A shipped config (default ``configs/demo.yaml``) with the teacher ``spec``, outputs under ``work``."""
    from raydistill.config import load_config
    from raydistill.demo_assets import config_path

    return load_config(config_path(base), [f"output_dir={work}", f"cache.dir={work / 'cache'}",
                                           "tracking.enabled=false"] + teacher_overrides(spec) + overrides)


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
