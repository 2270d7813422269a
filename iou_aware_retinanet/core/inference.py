"""Inference: fuse classification and predicted IoU, then top-k, NMS and ranking.

The fused detection confidence S = p^alpha * IoU^(1 - alpha) (paper eq. 7)
replaces the class probability p everywhere p was used: per-level top-k
candidate selection, the score threshold (unless told to threshold p), NMS
and the final ranking.
"""
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

THRESHOLD_ON_CHOICES = ("fused", "cls")
# What the per-level top-k counts: "pairs", the (anchor, class) pairs of highest S after the
# threshold (Detectron2 and torchvision); "anchors", the anchors of highest best-class S before it,
# with every pair of theirs that passes (the official code's mmdetection ``nms_pre``).
CANDIDATES_CHOICES = ("pairs", "anchors")


with warnings.catch_warnings():  # torch's notice that TorchScript is deprecated, once per import
    warnings.simplefilter("ignore", FutureWarning)

    @torch.jit.interface
    class BoxDecoder:
        """What inference needs of a box coder: core ``BoxCoder`` or Detectron2's
        ``Box2BoxTransform``. An interface, so that TorchScript compiles the
        post-processing below with either (Python only checks the method exists)."""

        def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
            pass


def fuse_scores(cls_probs: Tensor, ious: Optional[Tensor], alpha: Optional[float]) -> Tensor:
    """S = p^alpha * IoU^(1 - alpha); ``alpha=None`` is the plain product p * IoU.

    ``ious`` broadcasts against ``cls_probs`` (class-agnostic IoU: pass it as
    (A, 1) against (A, K)). ``ious=None`` or ``alpha=1`` returns p unchanged,
    which is plain RetinaNet scoring.
    """
    if ious is None:
        return cls_probs
    if alpha is None:
        return cls_probs * ious
    if alpha == 1.0:
        return cls_probs
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] or be None, got {alpha}")
    return cls_probs.pow(alpha) * ious.pow(1.0 - alpha)


@dataclass(frozen=True)
class InferenceConfig:
    alpha: Optional[float] = 0.5  # official code; None = p * IoU
    score_thresh: float = 0.05
    threshold_on: str = "cls"  # "cls": p > thresh, then rank by S; "fused": S > thresh
    topk_candidates: int = 1000  # per level
    nms_thresh: float = 0.5
    max_detections: int = 100
    clip_to_image: bool = False  # torchvision clips before NMS; Detectron2 after
    candidates: str = "pairs"  # "anchors" with threshold_on "fused": the official code's post-processing

    def __post_init__(self):
        if self.threshold_on not in THRESHOLD_ON_CHOICES:
            raise ValueError(
                f"unknown threshold_on {self.threshold_on!r}; valid choices: {', '.join(THRESHOLD_ON_CHOICES)}"
            )
        if self.candidates not in CANDIDATES_CHOICES:
            raise ValueError(f"unknown candidates {self.candidates!r}; valid choices: {', '.join(CANDIDATES_CHOICES)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1] or be None, got {self.alpha}")


@dataclass
class Detections:
    boxes: Tensor  # (D, 4)
    scores: Tensor  # (D,) the fused confidence S, the ranking score
    classes: Tensor  # (D,)
    cls_scores: Tensor  # (D,) the class probability p
    ious: Optional[Tensor]  # (D,) the IoU the score was fused with (None without IoU branch)

    def __len__(self) -> int:
        return self.boxes.shape[0]


def _topk_count(values: Tensor, k: int) -> int:
    """min(k, len(values)); while tracing for ONNX export, a tensor computed from the
    traced shape (a Python min would freeze the count of the example image)."""
    if not torch.jit.is_scripting():
        if torch.jit.is_tracing():
            return torch.clamp(torch._shape_as_tensor(values)[0], max=k)  # type: ignore[return-value]
    return min(k, values.shape[0])


