"""Row-level transforms of the Ray Data pipeline: decode images, explode image rows into caption rows.

Image-level rows (one per image) carry ``image_id``, ``path`` or ``data``, ``captions`` and ``caption_ids``.
:func:`decode_batch` turns them into fixed-size uint8 images (bad images skipped and counted, or fatal, by
policy); :func:`explode_batch` turns decoded image rows (optionally with teacher embeddings) into the
caption-level rows the student trains on. Strings never reach the Train workers (they cannot become tensors):
ids travel as stable 63-bit integers from :func:`stable_id`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from raydistill.data.images import BadImageError, decode_image, resize_center_crop
from raydistill.paths import is_remote_uri


def stable_id(text: str) -> int:
    """A stable non-negative 63-bit integer for an id string (same on every machine and process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return value.tolist()
    return list(value)


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr


def _source_of(batch: dict[str, np.ndarray], i: int) -> tuple[bytes | str | None, str]:
    """(bytes or path, name for messages) of row ``i``; missing values arrive as None or NaN."""
    datas, paths = batch.get("data"), batch.get("path")
    data = datas[i] if datas is not None else None
    data = bytes(data) if isinstance(data, (bytes, bytearray, np.bytes_)) and len(data) else None
    path = paths[i] if paths is not None else None
    path = str(path) if isinstance(path, str) and path else None
    return (data if data is not None else path), str(path or batch["image_id"][i])


def _fetch(sources: list[bytes | str | None]) -> list[bytes | str | None]:
    """Object-store images fetched concurrently (a decode task would otherwise wait on each request in
    turn); local paths and inline bytes are returned as they are."""
    from concurrent.futures import ThreadPoolExecutor

    from raydistill.data.images import open_uri

    remote = [k for k, s in enumerate(sources) if isinstance(s, str) and is_remote_uri(s)]
    if len(remote) < 2:
        return sources

    def read(uri: str) -> bytes | str:
        try:
            with open_uri(uri, "rb") as f:
                return f.read()
        except Exception:  # noqa: BLE001 - decode_image reads it again and names the failure
            return uri

    fetched = list(sources)
    with ThreadPoolExecutor(max_workers=min(16, len(remote))) as pool:
        for k, data in zip(remote, pool.map(read, [sources[k] for k in remote])):
            fetched[k] = data
    return fetched


def decode_batch(
    batch: dict[str, np.ndarray],
    sizes: dict[str, int],
    on_bad_image: str,
    max_bad_fraction: float,
    max_pixels: int,
    counters: Any = None,
    count_bad: bool = True,
) -> dict[str, np.ndarray]:
    """Decode a batch of image-level rows once, into one uint8 [n, size, size, 3] column per entry of ``sizes``.

    ``sizes`` maps an output column to its side: ``{"image": teacher size, "pixels": student size}`` in a
    teacher pass, ``{"pixels": student size}`` when only the student needs the image. Bad images (missing,
    empty, corrupt, not an image, over ``max_pixels``) are dropped and, with ``count_bad``, counted once and
    named in the counters; with ``on_bad_image == "fail"`` the first one stops the run with the file named.
    All other columns (the image bytes too, which the embedding cache stores for sources without paths) pass
    through for the rows kept.

    Raises:
        BadImageError: policy ``fail``, or more than ``max_bad_fraction`` of the images seen so far were bad.
    """
    n = len(batch["image_id"])
    keep: list[int] = []
    images: dict[str, list[np.ndarray]] = {column: [] for column in sizes}
    bad: list[tuple[str, str, str, str]] = []
    named = [_source_of(batch, i) for i in range(n)]
    sources = _fetch([source for source, _ in named])
    for i, (source, (_, name)) in enumerate(zip(sources, named)):
        try:
            if source is None:
                raise BadImageError(name, "missing", "the record has neither a path nor bytes")
            img = decode_image(source, max_pixels=max_pixels, name=name)
        except BadImageError as err:
            if on_bad_image == "fail":
                raise BadImageError(
                    err.name, err.reason, f"{err.detail} (data.on_bad_image=fail; set it to skip to drop bad images)"
                ) from None
            split = str(batch["split"][i]) if "split" in batch else ""
            bad.append((str(batch["image_id"][i]), split, err.name, err.reason))
            continue
        keep.append(i)
        for column, size in sizes.items():
            images[column].append(resize_center_crop(img, size))
    if counters is not None and count_bad:
        totals = counters.add_many({"images_decoded": len(keep)}, bad=bad)
        _check_bad_fraction(totals, max_bad_fraction)
    out = {k: v[keep] for k, v in batch.items()}
    for key in ("captions", "caption_ids"):
        # Plain lists of str convert to Arrow list<string>; numpy string arrays inside objects do not.
        out[key] = _object_array([[str(c) for c in _as_list(x)] for x in out[key]])
    for column, size in sizes.items():
        out[column] = np.stack(images[column]) if images[column] else np.zeros((0, size, size, 3), np.uint8)
    return out


def _check_bad_fraction(totals: dict[str, float], max_bad_fraction: float) -> None:
    bad, good = totals.get("bad_images", 0), totals.get("images_decoded", 0)
    seen = bad + good
    if seen >= 20 and bad > max_bad_fraction * seen:
        raise BadImageError(
            "(dataset)",
            "too_many_bad",
            f"{bad} of {seen} images could not be decoded, more than data.max_bad_fraction={max_bad_fraction}; "
            "check data.path / data.image_root, or raise the limit",
        )


def explode_batch(
    batch: dict[str, np.ndarray],
    tokenizer: Any,
    max_len: int,
    with_teacher: bool,
) -> dict[str, np.ndarray]:
    """Turn decoded image rows into caption-level training rows.

    Input: decoded image rows with ``pixels`` at the student's size (see :func:`decode_batch`). Output
    columns: ``pixels`` uint8 [m, S, S, 3], ``input_ids`` / ``attention_mask`` int64 [m, max_len],
    ``image_key`` and ``sample_key`` int64 (stable ids of image and caption), and with the teacher
    ``t_img`` / ``t_txt`` float32 [m, d]. The student-size image is repeated per caption row; it was
    decoded once.
    """
    from raydistill.models.tokenizers import encode_texts

    rows_img: list[int] = []
    captions: list[str] = []
    sample_keys: list[int] = []
    t_txt: list[np.ndarray] = []
    for i, image_id in enumerate(batch["image_id"]):
        caps = _as_list(batch["captions"][i])
        ids = _as_list(batch["caption_ids"][i])
        if len(caps) != len(ids):
            raise ValueError(f"image {image_id!r}: {len(caps)} captions but {len(ids)} caption ids")
        if with_teacher:
            emb = np.asarray(batch["t_txt"][i], dtype=np.float32).reshape(len(caps), -1)
            t_txt.extend(emb)
        rows_img.extend([i] * len(caps))
        captions.extend(str(c) for c in caps)
        sample_keys.extend(stable_id(str(c)) for c in ids)
    idx = np.asarray(rows_img, dtype=np.int64)
    input_ids, attention_mask = encode_texts(tokenizer, captions, max_len)
    out = {
        "pixels": batch["pixels"][idx] if len(idx) else batch["pixels"][:0],
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": attention_mask.astype(np.int64),
        "image_key": np.asarray([stable_id(str(batch["image_id"][i])) for i in rows_img], dtype=np.int64),
        "sample_key": np.asarray(sample_keys, dtype=np.int64),
    }
    if with_teacher:
        t_img = np.stack([np.asarray(x, np.float32) for x in batch["t_img"]]) if len(batch["t_img"]) else \
            np.zeros((0, 1), np.float32)
        d = t_img.shape[-1]
        out["t_img"] = t_img[idx].reshape(len(idx), d)
        out["t_txt"] = np.stack(t_txt).astype(np.float32) if t_txt else np.zeros((0, d), np.float32)
    return out
