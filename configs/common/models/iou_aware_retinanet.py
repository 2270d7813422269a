# IoU-aware RetinaNet, R-50-FPN, COCO: the LazyConfig model of
# configs/COCO-Detection/iou_aware_retinanet_R_50_FPN_1x.yaml, built from
# IoUAwareRetinaNet's own (@configurable) arguments.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.box_regression import Box2BoxTransform

from iou_aware_retinanet.core import InferenceConfig, LossConfig
from iou_aware_retinanet.core.assigners import assigner_class
from iou_aware_retinanet.d2.meta_arch import IoUAwareRetinaNet, IoUAwareRetinaNetHead

model = L(IoUAwareRetinaNet)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="FrozenBN"),
            out_features=["res3", "res4", "res5"],
            freeze_at=2,
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        top_block=L(LastLevelP6P7)(in_channels=2048, out_channels="${..out_channels}"),
    ),
    head=L(IoUAwareRetinaNetHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,
        num_classes="${..num_classes}",
        conv_dims=[256, 256, 256, 256],
        num_anchors=9,
        prior_prob=0.01,
        norm="",
        iou_branch=True,  # MODEL.IOU_AWARE.ENABLED
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    anchor_generator=L(DefaultAnchorGenerator)(
        sizes=[[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]],
        aspect_ratios=[0.5, 1.0, 2.0],
        strides=[8, 16, 32, 64, 128],
        offset=0.0,
    ),
    num_anchors_per_location="${.head.num_anchors}",
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    # MODEL.ASSIGNER.NAME and its options: any registered assigner's constructor,
    # e.g. L(assigner_class("atss"))(num_classes=..., topk=9).
    assigner=L(assigner_class("max_iou"))(
        num_classes="${..num_classes}",
        thresholds=[0.4, 0.5],  # MODEL.RETINANET.IOU_THRESHOLDS
        labels=[0, -1, 1],  # MODEL.RETINANET.IOU_LABELS
        allow_low_quality_matches=True,
    ),
    loss_config=L(LossConfig)(
        focal_alpha=0.25,
        focal_gamma=2.0,
        box_loss_type="smooth_l1",
        smooth_l1_beta=0.0,
        iou_loss_weight=1.0,  # MODEL.IOU_AWARE.LOSS_WEIGHT
        iou_target_gradient=True,  # MODEL.IOU_AWARE.TARGET_GRADIENT
        soft_target_loss="focal",  # MODEL.RETINANET.SOFT_TARGET_LOSS (read by assigners with soft targets)
    ),
    inference_config=L(InferenceConfig)(
        alpha=0.5,  # MODEL.IOU_AWARE.ALPHA
        score_thresh=0.05,
        threshold_on="cls",  # MODEL.IOU_AWARE.THRESHOLD_ON
        candidates="pairs",  # MODEL.IOU_AWARE.CANDIDATES
        topk_candidates=1000,
        nms_thresh=0.5,
        max_detections=100,
    ),
    num_classes=80,
    # Detectron2's RetinaNet attributes, kept equal to the options above so its
    # tools read the values the model uses.
    focal_loss_alpha="${.loss_config.focal_alpha}",
    focal_loss_gamma="${.loss_config.focal_gamma}",
    smooth_l1_beta="${.loss_config.smooth_l1_beta}",
    box_reg_loss_type="${.loss_config.box_loss_type}",
    test_score_thresh="${.inference_config.score_thresh}",
    test_topk_candidates="${.inference_config.topk_candidates}",
    test_nms_thresh="${.inference_config.nms_thresh}",
    max_detections_per_image="${.inference_config.max_detections}",
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
    input_format="BGR",
)
