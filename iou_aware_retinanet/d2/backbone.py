"""``build_tiny_fpn_backbone`` for Detectron2: the shared ``TinyResNet`` body
(:mod:`iou_aware_retinanet.modeling.tiny_resnet`) under Detectron2's own FPN and
P6/P7 block and frozen with Detectron2's ``FrozenBatchNorm2d``, so one YAML
(configs/Shapes/*) builds the same architecture on either front-end.

Initialisation differs by front-end (Detectron2's FPN uses its c2_xavier_fill,
torchvision's FPN kaiming_uniform); shapes, strides and channels are the same.
"""
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7

from ..modeling.tiny_resnet import STAGE_STRIDES, TINY_LAYOUTS, TinyResNet, freeze_stages


class TinyResNetBackbone(Backbone):
    """Detectron2 ``Backbone`` around ``TinyResNet`` (res2..res5, strides 4..32)."""

    def __init__(self, body: TinyResNet, out_features):
        super().__init__()
        self.body = body
        self._out_features = list(out_features)
        self._out_feature_channels = {f: body.out_feature_channels[f] for f in out_features}
        self._out_feature_strides = {f: STAGE_STRIDES[f] for f in out_features}

    def forward(self, x):
        features = self.body(x)
        return {f: features[f] for f in self._out_features}

    def output_shape(self):
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_tiny_fpn_backbone(cfg, input_shape: ShapeSpec):
    res = cfg.MODEL.RESNETS
    if res.DEPTH not in TINY_LAYOUTS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH={res.DEPTH} is not supported by build_tiny_fpn_backbone; "
            f"supported: {sorted(TINY_LAYOUTS)}"
        )
    if input_shape.channels != 3:
        raise ValueError(f"build_tiny_fpn_backbone takes 3-channel images, got {input_shape.channels}")
    return tiny_fpn_backbone(
        depth=res.DEPTH,
        stem_channels=res.STEM_OUT_CHANNELS,
        res2_channels=res.RES2_OUT_CHANNELS,
        norm=res.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        out_features=res.OUT_FEATURES,
        fpn_in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        fpn_norm=cfg.MODEL.FPN.NORM,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def tiny_fpn_backbone(
    *,
    depth: int = 18,
    stem_channels: int = 16,
    res2_channels: int = 16,
    norm: str = "BN",
    freeze_at: int = 0,
    out_features=("res3", "res4", "res5"),
    fpn_in_features=("res3", "res4", "res5"),
    out_channels: int = 64,
    fpn_norm: str = "",
    fuse_type: str = "sum",
) -> FPN:
    """The backbone of :func:`build_tiny_fpn_backbone` from keyword arguments (what a
    LazyConfig calls): the ``MODEL.RESNETS``, ``MODEL.BACKBONE.FREEZE_AT`` and
    ``MODEL.FPN`` keys it reads, in the same order."""
    body = TinyResNet(
        depth=depth,
        stem_channels=stem_channels,
        res2_channels=res2_channels,
        norm_layer=lambda channels: get_norm(norm, channels),
    )
    freeze_stages(body, freeze_at, FrozenBatchNorm2d.convert_frozen_batchnorm)
    bottom_up = TinyResNetBackbone(body, out_features)
    return FPN(
        bottom_up=bottom_up,
        in_features=list(fpn_in_features),
        out_channels=out_channels,
        norm=fpn_norm,
        top_block=LastLevelP6P7(bottom_up.output_shape()["res5"].channels, out_channels),
        fuse_type=fuse_type,
    )
