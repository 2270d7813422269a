"""The method's training step, framework-free: from a batch's dense head outputs
and its ground truth to one summed loss per image.

    detached predictions (only for a dynamic assigner) -> assign each image
    -> ``dense_detection_losses``

Both front-ends flatten their framework's tensors into the layout below, call
:func:`training_losses`, and divide by their own normalizer (Detectron2: an
EMA of the batch's positives; torchvision: each image's positives), which is
the one thing in which their upstream RetinaNets differ.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .assigners import AnchorSet, Assigner, Assignment, Predictions
from .losses import LossConfig, dense_detection_losses, warn_if_no_positives

__all__ = ["detached_predictions", "assign_batch", "training_losses"]


@torch.no_grad()
def detached_predictions(
    cls_logits: Tensor, box_deltas: Tensor, iou_logits: Optional[Tensor], anchors: Tensor, box_coder
) -> List[Predictions]:
    """What the dynamic assigners look at: per image, detached class probabilities,
    decoded boxes and IoU predictions. cls_logits (N, A, K), box_deltas (N, A, 4),
    iou_logits (N, A) or None, anchors (A, 4) shared by the batch. float32 whatever the
    outputs' type (autocast): the assigners' metrics (e.g. s^alpha * u^beta) and their
    float32 buffers need it."""
    probs = cls_logits.detach().float().sigmoid()
    ious = iou_logits.detach().float().sigmoid() if iou_logits is not None else None
    return [
        Predictions(
            cls_probs=probs[i],
            boxes=box_coder.apply_deltas(box_deltas[i].detach(), anchors),
            ious=None if ious is None else ious[i],
        )
        for i in range(probs.shape[0])
    ]


@torch.no_grad()
def assign_batch(
    assigner: Assigner,
    anchors: AnchorSet,
    gt_boxes: Sequence[Tensor],
    gt_classes: Sequence[Tensor],
    predictions: Optional[Sequence[Predictions]] = None,
) -> List[Assignment]:
    """One ``Assignment`` per image; GT indices refer to ``gt_boxes[i]``."""
    return [
        assigner(anchors, boxes, classes, None if predictions is None else predictions[i])
        for i, (boxes, classes) in enumerate(zip(gt_boxes, gt_classes))
    ]


def training_losses(
    cls_logits: Tensor,
    box_deltas: Tensor,
    iou_logits: Optional[Tensor],
    anchors: AnchorSet,
    gt_boxes: Sequence[Tensor],
    gt_classes: Sequence[Tensor],
    assigner: Assigner,
    box_coder,
    config: LossConfig,
) -> Dict[str, Tensor]:
    """Per-image summed losses of a batch, before normalization.

    Returns ``dense_detection_losses``' dict: ``loss_cls``, ``loss_box_reg``
    (and ``loss_iou`` + the IoU targets' entropy with the IoU branch), each (N,),
    and ``num_foreground`` (N,), the normalizers' input. Warns when an image
    with GT boxes got no positive anchor.
    """
    predictions = None
    if assigner.needs_predictions:
        predictions = detached_predictions(cls_logits, box_deltas, iou_logits, anchors.boxes, box_coder)
    assignments = assign_batch(assigner, anchors, gt_boxes, gt_classes, predictions)
    per_image = dense_detection_losses(
        cls_logits=cls_logits,
        box_deltas=box_deltas,
        iou_logits=iou_logits,
        anchors=anchors.boxes,
        assignments=assignments,
        gt_boxes=list(gt_boxes),
        box_coder=box_coder,
        config=config,
    )
    warn_if_no_positives(per_image["num_foreground"], [len(b) for b in gt_boxes], type(assigner).__name__)
    return per_image
