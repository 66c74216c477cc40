"""Scale: the data path from ten thousand to a million images, with flat driver memory and a bounded object store.

For each size N this writes a JSONL manifest of N images (tiny JPEGs: each row names one of a few hundred small
files under its own image id, two captions each; the test split is a fixed 1,000 images at every size), then
runs, as a user would, against one local Ray instance started for the benchmark (``ray start --head``, with the
one-machine settings raydistill gives its own local instances: ``ray_env.LOCAL_RAY_ENV``):

- ``raydistill embed CONFIG --json``: fills the embedding cache with a tiny teacher (every image once);
- ``raydistill run CONFIG cache.mode=cache --json``: a fixed number of training steps from the cache, repeated
  (``--repeats``, 3 by default) with the sizes interleaved; the row holds the median and every run's value;
  then one more run per size with ``ray.data_object_store_mb`` set to ``--budget-mb`` (64: ``budget`` in the
  result), whose training peak shows how the store follows the budget.

Each command is its own process (the driver). Measured per command: the driver's peak RSS (sampled every
0.2 s), the object store's peak use on the instance (sampled the same way), wall seconds, and for ``embed``
the seconds per image in steady state (from the times the cache's part files were written: after the first
part, which carries the actors' start-up) and the teacher's images embedded (must equal N); for ``run`` the
steady-state samples/s (the run's own per-window throughput, first window dropped) and the object store's peak
from the moment the driver says training starts (the whole command's peak also holds the check of the cache
against the source manifest, a group-by of its rows by image id).

Then, per size, the cost of ``train.shuffle: global``: the seconds from building an epoch's caption rows from
the cache to its first batch with ``files`` and with ``global`` (``shuffle`` in the result), each measured in its
own driver process.

This measures the data path, not the model: the teacher and the student are tiny, the images 16 px.

    python -m benchmarks.scale                      # 10k, 100k, 1M (about an hour on 2 cores)
    python -m benchmarks.scale --sizes 10000 100000 --out /tmp/scale   # a shorter check
    python -m benchmarks.scale --work DIR --runs-only   # train again from DIR's caches; keep the embed rows
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import log, result, result_path, table, write_result
from raydistill.config import Config
from raydistill.pipeline.ray_env import prepare_local_ray_env

REPO = Path(__file__).resolve().parents[1]
SIZES = (10_000, 100_000, 1_000_000)
TEST_IMAGES = 1_000
DISTINCT_FILES = 256
RUN_STEPS = 150
REPEATS = 3
#: ``ray.data_object_store_mb`` of one more run per size (``budget`` in the result): the training peak follows the
#: budget, not the dataset.
BUDGET_MB = 64
CPUS = 4


def make_images(folder: Path) -> list[str]:
    """``DISTINCT_FILES`` small JPEGs of different colours and sizes; returns their names."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(DISTINCT_FILES):
        side = int(rng.integers(20, 40))
        pixels = rng.integers(0, 255, size=(side, side + 4, 3), dtype=np.uint8)
        name = f"img{k:03d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=85)
        names.append(name)
    return names


