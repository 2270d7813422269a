"""IoUAwareRetinaNet (torchvision front-end): training with every assigner, the
IoU branch, hard ground truth, non-finite outputs and fused-score ranking."""
import math
from dataclasses import replace

import pytest
import torch
from torchvision.models.detection import RetinaNet

from iou_aware_retinanet.core import DegenerateBoxWarning, available_assigners
from iou_aware_retinanet.core import training as core_training
from iou_aware_retinanet.tv import IoUAwareRetinaNet, build_model

from .helpers import random_inputs, scramble_head, tiny_cfg


def _train_step(model, images, targets):
    model.train()
    model.zero_grad()
    losses = model(images, targets)
    sum(losses.values()).backward()
    return losses


def test_is_a_torchvision_retinanet():
    model = build_model(tiny_cfg())
    assert isinstance(model, IoUAwareRetinaNet) and isinstance(model, RetinaNet)
    assert model.iou_aware and model.head.iou_pred.out_channels == 9


@pytest.mark.parametrize("assigner", available_assigners())
def test_forward_backward_every_assigner(assigner):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(["MODEL.ASSIGNER.NAME", assigner]))
    images, targets = random_inputs(num_images=2, num_gt=(4, 0))  # the second image has no GT
    losses = _train_step(model, images, targets)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_iou"}
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert losses["loss_box_reg"] > 0 and losses["loss_iou"] > 0
    grad = model.head.iou_pred.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_task_aligned_with_iou_prediction():
    model = build_model(
        tiny_cfg(["MODEL.ASSIGNER.NAME", "task_aligned", "MODEL.ASSIGNER.TASK_ALIGNED.USE_IOU_PREDICTION", True])
    )
    losses = _train_step(model, *random_inputs(num_gt=(3, 2)))
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("assigner", available_assigners())
def test_predictions_only_for_dynamic_assigners(assigner, monkeypatch):
    model = build_model(tiny_cfg(["MODEL.ASSIGNER.NAME", assigner]))
    calls = []
    original = core_training.detached_predictions

    def spy(*args):
        calls.append(args)
        predictions = original(*args)
        p = predictions[0]
        assert not p.cls_probs.requires_grad and not p.boxes.requires_grad and not p.ious.requires_grad
        assert p.boxes.shape == (args[3].shape[0], 4) and p.ious.shape == (args[3].shape[0],)
        return predictions

    monkeypatch.setattr(core_training, "detached_predictions", spy)
    _train_step(model, *random_inputs(num_gt=(2, 1)))
    assert bool(calls) == model.assigner.needs_predictions


