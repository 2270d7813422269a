"""Training losses of the IoU-aware detector, per image, before normalization.

Every function returns one summed loss per image; the front-end divides by its
normalizer (Detectron2: an EMA of the number of foreground anchors in the
batch; torchvision: each image's own foreground count), so both front-ends can
reproduce their upstream RetinaNet exactly.
"""
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import (
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)

from .assigners import Assignment
from .boxes import aligned_box_iou

logger = logging.getLogger(__name__)

BOX_LOSS_TYPES = ("smooth_l1", "giou", "diou", "ciou")
# How soft classification targets are trained: "focal" (focal loss with soft
# targets, Noisy-anchor) or "quality_focal" (|t - p|^gamma * BCE, GFL / TOOD).
SOFT_TARGET_LOSSES = ("focal", "quality_focal")
# Key of dense_detection_losses' per-image entropy of the IoU targets (a statistic, not a loss).
IOU_TARGET_ENTROPY = "iou_target_entropy"


@dataclass(frozen=True)
class LossConfig:
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss_type: str = "smooth_l1"
    smooth_l1_beta: float = 0.0  # Detectron2's RetinaNet default: plain L1
    iou_loss_weight: float = 1.0
    # Let d L_IoU / d IoU_target flow into the box branch (paper Table 4;
    # the official code does). False detaches the target.
    iou_target_gradient: bool = True
    # Classification loss of soft targets (SOFT_TARGET_LOSSES); the config layer sets
    # it from the chosen assigner's class (``Assigner.soft_target_loss``).
    soft_target_loss: str = "focal"

    def __post_init__(self):
        if self.box_loss_type not in BOX_LOSS_TYPES:
            raise ValueError(
                f"unknown box loss type {self.box_loss_type!r}; valid choices: {', '.join(BOX_LOSS_TYPES)}"
            )
        if self.soft_target_loss not in SOFT_TARGET_LOSSES:
            raise ValueError(
                f"unknown soft-target loss {self.soft_target_loss!r}; valid choices: "
                f"{', '.join(SOFT_TARGET_LOSSES)}"
            )


