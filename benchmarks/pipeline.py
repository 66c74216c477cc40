"""Stream mode end to end against its parts: does the teacher overlap the student, and what does the cache save?

Times, all wall clock on the same data and model, each a fresh Ray Data / Ray Train execution:

- ``t_teacher``: the teacher stage alone over the training split (actor pool, no training);
- ``t_student``: training alone, per epoch over ``epochs`` epochs, from a complete cache (cache mode: the
  cache the write-through run below filled);
- ``epochs`` epochs in stream mode without a cache (the teacher pool feeding the worker; it re-runs every
  epoch: Ray re-executes the dataset); ``t_stream`` is its time per epoch;
- ``overlap_efficiency`` = (t_teacher + t_student) / t_stream: 1 means no overlap (the stages took turns),
  2 means perfect overlap of two equal stages; below 1, streaming costs more than running the stages apart;
- the same epochs with write-through (epoch 1 fills the cache, later epochs read it): ``cache_saving``.

    python -m benchmarks.pipeline
    python -m benchmarks.pipeline --teacher beit3-large --student small --device cuda --tag gpu

A machine with two cores cannot show much overlap: the teacher actor and the worker share the same two cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import log


def teacher_pass(cfg: Any, spec: dict[str, Any]) -> float:
    """Seconds for raydistill's teacher stage over the training split (decode + actor pool), nothing else."""
    from raydistill.models.teachers import load_teacher
    from raydistill.pipeline import datasets as dsets

    dim = load_teacher(spec).dim
    records = dsets.read_records(cfg)[cfg.data.train_split]
    ds = dsets.with_teacher(dsets.decoded(dsets.records_dataset(records), cfg, None), cfg, spec, dim, None, None)

    def run() -> int:
        return sum(len(b["t_img"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))

    n, seconds = common.timed(run)
    assert n == len(records)
    return seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="demo", help="demo | tiny | beit3-base | beit3-large (random weights)")
    p.add_argument("--student", default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="epochs of the cache comparison")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=1)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)

    from benchmarks.teacher_throughput import teacher_spec
    from raydistill.pipeline import datasets as dsets
    from raydistill.pipeline.runner import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gpu = args.device.startswith("cuda")
        spec = teacher_spec(args.teacher, args.device, work, args.image_size)
        size = args.image_size or (48 if args.teacher in ("demo", "tiny") else 224)

        def cfg_for(name: str, extra: list[str]) -> Any:
            return common.run_config(spec, work / name, [
                f"data.synth.n_images={args.images}", f"data.decode_size={size}", f"student.preset={args.student}",
                f"train.batch_size={args.batch_size}", f"train.cpus_per_worker={args.cpus_per_worker}",
                f"train.use_gpu={'yes' if gpu else 'no'}", f"teacher.pool.batch_size={args.batch_size}",
                *common.gpu_sharing(gpu), f"teacher.pool.num_cpus={args.cpus_per_actor}",
                f"cache.dir={work / name / 'cache'}",
            ] + extra)

        common.start_ray(num_cpus=args.num_cpus, num_gpus=1 if gpu else None)
        probe = cfg_for("probe", [])
        train_captions = sum(len(r["captions"]) for r in dsets.read_records(probe)[probe.data.train_split])
        epoch = train_captions // args.batch_size
        log(f"one epoch = {epoch} steps of {args.batch_size} ({train_captions} training captions)")

        log("teacher stage alone over the training split")
        t_teacher = teacher_pass(probe, spec)
        many = [f"train.steps={epoch * args.epochs}", f"train.checkpoint_every={epoch * args.epochs}",
                f"train.log_every={max(1, epoch // 4)}"]
        log(f"stream mode for {args.epochs} epochs without a cache")
        no_cache = run_experiment(cfg_for("no-cache", many + ["cache.write_through=false"]))
        log(f"stream mode for {args.epochs} epochs with write-through")
        write_through = run_experiment(cfg_for("write-through", many + ["cache.write_through=true"]))
        t_stream = no_cache["train_seconds"] / args.epochs
        # The student alone runs as many epochs as the stream runs, so that both spread their start-up over the
        # same number of epochs (one epoch alone made t_student 83 s against 57 s per stream epoch on 2 cores). It
        # reads the cache the write-through run filled (the same rows `raydistill embed` would write).
        log(f"student alone for {args.epochs} epochs (cache mode, the write-through run's cache)")
        cached = run_experiment(cfg_for("write-through", many + ["cache.mode=cache", "name=student-alone"]))
        if cached["teacher_images_embedded"]:
            raise RuntimeError(f"the student-alone run embedded {cached['teacher_images_embedded']} images: the "
                               "write-through run left its cache incomplete")
        t_student = cached["train_seconds"] / args.epochs

    figures = {
        "epoch_steps": epoch,
        "t_teacher_s": t_teacher,
        "t_student_s": t_student,
        "t_stream_s": t_stream,
        "overlap_efficiency": (t_teacher + t_student) / t_stream,
        "epochs": args.epochs,
        "no_cache": {"seconds": no_cache["train_seconds"], "teacher_images_embedded": no_cache["teacher_images_embedded"]},
        "write_through": {"seconds": write_through["train_seconds"],
                          "teacher_images_embedded": write_through["teacher_images_embedded"],
                          "cache_hits": write_through["cache_hits"]},
    }
    figures["cache_saving"] = 1 - write_through["train_seconds"] / no_cache["train_seconds"]
    config = {k: v for k, v in vars(args).items() if k not in ("out", "tag")} | {"image_size": size}
    out = common.result("pipeline", config, **figures)
    print(common.table(["", "seconds", "teacher images embedded"], [
        ["teacher alone (1 epoch)", t_teacher, None],
        ["student alone (per epoch, cache mode)", t_student, None],
        ["stream, no cache (per epoch)", t_stream, None],
        ["overlap efficiency (t_teacher + t_student) / t_stream", figures["overlap_efficiency"], None],
        [f"stream, {args.epochs} epochs, no cache", no_cache["train_seconds"], no_cache["teacher_images_embedded"]],
        [f"stream, {args.epochs} epochs, write-through", write_through["train_seconds"],
         write_through["teacher_images_embedded"]],
        ["cache saving", figures["cache_saving"], None],
    ]))
    common.write_result(out, args.out, args.tag)
    return out


if __name__ == "__main__":
    main()
