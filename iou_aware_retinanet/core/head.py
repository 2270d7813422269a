"""The IoU prediction branch added to RetinaNet's box tower."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def build_iou_predictor(in_channels: int, num_anchors: int) -> nn.Conv2d:
    """3x3 conv on the last feature of the regression tower, one logit per anchor.

    Parallel to the box-delta conv and class-agnostic (A outputs per location),
    as in the paper; the sigmoid is applied by the loss (BCE with logits, for
    numerical stability) and at inference. Initialised like RetinaNet's box
    conv (normal, std 0.01; bias 0), so the branch starts by predicting
    IoU = sigmoid(0) = 0.5 everywhere and does not disturb early training.
    """
    conv = nn.Conv2d(in_channels, num_anchors, kernel_size=3, stride=1, padding=1)
    nn.init.normal_(conv.weight, mean=0.0, std=0.01)
    nn.init.constant_(conv.bias, 0.0)
    return conv


def box_and_iou_outputs(
    features: Sequence[Tensor], box_conv: nn.Conv2d, iou_conv: nn.Conv2d
) -> Tuple[List[Tensor], List[Tensor]]:
    """The box-delta and IoU convs on the box tower's last feature of every level.

    Without autograd (inference) the two 3x3 convs run as one conv with their
    weights stacked (once per call, for all levels): the same per-channel sums,
    one pass over each feature and one call instead of two per level, which is
    most of the IoU branch's cost on a small network. With autograd they stay
    two convs, so training (and the gradient into the tower) is exactly that
    of two separate layers.
    """
    return box_and_iou_conv_outputs(list(features), box_conv.weight, box_conv.bias, iou_conv.weight, iou_conv.bias)


def box_and_iou_conv_outputs(
    features: List[Tensor],
    box_weight: Tensor,
    box_bias: Optional[Tensor],
    iou_weight: Tensor,
    iou_bias: Optional[Tensor],
) -> Tuple[List[Tensor], List[Tensor]]:
    """:func:`box_and_iou_outputs` on the two convs' parameters, the form TorchScript
    compiles (it passes no module to a function). Stride 1, "same" padding: the
    head's output convs."""
    padding = box_weight.shape[-1] // 2
    if torch.is_grad_enabled():
        return (
            [F.conv2d(f, box_weight, box_bias, 1, padding) for f in features],
            [F.conv2d(f, iou_weight, iou_bias, 1, padding) for f in features],
        )
    weight = torch.cat([box_weight, iou_weight])
    assert box_bias is not None and iou_bias is not None, "the head's output convs have biases"
    bias = torch.cat([box_bias, iou_bias])
    boxes: List[Tensor] = []
    ious: List[Tensor] = []
    for feature in features:
        box, iou = F.conv2d(feature, weight, bias, 1, padding).split(
            [box_weight.shape[0], iou_weight.shape[0]], dim=1
        )
        boxes.append(box)
        ious.append(iou)
    return boxes, ious
