"""Backbones of the torchvision front-end, chosen by Detectron2's ``MODEL.BACKBONE.NAME``.

``build_retinanet_resnet_fpn_backbone``
    Detectron2's RetinaNet backbone rebuilt from torchvision parts: a
    torchvision ResNet (``MODEL.RESNETS.DEPTH`` 18, 34, 50, 101 or 152;
    ResNeXt through NUM_GROUPS / WIDTH_PER_GROUP), torchvision's
    ``FeaturePyramidNetwork`` over ``MODEL.FPN.IN_FEATURES`` and
    ``LastLevelP6P7`` computing P6 from C5 (res5) as Detectron2 does (torchvision
    would switch to P5 when C5 and the FPN have the same width). Its
    parameters keep torchvision's names (``body.layer1.0.conv1.weight``), so
    torchvision ImageNet ResNet weights load into ``backbone.body``.

``build_tiny_fpn_backbone``
    A name only this project defines: the same FPN on a narrow ResNet made of
    torchvision ``BasicBlock`` s, small enough to train from scratch on a CPU
    (the built-in shapes dataset). Its widths come from Detectron2's own keys:
    ``MODEL.RESNETS.STEM_OUT_CHANNELS`` for the stem and
    ``MODEL.RESNETS.RES2_OUT_CHANNELS`` for res2, doubling at each later stage;
    ``MODEL.RESNETS.DEPTH`` picks the block layout: 10 ([1, 1, 1, 1], this
    project's), 18 ([2, 2, 2, 2]) or 34 ([3, 4, 6, 3]). NORM, OUT_FEATURES,
    FREEZE_AT and the FPN keys mean what they mean for the ResNet backbone.
    Mind that Detectron2's defaults (STEM 64, RES2 256) make it wide: a tiny
    config sets e.g. STEM_OUT_CHANNELS 16, RES2_OUT_CHANNELS 16. The Detectron2
    front-end registers the same name on the same body
    (:mod:`iou_aware_retinanet.modeling.tiny_resnet`) to run the same YAML.

Both return an ``OrderedDict`` of the FPN levels named as in Detectron2
(``"p3"`` ... ``"p7"``, stride 2**k for ``"pk"``), restricted to
``MODEL.RETINANET.IN_FEATURES``.
"""
import logging
import math
from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from .distributed import get_world_size
from ..modeling.tiny_resnet import STAGE_MODULES, STAGE_STRIDES, STAGES, TINY_LAYOUTS, TinyResNet, freeze_stages

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "FPNBackbone",
    "TinyResNet",
    "build_backbone",
    "check_backbone_cfg",
    "convert_frozen_batchnorm",
    "get_norm",
]

RESNET_FPN = "build_retinanet_resnet_fpn_backbone"
TINY_FPN = "build_tiny_fpn_backbone"
BACKBONES = (RESNET_FPN, TINY_FPN)

RESNET_DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101", 152: "resnet152"}
BASIC_BLOCK_DEPTHS = (18, 34)

RESNET_NORMS = ("FrozenBN", "BN", "SyncBN", "GN")
FPN_NORMS = ("", "BN", "GN")
GN_GROUPS = 32  # Detectron2's get_norm("GN")


