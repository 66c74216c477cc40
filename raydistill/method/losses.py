"""DSMD's four distillation losses, the ground-truth contrastive loss, and the modules that bundle them.

Formulas follow shared/method/DSMD.md exactly. Conventions shared by every function here:

- Embeddings are ``[B, d]`` matrices; row i of the four inputs is caption-level sample i (its image and its
  caption). Student embeddings are used as given (the student's heads L2-normalise them); teacher
  embeddings, including queue entries, are detached, cast to the student's dtype and re-normalised here,
  so no gradient ever reaches a teacher tensor.
- ``image_ids`` (``[B]`` integers) says which image each sample shows. ``None`` applies no masking (the
  reference code's behaviour). With ids, pairs of different samples that show the same image are removed
  from the negatives (the other captions of an image are not negatives of it).
- Loss functions never call ``torch.distributed``; the queue gathers across ranks on enqueue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raydistill.method.queue import EMPTY_IMAGE_ID, EmbeddingQueue

TERMS = ("feature", "cosine", "contrastive", "hard_negative")
"""Stable names of the four DSMD terms, in the paper's order (element, direction, distribution, ranking)."""


def _check_embeddings(where: str, **named: torch.Tensor) -> None:
    """Raises ValueError unless every tensor is ``[B, d]`` with the same B and d."""
    shapes = {name: tuple(t.shape) for name, t in named.items()}
    if any(len(shape) != 2 for shape in shapes.values()) or len(set(shapes.values())) != 1:
        listed = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"{where}: embeddings must all be [B, d] with the same B and d, got {listed}")


def _check_image_ids(where: str, image_ids: torch.Tensor | None, batch: int, name: str = "image_ids") -> None:
    if image_ids is None:
        return
    if image_ids.shape != (batch,) or image_ids.is_floating_point() or image_ids.dtype == torch.bool:
        raise ValueError(
            f"{where}: {name} must be a [{batch}] integer tensor, got shape {list(image_ids.shape)} "
            f"dtype {image_ids.dtype}"
        )


