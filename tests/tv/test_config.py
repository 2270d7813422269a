"""The torchvision front-end's config: Detectron2's names and defaults, YAML
loading, and an error for everything it cannot honour."""
import glob
import importlib.util
import os

import pytest
import yaml

from iou_aware_retinanet.core import available_assigners
from iou_aware_retinanet.tv import build_model, check_cfg, get_cfg

from .helpers import CONFIGS, tiny_cfg

CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))


def _flatten(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(node, key):
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is None, reason="Detectron2 is not installed")
def test_keys_and_defaults_are_detectron2s():
    from detectron2.config import get_cfg as d2_get_cfg

    from iou_aware_retinanet import add_iou_aware_retinanet_config

    reference = d2_get_cfg()
    add_iou_aware_retinanet_config(reference)
    for key, value in _flatten(get_cfg()):
        expected = _get(reference, key)
        assert value == expected and type(value) is type(expected), key


def test_detectron2_defaults_spot_check():
    """A few defaults that differ between Detectron2 and torchvision / the paper."""
    cfg = get_cfg()
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"  # a YAML must choose IoUAwareRetinaNet
    assert cfg.MODEL.PIXEL_MEAN == [103.530, 116.280, 123.675] and cfg.INPUT.FORMAT == "BGR"
    assert cfg.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA == 0.1
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.MODEL.RESNETS.NORM == "FrozenBN"
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    # The project's keys are there too.
    assert cfg.MODEL.IOU_AWARE.ENABLED and cfg.MODEL.ASSIGNER.NAME == "max_iou"


def test_shipped_configs_found():
    assert len(CONFIG_FILES) >= 10


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_shipped_configs_load_and_check(path):
    """Every shipped experiment file is valid here too, except for Detectron2 .pkl weights."""
    cfg = get_cfg()
    cfg.merge_from_file(path)
    if cfg.MODEL.WEIGHTS.endswith(".pkl"):
        with pytest.raises(ValueError, match="MODEL.WEIGHTS"):
            check_cfg(cfg)
        cfg.MODEL.WEIGHTS = ""
    check_cfg(cfg)  # the run's keys
    cfg.MODEL.DEVICE = "cpu"
    build_model(cfg)  # the model's keys, validated by their builders


