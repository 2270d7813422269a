"""The core's training step and batch post-processing, against the pieces they chain."""
import pytest
import torch

from iou_aware_retinanet.core import (
    AnchorSet,
    BoxCoder,
    InferenceConfig,
    LossConfig,
    available_assigners,
    build_assigner,
    dense_detection_losses,
    postprocess_batch,
    postprocess_image,
    training_losses,
)
from iou_aware_retinanet.core import training as core_training

K = 3


def _anchors(num_levels=2, per_level=(16, 4)):
    gen = torch.Generator().manual_seed(1)
    boxes = []
    for n in per_level[:num_levels]:
        xy = torch.rand(n, 2, generator=gen) * 80
        wh = 8 + torch.rand(n, 2, generator=gen) * 40
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    return boxes


def _batch(seed, num_anchors, iou=True):
    gen = torch.Generator().manual_seed(seed)
    cls = torch.randn(2, num_anchors, K, generator=gen)
    deltas = 0.1 * torch.randn(2, num_anchors, 4, generator=gen)
    ious = torch.randn(2, num_anchors, generator=gen) if iou else None
    gt_boxes = [torch.tensor([[10.0, 10.0, 50.0, 60.0], [40.0, 20.0, 90.0, 70.0]]), torch.zeros(0, 4)]
    gt_classes = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]
    return cls, deltas, ious, gt_boxes, gt_classes


@pytest.mark.parametrize("name", available_assigners())
def test_training_losses_chain_assigner_and_dense_losses(name):
    """training_losses = the assigner on each image (with detached predictions for a dynamic
    one) followed by dense_detection_losses, value for value."""
    levels = _anchors()
    anchors = AnchorSet(boxes=torch.cat(levels), num_per_level=tuple(len(a) for a in levels), num_per_location=1)
    cls, deltas, ious, gt_boxes, gt_classes = _batch(0, anchors.boxes.shape[0])
    options = {"base": build_assigner("max_iou", K)} if name == "hambox" else {}
    assigner, coder, config = build_assigner(name, K, **options), BoxCoder(), LossConfig()
    got = training_losses(cls, deltas, ious, anchors, gt_boxes, gt_classes, assigner, coder, config)

    predictions = None
    if assigner.needs_predictions:
        predictions = [
            core_training.Predictions(cls_probs=cls[i].sigmoid(), boxes=coder.apply_deltas(deltas[i], anchors.boxes), ious=ious[i].sigmoid())
            for i in range(2)
        ]
    assignments = [assigner(anchors, gt_boxes[i], gt_classes[i], None if predictions is None else predictions[i]) for i in range(2)]
    expected = dense_detection_losses(cls, deltas, ious, anchors.boxes, assignments, gt_boxes, coder, config)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_detached_predictions_carry_no_gradient():
    levels = _anchors(1)
    cls, deltas, ious, *_ = _batch(0, levels[0].shape[0])
    cls.requires_grad_(True)
    deltas.requires_grad_(True)
    preds = core_training.detached_predictions(cls, deltas, ious, levels[0], BoxCoder())
    assert len(preds) == 2 and not preds[0].cls_probs.requires_grad and not preds[1].boxes.requires_grad
    torch.testing.assert_close(preds[1].ious, ious[1].sigmoid())


@pytest.mark.parametrize("iou", [True, False])
def test_postprocess_batch_is_postprocess_image_per_image(iou):
    """Sigmoid of every image's logits, then postprocess_image with that image's anchors and size."""
    levels = _anchors()
    sizes = [(96, 100), (64, 128)]
    gen = torch.Generator().manual_seed(3)
    cls = [torch.randn(2, len(a), K, generator=gen) for a in levels]
    deltas = [0.1 * torch.randn(2, len(a), 4, generator=gen) for a in levels]
    ious = [torch.randn(2, len(a), generator=gen) for a in levels] if iou else None
    anchors = [levels, [a + 1.0 for a in levels]]
    config = InferenceConfig(score_thresh=0.2, clip_to_image=True)
    got = postprocess_batch(cls, deltas, ious, anchors, BoxCoder(), sizes, config)
    assert len(got) == 2
    for i in range(2):
        expected = postprocess_image(
            [x[i].sigmoid() for x in cls], [x[i] for x in deltas], None if ious is None else [x[i].sigmoid() for x in ious],
            anchors[i], BoxCoder(), sizes[i], config,
        )  # fmt: skip
        assert len(expected) > 0
        for field in ("boxes", "scores", "classes", "cls_scores"):
            assert torch.equal(getattr(got[i], field), getattr(expected, field)), field
        assert (got[i].ious is None) == (not iou)
