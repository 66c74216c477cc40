"""The teacher-embedding cache: Parquet part files keyed by image id, with a fingerprinted manifest.

Layout of a cache folder (local path or object-store URI)::

    manifest.json            schema version, fingerprint (and its parts), dimension, completed splits
    parts/part-<uuid>.parquet one file per teacher batch: image-level rows

Each row: ``image_id``, ``split``, ``path``, ``data`` (image bytes when the source had no path),
``captions``, ``caption_ids``, ``t_img`` (d floats) and ``t_txt`` (n_captions x d floats, flattened).
Parts are written under a temporary name and renamed, so a killed writer leaves no half file. A teacher
actor retried after dying may write a batch twice; :meth:`EmbeddingCache.finalize` removes such duplicates,
so a completed split holds every image and caption exactly once.

A cache is used only when its fingerprint (teacher identity and weights hash, teacher preprocessing,
dataset identity, schema version) equals the run's; otherwise the run stops and says which part differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMA_VERSION = 1


class CacheError(ValueError):
    """The cache cannot be used as asked (stale, incomplete, corrupt); the message says why and what to do."""


def _fs_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri and not uri.startswith("file://"):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def file_digest(path: str | os.PathLike, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes (or of a folder's files), memoised by (path, size, mtime)."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(file_digest(f, memo_dir).encode())
        return h.hexdigest()
    st = p.stat()
    memo_dir = memo_dir or Path(os.environ.get("RAYDISTILL_HOME", Path.home() / ".cache" / "raydistill"))
    key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / "digests" / key
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{uuid.uuid4().hex}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:  # a read-only home only costs a re-hash next time
        pass
    return digest


def make_fingerprint(teacher: dict[str, Any], preprocessing: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The parts a cache's identity is made of; compare with :func:`describe_mismatch`."""
    parts = {
        "schema_version": SCHEMA_VERSION,
        "teacher": teacher,
        "preprocessing": preprocessing,
        "dataset": dataset,
    }
    parts["hash"] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return parts


def describe_mismatch(have: dict[str, Any], want: dict[str, Any]) -> str:
    """Which fingerprint parts differ, for the error message."""
    diffs = [k for k in ("schema_version", "teacher", "preprocessing", "dataset") if have.get(k) != want.get(k)]
    details = []
    for k in diffs:
        details.append(f"{k}: cache has {json.dumps(have.get(k), default=str)[:200]}, "
                       f"this run has {json.dumps(want.get(k), default=str)[:200]}")
    return "; ".join(details) or "unknown difference"


def _row_table(rows: dict[str, Any], dim: int) -> pa.Table:
    n = len(rows["image_id"])
    t_img = np.asarray(rows["t_img"], dtype=np.float32).reshape(n, dim)
    t_txt = [np.asarray(x, dtype=np.float32).reshape(-1) for x in rows["t_txt"]]
    datas = rows.get("data")
    return pa.table(
        {
            "image_id": pa.array([str(x) for x in rows["image_id"]], pa.string()),
            "split": pa.array([str(x) for x in rows["split"]], pa.string()),
            "path": pa.array([None if x is None else str(x) for x in rows.get("path", [None] * n)], pa.string()),
            "data": pa.array([None if datas is None or x is None else bytes(x) for x in (datas if datas is not None else [None] * n)], pa.binary()),
            "captions": pa.array([[str(c) for c in x] for x in rows["captions"]], pa.list_(pa.string())),
            "caption_ids": pa.array([[str(c) for c in x] for x in rows["caption_ids"]], pa.list_(pa.string())),
            "t_img": pa.FixedSizeListArray.from_arrays(pa.array(t_img.reshape(-1), pa.float32()), dim),
            "t_txt": pa.array(t_txt, pa.list_(pa.float32())),
        }
    )


