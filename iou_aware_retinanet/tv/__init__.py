"""torchvision front-end: the IoU-aware RetinaNet without Detectron2.

    from iou_aware_retinanet.tv import get_cfg, build_model, load_weights

    cfg = get_cfg()                      # Detectron2's keys (the honoured subset) + the project's
    cfg.merge_from_file("configs/....yaml")
    model = build_model(cfg)             # a torchvision.models.detection.RetinaNet subclass
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS)

``model(images, targets)`` takes RGB float images in [0, 1] and targets
``{"boxes": (N, 4) XYXY, "labels": (N,) in 0..K-1}``, like torchvision's
detection models.

Training, evaluation and prediction (:mod:`.engine`, :mod:`.evaluation`,
:mod:`.data`, and the command line ``python -m iou_aware_retinanet``, :mod:`.cli`):

    results = train(cfg, resume=False)   # {"shapes_val": {"bbox": {"AP": ..., ...}}}
    model = load_model(cfg, "output/model_final.pth")
    result = evaluate(cfg, model, "shapes_val")   # .metrics, .detections (COCO results)
"""
from .anchors import AnchorGenerator, build_anchor_generator
from .backbone import BACKBONES, FPNBackbone, TinyResNet, build_backbone
from .checkpoint import load_weights, save_checkpoint
from .config import check_cfg, get_cfg
from .data import build_test_loader, build_train_loader, resolve_dataset
from .engine import NonFiniteLossError, evaluate_all, load_model, train
from .evaluation import EvaluationResult, evaluate
from .model import IoUAwareRetinaNet, IoUAwareRetinaNetHead, build_model
from .transform import DetectionTransform, build_transform

__all__ = [
    "AnchorGenerator",
    "EvaluationResult",
    "NonFiniteLossError",
    "BACKBONES",
    "DetectionTransform",
    "FPNBackbone",
    "IoUAwareRetinaNet",
    "IoUAwareRetinaNetHead",
    "TinyResNet",
    "build_anchor_generator",
    "build_backbone",
    "build_model",
    "build_test_loader",
    "build_train_loader",
    "build_transform",
    "check_cfg",
    "evaluate",
    "evaluate_all",
    "get_cfg",
    "load_model",
    "load_weights",
    "resolve_dataset",
    "save_checkpoint",
    "train",
]
