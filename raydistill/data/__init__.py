"""Data: readers for each source format, robust image decoding, and the synthetic captioned-scenes dataset.

Every reader returns image-level records (see `raydistill.data.sources`); `decode_image` turns a record's
``path`` or ``data`` into an RGB array; `ensure_synth_dataset` provides the embedded default dataset.
"""

from raydistill.data.images import BadImageError, decode_image, open_uri, resize_center_crop
from raydistill.data.sources import (
    READERS,
    DataError,
    ReadStats,
    caption_rows,
    clean_caption,
    dataset_fingerprint,
    expand_shards,
    read_coco_captions,
    read_karpathy,
    read_manifest,
    read_source,
    read_webdataset,
    summarize,
)
from raydistill.data.synth import ensure_synth_dataset, generate_scenes

__all__ = [
    "READERS",
    "BadImageError",
    "DataError",
    "ReadStats",
    "caption_rows",
    "clean_caption",
    "dataset_fingerprint",
    "decode_image",
    "ensure_synth_dataset",
    "expand_shards",
    "generate_scenes",
    "open_uri",
    "read_coco_captions",
    "read_karpathy",
    "read_manifest",
    "read_source",
    "read_webdataset",
    "resize_center_crop",
    "summarize",
]
