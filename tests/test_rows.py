"""Row transforms: decode with the bad-image policy, explode image rows into caption rows keyed by id."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydistill.data.images import BadImageError
from raydistill.models.tokenizers import build_wordpiece_tokenizer
from raydistill.pipeline.rows import decode_batch, explode_batch, stable_id


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _batch(tmp_path: Path) -> dict[str, np.ndarray]:
    good = tmp_path / "good.png"
    good.write_bytes(_jpeg((255, 0, 0)))
    (tmp_path / "empty.jpg").write_bytes(b"")
    return {
        "image_id": np.array(["good", "bytes", "empty", "missing"], dtype=object),
        "path": np.array([str(good), None, str(tmp_path / "empty.jpg"), str(tmp_path / "nope.jpg")], dtype=object),
        "data": np.array([None, _jpeg((0, 0, 255)), None, None], dtype=object),
        "captions": np.array([["a red box"], ["a blue box", "blue"], ["x"], ["y"]], dtype=object),
        "caption_ids": np.array([["g0"], ["b0", "b1"], ["e0"], ["m0"]], dtype=object),
        "split": np.array(["train"] * 4, dtype=object),
    }


class FakeCounters:
    """The counters actor's bookkeeping, in process (tests/test_counters_... run the real actor)."""

    def __init__(self) -> None:
        from raydistill.pipeline.counters import _CountersActor

        self.actor = _CountersActor.__ray_actor_class__()

    def add_many(self, values: dict, bad: list | None = None) -> dict:
        return self.actor.add_many(values, bad)


def test_decode_once_to_each_size_skipping_bad_images(tmp_path: Path) -> None:
    counters = FakeCounters()
    out = decode_batch(_batch(tmp_path), sizes={"image": 8, "pixels": 4}, on_bad_image="skip", max_bad_fraction=1.0,
                       max_pixels=10**6, counters=counters)
    assert list(out["image_id"]) == ["good", "bytes"]
    assert out["image"].shape == (2, 8, 8, 3) and out["image"].dtype == np.uint8
    assert out["pixels"].shape == (2, 4, 4, 3)
    assert tuple(out["image"][0, 4, 4]) == (255, 0, 0) and tuple(out["pixels"][1, 2, 2]) == (0, 0, 255)
    assert list(out["captions"][1]) == ["a blue box", "blue"] and out["data"][1] is not None  # passed through
    totals = counters.actor.get()
    assert (totals["images_decoded"], totals["bad_images"]) == (2, 2)
    assert (totals["bad_images/empty"], totals["bad_images/missing"]) == (1, 1)
    # The same bad files again (the next epoch of a run without a cache): counted once.
    decode_batch(_batch(tmp_path), sizes={"pixels": 4}, on_bad_image="skip", max_bad_fraction=1.0,
                 max_pixels=10**6, counters=counters)
    assert counters.actor.get()["bad_images"] == 2
    assert sorted(counters.actor.get_bad_files()) == [(str(tmp_path / "empty.jpg"), "empty"),
                                                      (str(tmp_path / "nope.jpg"), "missing")]
    bad = counters.actor.get_bad_in_split("train")
    from raydistill.pipeline.cache import id_hash

    assert bad == {"images": 2, "id_hash": id_hash(["empty", "missing"])}


def test_decode_fail_policy_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match=r"empty\.jpg.*on_bad_image=fail"):
        decode_batch(_batch(tmp_path), sizes={"image": 8}, on_bad_image="fail", max_bad_fraction=1.0,
                     max_pixels=10**6)


def test_too_many_bad_images_stops_with_the_limit_named(tmp_path: Path) -> None:
    batch = {k: np.concatenate([v] * 6) for k, v in _batch(tmp_path).items()}
    batch["image_id"] = np.array([f"{i}-{k}" for k in range(6) for i in _batch(tmp_path)["image_id"]], dtype=object)
    with pytest.raises(BadImageError, match=r"12 of 24 images could not be decoded, more than "
                                            r"data\.max_bad_fraction=0\.05"):
        decode_batch(batch, sizes={"pixels": 4}, on_bad_image="skip", max_bad_fraction=0.05, max_pixels=10**6,
                     counters=FakeCounters())


def test_stable_id_is_stable_and_non_negative() -> None:
    assert stable_id("abc") == stable_id("abc") != stable_id("abd")
    assert 0 <= stable_id("x") < 2**63
    # Pinned: the same id must map to the same integer on every machine and Python version.
    assert stable_id("image-1") == int.from_bytes(__import__("hashlib").blake2b(b"image-1", digest_size=8).digest(), "little") >> 1


def test_explode_makes_one_row_per_caption_with_its_teacher_embedding() -> None:
    tok = build_wordpiece_tokenizer(["a red box", "a blue box", "blue"], vocab_size=60)
    t_txt = np.empty(2, dtype=object)
    t_txt[0] = np.full((1, 3), 1.0, np.float32)
    t_txt[1] = np.array([[2, 2, 2], [3, 3, 3]], np.float32)
    batch = {
        "image_id": np.array(["good", "bytes"], dtype=object),
        "captions": np.array([["a red box"], ["a blue box", "blue"]], dtype=object),
        "caption_ids": np.array([["g0"], ["b0", "b1"]], dtype=object),
        "pixels": np.stack([np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)]),
        "t_img": np.array([[9, 9, 9], [8, 8, 8]], np.float32),
        "t_txt": t_txt,
    }
    out = explode_batch(batch, tok, max_len=6, with_teacher=True)
    assert out["pixels"].shape == (3, 4, 4, 3)
    assert [int(p.max()) for p in out["pixels"]] == [0, 1, 1]
    assert out["input_ids"].shape == (3, 6) and out["attention_mask"].dtype == np.int64
    assert list(out["image_key"]) == [stable_id("good"), stable_id("bytes"), stable_id("bytes")]
    assert list(out["sample_key"]) == [stable_id("g0"), stable_id("b0"), stable_id("b1")]
    np.testing.assert_array_equal(out["t_img"][:, 0], [9, 8, 8])
    np.testing.assert_array_equal(out["t_txt"][:, 0], [1, 2, 3])
    assert all(v.dtype != object for v in out.values())
