"""The test oracle of ATSS: the official code's per-GT loop, restated plainly."""
import math

import torch
from torch import Tensor
from torchvision.ops import box_iou

from iou_aware_retinanet.core import AnchorSet
from iou_aware_retinanet.core.assigners import BACKGROUND


def reference_atss(
    anchors: AnchorSet, gt_boxes: Tensor, topk: int = 9, center_eps: float = 0.01
) -> Tensor:
    """ATSS as the official code states it (sfzhang15/ATSS, ``atss/loss.py``), one GT at a time.

    The straightforward form the project's vectorised ``ATSSAssigner`` must
    agree with. Per GT: IoU with every anchor;
    on every level the ``topk * anchors-per-location`` anchors with the
    nearest centres (Euclidean) are candidates; threshold = mean + unbiased
    std of their IoUs; positive = IoU >= threshold and anchor centre inside
    the GT by more than ``center_eps``; an anchor positive for several GTs
    keeps the highest IoU (the first GT on exact ties, like ``argmax``).
    Only deliberate difference from the official code: IoU without the
    legacy "+1" pixel. Returns (A,) matched GT index, -1 for background.
    """
    boxes = anchors.boxes
    num_anchors = boxes.shape[0]
    anchor_ctr = (boxes[:, :2] + boxes[:, 2:]) / 2
    per_level_k = topk * anchors.num_per_location
    best_iou = torch.full((num_anchors,), -math.inf)
    matched = torch.full((num_anchors,), BACKGROUND, dtype=torch.long)
    for g in range(gt_boxes.shape[0]):
        gt = gt_boxes[g]
        ious = box_iou(gt[None], boxes)[0]  # (A,)
        gt_ctr = (gt[:2] + gt[2:]) / 2
        distances = (anchor_ctr - gt_ctr).pow(2).sum(dim=1).sqrt()
        candidates = []
        for level in anchors.level_slices():
            level_dist = distances[level]
            k = min(per_level_k, level_dist.shape[0])
            candidates.append(level_dist.topk(k, largest=False).indices + level.start)
        candidates = torch.cat(candidates)
        cand_iou = ious[candidates]
        threshold = cand_iou.mean() + cand_iou.std()
        cx, cy = anchor_ctr[candidates].unbind(dim=1)
        margin = torch.stack((cx - gt[0], cy - gt[1], gt[2] - cx, gt[3] - cy)).min(dim=0).values
        positive = candidates[(cand_iou >= threshold) & (margin > center_eps)]
        wins = positive[ious[positive] > best_iou[positive]]
        best_iou[wins] = ious[wins]
        matched[wins] = g
    return matched