def soft_target_focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal loss with targets in [0, 1], element-wise (Noisy-anchor's form).

    -alpha * t * (1 - p)^gamma * log(p) - (1 - alpha) * (1 - t) * p^gamma * log(1 - p).
    For t in {0, 1} it is exactly the sigmoid focal loss. Log-probabilities
    come from logsigmoid, so extreme logits give no NaN.
    """
    prob = logits.sigmoid()
    pos = -targets * (1 - prob).pow(gamma) * F.logsigmoid(logits)
    neg = -(1 - targets) * prob.pow(gamma) * F.logsigmoid(-logits)
    if alpha >= 0:
        pos, neg = alpha * pos, (1 - alpha) * neg
    return pos + neg


def quality_focal_loss(logits: Tensor, targets: Tensor, beta: float) -> Tensor:
    """Quality focal loss (GFL; TOOD's classification loss), element-wise:
    |t - p|^beta * BCE(p, t), no alpha balancing."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (targets - prob).abs().pow(beta) * bce


def classification_loss(
    cls_logits: Tensor,
    labels: Tensor,
    cls_targets: Optional[Tensor],
    cls_weights: Optional[Tensor],
    alpha: float,
    gamma: float,
    soft_target_loss: str = "focal",
) -> Tensor:
    """Focal loss over non-ignored anchors, summed per image.

    cls_logits (N, A, K); labels (N, A) in {-1, 0..K-1, K}; cls_targets
    (soft target of the foreground class) and cls_weights (per-anchor weight)
    (N, A) or None. Returns (N,).
    """
    num_classes = cls_logits.shape[-1]
    valid = labels >= 0
    fg = valid & (labels != num_classes)
    one_hot = F.one_hot(labels.clamp(min=0), num_classes + 1)[..., :num_classes].to(cls_logits.dtype)
    if cls_targets is None:
        loss = sigmoid_focal_loss(cls_logits, one_hot, alpha=alpha, gamma=gamma, reduction="none")
    else:
        soft = torch.where(fg, cls_targets.to(cls_logits.dtype), torch.zeros_like(cls_logits[..., 0]))
        targets = one_hot * soft[..., None]
        if soft_target_loss == "focal":
            loss = soft_target_focal_loss(cls_logits, targets, alpha, gamma)
        else:
            loss = quality_focal_loss(cls_logits, targets, gamma)
    if cls_weights is not None:
        loss = loss * cls_weights.to(loss.dtype)[..., None]
    return (loss * valid[..., None]).sum(dim=(1, 2))


def _box_loss_per_anchor(
    pred_deltas: Tensor,
    pred_boxes: Tensor,
    anchors: Tensor,
    gt_boxes: Tensor,
    box_coder,
    loss_type: str,
    smooth_l1_beta: float,
) -> Tensor:
    if loss_type == "smooth_l1":
        target = box_coder.get_deltas(anchors, gt_boxes)
        return F.smooth_l1_loss(pred_deltas, target, beta=smooth_l1_beta, reduction="none").sum(dim=1)
    loss_fn = {
        "giou": generalized_box_iou_loss,
        "diou": distance_box_iou_loss,
        "ciou": complete_box_iou_loss,
    }[loss_type]
    return loss_fn(pred_boxes, gt_boxes, reduction="none")


def iou_prediction_loss(iou_logits: Tensor, iou_target: Tensor, target_gradient: bool) -> Tensor:
    """BCE of the IoU branch against ``iou_target``, IoU(predicted box, its GT), per anchor.

    With ``target_gradient`` the target keeps its graph, so the loss also
    pushes the box deltas (d BCE / d IoU = log((1 - p) / p)); without it the
    target is a constant.
    """
    if not target_gradient:
        iou_target = iou_target.detach()
    return F.binary_cross_entropy_with_logits(iou_logits, iou_target, reduction="none")


def bce_floor(iou_target: Tensor) -> Tensor:
    """The entropy of each (soft) IoU target: the lowest value its BCE can take. No gradient."""
    with torch.no_grad():
        target = iou_target.clamp(0.0, 1.0)
        # By hand, not F.binary_cross_entropy(target, target): that raises on a NaN
        # target (blown-up boxes), before the loss check can name the iteration.
        return -(torch.special.xlogy(target, target) + torch.special.xlogy(1 - target, 1 - target))


def dense_detection_losses(
    cls_logits: Tensor,
    box_deltas: Tensor,
    iou_logits: Optional[Tensor],
    anchors: Tensor,
    assignments: Sequence[Assignment],
    gt_boxes: Sequence[Tensor],
    box_coder,
    config: LossConfig,
) -> Dict[str, Tensor]:
    """All losses of a batch, summed per image.

    cls_logits (N, A, K), box_deltas (N, A, 4), iou_logits (N, A) or None,
    anchors (A, 4) shared by the batch, one Assignment and one (G_i, 4) GT box
    tensor per image. Returns {"loss_cls", "loss_box_reg"[, "loss_iou"]} as
    (N,) tensors, plus "num_foreground" (N,) and, with the IoU branch,
    ``IOU_TARGET_ENTROPY`` (N,): the floor of loss_iou (no gradient, not a loss).

    Under autocast the head's outputs come in float16 / bfloat16: every loss (focal
    terms, decoded boxes, IoU targets, the matched GT boxes) is computed from their
    float32 copies, as Detectron2 keeps its RetinaNet's losses in float32.
    """
    cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
    iou_logits = iou_logits.float() if iou_logits is not None else None
    num_images = cls_logits.shape[0]
    labels = torch.stack([a.labels for a in assignments])
    matched = torch.stack([a.matched_gt for a in assignments])
    cls_targets = _stack_optional([a.cls_targets for a in assignments], labels, 1.0)
    cls_weights = _stack_optional([a.cls_weights for a in assignments], labels, 1.0)
    box_weights = _stack_optional([a.box_weights for a in assignments], labels, 1.0)

    losses = {
        "loss_cls": classification_loss(
            cls_logits, labels, cls_targets, cls_weights, config.focal_alpha, config.focal_gamma,
            config.soft_target_loss,
        )
    }

    img_idx, anchor_idx = torch.nonzero(matched >= 0, as_tuple=True)
    matched_boxes = _gather_matched_boxes(gt_boxes, img_idx, matched[img_idx, anchor_idx], box_deltas)
    fg_anchors = anchors[anchor_idx]
    fg_deltas = box_deltas[img_idx, anchor_idx]
    # Decode only when a loss needs the predicted box itself.
    needs_boxes = config.box_loss_type != "smooth_l1" or iou_logits is not None
    fg_boxes = box_coder.apply_deltas(fg_deltas, fg_anchors) if needs_boxes else None

    box_loss = _box_loss_per_anchor(
        fg_deltas, fg_boxes, fg_anchors, matched_boxes, box_coder,
        config.box_loss_type, config.smooth_l1_beta,
    )
    if box_weights is not None:
        box_loss = box_loss * box_weights[img_idx, anchor_idx]
    losses["loss_box_reg"] = _sum_per_image(box_loss, img_idx, num_images)

    if iou_logits is not None:
        iou_target = aligned_box_iou(fg_boxes, matched_boxes)
        iou_loss = iou_prediction_loss(iou_logits[img_idx, anchor_idx], iou_target, config.iou_target_gradient)
        losses["loss_iou"] = config.iou_loss_weight * _sum_per_image(iou_loss, img_idx, num_images)
        # The BCE cannot go below the entropy of its (soft) targets, so loss_iou
        # barely moves even when the branch learns; loss_iou - this floor shows progress.
        entropy = bce_floor(iou_target)
        losses[IOU_TARGET_ENTROPY] = config.iou_loss_weight * _sum_per_image(entropy, img_idx, num_images)

    losses["num_foreground"] = torch.bincount(img_idx, minlength=num_images)
    return losses


def _stack_optional(values: List[Optional[Tensor]], like: Tensor, fill: float) -> Optional[Tensor]:
    """Stack per-image optional tensors; None when every image has None."""
    if all(v is None for v in values):
        return None
    return torch.stack(
        [v if v is not None else torch.full(like.shape[1:], fill, device=like.device) for v in values]
    )


def _gather_matched_boxes(gt_boxes, img_idx, gt_idx, like: Tensor) -> Tensor:
    if img_idx.numel() == 0:
        return like.new_zeros((0, 4))
    offsets = torch.cumsum(torch.tensor([0] + [len(b) for b in gt_boxes[:-1]]), 0).to(img_idx.device)
    all_boxes = torch.cat([b.to(like.dtype) for b in gt_boxes])
    return all_boxes[offsets[img_idx] + gt_idx]


def _sum_per_image(values: Tensor, img_idx: Tensor, num_images: int) -> Tensor:
    return values.new_zeros(num_images).index_add(0, img_idx, values)


def warn_if_no_positives(num_foreground: Tensor, num_gt_per_image: Sequence[int], assigner: str) -> bool:
    """Warn when a batch with ground truth got no positive anchor at all (e.g. HAMBox's
    single 0.35 threshold on tiny objects): its box and IoU losses are then zero, and
    only the classification loss, all background, trains. Returns whether it warned."""
    if int(num_foreground.sum()) == 0 and sum(int(n) for n in num_gt_per_image) > 0:
        logger.warning(
            "no positive anchor in a batch with %d GT boxes (assigner %s): only background is trained on it; "
            "objects smaller than the anchors can need another assigner or smaller anchor sizes",
            sum(int(n) for n in num_gt_per_image), assigner,
        )
        return True
    return False