def get_norm(name: str, key: str) -> Optional[Callable[[int], nn.Module]]:
    """Detectron2's norm names as torchvision ``norm_layer`` factories ("" -> None).

    ``key`` names the config key in errors. "GN" is ``GroupNorm(32, C)`` like
    Detectron2's, so C must be a multiple of 32.
    """
    if name == "":
        return None
    if name == "FrozenBN":
        return FrozenBatchNorm2d
    if name == "BN":
        return nn.BatchNorm2d
    if name == "SyncBN":
        # As Detectron2: plain BatchNorm in one process; statistics over every
        # process's batch with several (torchrun).
        if get_world_size() == 1:
            return nn.BatchNorm2d
        return nn.SyncBatchNorm
    if name == "GN":

        def group_norm(channels: int) -> nn.Module:
            if channels % GN_GROUPS:
                raise ValueError(
                    f"{key}='GN' is GroupNorm with {GN_GROUPS} groups (as in Detectron2), which needs "
                    f"channel counts divisible by {GN_GROUPS}; got a layer with {channels} channels"
                )
            return nn.GroupNorm(GN_GROUPS, channels)

        return group_norm
    raise ValueError(f"{key}={name!r} is not a norm this front-end knows")


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a torchvision FrozenBatchNorm2d holding
    its statistics (torchvision has the module but no converter; Detectron2's is its own)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = convert_frozen_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


class FPNBackbone(BackboneWithFPN):
    """ResNet-style body + FPN + P6/P7 from C5, with Detectron2's feature names.

    ``body`` has torchvision ResNet's module names; ``in_features`` are the
    body stages fed to the FPN (``"res3"`` .. ``"res5"``, ending with res5).
    ``out_features`` picks and orders the FPN levels returned.

    Attributes: ``out_channels`` (torchvision's contract), ``out_feature_strides``
    (name -> stride of the returned levels), ``size_divisibility`` (stride of
    the last FPN input, Detectron2's FPN padding).
    """

    def __init__(
        self,
        body: nn.Module,
        in_features: Sequence[str],
        in_channels: Sequence[int],
        out_channels: int,
        out_features: Sequence[str],
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ):
        if not in_features or in_features[-1] != "res5":
            raise ValueError(f"the FPN inputs must end with res5 (P6/P7 are computed from it), got {in_features}")
        top_block = LastLevelP6P7(in_channels[-1], out_channels)
        top_block.use_P5 = False  # Detectron2: P6 from C5 whatever the widths
        super().__init__(
            body,
            return_layers={STAGE_MODULES[f]: f for f in in_features},
            in_channels_list=list(in_channels),
            out_channels=out_channels,
            extra_blocks=top_block,
            norm_layer=norm_layer,
        )
        self.all_feature_strides = _fpn_output_strides(in_features)
        missing = [f for f in out_features if f not in self.all_feature_strides]
        if missing:
            raise ValueError(f"features {missing} are not among the FPN outputs {list(self.all_feature_strides)}")
        self.out_features = list(out_features)
        self.out_feature_strides = OrderedDict((f, self.all_feature_strides[f]) for f in out_features)
        self.size_divisibility = STAGE_STRIDES[in_features[-1]]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        levels = self.fpn(self.body(x))  # res3, res4, res5, p6, p7 (torchvision's names)
        named = dict(zip(self.all_feature_strides, levels.values()))
        return OrderedDict((f, named[f]) for f in self.out_features)


# --------------------------------------------------------------------------- config


def _fpn_output_strides(in_features: Sequence[str]) -> Dict[str, int]:
    strides = [STAGE_STRIDES[f] for f in in_features]
    last = int(math.log2(strides[-1]))
    out = OrderedDict((f"p{int(math.log2(s))}", s) for s in strides)
    out[f"p{last + 1}"] = 2 ** (last + 1)
    out[f"p{last + 2}"] = 2 ** (last + 2)
    return out


def check_backbone_cfg(cfg) -> Dict[str, int]:
    """Validate the backbone keys; return the stride of every FPN output by name."""
    name = cfg.MODEL.BACKBONE.NAME
    if name not in BACKBONES:
        raise ValueError(
            f"MODEL.BACKBONE.NAME={name!r} is not supported by the torchvision front-end; "
            f"supported: {', '.join(BACKBONES)}"
        )
    res = cfg.MODEL.RESNETS
    depth = res.DEPTH
    depths = sorted(TINY_LAYOUTS) if name == TINY_FPN else sorted(RESNET_DEPTHS)
    if depth not in depths:
        raise ValueError(f"MODEL.RESNETS.DEPTH={depth!r} is not supported by {name}; supported: {depths}")
    if res.NORM not in RESNET_NORMS:
        raise ValueError(
            f"MODEL.RESNETS.NORM={res.NORM!r} is not supported by the torchvision front-end; "
            f"supported: {', '.join(RESNET_NORMS)}"
        )
    if res.NORM == "SyncBN" and get_world_size() > 1 and torch.device(cfg.MODEL.DEVICE).type != "cuda":
        # torch's DistributedDataParallel refuses SyncBatchNorm on CPU modules.
        raise ValueError(
            "MODEL.RESNETS.NORM='SyncBN' with several processes needs GPUs (MODEL.DEVICE cuda): "
            "torch's SyncBatchNorm does not run on CPU. On CPU use 'BN' (per-process statistics), 'GN' or 'FrozenBN'."
        )
    if not 0 <= cfg.MODEL.BACKBONE.FREEZE_AT <= 5:
        raise ValueError(f"MODEL.BACKBONE.FREEZE_AT must lie in 0..5, got {cfg.MODEL.BACKBONE.FREEZE_AT}")
    if res.RES5_DILATION != 1:
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION={res.RES5_DILATION}: only 1 is supported")
    if any(res.DEFORM_ON_PER_STAGE):
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable convolutions are not supported")
    basic = name == TINY_FPN or depth in BASIC_BLOCK_DEPTHS
    if basic and res.NUM_GROUPS != 1:
        raise ValueError(f"MODEL.RESNETS.NUM_GROUPS must be 1 for basic-block ResNets, got {res.NUM_GROUPS}")
    if name == RESNET_FPN:
        expected_res2 = 64 if basic else 256
        if res.RES2_OUT_CHANNELS != expected_res2:
            raise ValueError(
                f"MODEL.RESNETS.RES2_OUT_CHANNELS={res.RES2_OUT_CHANNELS}: a torchvision ResNet-{depth} "
                f"has {expected_res2} (as Detectron2 requires); other widths: use {TINY_FPN}"
            )
        if res.STEM_OUT_CHANNELS != 64:
            raise ValueError(f"MODEL.RESNETS.STEM_OUT_CHANNELS={res.STEM_OUT_CHANNELS}: a torchvision ResNet has 64")
    elif res.RES2_OUT_CHANNELS < 1 or res.STEM_OUT_CHANNELS < 1:
        raise ValueError("MODEL.RESNETS.RES2_OUT_CHANNELS and STEM_OUT_CHANNELS must be positive")

    out_features = list(res.OUT_FEATURES)
    bad = [f for f in out_features if f not in STAGES]
    if bad:
        raise ValueError(f"MODEL.RESNETS.OUT_FEATURES={out_features}: supported features are {list(STAGES)}")
    fpn_in = list(cfg.MODEL.FPN.IN_FEATURES)
    if not fpn_in or any(f not in out_features for f in fpn_in):
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES={fpn_in} must be a non-empty subset of MODEL.RESNETS.OUT_FEATURES={out_features}"
        )
    strides = [STAGE_STRIDES[f] for f in fpn_in]
    if any(b != 2 * a for a, b in zip(strides[:-1], strides[1:])):
        raise ValueError(f"MODEL.FPN.IN_FEATURES={fpn_in} must be consecutive stages in increasing stride")
    if fpn_in[-1] != "res5":
        raise ValueError(f"MODEL.FPN.IN_FEATURES={fpn_in} must end with 'res5' (P6/P7 are computed from C5)")
    if cfg.MODEL.FPN.NORM not in FPN_NORMS:
        raise ValueError(
            f"MODEL.FPN.NORM={cfg.MODEL.FPN.NORM!r} is not supported by the torchvision front-end; "
            f"supported: {', '.join(repr(n) for n in FPN_NORMS)}"
        )
    if cfg.MODEL.FPN.FUSE_TYPE != "sum":
        raise ValueError(f"MODEL.FPN.FUSE_TYPE={cfg.MODEL.FPN.FUSE_TYPE!r}: only 'sum' is supported")
    if cfg.MODEL.FPN.OUT_CHANNELS < 1:
        raise ValueError(f"MODEL.FPN.OUT_CHANNELS must be positive, got {cfg.MODEL.FPN.OUT_CHANNELS}")
    return _fpn_output_strides(fpn_in)