def write_manifest(path: Path, n: int, names: list[str]) -> None:
    """N image rows (test: the last TEST_IMAGES), streamed to disk."""
    words = ["red", "green", "blue", "small", "large", "circle", "square", "left", "right", "above"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            split = "test" if i >= n - TEST_IMAGES else "train"
            a, b = words[i % 10], words[(i // 10) % 10]
            row = {"image": f"images/{names[i % len(names)]}", "image_id": f"i{i:08d}", "split": split,
                   "captions": [f"a {a} {b} shape number {i % 997}", f"{b} and {a}"]}
            f.write(json.dumps(row) + "\n")


def make_teacher(folder: Path) -> Path:
    """A tiny raydistill dual encoder saved as a teacher (16 px images, 16-d embeddings)."""
    from raydistill.models.student import build_student, save_dual_encoder
    from raydistill.models.tokenizers import build_wordpiece_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tok = build_wordpiece_tokenizer(["a red green blue small large circle square left right above shape number and"] * 4,
                                    vocab_size=80)
    model = build_student("test", embed_dim=16, vocab_size=len(tok), image_size=16, resize_size=16)
    save_dual_encoder(model, folder, tokenizer=tok)
    return folder


def write_config(path: Path, manifest: Path, teacher: Path, work: Path, address: str) -> None:
    path.write_text(f"""# benchmarks/scale.py: one size's config
name: scale
output_dir: {work / 'out'}
data: {{source: manifest, path: {manifest}, decode_size: 16, val_split: null}}
teacher:
  kind: raydistill
  checkpoint: {teacher}
  pool: {{min_size: 1, max_size: 1, batch_size: 512, num_cpus: 1}}
  infer_batch_size: 512
cache: {{dir: {work / 'cache'}}}
student: {{preset: test, vocab_size: 200}}
distill: {{queue_size: 1024}}
train: {{steps: {RUN_STEPS}, batch_size: 256, log_every: 10, checkpoint_every: {RUN_STEPS}, shuffle: files}}
tracking: {{experiment: scale}}
ray: {{address: "{address}"}}
""")


class Sampler:
    """Peak RSS of one process and the instance's object-store use over time, sampled on a thread."""

    def __init__(self, pid: int, address: str) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.address = address
        self.rss = 0
        self.stores: list[tuple[float, int]] = []  # (time.monotonic(), bytes)
        self.failed = 0  # samples the instance did not answer: a peak from few samples would read low
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.rss = max(self.rss, self.process.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process ended between two samples
                pass
            used = object_store_used(self.address)
            if used is None:
                self.failed += 1
            else:
                self.stores.append((time.monotonic(), used))
            self._stop.wait(0.2)

    def store_peak(self, since: float = 0.0) -> int:
        """The largest object-store use sampled at or after ``since`` (a ``time.monotonic()`` value)."""
        return max((used for t, used in self.stores if t >= since), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def object_store_used(address: str) -> int | None:
    """Bytes in the instance's object store now (the raylets' plasma stores); None if the instance did not say."""
    from ray._private.internal_api import memory_summary

    try:
        text = memory_summary(address=address, stats_only=True)
    except Exception:  # noqa: BLE001 - between two commands the instance may be busy; try again next sample
        return None
    match = re.search(r"Plasma memory usage (\d+) MiB", text)
    return int(match.group(1)) * 2**20 if match else None


def run_command(args: list[str], address: str) -> tuple[dict[str, Any], float, Sampler, float]:
    """Run a ``raydistill`` command as its own process; its JSON result, wall seconds, samples, and when (a
    ``time.monotonic()`` value) it printed that training starts (infinity if it trains nothing)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "raydistill.cli", *args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    sampler = Sampler(proc.pid, address)
    err: list[str] = []
    training = [float("inf")]

    def read_stderr() -> None:
        for line in proc.stderr:
            if training[0] == float("inf") and line.startswith("[raydistill] training "):
                training[0] = time.monotonic()
            err.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    out = proc.stdout.read()
    proc.wait()
    reader.join()
    seconds = time.perf_counter() - start
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{''.join(err)[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), seconds, sampler, training[0]


def steady_seconds_per_image(cache_dir: Path) -> float:
    """From the parts' write times: images after the first part over the time they took."""
    import pyarrow.parquet as pq

    parts = sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in (cache_dir / "parts").rglob("*.parquet"))
    if len(parts) < 3:
        return float("nan")
    images = sum(n for _, n in parts[1:])
    return (parts[-1][0] - parts[0][0]) / images


def steady_samples_per_s(run: dict[str, Any]) -> float:
    """The run's own throughput windows (every ``log_every`` steps), the first one dropped."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(run["mlflow_tracking_uri"]).get_metric_history(run["run_id"], "samples_per_s")
    values = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return sum(values) / len(values) if values else float("nan")


def embed_row(n: int, work: Path, names: list[str], teacher: Path, address: str,
              earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """One size's ``embed`` row. ``earlier`` (``--runs-only``): a result whose embed row for this size is kept,
    with its own date, and whose cache in ``work`` is trained from again."""
    manifest = work / "manifest.jsonl"
    config = work / "scale.yaml"
    if earlier is None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "images").symlink_to(work.parent / "images")
        write_manifest(manifest, n, names)
    write_config(config, manifest, teacher, work, address)
    if earlier is not None:
        if not (work / "cache" / "manifest.json").is_file():
            raise SystemExit(f"--runs-only: no embedding cache in {work / 'cache'}; run without it first")
        row = next((r for r in earlier["rows"] if r["command"] == "embed" and r["images"] == n), None)
        if row is None:
            raise SystemExit(f"--runs-only: the earlier result has no embed row for {n:,} images")
        return dict(row, measured_at=row.get("measured_at", earlier["measured_at"]))
    log(f"{n:,} images: raydistill embed")
    embedded, seconds, sampler, _ = run_command(["embed", str(config)], address)
    row = {"command": "embed", "images": n, "driver_peak_rss_mb": round(sampler.rss / 2**20, 1),
           "object_store_peak_mb": round(sampler.store_peak() / 2**20, 1),
           "object_store_samples": len(sampler.stores), "object_store_samples_failed": sampler.failed,
           "seconds": round(seconds, 1),
           "seconds_per_image": steady_seconds_per_image(work / "cache"),
           "teacher_images_embedded": embedded["teacher_images_embedded"]}
    log(json.dumps(row))
    return row


def run_once(n: int, work: Path, address: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """One cache-mode ``raydistill run`` of ``RUN_STEPS`` steps from size ``n``'s cache (``overrides``: more
    ``key=value`` settings)."""
    log(f"{n:,} images: raydistill run (cache mode, {RUN_STEPS} steps{''.join(', ' + o for o in overrides)})")
    ran, seconds, sampler, training = run_command(["run", str(work / "scale.yaml"), "cache.mode=cache", *overrides],
                                                  address)
    run = {"driver_peak_rss_mb": round(sampler.rss / 2**20, 1),
           "object_store_peak_mb": round(sampler.store_peak() / 2**20, 1),
           "object_store_training_peak_mb": round(sampler.store_peak(since=training) / 2**20, 1),
           "object_store_samples": len(sampler.stores), "object_store_samples_failed": sampler.failed,
           "seconds": round(seconds, 1), "samples_per_s": round(steady_samples_per_s(ran), 1)}
    log(json.dumps(run))
    return run


def budget_of(config: Path) -> int | None:
    """The object-store budget (MiB) the run's pipelines get from its config (``ray.data_object_store_mb: auto``
    resolved)."""
    from raydistill.config import load_config
    from raydistill.pipeline.plans import data_budget_mb

    return data_budget_mb(load_config(config, ["cache.mode=cache"]))


def run_row(n: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A size's ``run`` row from its repeated runs: the median seconds and samples/s (each run's values kept in
    ``seconds_runs`` and ``samples_per_s_runs``), the largest driver RSS and object-store peaks."""
    return {"command": "run", "images": n,
            **{key: max(r[key] for r in runs)
               for key in ("driver_peak_rss_mb", "object_store_peak_mb", "object_store_training_peak_mb")},
            **{key: sum(r.get(key, 0) for r in runs) for key in ("object_store_samples", "object_store_samples_failed")},
            "seconds": statistics.median(r["seconds"] for r in runs),
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in runs), 1),
            "seconds_runs": [r["seconds"] for r in runs], "samples_per_s_runs": [r["samples_per_s"] for r in runs]}


