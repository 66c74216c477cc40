"""Data: the sources raydistill reads, robust image decoding, and the synthetic captioned-scenes dataset.

Every source becomes image-level rows (see :mod:`raydistill.data.records`), read by Ray Data in tasks
(:func:`raydistill.data.source.source_dataset`); `decode_image` turns a row's ``path`` or ``data`` into an RGB
array; `ensure_synth_dataset` provides the embedded default dataset.
"""

from raydistill.data.images import BadImageError, decode_image, open_uri, resize_center_crop
from raydistill.data.records import DataError, ReadStats, clean_caption, expand_shards
from raydistill.data.sources import read_coco_captions, read_karpathy
from raydistill.data.synth import ensure_synth_dataset, generate_scenes

__all__ = [
    "BadImageError",
    "DataError",
    "ReadStats",
    "clean_caption",
    "decode_image",
    "ensure_synth_dataset",
    "expand_shards",
    "generate_scenes",
    "open_uri",
    "read_coco_captions",
    "read_karpathy",
    "resize_center_crop",
]
