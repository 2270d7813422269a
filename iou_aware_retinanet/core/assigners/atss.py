"""ATSS: Adaptive Training Sample Selection (Zhang et al., CVPR 2020).

Follows the official code (sfzhang15/ATSS, ``atss_core/modeling/rpn/atss/loss.py``):
per level, the k x anchors-per-location anchors whose centres are nearest the
GT centre are candidates; the IoU threshold of a GT is mean + std (unbiased)
of its candidates' IoUs; a candidate is positive if its IoU reaches that
threshold and its centre lies inside the GT by more than 0.01 px; an anchor
positive for several GTs takes the one it overlaps most; everything else is
background. Differences: IoUs are computed without the legacy "+1" pixel of
maskrcnn-benchmark (Detectron2 / torchvision convention), and the std of a
single candidate (undefined) is taken as 0.
"""
import torch

from ..boxes import box_centers, candidate_ious, centers_inside, gt_chunks
from .base import Assignment, BACKGROUND, Assigner, register_assigner, resolve_conflicts


@register_assigner("atss")
class ATSSAssigner(Assigner):
    """ATSS with an optional guarantee of one positive per GT.

    ``ensure_positive`` (default False, the official behaviour): mean + std can
    exceed every candidate's IoU, and a tiny or thin GT may contain no
    candidate centre, so such a GT trains no positive at all (ATSS issue 90).
    When True, a GT left without positives receives its highest-IoU candidate
    among the anchors that no other GT holds (IoU > 0 required; the centre rule
    is waived). Starved GTs competing for the same anchor are served in rounds,
    highest IoU first, so every GT that has a free candidate with IoU > 0 ends
    with at least one positive.
    """

    def __init__(
        self,
        num_classes: int,
        topk: int = 9,
        center_eps: float = 0.01,
        ensure_positive: bool = False,
        **kwargs,
    ):
        super().__init__(num_classes, **kwargs)
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = int(topk)
        self.center_eps = float(center_eps)
        self.ensure_positive = bool(ensure_positive)

    @classmethod
    def from_cfg(cls, cfg, num_classes: int) -> "ATSSAssigner":
        node = cfg.MODEL.ASSIGNER.ATSS
        return cls(num_classes, topk=node.TOPK, center_eps=node.CENTER_EPS, ensure_positive=node.ENSURE_POSITIVE)

    def candidates(self, anchors, gt_boxes):
        """Candidate anchors of every GT: (G, C) anchor indices and their IoUs."""
        boxes = anchors.boxes
        anchor_ctr = box_centers(boxes)
        gt_ctr = box_centers(gt_boxes)
        per_level_k = self.topk * anchors.num_per_location
        # Rank locations rather than anchors where the anchors of a location are
        # concentric (the usual layout): same candidates, num_per_location x less work.
        levels = []
        for level in anchors.level_slices():
            ctr = anchor_ctr[level]
            if ctr.shape[0] == 0:
                continue
            locations = _location_centers(ctr, anchors.num_per_location)
            group = 1 if locations is None else anchors.num_per_location
            points = ctr if locations is None else locations
            k = min(per_level_k, ctr.shape[0]) // group
            levels.append((level.start, points, group, k))
        cand_idx, cand_iou = [], []
        for chunk in gt_chunks(gt_boxes.shape[0], boxes.shape[0], self.max_block_elements):
            idx_chunk = []
            for start, points, group, k in levels:
                # Squared distance ranks like the official Euclidean distance;
                # computed in place to spare allocations of (g, A_level) blocks.
                dist = points[None, :, 0] - gt_ctr[chunk, None, 0]
                dist.square_()
                dy = points[None, :, 1] - gt_ctr[chunk, None, 1]
                dist.add_(dy.square_())
                del dy
                nearest = dist.topk(k, dim=1, largest=False).indices  # (g, k)
                del dist
                if group > 1:
                    offsets = torch.arange(group, device=nearest.device)
                    nearest = (nearest[:, :, None] * group + offsets).flatten(1)
                idx_chunk.append(nearest + start)
            idx = torch.cat(idx_chunk, dim=1)  # (g, C)
            cand_idx.append(idx)
            cand_iou.append(candidate_ious(boxes, idx, gt_boxes[chunk]))
        return torch.cat(cand_idx), torch.cat(cand_iou)

    def _match(self, anchors, gt_boxes, gt_classes, predictions):
        boxes = anchors.boxes
        num_anchors, num_gt = boxes.shape[0], gt_boxes.shape[0]
        cand_idx, cand_iou = self.candidates(anchors, gt_boxes)  # (G, C)

        std = cand_iou.std(dim=1) if cand_iou.shape[1] > 1 else torch.zeros_like(cand_iou[:, 0])
        threshold = cand_iou.mean(dim=1) + std
        is_pos = cand_iou >= threshold[:, None]

        # Centre of the candidate strictly inside the GT.
        is_pos &= centers_inside(box_centers(boxes)[cand_idx], gt_boxes[:, None, :], self.center_eps)

        gt_of_cand = torch.arange(num_gt, device=boxes.device)[:, None].expand_as(cand_idx)
        matched = resolve_conflicts(
            cand_idx[is_pos], gt_of_cand[is_pos], cand_iou[is_pos], num_anchors
        )
        if self.ensure_positive:
            matched = self._feed_starved_gts(matched, cand_idx, cand_iou, num_gt)
        return Assignment(labels=None, matched_gt=matched)

    def _feed_starved_gts(self, matched, cand_idx, cand_iou, num_gt):
        """Give each GT without positives its best free candidate (see class doc)."""
        num_anchors = matched.shape[0]
        all_gts = torch.arange(num_gt, device=matched.device)
        # Each round serves at least one starved GT or stops, so num_gt rounds suffice.
        for _ in range(num_gt):
            has_pos = torch.zeros(num_gt, dtype=torch.bool, device=matched.device)
            has_pos[matched[matched >= 0]] = True
            free_iou = torch.where(matched[cand_idx] == BACKGROUND, cand_iou, torch.zeros_like(cand_iou))
            free_iou[has_pos] = 0.0
            best_iou, best_col = free_iou.max(dim=1)
            hungry = best_iou > 0
            if not hungry.any():
                break
            anchor = cand_idx[all_gts, best_col]
            extra = resolve_conflicts(anchor[hungry], all_gts[hungry], best_iou[hungry], num_anchors)
            won = extra >= 0
            matched = torch.where(won, extra, matched)
        return matched


def _location_centers(centers, num_per_location, atol=1e-3):
    """(L, 2) centres of the locations if every run of ``num_per_location``
    consecutive anchors shares one centre (to float noise, ``atol`` px), else None.

    Then the k x num_per_location nearest anchors of the official code are the
    k nearest locations' anchors (up to ties in distance).
    """
    if num_per_location == 1 or centers.shape[0] % num_per_location:
        return None
    groups = centers.view(-1, num_per_location, 2)
    first = groups[:, :1]
    if not bool(((groups - first).abs() <= atol).all()):
        return None
    return first[:, 0]
