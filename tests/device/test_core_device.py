"""The core on the test device: every assigner (the dynamic ones with their detached
predictions), chunked assignment, the training losses, post-processing with NaN / inf
head outputs, and the head's outputs under autocast. Every output stays on the
device of its inputs; on a GPU the results are those of the CPU."""
import math

import pytest
import torch

from iou_aware_retinanet.core import (
    AnchorSet,
    BoxCoder,
    InferenceConfig,
    LossConfig,
    Predictions,
    box_and_iou_outputs,
    build_iou_predictor,
    postprocess_batch,
    postprocess_image,
    training_losses,
)

from .helpers import ASSIGNERS, NUM_CLASSES, amp_dtype, assert_on, assigner_on_config, fused_score_dtype

STRIDES = (8, 16, 32)
CELL_SIZES = (24.0, 48.0, 96.0)


def grid_anchors(height: int, width: int) -> AnchorSet:
    """3 levels, 3 aspect ratios x 2 scales per location, location-major (RetinaNet's layout)."""
    levels = []
    for stride, size in zip(STRIDES, CELL_SIZES):
        cell = []
        for scale in (1.0, 2 ** 0.5):
            for ratio in (0.5, 1.0, 2.0):
                w = size * scale / math.sqrt(ratio)
                h = size * scale * math.sqrt(ratio)
                cell.append((-w / 2, -h / 2, w / 2, h / 2))
        ys = torch.arange(math.ceil(height / stride), dtype=torch.float32) * stride
        xs = torch.arange(math.ceil(width / stride), dtype=torch.float32) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)
        levels.append((shifts + torch.tensor(cell)[None]).reshape(-1, 4))
    return AnchorSet(torch.cat(levels), tuple(len(x) for x in levels), 6)


def random_gt(num: int, height: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    wh = 12 + torch.rand(num, 2, generator=g) * torch.tensor([width * 0.4, height * 0.4])
    xy = torch.rand(num, 2, generator=g) * (torch.tensor([width, height]) - wh)
    return torch.cat([xy, xy + wh], dim=1), torch.randint(0, NUM_CLASSES, (num,), generator=g)


def random_predictions(anchors: AnchorSet, seed: int) -> Predictions:
    g = torch.Generator().manual_seed(seed)
    num = len(anchors)
    deltas = torch.randn(num, 4, generator=g) * 0.2
    return Predictions(
        cls_probs=torch.rand(num, NUM_CLASSES, generator=g),
        boxes=BoxCoder().apply_deltas(deltas, anchors.boxes),
        ious=torch.rand(num, generator=g),
    )


def to_device(obj, device):
    if isinstance(obj, AnchorSet):
        return AnchorSet(obj.boxes.to(device), obj.num_per_level, obj.num_per_location)
    if isinstance(obj, Predictions):
        return Predictions(*(None if t is None else t.to(device) for t in (obj.cls_probs, obj.boxes, obj.ious)))
    return obj.to(device)


def assert_same_assignment(got, expected, max_mismatch=0.0):
    """Equal labels and matched GTs, up to ``max_mismatch`` of the anchors (an IoU a rounding
    away from a threshold: float arithmetic differs in its last bits between devices); equal
    soft targets and weights where the labels agree."""
    agree = (got.labels.cpu() == expected.labels) & (got.matched_gt.cpu() == expected.matched_gt)
    assert 1 - agree.float().mean() <= max_mismatch, f"{int((~agree).sum())} anchors assigned differently"
    for field in ("cls_targets", "cls_weights", "box_weights"):
        a, b = getattr(got, field), getattr(expected, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a.cpu()[agree], b[agree], rtol=1e-4, atol=1e-5, msg=field)


# Another device's last bits may move an anchor across a threshold; ATSS's thresholds are
# means + std over candidates, whose summation order differs too.
DEVICE_TOLERANCE = {"atss": 2e-3}


@pytest.mark.parametrize("name", ASSIGNERS)
def test_assigner_on_device(device, name):
    """No GT, a few GTs with a degenerate one, and many GTs worked through in chunks:
    outputs on the device, the chunked result equal to the unchunked one, the device's
    equal to the CPU's."""
    anchors = grid_anchors(96, 128)
    predictions = random_predictions(anchors, seed=1)
    dev_anchors, dev_predictions = to_device(anchors, device), to_device(predictions, device)
    assigner = assigner_on_config(name)

    empty = assigner(dev_anchors, torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.long, device=device),
                     dev_predictions)  # fmt: skip
    assert_on(device, empty)
    assert bool((empty.labels == NUM_CLASSES).all()) and empty.num_foreground == 0

    boxes, classes = random_gt(5, 96, 128, seed=2)
    boxes[2] = torch.tensor([50.0, 50.0, 40.0, 60.0])  # zero width: dropped with a warning
    with pytest.warns(UserWarning, match="dropped"):
        result = assigner(dev_anchors, boxes.to(device), classes.to(device), dev_predictions)
    assert_on(device, result)
    assert result.num_foreground > 0 and not bool((result.matched_gt == 2).any())
    with pytest.warns(UserWarning, match="dropped"):
        expected = assigner(anchors, boxes, classes, predictions)
    assert_same_assignment(result, expected, DEVICE_TOLERANCE.get(name, 1e-3) if device.type != "cpu" else 0.0)

    # Many GTs, in blocks of ~3 GTs x all anchors.
    boxes, classes = random_gt(60, 96, 128, seed=3)
    boxes, classes = boxes.to(device), classes.to(device)
    whole = assigner(dev_anchors, boxes, classes, dev_predictions)
    chunked_assigner = assigner_on_config(name, max_block_elements=3 * len(anchors))
    chunked = chunked_assigner(dev_anchors, boxes, classes, dev_predictions)
    assert_on(device, chunked)
    assert whole.num_foreground > 0
    assert torch.equal(chunked.labels, whole.labels) and torch.equal(chunked.matched_gt, whole.matched_gt)
    assert_same_assignment(chunked, to_device_assignment(whole))


