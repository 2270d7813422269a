"""Code written for Detectron2's RetinaNet keeps working on IoUAwareRetinaNet: the head's
outputs and the ``inference_single_image`` hook."""
import pytest

from .helpers import D2_MISSING_REASON, project_cfg, random_inputs, scramble_head

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead  # noqa: E402


def _model(iou_aware=True):
    torch.manual_seed(0)
    model = build_model(project_cfg(opts=["MODEL.IOU_AWARE.ENABLED", iou_aware]))
    scramble_head(model)
    return model.eval()


def _features(model):
    images = model.preprocess_image(random_inputs(num_images=2))
    features = model.backbone(images.tensor)
    return images, [features[f] for f in model.head_in_features]


def _retinanet_head(model):
    """Detectron2's own head with the model's weights (all but the IoU conv)."""
    cfg = project_cfg()
    shapes = model.backbone.output_shape()
    head = RetinaNetHead(cfg, [shapes[f] for f in model.head_in_features])
    state = {k: v for k, v in model.head.state_dict().items() if not k.startswith("iou_pred.")}
    head.load_state_dict(state)
    return head.eval()


@torch.no_grad()
def test_head_without_iou_branch_is_retinanet_head():
    model = _model(iou_aware=False)
    _, features = _features(model)
    pred_logits, pred_deltas = model.head(features)  # RetinaNetHead's two outputs
    expected_logits, expected_deltas = _retinanet_head(model)(features)
    for ours, theirs in zip(pred_logits + pred_deltas, expected_logits + expected_deltas):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("grad", [True, False])
def test_head_with_iou_branch_adds_a_third_output(grad):
    """The third output, per-level (N, A, H, W) IoU logits, is the IoU conv on the box
    tower; the first two are RetinaNetHead's (with or without autograd, where the
    box and IoU convs run fused)."""
    model = _model(iou_aware=True)
    with torch.set_grad_enabled(grad):
        _, features = _features(model)
        pred_logits, pred_deltas, pred_ious = model.head(features)
        expected_logits, expected_deltas = _retinanet_head(model)(features)
        num_anchors = model.num_anchors_per_location
        for level, feature in enumerate(features):
            n, _, h, w = feature.shape
            assert pred_ious[level].shape == (n, num_anchors, h, w)
            torch.testing.assert_close(pred_ious[level], model.head.iou_pred(model.head.bbox_subnet(feature)))
            torch.testing.assert_close(pred_logits[level], expected_logits[level])
            torch.testing.assert_close(pred_deltas[level], expected_deltas[level])


def _single_image_inputs(model):
    """RetinaNet.inference_single_image's arguments for image 0, and the IoU predictions."""
    images, features = _features(model)
    predictions = model.head(features)
    logits, deltas, ious = model._split_predictions(predictions)
    anchors = model.anchor_generator(features)
    box_cls = [x[0].sigmoid() for x in logits]
    box_delta = [x[0] for x in deltas]
    box_iou = None if ious is None else [x[0, :, 0].sigmoid() for x in ious]
    expected = model.forward_inference(images, features, predictions)[0]
    return (anchors, box_cls, box_delta, images.image_sizes[0]), box_iou, expected


@torch.no_grad()
def test_inference_single_image_without_box_iou_is_refused_on_an_iou_aware_model():
    """Detectron2's signature (no IoU argument) would silently rank by p: refused."""
    model = _model(iou_aware=True)
    args, box_iou, expected = _single_image_inputs(model)
    with pytest.raises(ValueError, match="needs box_iou"):
        model.inference_single_image(*args)
    result = model.inference_single_image(*args, box_iou=box_iou)
    assert len(result) == len(expected) > 0
    for name in ("scores", "pred_classes", "cls_scores", "pred_ious"):
        assert torch.equal(result.get(name), expected.get(name)), name
    assert torch.equal(result.pred_boxes.tensor, expected.pred_boxes.tensor)


@torch.no_grad()
def test_inference_single_image_keeps_detectron2_signature_without_the_branch():
    model = _model(iou_aware=False)
    args, box_iou, expected = _single_image_inputs(model)
    assert box_iou is None
    result = model.inference_single_image(*args)
    assert len(result) == len(expected) > 0
    assert torch.equal(result.scores, expected.scores)
    assert torch.equal(result.pred_boxes.tensor, expected.pred_boxes.tensor)
    with pytest.raises(ValueError, match="no IoU branch"):
        model.inference_single_image(*args, box_iou=[torch.ones(len(c)) for c in args[1]])
