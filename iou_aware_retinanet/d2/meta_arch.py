"""Detectron2 front-end: ``IoUAwareRetinaNet`` and its head.

A thin layer over ``iou_aware_retinanet.core``: Detectron2's RetinaNet keeps
its backbone, anchors, box transform and pre/post-processing; this class swaps
the Matcher for a core assigner, adds the IoU branch and its loss, and ranks
detections by the fused score. With ``MODEL.IOU_AWARE.ENABLED False`` and the
``max_iou`` assigner it computes what Detectron2's ``RetinaNet`` computes
(tests/d2/test_equivalence.py checks it).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from ..config import build_assigner_from_cfg, inference_config_from_cfg, loss_config_from_cfg, loss_normalizer_from_cfg
from ..core import (
    AnchorSet,
    Assigner,
    Assignment,
    Detections,
    InferenceConfig,
    LossConfig,
    assign_batch,
    box_and_iou_outputs,
    build_iou_predictor,
    postprocess_batch,
    postprocess_image,
    training_losses,
)
from ..core.losses import IOU_TARGET_ENTROPY

__all__ = ["IoUAwareRetinaNet", "IoUAwareRetinaNetHead"]


class IoUAwareRetinaNetHead(RetinaNetHead):
    """RetinaNet's head plus the IoU branch on the last feature of the box tower.

    Same parameter names as ``RetinaNetHead``, so RetinaNet checkpoints load
    into it (the IoU conv, ``iou_pred``, then starts from its initialisation).
    """

    @configurable
    def __init__(self, *, conv_dims: List[int], num_anchors: int, iou_branch: bool = True, **kwargs):
        """``iou_branch``: add the IoU conv; other arguments as ``RetinaNetHead``."""
        super().__init__(conv_dims=conv_dims, num_anchors=num_anchors, **kwargs)
        self.iou_pred = build_iou_predictor(conv_dims[-1], num_anchors) if iou_branch else None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["iou_branch"] = cfg.MODEL.IOU_AWARE.ENABLED
        return ret

    def forward(self, features: List[Tensor]):
        """Per-level (N, A*K, H, W) logits, (N, A*4, H, W) deltas and, with the
        IoU branch, (N, A, H, W) IoU logits."""
        logits = [self.cls_score(self.cls_subnet(feature)) for feature in features]
        bbox_features = [self.bbox_subnet(feature) for feature in features]
        if self.iou_pred is None:
            return logits, [self.bbox_pred(f) for f in bbox_features]
        bbox_reg, iou_logits = box_and_iou_outputs(bbox_features, self.bbox_pred, self.iou_pred)
        return logits, bbox_reg, iou_logits


@META_ARCH_REGISTRY.register()
class IoUAwareRetinaNet(RetinaNet):
    """RetinaNet + IoU prediction branch + pluggable label assignment.

    Training losses: ``loss_cls`` (focal), ``loss_box_reg`` and, with the IoU
    branch, ``loss_iou`` (BCE against IoU(predicted box, GT)), all divided by
    Detectron2's EMA of the number of foreground anchors. Inference ranks by
    S = p^alpha * IoU^(1 - alpha); output ``Instances`` carry ``scores`` (S),
    ``pred_classes``, ``pred_boxes`` and, with the branch, ``cls_scores`` (p)
    and ``pred_ious``.
    """

    @configurable
    def __init__(
        self,
        *,
        assigner: Assigner,
        loss_config: LossConfig,
        inference_config: InferenceConfig,
        num_anchors_per_location: int,
        **kwargs,
    ):
        # The Matcher is replaced by the assigner; Detectron2's own threshold
        # arguments stay in the config so its tools keep working.
        kwargs["anchor_matcher"] = None
        super().__init__(**kwargs)
        self.assigner = assigner
        self.loss_config = loss_config
        self.inference_config = inference_config
        self.num_anchors_per_location = num_anchors_per_location

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        backbone_shape = ret["backbone"].output_shape()
        feature_shapes = [backbone_shape[f] for f in cfg.MODEL.RETINANET.IN_FEATURES]
        ret["head"] = IoUAwareRetinaNetHead(cfg, feature_shapes)
        ret["num_anchors_per_location"] = ret["anchor_generator"].num_cell_anchors[0]
        ret["assigner"] = build_assigner_from_cfg(cfg)
        ret["loss_config"] = loss_config_from_cfg(cfg)
        loss_normalizer_from_cfg(cfg, "detectron2")  # Detectron2's EMA normalizer is the only one here
        ret["inference_config"] = inference_config_from_cfg(cfg)
        return ret

    @property
    def iou_aware(self) -> bool:
        return self.head.iou_pred is not None

    def _split_predictions(self, predictions):
        """(N, Hi*Wi*A, K), (N, ..., 4) and, with the IoU branch, (N, ..., 1) per level."""
        dims = [self.num_classes, 4] + ([1] if self.iou_aware else [])
        transposed = self._transpose_dense_predictions(predictions, dims)
        if not self.iou_aware:
            transposed.append(None)
        return transposed

    # ------------------------------------------------------------------ training
    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_deltas, pred_ious = self._split_predictions(predictions)
        anchors = self.anchor_generator(features)
        per_image = training_losses(
            cat(pred_logits, dim=1), cat(pred_deltas, dim=1),
            cat(pred_ious, dim=1).squeeze(-1) if pred_ious is not None else None,
            self._anchor_set(anchors),
            [inst.gt_boxes.tensor for inst in gt_instances], [inst.gt_classes for inst in gt_instances],
            self.assigner, self.box2box_transform, self.loss_config,
        )  # fmt: skip
        return self._normalize(per_image, len(gt_instances))

    def _anchor_set(self, anchors: List[Boxes]) -> AnchorSet:
        return AnchorSet(
            boxes=Boxes.cat(anchors).tensor,
            num_per_level=tuple(len(a) for a in anchors),
            num_per_location=self.num_anchors_per_location,
        )

    def assign(self, anchors: List[Boxes], gt_instances: List[Instances], predictions=None) -> List[Assignment]:
        """One core ``Assignment`` per image."""
        return assign_batch(
            self.assigner, self._anchor_set(anchors),
            [inst.gt_boxes.tensor for inst in gt_instances], [inst.gt_classes for inst in gt_instances], predictions,
        )  # fmt: skip

    @torch.no_grad()
    def label_anchors(self, anchors, gt_instances):
        """Detectron2's ``RetinaNet.label_anchors`` interface on the core assigner:
        per image, labels in {-1, 0..K-1, K} and the matched GT box of each anchor
        (zeros where the anchor is not foreground)."""
        gt_labels, matched_gt_boxes = [], []
        for assignment, inst in zip(self.assign(anchors, gt_instances), gt_instances):
            boxes = torch.zeros(len(assignment.labels), 4, device=assignment.labels.device)
            fg = assignment.foreground
            boxes[fg] = inst.gt_boxes.tensor[assignment.matched_gt[fg]]
            gt_labels.append(assignment.labels)
            matched_gt_boxes.append(boxes)
        return gt_labels, matched_gt_boxes

    def _normalize(self, per_image, num_images: int):
        """Detectron2's RetinaNet normalization: the batch sums over an EMA of its positives."""
        num_pos_anchors = per_image.pop("num_foreground").sum().item()
        get_event_storage().put_scalar("num_pos_anchors", num_pos_anchors / num_images)
        normalizer = self._ema_update("loss_normalizer", max(num_pos_anchors, 1), 100)
        entropy = per_image.pop(IOU_TARGET_ENTROPY, None)
        losses = {name: loss.sum() / normalizer for name, loss in per_image.items()}
        if entropy is not None:  # loss_iou's floor: see core.losses
            get_event_storage().put_scalar("loss_iou_minus_entropy", float(losses["loss_iou"].detach() - entropy.sum() / normalizer))
        return losses

    # ----------------------------------------------------------------- inference
    def forward_inference(self, images: ImageList, features: List[Tensor], predictions):
        pred_logits, pred_deltas, pred_ious = self._split_predictions(predictions)
        anchors = [a.tensor for a in self.anchor_generator(features)]
        detections = postprocess_batch(
            pred_logits, pred_deltas, None if pred_ious is None else [x[..., 0] for x in pred_ious],
            [anchors] * len(images.image_sizes), self.box2box_transform, images.image_sizes, self.inference_config,
        )  # fmt: skip
        return [_to_instances(det, size) for det, size in zip(detections, images.image_sizes)]

    def inference_single_image(
        self,
        anchors: List[Boxes],
        box_cls: List[Tensor],
        box_delta: List[Tensor],
        image_size: Tuple[int, int],
        box_iou: Optional[List[Tensor]] = None,
    ):
        """Like ``RetinaNet.inference_single_image``, ranking by the fused score.

        ``box_iou``: per level (Hi*Wi*A,) IoU predictions in [0, 1], or None.
        """
        det = postprocess_image(
            box_cls, box_delta, box_iou, [a.tensor for a in anchors],
            self.box2box_transform, image_size, self.inference_config,
        )
        return _to_instances(det, image_size)


def _to_instances(det: Detections, image_size: Tuple[int, int]) -> Instances:
    result = Instances(image_size, pred_boxes=Boxes(det.boxes), scores=det.scores, pred_classes=det.classes)
    if det.ious is not None:
        result.cls_scores = det.cls_scores
        result.pred_ious = det.ious
    return result
