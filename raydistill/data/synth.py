"""The embedded default dataset: captioned scenes of coloured shapes, written in the Karpathy format.

Each image holds 1-3 shapes (circle, square, triangle, cross, star) in one of 8 colours and 2 sizes on a
plain grey background. Neighbouring shapes stand in a clear spatial relation (left of, right of, above,
below), and each image gets several paraphrased captions built from templates, e.g.

    "a large red circle left of a small blue square"
    "there is a tiny blue box to the right of a big red disc"

Captions name every shape fully (size, colour, shape), and no two shapes in one image share all three,
so retrieving the right image needs colour, shape, size and relation right. A lone shape stands well
inside one of nine regions of the image (top left, top, ..., centre, ..., bottom right) and its captions
say which, e.g. "a small red circle in the top left corner": without it the 80 possible lone shapes
would give many images the same captions, and a retrieval benchmark would count those as misses. The geometry behind each
image is stored in its record under ``"scene"`` (readers ignore it), which lets tests check that the
pixels agree with the words.

`generate_scenes` writes ``dataset_synth.json`` + ``images/`` deterministically (same seed, same bytes)
and atomically (built in a temporary folder, then renamed into place). `ensure_synth_dataset` keeps one
copy per parameter set under a root folder and reuses it; `raydistill data synth` and `raydistill demo`
use it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

#: Bump when the generator's output changes, so cached datasets from older code are not reused.
GENERATOR_VERSION = 2
JSON_NAME = "dataset_synth.json"
COMPLETE_MARKER = "COMPLETE"
#: Datasets with at least this many images report progress on stderr.
PROGRESS_MIN_IMAGES = 1000

#: Colour names and their RGB values; far apart from each other and from the grey backgrounds.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((128, 128, 128), (100, 100, 100), (165, 165, 165))
SHAPES = ("circle", "square", "triangle", "cross", "star")
#: Shape radius (half the bounding box side) as a fraction of the image side.
SIZE_RADIUS = {"small": 0.09, "large": 0.16}

#: Paraphrase vocabulary. Relations read "subject RELATION object".
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
    "star": ("star",),
}
RELATION_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
#: Where a lone shape stands: the image is cut in thirds both ways; (row, column) -> region name.
REGIONS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right",
           (1, 0): "left", (1, 1): "centre", (1, 2): "right",
           (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
REGION_WORDS = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "near the top edge", "in the upper middle"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("at the left edge", "on the left side", "in the middle of the left side"),
    "centre": ("in the centre", "in the middle", "at the centre"),
    "right": ("at the right edge", "on the right side", "in the middle of the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "near the bottom edge", "in the lower middle"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
#: A lone shape's centre keeps this fraction of a third away from its region's borders, so the region is clear.
REGION_MARGIN = 0.15

_SINGLE_TEMPLATES = ("{a} {where}", "a picture of {a} {where}", "there is {a} {where} on a plain background",
                     "{a} on its own {where}", "an image with {a} {where}")
_PAIR_TEMPLATES = ("{s} {rel} {o}", "{s} is {rel} {o}", "there is {s} {rel} {o}", "a picture of {s} {rel} {o}",
                   "{s} sits {rel} {o}")
_TRIPLE_TEMPLATES = ("{c1} and {c2}", "{c1}, and {c2}", "{c1}; {c2}", "there is {c1}, and {c2}")
_TOKEN_SPLIT = re.compile(r"[^a-z0-9]+")
_PLACEMENT_TRIES = 400


def _radius(size: str, image_size: int) -> int:
    return max(3, round(SIZE_RADIUS[size] * image_size))


def relation_between(a: dict, b: dict) -> str | None:
    """The clear spatial relation of shape ``a`` to shape ``b`` ("left of", ...), or None if unclear.

    Clear means the shapes' boxes are apart along one axis by a margin and the offset along that axis is
    at least twice the offset along the other (so "left of" is not really "below").
    """
    (ax, ay), (bx, by) = a["center"], b["center"]
    dx, dy = bx - ax, by - ay
    gap = a["radius"] + b["radius"] + 2
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= gap:
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= gap:
        return "above" if dy > 0 else "below"  # image rows grow downwards
    return None


def region_of(center: list[int] | tuple[int, int], image_size: int) -> str:
    """The region name (a key of `REGION_WORDS`) of the third, both ways, that holds ``center`` (x, y)."""
    x, y = center
    return REGIONS[(min(2, 3 * y // image_size), min(2, 3 * x // image_size))]


def _place_alone(shape: dict, rng: np.random.Generator, image_size: int) -> None:
    """Put a lone shape's centre well inside a random region (and 1 px from the border) and record the region."""
    r = shape["radius"]
    third = image_size / 3
    spans = []
    for cell in range(3):  # the allowed centre coordinates in each third, along one axis
        low = max(r + 1, math.ceil(third * (cell + REGION_MARGIN)))
        high = min(image_size - r - 2, math.floor(third * (cell + 1 - REGION_MARGIN)) - 1)
        spans.append((low, high))
    # Rows and columns where a centre fits (large shapes on small images may not reach every third).
    cells = [k for k, (low, high) in enumerate(spans) if low <= high]
    row, column = (cells[rng.integers(len(cells))] for _ in range(2))
    shape["center"] = [int(rng.integers(spans[column][0], spans[column][1] + 1)),
                       int(rng.integers(spans[row][0], spans[row][1] + 1))]
    shape["region"] = region_of(shape["center"], image_size)


