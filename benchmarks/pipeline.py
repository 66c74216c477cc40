"""Stream mode end to end against its parts: does the teacher overlap the student, and what does the cache save?

Each a fresh Ray Data / Ray Train execution on the same data and models:

- **teacher alone**: raydistill's teacher stage over the training split (source -> decode -> actor pool, as
  ``pipeline.plans`` builds it; no training, no cache written);
- **student alone**: ``epochs`` epochs of training in cache mode (the cache the write-through run below
  filled);
- **no cache**: ``epochs`` epochs in stream mode without a cache (the teacher pool feeding the worker; Ray
  re-executes the dataset every epoch, actors included);
- **write-through**: the same epochs with write-through (epoch 1 fills the cache, later epochs read it).

Steady state, start-up and end to end (``benchmarks.common``): the teacher's steady rate runs from the moment
every actor had embedded its first batch to the last batch, timed in the actors; a training run's from the
end of its first logging window (the worker group's start, the first epoch's dataset start and first
batches come before) to its last, as the worker measures it. Later epochs' restarts (a new teacher pool per
epoch without a cache, the switch to the cache with write-through) fall inside the steady windows: they are
what each further epoch costs. ``startup_s`` is each run's time less what its items take at the steady rate.

Figures:

- ``t_teacher_s``, ``t_student_s``, ``t_stream_s``: one epoch at the steady rate of the teacher alone, the
  student alone and the stream without a cache;
- ``overlap_efficiency`` = (t_teacher + t_student) / t_stream on those steady times: 1 means no overlap (the
  stages took turns), 2 perfect overlap of two equal stages; below 1, streaming costs more than running the
  stages apart. ``end_to_end`` holds the same from whole-run times (start-ups included, spread over the
  epochs);
- ``cache_saving`` = 1 - write-through seconds / no-cache seconds, whole runs (what a user waits less);
  ``cache_saving_steady`` the same from the two runs' steady rates;
- ``cache_hits``: the teacher embeddings the cache saved, the no-cache run's ``teacher_images_embedded`` less
  the write-through run's (epochs after the first read the cache's parts and never reach the teacher, so the
  pipeline counts no lookups).

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


def teacher_pass(cfg: Any, folder: Path) -> dict[str, Any]:
    """raydistill's teacher stage alone over the training split (read, decode, actor pool; no cache written):
    images, captions, seconds and the steady window."""
    from raydistill.data.source import source_dataset
    from raydistill.pipeline.plans import decoded, with_teacher
    from raydistill.pipeline.teacher_side import probe_teacher, teacher_spec

    spec = teacher_spec(cfg)
    dim = probe_teacher(cfg, spec)["dim"]
    counters = common.TimedCounters().start()
    rows = decoded(source_dataset(cfg, [cfg.data.train_split]), cfg, {"image": cfg.data.decode_size}, counters,
                   count_bad=True)
    ds = with_teacher(rows, cfg, common.teacher_side(spec, dim, folder), counters, write_through=False)

    def run() -> tuple[int, int]:
        images = captions = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            images += len(batch["t_img"])
            captions += sum(len(c) for c in batch["captions"])
        return images, captions

    (images, captions), seconds = common.timed(run)
    window = common.pool_steady_window(counters.actor_calls(), images, captions)
    steady = common.window_rate(window["images"], window["seconds"], "the teacher alone")
    return {"images": images, "captions": captions, "seconds": seconds,
            **common.rates(images, seconds, steady, "images")}


RUN_KEYS = ("seconds", "samples", "steady_samples_per_s", "end_to_end_samples_per_s", "startup_s")


def pipeline_figures(teacher: dict[str, Any], no_cache: dict[str, Any], write_through: dict[str, Any],
                     student: dict[str, Any], epoch_samples: int, epochs: int) -> dict[str, Any]:
    """The result's figures from the four measurements: the teacher pass alone (``teacher_pass``) and the three
    runs (``run_experiment``'s summary with ``common.train_rates``), each over ``epochs`` epochs of
    ``epoch_samples`` caption rows.

    Steady state: one epoch at each part's steady rate, and the overlap efficiency of the stream from those
    (1 when the stream takes as long as the teacher and the student one after the other, 2 when it hides one
    behind the other completely). End to end: whole runs, spread over the epochs. The cache saving compares the
    stream with and without write-through.
    """
    figures: dict[str, Any] = {
        "t_teacher_s": teacher["images"] / teacher["steady_images_per_s"],
        "t_student_s": epoch_samples / student["steady_samples_per_s"],
        "t_stream_s": epoch_samples / no_cache["steady_samples_per_s"],
        "teacher_alone": teacher,
        "student_alone": {k: student[k] for k in RUN_KEYS},
        "no_cache": {"teacher_images_embedded": no_cache["teacher_images_embedded"]}
        | {k: no_cache[k] for k in RUN_KEYS},
        "write_through": {"teacher_images_embedded": write_through["teacher_images_embedded"],
                          "cache_hits": no_cache["teacher_images_embedded"] - write_through["teacher_images_embedded"]}
        | {k: write_through[k] for k in RUN_KEYS},
    }
    figures["overlap_efficiency"] = (figures["t_teacher_s"] + figures["t_student_s"]) / figures["t_stream_s"]
    end_to_end = {"t_teacher_s": teacher["seconds"], "t_student_s": student["seconds"] / epochs,
                  "t_stream_s": no_cache["seconds"] / epochs}
    end_to_end["overlap_efficiency"] = ((end_to_end["t_teacher_s"] + end_to_end["t_student_s"])
                                        / end_to_end["t_stream_s"])
    figures["end_to_end"] = end_to_end
    figures["cache_saving"] = 1 - write_through["seconds"] / no_cache["seconds"]
    figures["cache_saving_steady"] = 1 - no_cache["steady_samples_per_s"] / write_through["steady_samples_per_s"]
    return figures


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
    from raydistill.pipeline.runner import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gpu = args.device.startswith("cuda")
        spec = teacher_spec(args.teacher, args.device, work, args.image_size)
        size = args.image_size or (48 if args.teacher in ("demo", "tiny") else 224)

        def cfg_for(name: str, extra: list[str]) -> Any:
            return common.run_config(spec, work / name, [
                f"data.synth.n_images={args.images}", f"data.decode_size={size}",
                *common.student_overrides(args.student),
                f"train.batch_size={args.batch_size}", f"train.cpus_per_worker={args.cpus_per_worker}",
                f"train.use_gpu={'yes' if gpu else 'no'}", f"teacher.pool.batch_size={args.batch_size}",
                f"teacher.infer_batch_size={args.batch_size}", *common.gpu_sharing(gpu),
                f"teacher.pool.num_cpus={args.cpus_per_actor}", f"cache.dir={work / name / 'cache'}",
            ] + extra)

        def train(name: str, extra: list[str]) -> dict[str, Any]:
            reports = work / f"reports-{name}.jsonl"
            summary = run_experiment(cfg_for(name, extra), train_callbacks=[common.ReportRecorder(reports)])
            return summary | common.train_rates(common.read_reports(reports), summary["steps"] * args.batch_size,
                                                summary["train_seconds"])

        common.start_ray(num_cpus=args.num_cpus, num_gpus=1 if gpu else None)
        probe = cfg_for("probe", [])
        common.configure_data(probe)
        log("teacher stage alone over the training split")
        teacher = teacher_pass(probe, work / "probe" / "no-cache")
        epoch = teacher["captions"] // args.batch_size
        log(f"one epoch = {epoch} steps of {args.batch_size} ({teacher['captions']} training captions)")
        many = [f"train.steps={epoch * args.epochs}", f"train.checkpoint_every={epoch * args.epochs}",
                f"train.log_every={max(1, epoch // 4)}"]
        log(f"stream mode for {args.epochs} epochs without a cache")
        no_cache = train("no-cache", many + ["cache.write_through=false"])
        log(f"stream mode for {args.epochs} epochs with write-through")
        write_through = train("write-through", many + ["cache.write_through=true"])
        # The student alone runs as many epochs as the stream runs, so that both spread their start-up over the
        # same number of epochs. It reads the cache the write-through run filled (the same rows `raydistill
        # embed` would write).
        log(f"student alone for {args.epochs} epochs (cache mode, the write-through run's cache)")
        student = train("write-through", many + ["cache.mode=cache", "name=student-alone"])
        if student["teacher_images_embedded"]:
            raise RuntimeError(f"the student-alone run embedded {student['teacher_images_embedded']} images: the "
                               "write-through run left its cache incomplete")

    figures = pipeline_figures(teacher, no_cache, write_through, student, epoch * args.batch_size, args.epochs)
    figures = {"epoch_steps": epoch, "epochs": args.epochs} | figures
    end_to_end = figures["end_to_end"]
    config = {k: v for k, v in vars(args).items() if k not in ("out", "tag")} | {"image_size": size}
    out = common.result("pipeline", config, **figures)
    print(common.table(["", "steady", "end to end"], [
        ["teacher alone, s per epoch", figures["t_teacher_s"], end_to_end["t_teacher_s"]],
        ["student alone (cache mode), s per epoch", figures["t_student_s"], end_to_end["t_student_s"]],
        ["stream, no cache, s per epoch", figures["t_stream_s"], end_to_end["t_stream_s"]],
        ["overlap efficiency (t_teacher + t_student) / t_stream", figures["overlap_efficiency"],
         end_to_end["overlap_efficiency"]],
        ["start-up s: teacher / student / stream",
         f"{teacher['startup_s']:.1f} / {student['startup_s']:.1f} / {no_cache['startup_s']:.1f}", None],
        [f"stream, {args.epochs} epochs: no cache / write-through, s", None,
         f"{no_cache['seconds']:.1f} / {write_through['seconds']:.1f}"],
        ["teacher images embedded: no cache / write-through", None,
         f"{no_cache['teacher_images_embedded']} / {write_through['teacher_images_embedded']}"],
        ["cache saving", figures["cache_saving_steady"], figures["cache_saving"]],
    ]))
    common.write_result(out, args.out, args.tag)
    return out


if __name__ == "__main__":
    main()
