"""Box arithmetic shared by the assigners, the losses and inference.

Boxes are (x1, y1, x2, y2) float tensors in absolute pixels, the convention of
both Detectron2 and torchvision (no "+1" on widths).
"""
import math
from typing import Iterator, Tuple

import torch
from torch import Tensor

# Largest log-ratio a predicted width/height may have, as in Detectron2 and
# torchvision: stops exp() from overflowing on wild deltas.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Anchor <-> box transform of R-CNN / RetinaNet: (dx, dy, dw, dh) deltas.

    Same maths and method names as Detectron2's ``Box2BoxTransform``, so the
    core accepts either object wherever it needs a coder.
    """

    def __init__(
        self,
        weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = DEFAULT_SCALE_CLAMP,
    ):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """Deltas that turn ``src_boxes`` (anchors) into ``target_boxes``."""
        wx, wy, ww, wh = self.weights
        src_w = src_boxes[:, 2] - src_boxes[:, 0]
        src_h = src_boxes[:, 3] - src_boxes[:, 1]
        src_cx = src_boxes[:, 0] + 0.5 * src_w
        src_cy = src_boxes[:, 1] + 0.5 * src_h
        tgt_w = target_boxes[:, 2] - target_boxes[:, 0]
        tgt_h = target_boxes[:, 3] - target_boxes[:, 1]
        tgt_cx = target_boxes[:, 0] + 0.5 * tgt_w
        tgt_cy = target_boxes[:, 1] + 0.5 * tgt_h
        dx = wx * (tgt_cx - src_cx) / src_w
        dy = wy * (tgt_cy - src_cy) / src_h
        dw = ww * torch.log(tgt_w / src_w)
        dh = wh * torch.log(tgt_h / src_h)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Decode ``deltas`` (R, 4) relative to ``boxes`` (R, 4) into boxes."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        dx = deltas[:, 0] / wx
        dy = deltas[:, 1] / wy
        dw = torch.clamp(deltas[:, 2] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3] / wh, max=self.scale_clamp)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        pred_w = torch.exp(dw) * widths
        pred_h = torch.exp(dh) * heights
        return torch.stack(
            (
                pred_ctr_x - 0.5 * pred_w,
                pred_ctr_y - 0.5 * pred_h,
                pred_ctr_x + 0.5 * pred_w,
                pred_ctr_y + 0.5 * pred_h,
            ),
            dim=1,
        )


def box_centers(boxes: Tensor) -> Tensor:
    """(R, 4) boxes -> (R, 2) centres."""
    return torch.stack(
        ((boxes[:, 0] + boxes[:, 2]) * 0.5, (boxes[:, 1] + boxes[:, 3]) * 0.5), dim=1
    )


def centers_inside(centers: Tensor, boxes: Tensor, eps: float = 0.0) -> Tensor:
    """True where a centre lies inside its box by more than ``eps`` px on every side
    (min of the distances to the left, top, right and bottom edges > ``eps``).

    ``centers`` (..., 2) and ``boxes`` (..., 4) broadcast against each other, e.g.
    (G, C, 2) candidate centres against (G, 1, 4) GT boxes. The candidate rule of
    ATSS and TOOD (eps 0.01 in their official code).
    """
    ltrb = torch.stack(
        (
            centers[..., 0] - boxes[..., 0],
            centers[..., 1] - boxes[..., 1],
            boxes[..., 2] - centers[..., 0],
            boxes[..., 3] - centers[..., 1],
        ),
        dim=-1,
    )
    return ltrb.min(dim=-1).values > eps


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]`` (element-wise, differentiable).

    torchvision.ops only offers the pairwise (N x M) IoU; the IoU target of the
    IoU branch needs the diagonal, with gradients, without the N x M matrix.
    """
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    return inter / (area1 + area2 - inter).clamp(min=eps)


def pairwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(N, M) IoU of every box of ``boxes1`` with every box of ``boxes2``.

    The same arithmetic as ``torchvision.ops.box_iou``, in the same order, so the
    same bits; but it works on (N, M) planes of single coordinates instead of
    (N, M, 2) corner tensors, and in place where it can. On the CPU that is 2-3x
    faster at RetinaNet's ~200k anchors, where the assigners spend most of their
    time in this matrix. Not for gradients (it reuses its temporaries). Other
    dtypes (half precision, integers) are computed in float32, where
    torchvision upcasts part of its arithmetic: the same values to rounding.
    """
    if boxes1.dtype not in (torch.float32, torch.float64) or boxes2.dtype not in (torch.float32, torch.float64):
        boxes1, boxes2 = boxes1.float(), boxes2.float()
    x1, y1, x2, y2 = boxes2.t().contiguous().unbind(0)  # contiguous rows vectorise
    gx1, gy1, gx2, gy2 = (c[:, None] for c in boxes1.unbind(1))
    width = torch.minimum(gx2, x2).sub_(torch.maximum(gx1, x1)).clamp_(min=0)
    height = torch.minimum(gy2, y2).sub_(torch.maximum(gy1, y1)).clamp_(min=0)
    inter = width.mul_(height)
    union = ((gx2 - gx1) * (gy2 - gy1) + (x2 - x1) * (y2 - y1)).sub_(inter)
    return inter.div_(union)


def valid_box_mask(boxes: Tensor) -> Tensor:
    """True for finite boxes with strictly positive width and height."""
    finite = torch.isfinite(boxes).all(dim=1)
    return finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


# Upper bound on the elements of one (GTs x anchors) block an assigner holds at
# once: 2**24 floats = 64 MiB. With 200k anchors that is ~80 GTs per block.
DEFAULT_MAX_BLOCK_ELEMENTS = 1 << 24


def gt_chunks(num_gt: int, num_anchors: int, max_elements: int) -> Iterator[slice]:
    """Slices over the GT axis so that each (chunk x anchors) block stays bounded."""
    step = max(1, max_elements // max(num_anchors, 1))
    for start in range(0, num_gt, step):
        yield slice(start, min(start + step, num_gt))


def iou_blocks(gt_boxes: Tensor, boxes: Tensor, max_elements: int) -> Iterator[Tuple[slice, Tensor]]:
    """(chunk, IoU of ``gt_boxes[chunk]`` with every box, (g, A)) over blocks of GTs,
    so that the GT x box IoU matrix never exists whole."""
    for chunk in gt_chunks(gt_boxes.shape[0], boxes.shape[0], max_elements):
        yield chunk, pairwise_box_iou(gt_boxes[chunk], boxes)


class BestGT:
    """Running max over GT blocks: each anchor's highest IoU and the GT that has it.

    On exact ties the earlier GT keeps the anchor (Detectron2's ``Matcher``). An
    anchor that overlaps no GT ends with IoU 0 and GT 0: callers that match on it
    must look at the IoU.
    """

    def __init__(self, num_anchors: int, device):
        self.iou = torch.full((num_anchors,), -1.0, device=device)
        self.gt = torch.zeros(num_anchors, dtype=torch.long, device=device)

    def update(self, iou: Tensor, first_gt: int) -> None:
        """Fold in the (g, A) IoUs of GTs ``first_gt`` .. ``first_gt + g - 1``."""
        vals, idx = iou.max(dim=0)
        better = vals > self.iou  # strict: on exact ties the earlier GT keeps the anchor
        self.iou = torch.where(better, vals, self.iou)
        self.gt = torch.where(better, idx + first_gt, self.gt)


def candidate_ious(boxes: Tensor, candidates: Tensor, gt_boxes: Tensor) -> Tensor:
    """IoU of ``boxes[candidates[g, c]]`` with ``gt_boxes[g]``: (G, C), without the
    G x A matrix. ``candidates`` (G, C) box indices, ``gt_boxes`` (G, 4)."""
    g, c = candidates.shape
    gts = gt_boxes[:, None, :].expand(g, c, 4).reshape(-1, 4)
    return aligned_box_iou(boxes[candidates.reshape(-1)], gts).view(g, c)
