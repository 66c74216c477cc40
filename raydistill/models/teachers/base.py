"""The one interface every teacher shares: spec validation, batched inference and fingerprints.

A teacher adapter (``beit3``, ``hf_clip``, ``open_clip``, ``raydistill``) only knows how to turn a
mini-batch of uint8 images, or of strings, into embeddings with its own model. Everything the kinds
have in common lives here, as plain functions and one small class:

- ``TeacherSpec``: the validated ``teacher:`` section of a config (unknown kind, unknown key, a key
  the kind does not use, a missing key -> ``ValueError`` naming the key and the allowed values);
- ``Teacher``: wraps an adapter's two encode functions with input checks, mini-batching under
  ``torch.inference_mode``, float32 output and L2 normalisation;
- ``resolve_device`` / ``resolve_dtype``, ``require_file``, ``hash_path`` and ``teacher_fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raydistill.errors import UserError

TEACHER_KINDS: tuple[str, ...] = ("beit3", "hf_clip", "open_clip", "raydistill")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICE_CHOICES = "'cpu', 'cuda', 'cuda:<index>' or 'auto'"

# Keys each kind needs and may take, besides the common dtype / device / batch_size.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "beit3": ("checkpoint", "tokenizer"),
    "hf_clip": ("checkpoint",),
    "open_clip": (),  # the model name, in arch (or size), is checked in __post_init__
    "raydistill": ("checkpoint",),
}
_OPTIONAL: dict[str, tuple[str, ...]] = {
    "beit3": ("size", "arch", "max_len"),
    "hf_clip": ("tokenizer", "max_len"),
    "open_clip": ("arch", "size", "checkpoint"),  # 'hf-hub:' / 'local-dir:' models carry their weights
    "raydistill": (),
}
_COMMON: tuple[str, ...] = ("kind", "dtype", "device", "batch_size")


class TeacherLoadError(UserError, ValueError):
    """A teacher's spec, weights file or tokenizer cannot be used; the message names which and why."""


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher to load and how to run it (the ``teacher:`` section of a run config).

    Attributes:
        kind: One of ``TEACHER_KINDS``.
        checkpoint: Weights: a file (``beit3``, ``open_clip``), a directory or hub name
            (``hf_clip``), a raydistill checkpoint (``raydistill``), or an open_clip pretrained tag.
        tokenizer: ``beit3``: the XLM-R SentencePiece model ``beit3.spm``; ``hf_clip``: a tokenizer
            directory or hub name when it is not stored beside the weights.
        size: ``beit3`` preset, ``"base"`` or ``"large"``; for ``open_clip``, another name for ``arch``.
        arch: ``beit3``: architecture fields with torchscale ``EncoderConfig`` names (overriding the
            preset); ``open_clip``: the model name (``"ViT-B-32"``) or a model-config JSON file.
        dtype: Compute dtype, one of ``DTYPES``; embeddings are always returned as float32.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:<index>"`` or ``"auto"`` (CUDA when available).
        batch_size: Images or texts per forward pass.
        max_len: Text length in tokens (``beit3`` default 64; ``hf_clip`` default: the model's).
    """

    kind: str
    checkpoint: str | None = None
    tokenizer: str | None = None
    size: str | None = None
    arch: str | Mapping[str, Any] | None = None
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 64
    max_len: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"teacher.kind: unknown kind {self.kind!r}; allowed: {list(TEACHER_KINDS)}")
        given = {f.name for f in fields(self) if getattr(self, f.name) is not None}
        allowed = set(_COMMON) | set(_REQUIRED[self.kind]) | set(_OPTIONAL[self.kind])
        unused = sorted(given - allowed)
        if unused:
            raise ValueError(f"teacher.{unused[0]} is not used by kind {self.kind!r}; its keys: {sorted(allowed)}")
        for key in _REQUIRED[self.kind]:
            if getattr(self, key) in (None, ""):
                raise ValueError(f"teacher.{key} is required for kind {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"teacher.dtype: unknown dtype {self.dtype!r}; allowed: {list(DTYPES)}")
        _check_device_name(self.device)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"teacher.batch_size must be a positive int, got {self.batch_size!r}")
        if self.max_len is not None and (
            isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 3
        ):
            raise ValueError(f"teacher.max_len must be an int >= 3, got {self.max_len!r}")
        if self.kind == "beit3" and self.size is None and self.arch is None:
            raise ValueError("teacher.size is required for kind 'beit3' (allowed: 'base', 'large') unless "
                             "teacher.arch gives the architecture")
        if self.kind == "beit3" and self.arch is not None and not isinstance(self.arch, Mapping):
            raise ValueError(f"teacher.arch for kind 'beit3' must be a mapping of EncoderConfig fields, "
                             f"got {self.arch!r}")
        if self.kind == "open_clip":
            self._open_clip_model_name()
        for key in ("checkpoint", "tokenizer"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"teacher.{key} must be a path or a name, got {value!r}")

    def _open_clip_model_name(self) -> None:
        """open_clip takes its model name in ``arch``; ``size`` is accepted as another name for it."""
        if self.arch is not None and self.size is not None:
            raise ValueError("teacher.arch and teacher.size both name the open_clip model; give only arch")
        if self.arch is None and self.size is None:
            raise ValueError("teacher.arch is required for kind 'open_clip' (the model name, e.g. 'ViT-B-32', "
                             "or a model-config JSON file)")
        if self.arch is None:
            object.__setattr__(self, "arch", self.size)
            object.__setattr__(self, "size", None)
        if not isinstance(self.arch, str):
            raise ValueError(f"teacher.arch for kind 'open_clip' must be a model name or a model-config "
                             f"JSON path, got {self.arch!r}")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> TeacherSpec:
        """Validate a plain mapping (a parsed YAML section) into a spec.

        Args:
            raw: Keys among the spec's attribute names; ``kind`` is required.

        Returns:
            The validated spec.

        Raises:
            ValueError: not a mapping, ``kind`` missing, or any check of ``TeacherSpec`` fails.
        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"teacher spec must be a mapping, got {type(raw).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ValueError(f"teacher.{unknown[0]}: unknown key; allowed keys: {names}")
        if "kind" not in raw:
            raise ValueError(f"teacher.kind is required; allowed: {list(TEACHER_KINDS)}")
        values = dict(raw)
        for key in ("checkpoint", "tokenizer"):
            if isinstance(values.get(key), os.PathLike):
                values[key] = os.fspath(values[key])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """The spec as a plain dict (for logging)."""
        return asdict(self)


def _check_device_name(name: object) -> None:
    valid = isinstance(name, str) and (
        name in ("cpu", "cuda", "auto") or (name.startswith("cuda:") and name[5:].isdigit())
    )
    if not valid:
        raise ValueError(f"teacher.device: unknown device {name!r}; allowed: {DEVICE_CHOICES}")


def resolve_device(name: str) -> torch.device:
    """Turn a spec's device name into a usable ``torch.device``.

    Args:
        name: ``"cpu"``, ``"cuda"``, ``"cuda:<index>"`` or ``"auto"`` (CUDA when available, else CPU).

    Returns:
        The device.

    Raises:
        ValueError: an unknown name, or CUDA asked for where there is none (or too few GPUs).
    """
    _check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"teacher.device is {name!r} but CUDA is not available here; use 'cpu' or 'auto'")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"teacher.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for a spec's dtype name (``float32``, ``bfloat16`` or ``float16``)."""
    if name not in DTYPES:
        raise ValueError(f"teacher.dtype: unknown dtype {name!r}; allowed: {list(DTYPES)}")
    return DTYPES[name]