class EmbeddingCache:
    """A teacher-embedding cache folder (see the module docstring).

    Args:
        uri: local folder or object-store URI.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = _fs_and_path(uri)

    # ----------------------------------------------------------------------------------- manifest
    @property
    def _manifest_path(self) -> str:
        return f"{self.root}/manifest.json"

    @property
    def _parts_dir(self) -> str:
        return f"{self.root}/parts"

    def manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when the folder holds no cache yet."""
        info = self.fs.get_file_info(self._manifest_path)
        if info.type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self._manifest_path) as f:
            try:
                return json.loads(f.read().decode("utf-8"))
            except ValueError as err:
                raise CacheError(f"{self.uri}/manifest.json is corrupt ({err}); delete the cache folder") from None

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        self._atomic_write(self._manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def _atomic_write(self, path: str, payload: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(payload)
        self.fs.move(tmp, path)

    def open(self, fingerprint: dict[str, Any], dim: int) -> None:
        """Create the cache, or check that an existing one has this fingerprint.

        Raises:
            CacheError: the cache was made by another teacher, preprocessing, dataset or schema.
        """
        self.fs.create_dir(self._parts_dir, recursive=True)
        have = self.manifest()
        if have is None:
            self._write_manifest(
                {"fingerprint": fingerprint, "dim": dim, "complete_splits": {}, "created": time.time()}
            )
            return
        self.check(fingerprint)

    def check(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        """Return the manifest if it matches ``fingerprint``; raise :class:`CacheError` otherwise."""
        have = self.manifest()
        if have is None:
            raise CacheError(f"no embedding cache at {self.uri}: fill it with `raydistill embed <config>` first")
        if have["fingerprint"].get("hash") != fingerprint.get("hash"):
            raise CacheError(
                f"the embedding cache at {self.uri} is stale and will not be used: "
                f"{describe_mismatch(have['fingerprint'], fingerprint)}. "
                "Point cache.dir at a new folder, or delete this one to rebuild it."
            )
        return have

    def complete_splits(self) -> dict[str, Any]:
        """Splits finalised as complete, with their image and caption counts."""
        return (self.manifest() or {}).get("complete_splits", {})

    # ----------------------------------------------------------------------------------- parts
    def part_files(self) -> list[str]:
        """Completed part files, sorted (temporary files of killed writers are ignored)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._parts_dir, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def write_part(self, rows: dict[str, Any], dim: int) -> str | None:
        """Write image-level rows with their embeddings as one new part file (atomically)."""
        if len(rows["image_id"]) == 0:
            return None
        table = _row_table(rows, dim)
        path = f"{self._parts_dir}/part-{uuid.uuid4().hex}.parquet"
        tmp = f"{path}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(table, f)
        self.fs.move(tmp, path)
        return path

    def read_ids(self, files: Iterable[str] | None = None) -> dict[str, list[str]]:
        """image ids per part file (only the id column is read)."""
        out = {}
        for path in files if files is not None else self.part_files():
            with self.fs.open_input_file(path) as f:
                out[path] = pq.read_table(f, columns=["image_id"]).column(0).to_pylist()
        return out

    def done_ids(self, split: str | None = None) -> set[str]:
        """Image ids already embedded (of one split, or all)."""
        done: set[str] = set()
        for path in self.part_files():
            with self.fs.open_input_file(path) as f:
                t = pq.read_table(f, columns=["image_id", "split"])
            ids = t.column("image_id").to_pylist()
            if split is None:
                done.update(ids)
            else:
                done.update(i for i, s in zip(ids, t.column("split").to_pylist()) if s == split)
        return done

    def read_split(self, split: str) -> pa.Table:
        """Every cached row of one split, read in this process (for small splits: no Ray tasks).

        Finalised splits hold each image once; rows of the split are returned in part-file order.
        """
        tables = []
        for path in self.part_files():
            with self.fs.open_input_file(path) as f:
                t = pq.read_table(f)
            tables.append(t.filter(pc.equal(t.column("split"), split)))
        if not tables:
            return _row_table({"image_id": [], "split": [], "captions": [], "caption_ids": [], "t_img": [],
                               "t_txt": []}, 1)
        return pa.concat_tables(tables, promote_options="default")

    def load_embeddings(self, image_ids: set[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """image_id -> (t_img [d], t_txt [n_captions, d]) for the given ids (all when None)."""
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for path in self.part_files():
            with self.fs.open_input_file(path) as f:
                t = pq.read_table(f, columns=["image_id", "t_img", "t_txt"])
            ids = t.column("image_id").to_pylist()
            t_img = t.column("t_img").combine_chunks()
            dim = t_img.type.list_size
            img = t_img.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            txt = t.column("t_txt").to_pylist()
            for k, image_id in enumerate(ids):
                if image_id in out or (image_ids is not None and image_id not in image_ids):
                    continue
                out[image_id] = (img[k], np.asarray(txt[k], np.float32).reshape(-1, dim))
        return out

    def finalize(self, split: str, expected_ids: set[str], expected_captions: int | None = None) -> dict[str, int]:
        """Remove duplicate rows, verify the split is complete, and mark it complete in the manifest.

        Returns:
            ``{"images": n, "captions": m, "duplicates_removed": k}`` for the split.

        Raises:
            CacheError: images of the split are missing from the cache.
        """
        seen: set[str] = set()
        removed = 0
        for path, ids in self.read_ids().items():
            dup = [i for i, x in enumerate(ids) if x in seen]
            seen.update(ids)
            if not dup:
                continue
            with self.fs.open_input_file(path) as f:
                table = pq.read_table(f)
            keep = np.setdiff1d(np.arange(len(ids)), np.asarray(dup))
            removed += len(dup)
            if len(keep) == 0:
                self.fs.delete_file(path)
                continue
            tmp = f"{path}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                pq.write_table(table.take(pa.array(keep)), f)
            self.fs.move(tmp, path)
        present = self.done_ids(split)
        missing = expected_ids - present
        if missing:
            raise CacheError(
                f"embedding cache {self.uri}: split {split!r} misses {len(missing)} of {len(expected_ids)} images "
                f"(e.g. {sorted(missing)[:3]}); run `raydistill embed` again to fill it"
            )
        n_captions = 0
        for path in self.part_files():
            with self.fs.open_input_file(path) as f:
                t = pq.read_table(f, columns=["image_id", "split", "caption_ids"])
            for image_id, s, caps in zip(*(t.column(c).to_pylist() for c in ("image_id", "split", "caption_ids"))):
                if s == split and image_id in expected_ids:
                    n_captions += len(caps)
        if expected_captions is not None and n_captions != expected_captions:
            raise CacheError(
                f"embedding cache {self.uri}: split {split!r} holds {n_captions} captions, expected {expected_captions}"
            )
        manifest = self.manifest() or {}
        manifest.setdefault("complete_splits", {})[split] = {"images": len(expected_ids), "captions": n_captions}
        self._write_manifest(manifest)
        return {"images": len(expected_ids), "captions": n_captions, "duplicates_removed": removed}

    def require_complete(self, fingerprint: dict[str, Any], splits: Iterable[str]) -> dict[str, Any]:
        """For cache mode: the cache must match and hold every split completely.

        Raises:
            CacheError: saying which split is missing and the command that fills it.
        """
        manifest = self.check(fingerprint)
        missing = [s for s in splits if s not in manifest.get("complete_splits", {})]
        if missing:
            raise CacheError(
                f"cache.mode=cache needs a complete cache, but {self.uri} has not completed split(s) {missing}; "
                "run `raydistill embed <config>` first (it resumes a partial cache)"
            )
        return manifest

    def part_paths_for_reading(self) -> list[str]:
        """Part files as paths Ray Data's readers accept (URIs kept as given)."""
        if "://" in self.uri and not self.uri.startswith("file://"):
            scheme = self.uri.split("://", 1)[0]
            return [f"{scheme}://{p}" for p in self.part_files()]
        return self.part_files()


def rows_from_cache_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Reshape a Ray Data batch read from cache parts back into image rows with [n, d] embeddings."""
    n = len(batch["image_id"])
    t_img = np.stack([np.asarray(x, np.float32) for x in batch["t_img"]]) if n else np.zeros((0, 1), np.float32)
    dim = t_img.shape[-1]
    t_txt = np.empty(n, dtype=object)
    for i in range(n):
        t_txt[i] = np.asarray(batch["t_txt"][i], np.float32).reshape(-1, dim)
    out = dict(batch)
    out["t_img"] = t_img
    out["t_txt"] = t_txt
    return out