def to_device_assignment(assignment):
    """A CPU copy (assert_same_assignment's expected side)."""
    from dataclasses import replace

    return replace(assignment, **{f: None if getattr(assignment, f) is None else getattr(assignment, f).cpu()
                                  for f in ("labels", "matched_gt", "cls_targets", "cls_weights", "box_weights")})


def head_outputs(anchors: AnchorSet, num_images: int, seed: int, iou_branch: bool):
    g = torch.Generator().manual_seed(seed)
    num = len(anchors)
    cls_logits = torch.randn(num_images, num, NUM_CLASSES, generator=g) - 2.0
    deltas = torch.randn(num_images, num, 4, generator=g) * 0.2
    ious = torch.randn(num_images, num, generator=g) if iou_branch else None
    return cls_logits, deltas, ious


def batch_gt(device, seed=4):
    """Three images: a few GTs, none, and many."""
    few, few_cls = random_gt(4, 96, 128, seed=seed)
    many, many_cls = random_gt(40, 96, 128, seed=seed + 1)
    empty, empty_cls = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    return [b.to(device) for b in (few, empty, many)], [c.to(device) for c in (few_cls, empty_cls, many_cls)]


def _losses(outputs, anchors, gt_boxes, gt_classes, name, loss_config):
    return training_losses(*outputs, anchors, gt_boxes, gt_classes, assigner_on_config(name), BoxCoder(), loss_config)


LOSS_CASES = [(name, True) for name in ASSIGNERS] + [("max_iou", False), ("atss", False)]


@pytest.mark.parametrize("name,iou_branch", LOSS_CASES)
def test_training_losses_on_device(device, name, iou_branch):
    """Per-image losses of a batch with an image without GT: on the device, float32,
    finite, with finite gradients on the device; the CPU's values."""
    anchors = grid_anchors(96, 128)
    cpu_outputs = head_outputs(anchors, 3, seed=5, iou_branch=iou_branch)
    outputs = [None if t is None else t.to(device).requires_grad_() for t in cpu_outputs]
    gt_boxes, gt_classes = batch_gt(device)
    config = LossConfig(soft_target_loss=assigner_on_config(name).soft_target_loss)
    losses = _losses(outputs, to_device(anchors, device), gt_boxes, gt_classes, name, config)
    assert_on(device, losses)
    assert ("loss_iou" in losses) == iou_branch
    for key, value in losses.items():
        assert value.shape == (3,), key
        if key != "num_foreground":
            assert value.dtype == torch.float32 and bool(torch.isfinite(value).all()), key
    assert int(losses["num_foreground"][1]) == 0 and int(losses["num_foreground"][0]) > 0
    sum(v.sum() for k, v in losses.items() if k.startswith("loss_")).backward()
    for t in outputs:
        if t is not None:
            assert t.grad is not None and t.grad.device == t.device and bool(torch.isfinite(t.grad).all())

    expected = _losses(cpu_outputs, anchors, [b.cpu() for b in gt_boxes], [c.cpu() for c in gt_classes], name, config)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key].detach().cpu(), value, rtol=2e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize("name", ["max_iou", "noisy_anchor", "task_aligned", "hambox"])