def _build_resnet_body(cfg) -> nn.Module:
    res = cfg.MODEL.RESNETS
    norm_layer = get_norm(res.NORM, "MODEL.RESNETS.NORM")
    kwargs = {"weights": None, "norm_layer": norm_layer}
    if res.DEPTH not in BASIC_BLOCK_DEPTHS:
        kwargs.update(groups=res.NUM_GROUPS, width_per_group=res.WIDTH_PER_GROUP)
    body = getattr(tv_resnet, RESNET_DEPTHS[res.DEPTH])(**kwargs)
    if res.STRIDE_IN_1X1 and res.DEPTH not in BASIC_BLOCK_DEPTHS:
        # Detectron2 / MSRA: the stride of a bottleneck sits on its first 1x1
        # conv; torchvision (v1.5) puts it on the 3x3. Same output sizes.
        for stage in ("layer2", "layer3", "layer4"):
            block = getattr(body, stage)[0]
            block.conv1.stride, block.conv2.stride = block.conv2.stride, block.conv1.stride
    return body


def _stage_channels(cfg) -> Dict[str, int]:
    res = cfg.MODEL.RESNETS
    if cfg.MODEL.BACKBONE.NAME == TINY_FPN:
        return {s: res.RES2_OUT_CHANNELS * 2**i for i, s in enumerate(STAGES)}
    expansion = 1 if res.DEPTH in BASIC_BLOCK_DEPTHS else 4
    return {s: 64 * expansion * 2**i for i, s in enumerate(STAGES)}