def shuffle_cost(config: Path, address: str) -> dict[str, float]:
    """Seconds from building an epoch's caption rows from the cache to its first batch, with ``train.shuffle``
    ``files`` (the cache's order, no exchange) and ``global`` (the split's image rows exchanged once before the
    epoch's first batch: what a full shuffle costs each epoch). Measured in its own process, a driver of the
    instance, as a Train worker builds each epoch's rows."""
    probe = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--shuffle-probe", str(config), "--address", address],
                           capture_output=True, text=True, cwd=REPO, check=False)
    if probe.returncode != 0:
        raise RuntimeError(f"shuffle probe failed ({probe.returncode}):\n{probe.stderr[-4000:]}")
    return json.loads(probe.stdout.strip().splitlines()[-1])


def shuffle_probe(config: Path, address: str) -> dict[str, float]:
    """:func:`shuffle_cost`'s measurement, in this process."""
    import ray

    from raydistill.config import load_config
    from raydistill.pipeline.counters import Counters
    from raydistill.pipeline.plans import configure_data_context, train_epoch_dataset
    from raydistill.pipeline.runner import prepare_data

    ray.init(address=address, configure_logging=False, log_to_driver=False)
    seconds = {}
    for mode in ("files", "global"):
        cfg = load_config(config, ["cache.mode=cache", f"train.shuffle={mode}", f"ray.address={address}"])
        configure_data_context(cfg)
        with tempfile.TemporaryDirectory() as run_dir:
            plan, _ = prepare_data(cfg, Path(run_dir), Counters().start())
            start = time.perf_counter()
            batches = iter(train_epoch_dataset(plan, 1).iter_batches(batch_size=256, batch_format="numpy"))
            next(batches)
            seconds[f"{mode}_first_batch_s"] = round(time.perf_counter() - start, 1)
            batches.close()  # ends the epoch's execution before the next one starts
    ray.shutdown()
    return seconds


