"""Robust image decoding: any file or URI in, an RGB uint8 array out, or a `BadImageError` saying why not.

Every image the pipeline touches goes through `decode_image`, so the rules live here once:

- local paths, ``file://`` URIs and object-store URIs (``s3://``, ``gs://``, ``hdfs://`` ... whatever
  `pyarrow.fs.FileSystem.from_uri` understands) are read with `open_uri`;
- the decompression-bomb limit is checked against the size in the header, before any pixel is decoded;
- EXIF orientation is applied, so a phone photo stored sideways comes out upright;
- every mode becomes RGB: alpha is composited on white (transparent pixels must not turn black), 16-bit
  and 32-bit integer greys are scaled down to 8 bits instead of being clipped;
- anything that goes wrong is a `BadImageError` whose ``reason`` is a short code the pipeline counts.

`resize_center_crop` is the one geometric transform the readers need (shorter side to ``size``, centre crop).
"""

from __future__ import annotations

import io
import os
from typing import IO, Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from raydistill.errors import UserError
from raydistill.paths import is_uri

#: Pillow's own default bomb limit (about 89.5 megapixels, a 9459 x 9459 image); used as our default too.
DEFAULT_MAX_PIXELS = 89_478_485

#: The short codes `BadImageError.reason` takes.
BAD_IMAGE_REASONS = ("missing", "empty", "unreadable", "not_an_image", "too_large", "corrupt")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImageError(UserError, ValueError):
    """An image that cannot be decoded; ``reason`` is one of `BAD_IMAGE_REASONS`, ``name`` the file."""

    def __init__(self, name: str, reason: str, detail: str) -> None:
        self.name = name
        self.reason = reason
        self.detail = detail
        super().__init__(f"bad image {name}: {detail} (reason: {reason})")


