"""IoUAwareRetinaNet on Detectron2: training, inference, bad input."""
import math

import pytest

from .helpers import D2_MISSING_REASON, project_cfg, random_inputs, scramble_head

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from iou_aware_retinanet.core import available_assigners  # noqa: E402


def _build(opts=()):
    torch.manual_seed(0)
    return build_model(project_cfg(opts=list(opts)))


@pytest.mark.parametrize("assigner", available_assigners())
def test_training_step_every_assigner(assigner):
    model = _build(["MODEL.ASSIGNER.NAME", assigner])
    model.train()
    inputs = random_inputs(num_images=2, num_gt=(5, 0))  # the second image has no GT
    with EventStorage():
        losses = model(inputs)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_iou"}
    for name, value in losses.items():
        assert torch.isfinite(value), name
    sum(losses.values()).backward()
    for name in ("head.iou_pred.weight", "head.bbox_pred.weight", "head.cls_score.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_all_images_without_ground_truth():
    model = _build()
    model.train()
    with EventStorage():
        losses = model(random_inputs(num_images=2, num_gt=(0,)))
    assert losses["loss_box_reg"] == 0 and losses["loss_iou"] == 0
    assert losses["loss_cls"] > 0  # every anchor is a negative


@pytest.mark.parametrize("target_gradient", [True, False])
def test_target_gradient_switch_reaches_box_deltas(target_gradient):
    """Only loss_iou is backpropagated: the box conv gets gradient from it
    exactly when the IoU target is not detached."""
    model = _build(["MODEL.IOU_AWARE.TARGET_GRADIENT", target_gradient])
    model.train()
    with EventStorage():
        losses = model(random_inputs(num_images=1, num_gt=(4,)))
    losses["loss_iou"].backward()
    box_grad = model.head.bbox_pred.weight.grad
    iou_grad = model.head.iou_pred.weight.grad
    assert iou_grad is not None and iou_grad.abs().sum() > 0
    if target_gradient:
        assert box_grad is not None and box_grad.abs().sum() > 0
    else:
        assert box_grad is None or box_grad.abs().sum() == 0


def test_inference_fields_and_fused_ranking():
    model = _build(["MODEL.RETINANET.SCORE_THRESH_TEST", 0.05])
    scramble_head(model)
    model.eval()
    with torch.no_grad():
        out = model(random_inputs(num_images=1))[0]["instances"]
    assert len(out) > 0
    alpha = model.inference_config.alpha
    expected = out.cls_scores.pow(alpha) * out.pred_ious.pow(1 - alpha)
    torch.testing.assert_close(out.scores, expected)
    assert torch.all(out.scores[:-1] >= out.scores[1:])  # ranked by the fused score
    assert torch.all((out.pred_ious >= 0) & (out.pred_ious <= 1))


def test_alpha_one_scores_are_class_probabilities():
    model = _build(["MODEL.IOU_AWARE.ALPHA", 1.0])
    scramble_head(model)
    model.eval()
    with torch.no_grad():
        out = model(random_inputs(num_images=1))[0]["instances"]
    assert len(out) > 0
    torch.testing.assert_close(out.scores, out.cls_scores)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_head_outputs_do_not_crash_inference(bad):
    model = _build(["MODEL.RETINANET.SCORE_THRESH_TEST", 0.05])
    scramble_head(model)
    model.eval()
    original_forward = model.head.forward

    def poisoned(features):
        logits, deltas, ious = original_forward(features)
        for level in (logits, deltas, ious):
            level[0][:, :, :2, :2] = bad  # a few locations of the finest level
        return logits, deltas, ious

    model.head.forward = poisoned
    with torch.no_grad():
        out = model(random_inputs(num_images=1))[0]["instances"]
    assert torch.isfinite(out.pred_boxes.tensor).all()
    assert torch.isfinite(out.scores).all()


def test_unknown_assigner_lists_valid_choices():
    with pytest.raises(ValueError) as err:
        _build(["MODEL.ASSIGNER.NAME", "hungarian"])
    for name in available_assigners():
        assert name in str(err.value)


def test_unknown_threshold_mode_lists_valid_choices():
    with pytest.raises(ValueError, match="fused, cls"):
        _build(["MODEL.IOU_AWARE.THRESHOLD_ON", "both"])


def test_unknown_config_key_is_an_error(tmp_path):
    # yacs: AssertionError from the command line, KeyError from a file.
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.IOU_AWARE.TYPO"):
        _build(["MODEL.IOU_AWARE.TYPO", 1])
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  ASSIGNER:\n    ATSS:\n      TOP_K: 9\n")
    with pytest.raises(KeyError, match="MODEL.ASSIGNER.ATSS.TOP_K"):
        project_cfg().merge_from_file(str(bad))


def test_retinanet_checkpoint_loads_into_iou_aware_model():
    """A plain RetinaNet checkpoint initialises everything but the IoU conv."""
    plain = _build(["MODEL.IOU_AWARE.ENABLED", False])
    model = _build()
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert set(result.missing_keys) == {"head.iou_pred.weight", "head.iou_pred.bias"}
    assert not result.unexpected_keys


# ------------------------------------------------------------------ the tiny backbone


def _tiny_backbone(freeze_at):
    from detectron2.modeling import build_backbone

    torch.manual_seed(0)
    cfg = project_cfg("Shapes/iou_aware_retinanet.yaml", tiny=False,
                      opts=["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.FREEZE_AT", freeze_at])
    return build_backbone(cfg)


def test_tiny_backbone_freezes_with_detectron2_frozen_batchnorm():
    """FREEZE_AT 2: stem and res2 frozen with Detectron2's FrozenBatchNorm2d (not
    torchvision's), res3..res5 still BatchNorm and trained; same state-dict keys
    and values as unfrozen, so checkpoints load either way."""
    from detectron2.layers import FrozenBatchNorm2d
    from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN

    frozen, unfrozen = _tiny_backbone(2), _tiny_backbone(0)
    body = frozen.bottom_up.body
    assert not any(isinstance(m, TorchvisionFrozenBN) for m in frozen.modules())
    for name in ("bn1", "layer1"):
        module = getattr(body, name)
        assert any(isinstance(m, FrozenBatchNorm2d) for m in module.modules()), name
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules()), name
    for name in ("conv1", "layer1"):
        assert not any(p.requires_grad for p in getattr(body, name).parameters()), name
    for name in ("layer2", "layer3", "layer4"):
        module = getattr(body, name)
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in module.modules()), name
        assert all(p.requires_grad for p in module.parameters()), name
    ours, theirs = frozen.state_dict(), unfrozen.state_dict()
    # A frozen BN keeps weight, bias and running statistics, only BatchNorm's counter goes.
    assert set(ours) <= set(theirs)
    assert all(k.endswith("num_batches_tracked") and k.startswith(("bottom_up.body.bn1.", "bottom_up.body.layer1."))
               for k in set(theirs) - set(ours))
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], msg=key)
    images = torch.rand(1, 3, 64, 64)
    frozen.eval(), unfrozen.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(images)["p3"], unfrozen(images)["p3"])


