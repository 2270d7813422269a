"""The method in plain PyTorch + torchvision.ops: no Detectron2 import here.

Both front-ends (``iou_aware_retinanet.d2`` and ``iou_aware_retinanet.tv``)
are thin wrappers around these functions.
"""
from .assigners import (
    BACKGROUND,
    IGNORE,
    AnchorSet,
    Assigner,
    Assignment,
    DegenerateBoxWarning,
    Predictions,
    available_assigners,
    build_assigner,
    register_assigner,
)
from .boxes import BoxCoder, aligned_box_iou, box_centers
from .head import box_and_iou_outputs, build_iou_predictor
from .inference import Detections, InferenceConfig, fuse_scores, image_predictions, postprocess_batch, postprocess_image
from .losses import (
    BOX_LOSS_TYPES,
    LossConfig,
    dense_detection_losses,
    quality_focal_loss,
    soft_target_focal_loss,
)
from .training import assign_batch, detached_predictions, training_losses
