"""Property tests over the readers: valid manifests round-trip, garbage only ever raises DataError.

Manifests are read by Ray Data in the pipeline; here the same row functions (``check_manifest_rows``,
``merge_image_group``) run in-process over the file as Ray would hand it to them (pandas batches, then the
rows of each image id together), so Hypothesis can try many files quickly. tests/test_source_datasets.py runs
the real Ray plan.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raydistill.data.manifest import check_manifest_head, check_manifest_rows, merge_image_group
from raydistill.data.records import DataError, clean_caption, expand_shards
from raydistill.data.sources import read_coco_captions, read_karpathy

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Captions drawn from text that is rich in whitespace of every kind, so cleaning is exercised.
caption_text = st.text(
    alphabet=st.sampled_from(list("ab Zé字 \t\n\r\u00a0\u2003.,")) | st.characters(blacklist_categories=("Cs",)),
    max_size=20,
)
image_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=10)
image_entries = st.lists(
    st.tuples(image_ids, st.lists(caption_text, min_size=1, max_size=4), st.sampled_from(["train", "val", "test"])),
    min_size=1,
    max_size=8,
    unique_by=lambda entry: entry[0],
)


def _reference_clean(text: str) -> str:
    """Naive cleaning, written differently from the reader's: regex on Unicode whitespace."""
    return re.sub(r"\s+", " ", text).strip()


def read_manifest_in_process(path: Path) -> list[dict]:
    """The manifest plan's row functions without Ray: pandas batch -> checked rows -> grouped by image id."""
    import numpy as np
    import pyarrow.json as pj

    # Arrow's readers, as ray.data.read_parquet/read_json use them (pandas.read_json would turn "0" into 0).
    frame = (pq.read_table(path) if path.suffix == ".parquet" else pj.read_json(path)).to_pandas()
    frame["path"] = str(path)
    checked = check_manifest_rows(frame, base=str(path.parent), source=str(path)).to_pylist()
    groups: dict[str, list[dict]] = {}
    for row in checked:
        groups.setdefault(row["image_id"], []).append(row)
    records = []
    for rows in groups.values():
        group = {key: np.array([r[key] for r in rows] + [None], dtype=object)[:-1] for key in rows[0]}
        records.extend(merge_image_group(group).to_pylist())
    return records


def _expected_records(entries, root: Path, folder: str = "img") -> list[dict]:
    expected = []
    for image_id, captions, split in entries:
        kept = [c for c in (_reference_clean(c) for c in captions) if c]
        if kept:
            expected.append({
                "image_id": image_id,
                "path": str(root / folder / f"{image_id}.jpg"),
                "data": None,
                "captions": kept,
                "caption_ids": [f"{image_id}#{k}" for k in range(len(kept))],
                "split": split,
            })
    return expected


@SETTINGS
@given(entries=image_entries, fmt=st.sampled_from(["jsonl", "parquet"]))
def test_valid_manifests_round_trip(entries, fmt):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        rows = [{"image": f"img/{i}.jpg", "captions": c, "split": s, "image_id": i} for i, c, s in entries]
        path = root / f"m.{fmt}"
        if fmt == "jsonl":
            path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
        else:
            pq.write_table(pa.Table.from_pylist(rows), path)
        expected = _expected_records(entries, root)
        assert read_manifest_in_process(path) == expected


@SETTINGS
@given(entries=image_entries)
def test_caption_level_manifest_groups_rows(entries):
    """One caption per row, rows of an image interleaved with others: grouped back, in row order.

    No image_id column: the id defaults to the image path without its suffix.
    """
    rows = [{"image": f"{i}.jpg", "caption": c, "split": s} for i, captions, s in entries for c in captions]
    rows = rows[::2] + rows[1::2]  # interleave images
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "m.jsonl").write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
        regrouped = {}
        for row in rows:
            regrouped.setdefault(row["image"][: -len(".jpg")], []).append(row["caption"])
        split_of = {i: s for i, _, s in entries}
        expected = _expected_records([(i, c, split_of[i]) for i, c in regrouped.items()], root, folder="")
        assert read_manifest_in_process(root / "m.jsonl") == expected


# ---------------------------------------------------------------------------------------------- garbage

SCHEMA_KEYS = ["images", "annotations", "filename", "filepath", "split", "sentences", "raw", "sentid", "cocoid",
               "id", "image_id", "file_name", "caption", "captions", "image", "image_bytes", "dataset"]
json_scalars = (st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False)
                | st.text(st.characters(), max_size=6)  # lone surrogates included: JSON can escape them
                | st.sampled_from(["train", "val", "restval", "a.jpg", "", " "]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(SCHEMA_KEYS) | st.text(max_size=4), inner, max_size=5),
    max_leaves=25,
)


def _returns_records_or_data_error(read) -> None:
    try:
        records = read()
    except DataError:
        return
    assert records and all(r["captions"] and len(r["captions"]) == len(r["caption_ids"]) for r in records)
    caption_ids = [cid for r in records for cid in r["caption_ids"]]
    assert len(caption_ids) == len(set(caption_ids))


@SETTINGS
@given(document=json_values)
def test_garbage_json_only_raises_data_error(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "g.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        _returns_records_or_data_error(lambda: read_karpathy(path, folder))
        _returns_records_or_data_error(lambda: read_coco_captions(path, folder, "val"))


@SETTINGS
@given(images=st.lists(json_values, max_size=4), annotations=st.lists(json_values, max_size=4))
def test_schema_shaped_garbage_only_raises_data_error(images, annotations):
    """Top level right, records random: exercises the per-record checks rather than the first one."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "g.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
        _returns_records_or_data_error(lambda: read_karpathy(path, folder))
        _returns_records_or_data_error(lambda: read_coco_captions(path, folder, "val"))


def _checks_or_data_error(check) -> None:
    try:
        check()
    except DataError:
        pass


@SETTINGS
@given(lines=st.lists(json_values, max_size=5))
def test_garbage_manifest_lines_only_raise_data_error(lines):
    """The check before Ray starts reads the first lines of a manifest: garbage is a DataError, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "g.jsonl"
        path.write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
        _checks_or_data_error(lambda: check_manifest_head(str(path), None))


@SETTINGS
@given(data=st.binary(max_size=64))
def test_random_bytes_only_raise_data_error(data):
    with tempfile.TemporaryDirectory() as folder:
        for name in ("g.json", "g.jsonl", "g.parquet"):
            path = Path(folder) / name
            path.write_bytes(data)
            if name == "g.json":
                _returns_records_or_data_error(lambda: read_karpathy(path, folder))
            else:
                _checks_or_data_error(lambda: check_manifest_head(str(path), None))


# ---------------------------------------------------------------------------------------------- helpers


@SETTINGS
@given(text=caption_text)
def test_clean_caption_properties(text):
    cleaned = clean_caption(text)
    assert cleaned == _reference_clean(text)
    assert clean_caption(cleaned) == cleaned
    assert cleaned.split(" ") == (text.split() or [""])


@SETTINGS
@given(low=st.integers(0, 120), span=st.integers(0, 30), width=st.integers(1, 5))
def test_brace_ranges_expand_to_every_number(low, span, width):
    high = low + span
    first, last = str(low).zfill(width), str(high).zfill(width)
    shards = expand_shards(f"s3://b/part-{{{first}..{last}}}.tar")
    pad = width if first.startswith("0") else 0
    assert shards == [f"s3://b/part-{str(n).zfill(pad)}.tar" for n in range(low, high + 1)]
