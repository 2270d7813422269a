"""The tiny backbone's body, ``TinyResNet``, and Detectron2's FREEZE_AT on a body
with torchvision ResNet's module names.

Both front-ends register ``build_tiny_fpn_backbone`` on this one body (so one
YAML builds the same architecture, with the same parameter names, on either)
and each freezes it with its own framework's frozen BatchNorm.
"""
from typing import Callable, Dict

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

__all__ = ["STAGES", "STAGE_MODULES", "STAGE_STRIDES", "TINY_LAYOUTS", "TinyResNet", "freeze_stages"]

STAGES = ("res2", "res3", "res4", "res5")
STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
# torchvision's module name of each ResNet stage.
STAGE_MODULES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
# MODEL.RESNETS.DEPTH -> blocks per stage.
TINY_LAYOUTS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def freeze_stages(body: nn.Module, freeze_at: int, convert_frozen_batchnorm: Callable[[nn.Module], nn.Module]) -> None:
    """Detectron2's FREEZE_AT: 1 freezes the stem, k > 1 the stem and res2..res<k>.

    ``body`` has torchvision ResNet's module names (``conv1``, ``bn1``,
    ``layer1`` .. ``layer4``). Frozen stages stop training and their
    BatchNorms become frozen ones through ``convert_frozen_batchnorm`` (module
    -> module with every BatchNorm replaced), the front-end's framework's own,
    as Detectron2's ``ResNet.freeze`` does.
    """
    stages = [("conv1", "bn1")] + [(STAGE_MODULES[s],) for s in STAGES]
    for names in stages[:freeze_at]:
        for name in names:
            setattr(body, name, convert_frozen_batchnorm(getattr(body, name)))
            for p in getattr(body, name).parameters():
                p.requires_grad_(False)


class TinyResNet(nn.Module):
    """A ResNet of torchvision ``BasicBlock`` s at any width (the tiny backbone's body).

    Same module names as torchvision's ResNet (``conv1``, ``bn1``, ``layer1`` ..
    ``layer4``), same stem (7x7 / 2 conv, 3x3 / 2 max-pool) and initialisation;
    stage k has ``res2_channels * 2**(k - 2)`` channels. ``forward`` returns
    ``{"res2": ..., "res5": ...}`` (strides 4 to 32).
    """

    def __init__(
        self,
        depth: int = 18,
        stem_channels: int = 16,
        res2_channels: int = 16,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        if depth not in TINY_LAYOUTS:
            raise ValueError(f"TinyResNet depth must be one of {sorted(TINY_LAYOUTS)}, got {depth}")
        self.conv1 = nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem_channels
        self.out_feature_channels: Dict[str, int] = {}
        for index, (stage, num_blocks) in enumerate(zip(STAGES, TINY_LAYOUTS[depth])):
            channels = res2_channels * 2**index
            stride = 1 if index == 0 else 2
            blocks = []
            for block in range(num_blocks):
                downsample = None
                if block == 0 and (stride != 1 or in_channels != channels):
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                        norm_layer(channels),
                    )
                blocks.append(
                    tv_resnet.BasicBlock(
                        in_channels, channels, stride if block == 0 else 1, downsample, norm_layer=norm_layer
                    )
                )
                in_channels = channels
            setattr(self, STAGE_MODULES[stage], nn.Sequential(*blocks))
            self.out_feature_channels[stage] = channels
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for stage in STAGES:
            x = getattr(self, STAGE_MODULES[stage])(x)
            out[stage] = x
        return out
