"""Turn decoded uint8 RGB images into the normalised float batch a vision tower reads.

The pipeline is the evaluation transform of the DSMD reference (and of most ViT recipes): resize the
shorter side to ``resize_size`` keeping the aspect ratio, centre-crop ``image_size`` x ``image_size``,
scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel. It is written with torch ops so a
whole batch is processed at once, on whatever device the input lives on.

Resizing uses ``torch.nn.functional.interpolate(..., antialias=True)``, which follows PIL's filters, and
the resized values are clamped to [0, 255] and rounded, as PIL and torchvision do when they resize a
uint8 image. On real photos, bilinear results agree with a PIL ``Image.resize`` pipeline to within one
grey level; bicubic ones too except at a few high-contrast edges (under 0.1 % of pixels), where PIL
clips to [0, 255] between its horizontal and vertical passes and this single 2-D pass does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic")

ImageBatch = np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shape after resizing the shorter side to ``size`` (torchvision's ``Resize(int)`` rule).

    Args:
        height: Input height in pixels.
        width: Input width in pixels.
        size: Target length of the shorter side.

    Returns:
        ``(new_height, new_width)``; the longer side is ``int(size * long / short)``.
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left corner of a centred ``size`` x ``size`` crop (torchvision's rounding).

    Args:
        height: Image height, at least ``size``.
        width: Image width, at least ``size``.
        size: Crop side.

    Returns:
        ``(top, left)``.
    """
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _check_settings(
    image_size: int,
    resize_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str,
) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(resize_size, int) or resize_size < image_size:
        raise ValueError(
            f"resize_size must be an int >= image_size ({image_size}), got {resize_size!r}"
        )
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got mean={mean!r} std={std!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be > 0, got {std!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")


def _as_uint8_hwc_batch(images: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    """Check one [N, H, W, 3] uint8 array/tensor and return it as a tensor (no copy for numpy)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"{what} must have dtype uint8 (0-255 RGB), got {images.dtype}")
        if not images.flags.writeable:
            images = images.copy()  # e.g. np.asarray(PIL image); torch warns on read-only memory
        tensor = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"{what} must have dtype uint8 (0-255 RGB), got {images.dtype}")
        tensor = images
    else:
        raise ValueError(f"{what} must be a numpy array or a torch tensor, got {type(images).__name__}")
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(
            f"{what} must have shape [N, H, W, 3] (RGB, channels last), got {tuple(tensor.shape)}"
        )
    if tensor.shape[1] < 1 or tensor.shape[2] < 1:
        raise ValueError(f"{what} has an empty spatial size {tuple(tensor.shape[1:3])}")
    return tensor


def _resize_and_crop(
    batch: torch.Tensor, image_size: int, resize_size: int, interpolation: str
) -> torch.Tensor:
    """Resize (shorter side) and centre-crop a float [N, 3, H, W] batch holding 0-255 values."""
    height, width = batch.shape[-2:]
    new_h, new_w = resized_shape(height, width, resize_size)
    if (new_h, new_w) != (height, width):
        batch = F.interpolate(
            batch, size=(new_h, new_w), mode=interpolation, align_corners=False, antialias=True
        )
        # Match what PIL / torchvision produce for uint8 images: bicubic overshoots, and they round.
        batch = batch.clamp_(0.0, 255.0).round_()
    top, left = center_crop_offsets(new_h, new_w, image_size)
    return batch[..., top : top + image_size, left : left + image_size]


def preprocess_images(
    images: ImageBatch,
    image_size: int,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Resize, centre-crop and normalise a batch of RGB images.

    Args:
        images: uint8 RGB images, channels last: one ``[N, H, W, 3]`` numpy array or tensor, or a
            sequence of ``[H, W, 3]`` arrays/tensors whose sizes may differ (each is resized on its
            own, then they are stacked).
        image_size: Side of the square output.
        resize_size: Length the shorter side is resized to before the centre crop (e.g. 256 for a
            224 crop); defaults to ``image_size`` (resize straight to the crop size).
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by.
        interpolation: ``"bilinear"`` or ``"bicubic"`` (both antialiased when downsampling).

    Returns:
        float32 tensor ``[N, 3, image_size, image_size]`` on the input's device.

    Raises:
        ValueError: wrong dtype, shape or type of ``images``, or invalid settings.
    """
    resize_size = image_size if resize_size is None else resize_size
    _check_settings(image_size, resize_size, mean, std, interpolation)

    if isinstance(images, (np.ndarray, torch.Tensor)):
        batch = _as_uint8_hwc_batch(images, "images")
        parts = [batch]
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        parts = []
        for i, image in enumerate(images):
            if not isinstance(image, (np.ndarray, torch.Tensor)) or image.ndim != 3:
                shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
                raise ValueError(f"images[{i}] must be a uint8 [H, W, 3] array or tensor, got {shape}")
            parts.append(_as_uint8_hwc_batch(image[None], f"images[{i}]"))
        if not parts:
            return torch.empty((0, 3, image_size, image_size), dtype=torch.float32)
    else:
        raise ValueError(
            "images must be a uint8 [N, H, W, 3] array/tensor or a sequence of [H, W, 3] arrays, "
            f"got {type(images).__name__}"
        )

    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    outputs = []
    for part in parts:
        if part.shape[0] == 0:
            outputs.append(torch.empty((0, 3, image_size, image_size), device=part.device))
            continue
        pixels = part.permute(0, 3, 1, 2).to(torch.float32)
        pixels = _resize_and_crop(pixels, image_size, resize_size, interpolation)
        pixels = pixels / 255.0
        outputs.append((pixels - mean_t.to(pixels.device)) / std_t.to(pixels.device))
    return outputs[0].contiguous() if len(outputs) == 1 else torch.cat(outputs).contiguous()