def _local_path(uri: str | os.PathLike) -> str | None:
    """The local filesystem path of ``uri``, or None if it names an object store."""
    text = os.fspath(uri)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith("file://"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {text!r} names host {parsed.netloc!r}; only local file:// URIs are allowed")
        return url2pathname(unquote(parsed.path))
    if is_uri(text):
        return None
    return text


def open_uri(uri: str | os.PathLike, mode: str = "rb") -> IO[bytes]:
    """Open a local path, a ``file://`` URI or an object-store URI as a binary file.

    Args:
        uri: ``/data/x.jpg``, ``file:///data/x.jpg``, ``s3://bucket/x.jpg``, ``gs://...`` and any other
            scheme `pyarrow.fs.FileSystem.from_uri` supports (credentials come from the environment, as
            pyarrow reads them).
        mode: ``"rb"`` or ``"wb"``; text modes are not offered because every caller wants bytes.

    Returns:
        A binary file object; use it as a context manager. Object-store streams are read sequentially
        (not seekable), which is all `tarfile` streaming and whole-file reads need.

    Raises:
        ValueError: for a mode other than ``"rb"``/``"wb"`` or a ``file://`` URI naming a remote host.
        FileNotFoundError: when the object does not exist.
    """
    if mode not in ("rb", "wb"):
        raise ValueError(f"open_uri mode must be 'rb' or 'wb', got {mode!r}")
    local = _local_path(uri)
    if local is not None:
        return open(local, mode)
    filesystem, path = _object_store(os.fspath(uri))
    if mode == "rb":
        _object_info(filesystem, path, uri)  # raises FileNotFoundError, as open() does for local files
        return filesystem.open_input_stream(path)
    return filesystem.open_output_stream(path)


def uri_size(uri: str | os.PathLike) -> int:
    """Size in bytes of a local file or an object-store object; FileNotFoundError if it does not exist."""
    local = _local_path(uri)
    if local is not None:
        return os.stat(local).st_size
    filesystem, path = _object_store(os.fspath(uri))
    return _object_info(filesystem, path, uri).size


def _object_store(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and in-store path for an object-store URI (tests replace this)."""
    from pyarrow import fs as pafs  # imported lazily: only object-store URIs need it

    return pafs.FileSystem.from_uri(uri)


def _object_info(filesystem: Any, path: str, uri: str | os.PathLike) -> Any:
    """The pyarrow FileInfo of ``path``, which must be a file."""
    from pyarrow import fs as pafs

    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such object: {os.fspath(uri)}")
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(f"not a file: {os.fspath(uri)}")
    return info


def _read_source(source: bytes | str | os.PathLike, name: str) -> bytes:
    """The raw bytes of ``source`` (bytes pass through), mapping I/O failures to `BadImageError`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        with open_uri(source, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise BadImageError(name, "missing", "file not found") from exc
    except IsADirectoryError as exc:
        raise BadImageError(name, "unreadable", "is a directory, not a file") from exc
    except (OSError, ValueError) as exc:  # ValueError: a malformed URI
        raise BadImageError(name, "unreadable", f"cannot read: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB without losing what the pixels mean."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's convert() clips 16-bit values at 255 (a 16-bit photo would come out almost white);
        # scale the full 0..65535 range down instead. "I" is how some formats hand over 16-bit greys.
        grey = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        # Float images are taken to hold intensities in [0, 1], the common convention for float TIFFs.
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(
    source: bytes | str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """Decode an image file, URI or encoded bytes into an upright RGB array.

    Args:
        source: encoded bytes, a local path, or a URI (see `open_uri`).
        max_pixels: largest width x height accepted; checked from the header before decoding. When it is
            above Pillow's own limit (``Image.MAX_IMAGE_PIXELS``), that limit is raised to it in this
            process, so that ``data.max_pixels`` is the one limit a user sets.
        name: what to call the image in errors (defaults to the path, or ``"<bytes>"``).

    Returns:
        ``uint8`` array of shape ``[H, W, 3]`` (after EXIF rotation).

    Raises:
        BadImageError: with ``reason`` "missing", "unreadable", "empty", "not_an_image", "too_large" or
            "corrupt" (truncated or undecodable pixel data).
    """
    if name is None:
        name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fsdecode(os.fspath(source))
    data = _read_source(source, name)
    if not data:
        raise BadImageError(name, "empty", "zero bytes")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow refuses images above twice its global limit in Image.open, before the header check below
        # could apply the limit the user asked for.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise BadImageError(name, "not_an_image", "not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise BadImageError(name, "too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(name, "corrupt", f"header cannot be parsed: {exc}") from exc
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(
                name, "too_large", f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
            )
        if width <= 0 or height <= 0:
            raise BadImageError(name, "corrupt", f"header claims size {width}x{height}")
        # Truncated files must fail loudly, not come back half grey.
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; decode_image needs it False")
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise BadImageError(name, "too_large", str(exc)) from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadImageError(name, "corrupt", f"pixel data cannot be decoded: {exc}") from exc
        try:
            upright = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, KeyError, TypeError):
            # A broken EXIF block should not cost an image whose pixels decoded; keep it as stored.
            upright = image
        rgb = _to_rgb(upright)
        array = np.array(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:  # defensive: every branch of _to_rgb yields RGB
        raise BadImageError(name, "corrupt", f"decoded to unexpected shape {array.shape}")
    return array


def resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic, antialiased when shrinking), then centre-crop a square.

    Args:
        img: ``uint8`` array ``[H, W, 3]``.
        size: output side length in pixels (>= 1).

    Returns:
        ``uint8`` array ``[size, size, 3]``.
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        described = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"resize_center_crop needs a uint8 [H, W, 3] array, got {described}")
    height, width = img.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"resize_center_crop got an empty image of shape {img.shape}")
    scale = size / min(height, width)
    # max(size, ...) guards against rounding the shorter side below `size` for extreme aspect ratios.
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        # Pillow's BICUBIC widens its kernel by the shrink factor, which is what antialiasing means here.
        resized = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.Resampling.BICUBIC))
    else:
        resized = img
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])
