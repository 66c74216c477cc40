"""The teacher-embedding cache: Parquet parts keyed by image id, one folder per split, and a keyed manifest.

Layout of a cache folder (local path or object-store URI)::

    manifest.json                         schema version, key (and its parts), teacher fingerprint, dimension,
                                          completed splits with their counts
    parts/<split>/part-<ids hash>.parquet  one file per teacher batch and split: image-level rows

Each row: ``image_id``, ``split``, ``path``, ``data`` (image bytes when the source had no path), ``captions``,
``caption_ids``, ``t_img`` (d floats) and ``t_txt`` (n_captions x d floats, flattened). A part is written under
a temporary name and renamed, so a killed writer leaves no half file; its name is a hash of its image ids, so
a batch that Ray retries after an actor died overwrites its own part instead of adding a copy.

No process reads the whole cache: splits are read by Ray Data (:meth:`EmbeddingCache.split_dataset`), and
:meth:`EmbeddingCache.finalize` checks a split in one Ray pass that keeps per-batch counts only.

A cache is used only when its key (teacher identity, teacher preprocessing, dataset identity, schema version)
equals the run's; otherwise the run stops and says which part differs. The key is made from the teacher's
spec (kind, checkpoint, tokenizer, architecture, dtype), so a cache-mode run never loads the teacher; a run
that loads it also checks the weights' fingerprint recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydistill.errors import UserError
from raydistill.paths import is_remote_uri

SCHEMA_VERSION = 2
KEY_PARTS = ("schema_version", "teacher", "preprocessing", "dataset")
#: Ray Data 2.60's largest read task of a Parquet dataset, in bytes of row groups.
BIN_PACKING_ENV = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"


class CacheError(UserError, ValueError):
    """The cache cannot be used as asked (stale, incomplete, corrupt); the message says why and what to do."""


def _fs_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    from pathlib import Path

    if is_remote_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def make_key(teacher: dict[str, Any], preprocessing: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The parts a cache's identity is made of, and their hash (compare two with :func:`describe_mismatch`)."""
    parts = {"schema_version": SCHEMA_VERSION, "teacher": teacher, "preprocessing": preprocessing, "dataset": dataset}
    parts["hash"] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return parts


def describe_mismatch(have: dict[str, Any], want: dict[str, Any]) -> str:
    """Which key parts differ, for the error message."""
    details = [f"{k}: cache has {json.dumps(have.get(k), default=str)[:200]}, "
               f"this run has {json.dumps(want.get(k), default=str)[:200]}"
               for k in KEY_PARTS if have.get(k) != want.get(k)]
    return "; ".join(details) or "unknown difference"


def id_hash(image_ids: Any) -> int:
    """Sum (mod 2**64) of a 64-bit hash of each id: equal for two id multisets exactly when they match
    (up to hash collisions), whatever their order; computed per batch and added up."""
    total = 0
    for image_id in image_ids:
        total += int.from_bytes(hashlib.blake2b(str(image_id).encode(), digest_size=8).digest(), "little")
    return total % 2**64


def _part_table(rows: dict[str, Any], dim: int) -> pa.Table:
    n = len(rows["image_id"])
    t_img = np.asarray(rows["t_img"], dtype=np.float32).reshape(n, dim)
    datas = rows.get("data")
    return pa.table({
        "image_id": pa.array([str(x) for x in rows["image_id"]], pa.string()),
        "split": pa.array([str(x) for x in rows["split"]], pa.string()),
        "path": pa.array([x if isinstance(x, str) and x else None for x in rows.get("path", [None] * n)], pa.string()),
        "data": pa.array([bytes(x) if isinstance(x, (bytes, bytearray)) and len(x) else None
                          for x in (datas if datas is not None else [None] * n)], pa.binary()),
        "captions": pa.array([[str(c) for c in x] for x in rows["captions"]], pa.list_(pa.string())),
        "caption_ids": pa.array([[str(c) for c in x] for x in rows["caption_ids"]], pa.list_(pa.string())),
        "t_img": pa.FixedSizeListArray.from_arrays(pa.array(t_img.reshape(-1), pa.float32()), dim),
        "t_txt": pa.array([np.asarray(x, dtype=np.float32).reshape(-1) for x in rows["t_txt"]], pa.list_(pa.float32())),
    })


