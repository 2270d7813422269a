"""TopK per GT: every object gets its k best-overlapping anchors, whatever its size."""
import torch

from ..boxes import iou_blocks
from .base import Assignment, Assigner, register_assigner, resolve_conflicts


@register_assigner("topk")
class TopKAssigner(Assigner):
    """Each GT takes its ``topk`` highest-IoU anchors (over all levels) as positives.

    An anchor claimed by several GTs goes to the one it overlaps most; every
    other anchor is background (no ignore band). Claims with IoU below
    ``min_iou`` are dropped, and so are claims with IoU 0: without a floor a
    tiny GT would otherwise take anchors that do not even touch it.
    """

    def __init__(self, num_classes: int, topk: int = 9, min_iou: float = 0.0, **kwargs):
        super().__init__(num_classes, **kwargs)
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not 0.0 <= min_iou <= 1.0:
            raise ValueError(f"min_iou must lie in [0, 1], got {min_iou}")
        self.topk = int(topk)
        self.min_iou = float(min_iou)

    @classmethod
    def from_cfg(cls, cfg, num_classes: int) -> "TopKAssigner":
        node = cfg.MODEL.ASSIGNER.TOPK
        return cls(num_classes, topk=node.TOPK, min_iou=node.MIN_IOU)

    def _match(self, anchors, gt_boxes, gt_classes, predictions):
        boxes = anchors.boxes
        num_anchors = boxes.shape[0]
        k = min(self.topk, num_anchors)
        anchor_idx, gt_idx, ious = [], [], []
        for chunk, iou in iou_blocks(gt_boxes, boxes, self.max_block_elements):  # iou: (g, A)
            vals, idx = iou.topk(k, dim=1)  # (g, k)
            gts = torch.arange(chunk.start, chunk.stop, device=boxes.device)[:, None].expand_as(idx)
            anchor_idx.append(idx.reshape(-1))
            gt_idx.append(gts.reshape(-1))
            ious.append(vals.reshape(-1))
            del iou
        anchor_idx, gt_idx, ious = torch.cat(anchor_idx), torch.cat(gt_idx), torch.cat(ious)
        keep = (ious > 0) & (ious >= self.min_iou)
        matched = resolve_conflicts(anchor_idx[keep], gt_idx[keep], ious[keep], num_anchors)
        return Assignment(labels=None, matched_gt=matched)
