"""Both front-ends' models on the test device: a training step and inference on a batch
of images of different sizes (one without GT) for every assigner, the IoU branch on and
off, THRESHOLD_ON cls and fused, NaN head outputs, and autocast (anchors, boxes and
losses in float32, scores in the type autocast gives them)."""
import pytest
import torch

from iou_aware_retinanet.tv import build_model

from ..tv.helpers import scramble_head, tiny_cfg
from .helpers import ASSIGNERS, NUM_CLASSES, amp_dtype, assert_on, fused_score_dtype

SIZES = [(96, 128), (120, 90), (64, 110)]  # resized to different sizes: one padded batch


def tv_model(device, opts=()):
    torch.manual_seed(0)
    cfg = tiny_cfg(["MODEL.DEVICE", str(device)] + list(opts), num_classes=NUM_CLASSES)
    return build_model(cfg)


def tv_batch(device, seed=0, num_gt=(3, 0, 5)):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for (h, w), n in zip(SIZES, num_gt):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = 12 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        images.append(torch.rand(3, h, w, generator=g).to(device))
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device)})  # fmt: skip
    return images, targets


def _train_step(model, images, targets, amp=False):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with torch.autocast(images[0].device.type, dtype=amp_dtype(images[0].device), enabled=amp):
        losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    return losses


CASES = [(name, True) for name in ASSIGNERS] + [("max_iou", False)]


@pytest.mark.parametrize("name,iou_branch", CASES)
def test_tv_training_step_on_device(device, name, iou_branch):
    model = tv_model(device, ["MODEL.ASSIGNER.NAME", name, "MODEL.IOU_AWARE.ENABLED", iou_branch])
    images, targets = tv_batch(device)
    losses = _train_step(model, images, targets)
    assert_on(device, losses)
    assert ("loss_iou" in losses) == iou_branch
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    for name_, p in model.named_parameters():
        assert p.device.type == device.type and bool(torch.isfinite(p).all()), name_


@pytest.mark.parametrize("threshold_on", ["cls", "fused"])
@pytest.mark.parametrize("iou_branch", [True, False])
def test_tv_inference_on_device(device, threshold_on, iou_branch):
    """Detections on the device, in each input image's own coordinates, and the CPU's."""
    opts = ["MODEL.IOU_AWARE.ENABLED", iou_branch, "MODEL.IOU_AWARE.THRESHOLD_ON", threshold_on,
            "MODEL.RETINANET.SCORE_THRESH_TEST", 0.2]  # fmt: skip
    model = tv_model(device, opts).eval()
    scramble_head(model)
    images, _ = tv_batch(device)
    with torch.no_grad():
        outputs = model(images)
    reference = tv_model("cpu", opts).eval()
    reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    with torch.no_grad():
        expected = reference([im.cpu() for im in images])
    for out, exp, (h, w) in zip(outputs, expected, SIZES):
        assert_on(device, out)
        assert len(out["boxes"]) > 0 and out["boxes"].dtype == torch.float32
        assert float(out["boxes"][:, 2].max()) <= w + 1e-3 and float(out["boxes"][:, 3].max()) <= h + 1e-3
        assert ("pred_ious" in out) == iou_branch
        assert len(out["boxes"]) == len(exp["boxes"])
        torch.testing.assert_close(out["boxes"].cpu(), exp["boxes"], rtol=0, atol=2e-2)
        torch.testing.assert_close(out["scores"].cpu(), exp["scores"], rtol=1e-3, atol=1e-4)


def test_tv_inference_with_nan_head_outputs(device):
    """A NaN IoU branch and inf box deltas for some anchors: those pairs are dropped,
    the rest detected, nothing raises."""
    model = tv_model(device, ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.2]).eval()
    scramble_head(model)
    with torch.no_grad():
        model.head.iou_pred.bias[0] = float("nan")
        model.head.regression_head.bbox_reg.bias[2] = float("inf")
    images, _ = tv_batch(device)
    with torch.no_grad():
        outputs = model(images)
    assert sum(len(o["boxes"]) for o in outputs) > 0
    for out in outputs:
        assert_on(device, out)
        for key in ("boxes", "scores", "pred_ious"):
            assert bool(torch.isfinite(out[key]).all()), key


