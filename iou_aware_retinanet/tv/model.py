"""torchvision front-end: ``IoUAwareRetinaNet``, a ``torchvision.models.detection.RetinaNet``.

A thin layer over ``iou_aware_retinanet.core``: torchvision's RetinaNet keeps
its transform, backbone / anchor / head plumbing and calling convention
(``model(images, targets)`` -> losses in training, detections in eval); this
class replaces its Matcher with a core assigner, adds the IoU branch and its
loss, and ranks detections by the fused score. With
``MODEL.IOU_AWARE.ENABLED False``, the ``max_iou`` assigner and an L1 box loss
(``smooth_l1`` with beta 0) it computes what torchvision's ``RetinaNet``
computes (tests/tv/test_equivalence.py checks it).

Conventions kept from torchvision: input images are RGB float tensors in
[0, 1] (see :mod:`.transform` for how Detectron2's PIXEL_MEAN / PIXEL_STD /
INPUT.FORMAT apply); target ``labels`` are class indices 0..K-1 (no
background class); each loss is normalized per image by max(1, number of
foreground anchors of that image), then averaged over the images.

Differences from torchvision, on purpose:

* degenerate ground-truth boxes (non-positive width or height, non-finite
  coordinates) are dropped from label assignment with a
  ``core.DegenerateBoxWarning`` instead of failing an assertion, as in the
  Detectron2 front-end; malformed targets (wrong shapes) still raise;
* loss keys are Detectron2's: ``loss_cls``, ``loss_box_reg``, ``loss_iou``;
* TorchScript is not supported (torchvision's RetinaNet scripts; this one
  calls the plain-Python core).
"""
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetClassificationHead,
    RetinaNetHead,
)
from torchvision.ops.misc import Conv2dNormActivation

from ..config import build_assigner_from_cfg, inference_config_from_cfg, loss_config_from_cfg, loss_normalizer_from_cfg
from ..core import (
    AnchorSet,
    Assigner,
    BoxCoder,
    InferenceConfig,
    LossConfig,
    build_assigner,
    box_and_iou_outputs,
    build_iou_predictor,
    postprocess_batch,
    training_losses,
)
from ..core.losses import IOU_TARGET_ENTROPY
from .anchors import AnchorGenerator, build_anchor_generator
from .backbone import build_backbone, get_norm
from .transform import build_transform


__all__ = ["IoUAwareRetinaNet", "IoUAwareRetinaNetHead", "build_model", "head_norm_from_cfg"]

HEAD_NORMS = ("", "GN")


def head_norm_from_cfg(cfg):
    """``MODEL.RETINANET.NORM`` as a norm factory: "" (none) or "GN".

    Detectron2's "BN" / "SyncBN" in the RetinaNet head are per-level
    (``CycleBatchNormList``); a shared BatchNorm would be a different model,
    so they are refused rather than approximated.
    """
    norm = cfg.MODEL.RETINANET.NORM
    if norm not in HEAD_NORMS:
        raise ValueError(
            f"MODEL.RETINANET.NORM={norm!r} is not supported by the torchvision front-end; supported: "
            f"{', '.join(repr(n) for n in HEAD_NORMS)} (Detectron2's 'BN' in this head is per-level BN)"
        )
    return get_norm(norm, "MODEL.RETINANET.NORM")


def _conv_tower(channels: int, num_convs: int, norm_layer) -> nn.Sequential:
    """torchvision's head tower (conv 3x3 [+ norm] + ReLU) with ``num_convs`` layers."""
    tower = nn.Sequential(
        *[Conv2dNormActivation(channels, channels, norm_layer=norm_layer) for _ in range(num_convs)]
    )
    for layer in tower.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0)
    return tower


def _flatten_level(x: Tensor, channels: int) -> Tensor:
    """(N, A * C, H, W) -> (N, H * W * A, C), torchvision's head layout."""
    n, _, h, w = x.shape
    return x.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels)


