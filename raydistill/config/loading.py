"""Reading a run's configuration: a YAML file, ``key.sub=value`` overrides, validation with errors that name the file,
the key, the bad value and what is allowed; relative paths resolved against the config file's folder.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from raydistill.config.schema import Config, ConfigError
from raydistill.paths import is_uri


def _parse_value(text: str) -> Any:
    """Parse an override's value as YAML (so 1e-3, true, [a, b], {k: 1} work); fall back to the raw text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``key.sub=value`` overrides applied.

    Raises:
        ConfigError: an override without ``=`` or one that descends into a non-mapping.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"overrides apply to a mapping of sections, got {type(raw).__name__}")
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return out


#: What pydantic names the plain members of a union in an error's location.
_TYPE_TAGS = frozenset({"int", "float", "str", "bool", "none", "list", "dict"})


def _key_path(loc: tuple[Any, ...]) -> str:
    """``ray.data_object_store_mb`` from pydantic's location, without the tags it adds for each member of a
    union type (``constrained-int``, ``literal['auto']``, ``int``)."""
    keys = [str(p) for p in loc if not (isinstance(p, str) and (not p.isidentifier() or p in _TYPE_TAGS))]
    return ".".join(keys) or "<root>"


def _format_errors(err: ValidationError, origin: str, raw: dict[str, Any]) -> str:
    lines: dict[str, str] = {}  # one line per key: a union's members each report the same value
    for e in err.errors():
        loc = _key_path(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            lines[loc] = f"{origin}: unknown key {loc!r} (check the spelling; see the README's config reference)"
            continue
        if loc in lines:
            lines[loc] += f"; or {msg[0].lower()}{msg[1:]}"
            continue
        value = e.get("input")
        if isinstance(value, dict):
            lines[loc] = f"{origin}: {loc}: {msg}"
        else:
            lines[loc] = f"{origin}: {loc} = {value!r}: {msg}"
    return "\n".join(lines.values())


_PATH_KEYS = (
    ("data", "path"),
    ("data", "image_root"),
    ("teacher", "checkpoint"),
    ("teacher", "tokenizer"),
    ("student", "tokenizer"),
    ("student", "vision_weights"),
    ("student", "text_weights"),
    ("cache", "dir"),
    ("train", "storage_path"),
    ("output_dir",),
)


def _resolve_paths(cfg: Config, base: Path, origin: str) -> Config:
    """Make relative local paths absolute against ``base`` (the config file's folder or the cwd).

    Raises:
        ConfigError: a value the operating system cannot take as a path (a NUL byte, a name too long).
    """
    for keys in _PATH_KEYS:
        node: Any = cfg
        for k in keys[:-1]:
            node = getattr(node, k)
        value = getattr(node, keys[-1])
        if not value or is_uri(value):
            continue
        with _usable_path(origin, ".".join(keys), value):
            p = Path(os.path.expanduser(value))
            if not p.is_absolute():
                candidate = base / p
                # Hub names ("openai/clip-vit-base-patch32") are not paths: keep them unless they exist locally.
                if keys[0] in ("teacher", "student") and not candidate.exists() and not value.startswith("."):
                    continue
                p = candidate
            setattr(node, keys[-1], str(p.resolve()))
    for name, split in cfg.data.coco_splits.items():
        for key in ("captions", "images"):
            value = getattr(split, key)
            if not is_uri(value):
                with _usable_path(origin, f"data.coco_splits.{name}.{key}", value):
                    setattr(split, key, str((base / os.path.expanduser(value)).resolve()))
    return cfg


@contextlib.contextmanager
def _usable_path(origin: str, key: str, value: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError) as err:
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise ConfigError(f"{origin}: {key} = {shown!r}: not a usable path ({err.__class__.__name__}: "
                          f"{getattr(err, 'strerror', None) or err})") from None


def config_from_dict(raw: dict[str, Any], origin: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate a raw mapping into a :class:`Config`.

    Args:
        raw: the parsed YAML (after overrides).
        origin: what to call the source in error messages (the file path).
        base_dir: folder that relative paths resolve against; ``output_dir`` resolves against the cwd.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin, raw)) from None
    with _usable_path(origin, "output_dir", cfg.output_dir):
        out_dir = Path(os.path.expanduser(cfg.output_dir))
        if not is_uri(cfg.output_dir) and not out_dir.is_absolute():
            cfg.output_dir = str((Path.cwd() / out_dir).resolve())
    return _resolve_paths(cfg, base_dir or Path.cwd(), origin)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a YAML config file.

    Raises:
        ConfigError: missing file, bad YAML, unknown keys, bad values, contradictory settings.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, origin=str(p), base_dir=p.resolve().parent)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what is printed, saved with the run and logged)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