def _apart(a: dict, b: dict) -> bool:
    """Boxes separated by at least 2 pixels along some axis, so shapes never touch."""
    (ax, ay), (bx, by) = a["center"], b["center"]
    gap = a["radius"] + b["radius"] + 2
    return abs(bx - ax) >= gap or abs(by - ay) >= gap


def _sample_scene(rng: np.random.Generator, image_size: int) -> dict:
    """Shapes, positions and the relations between consecutive shapes of one image."""
    n_shapes = int(rng.integers(1, 4))
    kinds: list[tuple[str, str, str]] = []
    while len(kinds) < n_shapes:
        kind = (SHAPES[rng.integers(len(SHAPES))], list(PALETTE)[rng.integers(len(PALETTE))],
                ("small", "large")[rng.integers(2)])
        if kind not in kinds:  # identical descriptions would make captions ambiguous
            kinds.append(kind)
    while True:
        shapes = [{"shape": s, "color": c, "size": z, "radius": _radius(z, image_size)} for s, c, z in kinds]
        if len(shapes) == 1:
            _place_alone(shapes[0], rng, image_size)
            return {"background": list(BACKGROUNDS[rng.integers(len(BACKGROUNDS))]), "shapes": shapes,
                    "relations": []}
        for _ in range(_PLACEMENT_TRIES):
            for shape in shapes:
                r = shape["radius"]
                shape["center"] = [int(rng.integers(r + 1, image_size - r - 1)) for _ in range(2)]
            pairs_apart = all(_apart(a, b) for k, a in enumerate(shapes) for b in shapes[k + 1:])
            relations = [relation_between(shapes[k], shapes[k + 1]) for k in range(len(shapes) - 1)]
            if pairs_apart and None not in relations:
                return {
                    "background": list(BACKGROUNDS[rng.integers(len(BACKGROUNDS))]),
                    "shapes": shapes,
                    "relations": [{"subject": k, "relation": rel, "object": k + 1} for k, rel in enumerate(relations)],
                }
        kinds = kinds[:-1]  # this many shapes did not fit (large shapes, small image): try one fewer


def _noun_phrase(shape: dict, article: str, rng: np.random.Generator) -> str:
    size_words, shape_words = SIZE_WORDS[shape["size"]], SHAPE_WORDS[shape["shape"]]
    return (f"{article} {size_words[rng.integers(len(size_words))]} {shape['color']} "
            f"{shape_words[rng.integers(len(shape_words))]}")


