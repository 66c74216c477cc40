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


def decode_batch(
    batch: dict[str, np.ndarray],
    size: int,
    on_bad_image: str,
    max_bad_fraction: float,
    max_pixels: int,
    counters: Any = None,
) -> dict[str, np.ndarray]:
    """Decode a batch of image-level rows into ``image`` uint8 [n, size, size, 3].

    Bad images (missing, empty, corrupt, not an image, over ``max_pixels``) are dropped and counted when
    ``on_bad_image == "skip"``; with ``"fail"`` the first one stops the run with the file named. All other
    columns (the image bytes too, which the embedding cache stores for sources without paths) pass through
    for the rows kept.

    Raises:
        BadImageError: policy ``fail``, or more than ``max_bad_fraction`` of the images seen so far were bad.
    """
    n = len(batch["image_id"])
    keep: list[int] = []
    images: list[np.ndarray] = []
    bad: dict[str, int] = {}
    paths = batch.get("path")
    datas = batch.get("data")
    for i in range(n):
        # Missing values arrive as None or NaN depending on how Ray typed the column.
        data = datas[i] if datas is not None else None
        data = bytes(data) if isinstance(data, (bytes, bytearray, np.bytes_)) and len(data) else None
        path = paths[i] if paths is not None else None
        path = str(path) if isinstance(path, str) and path else None
        source = data if data is not None else path
        name = str(path or batch["image_id"][i])
        try:
            if source is None:
                raise BadImageError(name, "missing", "the record has neither a path nor bytes")
            img = decode_image(source, max_pixels=max_pixels, name=name)
        except BadImageError as err:
            if on_bad_image == "fail":
                raise BadImageError(
                    err.name, err.reason, f"{err.detail} (data.on_bad_image=fail; set it to skip to drop bad images)"
                ) from None
            bad[err.reason] = bad.get(err.reason, 0) + 1
            continue
        keep.append(i)
        images.append(resize_center_crop(img, size))
    if counters is not None:
        n_captions = sum(len(_as_list(batch["captions"][i])) for i in keep)
        totals = counters.add_many(
            {"images_decoded": len(keep), "captions_decoded": n_captions, "bad_images": sum(bad.values()),
             **{f"bad_images/{k}": v for k, v in bad.items()}}
        )
        _check_bad_fraction(totals, max_bad_fraction)
    out = {k: v[keep] for k, v in batch.items()}
    for key in ("captions", "caption_ids"):
        # Plain lists of str convert to Arrow list<string>; numpy string arrays inside objects do not.
        out[key] = _object_array([[str(c) for c in _as_list(x)] for x in out[key]])
    out["image"] = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return out


def _check_bad_fraction(totals: Any, max_bad_fraction: float) -> None:
    import ray

    if isinstance(totals, ray.ObjectRef):
        totals = ray.get(totals)
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

    Output columns: ``pixels`` uint8 [m, S, S, 3], ``input_ids`` / ``attention_mask`` int64 [m, max_len],
    ``image_key`` and ``sample_key`` int64 (stable ids of image and caption), and with the teacher
    ``t_img`` / ``t_txt`` float32 [m, d]. The image is stored once per caption row here; it was decoded once.
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
        "pixels": batch["image"][idx] if len(idx) else batch["image"][:0],
        "input_ids": input_ids.astype(np.int64),
        "attention_mask": attention_mask.astype(np.int64),
        "image_key": np.asarray([stable_id(str(batch["image_id"][i])) for i in rows_img], dtype=np.int64),
        "sample_key": np.asarray(sample_keys, dtype=np.int64),
    }
    if with_teacher:
        d = np.asarray(batch["t_img"]).shape[-1]
        out["t_img"] = np.asarray(batch["t_img"], dtype=np.float32)[idx].reshape(len(idx), d)
        out["t_txt"] = np.stack(t_txt).astype(np.float32) if t_txt else np.zeros((0, d), np.float32)
    return out