def stop_instance(temp_dir: Path, address: str | None = None) -> None:
    """Stop the benchmark's own Ray instance by the ids of its processes: those started with its temp folder, their
    descendants (the agents retitle themselves), and those started with ``--address=<address>`` (the client
    server of ``ray start --head``). Other Ray instances on the machine are left alone (``ray stop`` would end
    them all)."""
    import psutil

    from raydistill.pipeline.local_instance import _session_processes, _with_descendants

    pids = set(_session_processes(str(temp_dir)))
    if address:
        pids |= set(_session_processes(f"--address={address}"))
    procs = []
    for pid in _with_descendants(pids - {os.getpid()}):
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help="cache-mode runs per size, interleaved across sizes; their median is the row's")
    parser.add_argument("--budget-mb", type=int, default=BUDGET_MB,
                        help="after the runs, one more run per size with ray.data_object_store_mb set to this")
    parser.add_argument("--runs-only", action="store_true",
                        help="train again from the caches an earlier run left in --work; keep that result's embed rows")
    parser.add_argument("--shuffle-probe", metavar="CONFIG", help=argparse.SUPPRESS)  # shuffle_cost's own process
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shuffle_probe:
        print(json.dumps(shuffle_probe(Path(args.shuffle_probe), args.address)))
        return 0
    earlier = None
    if args.runs_only:
        if not args.work:
            parser.error("--runs-only needs the --work folder of an earlier run")
        earlier = json.loads(result_path("scale", args.out).read_text())
    work = Path(args.work or tempfile.mkdtemp(prefix="raydistill-scale-"))
    # A one-machine instance, started with the settings raydistill gives its own local instances.
    prepare_local_ray_env()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update(env)
    names = make_images(work / "images")
    teacher = make_teacher(work / "teacher")
    temp_dir = work / "ray"
    head = subprocess.run(["ray", "start", "--head", f"--num-cpus={CPUS}", "--include-dashboard=true",
                           "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                           "--disable-usage-stats"], capture_output=True, text=True, env=env)
    if head.returncode != 0:
        raise SystemExit(f"ray start failed: {head.stderr}")
    address = re.search(r"--address='([^']+)'", head.stdout).group(1)
    rows, shuffles, budget = [], [], []
    try:
        embeds = [embed_row(n, work / f"n{n}", names, teacher, address, earlier) for n in args.sizes]
        # Interleaved (10k, 100k, 1M, 10k, ...): whatever else slows the machine for a while hits every size.
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.sizes}
        for _ in range(args.repeats):
            for n in args.sizes:
                runs[n].append(run_once(n, work / f"n{n}", address))
        for embed, n in zip(embeds, args.sizes):
            rows.extend([embed, run_row(n, runs[n])])
        for n in args.sizes:
            run = run_once(n, work / f"n{n}", address, (f"ray.data_object_store_mb={args.budget_mb}",))
            budget.append({"images": n, "data_object_store_mb": args.budget_mb,
                           **{key: run[key] for key in ("object_store_training_peak_mb", "samples_per_s")}})
        for n in args.sizes:
            log(f"{n:,} images: an epoch's first batch with train.shuffle files, then global")
            shuffles.append({"images": n, **shuffle_cost(work / f"n{n}" / "scale.yaml", address)})
    finally:
        stop_instance(temp_dir, address)
    by = {(r["command"], r["images"]): r for r in rows}
    small, large = min(args.sizes), max(args.sizes)
    ratios = {}
    if small != large:
        ratios = {
            "driver_rss_embed": by[("embed", large)]["driver_peak_rss_mb"] / by[("embed", small)]["driver_peak_rss_mb"],
            "driver_rss_run": by[("run", large)]["driver_peak_rss_mb"] / by[("run", small)]["driver_peak_rss_mb"],
            "embed_seconds_per_image": by[("embed", large)]["seconds_per_image"] / by[("embed", small)]["seconds_per_image"],
            "run_samples_per_s": by[("run", large)]["samples_per_s"] / by[("run", small)]["samples_per_s"],
            "run_object_store_training_peak": by[("run", large)]["object_store_training_peak_mb"]
            / by[("run", small)]["object_store_training_peak_mb"],
        }
    obj = result("scale", {"sizes": args.sizes, "test_images": TEST_IMAGES, "distinct_files": DISTINCT_FILES,
                           "run_steps": RUN_STEPS, "run_repeats": args.repeats, "ray_cpus": CPUS, "image_px": 16, "teacher": "test preset, 16 px, d=16",
                           "data_object_store_mb": Config().ray.data_object_store_mb,
                           "data_budget_mb": budget_of(work / f"n{max(args.sizes)}" / "scale.yaml")},
                 rows=rows, shuffle=shuffles, budget=budget, ratios_largest_vs_smallest=ratios)
    write_result(obj, args.out)
    print(table(["command", "images", "driver peak RSS MB", "object store peak MB", "training: object store peak MB",
                 "seconds", "s/image or samples/s"],
                [(r["command"], r["images"], r["driver_peak_rss_mb"], r["object_store_peak_mb"],
                  r.get("object_store_training_peak_mb"), r["seconds"], r.get("seconds_per_image", r.get("samples_per_s")))
                 for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