def _check_in_features(cfg, strides: Dict[str, int]) -> None:
    """MODEL.RETINANET.IN_FEATURES: FPN outputs (``strides``: name -> stride), by increasing stride."""
    in_features = list(cfg.MODEL.RETINANET.IN_FEATURES)
    unknown = [f for f in in_features if f not in strides]
    if not in_features or unknown:
        raise ValueError(
            f"MODEL.RETINANET.IN_FEATURES={in_features}: features must be among the backbone's "
            f"outputs {list(strides)}"
        )
    if [strides[f] for f in in_features] != sorted(strides[f] for f in in_features):
        raise ValueError(f"MODEL.RETINANET.IN_FEATURES={in_features} must be ordered by increasing stride")


def build_backbone(cfg) -> FPNBackbone:
    """The backbone named by ``MODEL.BACKBONE.NAME``, returning ``MODEL.RETINANET.IN_FEATURES``."""
    _check_in_features(cfg, check_backbone_cfg(cfg))
    res = cfg.MODEL.RESNETS
    if cfg.MODEL.BACKBONE.NAME == TINY_FPN:
        body = TinyResNet(
            depth=res.DEPTH,
            stem_channels=res.STEM_OUT_CHANNELS,
            res2_channels=res.RES2_OUT_CHANNELS,
            norm_layer=get_norm(res.NORM, "MODEL.RESNETS.NORM"),
        )
    else:
        body = _build_resnet_body(cfg)
    freeze_stages(body, cfg.MODEL.BACKBONE.FREEZE_AT, convert_frozen_batchnorm)
    if not cfg.MODEL.WEIGHTS:
        if cfg.MODEL.BACKBONE.FREEZE_AT > 0:
            logger.warning(
                "MODEL.BACKBONE.FREEZE_AT=%d freezes randomly initialised layers: MODEL.WEIGHTS is "
                "empty. Set FREEZE_AT 0 to train from scratch.", cfg.MODEL.BACKBONE.FREEZE_AT,
            )
        if res.NORM == "FrozenBN":
            logger.warning(
                "MODEL.RESNETS.NORM='FrozenBN' without MODEL.WEIGHTS means no normalization in the "
                "backbone; 'BN' or 'GN' train better from scratch."
            )
    fpn_in = list(cfg.MODEL.FPN.IN_FEATURES)
    channels = _stage_channels(cfg)
    return FPNBackbone(
        body,
        in_features=fpn_in,
        in_channels=[channels[f] for f in fpn_in],
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        out_features=list(cfg.MODEL.RETINANET.IN_FEATURES),
        norm_layer=get_norm(cfg.MODEL.FPN.NORM, "MODEL.FPN.NORM"),
    )

