"""Task-aligned assignment (TOOD, Feng et al., ICCV 2021), as in mmdetection's
``TaskAlignedAssigner`` and TOOD head.

For every (anchor, GT) the alignment metric t = s^a * u^b (a = 1, b = 6), with
s the predicted probability of the GT's class and u the IoU of the anchor's
predicted box with the GT, both detached. Each GT takes its top-k (13) anchors
by t over all levels; a candidate is positive if t > 0 and the anchor centre
lies inside the GT (by more than 0.01 px); an anchor positive for several GTs
goes to the one its predicted box overlaps most. Soft classification target
and box-loss weight of a positive: t_hat = t / max(t) * max(u), the maxima
over that GT's positives. Trained with the quality focal loss. Not included:
TOOD's first-4-epoch ATSS warm-up and its sum-of-targets normalizer (the
project normalizes every assigner by the number of foreground anchors).

Relation to the IoU-aware score: t^(1 / (a + b)) = s^alpha * u^(1 - alpha)
with alpha = a / (a + b) = 1/7, so ranking anchors by t is ranking them by the
paper's S with alpha ~ 0.14 and the true IoU of the predicted box. TOOD picks
training positives with the same kind of fused confidence that IoU-aware
RetinaNet ranks detections with at test time. ``use_iou_prediction`` puts the
IoU branch's prediction in place of u in t (u still measures the real IoU
for conflicts and t_hat), closing that loop.
"""
import torch

from ..boxes import box_centers, candidate_ious, centers_inside, gt_chunks, pairwise_box_iou
from .base import Assigner, Assignment, register_assigner, resolve_conflicts


@register_assigner("task_aligned")
class TaskAlignedAssigner(Assigner):
    needs_predictions = True
    soft_target_loss = "quality_focal"  # TOOD's (GFL's) classification loss

    def __init__(
        self,
        num_classes: int,
        topk: int = 13,
        alpha: float = 1.0,
        beta: float = 6.0,
        center_eps: float = 0.01,
        use_iou_prediction: bool = False,
        **kwargs,
    ):
        super().__init__(num_classes, **kwargs)
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        self.topk = int(topk)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.center_eps = float(center_eps)
        self.use_iou_prediction = bool(use_iou_prediction)

    @classmethod
    def from_cfg(cls, cfg, num_classes: int) -> "TaskAlignedAssigner":
        node = cfg.MODEL.ASSIGNER.TASK_ALIGNED
        return cls(
            num_classes,
            topk=node.TOPK,
            alpha=node.ALPHA,
            beta=node.BETA,
            center_eps=node.CENTER_EPS,
            use_iou_prediction=node.USE_IOU_PREDICTION,
        )

    def _match(self, anchors, gt_boxes, gt_classes, predictions):
        boxes = anchors.boxes
        num_anchors, num_gt = boxes.shape[0], gt_boxes.shape[0]
        device = boxes.device
        if self.use_iou_prediction and predictions.ious is None:
            raise ValueError("use_iou_prediction needs a model with the IoU branch enabled")
        k = min(self.topk, num_anchors)
        anchor_ctr = box_centers(boxes)

        cand_anchor, cand_gt, cand_iou, cand_metric = [], [], [], []
        for chunk in gt_chunks(num_gt, num_anchors, self.max_block_elements):
            gts = gt_boxes[chunk]
            scores = predictions.cls_probs[:, gt_classes[chunk]].T  # (g, A)
            if self.use_iou_prediction:
                quality = predictions.ious[None, :].expand_as(scores)
            else:
                quality = pairwise_box_iou(gts, predictions.boxes)
            metric = scores.pow(self.alpha) * quality.pow(self.beta)
            metric, idx = metric.topk(k, dim=1)  # (g, k), over all levels
            gt_idx = torch.arange(chunk.start, chunk.stop, device=device)[:, None].expand_as(idx)
            inside = centers_inside(anchor_ctr[idx], gts[:, None, :], self.center_eps)  # (g, k)
            keep = inside & (metric > 0)
            iou = candidate_ious(predictions.boxes, idx, gts)
            cand_anchor.append(idx[keep])
            cand_gt.append(gt_idx[keep])
            cand_iou.append(iou[keep])
            cand_metric.append(metric[keep])
            del scores, quality

        cand_anchor, cand_gt = torch.cat(cand_anchor), torch.cat(cand_gt)
        cand_iou, cand_metric = torch.cat(cand_iou), torch.cat(cand_metric)
        matched = resolve_conflicts(cand_anchor, cand_gt, cand_iou, num_anchors)

        # Keep the winning claims, then normalize t per GT over its positives.
        won = matched[cand_anchor] == cand_gt
        anchor, gt, iou, metric = cand_anchor[won], cand_gt[won], cand_iou[won], cand_metric[won]
        max_metric = torch.zeros(num_gt, device=device).scatter_reduce(0, gt, metric, "amax")
        max_iou = torch.zeros(num_gt, device=device).scatter_reduce(0, gt, iou, "amax")
        targets = torch.zeros(num_anchors, device=device)
        targets[anchor] = (metric / (max_metric[gt] + 1e-7) * max_iou[gt]).to(targets.dtype)
        return Assignment(
            labels=None,
            matched_gt=matched,
            cls_targets=targets,
            box_weights=targets,
        )