def _clause(scene: dict, relation: dict, articles: dict[int, str], rng: np.random.Generator) -> tuple[str, str, str]:
    """(subject phrase, relation words, object phrase), randomly said from either side."""
    subject, obj, rel = relation["subject"], relation["object"], relation["relation"]
    if rng.integers(2):
        subject, obj, rel = obj, subject, INVERSE_RELATION[rel]
    words = RELATION_WORDS[rel]
    shapes = scene["shapes"]
    return (_noun_phrase(shapes[subject], articles[subject], rng), words[rng.integers(len(words))],
            _noun_phrase(shapes[obj], articles[obj], rng))


def _caption(scene: dict, rng: np.random.Generator) -> str:
    shapes, relations = scene["shapes"], scene["relations"]
    if len(shapes) == 1:
        template = _SINGLE_TEMPLATES[rng.integers(len(_SINGLE_TEMPLATES))]
        where = REGION_WORDS[shapes[0]["region"]]
        return template.format(a=_noun_phrase(shapes[0], "a", rng), where=where[rng.integers(len(where))])
    if len(shapes) == 2:
        s, rel, o = _clause(scene, relations[0], {0: "a", 1: "a"}, rng)
        return _PAIR_TEMPLATES[rng.integers(len(_PAIR_TEMPLATES))].format(s=s, rel=rel, o=o)
    # Three shapes: the middle one is named in both clauses, with "the" the second time.
    first = _clause(scene, relations[0], {0: "a", 1: "a"}, rng)
    second = _clause(scene, relations[1], {1: "the", 2: "a"}, rng)
    template = _TRIPLE_TEMPLATES[rng.integers(len(_TRIPLE_TEMPLATES))]
    c1 = " ".join(first)
    c2 = " ".join(second) if rng.integers(2) else f"{second[0]} is {second[1]} {second[2]}"
    return template.format(c1=c1, c2=c2)