def test_base_round_trip(tmp_path):
    base = tmp_path / "Base.yaml"
    base.write_text(
        "MODEL:\n"
        "  META_ARCHITECTURE: IoUAwareRetinaNet\n"
        "  RETINANET:\n"
        "    NUM_CLASSES: 4\n"
        "    SMOOTH_L1_LOSS_BETA: 0.0\n"
        "  IOU_AWARE:\n"
        "    ALPHA: 0.4\n"
        "INPUT:\n"
        "  MIN_SIZE_TRAIN: (224, 256)\n"
        "SOLVER:\n"
        "  STEPS: (100, 200)\n"
    )
    sub = tmp_path / "sub" / "experiment.yaml"
    sub.parent.mkdir()
    sub.write_text(
        '_BASE_: "../Base.yaml"\n'
        "MODEL:\n"
        "  IOU_AWARE:\n"
        "    ALPHA: null\n"
        "  ASSIGNER:\n"
        "    NAME: atss\n"
        "    ATSS:\n"
        "      TOPK: 7\n"
        "DATASETS:\n"
        "  TRAIN: ('shapes_train',)\n"
    )
    cfg = get_cfg()
    cfg.merge_from_file(str(sub))
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 4  # from the base
    assert cfg.MODEL.IOU_AWARE.ALPHA is None  # overridden
    assert cfg.MODEL.ASSIGNER.ATSS.TOPK == 7
    assert cfg.INPUT.MIN_SIZE_TRAIN == (224, 256)
    assert cfg.DATASETS.TRAIN == ("shapes_train",)
    assert cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA == 0.25  # untouched default

    # dump -> load gives the same config
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(cfg.dump())
    again = get_cfg()
    again.merge_from_file(str(dumped))
    assert again == cfg


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("MODEL:\n  RPN:\n    NMS_THRESH: 0.7\n")
    with pytest.raises(KeyError, match="MODEL.RPN"):
        get_cfg().merge_from_file(str(path))


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "unsafe.yaml"
    path.write_text("OUTPUT_DIR: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        get_cfg().merge_from_file(str(path))


UNSUPPORTED = [
    # (key, value, text the message must contain)
    ("MODEL.META_ARCHITECTURE", "RetinaNet", "IoUAwareRetinaNet"),
    ("MODEL.BACKBONE.NAME", "build_resnet_backbone", "build_retinanet_resnet_fpn_backbone"),
    ("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "build_tiny_fpn_backbone"),
    ("MODEL.RESNETS.NORM", "naiveSyncBN", "SyncBN"),  # SyncBN itself is supported (tests/tv/test_distributed.py)
    ("MODEL.RESNETS.DEPTH", 50, "supported: [10, 18, 34]"),  # the tiny backbone
    ("MODEL.RESNETS.RES5_DILATION", 2, "only 1"),
    ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, False, False], "deformable"),
    ("MODEL.RESNETS.NUM_GROUPS", 32, "basic-block"),
    ("MODEL.RESNETS.OUT_FEATURES", ["res3", "res4"], "MODEL.FPN.IN_FEATURES"),
    ("MODEL.FPN.IN_FEATURES", ["res3", "res5"], "consecutive"),
    ("MODEL.FPN.NORM", "SyncBN", "'GN'"),
    ("MODEL.FPN.FUSE_TYPE", "avg", "'sum'"),
    ("MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl", ".pth"),
    ("MODEL.WEIGHTS", "/some/where/model_final_5bd44e.pkl", "Detectron2 .pkl"),
    ("MODEL.ANCHOR_GENERATOR.NAME", "RotatedAnchorGenerator", "DefaultAnchorGenerator"),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64]], "5 feature levels"),
    ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0], [1.0, 2.0], [1.0], [1.0], [1.0]], "same number"),
    ("MODEL.ANCHOR_GENERATOR.OFFSET", 1.5, "[0, 1)"),
    ("MODEL.RETINANET.NORM", "BN", "per-level"),
    ("MODEL.RETINANET.IN_FEATURES", ["p3", "p8"], "backbone's outputs"),
    ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "l2", "giou"),
    ("MODEL.IOU_AWARE.THRESHOLD_ON", "iou", "fused"),
    ("INPUT.FORMAT", "L", "'BGR', 'RGB'"),
    ("INPUT.MIN_SIZE_TRAIN_SAMPLING", "range", "'choice'"),
    ("INPUT.RANDOM_FLIP", "vertical", "'horizontal'"),
    ("SOLVER.LR_SCHEDULER_NAME", "WarmupStepWithFixedGammaLR", "WarmupCosineLR"),
    ("VERSION", 1, "version 2"),
]


@pytest.mark.parametrize("key, value, message", UNSUPPORTED, ids=[f"{k}={v}" for k, v, _ in UNSUPPORTED])
def test_unsupported_values_are_errors(key, value, message):
    cfg = tiny_cfg()
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ValueError) as info:
        check_cfg(cfg)  # the run's keys, as train / eval check them first
        build_model(cfg)  # the model's, by the builders that read them
    assert key.split(".")[-1] in str(info.value) or key in str(info.value)
    assert message in str(info.value)


def test_group_norm_width_error_names_the_key():
    cfg = tiny_cfg(["MODEL.RESNETS.NORM", "GN"])  # 8-channel stem: not divisible by 32
    with pytest.raises(ValueError, match="MODEL.RESNETS.NORM='GN'"):
        build_model(cfg)


def test_resnet_fpn_width_rules():
    cfg = tiny_cfg(["MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone", "MODEL.RESNETS.DEPTH", 18])
    with pytest.raises(ValueError, match="RES2_OUT_CHANNELS"):
        build_model(cfg)  # Detectron2's default 256 is wrong for a ResNet-18, as in Detectron2
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    with pytest.raises(ValueError, match="STEM_OUT_CHANNELS"):
        build_model(cfg)
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    build_model(cfg)


def test_unknown_assigner_lists_the_choices():
    cfg = tiny_cfg(["MODEL.ASSIGNER.NAME", "hungarian"])
    with pytest.raises(ValueError, match="MODEL.ASSIGNER.NAME") as info:
        build_model(cfg)
    for name in available_assigners():
        assert name in str(info.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available")
def test_cuda_device_without_cuda_is_a_clear_error():
    cfg = tiny_cfg(["MODEL.DEVICE", "cuda"])
    with pytest.raises(ValueError, match="MODEL.DEVICE"):
        build_model(cfg)