def test_losses_of_autocast_outputs_are_float32(device, name):
    """Head outputs in the autocast type (float16 on CUDA, bfloat16 on the CPU), under
    autocast: the assigner and the losses see them in float32, so the losses are those
    of the same values in float32, and float32 themselves."""
    anchors = to_device(grid_anchors(96, 128), device)
    dtype = amp_dtype(device)
    low = [t.to(device=device, dtype=dtype) for t in head_outputs(anchors, 3, seed=6, iou_branch=True)]
    gt_boxes, gt_classes = batch_gt(device, seed=7)
    config = LossConfig(soft_target_loss=assigner_on_config(name).soft_target_loss)
    with torch.autocast(device.type, dtype=dtype):
        losses = _losses(low, anchors, gt_boxes, gt_classes, name, config)
    expected = _losses([t.float() for t in low], anchors, gt_boxes, gt_classes, name, config)
    for key, value in expected.items():
        assert losses[key].dtype == value.dtype, key
        # Not bit-equal on CUDA: its per-image sums (index_add) are atomic, in any order.
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert losses["loss_cls"].dtype == torch.float32


def test_task_aligned_with_iou_prediction_under_autocast(device):
    """The alignment metric from the IoU branch's autocast-typed prediction."""
    cfg_assigner = assigner_on_config("task_aligned")
    cfg_assigner.use_iou_prediction = True
    anchors = to_device(grid_anchors(96, 128), device)
    dtype = amp_dtype(device)
    low = [t.to(device=device, dtype=dtype) for t in head_outputs(anchors, 3, seed=8, iou_branch=True)]
    gt_boxes, gt_classes = batch_gt(device, seed=9)
    with torch.autocast(device.type, dtype=dtype):
        losses = training_losses(*low, anchors, gt_boxes, gt_classes, cfg_assigner, BoxCoder(), LossConfig())
    assert_on(device, losses)
    assert all(bool(torch.isfinite(v).all()) for v in losses.values())


# ------------------------------------------------------------------ inference

IMAGE_SIZES = [(96, 128), (70, 100), (40, 128)]  # one padded batch: anchors of the largest


def level_outputs(anchors: AnchorSet, num_images: int, seed: int, iou_branch: bool, poison: bool):
    """Per-level logits as the front-ends pass them, (N, A_l, K) / (N, A_l, 4) / (N, A_l);
    ``poison`` puts NaN and inf into class logits, deltas and IoU logits."""
    cls_logits, deltas, ious = head_outputs(anchors, num_images, seed, iou_branch)
    cls_logits = cls_logits + 1.5  # a few hundred pairs above the threshold per image
    if poison:
        cls_logits[0, :50, 0] = float("nan")
        cls_logits[0, 50:60, 1] = float("inf")
        deltas[0, 60:80] = float("inf")
        deltas[1, 100:120, 2] = float("nan")
        if ious is not None:
            ious[0, 120:200] = float("nan")
            ious[1, 200:220] = float("-inf")
    split = list(anchors.num_per_level)
    return (list(cls_logits.split(split, dim=1)), list(deltas.split(split, dim=1)),
            None if ious is None else list(ious.split(split, dim=1)))  # fmt: skip


def _postprocess(outputs, anchors: AnchorSet, config: InferenceConfig):
    per_level = list(anchors.boxes.split(list(anchors.num_per_level)))
    return postprocess_batch(*outputs, [per_level] * len(IMAGE_SIZES), BoxCoder(), IMAGE_SIZES, config)