def _count_part_batch(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return pa.table({"rows": [batch.num_rows],
                     "captions": [int(pc.sum(pc.list_value_length(batch.column("caption_ids"))).as_py() or 0)],
                     "id_hash": [str(id_hash(batch.column("image_id").to_pylist()))]})


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

    def _split_dir(self, split: str) -> str:
        return f"{self.root}/parts/{split}"

    def manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when the folder holds no cache yet."""
        if self.fs.get_file_info(self._manifest_path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(self._manifest_path) as f:
            try:
                manifest = json.loads(f.read().decode("utf-8"))
            except ValueError as err:
                raise CacheError(f"{self.uri}/manifest.json is corrupt ({err}); delete the cache folder") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(
                f"the embedding cache at {self.uri} was written by an earlier raydistill (schema "
                f"{manifest.get('schema_version', manifest.get('fingerprint', {}).get('schema_version'))}, this one "
                f"reads {SCHEMA_VERSION}); delete the folder (or point cache.dir at a new one) and run "
                "`raydistill embed <config>` to rebuild it"
            )
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = f"{self._manifest_path}.tmp-{time.time_ns()}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
        self.fs.move(tmp, self._manifest_path)

    def open(self, key: dict[str, Any], dim: int, teacher_fingerprint: str) -> None:
        """Create the cache, or check that an existing one has this key and teacher fingerprint.

        Raises:
            CacheError: the cache was made by another teacher, preprocessing, dataset or schema.
        """
        self.fs.create_dir(f"{self.root}/parts", recursive=True)
        have = self.manifest()
        if have is None:
            self._write_manifest({"schema_version": SCHEMA_VERSION, "key": key, "dim": dim,
                                  "teacher_fingerprint": teacher_fingerprint, "complete_splits": {},
                                  "created": time.time()})
            return
        self.check(key)
        if have.get("teacher_fingerprint") != teacher_fingerprint:
            raise CacheError(
                f"the embedding cache at {self.uri} is stale and will not be used: the teacher's weights differ "
                f"from those it was made with (fingerprint {str(have.get('teacher_fingerprint'))[:12]}..., now "
                f"{teacher_fingerprint[:12]}...). Point cache.dir at a new folder, or delete this one to rebuild it."
            )

    def check(self, key: dict[str, Any]) -> dict[str, Any]:
        """Return the manifest if its key matches ``key``; raise :class:`CacheError` otherwise."""
        have = self.manifest()
        if have is None:
            raise CacheError(f"no embedding cache at {self.uri}: fill it with `raydistill embed <config>` first")
        if have["key"].get("hash") != key.get("hash"):
            raise CacheError(
                f"the embedding cache at {self.uri} is stale and will not be used: "
                f"{describe_mismatch(have['key'], key)}. Point cache.dir at a new folder, or delete this one to "
                "rebuild it."
            )
        return have

    def dim(self) -> int:
        """The teacher's embedding dimension, as recorded when the cache was created."""
        return int((self.manifest() or {})["dim"])

    def complete_splits(self) -> dict[str, Any]:
        """Splits finalised as complete, with their image and caption counts."""
        return (self.manifest() or {}).get("complete_splits", {})

    def require_complete(self, key: dict[str, Any], splits: list[str]) -> dict[str, Any]:
        """For cache mode: the cache must match and hold every split completely.

        Raises:
            CacheError: saying which split is missing and the command that fills it.
        """
        manifest = self.check(key)
        missing = [s for s in dict.fromkeys(splits) if s not in manifest.get("complete_splits", {})]
        if missing:
            raise CacheError(
                f"cache.mode=cache needs a complete cache, but {self.uri} has not completed split(s) {missing}; "
                "run `raydistill embed <config>` first (it resumes a partial cache)"
            )
        return manifest

    # ----------------------------------------------------------------------------------- parts
    def part_files(self, split: str) -> list[str]:
        """Completed part files of one split, sorted (temporary files of killed writers are ignored)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._split_dir(split), allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def _uris(self, paths: list[str]) -> list[str]:
        """Paths as Ray Data's readers accept them (the object store's scheme kept)."""
        if is_remote_uri(self.uri):
            scheme = self.uri.split("://", 1)[0]
            return [f"{scheme}://{p}" for p in paths]
        return paths

    def has_rows(self, split: str) -> bool:
        """Whether any image of ``split`` is cached (a listing, no read)."""
        return bool(self.part_files(split))

    def write_part(self, rows: dict[str, Any], dim: int) -> list[str]:
        """Write image-level rows with their embeddings, one part per split, atomically."""
        written = []
        splits = np.asarray([str(s) for s in rows["split"]], dtype=object)
        for split in dict.fromkeys(splits):
            idx = np.flatnonzero(splits == split)
            part = {k: [v[i] for i in idx] if v is not None else None for k, v in rows.items()}
            if not len(idx):
                continue
            table = _part_table(part, dim)
            name = hashlib.sha256("\n".join(sorted(table.column("image_id").to_pylist())).encode()).hexdigest()[:32]
            self.fs.create_dir(self._split_dir(split), recursive=True)
            path = f"{self._split_dir(split)}/part-{name}.parquet"
            tmp = f"{path}.tmp-{time.time_ns()}"
            with self.fs.open_output_stream(tmp) as f:
                pq.write_table(table, f)
            self.fs.move(tmp, path)
            written.append(path)
        return written

    def split_dataset(self, split: str, columns: list[str] | None = None, part_per_task: bool = True) -> Any:
        """One split's cached rows as a Ray dataset read in tasks (``t_txt`` flattened: n_captions x d).

        ``part_per_task``: a task reads one part, a teacher batch of rows and a block the decode stage can take
        whole. Read in tasks of many parts, the light rows (ids, captions, embeddings) had to be cut into
        decoding-sized blocks by one more stage, and waited there for decoding, as many as the pipeline's
        budget allowed: a quarter of a million-image epoch, none of a small one. A part per task reads no
        further ahead than decoding asks. False (rows sorted before decoding, which regroups them anyway): tasks
        as Ray Data packs them, fewer for the sort to exchange.
        """
        import ray.data

        files = self._uris(self.part_files(split))
        if not files:
            raise CacheError(f"embedding cache {self.uri} holds no rows of split {split!r}")
        # Ray Data packs a Parquet read's row groups into read tasks of up to this many bytes, read when the plan
        # is built; a part is one row group, and a bin of one byte holds one. The process's setting comes back after.
        with mock.patch.dict(os.environ, {BIN_PACKING_ENV: "1"} if part_per_task else {}):
            ds = ray.data.read_parquet(files)
        return ds.select_columns(columns) if columns is not None else ds

    def ids_dataset(self, split: str) -> Any | None:
        """The cached ``split`` and ``image_id`` of ``split``'s rows as a Ray dataset (for an anti-join), or None
        when there are none."""
        import ray.data

        files = self._uris(self.part_files(split))
        return ray.data.read_parquet(files).select_columns(["split", "image_id"]) if files else None

    def count(self, split: str) -> dict[str, int]:
        """Rows, captions and the id hash (:func:`id_hash`) of one split's parts, in one Ray pass."""
        import ray.data

        totals = {"rows": 0, "captions": 0, "id_hash": 0}
        files = self._uris(self.part_files(split))
        if not files:
            return totals
        ds = ray.data.read_parquet(files).select_columns(["image_id", "caption_ids"])
        for row in ds.map_batches(_count_part_batch, batch_format="pyarrow", batch_size=None).iter_rows():
            totals["rows"] += int(row["rows"])
            totals["captions"] += int(row["captions"])
            totals["id_hash"] = (totals["id_hash"] + int(row["id_hash"])) % 2**64
        return totals

    def finalize(self, split: str, expected_images: int, expected_id_hash: int,
                 delivered: dict[str, int] | None = None) -> dict[str, int]:
        """Check that the split holds exactly the expected images once each, and mark it complete.

        ``expected_id_hash`` is :func:`id_hash` over the image ids the split must hold (the source's, less the
        bad images the decoder skipped). Rows an interrupted pass wrote twice (the same image in two parts)
        are removed first. ``delivered``: the ``images``, ``captions`` and ``id_hash`` that one pass into an
        empty split wrote; when they match, the parts are not read back.

        Returns:
            ``{"images": n, "captions": m, "duplicates_removed": k}``.

        Raises:
            CacheError: images are missing (or foreign), with what to run.
        """
        matches = delivered is not None and delivered["images"] == expected_images and \
            delivered["id_hash"] % 2**64 == expected_id_hash % 2**64
        counts = {"rows": delivered["images"], "captions": delivered["captions"], "id_hash": delivered["id_hash"] % 2**64} \
            if matches else self.count(split)
        removed = 0
        if counts["rows"] > expected_images:
            removed = self._remove_duplicates(split)
            counts = self.count(split)
        if counts["rows"] != expected_images or counts["id_hash"] != expected_id_hash % 2**64:
            raise CacheError(
                f"embedding cache {self.uri}: split {split!r} holds {counts['rows']} images but the data has "
                f"{expected_images} (or other ones); run `raydistill embed <config>` again to complete it"
            )
        manifest = self.manifest() or {}
        manifest.setdefault("complete_splits", {})[split] = {"images": counts["rows"], "captions": counts["captions"]}
        self._write_manifest(manifest)
        return {"images": counts["rows"], "captions": counts["captions"], "duplicates_removed": removed}

    def _remove_duplicates(self, split: str) -> int:
        """Rewrite the parts that hold an image another part already holds (rare: an interrupted pass)."""
        import ray.data
        from ray.data.expressions import col

        files = self._uris(self.part_files(split))
        rows = ray.data.read_parquet(files, include_paths=True).select_columns(["image_id", "path"])
        duplicated = rows.groupby("image_id", num_partitions=16).count().filter(expr=col("count()") > 1)
        dup_ids = sorted(row["image_id"] for row in duplicated.iter_rows())  # few: an interrupted pass
        holders = {row["path"] for row in rows.filter(expr=col("image_id").is_in(dup_ids)).iter_rows()}
        by_name = {p.rsplit("/", 1)[-1]: p for p in self.part_files(split)}
        seen: set[str] = set()
        removed = 0
        for name in sorted(h.rsplit("/", 1)[-1] for h in holders):
            path = by_name[name]
            with self.fs.open_input_file(path) as f:
                table = pq.read_table(f)
            ids_here = table.column("image_id").to_pylist()
            keep = []
            for k, image_id in enumerate(ids_here):
                if image_id in seen:
                    removed += 1
                    continue
                seen.add(image_id)
                keep.append(k)
            if len(keep) == len(ids_here):
                continue
            if not keep:
                self.fs.delete_file(path)
                continue
            tmp = f"{path}.tmp-{time.time_ns()}"
            with self.fs.open_output_stream(tmp) as f:
                pq.write_table(table.take(pa.array(keep)), f)
            self.fs.move(tmp, path)
        return removed