def test_tv_training_step_under_autocast(device):
    """Anchors float32 and equal to those of float32 features (not in the features'
    autocast type), losses float32 and finite."""
    model = tv_model(device, ["MODEL.ASSIGNER.NAME", "atss"])
    images, targets = tv_batch(device, seed=1)
    seen = {}
    generate = model.anchor_generator.forward

    def spy(image_list, feature_maps):
        seen["image_list"], seen["features"] = image_list, feature_maps
        seen["anchors"] = generate(image_list, feature_maps)
        return seen["anchors"]

    model.anchor_generator.forward = spy
    losses = _train_step(model, images, targets, amp=True)
    assert seen["features"][0].dtype == amp_dtype(device)
    float32_features = [torch.zeros(f.shape, device=device) for f in seen["features"]]
    expected = generate(seen["image_list"], float32_features)
    for anchors, exp in zip(seen["anchors"], expected):
        assert anchors.dtype == torch.float32 and torch.equal(anchors, exp)
    assert_on(device, losses)
    for key, value in losses.items():
        assert value.dtype == torch.float32 and bool(torch.isfinite(value)), key


@pytest.mark.parametrize("iou_branch", [True, False])
def test_tv_inference_under_autocast(device, iou_branch):
    model = tv_model(device, ["MODEL.IOU_AWARE.ENABLED", iou_branch, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.2]).eval()
    scramble_head(model)
    images, _ = tv_batch(device, seed=2)
    dtype = amp_dtype(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        outputs = model(images)
    assert sum(len(o["boxes"]) for o in outputs) > 0
    alpha = model.inference_config.alpha
    for out in outputs:
        assert_on(device, out)
        assert out["boxes"].dtype == torch.float32
        assert out["scores"].dtype == (fused_score_dtype(device, alpha) if iou_branch else dtype)


def test_tv_losses_of_autocast_outputs_are_those_of_float32(device):
    """The head's outputs in the autocast type give the losses of their float32 copies,
    exactly: the normalizer too (positives counted in bfloat16 stop being exact at 256,
    in float16 at 2,048)."""
    model = tv_model(device)
    images, targets = tv_batch(device, seed=4, num_gt=(80, 0, 60))  # 309 positives in the first image
    seen = {}
    # The method the training forward pass hands its head outputs to.
    hook = "compute_loss_and_metrics" if hasattr(model, "compute_loss_and_metrics") else "compute_loss"
    real = getattr(model, hook)
    compute_loss = model.compute_loss

    def spy(targets_, head_outputs, anchors, *args, **kwargs):
        seen.update(targets=targets_, head_outputs=head_outputs, anchors=anchors, args=args, kwargs=kwargs)
        return real(targets_, head_outputs, anchors, *args, **kwargs)

    setattr(model, hook, spy)
    _train_step(model, images, targets, amp=True)
    low = {k: v.detach() for k, v in seen["head_outputs"].items()}
    assert low["cls_logits"].dtype == amp_dtype(device)
    model.train()
    with torch.no_grad():
        losses = compute_loss(seen["targets"], low, seen["anchors"], *seen["args"], **seen["kwargs"])
        positives = model.assigner(*_first_image_assignment_inputs(model, seen)).num_foreground
        expected = compute_loss(seen["targets"], {k: v.float() for k, v in low.items()}, seen["anchors"],
                                *seen["args"], **seen["kwargs"])  # fmt: skip
    assert positives > 256, "the test needs more positives than bfloat16 counts exactly"
    for key, value in expected.items():  # 309 / 308 would be 3e-3 off
        assert losses[key].dtype == torch.float32, key
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _first_image_assignment_inputs(model, seen):
    from iou_aware_retinanet.core import AnchorSet

    anchors = seen["anchors"][0]
    per_level = seen["args"][0] if seen["args"] else seen["kwargs"]["num_anchors_per_level"]
    anchor_set = AnchorSet(anchors, tuple(per_level), model.anchor_generator.num_anchors_per_location()[0])
    return anchor_set, seen["targets"][0]["boxes"], seen["targets"][0]["labels"]
