"""HAMBox online high-quality anchor compensation (Liu et al., CVPR 2020).

After a static assignment, many of the best regressed boxes come from anchors
the static rule called negative. HAMBox lets them help the GTs that got too
few anchors:

1. base assignment (default: one IoU threshold, 0.35, no low-quality
   matches, as in the public reimplementation chyueG/HAMBox-high-anchors-mining);
2. regress every anchor (detached predictions) and compute IoU(regressed box, GT);
3. every GT with M < K matched anchors takes, among the anchors that are not
   foreground, the K - M whose regressed box overlaps it most, if that IoU > T;
   an anchor wanted by two GTs goes to the higher regressed IoU;
4. compensated anchors are foreground (class and box of that GT) and their
   classification loss is weighted by that regressed IoU (detached);
5. anchors left unmatched whose regressed box has IoU >= T with some GT get no
   classification loss (ignored): they are good boxes the rule did not pick,
   not negatives.

This is the paper's K - M rule; the reimplementation's latest version instead
tops every GT up from its own top-K regressed anchors and lets the later GT win
conflicts (docs/configuration.md, "Label assigners").
"""
import torch

from ..boxes import aligned_box_iou, iou_blocks
from .base import (
    IGNORE,
    Assigner,
    Assignment,
    assigner_class,
    assigner_from_cfg,
    build_assigner,
    register_assigner,
    resolve_conflicts,
)


@register_assigner("hambox")
class HAMBoxAssigner(Assigner):
    """Online compensation on top of ``base`` (an Assigner instance).

    ``anchors_per_gt`` (the paper's K): anchors each GT should end with (5);
    ``regressed_iou_threshold`` (the paper's T): regressed-IoU threshold for
    compensation and for the ignore rule (0.5).
    """

    needs_predictions = True

    def __init__(
        self,
        num_classes: int,
        base: Assigner,
        anchors_per_gt: int = 5,
        regressed_iou_threshold: float = 0.5,
        **kwargs,
    ):
        super().__init__(num_classes, **kwargs)
        _check_static(type(base))
        if base.num_classes != num_classes:
            raise ValueError(f"base assigner has {base.num_classes} classes, expected {num_classes}")
        if anchors_per_gt < 1:
            raise ValueError(f"anchors_per_gt must be >= 1, got {anchors_per_gt}")
        if not 0.0 <= regressed_iou_threshold < 1.0:
            raise ValueError(f"regressed_iou_threshold must lie in [0, 1), got {regressed_iou_threshold}")
        self.base = base
        self.anchors_per_gt = int(anchors_per_gt)
        self.regressed_iou_threshold = float(regressed_iou_threshold)

    @classmethod
    def from_cfg(cls, cfg, num_classes: int) -> "HAMBoxAssigner":
        """``MODEL.ASSIGNER.HAMBOX``; ``BASE_ASSIGNER`` "" is HAMBox's own base, the single
        IoU threshold ``MATCH_THRESHOLD`` without low-quality matches; a registered static
        assigner's name is that assigner, built from its own keys."""
        node = cfg.MODEL.ASSIGNER.HAMBOX
        name = node.BASE_ASSIGNER
        try:
            if not name:
                base = build_assigner(
                    "max_iou", num_classes, thresholds=[node.MATCH_THRESHOLD], labels=[0, 1],
                    allow_low_quality_matches=False,
                )
            else:
                _check_static(assigner_class(name))  # before building: "hambox" would recurse
                base = assigner_from_cfg(name, cfg, num_classes)
        except ValueError as e:
            raise ValueError(f"BASE_ASSIGNER={name!r}: {e}") from None
        return cls(
            num_classes, base=base, anchors_per_gt=node.ANCHORS_PER_GT,
            regressed_iou_threshold=node.REGRESSED_IOU_THRESHOLD,
        )

    def _match(self, anchors, gt_boxes, gt_classes, predictions):
        num_anchors, num_gt = len(anchors), gt_boxes.shape[0]
        device = anchors.boxes.device
        # The base's public call on the already clean GT: same indices, no private API.
        matched = self.base(anchors, gt_boxes, gt_classes).matched_gt.clone()
        unmatched = matched < 0
        num_matched = torch.bincount(matched[~unmatched], minlength=num_gt)
        wanted = (self.anchors_per_gt - num_matched).clamp(min=0)  # K - M per GT

        best_reg_iou = torch.zeros(num_anchors, device=device)
        claim_anchor, claim_gt, claim_iou = [], [], []
        k = min(self.anchors_per_gt, num_anchors)
        for chunk, reg_iou in iou_blocks(gt_boxes, predictions.boxes, self.max_block_elements):  # (g, A)
            best_reg_iou = torch.maximum(best_reg_iou, reg_iou.max(dim=0).values)
            vals, idx = torch.where(unmatched, reg_iou, torch.zeros_like(reg_iou)).topk(k, dim=1)
            rank = torch.arange(k, device=device)[None, :]
            take = (rank < wanted[chunk, None]) & (vals > self.regressed_iou_threshold)
            gts = torch.arange(chunk.start, chunk.stop, device=device)[:, None].expand_as(idx)
            claim_anchor.append(idx[take])
            claim_gt.append(gts[take])
            claim_iou.append(vals[take])
            del reg_iou

        compensated = resolve_conflicts(
            torch.cat(claim_anchor), torch.cat(claim_gt), torch.cat(claim_iou), num_anchors
        )
        is_comp = compensated >= 0
        matched[is_comp] = compensated[is_comp]

        cls_weights = torch.ones(num_anchors, device=device)
        if is_comp.any():
            # The regressed IoU of the compensated anchor with its new GT.
            comp_idx = torch.nonzero(is_comp).squeeze(1)
            cls_weights[comp_idx] = aligned_box_iou(predictions.boxes[comp_idx], gt_boxes[matched[comp_idx]])

        still_unmatched = matched < 0
        matched[still_unmatched & (best_reg_iou >= self.regressed_iou_threshold)] = IGNORE
        return Assignment(labels=None, matched_gt=matched, cls_weights=cls_weights)


def _check_static(base_cls) -> None:
    if base_cls.needs_predictions:
        raise ValueError("the HAMBox base assignment must be a static assigner")
