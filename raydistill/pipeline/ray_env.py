"""The Ray instance a command uses: a cluster's address, or a small local instance started here."""

from __future__ import annotations

import os

import ray

from raydistill.config import Config
from raydistill.pipeline.progress import log

LOCAL_RAY_ENV = {
    # Nothing preempts the nodes of a local instance: skip Ray Train's preemption watcher, an actor process per
    # training run (and per restart) that costs seconds of CPU on a small machine.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Data lists a Parquet dataset's row groups on a pool of FooterReader actors, 32 by default, started for
    # every read: on one machine each is a Python process started for a few footers (a cache holds one part per
    # teacher batch). Two read the footers of a local cache as fast.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2",
    # Ray Train's controller looks at its workers every 2 s by default, and the workers wait on that look: to
    # start, to finish, and at each checkpoint (a worker's report waits until the controller has taken the one
    # before). On one machine looking is cheap, and a short run's checkpoints and start no longer wait for it.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def prepare_local_ray_env() -> None:
    """Set :data:`LOCAL_RAY_ENV` (where the user has not) before a local instance starts: its processes inherit
    the environment of the driver that starts it."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def verbose() -> bool:
    """Whether Ray's and MLflow's own lines are shown (``--verbose`` or ``RAYDISTILL_VERBOSE=1``)."""
    return os.environ.get("RAYDISTILL_VERBOSE", "") not in ("", "0")


def quiet_libraries() -> None:
    """Keep Ray's and MLflow's internal lines and warnings off the terminal (they still reach Ray's log files
    under the session folder); raydistill's own progress and errors say what the user needs."""
    import logging
    import warnings

    if verbose():
        return
    import ray.data  # noqa: F401 - configures its loggers on import; adjusted below

    for name in ("ray", "ray.train", "ray.tune", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray Data logs to its own file (kept: every line) and to the console (raised to errors that end a run,
    # which raydistill reports itself as one message).
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.CRITICAL)
    for module in ("ray", "mlflow", "pydantic", "torch", "timm", "transformers"):
        warnings.filterwarnings("ignore", module=module)


def init_ray(cfg: Config) -> None:
    """Connect to the configured cluster, or start a small local instance; set Ray Data up for the run."""
    from raydistill.pipeline.plans import configure_data_context

    if ray.is_initialized():
        configure_data_context(cfg)
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 2))
        prepare_local_ray_env()
        from raydistill.pipeline import local_instance

        ended = local_instance.end_orphans()
        if ended:
            log(f"ended {len(ended)} processes a killed raydistill command's local Ray instance had left behind")
        quiet_libraries()
        context = ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=cfg.ray.num_gpus,
            object_store_memory=cfg.ray.object_store_mb * 2**20 if cfg.ray.object_store_mb else None,
            include_dashboard=cfg.ray.dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            # The workers' own output (Ray's, the libraries') goes to the session's log files; the driver shows
            # the run's progress from the counters actor instead. --verbose shows it all.
            log_to_driver=verbose(),
            configure_logging=False,
        )
        session_dir = context.address_info.get("session_dir")
        if session_dir:
            local_instance.record(session_dir)
        log(f"started a local Ray instance with {cpus} logical CPUs (logs: {session_dir})")
        if context.dashboard_url:
            log(f"Ray dashboard: http://{context.dashboard_url} (if it asks for a token: the contents of "
                "~/.ray/auth_token)")
    configure_data_context(cfg)


def shutdown_ray() -> None:
    """Shut this process's Ray connection down (and forget the record of the local instance it started)."""
    from raydistill.pipeline import local_instance

    if ray.is_initialized():
        ray.shutdown()
    local_instance.forget()


def warm_imports() -> None:
    """Import what the driver will need (the student's timm and transformers, MLflow): seconds of CPU that
    overlap a local Ray instance's start when run in a thread beside ``init_ray``."""
    import mlflow  # noqa: F401

    import raydistill.models.student  # noqa: F401


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
