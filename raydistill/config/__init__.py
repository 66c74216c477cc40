"""Typed experiment configuration: YAML files plus ``key.sub=value`` overrides, validated fail-fast.

One experiment is one YAML file (see ``configs/``). :func:`load_config` reads it, applies command-line
overrides, validates every field and every cross-field rule, and returns a :class:`Config`. Errors name the
file, the key, the bad value and what is allowed, e.g.::

    configs/quick.yaml: train.batch_size = -4: Input should be greater than 0

Relative paths in a config resolve against the config file's folder, so a config runs from any directory.
"""

from raydistill.config.loading import (
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
)
from raydistill.config.schema import (
    BALANCER_KINDS,
    DISTILL_TERMS,
    BalancerConfig,
    CacheConfig,
    CocoSplit,
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    EvalConfig,
    PoolConfig,
    RayConfig,
    StudentConfig,
    SynthConfig,
    TeacherConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "BALANCER_KINDS",
    "DISTILL_TERMS",
    "BalancerConfig",
    "CacheConfig",
    "CocoSplit",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "PoolConfig",
    "RayConfig",
    "StudentConfig",
    "SynthConfig",
    "TeacherConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "load_config",
]
