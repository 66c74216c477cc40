"""Teacher stage throughput: the Ray Data actor pool against a plain PyTorch loop, in the same run.

Both sides get the same decoded uint8 image rows with their captions and do the same work: load the teacher,
then per batch embed the images and their captions. The pipeline is raydistill's own teacher stage
(``pipeline.plans.with_teacher``: ``map_batches(TeacherEmbedder, compute=ActorPoolStrategy)``, writing no
cache) over a Ray dataset of those rows held in the object store (as decoded rows from upstream would be);
the plain loop runs the same teacher in this process with as many threads as the actors reserve CPUs.

Each side is reported three ways (``benchmarks.common``):

- **steady** (``steady_images_per_s``, ``steady_captions_per_s``): the plain loop from the end of its first
  batch to the end of its last; the pool from the moment every actor had embedded its first batch to the
  last batch embedded, timed in the actors (:func:`benchmarks.common.pool_steady_window`; the input is cut
  into blocks of one batch each, so that every teacher call holds ``--batch-size`` rows but the last). Start-up
  is what comes before: the actors' start, the model load, the first batch (first kernel launches,
  allocator growth) and, for the pool, Ray Data's start;
- **end to end** (``end_to_end_images_per_s``, also ``images_per_s`` / ``captions_per_s`` as before): from
  nothing loaded to every embedding in hand;
- ``startup_s``: ``seconds`` less what the images take at the steady rate;

and ``busy_images_per_s``: images over the time spent inside the teacher calls (the pool's actors, the plain
loop's forward passes), which tells a starved pool (steady well below busy) from a slow one.

    python -m benchmarks.teacher_throughput                     # the demo teacher on CPU (48 px)
    python -m benchmarks.teacher_throughput --teacher beit3-large --device cuda --images 12000 \\
        --batch-size 512 --gpus-per-actor 1 --cpus-per-actor 4 --tag gpu   # what benchmarks/gpu.sh runs

``ratio`` = pipeline steady images/s / plain steady images/s (target >= 0.9); ``ratio_end_to_end`` the same
on the end-to-end rates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import log


def teacher_spec(name: str, device: str, work: Path, image_size: int | None = None) -> dict[str, Any]:
    if name == "demo":
        return common.demo_teacher_spec(device)
    if name == "tiny":
        return common.tiny_teacher_spec()
    if name.startswith("beit3-"):
        from benchmarks.models import random_beit3_teacher

        return random_beit3_teacher(work / name, size=name.split("-", 1)[1], image_size=image_size or 224,
                                    device=device)
    raise SystemExit(f"--teacher {name!r}: use demo, tiny, beit3-base or beit3-large")


def plain_loop(spec: dict[str, Any], rows: dict[str, np.ndarray], batch_size: int, threads: int) -> dict[str, float]:
    """Load the teacher here and embed every batch's images and captions; seconds for each part, and the steady
    window (from the end of the first batch to the end of the last)."""
    import torch

    from raydistill.models.teachers import load_teacher

    torch.set_num_threads(threads)
    start = time.perf_counter()
    teacher = load_teacher(spec)
    load_s = time.perf_counter() - start
    image_s = text_s = 0.0
    ends: list[tuple[float, int, int]] = []  # (time, images, captions) at the end of each batch
    n = len(rows["image_id"])
    for first in range(0, n, batch_size):
        images = rows["image"][first:first + batch_size]
        captions = [str(c) for caps in rows["captions"][first:first + batch_size] for c in caps]
        # embed_* return host arrays: each call has finished on the device when it returns.
        t0 = time.perf_counter()
        teacher.embed_images(images)
        t1 = time.perf_counter()
        teacher.embed_texts(captions)
        t2 = time.perf_counter()
        image_s, text_s = image_s + t1 - t0, text_s + t2 - t1
        ends.append((t2, len(images), len(captions)))
    total_s = time.perf_counter() - start
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the pool's actor runs on the same GPU next
    return {"load_s": load_s, "image_s": image_s, "text_s": text_s, "total_s": total_s,
            "window_images": sum(e[1] for e in ends[1:]), "window_captions": sum(e[2] for e in ends[1:]),
            "window_s": ends[-1][0] - ends[0][0]}


def input_block(rows: dict[str, np.ndarray], start: int, stop: int) -> Any:
    """Rows ``start:stop`` as one Arrow block (the pool's input: one block per teacher batch)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    ids = [str(x) for x in rows["image_id"][start:stop]]

    def strings(key: str) -> Any:
        return pa.array([[str(c) for c in x] for x in rows[key][start:stop]], pa.list_(pa.string()))

    return pa.table({"image_id": pa.array(ids, pa.string()),
                     "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(rows["image"][start:stop])),
                     "captions": strings("captions"), "caption_ids": strings("caption_ids"),
                     "split": pa.array(["train"] * len(ids), pa.string())})


def pipeline(spec: dict[str, Any], dim: int, rows: dict[str, np.ndarray], batch_size: int, actors: int,
             cpus_per_actor: float, gpus_per_actor: float, work: Path) -> dict[str, float]:
    """raydistill's teacher stage over a Ray dataset of the same rows; seconds to the last embedding, and the
    steady window (:func:`benchmarks.common.pool_steady_window`)."""
    import ray

    from raydistill.config import config_from_dict
    from raydistill.pipeline.plans import with_teacher

    cfg = config_from_dict({
        "teacher": {"pool": {"min_size": actors, "max_size": actors, "batch_size": batch_size,
                             "num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor}},
        # The input sits in the object store whole (the stand-in for the decoding stage upstream, which a run
        # streams within its budget): a budget would count it against the stage measured here.
        "ray": {"data_object_store_mb": None},
    })
    common.configure_data(cfg)
    n = len(rows["image_id"])
    source = ray.data.from_arrow([input_block(rows, first, first + batch_size)
                                  for first in range(0, n, batch_size)]).materialize()
    counters = common.TimedCounters().start()
    embedded = with_teacher(source, cfg, common.teacher_side(spec, dim, work / "no-cache"), counters,
                            write_through=False)

    def run() -> tuple[int, int]:
        images = captions = 0
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            images += len(batch["t_img"])
            captions += sum(len(t) // dim if t.ndim == 1 else len(t) for t in batch["t_txt"])
        return images, captions

    (images, captions), seconds = common.timed(run)
    assert images == n, f"the pipeline returned {images} of {n} images"
    calls = counters.actor_calls()
    window = common.pool_steady_window(calls, images, captions)
    return {"total_s": seconds, "images": images, "captions": captions, "window_images": window["images"],
            "window_captions": window["captions"], "window_s": window["seconds"],
            "window_batches": window["batches"], "busy_s": sum(c.get("teacher_seconds", 0.0) for c in calls)}


def figures_of(images: int, captions: int, seconds: float, window_images: int, window_captions: int,
               window_s: float, busy_s: float, what: str) -> dict[str, float]:
    """One side's figures: end to end (the old keys and ``end_to_end_images_per_s``), steady, start-up, busy."""
    steady = common.window_rate(window_images, window_s, what)
    return {"images_per_s": images / seconds, "captions_per_s": captions / seconds, "seconds": seconds,
            **common.rates(images, seconds, steady, "images"),
            "steady_captions_per_s": common.window_rate(window_captions, window_s, what),
            "busy_images_per_s": images / busy_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="demo", help="demo | tiny | beit3-base | beit3-large (random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=3000, help="rows embedded (the synthetic set, cycled)")
    p.add_argument("--image-size", type=int, default=None, help="decode size (default: the teacher's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=2)
    p.add_argument("--gpus-per-actor", type=float, default=0)
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray instance")
    p.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    p.add_argument("--tag", default=None, help="suffix of the result file name")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as work:
        spec = teacher_spec(args.teacher, args.device, Path(work), args.image_size) | {"batch_size": args.batch_size}
        from raydistill.models.teachers import load_teacher

        probe = load_teacher(spec)
        dim, size = probe.dim, args.image_size or probe.image_size
        del probe
        log(f"teacher {args.teacher}: dim {dim}, {size} px; decoding {args.images} rows")
        rows = common.decoded_inputs(common.synth_records(1500, 48)[: args.images], size, repeat_to=args.images)
        n_captions = sum(len(c) for c in rows["captions"])
        threads = max(1, int(args.cpus_per_actor))

        log(f"plain PyTorch loop ({threads} threads)")
        plain = plain_loop(spec, rows, args.batch_size, threads)
        common.start_ray(num_cpus=args.num_cpus, num_gpus=None)
        log(f"Ray Data actor pool ({args.actors} actor(s), {args.cpus_per_actor} CPU / {args.gpus_per_actor} GPU each)")
        pipe = pipeline(spec, dim, rows, args.batch_size, args.actors, args.cpus_per_actor, args.gpus_per_actor,
                        Path(work))
        assert pipe["captions"] == n_captions

    n = args.images
    figures: dict[str, Any] = {
        "images": n,
        "captions": n_captions,
        "plain": figures_of(n, n_captions, plain["total_s"], plain["window_images"], plain["window_captions"],
                            plain["window_s"], plain["image_s"] + plain["text_s"], "the plain loop")
        | {"load_s": plain["load_s"], "image_s": plain["image_s"], "text_s": plain["text_s"]},
        "pipeline": figures_of(n, n_captions, pipe["total_s"], pipe["window_images"], pipe["window_captions"],
                               pipe["window_s"], pipe["busy_s"], "the actor pool")
        | {"steady_batches": pipe["window_batches"]},
    }
    figures["ratio"] = figures["pipeline"]["steady_images_per_s"] / figures["plain"]["steady_images_per_s"]
    figures["ratio_end_to_end"] = figures["pipeline"]["images_per_s"] / figures["plain"]["images_per_s"]
    config = {k: v for k, v in vars(args).items() if k not in ("out", "tag")} | {"dim": dim, "image_size": size}
    out = common.result("teacher_throughput", config, **figures)
    print(common.table(
        ["", "steady images/s", "steady captions/s", "start-up s", "end-to-end images/s", "seconds"],
        [[name, f["steady_images_per_s"], f["steady_captions_per_s"], f["startup_s"], f["end_to_end_images_per_s"],
          f["seconds"]] for name, f in (("plain", figures["plain"]), ("pipeline", figures["pipeline"]))]
        + [["ratio (pipeline / plain)", figures["ratio"], None, None, figures["ratio_end_to_end"], None]]))
    common.write_result(out, args.out, args.tag)
    return out


if __name__ == "__main__":
    main()