def _captions(scene: dict, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct captions (fewer only if the templates cannot make that many)."""
    captions: list[str] = []
    for _ in range(count * 20):
        caption = _caption(scene, rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                break
    return captions


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def render_scene(scene: dict, image_size: int) -> Image.Image:
    """Draw a scene (as stored in a record's ``"scene"``) into an RGB image."""
    image = Image.new("RGB", (image_size, image_size), tuple(scene["background"]))
    draw = ImageDraw.Draw(image)
    for shape in scene["shapes"]:
        (cx, cy), r, fill = shape["center"], shape["radius"], PALETTE[shape["color"]]
        if shape["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif shape["shape"] == "cross":
            arm = max(1, round(0.35 * r))
            draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)
            draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
        elif shape["shape"] == "star":
            draw.polygon(_star_points(cx, cy, r), fill=fill)
        else:
            raise ValueError(f"unknown shape {shape['shape']!r}; allowed: {SHAPES}")
    return image


def tokenize(raw: str) -> list[str]:
    """Karpathy-style tokens: lower-cased runs of letters and digits."""
    return [token for token in _TOKEN_SPLIT.split(raw.lower()) if token]


def shared_caption_fraction(document: dict, split: str = "train") -> float:
    """The fraction of ``split``'s captions whose exact text also captions another image (of any split).

    Retrieval counts such a caption's other image as a miss although nothing tells the two apart, so this
    bounds every model's recall; ``document`` is a loaded ``dataset_synth.json`` (or any Karpathy document).
    """
    owners: dict[str, set[int]] = {}
    for image in document["images"]:
        for sentence in image["sentences"]:
            owners.setdefault(sentence["raw"], set()).add(image["imgid"])
    in_split = [sentence["raw"] for image in document["images"] if image["split"] == split
                for sentence in image["sentences"]]
    if not in_split:
        raise ValueError(f"no captions in split {split!r}")
    return sum(len(owners[raw]) > 1 for raw in in_split) / len(in_split)


def _validate(n_images: Any, image_size: Any, captions_per_image: Any, split_fractions: Any, jpeg_quality: Any,
              seed: Any) -> None:
    def is_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not is_int(n_images) or n_images < 1:
        raise ValueError(f"n_images must be an int >= 1, got {n_images!r}")
    if not is_int(image_size) or not 32 <= image_size <= 4096:
        raise ValueError(f"image_size must be an int in [32, 4096] (shapes need room), got {image_size!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if (not isinstance(captions_per_image, (tuple, list)) or len(captions_per_image) != 2
            or not all(is_int(c) for c in captions_per_image)
            or not 1 <= captions_per_image[0] <= captions_per_image[1] <= 10):
        raise ValueError(f"captions_per_image must be (min, max) ints with 1 <= min <= max <= 10, "
                         f"got {captions_per_image!r}")
    if (not isinstance(split_fractions, (tuple, list)) or len(split_fractions) != 3
            or any(not isinstance(f, (int, float)) or isinstance(f, bool) or f < 0 for f in split_fractions)
            or abs(sum(split_fractions) - 1.0) > 1e-6):
        raise ValueError(f"split_fractions must be (train, val, test) non-negative numbers summing to 1, "
                         f"got {split_fractions!r}")
    if not is_int(jpeg_quality) or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be an int in [1, 100], got {jpeg_quality!r}")


def _split_names(n_images: int, split_fractions: tuple[float, float, float], seed: int) -> list[str]:
    n_val = round(n_images * split_fractions[1])
    n_test = min(round(n_images * split_fractions[2]), n_images - n_val)
    names = ["train"] * (n_images - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    order = np.random.default_rng([seed, 1]).permutation(n_images)
    return [names[k] for k in np.argsort(order)]


def _write_dataset(folder: Path, params: dict) -> None:
    """Write images, the JSON and the COMPLETE marker into ``folder`` (a fresh temporary folder)."""
    n_images, image_size, seed = params["n_images"], params["image_size"], params["seed"]
    low, high = params["captions_per_image"]
    splits = _split_names(n_images, tuple(params["split_fractions"]), seed)
    (folder / "images").mkdir()
    report_every = max(1, math.ceil(n_images / 4)) if n_images >= PROGRESS_MIN_IMAGES else 0
    records, sentid = [], 0
    for index in range(n_images):
        rng = np.random.default_rng([seed, 2, index])  # one stream per image: order-independent, reproducible
        scene = _sample_scene(rng, image_size)
        captions = _captions(scene, int(rng.integers(low, high + 1)), rng)
        filename = f"synth_{index:06d}.jpg"
        # 4:4:4 chroma keeps the small shapes' colours exact enough to check at their centres.
        render_scene(scene, image_size).save(folder / "images" / filename, format="JPEG",
                                             quality=params["jpeg_quality"], subsampling=0)
        sentences = [{"raw": raw, "tokens": tokenize(raw), "sentid": sentid + k, "imgid": index}
                     for k, raw in enumerate(captions)]
        records.append({"filename": filename, "imgid": index, "split": splits[index], "sentences": sentences,
                        "sentids": [s["sentid"] for s in sentences], "scene": scene})
        sentid += len(sentences)
        if report_every and ((index + 1) % report_every == 0 or index + 1 == n_images):
            print(f"synth: {index + 1}/{n_images} images", file=sys.stderr, flush=True)
    document = {"dataset": "synth", "generator_version": GENERATOR_VERSION, "params": params, "images": records}
    (folder / JSON_NAME).write_text(json.dumps(document, separators=(",", ":")) + "\n", encoding="utf-8")
    (folder / COMPLETE_MARKER).write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target``; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / COMPLETE_MARKER).is_file():
            raise
        # Same parameters, same bytes: the copy already in place is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)


def _generate(out_dir: Path, params: dict) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published dataset should be readable as usual
        _write_dataset(tmp, params)
        _publish(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / JSON_NAME


def _params(n_images: int, image_size: int, captions_per_image: tuple[int, int], seed: int,
            split_fractions: tuple[float, float, float], jpeg_quality: int) -> dict:
    _validate(n_images, image_size, captions_per_image, split_fractions, jpeg_quality, seed)
    return {
        "n_images": int(n_images),
        "image_size": int(image_size),
        "captions_per_image": [int(c) for c in captions_per_image],
        "seed": int(seed),
        "split_fractions": [float(f) for f in split_fractions],
        "jpeg_quality": int(jpeg_quality),
    }


def generate_scenes(
    out_dir: str | os.PathLike,
    n_images: int = 1500,
    image_size: int = 64,
    captions_per_image: tuple[int, int] = (3, 5),
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    jpeg_quality: int = 95,
) -> Path:
    """Generate the captioned-scenes dataset into ``out_dir`` (which must not exist, or be empty).

    Args:
        out_dir: destination folder; gets ``dataset_synth.json``, ``images/`` and a ``COMPLETE`` marker.
        n_images: number of images.
        image_size: image side in pixels (32-4096).
        captions_per_image: (min, max) captions per image, inclusive.
        seed: the same seed gives byte-identical JSON and images.
        split_fractions: (train, val, test) fractions; images are assigned to splits at random.
        jpeg_quality: JPEG quality of the images.

    Returns:
        Path to ``dataset_synth.json`` (Karpathy format; read it with `read_karpathy(json, out_dir/"images")`).

    Raises:
        ValueError: a parameter is out of range.
        FileExistsError: ``out_dir`` exists and is not empty.
    """
    params = _params(n_images, image_size, captions_per_image, seed, split_fractions, jpeg_quality)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder; pick a new folder "
                              "(ensure_synth_dataset reuses finished datasets)")
    return _generate(out_dir, params)


def params_hash(**params: Any) -> str:
    """The folder name `ensure_synth_dataset` uses for these parameters (defaults filled in)."""
    signature = inspect.signature(generate_scenes)
    allowed = [name for name in signature.parameters if name != "out_dir"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown synth parameter(s) {unknown}; allowed: {allowed}")
    full = {name: params.get(name, signature.parameters[name].default) for name in allowed}
    canonical = json.dumps({"version": GENERATOR_VERSION, "params": _params(**full)}, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def ensure_synth_dataset(root: str | os.PathLike, **params: Any) -> Path:
    """Return ``root/<params hash>/dataset_synth.json``, generating it first unless it is already complete.

    Two processes may call this at once: both build privately, the first rename wins and the other copy is
    discarded. A folder without the ``COMPLETE`` marker (left by something other than this function) is
    replaced.

    Args:
        root: folder holding one sub-folder per parameter set.
        **params: any of `generate_scenes`' parameters except ``out_dir``.

    Returns:
        Path to the dataset's ``dataset_synth.json``; images are in its sibling ``images/`` folder.
    """
    target = Path(root) / params_hash(**params)
    if (target / COMPLETE_MARKER).is_file():
        return target / JSON_NAME
    signature = inspect.signature(generate_scenes)
    full = {name: params.get(name, p.default) for name, p in signature.parameters.items() if name != "out_dir"}
    if target.exists() and not (target / COMPLETE_MARKER).is_file():
        # Not ours (we only ever rename complete folders into place): move it aside, then delete it.
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        try:
            os.rename(target, stale / "old")
        except FileNotFoundError:
            pass  # another process moved it already
        shutil.rmtree(stale, ignore_errors=True)
    return _generate(target, _params(**full))


__all__ = [
    "BACKGROUNDS",
    "PALETTE",
    "REGIONS",
    "REGION_WORDS",
    "RELATION_WORDS",
    "SHAPES",
    "SHAPE_WORDS",
    "SIZE_WORDS",
    "ensure_synth_dataset",
    "generate_scenes",
    "params_hash",
    "region_of",
    "relation_between",
    "render_scene",
    "shared_caption_fraction",
    "tokenize",
]
