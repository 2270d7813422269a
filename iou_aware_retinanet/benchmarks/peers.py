"""Peer models the project's model is measured against (tests and benchmarks only).

``build_torchvision_retinanet``: torchvision's stock ``RetinaNet``, checked
against the torchvision front-end's model in tests/tv/test_equivalence.py and
timed against it in :mod:`.speed`.
"""
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

from ..tv.anchors import build_anchor_generator
from ..tv.backbone import build_backbone
from ..tv.model import head_norm_from_cfg

__all__ = ["build_torchvision_retinanet"]


def build_torchvision_retinanet(cfg) -> RetinaNet:
    """torchvision's stock RetinaNet with the project model's backbone, anchors, sizes and head shape.

    The peer the project's model is compared with (tests/tv/test_equivalence.py,
    benchmarks/speed.py): the head is torchvision's ``RetinaNetHead`` with the
    config's norm, its 4-conv towers cut to ``MODEL.RETINANET.NUM_CONVS`` (the
    same modules, so the same parameter names as the project's head).
    """
    num_convs = cfg.MODEL.RETINANET.NUM_CONVS
    if num_convs > 4:
        raise ValueError(f"torchvision's RetinaNetHead has 4 convs per tower; the config asks {num_convs}")
    backbone = build_backbone(cfg)
    anchor_generator = build_anchor_generator(cfg, list(backbone.out_feature_strides.values()))
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    head = RetinaNetHead(
        backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes,
        norm_layer=head_norm_from_cfg(cfg),
    )
    head.classification_head.conv = head.classification_head.conv[:num_convs]
    head.regression_head.conv = head.regression_head.conv[:num_convs]
    return RetinaNet(
        backbone,
        num_classes=num_classes,
        min_size=cfg.INPUT.MIN_SIZE_TRAIN,
        max_size=cfg.INPUT.MAX_SIZE_TRAIN,
        image_mean=[m / 255.0 for m in cfg.MODEL.PIXEL_MEAN],
        image_std=[s / 255.0 for s in cfg.MODEL.PIXEL_STD],
        anchor_generator=anchor_generator,
        head=head,
        score_thresh=cfg.MODEL.RETINANET.SCORE_THRESH_TEST,
        nms_thresh=cfg.MODEL.RETINANET.NMS_THRESH_TEST,
        detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
        fg_iou_thresh=cfg.MODEL.RETINANET.IOU_THRESHOLDS[1],
        bg_iou_thresh=cfg.MODEL.RETINANET.IOU_THRESHOLDS[0],
        topk_candidates=cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST,
    )
