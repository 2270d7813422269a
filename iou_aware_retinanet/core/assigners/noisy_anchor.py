"""Noisy-anchor cleanliness (Li et al., "Learning from Noisy Anchors for
One-stage Object Detection", CVPR 2020).

Follows the official code (henrylee2570/NoisyAnchor, ``retinanet_noisy.py``
and ``MatcherTopN``):

1. candidates: the union of every GT's top-k anchors by anchor IoU; each
   candidate learns from the GT it overlaps most (over all GTs, as the
   official matcher); all other anchors are background (no ignore band);
2. cleanliness inputs, detached: loc_a = IoU(regressed box, its GT) and
   cls_c = predicted probability of that GT's class;
3. soft label c = alpha * loc_a / mean(loc_a) + (1 - alpha) * cls_c / mean(cls_c),
   min-max rescaled per image into [mean(loc_a), 1];
4. re-weighting r = alpha * f(loc_a) / mean(f(loc_a)) + (1 - alpha) * f(cls_c) / mean(f(cls_c)),
   f(x) = 1 / (1 - x), so r has mean 1 over the image's candidates; r
   multiplies the classification and regression losses of candidates.

Differences, all guards: a GT's top-k keeps only anchors that overlap it (IoU > 0;
the official top-k of a GT that overlaps fewer than k anchors takes zero-IoU anchors
and matches them to an arbitrary GT); candidates are counted once in the means (the
official list may repeat an anchor claimed by two GTs); x is clamped below
1 - 1e-6 before f (f(1) is infinite); means are clamped away from 0; when all
candidates have the same c the soft label is 1. The official loss also
rescales the weighted batch loss back to its unweighted total with a detached
scalar; that global scalar is not reproduced (r already has mean 1 per image).
"""
import torch

from ..boxes import BestGT, aligned_box_iou, iou_blocks
from .base import BACKGROUND, Assigner, Assignment, register_assigner

_EPS = 1e-6


def cleanliness(loc_a, cls_c, alpha: float):
    """Soft labels and re-weighting factors of one image's candidates.

    loc_a, cls_c: (P,) values in [0, 1]. Returns (soft_labels, weights), both (P,).
    """
    loc_mean = loc_a.mean().clamp(min=_EPS)
    cls_mean = cls_c.mean().clamp(min=_EPS)
    score = alpha * loc_a / loc_mean + (1 - alpha) * cls_c / cls_mean
    low, high = score.min(), score.max()
    floor = loc_a.mean()
    if high - low > _EPS:
        soft = floor + (score - low) * (1 - floor) / (high - low)
    else:  # all candidates equally clean: nothing to rank, keep hard labels
        soft = torch.ones_like(score)

    def f(x):
        return 1.0 / (1.0 - x.clamp(max=1 - _EPS))

    f_loc, f_cls = f(loc_a), f(cls_c)
    weights = alpha * f_loc / f_loc.mean() + (1 - alpha) * f_cls / f_cls.mean()
    return soft.clamp(0.0, 1.0), weights


@register_assigner("noisy_anchor")
class NoisyAnchorAssigner(Assigner):
    """Top-k candidates per GT, soft labels and loss weights from cleanliness.

    ``topk``: candidates per GT (official default 50; its COCO configs use 30).
    ``alpha``: weight of localization vs classification in the cleanliness (0.75).
    Soft labels are trained with the focal loss on soft targets of the
    official code (``soft_target_loss = "focal"``).
    """

    needs_predictions = True
    soft_target_loss = "focal"

    def __init__(self, num_classes: int, topk: int = 50, alpha: float = 0.75, **kwargs):
        super().__init__(num_classes, **kwargs)
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.topk = int(topk)
        self.alpha = float(alpha)

    @classmethod
    def from_cfg(cls, cfg, num_classes: int) -> "NoisyAnchorAssigner":
        node = cfg.MODEL.ASSIGNER.NOISY_ANCHOR
        return cls(num_classes, topk=node.TOPK, alpha=node.ALPHA)

    def _match(self, anchors, gt_boxes, gt_classes, predictions):
        boxes = anchors.boxes
        num_anchors = boxes.shape[0]
        k = min(self.topk, num_anchors)
        is_candidate = torch.zeros(num_anchors, dtype=torch.bool, device=boxes.device)
        best = BestGT(num_anchors, boxes.device)
        for chunk, iou in iou_blocks(gt_boxes, boxes, self.max_block_elements):  # iou: (g, A)
            vals, idx = iou.topk(k, dim=1)
            # A GT that overlaps fewer than k anchors has zero-IoU anchors in its top-k:
            # they touch no GT and are no candidates (as TopK's IoU > 0 floor).
            is_candidate[idx[vals > 0]] = True
            best.update(iou, chunk.start)
            del iou

        best_gt = best.gt
        matched = torch.where(is_candidate, best_gt, torch.full_like(best_gt, BACKGROUND))
        cand = torch.nonzero(is_candidate).squeeze(1)
        if cand.numel() == 0:  # no GT overlaps any anchor: all background, nothing to rank
            return Assignment(labels=None, matched_gt=matched)
        gt_of_cand = best_gt[cand]
        loc_a = aligned_box_iou(predictions.boxes[cand], gt_boxes[gt_of_cand])
        cls_c = predictions.cls_probs[cand, gt_classes[gt_of_cand]]
        soft, weights = cleanliness(loc_a.float(), cls_c.float(), self.alpha)

        cls_targets = torch.ones(num_anchors, device=boxes.device)
        cls_targets[cand] = soft
        loss_weights = torch.ones(num_anchors, device=boxes.device)
        loss_weights[cand] = weights
        return Assignment(
            labels=None,
            matched_gt=matched,
            cls_targets=cls_targets,
            cls_weights=loss_weights,
            box_weights=loss_weights,
        )