def test_compute_loss_needs_the_anchors_per_level():
    """ATSS picks candidates per FPN level: without the level sizes the anchors would
    read as one level and candidates would be picked globally, so compute_loss refuses."""
    model = build_model(tiny_cfg(["MODEL.ASSIGNER.NAME", "atss"]))
    model.train()
    images, targets = model.transform(*random_inputs(num_gt=(3, 2)))
    features = list(model.backbone(images.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(images, features)
    with pytest.raises(TypeError):
        model.compute_loss(targets, head_outputs, anchors)
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        model.compute_loss(targets, head_outputs, anchors, None)


def test_iou_branch_off_is_plain_retinanet():
    model = build_model(tiny_cfg(["MODEL.IOU_AWARE.ENABLED", False]))
    assert not model.iou_aware and model.head.iou_pred is None
    assert not any("iou" in name for name in model.state_dict())
    losses = _train_step(model, *random_inputs())
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    model.eval()
    scramble_head(model)
    with torch.no_grad():
        out = model(random_inputs()[0])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_only_empty_ground_truth():
    model = build_model(tiny_cfg())
    losses = _train_step(model, *random_inputs(num_gt=(0,)))
    assert losses["loss_cls"] > 0 and torch.isfinite(losses["loss_cls"])
    assert losses["loss_box_reg"] == 0 and losses["loss_iou"] == 0


@pytest.mark.parametrize("assigner", ["max_iou", "atss", "hambox"])
def test_degenerate_gt_boxes_are_dropped_with_a_warning(assigner):
    model = build_model(tiny_cfg(["MODEL.ASSIGNER.NAME", assigner]))
    images, targets = random_inputs(num_gt=(2, 1))
    bad = torch.tensor([[30.0, 30.0, 30.0, 50.0], [40.0, 40.0, 20.0, 60.0], [float("nan"), 1.0, 9.0, 9.0]])
    targets[0]["boxes"] = torch.cat([targets[0]["boxes"], bad])
    targets[0]["labels"] = torch.cat([targets[0]["labels"], torch.tensor([0, 1, 2])])
    with pytest.warns(DegenerateBoxWarning):
        losses = _train_step(model, images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_malformed_targets_raise():
    model = build_model(tiny_cfg())
    images, targets = random_inputs()
    targets[0]["boxes"] = targets[0]["boxes"][:, :3]
    with pytest.raises(ValueError, match="boxes"):
        model(images, targets)
    with pytest.raises(ValueError, match="targets"):
        model(images)


def test_labels_out_of_range_raise():
    model = build_model(tiny_cfg(num_classes=3))
    images, targets = random_inputs()
    targets[0]["labels"][0] = 3  # classes are 0..K-1, there is no background class
    with pytest.raises(ValueError, match="gt_classes"):
        model(images, targets)


@pytest.mark.parametrize("target_gradient", [True, False])
def test_iou_target_gradient_switch(target_gradient):
    """loss_iou reaches the box branch only through an undetached IoU target."""
    model = build_model(tiny_cfg(["MODEL.IOU_AWARE.TARGET_GRADIENT", target_gradient]))
    model.train()
    losses = model(*random_inputs(num_gt=(4, 2)))
    losses["loss_iou"].backward()
    box_grad = model.head.regression_head.bbox_reg.weight.grad
    reached = box_grad is not None and box_grad.abs().sum() > 0
    assert reached == target_gradient
    assert model.head.iou_pred.weight.grad.abs().sum() > 0


def test_training_metrics_are_returned_not_stored():
    """The step's statistics come back with the losses (``with_metrics``), computed from the same
    forward pass: loss_iou less the entropy of its targets is positive and below loss_iou."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    model.train()
    images, targets = random_inputs(num_gt=(4, 2))
    attributes = set(vars(model))
    torch.manual_seed(1)
    losses, metrics = model(images, targets, with_metrics=True)
    assert set(vars(model)) == attributes  # the forward pass leaves nothing on the model
    torch.manual_seed(1)
    assert {k: v.item() for k, v in model(images, targets).items()} == {k: v.item() for k, v in losses.items()}
    assert set(metrics) == {"loss_iou_minus_entropy"}
    assert 0 < metrics["loss_iou_minus_entropy"] < losses["loss_iou"].item()
    plain = build_model(tiny_cfg(["MODEL.IOU_AWARE.ENABLED", False]))
    plain.train()
    assert plain(images, targets, with_metrics=True)[1] == {}


def test_dense_outputs_are_what_the_detections_come_from():
    model = build_model(tiny_cfg())
    scramble_head(model)
    images = [torch.rand(3, 96, 128), torch.rand(3, 60, 90)]
    with pytest.raises(ValueError, match="model.eval"):
        model.train().dense_outputs(images)
    model.eval()
    with torch.no_grad():
        dense = model.dense_outputs(images)
        detections = model.transform.postprocess(
            model.postprocess_detections(dense.head_outputs, dense.anchors, dense.image_sizes),
            dense.image_sizes, dense.original_image_sizes,
        )  # fmt: skip
        expected = model(images)
    assert dense.original_image_sizes == [(96, 128), (60, 90)]
    assert [len(level) for level in dense.anchors] == [len(dense.head_outputs["cls_logits"])] * 2
    for got, want in zip(detections, expected):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_eval_outputs():
    model = build_model(tiny_cfg())
    scramble_head(model)
    model.eval()
    images = [torch.rand(3, 96, 128), torch.rand(3, 60, 90)]  # the second is upscaled, then mapped back
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, image in zip(out, images):
        assert set(det) == {"boxes", "scores", "labels", "cls_scores", "pred_ious"}
        n = len(det["boxes"])
        assert 0 < n <= 100
        h, w = image.shape[-2:]
        assert (det["boxes"][:, 0::2] <= w + 1e-3).all() and (det["boxes"][:, 1::2] <= h + 1e-3).all()
        assert (det["boxes"] >= 0).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # ranked by S
        expected = (det["cls_scores"] * det["pred_ious"]).sqrt()  # alpha = 0.5
        torch.testing.assert_close(det["scores"], expected)
        assert ((det["labels"] >= 0) & (det["labels"] < 3)).all()


def _patch_head(model, monkeypatch, edit):
    """Make the head's outputs pass through ``edit(outputs)`` (in place)."""
    original = model.head.forward

    def patched(features):
        out = original(features)
        edit(out)
        return out

    monkeypatch.setattr(model.head, "forward", patched)


def test_non_finite_head_outputs_at_inference(monkeypatch):
    model = build_model(tiny_cfg())
    scramble_head(model)
    model.eval()

    def poison(out):
        out["cls_logits"][0, :50] = float("nan")
        out["cls_logits"][0, 50:100] = float("inf")
        out["bbox_regression"][0, 100:200] = float("inf")
        out["bbox_regression"][0, 200:300, 0] = float("nan")
        out["bbox_regression"][0, 300:400, 2] = -float("inf")
        out["iou_logits"][0, 400:500] = float("nan")
        out["iou_logits"][1] = float("inf")

    _patch_head(model, monkeypatch, poison)
    with torch.no_grad():
        out = model(random_inputs()[0])
    for det in out:
        assert len(det["boxes"]) > 0
        for key in ("boxes", "scores", "cls_scores", "pred_ious"):
            assert torch.isfinite(det[key]).all(), key


def _logit(p):
    return math.log(p / (1 - p))


@pytest.mark.parametrize(
    "alpha, expected_first",
    [(1.0, "confident"), (0.5, "well_placed"), (None, "well_placed"), (0.1, "well_placed"), (0.9, "confident")],
)
def test_alpha_changes_ranking(alpha, expected_first, monkeypatch):
    """Anchor a: p = 0.9, IoU 0.3; anchor b: p = 0.6, IoU 0.9. S = p^alpha * IoU^(1 - alpha)
    ranks a first only when alpha is close to 1."""
    model = build_model(tiny_cfg())
    model.inference_config = replace(model.inference_config, alpha=alpha)
    model.eval()
    a, b = 0, 9 * 40  # two anchors of P3 (9 per location), far apart in the image

    def craft(out):
        out["cls_logits"].fill_(-30.0)
        out["bbox_regression"].zero_()
        out["iou_logits"].fill_(-30.0)
        out["cls_logits"][:, a, 1] = _logit(0.9)
        out["iou_logits"][:, a] = _logit(0.3)
        out["cls_logits"][:, b, 2] = _logit(0.6)
        out["iou_logits"][:, b] = _logit(0.9)

    _patch_head(model, monkeypatch, craft)
    with torch.no_grad():
        det = model(random_inputs(num_images=1)[0])[0]
    assert det["labels"].tolist() == ([1, 2] if expected_first == "confident" else [2, 1])
    p = torch.tensor([0.9, 0.6] if expected_first == "confident" else [0.6, 0.9])
    iou = torch.tensor([0.3, 0.9] if expected_first == "confident" else [0.9, 0.3])
    torch.testing.assert_close(det["cls_scores"], p)
    torch.testing.assert_close(det["pred_ious"], iou)
    fused = p * iou if alpha is None else p**alpha * iou ** (1 - alpha)
    torch.testing.assert_close(det["scores"], fused)


@pytest.mark.parametrize("threshold_on, kept_label", [("fused", 2), ("cls", 1)])
def test_score_threshold_on_fused_or_cls(threshold_on, kept_label, monkeypatch):
    """Anchor a: p = 0.6, IoU 0.2 (S = 0.35); anchor b: p = 0.3, IoU 0.9 (S = 0.52).
    A 0.4 threshold on S keeps only b, on p only a."""
    cfg = tiny_cfg(["MODEL.RETINANET.SCORE_THRESH_TEST", 0.4, "MODEL.IOU_AWARE.THRESHOLD_ON", threshold_on])
    model = build_model(cfg)
    model.eval()
    a, b = 0, 9 * 40

    def craft(out):
        out["cls_logits"].fill_(-30.0)
        out["bbox_regression"].zero_()
        out["iou_logits"].fill_(-30.0)
        out["cls_logits"][:, a, 1] = _logit(0.6)
        out["iou_logits"][:, a] = _logit(0.2)
        out["cls_logits"][:, b, 2] = _logit(0.3)
        out["iou_logits"][:, b] = _logit(0.9)

    _patch_head(model, monkeypatch, craft)
    with torch.no_grad():
        det = model(random_inputs(num_images=1)[0])[0]
    assert det["labels"].tolist() == [kept_label]


def test_training_reduces_the_loss():
    """A few SGD steps on one batch: the model learns (the plumbing carries gradients)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(["MODEL.RETINANET.NORM", "GN", "MODEL.FPN.OUT_CHANNELS", 32]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = random_inputs(num_gt=(3, 2))
    first = None
    for _ in range(15):
        losses = _train_step(model, images, targets)
        total = sum(losses.values()).item()
        first = first if first is not None else total
        optimizer.step()
    assert total < 0.7 * first


def test_detectron2_loss_normalizer_by_hand():
    """MODEL.RETINANET.LOSS_NORMALIZER "batch_ema": the batch's summed losses over an EMA of its positives
    (0.9 * 100 + 0.1 * N at the first step); "per_image": each image by its own positives, averaged."""
    from iou_aware_retinanet.core import dense_detection_losses as real_losses

    images, targets = random_inputs(num_images=2, num_gt=(3, 1))
    captured = {}

    def spy(**kwargs):
        out = real_losses(**kwargs)
        captured.update({k: v.detach().clone() for k, v in out.items()})
        return out

    results = {}
    for normalizer in ("per_image", "batch_ema"):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(["MODEL.RETINANET.LOSS_NORMALIZER", normalizer]))
        model.train()
        core_training.dense_detection_losses, saved = spy, core_training.dense_detection_losses
        try:
            results[normalizer] = {k: v.detach() for k, v in model(images, targets).items()}
        finally:
            core_training.dense_detection_losses = saved
        per_image, num_fg = dict(captured), captured["num_foreground"].double()
        for name in ("loss_cls", "loss_box_reg", "loss_iou"):
            if normalizer == "batch_ema":
                expected = per_image[name].double().sum() / (0.9 * 100.0 + 0.1 * float(num_fg.sum()))
            else:
                expected = (per_image[name].double() / num_fg.clamp(min=1)).mean()
            torch.testing.assert_close(results[normalizer][name].double(), expected, rtol=1e-5, atol=1e-7)
        if normalizer == "batch_ema":
            assert float(model.loss_normalizer_ema) == pytest.approx(90.0 + 0.1 * float(num_fg.sum()))
            assert "loss_normalizer_ema" in model.state_dict()  # checkpointed: exact resume
    with pytest.raises(ValueError, match="MODEL.RETINANET.LOSS_NORMALIZER='mean'"):
        build_model(tiny_cfg(["MODEL.RETINANET.LOSS_NORMALIZER", "mean"]))


def _four_d_parameters(model):
    return [(name, p) for name, p in model.named_parameters() if p.dim() == 4]


def test_channels_last_model_computes_the_same_losses_and_detections():
    """MODEL.CHANNELS_LAST: every 4-D weight and every feature map channels-last, the same
    losses, gradients and detections up to float rounding, and checkpoints interchangeable."""
    images, targets = random_inputs(num_images=2, num_gt=(4, 2))
    models = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        models[channels_last] = build_model(tiny_cfg(["MODEL.CHANNELS_LAST", channels_last]))
    default, fast = models[False], models[True]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for _, p in _four_d_parameters(fast))
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for _, p in _four_d_parameters(default))
    features = fast.backbone(torch.rand(2, 3, 96, 128))  # a contiguous batch: the weights set the format
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features.values())
    losses = {}
    for key, model in models.items():
        losses[key] = _train_step(model, images, targets)
        assert set(losses[key]) == {"loss_cls", "loss_box_reg", "loss_iou"}
    for name in losses[False]:
        torch.testing.assert_close(losses[True][name], losses[False][name], rtol=1e-5, atol=1e-6)
    grads = {name: p.grad for name, p in fast.named_parameters()}
    for name, p in default.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-5)
    # A checkpoint of either loads into the other, values unchanged and format kept.
    default.load_state_dict(fast.state_dict())
    assert all(torch.equal(p, dict(fast.named_parameters())[n]) for n, p in default.named_parameters())
    assert all(p.is_contiguous() for _, p in _four_d_parameters(default))
    scramble_head(default)
    fast.load_state_dict(default.state_dict())
    default.eval(), fast.eval()
    with torch.no_grad():
        for a, b in zip(default(images), fast(images)):
            assert torch.equal(a["labels"], b["labels"])
            torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
