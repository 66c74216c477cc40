"""Student training throughput: the Ray Train loop in cache mode against a plain PyTorch loop, same run.

The teacher fills the embedding cache once (``raydistill embed``). Then:

- **Ray Train**: ``raydistill run`` in cache mode (``TorchTrainer``, one worker, Ray Data reading the cache's
  Parquet parts, decoding, tokenising and shuffling while the worker trains); samples/s as the worker reports
  it per logging window.
- **plain PyTorch**: the same cached rows decoded and tokenised up front into tensors in memory, and a
  hand-written loop over the same student, DSMD objective, balancer and AdamW, with as many threads as the
  worker reserves CPUs (bf16 autocast on a GPU, as the worker).

Each side is reported three ways (``benchmarks.common``):

- **steady** (``steady_samples_per_s``, also ``samples_per_s`` as before): every logging window but the
  first (``--log-every`` steps), which holds the dataset's start and the first batches (and on a GPU the
  first kernel launches): for Ray Train as the worker measures its windows, for the plain loop from the end
  of its first ``--log-every`` steps to its last step;
- **end to end** (``end_to_end_samples_per_s``): for Ray Train over the whole ``fit`` (the run's
  ``train_seconds``: the worker group's start, the dataset's, training, the final checkpoint); for the plain
  loop over reading, decoding and tokenising the cached rows and the whole loop, model built;
- ``startup_s``: ``seconds`` less what the samples take at the steady rate.

``ratio`` = Ray steady / plain steady (target >= 0.9); ``ratio_end_to_end`` the same on the end-to-end rates.

    python -m benchmarks.train_throughput                     # demo teacher and student on CPU
    python -m benchmarks.train_throughput --teacher beit3-large --student small --device cuda --tag gpu
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import log


def cached_rows(cfg: Any, cache_dir: str, tokenizer: Any, max_len: int) -> dict[str, np.ndarray]:
    """The training split's caption rows from the cache, decoded and tokenised (what the Ray pipeline makes)."""
    from raydistill.pipeline.rows import explode_batch

    batch = common.cached_split(cfg, cache_dir, cfg.data.train_split)
    return explode_batch(batch, tokenizer, max_len, with_teacher=True)