@pytest.mark.parametrize("threshold_on", ["cls", "fused"])
@pytest.mark.parametrize("iou_branch", [True, False])
@pytest.mark.parametrize("poison", [False, True])
def test_postprocess_on_device(device, threshold_on, iou_branch, poison):
    """Images of different sizes in one batch, NaN / inf head outputs: finite detections
    on the device, ranked, within the image, and the CPU's detections."""
    anchors = grid_anchors(96, 128)
    config = InferenceConfig(threshold_on=threshold_on, clip_to_image=True, topk_candidates=300, max_detections=50)
    cpu_outputs = level_outputs(anchors, len(IMAGE_SIZES), seed=10, iou_branch=iou_branch, poison=poison)
    outputs = [None if x is None else [t.to(device) for t in x] for x in cpu_outputs]
    detections = _postprocess(outputs, to_device(anchors, device), config)
    expected = _postprocess(cpu_outputs, anchors, config)
    for det, exp, (h, w) in zip(detections, expected, IMAGE_SIZES):
        assert_on(device, [det.boxes, det.scores, det.classes, det.cls_scores])
        assert 0 < len(det) <= config.max_detections
        assert det.boxes.dtype == torch.float32 and bool(torch.isfinite(det.boxes).all())
        assert bool(torch.isfinite(det.scores).all()) and bool((det.scores[:-1] >= det.scores[1:]).all())
        assert float(det.boxes[:, 2].max()) <= w and float(det.boxes[:, 3].max()) <= h
        gate = det.scores if threshold_on == "fused" or not iou_branch else det.cls_scores
        assert bool((gate > config.score_thresh).all())
        assert (det.ious is None) == (not iou_branch)
        assert len(det) == len(exp)
        torch.testing.assert_close(det.boxes.cpu(), exp.boxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(det.scores.cpu(), exp.scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(det.classes.cpu(), exp.classes)


@pytest.mark.parametrize("iou_branch", [True, False])
def test_postprocess_of_low_precision_outputs_without_autocast(device, iou_branch):
    """A model run in float16 / bfloat16 throughout (``model.half()``), no autocast:
    NMS gets float32 boxes and scores (it refuses mixed types), boxes stay float32,
    scores keep the outputs' type."""
    anchors = grid_anchors(96, 128)
    dtype = amp_dtype(device)
    outputs = level_outputs(anchors, len(IMAGE_SIZES), seed=11, iou_branch=iou_branch, poison=False)
    outputs = [None if x is None else [t.to(device=device, dtype=dtype) for t in x] for x in outputs]
    for det in _postprocess(outputs, to_device(anchors, device), InferenceConfig(threshold_on="cls")):
        assert len(det) > 0
        assert det.boxes.dtype == torch.float32 and det.scores.dtype == dtype
        assert_on(device, [det.boxes, det.scores])


@pytest.mark.parametrize("iou_branch", [True, False])
def test_postprocess_under_autocast(device, iou_branch):
    """Detectron2's rule for RetinaNet under autocast: boxes float32, scores in the type
    autocast gives them (the class probabilities' type without the IoU branch)."""
    anchors = grid_anchors(96, 128)
    dtype = amp_dtype(device)
    config = InferenceConfig(threshold_on="cls")
    outputs = level_outputs(anchors, 1, seed=12, iou_branch=iou_branch, poison=False)
    probs = [x[0].to(device=device, dtype=dtype).sigmoid() for x in outputs[0]]
    deltas = [x[0].to(device=device, dtype=dtype) for x in outputs[1]]
    ious = None if outputs[2] is None else [x[0].to(device=device, dtype=dtype).sigmoid() for x in outputs[2]]
    per_level = [a.to(device) for a in anchors.boxes.split(list(anchors.num_per_level))]
    with torch.autocast(device.type, dtype=dtype):
        det = postprocess_image(probs, deltas, ious, per_level, BoxCoder(), IMAGE_SIZES[0], config)
    assert len(det) > 0
    assert det.boxes.dtype == torch.float32
    assert det.scores.dtype == (fused_score_dtype(device, config.alpha) if iou_branch else dtype)


def test_head_outputs_under_autocast(device):
    """The box and IoU convs run as one at inference: the same outputs and type as two
    convs under autocast, on the device."""
    torch.manual_seed(0)
    box_conv = torch.nn.Conv2d(16, 36, 3, padding=1).to(device)
    iou_conv = build_iou_predictor(16, 9).to(device)
    features = [torch.randn(2, 16, s, s, device=device) for s in (12, 6)]
    dtype = amp_dtype(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        boxes, ious = box_and_iou_outputs(features, box_conv, iou_conv)
        separate = [(box_conv(f), iou_conv(f)) for f in features]
    for box, iou, (box_ref, iou_ref) in zip(boxes, ious, separate):
        assert box.dtype == box_ref.dtype == dtype and iou.dtype == dtype
        assert_on(device, [box, iou])
        torch.testing.assert_close(box, box_ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(iou, iou_ref, rtol=2e-2, atol=2e-2)
