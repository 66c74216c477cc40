"""Pretrained weights for the student's towers: local files, or names that timm and transformers load themselves.

``load_vision_weights`` fills the image tower from a timm checkpoint file or a timm pretrained name
(``vit_base_patch16_224.augreg_in21k``); ``load_text_weights`` fills the text tower from a Hugging Face folder or
hub name (``bert-base-uncased``), read offline from the Hugging Face cache when the machine has no network. Both
check shapes and keys before copying anything, and report what they loaded (:class:`WeightsReport`).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import vision_transformer as timm_vit
from torch import nn
from transformers import AutoConfig, AutoModel

from raydistill.models.tokenizers import _is_hub_name

if TYPE_CHECKING:
    from raydistill.models.student import DualEncoder


@dataclass(frozen=True)
class WeightsReport:
    """What loading tower weights did.

    Attributes:
        source: The file or directory read, or the timm / Hugging Face name loaded.
        loaded: Number of tensors copied into the model.
        missing: Model keys the checkpoint lacked (left as initialised).
        unexpected: Checkpoint keys the model has no place for (not loaded).
        ignored: Checkpoint keys dropped on purpose (classification heads, an unused pooler).
    """

    source: Path | str
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: tuple[str, ...]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch state-dict file (``weights_only``)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        # UnpicklingError: not a torch file, or one holding objects weights_only refuses to load.
        raise ValueError(f"could not read weights file {path}: {error}") from error
    # Training checkpoints (timm's train script and others) nest the weights.
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        shown = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"weights file {path} holds no state dict of tensors (found {shown})")
    return data


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP / torch.compile / wrapper prefixes shared by every key."""
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod.", "model."):
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def _select_submodule(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The ``prefix`` part of a whole saved DualEncoder (recognised by its head keys)."""
    if "image_proj.weight" in state and "text_proj.weight" in state:
        return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return state


def _load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: Path | str,
    ignored: list[str],
    strict: bool,
    what: str,
) -> WeightsReport:
    """Shape-check, key-check, then copy ``state`` into ``module``; nothing is copied on error."""
    own = module.state_dict()
    mismatched = [
        f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items()
        if key in own and tuple(value.shape) != tuple(own[key].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{source} does not fit the {what}: {len(mismatched)} tensor(s) differ in shape, e.g. "
            + "; ".join(mismatched[:5])
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source} does not match the {what}: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]} (pass strict=False to load the rest)"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return WeightsReport(
        source=source,
        loaded=len(state) - len(unexpected),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        ignored=tuple(sorted(ignored)),
    )


def _is_timm_name(path: str | Path) -> bool:
    """Whether ``path`` names timm pretrained weights rather than a file: a string that is no existing
    path and is a timm model name (``vit_base_patch16_224.augreg_in21k``) or an ``hf-hub:`` name."""
    if not isinstance(path, str) or Path(path).expanduser().exists():
        return False
    return path.startswith("hf-hub:") or timm.is_model(path)


def _offline_hint(setting: str, repo: str, local: str) -> str:
    """What to do when a hub name cannot be loaded: the same advice for both towers."""
    return (
        f"Without network the files must already be in the Hugging Face cache (under $HF_HOME, default "
        f"~/.cache/huggingface): fetch them once where there is network (`hf download {repo}`, or any run "
        f"with the same {setting}) and set HF_HUB_OFFLINE=1 to skip the download attempts; "
        f"or set {setting} to {local}."
    )


def _timm_pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """The image-tower state of timm's pretrained ``name``, loaded by timm (cache first when offline)."""
    try:
        repo = timm.models.get_pretrained_cfg(name).hf_hub_id or name
    except (RuntimeError, AttributeError):  # unknown tag, or no pretrained config at all
        repo = name
    try:
        # num_classes=0: timm drops the classifier (ImageNet-21k's 21,843 classes), which has no place here.
        donor = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as error:  # timm's download path raises OSError, RuntimeError, hub and HTTP errors alike
        raise ValueError(
            f"student.vision_weights {name!r}: timm could not load these pretrained weights "
            f"({type(error).__name__}: {error}). "
            + _offline_hint("student.vision_weights", repo, "a local timm checkpoint file (.safetensors / .pth)")
        ) from error
    return donor.state_dict()


def load_vision_weights(model: DualEncoder, path: str | Path, strict: bool = True) -> WeightsReport:
    """Load a timm ViT checkpoint, or timm's pretrained weights by name, into the image tower.

    A string that is no existing path and is a timm model name with its pretrained tag (e.g.
    ``"vit_base_patch16_224.augreg_in21k"``, the ImageNet-21k ViT-B/16 of DSMD.md) or an
    ``"hf-hub:org/name"`` is loaded by timm itself (``timm.create_model(name, pretrained=True)``):
    from the Hugging Face cache when it is there, else downloaded.

    Files: ``.safetensors`` or torch state-dict files (``.pth``, ``.pt``, ``.bin``; loaded with
    ``weights_only=True``), plain or nested under ``state_dict`` / ``model``, with ``module.`` /
    ``_orig_mod.`` / ``model.`` prefixes, or a whole saved DualEncoder's ``model.safetensors``. timm's
    own ViT checkpoint filter runs first: it resamples position embeddings (and patch embeddings)
    to this model's image and patch size, and maps the other layouts timm knows (open_clip's, for
    one) onto a ViT of matching architecture. Classification-head keys are ignored.

    Args:
        model: The dual encoder to fill.
        path: The checkpoint file, or a timm pretrained name (a string).
        strict: Fail when keys are missing or unexpected (after ignoring the head); when False,
            load what matches and report the rest.

    Returns:
        A ``WeightsReport``.

    Raises:
        FileNotFoundError: no such file (and not a timm name).
        ValueError: unreadable file, a name timm cannot load (offline and not cached, unknown tag),
            shape mismatches, or (strict) missing/unexpected keys.
    """
    source: Path | str
    if _is_timm_name(path):
        source = str(path)
        state = _timm_pretrained_state(source)
    else:
        source = Path(path)
        state = _select_submodule(_strip_wrappers(_read_state_dict(source)), "vision.")
    if isinstance(model.vision, timm_vit.VisionTransformer):
        state = timm_vit.checkpoint_filter_fn(state, model.vision)
    own = model.vision.state_dict()
    # The tower has no classifier (num_classes=0): a checkpoint's head has nowhere to go.
    ignored = [k for k in state if k.startswith(("head.", "head_dist.")) and k not in own]
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    return _load_into(model.vision, state, source, ignored, strict, f"vision tower {model.config.vision!r}")


def _local_text_model(source: Path, expected_type: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model in a ``save_pretrained`` directory, after checking its ``model_type``."""
    config_path = source / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"text weights: {config_path} not found (expected a save_pretrained directory, or a "
            "Hugging Face hub name such as bert-base-uncased)"
        )
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if model_type != expected_type:
        raise ValueError(f"{source} holds a {model_type!r} model; the student's text tower is {expected_type!r}")
    try:
        return AutoModel.from_pretrained(str(source), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"could not load the text model in {source}: {error}") from error


def _hub_text_model(name: str, expected_type: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model a Hugging Face hub name gives (cache first when offline), after checking its type."""
    hint = _offline_hint("student.text_weights", name, "a local save_pretrained folder")
    try:
        hf_config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"student.text_weights {name!r} is no local folder, and transformers could not load it by name "
            f"({type(error).__name__}: {error}). {hint}"
        ) from error
    if hf_config.model_type != expected_type:
        raise ValueError(
            f"{name} holds a {hf_config.model_type!r} model; the student's text tower is {expected_type!r}"
        )
    try:
        return AutoModel.from_pretrained(name, config=hf_config, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"could not load the text model {name!r}: {error}. {hint}") from error


def load_text_weights(model: DualEncoder, hf_dir: str | Path, strict: bool = True) -> WeightsReport:
    """Load a Hugging Face model (a ``save_pretrained`` directory or a hub name) into the text tower.

    A string that is no existing path and looks like a hub name (``"bert-base-uncased"``,
    ``"google/bert_uncased_L-4_H-512_A-8"``) is loaded by transformers itself
    (``AutoModel.from_pretrained``): from the Hugging Face cache when it is there, else downloaded.
    The model may be the bare encoder (``BertModel``) or one with a task head (``BertForMaskedLM``...);
    transformers strips the head and the ``bert.`` prefix. Its ``model_type`` and tensor shapes must
    match the student's text config (``vocab_size`` included). Pooler weights are ignored when the
    student uses ``text_pooling="cls"``; a checkpoint without a pooler is a missing-key error for a
    pooler student (its pooler would stay random).

    Args:
        model: The dual encoder to fill.
        hf_dir: Directory with ``config.json`` and the weights, or a hub name (a string).
        strict: Fail when keys are missing or unexpected; when False, load what matches.

    Returns:
        A ``WeightsReport``.

    Raises:
        FileNotFoundError: no such directory (and not a hub name), or no ``config.json`` in it.
        ValueError: another model type, unreadable weights, a name transformers cannot load (offline
            and not cached, unknown name), shape mismatches, or (strict) missing/unexpected keys.
    """
    expected_type = model.config.text["model_type"]
    source: Path | str
    # The tokenizer loader's test for a hub name: a name means the same in student.tokenizer and here.
    if isinstance(hf_dir, str) and not Path(hf_dir).expanduser().exists() and _is_hub_name(hf_dir):
        source = hf_dir
        pretrained, info = _hub_text_model(hf_dir, expected_type)
    else:
        source = Path(hf_dir)
        pretrained, info = _local_text_model(source, expected_type)
    state = pretrained.state_dict()
    # Keys transformers had to initialise itself are not in the checkpoint: report them as missing.
    for key in info.get("missing_keys", ()):
        state.pop(key, None)
    # Task heads (e.g. the masked-LM head) that transformers dropped while loading the bare encoder.
    ignored = list(info.get("unexpected_keys", ()))
    if getattr(model.text, "pooler", None) is None:
        ignored += [k for k in state if k.startswith("pooler.")]
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    return _load_into(model.text, state, source, ignored, strict, f"text tower ({expected_type})")