def looks_like_path(value: str) -> bool:
    """True when ``value`` is meant as a local path rather than a hub name or a pretrained tag.

    Hub names are ``name`` or ``org/name`` and tags have no slash, so an existing path, an absolute
    or explicitly relative one, a deeper one or one with a weights-file suffix is taken as local.
    """
    return (
        os.path.exists(os.path.expanduser(value))
        or value.startswith(("/", "./", "../", "~"))
        or value.count("/") >= 2
        or Path(value).suffix in _PATH_SUFFIXES
    )


_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".spm", ".model", ".ckpt", ".npz")


def require_file(path: str | os.PathLike[str], key: str, what: str) -> Path:
    """Check that a spec's path points at an existing regular file.

    Args:
        path: The path from the spec.
        key: The spec key it came from (named in the error).
        what: What the file should hold, for the message ("BEiT-3 checkpoint").

    Returns:
        The path, user-expanded.

    Raises:
        TeacherLoadError: the file does not exist, or is a directory.
    """
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise TeacherLoadError(f"teacher.{key}: {what} {resolved} does not exist")
    if not resolved.is_file():
        raise TeacherLoadError(f"teacher.{key}: {what} {resolved} is not a file")
    return resolved


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _hash_file(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def hash_path(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative names and contents).

    Hidden files and folders (``.cache``, ``.git``) are skipped, so a directory's hash depends only
    on what a loader reads. Results are memoised per (path, size, mtime) within the process.

    Args:
        path: A file or a directory.

    Returns:
        Hex digest.
    """
    root = Path(path).expanduser()
    if root.is_file():
        return _hash_file(root)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(relative.as_posix().encode() + b"\0" + _hash_file(file).encode() + b"\n")
    return digest.hexdigest()


def teacher_fingerprint(kind: str, config: Mapping[str, Any], weights: Sequence[str]) -> str:
    """The stable identity of a teacher's embeddings: sha256 over kind, settings and weights.

    Args:
        kind: The teacher kind.
        config: Everything besides the weights that changes the embeddings (architecture,
            preprocessing, text length, dtype); JSON-serialisable.
        weights: One entry per weights or tokenizer source: a content hash (``hash_path``) for
            local files, or an identifier such as ``"hub:org/name@<revision>"`` for remote ones.

    Returns:
        Hex digest. Paths, device and batch size are deliberately left out: moving the files or
        running elsewhere does not change the embeddings.
    """
    payload = json.dumps({"kind": kind, "config": config, "weights": list(weights)}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def check_images(images: object) -> np.ndarray:
    """Check a batch of decoded images: a uint8 array ``[N, H, W, 3]``.

    Raises:
        ValueError: anything else (the message gives the shape and dtype received).
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"images must be a uint8 array of shape [N, H, W, 3], got shape {shape} dtype {dtype}")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"images must have a positive height and width, got shape {images.shape}")
    return images


