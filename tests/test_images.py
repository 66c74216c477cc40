"""Image decoding: every mode to RGB, EXIF orientation, bad files with the right reason, resizing, URIs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from real_data import COCO_TRAIN_IMAGES, GREYSCALE_JPEG, LANDSCAPE_JPEG, val_jpegs
from raydistill.data import images as images_module
from raydistill.data.images import BadImageError, decode_image, open_uri, resize_center_crop, uri_size


def _png_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width x height and no pixel data at all."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _two_colour(h: int = 16, w: int = 16) -> np.ndarray:
    array = np.zeros((h, w, 3), np.uint8)
    array[:, : w // 2] = (200, 30, 40)
    array[:, w // 2 :] = (20, 60, 210)
    return array


# ---------------------------------------------------------------------------------------------- modes


def test_rgb_png_round_trips_exactly():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    decoded = decode_image(_png_bytes(Image.fromarray(array)))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, array)


def test_cmyk_jpeg_becomes_rgb_with_the_original_colours():
    buffer = io.BytesIO()
    Image.fromarray(_two_colour()).convert("CMYK").save(buffer, format="JPEG", quality=95)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "CMYK"
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (16, 16, 3)
    # Block interiors, away from JPEG edge ringing.
    np.testing.assert_allclose(decoded[4, 3].astype(int), (200, 30, 40), atol=6)
    np.testing.assert_allclose(decoded[4, 12].astype(int), (20, 60, 210), atol=6)


def test_palette_png_maps_indices_through_the_palette():
    image = Image.new("P", (3, 2))
    palette = [0, 0, 0, 255, 0, 0, 0, 128, 0, 10, 20, 30]
    image.putpalette(palette + [0] * (768 - len(palette)))
    indices = [[1, 2, 3], [3, 0, 1]]
    image.putdata([i for row in indices for i in row])
    decoded = decode_image(_png_bytes(image))
    colours = np.array(palette, np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(decoded, colours[np.array(indices)])


def test_palette_transparency_is_composited_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    image.putdata([0, 1])
    decoded = decode_image(_png_bytes(image, transparency=0))  # index 0 (blue) is fully transparent
    np.testing.assert_array_equal(decoded[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(decoded[0, 1], (255, 0, 0))


def test_rgba_alpha_is_composited_on_white():
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128], [100, 200, 50, 51]]], np.uint8)
    decoded = decode_image(_png_bytes(Image.fromarray(rgba, "RGBA"))).astype(int)
    # out = colour * a + 255 * (1 - a), a = alpha / 255
    alpha = rgba[..., 3:].astype(float) / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    np.testing.assert_allclose(decoded, expected, atol=1)
    np.testing.assert_array_equal(decoded[0, 0], (255, 255, 255))  # transparent red is white, not black


def test_la_greyscale_with_alpha():
    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], np.uint8), "LA")
    decoded = decode_image(_png_bytes(la))
    np.testing.assert_array_equal(decoded[0, 0], (40, 40, 40))
    np.testing.assert_array_equal(decoded[0, 1], (255, 255, 255))


def test_greyscale_l_becomes_three_equal_channels():
    grey = np.array([[0, 17, 255]], np.uint8)
    decoded = decode_image(_png_bytes(Image.fromarray(grey)))
    np.testing.assert_array_equal(decoded, np.repeat(grey[..., None], 3, axis=2))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 300]], np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    decoded = decode_image(_png_bytes(image))
    # 16-bit to 8-bit: v / 257 rounded; 300 / 257 = 1.17 -> 1 (clipping would give 255).
    np.testing.assert_array_equal(decoded[0, :, 0], (0, 100, 255, 1))
    assert (decoded == decoded[..., :1]).all()


def test_real_grayscale_coco_jpeg_decodes_to_three_channels():
    path = GREYSCALE_JPEG
    with Image.open(path) as image:
        assert image.mode == "L"
        reference = np.asarray(image)
    decoded = decode_image(path)
    assert decoded.shape == (*reference.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], reference)


def test_real_rgb_jpegs_match_pillow():
    # Train images, three of them with an ICC profile (kept as stored: no colour conversion).
    for path in sorted(COCO_TRAIN_IMAGES.glob("*.jpg")) + val_jpegs(3):
        with Image.open(path) as image:
            reference = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(decode_image(path), reference)
        np.testing.assert_array_equal(decode_image(path.read_bytes()), reference)


# ---------------------------------------------------------------------------------------------- EXIF


@pytest.mark.parametrize(
    "orientation, reference",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),  # mirrored horizontally
        (3, lambda a: a[::-1, ::-1]),  # rotated 180
        (6, lambda a: np.rot90(a, k=-1)),  # stored rotated; display needs 90 degrees clockwise
        (8, lambda a: np.rot90(a, k=1)),  # display needs 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_is_applied(orientation, reference):
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(_png_bytes(Image.fromarray(stored), exif=exif))
    np.testing.assert_array_equal(decoded, reference(stored))


def test_exif_rotated_real_jpeg_comes_out_upright(tmp_path: Path):
    source = LANDSCAPE_JPEG
    with Image.open(source) as image:
        width, height = image.size
        exif = Image.Exif()
        exif[0x0112] = 6
        rotated = tmp_path / "rotated.jpg"
        image.save(rotated, format="JPEG", quality=90, exif=exif)
    assert decode_image(rotated).shape == (width, height, 3)  # rows = the stored width


# ---------------------------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(BadImageError) as info:
        decode_image(path)
    assert info.value.reason == "missing"
    assert str(path) in str(info.value)


def test_zero_byte_file(tmp_path: Path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(BadImageError) as info:
        decode_image(path)
    assert info.value.reason == "empty"
    assert "empty.jpg" in str(info.value)


def test_text_file_is_not_an_image(tmp_path: Path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is a caption, not a picture\n")
    with pytest.raises(BadImageError) as info:
        decode_image(path)
    assert info.value.reason == "not_an_image"
    assert "notes.jpg" in str(info.value)


def test_directory_is_unreadable(tmp_path: Path):
    with pytest.raises(BadImageError) as info:
        decode_image(tmp_path)
    assert info.value.reason == "unreadable"


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_real_jpeg_is_corrupt(keep: float):
    data = LANDSCAPE_JPEG.read_bytes()
    with pytest.raises(BadImageError) as info:
        decode_image(data[: int(len(data) * keep)], name="cut.jpg")
    assert info.value.reason == "corrupt"
    assert "cut.jpg" in str(info.value)


def test_png_with_damaged_pixel_data_is_corrupt():
    data = bytearray(_png_bytes(Image.fromarray(_two_colour())))
    position = data.index(b"IDAT") + 10
    data[position] ^= 0xFF
    with pytest.raises(BadImageError) as info:
        decode_image(bytes(data))
    assert info.value.reason == "corrupt"


def test_bomb_is_refused_from_the_header_before_decoding():
    # The file has no pixel data: decoding it would fail as "corrupt", so "too_large" proves the size
    # check happened first.
    header_only = _png_header_only(2000, 2000)
    with pytest.raises(BadImageError) as info:
        decode_image(header_only, max_pixels=1_000_000, name="bomb.png")
    assert info.value.reason == "too_large"
    assert "2000x2000" in str(info.value) and "bomb.png" in str(info.value)
    with pytest.raises(BadImageError) as info:
        decode_image(header_only, max_pixels=4_000_000)  # exactly at the limit: allowed, then fails to decode
    assert info.value.reason == "corrupt"


def test_max_pixels_above_pillows_own_limit_is_the_limit(monkeypatch: pytest.MonkeyPatch):
    # 20000 x 10000 = 200 M pixels: above twice Pillow's default limit (2 x 89,478,485), where Pillow itself
    # refuses to open an image. With data.max_pixels raised above it, the header passes the size check and the
    # (absent) pixel data is what fails.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    header_only = _png_header_only(20000, 10000)
    with pytest.raises(BadImageError) as info:
        decode_image(header_only, max_pixels=250_000_000, name="panorama.png")
    assert info.value.reason == "corrupt"
    with pytest.raises(BadImageError) as info:
        decode_image(header_only, max_pixels=150_000_000, name="panorama.png")
    assert info.value.reason == "too_large" and "exceeds max_pixels=150000000" in str(info.value)


def test_huge_bomb_is_too_large_with_default_limit():
    with pytest.raises(BadImageError) as info:
        decode_image(_png_header_only(20000, 20000))
    assert info.value.reason == "too_large"


# ---------------------------------------------------------------------------------------------- resizing


def test_resize_center_crop_without_resize_is_the_centre_slice():
    image = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)
    np.testing.assert_array_equal(resize_center_crop(image, 4), image[:, 2:6])
    tall = np.arange(9 * 3 * 3, dtype=np.uint8).reshape(9, 3, 3)
    np.testing.assert_array_equal(resize_center_crop(tall, 3), tall[3:6])


def test_resize_center_crop_keeps_the_middle_band():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, :50] = (255, 0, 0)
    image[:, 50:150] = (0, 255, 0)
    image[:, 150:] = (0, 0, 255)
    out = resize_center_crop(image, 50)  # 50 x 100, crop columns 25..75 = the green band
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out[:, 3:-3].astype(int), np.broadcast_to((0, 255, 0), (50, 44, 3)), atol=2)


def test_resize_center_crop_antialiases_when_shrinking():
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    out = resize_center_crop(np.repeat(checker[..., None], 3, axis=2), 16)
    # Point sampling would return pure 0 or 255; an antialiased shrink averages to mid grey.
    assert np.abs(out.astype(int) - 127.5).max() <= 12


def test_resize_center_crop_extreme_aspect_and_upscale():
    assert resize_center_crop(np.zeros((1, 100, 3), np.uint8), 8).shape == (8, 8, 3)
    flat = np.full((3, 5, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize_center_crop(flat, 20), np.full((20, 20, 3), 77, np.uint8))


@pytest.mark.parametrize(
    "image, size",
    [
        (np.zeros((4, 4, 3), np.float32), 2),
        (np.zeros((4, 4), np.uint8), 2),
        (np.zeros((4, 4, 4), np.uint8), 2),
        (np.zeros((4, 4, 3), np.uint8), 0),
        (np.zeros((4, 4, 3), np.uint8), 2.5),
        (np.zeros((0, 4, 3), np.uint8), 2),
    ],
)
def test_resize_center_crop_rejects_bad_input(image, size):
    with pytest.raises(ValueError):
        resize_center_crop(image, size)


# ---------------------------------------------------------------------------------------------- URIs


def test_open_uri_local_path_and_file_uri(tmp_path: Path):
    path = tmp_path / "a b.bin"
    with open_uri(path, "wb") as f:
        f.write(b"hello")
    with open_uri(str(path)) as f:
        assert f.read() == b"hello"
    with open_uri(path.as_uri()) as f:  # file:///.../a%20b.bin
        assert f.read() == b"hello"
    assert uri_size(path.as_uri()) == 5


def test_decode_image_reads_file_uris(tmp_path: Path):
    array = _two_colour(4, 6)
    path = tmp_path / "x.png"
    path.write_bytes(_png_bytes(Image.fromarray(array)))
    np.testing.assert_array_equal(decode_image(path.as_uri()), array)


def test_open_uri_rejects_bad_modes_and_remote_file_uris(tmp_path: Path):
    with pytest.raises(ValueError, match="'rb' or 'wb'"):
        open_uri(tmp_path / "x", "r")
    with pytest.raises(ValueError, match="otherhost"):
        open_uri("file://otherhost/data/x.jpg")


def test_object_store_uris_go_through_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An s3:// URI is opened with the pyarrow filesystem from_uri returns (a local one stands in here)."""
    from pyarrow import fs as pafs

    calls = []

    def fake_object_store(uri: str):
        calls.append(uri)
        assert uri.startswith("s3://bucket/")
        return pafs.LocalFileSystem(), str(tmp_path / uri[len("s3://bucket/") :])

    monkeypatch.setattr(images_module, "_object_store", fake_object_store)
    array = _two_colour(4, 6)
    with open_uri("s3://bucket/img.png", "wb") as f:
        f.write(_png_bytes(Image.fromarray(array)))
    assert (tmp_path / "img.png").is_file()
    np.testing.assert_array_equal(decode_image("s3://bucket/img.png"), array)
    assert uri_size("s3://bucket/img.png") == (tmp_path / "img.png").stat().st_size
    with pytest.raises(BadImageError) as info:
        decode_image("s3://bucket/missing.png")
    assert info.value.reason == "missing" and "s3://bucket/missing.png" in str(info.value)
    assert calls and all(c.startswith("s3://bucket/") for c in calls)
