"""The box-delta and IoU convs run as one conv at inference: same numbers as two."""
import torch
from torch import nn

from iou_aware_retinanet.core import box_and_iou_outputs, build_iou_predictor


def _convs(channels=16, anchors=9):
    torch.manual_seed(0)
    box = nn.Conv2d(channels, 4 * anchors, 3, padding=1)
    iou = build_iou_predictor(channels, anchors)
    nn.init.normal_(iou.weight, std=0.1)
    nn.init.normal_(iou.bias, std=0.1)
    return box, iou


def test_inference_fusion_equals_two_convs():
    box, iou = _convs()
    features = [torch.randn(2, 16, size, size + 1) for size in (16, 8, 4, 2, 1)]
    with torch.no_grad():
        fused_boxes, fused_ious = box_and_iou_outputs(features, box, iou)
        assert len(fused_boxes) == len(fused_ious) == len(features)
        for feature, fused_box, fused_iou in zip(features, fused_boxes, fused_ious):
            torch.testing.assert_close(fused_box, box(feature), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(fused_iou, iou(feature), rtol=1e-6, atol=1e-6)
            size = feature.shape[-2]
            assert fused_box.shape == (2, 36, size, size + 1) and fused_iou.shape == (2, 9, size, size + 1)


def test_training_keeps_two_convs_and_their_gradients():
    box, iou = _convs()
    feature = torch.randn(1, 16, 8, 8, requires_grad=True)
    (out_box,), (out_iou,) = box_and_iou_outputs([feature], box, iou)
    assert torch.equal(out_box, box(feature)) and torch.equal(out_iou, iou(feature))
    (out_box.sum() + out_iou.square().sum()).backward()
    assert box.weight.grad is not None and iou.weight.grad is not None and feature.grad is not None
