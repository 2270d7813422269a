"""Detectron2 front-end: ``IoUAwareRetinaNet`` and its head.

A thin layer over ``iou_aware_retinanet.core``: Detectron2's RetinaNet keeps
its backbone, anchors, box transform and pre/post-processing; this class swaps
the Matcher for a core assigner, adds the IoU branch and its loss, and ranks
detections by the fused score. With ``MODEL.IOU_AWARE.ENABLED False`` and the
``max_iou`` assigner it computes what Detectron2's ``RetinaNet`` computes
(tests/d2/test_equivalence.py checks it). In eval mode it scripts and traces
as Detectron2's RetinaNet does (:mod:`.export`, docs/deployment.md).
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
    build_iou_predictor,
    postprocess_image,
    training_losses,
)
from ..core.head import box_and_iou_conv_outputs
from ..core.inference import detect_image, image_predictions
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
        """Per-level (N, A*K, H, W) logits and (N, A*4, H, W) deltas, as
        ``RetinaNetHead``; with the IoU branch a third output, per-level (N, A, H, W)
        IoU logits (as FCOS's head adds its centerness)."""
        logits = [self.cls_score(self.cls_subnet(feature)) for feature in features]
        bbox_features = [self.bbox_subnet(feature) for feature in features]
        if self.iou_pred is None:
            return logits, [self.bbox_pred(f) for f in bbox_features]
        box, iou = self.bbox_pred, self.iou_pred
        bbox_reg, iou_logits = box_and_iou_conv_outputs(bbox_features, box.weight, box.bias, iou.weight, iou.bias)
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
        channels_last: bool = False,
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
        if channels_last:
            # Channels-last weights make every convolution's output channels-last
            # (MODEL.CHANNELS_LAST); build_model's .to(device) keeps the format.
            self.to(memory_format=torch.channels_last)

    # TorchScript reads plain attributes, not a dataclass: the setter keeps the
    # inference options in a tuple beside the config (see ``forward_inference``).
    __jit_unused_properties__ = ["inference_config", "iou_aware"]

    @property
    def inference_config(self) -> InferenceConfig:
        return self._inference_config

    @inference_config.setter
    def inference_config(self, config: InferenceConfig) -> None:
        self._inference_config = config
        self._inference_options = (
            config.alpha, config.score_thresh, config.threshold_on, config.topk_candidates,
            config.nms_thresh, config.max_detections, config.clip_to_image, config.candidates,
        )  # fmt: skip

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
        ret["channels_last"] = cfg.MODEL.CHANNELS_LAST
        return ret

    @property
    def iou_aware(self) -> bool:
        return self.head.iou_pred is not None

    def _split_predictions(
        self, predictions: List[List[Tensor]]
    ) -> Tuple[List[Tensor], List[Tensor], Optional[List[Tensor]]]:
        """Per level (N, Hi*Wi*A, K) logits, (N, ..., 4) deltas and, with the IoU
        branch (the head's third output), (N, ..., 1) IoU logits."""
        if len(predictions) == 3:
            split = self._transpose_dense_predictions(predictions, [self.num_classes, 4, 1])
            return split[0], split[1], split[2]
        split = self._transpose_dense_predictions(predictions, [self.num_classes, 4])
        return split[0], split[1], None

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
    def forward_inference(self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]):
        """Detections per image (core post-processing), in the form TorchScript and
        tracing take as well as eager mode."""
        pred_logits, pred_deltas, pred_ious = self._split_predictions(predictions)
        iou_logits = None if pred_ious is None else [x[..., 0] for x in pred_ious]
        anchors = [a.tensor for a in self.anchor_generator(features)]
        alpha, score_thresh, threshold_on, topk, nms_thresh, max_detections, clip, candidates = self._inference_options
        results: List[Instances] = []
        for i, image_size in enumerate(images.image_sizes):
            probs, deltas, ious = image_predictions(pred_logits, pred_deltas, iou_logits, i)
            boxes, scores, classes, cls_scores, det_ious = detect_image(
                probs, deltas, ious, anchors, self.box2box_transform, image_size,
                alpha, score_thresh, threshold_on, topk, nms_thresh, max_detections, clip, candidates,
            )  # fmt: skip
            result = Instances(image_size, pred_boxes=Boxes(boxes), scores=scores, pred_classes=classes)
            # Tested on the attribute, which TorchScript resolves when it compiles: the
            # scripted Instances of a model without the branch has no such fields.
            if self.head.iou_pred is not None and det_ious is not None:
                result.cls_scores = cls_scores
                result.pred_ious = det_ious
            results.append(result)
        return results

    def inference_single_image(
        self,
        anchors: List[Boxes],
        box_cls: List[Tensor],
        box_delta: List[Tensor],
        image_size: Tuple[int, int],
        box_iou: Optional[List[Tensor]] = None,
    ):
        """Like ``RetinaNet.inference_single_image``, ranking by the fused score.

        ``box_iou``: per level (Hi*Wi*A,) IoU predictions in [0, 1]; required with
        the IoU branch (without it the ranking would silently fall back to p).
        """
        if box_iou is None and self.iou_aware:
            raise ValueError(
                "inference_single_image: this model has the IoU branch (MODEL.IOU_AWARE.ENABLED True), so it "
                "ranks by the fused score and needs box_iou, the per-level (Hi*Wi*A,) IoU predictions "
                "(sigmoid of the head's third output); pass box_iou, or use model.inference / model(...)"
            )
        if box_iou is not None and not self.iou_aware:
            raise ValueError(
                "inference_single_image: box_iou given, but this model has no IoU branch "
                "(MODEL.IOU_AWARE.ENABLED False): it ranks by p"
            )
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
