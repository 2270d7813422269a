"""Max-IoU assignment: RetinaNet's baseline, with Detectron2's ``Matcher`` semantics."""
import math
from typing import Sequence

import torch

from ..boxes import BestGT, iou_blocks
from .base import Assignment, BACKGROUND, IGNORE, Assigner, register_assigner

_CODE_OF_LABEL = {1: None, 0: BACKGROUND, -1: IGNORE}  # Matcher label -> matched_gt code


@register_assigner("max_iou")
class MaxIoUAssigner(Assigner):
    """Each anchor takes the GT it overlaps most; its IoU decides the label.

    ``thresholds`` [t1, ..., tn] cut [0, 1] into n + 1 intervals [-inf, t1),
    [t1, t2), ..., [tn, inf); ``labels`` gives each interval 1 (foreground),
    0 (background) or -1 (ignore). RetinaNet: thresholds (0.4, 0.5), labels
    (0, -1, 1). With ``allow_low_quality_matches`` every anchor tied for a GT's
    highest IoU becomes foreground (it keeps its own best GT, as in Detectron2).

    One deliberate difference from Detectron2's ``Matcher``: a GT whose best
    IoU is 0 (it overlaps no anchor) makes no low-quality match; Detectron2
    would turn every anchor with IoU 0, i.e. nearly all of them, positive.
    """

    def __init__(
        self,
        num_classes: int,
        thresholds: Sequence[float] = (0.4, 0.5),
        labels: Sequence[int] = (0, -1, 1),
        allow_low_quality_matches: bool = True,
        **kwargs,
    ):
        super().__init__(num_classes, **kwargs)
        thresholds = [float(t) for t in thresholds]
        if any(a > b for a, b in zip(thresholds[:-1], thresholds[1:])):
            raise ValueError(f"thresholds must be sorted, got {thresholds}")
        if len(labels) != len(thresholds) + 1:
            raise ValueError(
                f"need len(thresholds) + 1 labels, got thresholds {thresholds} and labels {list(labels)}"
            )
        if any(label not in _CODE_OF_LABEL for label in labels):
            raise ValueError(f"labels must be in {{-1, 0, 1}}, got {list(labels)}")
        self.thresholds = [-math.inf] + thresholds + [math.inf]
        self.labels = [int(label) for label in labels]
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    @classmethod
    def from_cfg(cls, cfg, num_classes: int) -> "MaxIoUAssigner":
        # The thresholds are RetinaNet's own keys, as for Detectron2's Matcher.
        return cls(
            num_classes,
            thresholds=cfg.MODEL.RETINANET.IOU_THRESHOLDS,
            labels=cfg.MODEL.RETINANET.IOU_LABELS,
            allow_low_quality_matches=cfg.MODEL.ASSIGNER.MAX_IOU.ALLOW_LOW_QUALITY_MATCHES,
        )

    def _match(self, anchors, gt_boxes, gt_classes, predictions):
        boxes = anchors.boxes
        best = BestGT(boxes.shape[0], boxes.device)
        low_quality = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        for chunk, iou in iou_blocks(gt_boxes, boxes, self.max_block_elements):  # iou: (g, A)
            best.update(iou, chunk.start)
            if self.allow_low_quality_matches:
                best_per_gt = iou.max(dim=1, keepdim=True).values
                best_per_gt[best_per_gt <= 0] = math.inf  # a GT that overlaps no anchor matches none
                low_quality |= (iou == best_per_gt).any(dim=0)
            del iou

        matched = best.gt.clone()
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            code = _CODE_OF_LABEL[label]
            if code is not None:
                matched[(best.iou >= low) & (best.iou < high)] = code
        if self.allow_low_quality_matches:
            matched[low_quality] = best.gt[low_quality]
        return Assignment(labels=None, matched_gt=matched)
