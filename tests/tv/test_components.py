"""Anchors, input transform, backbones and weight loading of the torchvision front-end."""
import logging

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from iou_aware_retinanet.tv import (
    AnchorGenerator,
    DetectionTransform,
    TinyResNet,
    build_backbone,
    build_model,
    load_weights,
    save_checkpoint,
)

from .helpers import RGB_MEAN, RGB_STD, random_inputs, scramble_head, tiny_cfg


# --------------------------------------------------------------------------- anchors


def _image_list(h, w, n=2):
    return ImageList(torch.zeros(n, 3, h, w), [(h, w)] * n)


def test_anchors_match_torchvision_where_it_is_right():
    """Whole-pixel cell anchors, image sides divisible by every stride: torchvision's
    rounding and stride estimate are exact, so both generators agree."""
    sizes = ((32,), (64,), (128,))
    ratios = ((0.25, 1.0, 4.0),) * 3  # half-widths 4x / 1x / 0.25x of 16: whole pixels
    strides = (8, 16, 32)
    features = [torch.zeros(2, 4, 256 // s, 320 // s) for s in strides]
    ours = AnchorGenerator(sizes, ratios, strides)(_image_list(256, 320), features)
    theirs = TVAnchorGenerator(sizes, ratios)(_image_list(256, 320), features)
    assert len(ours) == 2
    torch.testing.assert_close(ours[0], theirs[0])
    assert ours[0].shape == (sum(f.shape[-2] * f.shape[-1] for f in features) * 3, 4)


def test_anchors_follow_detectron2():
    """No rounding; the backbone's strides even where torchvision would estimate
    them wrongly (a 288-pixel side: P6 has 5 cells, stride 64, not 288 // 5 = 57); OFFSET."""
    size = 50.79683366298238
    gen = AnchorGenerator([[size]], [[1.0]], strides=[64], offset=0.5)
    anchors = gen(_image_list(288, 288, n=1), [torch.zeros(1, 1, 5, 5)])[0]
    widths = anchors[:, 2] - anchors[:, 0]
    torch.testing.assert_close(widths, torch.full_like(widths, size))
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    expected = (torch.arange(5, dtype=torch.float32) + 0.5) * 64
    torch.testing.assert_close(centres[:5, 0], expected)  # first row, x
    torch.testing.assert_close(centres[::5, 1], expected)  # first column, y


def test_aspect_ratio_is_height_over_width():
    anchors = AnchorGenerator([[32.0]], [[2.0]], strides=[8])(_image_list(16, 16, 1), [torch.zeros(1, 1, 2, 2)])[0]
    w, h = anchors[0, 2] - anchors[0, 0], anchors[0, 3] - anchors[0, 1]
    torch.testing.assert_close(h / w, torch.tensor(2.0))
    torch.testing.assert_close(h * w, torch.tensor(32.0 * 32.0))


# --------------------------------------------------------------------------- transform


def test_bgr_normalization_is_detectron2s():
    """Detectron2's default: BGR, 0-255, mean [103.53, 116.28, 123.675], std 1."""
    mean, std = [103.530, 116.280, 123.675], [1.0, 1.0, 1.0]
    transform = DetectionTransform((32,), 64, 32, 64, mean, std, input_format="BGR")
    rgb = torch.rand(3, 8, 8)
    expected = (rgb.flip(0) * 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(transform.normalize(rgb), expected, rtol=1e-5, atol=1e-4)


def test_rgb_normalization_is_torchvisions():
    transform = DetectionTransform((32,), 64, 32, 64, RGB_MEAN, RGB_STD, input_format="RGB")
    reference = GeneralizedRCNNTransform(32, 64, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    rgb = torch.rand(3, 8, 8)
    torch.testing.assert_close(transform.normalize(rgb), reference.normalize(rgb))


def test_train_and_test_sizes():
    transform = DetectionTransform((64, 80), 1000, 48, 1000, RGB_MEAN, RGB_STD, input_format="RGB")
    image = torch.rand(3, 100, 150)
    target = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([0])}
    transform.train()
    sizes = set()
    for _ in range(20):
        batch, targets = transform([image], [target])
        sizes.add(batch.image_sizes[0][0])
        scale = batch.image_sizes[0][0] / 100
        torch.testing.assert_close(targets[0]["boxes"], target["boxes"] * scale, rtol=0.02, atol=0.5)
    assert sizes == {64, 80}  # "choice" among MIN_SIZE_TRAIN
    transform.eval()
    assert transform([image])[0].image_sizes == [(48, 72)]
    transform.min_size_test = 0  # Detectron2's "no resizing at test time"
    assert transform([image])[0].image_sizes == [(100, 150)]
    assert transform([image])[0].tensors.shape[-2:] == (128, 160)  # padded to a multiple of 32


# --------------------------------------------------------------------------- backbones


def test_tiny_backbone_features():
    backbone = build_backbone(tiny_cfg())
    out = backbone(torch.rand(2, 3, 96, 128))
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    assert backbone.out_feature_strides == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    for name, feature in out.items():
        stride = backbone.out_feature_strides[name]
        assert feature.shape == (2, 32, -(-96 // stride), -(-128 // stride))
    assert isinstance(backbone.body.layer4[0], nn.Module)
    # P6 comes from C5 (64 channels here) even though the FPN is as wide: Detectron2's rule.
    cfg = tiny_cfg(["MODEL.FPN.OUT_CHANNELS", 64])
    top = build_backbone(cfg).fpn.extra_blocks
    assert top.use_P5 is False and top.p6.in_channels == 64


def test_tiny_resnet_standalone():
    body = TinyResNet(depth=18, stem_channels=8, res2_channels=8)
    out = body(torch.rand(1, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "res2": (8, 16, 16), "res3": (16, 8, 8), "res4": (32, 4, 4), "res5": (64, 2, 2),
    }  # fmt: skip
    assert len(body.layer1) == 2 and len(body.layer4) == 2


def test_retinanet_in_features_subset():
    cfg = tiny_cfg(["MODEL.RETINANET.IN_FEATURES", ["p4", "p5", "p6"], "MODEL.ANCHOR_GENERATOR.SIZES", [[32]]])
    model = build_model(cfg)
    assert list(model.backbone.out_feature_strides.values()) == [16, 32, 64]
    assert model.anchor_generator.strides == (16, 32, 64)
    assert model.anchor_generator.num_anchors_per_location() == [3, 3, 3]
    losses = model(*random_inputs())
    assert all(torch.isfinite(v) for v in losses.values())


def _resnet_cfg(depth, *opts):
    return tiny_cfg(
        [
            "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
            "MODEL.RESNETS.DEPTH", depth,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64 if depth in (18, 34) else 256,
            "MODEL.RESNETS.STEM_OUT_CHANNELS", 64,
            *opts,
        ]
    )  # fmt: skip


def test_resnet_fpn_backbone_r18():
    backbone = build_backbone(_resnet_cfg(18))
    assert backbone.fpn.inner_blocks[-1][0].in_channels == 512
    out = backbone(torch.rand(1, 3, 64, 64))
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    assert not hasattr(backbone.body, "fc")  # the classifier is not part of the detector


def test_resnet_stride_in_1x1():
    """Detectron2 / MSRA bottlenecks stride in the 1x1 conv; torchvision's in the 3x3."""
    for stride_in_1x1, conv1, conv2 in ((True, (2, 2), (1, 1)), (False, (1, 1), (2, 2))):
        backbone = build_backbone(_resnet_cfg(50, "MODEL.RESNETS.STRIDE_IN_1X1", stride_in_1x1))
        for stage in ("layer2", "layer3", "layer4"):
            block = getattr(backbone.body, stage)[0]
            assert block.conv1.stride == conv1 and block.conv2.stride == conv2
        assert backbone.body.layer1[0].conv1.stride == (1, 1)
        assert backbone(torch.rand(1, 3, 64, 64))["p3"].shape[-2:] == (8, 8)


def test_resnext_groups():
    backbone = build_backbone(_resnet_cfg(50, "MODEL.RESNETS.NUM_GROUPS", 32, "MODEL.RESNETS.WIDTH_PER_GROUP", 4))
    conv = backbone.body.layer1[0].conv2
    assert conv.groups == 32 and conv.out_channels == 128


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at(freeze_at):
    backbone = build_backbone(tiny_cfg(["MODEL.BACKBONE.FREEZE_AT", freeze_at]))
    stages = [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    for index, names in enumerate(stages):
        frozen = index < freeze_at
        for name in names:
            module = getattr(backbone.body, name)
            assert all(p.requires_grad != frozen for p in module.parameters()), name
            if name == "conv1":
                continue
            has_bn = any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
            has_frozen_bn = any(isinstance(m, FrozenBatchNorm2d) for m in module.modules())
            assert has_frozen_bn == frozen and has_bn != frozen, name
    assert all(p.requires_grad for p in backbone.fpn.parameters())


@pytest.mark.parametrize("norm", ["FrozenBN", "GN"])
def test_backbone_norms(norm):
    cfg = tiny_cfg(["MODEL.RESNETS.NORM", norm, "MODEL.RESNETS.STEM_OUT_CHANNELS", 32,
                    "MODEL.RESNETS.RES2_OUT_CHANNELS", 32, "MODEL.FPN.NORM", "GN"])  # fmt: skip
    backbone = build_backbone(cfg)
    kind = FrozenBatchNorm2d if norm == "FrozenBN" else nn.GroupNorm
    assert isinstance(backbone.body.bn1, kind)
    assert any(isinstance(m, nn.GroupNorm) for m in backbone.fpn.modules())
    assert torch.isfinite(backbone(torch.rand(1, 3, 64, 64))["p3"]).all()


def test_head_options():
    cfg = tiny_cfg(["MODEL.RETINANET.NUM_CONVS", 3, "MODEL.RETINANET.NORM", "GN", "MODEL.RETINANET.PRIOR_PROB", 0.02])
    head = build_model(cfg).head
    for tower in (head.classification_head.conv, head.regression_head.conv):
        assert len(tower) == 3 and isinstance(tower[0][1], nn.GroupNorm)
    bias = head.classification_head.cls_logits.bias
    torch.testing.assert_close(bias.sigmoid(), torch.full_like(bias, 0.02))


# --------------------------------------------------------------------------- weights


def _eval_outputs(model):
    model.eval()
    with torch.no_grad():
        return model(random_inputs(num_images=1, seed=5)[0])[0]


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    scramble_head(model)
    path = tmp_path / "model_final.pth"
    save_checkpoint(model, str(path), iteration=7)
    torch.manual_seed(1)
    fresh = build_model(cfg)
    incompatible = load_weights(fresh, str(path))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    a, b = _eval_outputs(model), _eval_outputs(fresh)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    # A bare state dict loads too.
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    load_weights(build_model(cfg), str(tmp_path / "bare.pth"))


def test_checkpointer_is_fvcores_with_safe_reads_and_atomic_writes(tmp_path):
    from fvcore.common.checkpoint import Checkpointer as FvcoreCheckpointer

    from iou_aware_retinanet.tv.checkpoint import Checkpointer

    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(model, str(tmp_path), optimizer=optimizer)
    assert isinstance(checkpointer, FvcoreCheckpointer)
    path = checkpointer.save("model_0000003", iteration=3)
    assert path == str(tmp_path / "model_0000003.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000003.pth"]
    assert checkpointer.has_checkpoint() and checkpointer.get_checkpoint_file() == path
    on_disk = torch.load(path, weights_only=True)
    assert list(on_disk) == ["model", "optimizer", "iteration"]  # Detectron2's layout

    torch.manual_seed(1)
    fresh = build_model(tiny_cfg())
    extra = Checkpointer(fresh, str(tmp_path), optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1)).load(path)
    assert extra == {"iteration": 3}
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())

    # weights_only=True: a pickled object that is not plain data is refused, naming the file.
    torch.save({"model": {}, "hook": logging.getLogger("x")}, tmp_path / "unsafe.pth")
    with pytest.raises(Exception, match="unsafe.pth"):
        checkpointer.load(str(tmp_path / "unsafe.pth"))


def test_baseline_checkpoint_into_iou_aware_model(tmp_path, caplog):
    baseline = build_model(tiny_cfg(["MODEL.IOU_AWARE.ENABLED", False]))
    save_checkpoint(baseline, str(tmp_path / "baseline.pth"))
    model = build_model(tiny_cfg())
    with caplog.at_level(logging.WARNING):
        incompatible = load_weights(model, str(tmp_path / "baseline.pth"))
    assert sorted(incompatible.missing_keys) == ["head.iou_pred.bias", "head.iou_pred.weight"]
    assert "iou_pred" in caplog.text


def test_mismatched_shapes_are_skipped(tmp_path, caplog):
    save_checkpoint(build_model(tiny_cfg(num_classes=5)), str(tmp_path / "five.pth"))
    model = build_model(tiny_cfg(num_classes=3))
    with caplog.at_level(logging.WARNING):
        load_weights(model, str(tmp_path / "five.pth"))
    assert "cls_logits.weight" in caplog.text


def test_torchvision_imagenet_weights_load_into_the_body(tmp_path):
    classifier = resnet18()
    torch.save(classifier.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(_resnet_cfg(18, "MODEL.RESNETS.NORM", "FrozenBN"))
    incompatible = load_weights(model, str(tmp_path / "resnet18.pth"))
    assert not incompatible.unexpected_keys
    assert all(not k.startswith("backbone.body.") for k in incompatible.missing_keys)
    torch.testing.assert_close(model.backbone.body.layer3[1].conv2.weight, classifier.layer3[1].conv2.weight)
    torch.testing.assert_close(model.backbone.body.bn1.running_var, classifier.bn1.running_var)


def test_foreign_checkpoints_are_refused(tmp_path):
    model = build_model(tiny_cfg())
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(1)}}, tmp_path / "d2.pth")
    with pytest.raises(ValueError, match="Detectron2 checkpoint"):
        load_weights(model, str(tmp_path / "d2.pth"))
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no parameter"):
        load_weights(model, str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="pkl"):
        load_weights(model, str(tmp_path / "R-50.pkl"))
    with pytest.raises(FileNotFoundError):
        load_weights(model, str(tmp_path / "missing.pth"))