def _teacher(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Teacher embeddings as constants on the unit sphere, in the student's dtype (a cache may hold fp16)."""
    return F.normalize(t.detach().to(like.dtype), dim=-1)


def _same_image_pairs(image_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[B, B]`` bool, True where samples i and j show the same image (diagonal included)."""
    ids = image_ids.to(device)
    return ids[:, None] == ids[None, :]


def feature_loss(s_img: torch.Tensor, s_txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor) -> torch.Tensor:
    """Element-scale distillation: ``mean|s_v - t_v| + mean|s_t - t_t|`` over all B·d elements.

    Args:
        s_img: Student image embeddings ``[B, d]``.
        s_txt: Student text embeddings ``[B, d]``.
        t_img: Teacher image embeddings ``[B, d]`` (detached, re-normalised).
        t_txt: Teacher text embeddings ``[B, d]`` (detached, re-normalised).

    Returns:
        Scalar loss.
    """
    _check_embeddings("feature_loss", s_img=s_img, s_txt=s_txt, t_img=t_img, t_txt=t_txt)
    return (s_img - _teacher(t_img, s_img)).abs().mean() + (s_txt - _teacher(t_txt, s_txt)).abs().mean()


def cosine_loss(s_img: torch.Tensor, s_txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor) -> torch.Tensor:
    """Direction-scale distillation: one minus the mean point-wise cosine mapped to [0, 1], per modality.

    ``(1 - (mean_i cos(s_v[i], t_v[i]) + 1) / 2) + (1 - (mean_i cos(s_t[i], t_t[i]) + 1) / 2)``; each half
    is 0 when student and teacher point the same way and 1 when opposite.

    Args:
        s_img: Student image embeddings ``[B, d]``.
        s_txt: Student text embeddings ``[B, d]``.
        t_img: Teacher image embeddings ``[B, d]``.
        t_txt: Teacher text embeddings ``[B, d]``.

    Returns:
        Scalar loss in [0, 2].
    """
    _check_embeddings("cosine_loss", s_img=s_img, s_txt=s_txt, t_img=t_img, t_txt=t_txt)

    def half(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(student, _teacher(teacher, student), dim=-1)
        return 1 - (cos.mean() + 1) / 2

    return half(s_img, t_img) + half(s_txt, t_txt)


def _queue_infonce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    image_ids: torch.Tensor | None,
    queue_image_ids: torch.Tensor | None,
) -> torch.Tensor:
    """``mean_i CE([a_i·p_i, a_i·Q_1, ..., a_i·Q_K] / τ, target 0)``, same-image queue entries dropped."""
    positive_logit = (anchor * positive).sum(dim=-1, keepdim=True)
    negative_logits = anchor @ queue.t()
    if image_ids is not None and queue_image_ids is not None:
        ids = image_ids.to(anchor.device)
        queue_ids = queue_image_ids.to(anchor.device)
        # Slots still holding the initial random vectors carry EMPTY_IMAGE_ID and are always negatives.
        same = (ids[:, None] == queue_ids[None, :]) & (queue_ids[None, :] != EMPTY_IMAGE_ID)
        # -inf removes an entry from the softmax; the positive logit keeps every row finite.
        negative_logits = negative_logits.masked_fill(same, float("-inf"))
    logits = torch.cat([positive_logit, negative_logits], dim=1) / temperature
    target = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits, target)


def contrastive_loss(
    s_img: torch.Tensor,
    s_txt: torch.Tensor,
    t_img: torch.Tensor,
    t_txt: torch.Tensor,
    queue_img: torch.Tensor,
    queue_txt: torch.Tensor,
    temperature: float = 0.05,
    image_ids: torch.Tensor | None = None,
    queue_image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distribution-scale distillation: InfoNCE of each student embedding against a queue of teacher ones.

    ``L_con = l(s_v, t_v, Q_v) + l(s_t, t_t, Q_t)`` where the positive of student row i is the teacher's
    row i of the same modality and the negatives are the K queue entries. With ``image_ids`` and
    ``queue_image_ids``, the queue entries from the anchor's own image are dropped from its negatives
    (entries with image id -1, the initial random vectors, are never dropped). One image-id queue serves
    both modalities because the two queues are filled by the same batches.

    Args:
        s_img: Student image embeddings ``[B, d]``.
        s_txt: Student text embeddings ``[B, d]``.
        t_img: Teacher image embeddings ``[B, d]``.
        t_txt: Teacher text embeddings ``[B, d]``.
        queue_img: Teacher image embeddings ``[K, d]`` (the image queue).
        queue_txt: Teacher text embeddings ``[K, d]`` (the text queue).
        temperature: Softmax temperature τ (> 0).
        image_ids: ``[B]`` image id of each sample, or None for no masking.
        queue_image_ids: ``[K]`` image id of each queue entry; required when ``image_ids`` is given.

    Returns:
        Scalar loss.

    Raises:
        ValueError: On mismatched shapes, a non-positive temperature, or ``image_ids`` without
            ``queue_image_ids``.
    """
    _check_embeddings("contrastive_loss", s_img=s_img, s_txt=s_txt, t_img=t_img, t_txt=t_txt)
    batch, dim = s_img.shape
    for name, queue in (("queue_img", queue_img), ("queue_txt", queue_txt)):
        if queue.dim() != 2 or queue.shape[1] != dim:
            raise ValueError(f"contrastive_loss: {name} must be [K, {dim}], got {list(queue.shape)}")
    if queue_img.shape != queue_txt.shape:
        raise ValueError(
            f"contrastive_loss: queue_img {list(queue_img.shape)} and queue_txt {list(queue_txt.shape)} differ"
        )
    if not temperature > 0:
        raise ValueError(f"contrastive_loss: temperature must be > 0, got {temperature}")
    _check_image_ids("contrastive_loss", image_ids, batch)
    if image_ids is not None and queue_image_ids is None:
        raise ValueError("contrastive_loss: image_ids given without queue_image_ids; pass both or neither")
    _check_image_ids("contrastive_loss", queue_image_ids, queue_img.shape[0], name="queue_image_ids")
    return _queue_infonce(
        s_img, _teacher(t_img, s_img), _teacher(queue_img, s_img), temperature, image_ids, queue_image_ids
    ) + _queue_infonce(
        s_txt, _teacher(t_txt, s_txt), _teacher(queue_txt, s_txt), temperature, image_ids, queue_image_ids
    )


def _max_violation_hinge(
    a: torch.Tensor, b: torch.Tensor, margin: float, max_violation: bool, excluded: torch.Tensor
) -> torch.Tensor:
    """VSE++ hinge ``h(a, b)`` with ``S = a bᵀ``; ``excluded`` marks pairs that are not negatives."""
    scores = a @ b.t()
    diagonal = scores.diagonal()
    # cost_b[i, j]: b_j ranked against anchor a_i's positive b_i; cost_a[i, j]: a_i against b_j's positive a_j.
    cost_b = (margin + scores - diagonal[:, None]).clamp(min=0).masked_fill(excluded, 0)
    cost_a = (margin + scores - diagonal[None, :]).clamp(min=0).masked_fill(excluded, 0)
    if max_violation:
        return cost_b.max(dim=1).values.sum() + cost_a.max(dim=0).values.sum()
    return cost_b.sum() + cost_a.sum()


def hard_negative_loss(
    s_img: torch.Tensor,
    s_txt: torch.Tensor,
    t_img: torch.Tensor,
    t_txt: torch.Tensor,
    margin: float = 0.05,
    max_violation: bool = True,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ranking-scale distillation: VSE++ hinge between student and teacher embeddings, summed over the batch.

    For ``S = a bᵀ``: ``cost_b[i,j] = max(0, m + S[i,j] - S[i,i])``, ``cost_a[i,j] = max(0, m + S[i,j] -
    S[j,j])``, diagonal zeroed; ``h(a, b) = Σ_i max_j cost_b[i,j] + Σ_j max_i cost_a[i,j]`` (or the sum
    over all j / i with ``max_violation=False``). ``L_hn = h(s_v, t_v) + h(s_t, t_t) + h(s_v, t_t) +
    h(s_t, t_v)``. With ``image_ids``, pairs (i, j) showing the same image are zeroed like the diagonal.

    Args:
        s_img: Student image embeddings ``[B, d]``.
        s_txt: Student text embeddings ``[B, d]``.
        t_img: Teacher image embeddings ``[B, d]``.
        t_txt: Teacher text embeddings ``[B, d]``.
        margin: Hinge margin m.
        max_violation: Hardest negative only (True) or the sum over all negatives (False).
        image_ids: ``[B]`` image id of each sample, or None for no masking.

    Returns:
        Scalar loss (a batch sum, so it grows with B).
    """
    _check_embeddings("hard_negative_loss", s_img=s_img, s_txt=s_txt, t_img=t_img, t_txt=t_txt)
    batch = s_img.shape[0]
    _check_image_ids("hard_negative_loss", image_ids, batch)
    if image_ids is None:
        excluded = torch.eye(batch, dtype=torch.bool, device=s_img.device)
    else:
        excluded = _same_image_pairs(image_ids, s_img.device)
    t_img, t_txt = _teacher(t_img, s_img), _teacher(t_txt, s_txt)
    return sum(
        _max_violation_hinge(a, b, margin, max_violation, excluded)
        for a, b in ((s_img, t_img), (s_txt, t_txt), (s_img, t_txt), (s_txt, t_img))
    )


def ground_truth_contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor | float, image_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE on ground-truth pairs with in-batch negatives (the CLIP loss).

    ``logits = logit_scale · img txtᵀ``; the loss is the mean of image→text and text→image cross-entropy
    with target i for row i. With ``image_ids``, off-diagonal pairs showing the same image are removed from
    the negatives in both directions (another caption of the same image is not a wrong answer). Used for the
    no-distillation baseline and for fitting the demo teacher; no teacher tensor is involved.

    Args:
        img: Image embeddings ``[B, d]`` (L2-normalised by the model).
        txt: Text embeddings ``[B, d]``.
        logit_scale: Multiplier of the cosine similarities (1 / temperature), a float or a scalar tensor.
        image_ids: ``[B]`` image id of each sample, or None for no masking.

    Returns:
        Scalar loss.
    """
    _check_embeddings("ground_truth_contrastive_loss", img=img, txt=txt)
    batch = img.shape[0]
    _check_image_ids("ground_truth_contrastive_loss", image_ids, batch)
    logits = logit_scale * (img @ txt.t())
    if image_ids is not None:
        same = _same_image_pairs(image_ids, img.device)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(batch, device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class DSMDObjective(nn.Module):
    """The DSMD distillation objective: the enabled terms, each under its stable name, plus the queues.

    Call :meth:`forward` for the losses and :meth:`enqueue` with the same batch's teacher embeddings after
    the optimizer step (so a batch is never its own negative). The two queues (``queue_img``,
    ``queue_txt``) are submodules, so they are saved and restored with ``state_dict``; they exist only when
    the ``contrastive`` term is enabled.

    With ``mask_same_image=True`` and ``image_ids`` given, same-image pairs are removed from the negatives
    of the contrastive and hard-negative terms; with ``image_ids=None`` (or ``mask_same_image=False``)
    nothing is masked, which reproduces the reference code.

    Args:
        dim: Embedding dimension d (the teacher's).
        queue_size: Entries K per queue.
        temperature: Contrastive temperature τ.
        margin: Hard-negative margin m.
        max_violation: Hardest negative only (True) or sum over negatives.
        mask_same_image: Whether to mask same-image negatives when ids are given.
        terms: Names of the enabled terms, a subset of :data:`TERMS`.
        seed: Seed of the queues' initial random vectors (the text queue uses ``seed + 1``).
    """

    def __init__(
        self,
        dim: int,
        queue_size: int = 8192,
        temperature: float = 0.05,
        margin: float = 0.05,
        max_violation: bool = True,
        mask_same_image: bool = True,
        terms: Sequence[str] = TERMS,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(terms, str):
            terms = (terms,)
        unknown = [name for name in terms if name not in TERMS]
        if unknown:
            raise ValueError(f"DSMDObjective: unknown term(s) {unknown}; allowed: {list(TERMS)}")
        if not terms or len(set(terms)) != len(terms):
            raise ValueError(f"DSMDObjective: terms must be a non-empty list without repeats, got {list(terms)}")
        if not temperature > 0:
            raise ValueError(f"DSMDObjective: temperature must be > 0, got {temperature}")
        self.dim = int(dim)
        self.terms = tuple(name for name in TERMS if name in terms)
        self.temperature = float(temperature)
        self.margin = float(margin)
        self.max_violation = bool(max_violation)
        self.mask_same_image = bool(mask_same_image)
        self.queue_img: EmbeddingQueue | None = None
        self.queue_txt: EmbeddingQueue | None = None
        if "contrastive" in self.terms:
            self.queue_img = EmbeddingQueue(queue_size, dim, seed=seed)
            # A different seed: two identical random queues would be an odd correlated start.
            self.queue_txt = EmbeddingQueue(queue_size, dim, seed=seed + 1)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, terms={list(self.terms)}, temperature={self.temperature}, margin={self.margin}, "
            f"max_violation={self.max_violation}, mask_same_image={self.mask_same_image}"
        )

    def forward(
        self,
        s_img: torch.Tensor,
        s_txt: torch.Tensor,
        t_img: torch.Tensor,
        t_txt: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Computes the enabled terms.

        Args:
            s_img: Student image embeddings ``[B, d]``.
            s_txt: Student text embeddings ``[B, d]``.
            t_img: Teacher image embeddings ``[B, d]``.
            t_txt: Teacher text embeddings ``[B, d]``.
            image_ids: ``[B]`` image id of each sample, or None.

        Returns:
            ``{name: scalar loss}`` for the enabled terms, in :data:`TERMS` order.
        """
        _check_embeddings("DSMDObjective", s_img=s_img, s_txt=s_txt, t_img=t_img, t_txt=t_txt)
        if s_img.shape[1] != self.dim:
            raise ValueError(f"DSMDObjective: built for dim {self.dim}, got embeddings {list(s_img.shape)}")
        _check_image_ids("DSMDObjective", image_ids, s_img.shape[0])
        mask_ids = image_ids if self.mask_same_image else None
        out: dict[str, torch.Tensor] = {}
        if "feature" in self.terms:
            out["feature"] = feature_loss(s_img, s_txt, t_img, t_txt)
        if "cosine" in self.terms:
            out["cosine"] = cosine_loss(s_img, s_txt, t_img, t_txt)
        if "contrastive" in self.terms:
            assert self.queue_img is not None and self.queue_txt is not None
            out["contrastive"] = contrastive_loss(
                s_img,
                s_txt,
                t_img,
                t_txt,
                self.queue_img.embeddings,
                self.queue_txt.embeddings,
                temperature=self.temperature,
                image_ids=mask_ids,
                queue_image_ids=self.queue_img.image_ids if mask_ids is not None else None,
            )
        if "hard_negative" in self.terms:
            out["hard_negative"] = hard_negative_loss(
                s_img, s_txt, t_img, t_txt, self.margin, self.max_violation, image_ids=mask_ids
            )
        return out

    @torch.no_grad()
    def enqueue(self, t_img: torch.Tensor, t_txt: torch.Tensor, image_ids: torch.Tensor | None = None) -> None:
        """Pushes the batch's teacher embeddings (gathered from all ranks) into the queues.

        A no-op when the contrastive term is disabled.

        Args:
            t_img: Teacher image embeddings ``[B, d]``.
            t_txt: Teacher text embeddings ``[B, d]``.
            image_ids: ``[B]`` image ids, or None (stored as -1: never masked).
        """
        _check_embeddings("DSMDObjective.enqueue", t_img=t_img, t_txt=t_txt)
        _check_image_ids("DSMDObjective.enqueue", image_ids, t_img.shape[0])
        if self.queue_img is None or self.queue_txt is None:
            return
        self.queue_img.enqueue(t_img, image_ids)
        self.queue_txt.enqueue(t_txt, image_ids)


class GroundTruthContrastive(nn.Module):
    """Ground-truth image–text contrastive objective with a (learnable) temperature, CLIP-style.

    The scale is stored as ``log_logit_scale = log(1 / init_temperature)`` and applied as
    ``exp(log_logit_scale)`` clamped to ``max_logit_scale`` (clamping in the forward pass stops the
    gradient at the cap, which keeps training stable without an in-place clamp after each step).

    Args:
        init_temperature: Initial temperature (> 0); 0.07 as in CLIP.
        learnable: Whether the scale is a parameter (else a fixed buffer).
        max_logit_scale: Upper bound of the applied scale.
    """

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100) -> None:
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"GroundTruthContrastive: init_temperature must be > 0, got {init_temperature}")
        if not max_logit_scale > 0:
            raise ValueError(f"GroundTruthContrastive: max_logit_scale must be > 0, got {max_logit_scale}")
        self.max_logit_scale = float(max_logit_scale)
        initial = torch.tensor(math.log(1.0 / init_temperature))
        if learnable:
            self.log_logit_scale = nn.Parameter(initial)
        else:
            self.register_buffer("log_logit_scale", initial)

    def logit_scale(self) -> torch.Tensor:
        """The scale applied to cosine similarities now."""
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, image_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Returns ``{"contrastive_gt": loss}`` (see :func:`ground_truth_contrastive_loss`)."""
        return {"contrastive_gt": ground_truth_contrastive_loss(img, txt, self.logit_scale(), image_ids)}