def select_level_candidates(
    cls_probs: Tensor, ious: Optional[Tensor], config: InferenceConfig
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Threshold and top-k one level. cls_probs (A_l, K), ious (A_l,) or None.

    Returns anchor indices, classes, fused scores (sorted, descending) and
    class probabilities of the kept (anchor, class) pairs.
    """
    return _select_level_candidates(
        cls_probs, ious, config.alpha, config.score_thresh, config.threshold_on, config.topk_candidates,
        config.candidates,
    )  # fmt: skip


def _select_level_candidates(
    cls_probs: Tensor, ious: Optional[Tensor], alpha: Optional[float], score_thresh: float, threshold_on: str,
    topk_candidates: int, candidates: str = "pairs",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if candidates == "anchors":
        return _select_level_anchors(cls_probs, ious, alpha, score_thresh, threshold_on, topk_candidates)
    if threshold_on == "cls" or ious is None:
        # Gate on p first, fuse only the pairs that pass: the same scores, without
        # computing S for every (anchor, class) of the level.
        pair_idx = torch.nonzero(cls_probs > score_thresh)  # (P, 2) anchor, class
        probs = cls_probs[pair_idx[:, 0], pair_idx[:, 1]]
        scores = fuse_scores(probs, None if ious is None else ious[pair_idx[:, 0]], alpha)
    else:
        fused = fuse_scores(cls_probs, ious[:, None], alpha)
        pair_idx = torch.nonzero(fused > score_thresh)
        scores = fused[pair_idx[:, 0], pair_idx[:, 1]]
    # NaN compares False, but a NaN / inf IoU would still pass the "cls" gate (and an
    # inf one the "fused" gate): drop non-finite fused scores explicitly.
    finite = torch.isfinite(scores)
    if torch.jit.is_tracing() or not bool(finite.all()):
        pair_idx, scores = pair_idx[finite], scores[finite]
    scores, order = scores.topk(_topk_count(scores, topk_candidates))
    pair_idx = pair_idx[order]
    anchor_idx, class_idx = pair_idx.unbind(dim=1)
    return anchor_idx, class_idx, scores, cls_probs[anchor_idx, class_idx]


def _select_level_anchors(
    cls_probs: Tensor, ious: Optional[Tensor], alpha: Optional[float], score_thresh: float, threshold_on: str,
    topk_candidates: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``candidates="anchors"``: the ``topk_candidates`` anchors of highest best-class S, chosen
    before any threshold, then every (anchor, class) pair of theirs whose S (or p, with the gate on
    p) passes; sorted by S like the pairs rule."""
    fused = fuse_scores(cls_probs, None if ious is None else ious[:, None], alpha)
    best = fused.max(dim=1).values
    best = torch.where(torch.isfinite(best), best, torch.full_like(best, -1.0))  # a NaN IoU takes no place
    kept_anchors = best.topk(_topk_count(best, topk_candidates)).indices
    gate = cls_probs if threshold_on == "cls" and ious is not None else fused
    pair_idx = torch.nonzero(gate[kept_anchors] > score_thresh)  # (P, 2) index into kept_anchors, class
    anchor_idx, class_idx = kept_anchors[pair_idx[:, 0]], pair_idx[:, 1]
    scores = fused[anchor_idx, class_idx]
    finite = torch.isfinite(scores)
    if torch.jit.is_tracing() or not bool(finite.all()):
        anchor_idx, class_idx, scores = anchor_idx[finite], class_idx[finite], scores[finite]
    scores, order = scores.sort(descending=True)
    anchor_idx, class_idx = anchor_idx[order], class_idx[order]
    return anchor_idx, class_idx, scores, cls_probs[anchor_idx, class_idx]


def postprocess_image(
    cls_probs: Sequence[Tensor],
    box_deltas: Sequence[Tensor],
    ious: Optional[Sequence[Tensor]],
    anchors: Sequence[Tensor],
    box_coder,
    image_size: Tuple[int, int],
    config: InferenceConfig,
) -> Detections:
    """Detections of one image from per-level predictions.

    cls_probs[l] (A_l, K) probabilities, box_deltas[l] (A_l, 4), ious[l]
    (A_l,) IoU predictions in [0, 1] (or any localization quality, e.g. the
    IoU_truth of the upper-bound analysis), anchors[l] (A_l, 4).

    Each level goes through :func:`select_level_candidates` (threshold, top-k),
    as in torchvision and Detectron2 (or, with ``candidates="anchors"``, as in
    the official code); NMS and the ranking then use S.
    """
    return Detections(*detect_image(
        cls_probs, box_deltas, ious, anchors, box_coder, image_size, config.alpha, config.score_thresh,
        config.threshold_on, config.topk_candidates, config.nms_thresh, config.max_detections, config.clip_to_image,
        config.candidates,
    ))  # fmt: skip


def detect_image(
    cls_probs: List[Tensor],
    box_deltas: List[Tensor],
    ious: Optional[List[Tensor]],
    anchors: List[Tensor],
    box_coder: BoxDecoder,
    image_size: Tuple[int, int],
    alpha: Optional[float],
    score_thresh: float,
    threshold_on: str,
    topk_candidates: int,
    nms_thresh: float,
    max_detections: int,
    clip_to_image: bool,
    candidates: str = "pairs",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """:func:`postprocess_image` with ``InferenceConfig``'s fields as arguments and
    ``Detections``' fields as a tuple: the form TorchScript compiles (it reads
    neither dataclass), for front-ends that script their model."""
    boxes_all: List[Tensor] = []
    scores_all: List[Tensor] = []
    classes_all: List[Tensor] = []
    cls_all: List[Tensor] = []
    ious_all: List[Tensor] = []
    for level in range(len(cls_probs)):
        ious_l = None if ious is None else ious[level]
        anchor_idx, class_idx, scores, cls_scores = _select_level_candidates(
            cls_probs[level], ious_l, alpha, score_thresh, threshold_on, topk_candidates, candidates
        )
        boxes = box_coder.apply_deltas(box_deltas[level][anchor_idx], anchors[level][anchor_idx])
        if clip_to_image:
            boxes = clip_boxes_to_image(boxes, image_size)
        boxes_all.append(boxes)
        scores_all.append(scores)
        classes_all.append(class_idx)
        cls_all.append(cls_scores)
        if ious_l is not None:
            ious_all.append(ious_l[anchor_idx])

    boxes = torch.cat(boxes_all)
    scores = torch.cat(scores_all)
    classes = torch.cat(classes_all)
    cls_scores = torch.cat(cls_all)
    iou_values = torch.cat(ious_all) if ious is not None else None

    # Wild deltas (inf / NaN) decode to non-finite boxes that NMS cannot rank (non-finite
    # scores were dropped per level).
    finite = torch.isfinite(boxes).all(dim=1)
    if torch.jit.is_tracing() or not bool(finite.all()):  # a trace cannot branch on data: always filter
        boxes, scores, classes, cls_scores = boxes[finite], scores[finite], classes[finite], cls_scores[finite]
        iou_values = iou_values[finite] if iou_values is not None else None

    # NMS in float32 (torchvision's kernels refuse mixed types): scores of a float16 /
    # bfloat16 head keep their type in the detections, as Detectron2's do under autocast.
    keep = batched_nms(boxes.float(), scores.float(), classes, nms_thresh)[:max_detections]
    return boxes[keep], scores[keep], classes[keep], cls_scores[keep], iou_values[keep] if iou_values is not None else None


def image_predictions(
    cls_logits: List[Tensor], box_deltas: List[Tensor], iou_logits: Optional[List[Tensor]], index: int
) -> Tuple[List[Tensor], List[Tensor], Optional[List[Tensor]]]:
    """Image ``index`` of a batch's per-level logits, as :func:`postprocess_image` takes
    them: class probabilities (A_l, K), deltas (A_l, 4) and predicted IoUs (A_l,).

    cls_logits[l] (N, A_l, K), box_deltas[l] (N, A_l, 4), iou_logits[l] (N, A_l) or None.
    """
    probs = [x[index].sigmoid() for x in cls_logits]
    deltas = [x[index] for x in box_deltas]
    ious = None if iou_logits is None else [x[index].sigmoid() for x in iou_logits]
    return probs, deltas, ious


def postprocess_batch(
    cls_logits: Sequence[Tensor],
    box_deltas: Sequence[Tensor],
    iou_logits: Optional[Sequence[Tensor]],
    anchors: Sequence[Sequence[Tensor]],
    box_coder,
    image_sizes: Sequence[Tuple[int, int]],
    config: InferenceConfig,
) -> List[Detections]:
    """Detections of every image of a batch, from per-level logits (see
    :func:`image_predictions`); anchors[i][l] (A_l, 4) of image i, in the
    coordinates of ``image_sizes[i]``."""
    return [
        postprocess_image(*image_predictions(cls_logits, box_deltas, iou_logits, i), anchors[i], box_coder, size, config)
        for i, size in enumerate(image_sizes)
    ]