def test_detectron2_front_end_imports_nothing_from_the_torchvision_front_end():
    import ast
    import pathlib

    import iou_aware_retinanet.d2 as d2

    for path in pathlib.Path(d2.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not (name.startswith("..tv") or name.startswith("iou_aware_retinanet.tv")), (path.name, name)


def test_channels_last_model_computes_the_same_losses_and_detections():
    """MODEL.CHANNELS_LAST on Detectron2's front-end: channels-last weights (kept by
    build_model's .to(device)), the same losses up to float rounding, checkpoints
    interchangeable, the same detections."""
    inputs = random_inputs(num_images=2, num_gt=(4, 2))
    models, losses = {}, {}
    for channels_last in (False, True):
        model = models[channels_last] = _build(["MODEL.CHANNELS_LAST", channels_last])
        weights = [p for p in model.parameters() if p.dim() == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights) == channels_last
        model.train()
        with EventStorage():
            losses[channels_last] = model(inputs)
    for name in losses[False]:
        torch.testing.assert_close(losses[True][name], losses[False][name], rtol=1e-5, atol=1e-6)
    default, fast = models[False], models[True]
    scramble_head(default)
    fast.load_state_dict(default.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast.parameters() if p.dim() == 4)
    default.eval(), fast.eval()
    with torch.no_grad():
        for a, b in zip(default(inputs), fast(inputs)):
            a, b = a["instances"], b["instances"]
            assert len(a) == len(b) > 0 and torch.equal(a.pred_classes, b.pred_classes)
            torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-5)