def check_texts(texts: object) -> list[str]:
    """Check a batch of captions: a sequence of strings (not one bare string).

    Raises:
        ValueError: a bare string, or an element that is not a string (its index is given).
    """
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{index}] must be a str, got {type(text).__name__}")
    return list(texts)


class Teacher:
    """A frozen image-text teacher: uint8 images and strings in, unit-norm float32 embeddings out.

    Adapters build one with their two encode functions; each takes one mini-batch (at most
    ``batch_size`` items) and returns its embeddings as a tensor ``[n, dim]`` of any dtype or
    device. This class does the rest: input checks, mini-batching under ``torch.inference_mode``,
    conversion to float32 on the CPU and L2 normalisation.

    Attributes:
        kind: The teacher kind.
        dim: Embedding size.
        image_size: Side of the square input the model sees (images are resized to it inside).
        fingerprint: Stable identity of the embeddings (see ``teacher_fingerprint``).
        batch_size: Mini-batch size.
        device: Where the model runs.
        dtype: Compute dtype.
        max_len: Text length in tokens, where the kind has a fixed one.
        model: The underlying model (for inspection; adapters own how it is called).
    """

    def __init__(
        self,
        *,
        kind: str,
        dim: int,
        image_size: int,
        fingerprint: str,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        encode_images: Callable[[np.ndarray], torch.Tensor],
        encode_texts: Callable[[list[str]], torch.Tensor],
        max_len: int | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.kind = kind
        self.dim = int(dim)
        self.image_size = int(image_size)
        self.fingerprint = fingerprint
        self.batch_size = int(batch_size)
        self.device = device
        self.dtype = dtype
        self.max_len = max_len
        self.model = model
        self._encode_images = encode_images
        self._encode_texts = encode_texts

    def __repr__(self) -> str:
        return (f"Teacher(kind={self.kind!r}, dim={self.dim}, image_size={self.image_size}, "
                f"device={self.device}, dtype={self.dtype}, fingerprint={self.fingerprint[:12]}...)")

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """Embed decoded images of any fixed size (the adapter resizes to ``image_size``).

        Args:
            images: uint8 RGB array ``[N, H, W, 3]``.

        Returns:
            float32 array ``[N, dim]``, rows L2-normalised.
        """
        batch = check_images(images)
        return self._run(self._encode_images, batch, len(batch))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed captions with the teacher's own tokenizer.

        Args:
            texts: Captions.

        Returns:
            float32 array ``[N, dim]``, rows L2-normalised.
        """
        batch = check_texts(texts)
        return self._run(self._encode_texts, batch, len(batch))

    def _run(self, encode: Callable[[Any], torch.Tensor], items: Any, count: int) -> np.ndarray:
        out = np.empty((count, self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, count, self.batch_size):
                chunk = items[start : start + self.batch_size]
                emb = encode(chunk)
                if emb.ndim != 2 or emb.shape != (len(chunk), self.dim):
                    raise RuntimeError(
                        f"{self.kind} teacher returned embeddings of shape {tuple(emb.shape)}, "
                        f"expected ({len(chunk)}, {self.dim})"
                    )
                # Normalise in float32: a bfloat16 norm is only good to ~3 digits.
                out[start : start + len(chunk)] = F.normalize(emb.float(), dim=-1).cpu().numpy()
        return out


def probe_dim(
    encode_images: Callable[[np.ndarray], torch.Tensor],
    encode_texts: Callable[[list[str]], torch.Tensor],
    image_size: int,
    source: str,
) -> int:
    """Find a dual encoder's embedding size by embedding one grey image and one caption.

    Used where the size is not written in a config every such model shares (Hugging Face and
    open_clip models name it differently); it also catches towers that disagree.

    Args:
        encode_images: The adapter's image encode function.
        encode_texts: The adapter's text encode function.
        image_size: Side of the probe image.
        source: The weights' path or name, for the error message.

    Returns:
        The embedding size.

    Raises:
        TeacherLoadError: the two towers return different sizes.
    """
    with torch.inference_mode():
        image = np.full((1, image_size, image_size, 3), 128, dtype=np.uint8)
        image_dim = int(encode_images(image).shape[-1])
        text_dim = int(encode_texts(["a photo"]).shape[-1])
    if image_dim != text_dim:
        raise TeacherLoadError(
            f"{source}: image embeddings have {image_dim} dimensions but text embeddings {text_dim}; "
            "a teacher must embed both into one space"
        )
    return image_dim


def square_side(size: object, source: str) -> int:
    """An image size given as an int or an (h, w) pair, as one side; non-square sizes are refused."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise TeacherLoadError(f"{source}: only square inputs are supported, the model takes {size}")
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TeacherLoadError(f"{source}: cannot tell the model's input size from {size!r}")
    return size
