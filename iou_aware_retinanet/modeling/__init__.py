"""Model parts both front-ends build on: plain PyTorch (torchvision's classification
ResNet blocks at most), no Detectron2 and no torchvision-detection import.

Each front-end wraps them in its own framework's plumbing (FPN, frozen BN)."""
from .tiny_resnet import STAGE_MODULES, STAGE_STRIDES, STAGES, TINY_LAYOUTS, TinyResNet, freeze_stages

__all__ = ["STAGES", "STAGE_MODULES", "STAGE_STRIDES", "TINY_LAYOUTS", "TinyResNet", "freeze_stages"]
