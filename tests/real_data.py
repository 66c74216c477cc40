"""The real files committed under ``tests/data`` (see ``tests/data/SOURCES.md``) and fixtures built from them.

Tests read only the repository: a user's fresh clone has nothing beside it. The COCO images are CC BY 2.0
photos from COCO 2017 with their COCO captions (CC BY 4.0); the vocabulary is BERT's uncased WordPiece
vocabulary (Apache-2.0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
COCO = DATA / "coco"
COCO_VAL_IMAGES = COCO / "val2017"
COCO_TRAIN_IMAGES = COCO / "train2017"
COCO_VAL_CAPTIONS = COCO / "annotations" / "captions_val2017.json"
COCO_TRAIN_CAPTIONS = COCO / "annotations" / "captions_train2017.json"
#: Records of the official captions_val2017.json (caption text only, no image files): the committed val
#: images, every image with 6 or 7 captions, and the two other captions with an embedded newline.
COCO_VAL_CAPTIONS_EXCERPT = COCO / "annotations" / "captions_val2017_excerpt.json"
BERT_VOCAB = DATA / "bert-base-uncased" / "vocab.txt"
GREYSCALE_JPEG = COCO_VAL_IMAGES / "000000431848.jpg"
#: A landscape (640 x 427) real photo, used where one real JPEG is enough.
LANDSCAPE_JPEG = COCO_VAL_IMAGES / "000000397133.jpg"
#: A portrait (480 x 640) real photo.
PORTRAIT_JPEG = COCO_VAL_IMAGES / "000000183709.jpg"


def val_jpegs(count: int | None = None) -> list[Path]:
    """The committed COCO val2017 JPEGs, sorted by name (the first ``count``)."""
    return sorted(COCO_VAL_IMAGES.glob("*.jpg"))[:count]


def coco_captions(count: int) -> list[str]:
    """The first ``count`` distinct caption texts (stripped) of the val excerpt, in annotation order."""
    annotations = json.loads(COCO_VAL_CAPTIONS_EXCERPT.read_text(encoding="utf-8"))["annotations"]
    captions = list(dict.fromkeys(a["caption"].strip() for a in annotations))
    if len(captions) < count:
        raise ValueError(f"the excerpt holds {len(captions)} captions, fewer than {count}")
    return captions[:count]


def coco_image_batch(count: int, height: int, width: int) -> np.ndarray:
    """``count`` real photos resized to ``height`` x ``width``: uint8 [count, height, width, 3]."""
    from PIL import Image

    files = val_jpegs(count)
    if len(files) < count:
        raise ValueError(f"tests/data holds {len(files)} val images, fewer than {count}")
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((width, height))) for f in files])


def write_karpathy_from_coco(path: Path) -> Path:
    """A Karpathy split file (``dataset_coco.json`` layout) of the committed COCO images and captions.

    The layout of Karpathy's file for COCO: ``filepath`` (the image folder), ``filename``, ``cocoid``,
    ``imgid``, ``sentids`` and ``sentences`` with ``raw`` (as written, stray spaces and newlines kept),
    ``tokens`` and ``sentid``. Splits: the train images are ``train`` and one ``restval``; the val images
    alternate ``val`` and ``test`` in file order.
    """
    images, sentid = [], 0
    for folder, captions_file in (("train2017", COCO_TRAIN_CAPTIONS), ("val2017", COCO_VAL_CAPTIONS)):
        doc = json.loads(captions_file.read_text(encoding="utf-8"))
        by_image: dict[int, list[str]] = {}
        for annotation in doc["annotations"]:
            by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
        for k, image in enumerate(doc["images"]):
            if folder == "train2017":
                split = "restval" if k == 0 else "train"
            else:
                split = "val" if k % 2 == 0 else "test"
            sentences = []
            for raw in by_image[image["id"]]:
                sentences.append({"raw": raw, "tokens": raw.lower().replace(".", " ").split(),
                                  "imgid": len(images), "sentid": sentid})
                sentid += 1
            images.append({"filepath": folder, "filename": image["file_name"], "imgid": len(images),
                           "split": split, "cocoid": image["id"], "sentids": [s["sentid"] for s in sentences],
                           "sentences": sentences})
    path.write_text(json.dumps({"images": images, "dataset": "coco"}), encoding="utf-8")
    return path
