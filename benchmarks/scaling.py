"""Data-parallel scaling of the students: 1 -> 2 -> 4 Ray Train workers (DDP), cache mode.

By default this starts a local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and one node
per worker, each its own raylet) so that the workers really are on different nodes and all-reduce over
gloo between processes. Each worker trains on ``--batch-size`` samples per step (weak scaling); total
samples/s is reported per worker count with ``efficiency`` = rate(N) / (N x rate(1)) (with ``--workers`` not
starting at 1: relative to the per-worker rate of the smallest count measured). The rates are steady ones: every
logging window but the first, as rank 0 measures them (the worker group's start, the dataset's start and the
first batches come before); each row also gives ``end_to_end_samples_per_s`` over the whole ``fit`` and
``startup_s``, its time less what its samples take at the steady rate (``benchmarks.common``).

What a 2-core machine can and cannot show: the code path (placement over nodes, DDP, the gradient
all-reduce, the sharded cache feed) is real, but N workers share the same two cores, so total samples/s
cannot rise with N here; efficiency ~ 1/N is the expected result on such a machine, and it says nothing about
a real cluster. On a real cluster:

    python -m benchmarks.scaling --address auto --device cuda --teacher beit3-large --student small \\
        --workers 1 2 4 8 --tag cluster
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import log


def local_cluster(nodes: int, cpus_per_node: int, head_cpus: int) -> Any:
    """A head and ``nodes`` worker nodes on this machine, each its own raylet."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    return cluster


def add_efficiency(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``efficiency``: its total rate over N times the per-worker rate of the smallest N."""
    smallest = min(rows, key=lambda row: row["workers"])
    per_worker = smallest["samples_per_s"] / smallest["workers"]
    for row in rows:
        row["efficiency"] = row["samples_per_s"] / (row["workers"] * per_worker)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=None, help="an existing cluster (e.g. auto); default: a local multi-node one")
    p.add_argument("--teacher", default="demo")
    p.add_argument("--student", default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--storage", default=None, help="train.storage_path shared by every node (s3://, NFS) on a real cluster")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)

    import ray

    from benchmarks.teacher_throughput import teacher_spec
    from raydistill.pipeline.ray_env import prepare_local_ray_env
    from raydistill.pipeline.runner import embed, run_experiment

    cluster = None
    if args.address:
        common.start_ray(address=args.address)
    else:
        prepare_local_ray_env()
        cluster = local_cluster(max(args.workers), cpus_per_node=max(1, int(args.cpus_per_worker)), head_cpus=3)
        ray.init(address=cluster.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    nodes = len([n for n in ray.nodes() if n["Alive"]])
    log(f"cluster: {nodes} nodes, {ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
        f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs")
    gpu = args.device.startswith("cuda")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            spec = teacher_spec(args.teacher, args.device, work, args.image_size)
            size = args.image_size or (48 if args.teacher in ("demo", "tiny") else 224)
            # `raydistill embed` caches the validation split too, which these runs never read.
            base = [f"data.synth.n_images={args.images}", f"data.decode_size={size}", "data.val_split=null",
                    *common.student_overrides(args.student), f"train.steps={args.steps}",
                    f"train.log_every={args.log_every}",
                    f"train.checkpoint_every={args.steps}", f"train.batch_size={args.batch_size}",
                    f"train.cpus_per_worker={args.cpus_per_worker}", f"train.use_gpu={'yes' if gpu else 'no'}",
                    f"teacher.pool.num_gpus={1 if gpu else 0}", "cache.mode=cache", "teacher.pool.num_cpus=1"]
            if args.storage:
                base.append(f"train.storage_path={args.storage}")
            embed(common.run_config(spec, work, base))
            for n in args.workers:
                reports = work / f"reports-{n}.jsonl"
                log(f"{n} worker(s): {args.steps} steps of {args.batch_size} per worker")
                summary = run_experiment(common.run_config(spec, work, base + [f"train.num_workers={n}"]),
                                         train_callbacks=[common.ReportRecorder(reports)])
                figures = common.train_rates(common.read_reports(reports), summary["steps"] * args.batch_size * n,
                                             summary["train_seconds"])
                rows.append({"workers": n, "samples_per_s": figures["steady_samples_per_s"], "steps": summary["steps"],
                             "train_seconds": summary["train_seconds"],
                             "end_to_end_samples_per_s": figures["end_to_end_samples_per_s"],
                             "startup_s": figures["startup_s"]})
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    add_efficiency(rows)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "tag")} | {"nodes": nodes, "image_size": size}
    note = ("local multi-node cluster on one machine: every worker shares the same CPU cores, so this shows "
            "that the distributed path works, not how it scales") if cluster is not None else "real cluster"
    out = common.result("scaling", config, rows=rows, note=note)
    print(common.table(["workers", "steady samples/s (total)", "efficiency", "start-up s", "train s"],
                       [[r["workers"], r["samples_per_s"], r["efficiency"], r["startup_s"], r["train_seconds"]]
                        for r in rows]))
    print(note)
    common.write_result(out, args.out, args.tag)
    return out


if __name__ == "__main__":
    main()