def plain_loop(cfg: Any, rows: dict[str, np.ndarray], dim: int, vocab: int, steps: int, warmup_steps: int,
               device: str, threads: int) -> dict[str, float]:
    """A hand-written PyTorch loop over in-memory tensors: ``total_s`` (model built to last step) and the steady
    window's ``window_samples`` and ``window_s`` (the steps after ``warmup_steps``)."""
    import torch

    from raydistill.method.balancers import make_balancer
    from raydistill.method.losses import DSMDObjective
    from raydistill.models.student import build_student

    begin = time.perf_counter()
    torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    d, t = cfg.distill, cfg.train
    model = build_student(cfg.student.preset, embed_dim=dim, vocab_size=vocab).to(dev)
    objective = DSMDObjective(dim=dim, queue_size=d.queue_size, temperature=d.temperature, margin=d.margin,
                              max_violation=d.max_violation, mask_same_image=d.mask_same_image,
                              terms=tuple(d.terms)).to(dev)
    balancer = make_balancer(cfg.balancer.kind, names=list(d.terms), **cfg.balancer.params).to(dev)
    params = list(model.parameters()) + [p for p in balancer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    warm = max(1, int(t.warmup_fraction * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    tensors = {k: torch.as_tensor(v) for k, v in rows.items()}
    n, batch = len(rows["input_ids"]), t.batch_size
    amp = dev.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=generator)
    position, start = 0, None
    for step in range(steps):
        if step == warmup_steps:
            if amp:
                torch.cuda.synchronize()
            start = time.perf_counter()
        if position + batch > n:
            order, position = torch.randperm(n, generator=generator), 0
        idx = order[position:position + batch]
        position += batch
        pixels = model.preprocess_images(tensors["pixels"][idx]).to(dev, non_blocking=True)
        ids, mask = tensors["input_ids"][idx].to(dev), tensors["attention_mask"][idx].to(dev)
        t_img, t_txt = tensors["t_img"][idx].to(dev), tensors["t_txt"][idx].to(dev)
        image_keys = tensors["image_key"][idx].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            s_img, s_txt = model(pixels, ids, mask)
        terms = objective(s_img.float(), s_txt.float(), t_img, t_txt, image_keys)
        total, _ = balancer(terms)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or 1e9)
        optimizer.step()
        schedule.step()
        objective.enqueue(t_img, t_txt, image_keys)
    if amp:
        torch.cuda.synchronize()
    end = time.perf_counter()
    return {"total_s": end - begin, "window_samples": (steps - warmup_steps) * batch, "window_s": end - start}


def fill_cache(cfg: Any) -> dict[str, Any]:
    from raydistill.pipeline.runner import embed

    summary, seconds = common.timed(lambda: embed(cfg))
    log(f"cache filled in {seconds:.1f} s: {summary['dataset_images']} images, {summary['dataset_captions']} captions")
    return summary | {"seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="demo", help="demo | tiny | beit3-base | beit3-large (random weights)")
    p.add_argument("--student", default="demo", help="student preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=1500, help="synthetic images (all splits)")
    p.add_argument("--image-size", type=int, default=None, help="decode size (default: the teacher's)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--log-every", type=int, default=20, help="logging window (steps); the first is left out")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cpus-per-worker", type=float, default=2)
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray instance")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.steps % args.log_every or args.steps < 2 * args.log_every:
        raise SystemExit("--steps must be a multiple of --log-every, at least two windows")

    from benchmarks.teacher_throughput import teacher_spec
    from raydistill.models.tokenizers import load_tokenizer
    from raydistill.pipeline.runner import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = teacher_spec(args.teacher, args.device, work, args.image_size)
        size = args.image_size or (48 if args.teacher in ("demo", "tiny") else 224)
        gpu = args.device.startswith("cuda")
        cfg = common.run_config(spec, work, [
            # `raydistill embed` caches the validation split too, which these runs never read.
            f"data.synth.n_images={args.images}", f"data.decode_size={size}", "data.val_split=null",
            *common.student_overrides(args.student), f"train.steps={args.steps}", f"train.log_every={args.log_every}",
            f"train.checkpoint_every={args.steps}",
            f"train.batch_size={args.batch_size}", f"train.cpus_per_worker={args.cpus_per_worker}",
            f"train.use_gpu={'yes' if gpu else 'no'}", "cache.mode=cache", f"teacher.pool.batch_size={args.batch_size}",
            f"teacher.infer_batch_size={args.batch_size}", f"teacher.pool.num_gpus={1 if gpu else 0}",
            f"teacher.pool.num_cpus={args.cpus_per_worker}",
        ])
        common.start_ray(num_cpus=args.num_cpus, num_gpus=1 if gpu else None)
        cache = fill_cache(cfg)
        reports = work / "reports.jsonl"
        log(f"Ray Train, cache mode: {args.steps} steps of {args.batch_size}")
        summary = run_experiment(cfg, train_callbacks=[common.ReportRecorder(reports)])
        ray_train = common.train_rates(common.read_reports(reports), summary["steps"] * args.batch_size,
                                       summary["train_seconds"])
        tokenizer = load_tokenizer(Path(summary["run_dir"]) / "tokenizer")
        rows, prepare_s = common.timed(lambda: cached_rows(cfg, cache["cache_dir"], tokenizer,
                                                           common.student_max_len(cfg)))
        log(f"plain PyTorch loop: {args.steps} steps over {len(rows['input_ids'])} in-memory rows")
        threads = max(1, int(args.cpus_per_worker))
        plain = plain_loop(cfg, rows, int(np.asarray(rows["t_img"]).shape[1]), len(tokenizer), args.steps,
                           args.log_every, args.device, threads)

    plain_seconds = prepare_s + plain["total_s"]
    plain_steady = common.window_rate(plain["window_samples"], plain["window_s"], "the plain loop")
    figures = {
        "ray_train": {"samples_per_s": ray_train["steady_samples_per_s"], "steps": summary["steps"], **ray_train},
        "plain": {"samples_per_s": plain_steady, "steps": args.steps, "samples": args.steps * args.batch_size,
                  "seconds": plain_seconds, "prepare_s": prepare_s,
                  **common.rates(args.steps * args.batch_size, plain_seconds, plain_steady, "samples")},
        "student_params": summary["student_params"],
        "cache_fill_s": cache["seconds"],
    }
    figures["ratio"] = figures["ray_train"]["steady_samples_per_s"] / figures["plain"]["steady_samples_per_s"]
    figures["ratio_end_to_end"] = (figures["ray_train"]["end_to_end_samples_per_s"]
                                   / figures["plain"]["end_to_end_samples_per_s"])
    config = {k: v for k, v in vars(args).items() if k not in ("out", "tag")} | {"image_size": size}
    out = common.result("train_throughput", config, **figures)
    print(common.table(
        ["", "steady samples/s", "start-up s", "end-to-end samples/s", "seconds"],
        [[name, f["steady_samples_per_s"], f["startup_s"], f["end_to_end_samples_per_s"], f["seconds"]]
         for name, f in (("plain PyTorch", figures["plain"]), ("Ray Train (cache mode)", figures["ray_train"]))]
        + [["ratio (Ray / plain)", figures["ratio"], None, figures["ratio_end_to_end"], None]]))
    common.write_result(out, args.out, args.tag)
    return out


if __name__ == "__main__":
    main()