class IoUAwareRetinaNetHead(RetinaNetHead):
    """torchvision's RetinaNet head plus the IoU branch on the box tower's last feature.

    Same parameter names as ``RetinaNetHead`` (``classification_head.*``,
    ``regression_head.*``), so torchvision RetinaNet weights load into it;
    the IoU conv is ``iou_pred`` (absent when ``iou_branch`` is False).
    ``num_convs`` and ``prior_probability`` are Detectron2's NUM_CONVS and
    PRIOR_PROB (torchvision fixes 4 and 0.01).

    ``forward`` returns ``{"cls_logits": (N, HWA, K), "bbox_regression":
    (N, HWA, 4)}`` plus ``"iou_logits": (N, HWA)`` with the IoU branch.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        prior_probability: float = 0.01,
        norm_layer=None,
        iou_branch: bool = True,
    ):
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        if prior_probability != 0.01:
            self.classification_head = RetinaNetClassificationHead(
                in_channels, num_anchors, num_classes, prior_probability=prior_probability, norm_layer=norm_layer
            )
        if num_convs != 4:
            self.classification_head.conv = _conv_tower(in_channels, num_convs, norm_layer)
            self.regression_head.conv = _conv_tower(in_channels, num_convs, norm_layer)
        self.iou_pred = build_iou_predictor(in_channels, num_anchors) if iou_branch else None

    def forward(self, x: List[Tensor]) -> Dict[str, Tensor]:
        out = {"cls_logits": self.classification_head(x)}
        if self.iou_pred is None:
            out["bbox_regression"] = self.regression_head(x)
            return out
        boxes, ious = box_and_iou_outputs(
            [self.regression_head.conv(feature) for feature in x], self.regression_head.bbox_reg, self.iou_pred
        )
        out["bbox_regression"] = torch.cat([_flatten_level(box, 4) for box in boxes], dim=1)
        out["iou_logits"] = torch.cat([_flatten_level(iou, 1) for iou in ious], dim=1).squeeze(-1)
        return out


@dataclass
class DenseOutputs:
    """What inference starts from, before any thresholding: per FPN level, the raw
    head outputs (``{"cls_logits": [(N, A_l, K)], "bbox_regression": [(N, A_l, 4)],
    "iou_logits": [(N, A_l)]}``) and anchors (``[image][level] (A_l, 4)``), in the
    coordinates of the resized images (``image_sizes``); ``original_image_sizes``
    maps them back (``model.transform.postprocess``). Analysis code (the evidence
    study) rescoring the same forward pass many ways starts here."""

    head_outputs: Dict[str, List[Tensor]]
    anchors: List[List[Tensor]]
    image_sizes: List[Tuple[int, int]]
    original_image_sizes: List[Tuple[int, int]]


class IoUAwareRetinaNet(RetinaNet):
    """RetinaNet + IoU prediction branch + pluggable label assignment.

    Args (beyond torchvision's ``RetinaNet``, whose other keyword arguments
    pass through):
        assigner: a core ``Assigner`` (default: Max-IoU, thresholds 0.4 / 0.5).
        loss_config: core ``LossConfig`` (default: focal 0.25 / 2, L1 box loss).
        inference_config: core ``InferenceConfig``; its score threshold, top-k,
            NMS threshold and detections per image replace torchvision's
            arguments of the same meaning. Default: clip to the image before
            NMS, as torchvision does.
        box_coder: a core ``BoxCoder`` (default weights (1, 1, 1, 1)).
        transform: replaces the ``GeneralizedRCNNTransform`` torchvision builds.
        head: default ``IoUAwareRetinaNetHead`` with the IoU branch on.

    Training returns ``{"loss_cls", "loss_box_reg"[, "loss_iou"]}``. Eval
    returns per image ``{"boxes", "scores", "labels"}`` with ``scores`` the
    fused confidence S = p^alpha * IoU^(1 - alpha), plus ``"cls_scores"`` (p)
    and ``"pred_ious"`` (the predicted IoU) with the IoU branch.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        anchor_generator: AnchorGenerator,
        head: Optional[nn.Module] = None,
        transform: Optional[nn.Module] = None,
        assigner: Optional[Assigner] = None,
        loss_config: Optional[LossConfig] = None,
        inference_config: Optional[InferenceConfig] = None,
        box_coder: Optional[BoxCoder] = None,
        loss_normalizer: str = "per_image",
        **kwargs,
    ):
        if head is None:
            head = IoUAwareRetinaNetHead(
                backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes
            )
        inference_config = inference_config or InferenceConfig(clip_to_image=True)
        # torchvision's score_thresh / nms_thresh / ... attributes are set for
        # information only: inference reads self.inference_config.
        super().__init__(
            backbone,
            num_classes,
            anchor_generator=anchor_generator,
            head=head,
            score_thresh=inference_config.score_thresh,
            nms_thresh=inference_config.nms_thresh,
            detections_per_img=inference_config.max_detections,
            topk_candidates=inference_config.topk_candidates,
            **kwargs,
        )
        if transform is not None:
            self.transform = transform
        # The assigner replaces torchvision's Matcher.
        self.proposal_matcher = None
        self.num_classes = num_classes
        self.assigner = assigner if assigner is not None else build_assigner("max_iou", num_classes)
        if self.assigner.num_classes != num_classes:
            raise ValueError(f"the assigner has {self.assigner.num_classes} classes, the model {num_classes}")
        # Default: the classification loss the assigner's targets are made for (see core.losses).
        self.loss_config = loss_config or LossConfig(soft_target_loss=self.assigner.soft_target_loss)
        self.inference_config = inference_config
        self.box_coder = box_coder or BoxCoder()
        if loss_normalizer not in ("per_image", "batch_ema"):
            raise ValueError(f"loss_normalizer must be 'per_image' or 'batch_ema', got {loss_normalizer!r}")
        self.loss_normalizer = loss_normalizer
        if loss_normalizer == "batch_ema":
            # Detectron2's EMA of the positives per batch; a buffer, so checkpoints and an
            # exact resume carry it.
            self.register_buffer("loss_normalizer_ema", torch.tensor(100.0, dtype=torch.float64))

    @property
    def iou_aware(self) -> bool:
        return getattr(self.head, "iou_pred", None) is not None

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None, *, with_metrics: bool = False
    ):
        """torchvision's ``RetinaNet.forward``, without the degenerate-box assertion
        (the assigner drops such boxes with a warning) and with the anchors'
        per-level counts passed to the loss.

        Training returns the losses; with ``with_metrics`` the pair (losses,
        metrics), the statistics of the step that are not losses (see
        :meth:`compute_loss_and_metrics`). Eval returns the detections.
        """
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            _check_targets(targets, len(images))
            _, targets, _, head_outputs, anchors, num_anchors_per_level = self._run_head(images, targets)
            losses, metrics = self.compute_loss_and_metrics(targets, head_outputs, anchors, num_anchors_per_level)
            return (losses, metrics) if with_metrics else losses
        dense = self.dense_outputs(images)
        detections = self.postprocess_detections(dense.head_outputs, dense.anchors, dense.image_sizes)
        return self.transform.postprocess(detections, dense.image_sizes, dense.original_image_sizes)

    def dense_outputs(self, images: List[Tensor]) -> DenseOutputs:
        """What eval-mode inference starts from, before any thresholding (:class:`DenseOutputs`):
        for analysis that rescores one forward pass many ways."""
        if self.training:
            raise ValueError("dense_outputs is the eval-mode forward pass: call model.eval() first")
        images, _, original_image_sizes, head_outputs, anchors, num_anchors_per_level = self._run_head(images)
        return DenseOutputs(
            head_outputs={k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()},
            anchors=[list(a.split(num_anchors_per_level)) for a in anchors],
            image_sizes=list(images.image_sizes),
            original_image_sizes=original_image_sizes,
        )

    def _run_head(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        """Transform, backbone, head and anchors: (transformed images, transformed targets,
        original image sizes, head outputs, anchors, anchors per level)."""
        # No int(): an ONNX trace keeps the sizes symbolic, so boxes map back for any input size.
        original_image_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        images, targets = self.transform(images, targets)

        features = self.backbone(images.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        features = list(features.values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(images, features)

        num_locations = [f.shape[-2] * f.shape[-1] for f in features]
        num_per_location = head_outputs["cls_logits"].shape[1] // sum(num_locations)
        num_anchors_per_level = [n * num_per_location for n in num_locations]
        return images, targets, original_image_sizes, head_outputs, anchors, num_anchors_per_level

    # ----------------------------------------------------------------- training
    def compute_loss(
        self,
        targets: List[Dict[str, Tensor]],
        head_outputs: Dict[str, Tensor],
        anchors: List[Tensor],
        num_anchors_per_level: Sequence[int],
    ) -> Dict[str, Tensor]:
        """Assign with the core assigner, then the core losses, normalized as torchvision.

        ``anchors``: one (A, 4) tensor per image, identical across the batch
        (one padded batch tensor). ``num_anchors_per_level``: A split by FPN
        level, required (ATSS picks candidates per level; torchvision's own
        ``compute_loss`` has no such argument).
        """
        return self.compute_loss_and_metrics(targets, head_outputs, anchors, num_anchors_per_level)[0]

    def compute_loss_and_metrics(
        self,
        targets: List[Dict[str, Tensor]],
        head_outputs: Dict[str, Tensor],
        anchors: List[Tensor],
        num_anchors_per_level: Sequence[int],
    ) -> Tuple[Dict[str, Tensor], Dict[str, float]]:
        """:meth:`compute_loss`'s losses and the statistics of the step that are not losses:
        ``loss_iou_minus_entropy`` with the IoU branch (loss_iou less the entropy of its
        targets, the part of loss_iou that can still go down)."""
        if num_anchors_per_level is None:
            raise ValueError("num_anchors_per_level is required: the anchors' split by FPN level")
        cls_logits = head_outputs["cls_logits"]
        anchor_set = AnchorSet(
            boxes=anchors[0],
            num_per_level=tuple(num_anchors_per_level),
            num_per_location=self.anchor_generator.num_anchors_per_location()[0],
        )
        per_image = training_losses(
            cls_logits, head_outputs["bbox_regression"], head_outputs.get("iou_logits"), anchor_set,
            [t["boxes"] for t in targets], [t["labels"] for t in targets],
            self.assigner, self.box_coder, self.loss_config,
        )  # fmt: skip
        num_foreground = per_image.pop("num_foreground")
        entropy = per_image.pop(IOU_TARGET_ENTROPY, None)
        if self.loss_normalizer == "batch_ema":
            # Batch sum / EMA of the batch's positives (Detectron2's RetinaNet.losses).
            ema = self.loss_normalizer_ema
            ema.mul_(0.9).add_(0.1 * max(float(num_foreground.sum()), 1.0))
            normalizer = float(ema)

            def normalize(values):
                return values.sum() / normalizer
        else:
            # Each image by its own positives, then the mean over images (torchvision).
            # In the losses' type (float32 also under autocast: float16 counts stop being exact at 2048).
            per_image_normalizer = num_foreground.clamp(min=1).to(per_image["loss_cls"].dtype)

            def normalize(values):
                return (values / per_image_normalizer).mean()

        losses = {name: normalize(loss) for name, loss in per_image.items()}
        metrics = {}
        if entropy is not None:
            metrics["loss_iou_minus_entropy"] = float(losses["loss_iou"].detach() - normalize(entropy))
        return losses, metrics

    # ---------------------------------------------------------------- inference
    def postprocess_detections(
        self,
        head_outputs: Dict[str, List[Tensor]],
        anchors: List[List[Tensor]],
        image_shapes: List[Tuple[int, int]],
    ) -> List[Dict[str, Tensor]]:
        """torchvision's interface (per-level outputs and anchors), core inference:
        threshold, per-level top-k, decode, clip, NMS by the fused score."""
        detections = []
        for det in postprocess_batch(
            head_outputs["cls_logits"], head_outputs["bbox_regression"], head_outputs.get("iou_logits"),
            anchors, self.box_coder, image_shapes, self.inference_config,
        ):  # fmt: skip
            result = {"boxes": det.boxes, "scores": det.scores, "labels": det.classes}
            if det.ious is not None:
                result["cls_scores"] = det.cls_scores
                result["pred_ious"] = det.ious
            detections.append(result)
        return detections


def _check_targets(targets, num_images: int) -> None:
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    for i, target in enumerate(targets):
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be a (N, 4) tensor, got {getattr(boxes, 'shape', boxes)}")
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"targets[{i}]['labels'] must be a ({boxes.shape[0]},) tensor, got {getattr(labels, 'shape', labels)}"
            )


def _check_head_cfg(cfg) -> None:
    """The MODEL.RETINANET / TEST keys the head, box coder and inference read."""
    head = cfg.MODEL.RETINANET
    if head.NUM_CLASSES < 1:
        raise ValueError(f"MODEL.RETINANET.NUM_CLASSES must be >= 1, got {head.NUM_CLASSES}")
    if head.NUM_CONVS < 0:
        raise ValueError(f"MODEL.RETINANET.NUM_CONVS must be >= 0, got {head.NUM_CONVS}")
    if not 0.0 < head.PRIOR_PROB < 1.0:
        raise ValueError(f"MODEL.RETINANET.PRIOR_PROB must lie in (0, 1), got {head.PRIOR_PROB}")
    weights = head.BBOX_REG_WEIGHTS
    if len(weights) != 4 or any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"MODEL.RETINANET.BBOX_REG_WEIGHTS must be 4 positive numbers, got {list(weights)}")
    if cfg.TEST.DETECTIONS_PER_IMAGE < 1:
        raise ValueError(f"TEST.DETECTIONS_PER_IMAGE must be >= 1, got {cfg.TEST.DETECTIONS_PER_IMAGE}")


def build_model(cfg) -> IoUAwareRetinaNet:
    """The model a config describes, on ``MODEL.DEVICE``; weights are not loaded
    (see :func:`iou_aware_retinanet.tv.checkpoint.load_weights`), as with
    Detectron2's ``build_model``."""
    device = torch.device(cfg.MODEL.DEVICE)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} (Detectron2's default) but CUDA is not available here; "
            "set MODEL.DEVICE cpu"
        )
    backbone = build_backbone(cfg)
    strides = list(backbone.out_feature_strides.values())
    anchor_generator = build_anchor_generator(cfg, strides)
    _check_head_cfg(cfg)
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    head = IoUAwareRetinaNetHead(
        backbone.out_channels,
        anchor_generator.num_anchors_per_location()[0],
        num_classes,
        num_convs=cfg.MODEL.RETINANET.NUM_CONVS,
        prior_probability=cfg.MODEL.RETINANET.PRIOR_PROB,
        norm_layer=head_norm_from_cfg(cfg),
        iou_branch=cfg.MODEL.IOU_AWARE.ENABLED,
    )
    model = IoUAwareRetinaNet(
        backbone,
        num_classes,
        anchor_generator=anchor_generator,
        head=head,
        transform=build_transform(cfg, size_divisible=backbone.size_divisibility),
        assigner=build_assigner_from_cfg(cfg),
        loss_config=loss_config_from_cfg(cfg),
        inference_config=inference_config_from_cfg(cfg, clip_to_image=True),
        box_coder=BoxCoder(weights=tuple(cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS)),
        loss_normalizer=loss_normalizer_from_cfg(cfg, "torchvision"),
    )
    if cfg.MODEL.CHANNELS_LAST:
        # Channels-last weights make every convolution's output channels-last, so the
        # whole network runs in that format without converting the input batch.
        model.to(memory_format=torch.channels_last)
    return model.to(device)
