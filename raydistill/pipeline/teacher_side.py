"""The run's teacher as the driver knows it: its typed spec, its dimension, its cache, and the cache's key.

The driver never loads the teacher. In stream mode (and ``raydistill embed``) one probe task loads it where
its actors will run, to read its dimension and the fingerprint of its weights; in cache mode the cache's
manifest holds the dimension and the teacher is not loaded anywhere (no teacher resources are reserved).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raydistill.config import Config
from raydistill.models.teachers.base import TeacherSpec
from raydistill.pipeline.cache import EmbeddingCache, make_key
from raydistill.pipeline.plans import TeacherSide
from raydistill.pipeline.progress import log


def teacher_spec(cfg: Config) -> TeacherSpec:
    """The typed spec the teacher actors load (the demo teacher resolved to its files)."""
    t = cfg.teacher
    if t.kind == "demo":
        from raydistill.config import ConfigError
        from raydistill.demo_assets import find_demo_teacher

        found = find_demo_teacher(quick=True)
        if found is None:
            raise ConfigError("teacher.kind=demo: no demo teacher is fitted for the current configs/demo-teacher.yaml; "
                              "`raydistill demo` fits one (or `raydistill run configs/demo-teacher.yaml`)")
        return TeacherSpec(kind="raydistill", checkpoint=str(found), dtype=t.dtype, device=t.device,
                           batch_size=t.infer_batch_size)
    return TeacherSpec(kind=t.kind, checkpoint=t.checkpoint, tokenizer=t.tokenizer, size=t.size, arch=t.arch,
                       dtype=t.dtype, device=t.device, batch_size=t.infer_batch_size, max_len=t.max_len)


def cache_key(cfg: Config, spec: TeacherSpec, dataset: str) -> dict[str, Any]:
    """The cache's key: the teacher's identity as configured (not where or how fast it runs), the teacher's
    preprocessing, and the dataset's identity."""
    identity = {k: v for k, v in spec.as_dict().items() if k not in ("device", "batch_size")}
    return make_key(teacher=identity, preprocessing={"decode_size": cfg.data.decode_size}, dataset=dataset)


def probe_teacher(cfg: Config, spec: TeacherSpec) -> dict[str, Any]:
    """Load the teacher once where its actors will run; return its dimension and weights fingerprint."""
    import ray

    pool = cfg.teacher.pool

    @ray.remote(max_retries=0)
    def _probe(spec: TeacherSpec) -> dict[str, Any]:
        from raydistill.models.teachers import load_teacher

        teacher = load_teacher(spec)
        return {"dim": int(teacher.dim), "fingerprint": teacher.fingerprint}

    # Scheduled on the cluster, not in the placement group of a Tune trial that may call this (no GPU there).
    options: dict[str, Any] = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "scheduling_strategy": "DEFAULT"}
    if pool.resources:
        options["resources"] = pool.resources
    if pool.label_selector:
        options["label_selector"] = pool.label_selector
    return ray.get(_probe.options(**options).remote(spec))


def open_teacher_side(cfg: Config, dataset: str) -> TeacherSide:
    """The run's teacher and cache: from the cache's manifest in cache mode, from a probe task otherwise.

    Raises:
        CacheError: the cache is stale, missing or incomplete for cache mode.
    """
    spec = teacher_spec(cfg)
    key = cache_key(cfg, spec, dataset)
    cache = EmbeddingCache(cfg.cache.dir or str(Path(cfg.output_dir) / "cache" / key["hash"][:16]))
    if cfg.cache.mode == "cache":
        needed = [cfg.data.train_split, cfg.data.test_split] + ([cfg.data.val_split] if cfg.train.eval_every and cfg.data.val_split else [])
        cache.require_complete(key, needed)
        log(f"embedding cache: {cache.uri} (cache mode: the teacher is not loaded)")
        return TeacherSide(spec=spec, dim=cache.dim(), cache=cache, key=key)
    log(f"loading the teacher ({spec.kind}: {spec.checkpoint}) where its actors run, to read its dimension")
    probe = probe_teacher(cfg, spec)
    cache.open(key, probe["dim"], probe["fingerprint"])
    log(f"embedding cache: {cache.uri} ({cfg.cache.mode} mode)")
    return TeacherSide(spec=spec, dim=probe["dim"], cache=cache, key=key, fingerprint=probe["fingerprint"])
