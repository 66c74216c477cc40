"""Teacher stage throughput: the Ray Data actor pool against a plain PyTorch loop, in the same run.

Both sides get the same decoded uint8 image rows with their captions and do the same work, timed from
nothing loaded to every embedding in hand: load the teacher, then per batch embed the images and their
captions. The pipeline is raydistill's own teacher stage (``pipeline.datasets.with_teacher``:
``map_batches(TeacherEmbedder, compute=ActorPoolStrategy)``) over a Ray dataset of those rows; the plain
loop runs the same teacher in this process with as many threads as the actors reserve CPUs.

    python -m benchmarks.teacher_throughput                     # the demo teacher on CPU (48 px)
    python -m benchmarks.teacher_throughput --teacher beit3-large --device cuda --images 20000 \\
        --batch-size 512 --tag gpu                              # what benchmarks/gpu.sh runs

``ratio`` = pipeline images/s / plain images/s (target >= 0.9).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import log


def teacher_spec(name: str, device: str, work: Path, image_size: int | None = None) -> dict[str, Any]:
    if name == "demo":
        return common.demo_teacher_spec(device)
    if name == "tiny":
        return common.tiny_teacher_spec(work / "tiny-teacher")
    if name.startswith("beit3-"):
        from benchmarks.models import random_beit3_teacher

        return random_beit3_teacher(work / name, size=name.split("-", 1)[1], image_size=image_size or 224,
                                    device=device)
    raise SystemExit(f"--teacher {name!r}: use demo, tiny, beit3-base or beit3-large")


def plain_loop(spec: dict[str, Any], rows: dict[str, np.ndarray], batch_size: int, threads: int) -> dict[str, float]:
    """Load the teacher here and embed every batch's images and captions; seconds for each part."""
    import torch

    from raydistill.models.teachers import load_teacher

    torch.set_num_threads(threads)
    teacher, load_s = common.timed(lambda: load_teacher(spec))
    image_s = text_s = 0.0
    n = len(rows["image_id"])
    for start in range(0, n, batch_size):
        images = rows["image"][start:start + batch_size]
        captions = [str(c) for caps in rows["captions"][start:start + batch_size] for c in caps]
        _, s = common.timed(lambda: teacher.embed_images(images))
        image_s += s
        _, s = common.timed(lambda: teacher.embed_texts(captions))
        text_s += s
    if spec.get("device", "cpu").startswith("cuda"):
        torch.cuda.synchronize()
    return {"load_s": load_s, "image_s": image_s, "text_s": text_s, "total_s": load_s + image_s + text_s}


def pipeline(spec: dict[str, Any], dim: int, rows: dict[str, np.ndarray], batch_size: int, actors: int,
             cpus_per_actor: float, gpus_per_actor: float) -> dict[str, float]:
    """raydistill's teacher stage over a Ray dataset of the same rows; seconds to the last embedding."""
    import ray

    from raydistill.config import config_from_dict
    from raydistill.pipeline.datasets import with_teacher

    cfg = config_from_dict({"teacher": {"pool": {"min_size": actors, "max_size": actors, "batch_size": batch_size,
                                                 "num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor}}})
    n = len(rows["image_id"])
    items = [{"image_id": rows["image_id"][i], "image": rows["image"][i], "captions": list(rows["captions"][i]),
              "caption_ids": list(rows["caption_ids"][i]), "split": "train"} for i in range(n)]
    source = ray.data.from_items(items, override_num_blocks=max(1, n // batch_size))
    source = source.materialize()  # the input sits in the object store, as decoded rows from upstream would

    def run() -> tuple[int, int]:
        images = captions = 0
        for batch in with_teacher(source, cfg, spec, dim, None, None).iter_batches(batch_size=None,
                                                                                   batch_format="numpy"):
            images += len(batch["t_img"])
            captions += sum(len(t) // dim if t.ndim == 1 else len(t) for t in batch["t_txt"])
        return images, captions

    (images, captions), seconds = common.timed(run)
    assert images == n, f"the pipeline returned {images} of {n} images"
    return {"total_s": seconds, "images": images, "captions": captions}


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
        rows = common.decoded_inputs(common.synth_records(1500, 48), size, repeat_to=args.images)
        rows = {k: v[: args.images] for k, v in rows.items()}
        n_captions = sum(len(c) for c in rows["captions"])
        threads = max(1, int(args.cpus_per_actor))

        log(f"plain PyTorch loop ({threads} threads)")
        plain = plain_loop(spec, rows, args.batch_size, threads)
        common.start_ray(num_cpus=args.num_cpus, num_gpus=None)
        log(f"Ray Data actor pool ({args.actors} actor(s), {args.cpus_per_actor} CPU / {args.gpus_per_actor} GPU each)")
        pipe = pipeline(spec, dim, rows, args.batch_size, args.actors, args.cpus_per_actor, args.gpus_per_actor)
        assert pipe["captions"] == n_captions

    n = args.images
    figures = {
        "images": n,
        "captions": n_captions,
        "plain": {"images_per_s": n / plain["total_s"], "captions_per_s": n_captions / plain["total_s"],
                  "seconds": plain["total_s"], "load_s": plain["load_s"], "image_s": plain["image_s"],
                  "text_s": plain["text_s"]},
        "pipeline": {"images_per_s": n / pipe["total_s"], "captions_per_s": n_captions / pipe["total_s"],
                     "seconds": pipe["total_s"]},
    }
    figures["ratio"] = figures["pipeline"]["images_per_s"] / figures["plain"]["images_per_s"]
    config = {k: v for k, v in vars(args).items() if k not in ("out", "tag")} | {"dim": dim, "image_size": size}
    out = common.result("teacher_throughput", config, **figures)
    print(common.table(
        ["", "images/s", "captions/s", "seconds"],
        [[name, figures[name]["images_per_s"], figures[name]["captions_per_s"], figures[name]["seconds"]]
         for name in ("plain", "pipeline")] + [["ratio (pipeline / plain)", figures["ratio"], None, None]]))
    common.write_result(out, args.out, args.tag)
    return out


if __name__ == "__main__":
    main()
