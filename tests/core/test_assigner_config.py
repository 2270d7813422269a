"""Assigners built from a config by their own ``from_cfg``, the loss choice in
``LossConfig``, and the config builders naming the key of a value the core rejects."""
import pytest
import torch

from iou_aware_retinanet.config import build_assigner_from_cfg, inference_config_from_cfg, loss_config_from_cfg
from iou_aware_retinanet.core import LossConfig, Predictions, available_assigners, build_assigner
from iou_aware_retinanet.core.assigners import assigner_class, assigner_from_cfg
from iou_aware_retinanet.core.losses import (
    SOFT_TARGET_LOSSES,
    classification_loss,
    quality_focal_loss,
    soft_target_focal_loss,
)
from iou_aware_retinanet.tv import get_cfg

from .assigner_inputs import NUM_CLASSES as K
from .assigner_inputs import random_grid, random_gts

# Every option of every assigner, set away from its default, so that a key
# from_cfg forgot to read shows as a difference.
NON_DEFAULT = [
    "MODEL.ASSIGNER.MAX_IOU.ALLOW_LOW_QUALITY_MATCHES", False,
    "MODEL.RETINANET.IOU_THRESHOLDS", [0.3, 0.6],
    "MODEL.ASSIGNER.TOPK.TOPK", 4, "MODEL.ASSIGNER.TOPK.MIN_IOU", 0.1,
    "MODEL.ASSIGNER.ATSS.TOPK", 5, "MODEL.ASSIGNER.ATSS.CENTER_EPS", 0.5, "MODEL.ASSIGNER.ATSS.ENSURE_POSITIVE", True,
    "MODEL.ASSIGNER.NOISY_ANCHOR.TOPK", 12, "MODEL.ASSIGNER.NOISY_ANCHOR.ALPHA", 0.6,
    "MODEL.ASSIGNER.HAMBOX.MATCH_THRESHOLD", 0.45, "MODEL.ASSIGNER.HAMBOX.ANCHORS_PER_GT", 3,
    "MODEL.ASSIGNER.HAMBOX.REGRESSED_IOU_THRESHOLD", 0.6,
    "MODEL.ASSIGNER.TASK_ALIGNED.TOPK", 7, "MODEL.ASSIGNER.TASK_ALIGNED.ALPHA", 0.5,
    "MODEL.ASSIGNER.TASK_ALIGNED.BETA", 4.0, "MODEL.ASSIGNER.TASK_ALIGNED.CENTER_EPS", 0.2,
    "MODEL.ASSIGNER.TASK_ALIGNED.USE_IOU_PREDICTION", True,
]  # fmt: skip


def _cfg(opts=()):
    cfg = get_cfg()
    cfg.MODEL.RETINANET.NUM_CLASSES = K
    cfg.merge_from_list(list(opts))
    return cfg


def _built_as_before(cfg, name):
    """How config.py built the assigner before from_cfg: every key of the
    assigner's node as a keyword, RetinaNet's thresholds for max_iou, HAMBox's
    base by hand."""
    kwargs = {k.lower(): v for k, v in cfg.MODEL.ASSIGNER[name.upper()].items()}
    if name == "max_iou":
        kwargs.update(thresholds=cfg.MODEL.RETINANET.IOU_THRESHOLDS, labels=cfg.MODEL.RETINANET.IOU_LABELS)
    if name == "hambox":
        base_name, threshold = kwargs.pop("base_assigner"), kwargs.pop("match_threshold")
        if not base_name:
            kwargs["base"] = build_assigner("max_iou", K, thresholds=[threshold], labels=[0, 1],
                                            allow_low_quality_matches=False)
        else:
            kwargs["base"] = _built_as_before(cfg, base_name)
    return build_assigner(name, K, **kwargs)


def _options(assigner):
    return {k: _options(v) if k == "base" else v for k, v in vars(assigner).items()} | {"class": type(assigner)}


@pytest.mark.parametrize("opts", [[], NON_DEFAULT], ids=["defaults", "non_default"])
@pytest.mark.parametrize("name", available_assigners())
def test_from_cfg_builds_the_assigner_config_py_built(name, opts):
    cfg = _cfg(opts)
    cfg.MODEL.ASSIGNER.NAME = name
    built = build_assigner_from_cfg(cfg)
    assert _options(built) == _options(_built_as_before(cfg, name))
    assert _options(assigner_from_cfg(name, cfg, K)) == _options(built)


def test_non_default_options_are_read():
    """The test above would pass vacuously if NON_DEFAULT changed nothing."""
    for name in available_assigners():
        default = _options(assigner_from_cfg(name, _cfg(), K))
        assert default != _options(assigner_from_cfg(name, _cfg(NON_DEFAULT), K)), name


def test_hambox_builds_any_static_base_from_its_own_keys():
    cfg = _cfg(["MODEL.ASSIGNER.HAMBOX.BASE_ASSIGNER", "atss", "MODEL.ASSIGNER.ATSS.TOPK", 4])
    base = assigner_from_cfg("hambox", cfg, K).base
    assert _options(base) == _options(assigner_from_cfg("atss", cfg, K))
    assert base.topk == 4


@pytest.mark.parametrize("base", ["hambox", "noisy_anchor"])
def test_hambox_base_must_be_static(base):
    """A dynamic base is refused, including HAMBox itself (no endless recursion)."""
    cfg = _cfg(["MODEL.ASSIGNER.NAME", "hambox", "MODEL.ASSIGNER.HAMBOX.BASE_ASSIGNER", base])
    with pytest.raises(ValueError, match=rf"MODEL.ASSIGNER.HAMBOX: BASE_ASSIGNER='{base}': .*static"):
        build_assigner_from_cfg(cfg)


def test_hambox_calls_only_the_public_interface_of_its_base():
    """A base offering nothing but the public call gives the same assignment."""

    class PublicOnly:
        needs_predictions = False

        def __init__(self, inner):
            self.inner, self.num_classes = inner, inner.num_classes

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    anchors = random_grid(3)
    gt_boxes, gt_classes = random_gts(3, 6, anchors)
    gen = torch.Generator().manual_seed(0)
    boxes = anchors.boxes.clone()
    movers = torch.randperm(len(anchors), generator=gen)[:60]  # regress onto a GT, as HAMBox looks for
    boxes[movers] = gt_boxes[torch.arange(60) % len(gt_boxes)] + 0.5 * torch.randn(60, 4, generator=gen)
    preds = Predictions(cls_probs=torch.rand(len(anchors), K, generator=gen), boxes=boxes)
    hambox = assigner_from_cfg("hambox", _cfg(), K)
    wrapped = build_assigner("hambox", K, base=PublicOnly(hambox.base), anchors_per_gt=hambox.anchors_per_gt,
                             regressed_iou_threshold=hambox.regressed_iou_threshold)
    expected, out = hambox(anchors, gt_boxes, gt_classes, preds), wrapped(anchors, gt_boxes, gt_classes, preds)
    assert torch.equal(out.matched_gt, expected.matched_gt)
    assert torch.equal(out.cls_weights, expected.cls_weights)
    assert (expected.cls_weights != 1).any()  # compensation happened: the base's result was used


# ------------------------------------------------------------- the loss choice
@pytest.mark.parametrize("name", available_assigners())
def test_loss_config_takes_the_soft_target_loss_of_the_chosen_assigner(name):
    config = loss_config_from_cfg(_cfg(["MODEL.ASSIGNER.NAME", name]))
    assert config.soft_target_loss == assigner_class(name).soft_target_loss
    assert config.soft_target_loss in SOFT_TARGET_LOSSES


def test_task_aligned_trains_with_the_quality_focal_loss_noisy_anchor_with_the_focal_loss():
    """TOOD (GFL) and Noisy-anchor's official losses."""
    assert loss_config_from_cfg(_cfg(["MODEL.ASSIGNER.NAME", "task_aligned"])).soft_target_loss == "quality_focal"
    assert loss_config_from_cfg(_cfg(["MODEL.ASSIGNER.NAME", "noisy_anchor"])).soft_target_loss == "focal"


def test_soft_target_loss_key_overrides_the_assigner_and_its_default_is_logged(caplog):
    cfg = _cfg(["MODEL.ASSIGNER.NAME", "task_aligned", "MODEL.RETINANET.SOFT_TARGET_LOSS", "focal"])
    with caplog.at_level("INFO", logger="iou_aware_retinanet.config"):
        assert loss_config_from_cfg(cfg).soft_target_loss == "focal"
    assert not caplog.records  # chosen explicitly: nothing to say
    cfg.MODEL.RETINANET.SOFT_TARGET_LOSS = ""
    with caplog.at_level("INFO", logger="iou_aware_retinanet.config"):
        assert loss_config_from_cfg(cfg).soft_target_loss == "quality_focal"
    assert "'quality_focal', the task_aligned assigner's own" in caplog.text
    cfg.MODEL.RETINANET.SOFT_TARGET_LOSS = "bce"
    with pytest.raises(ValueError, match="^MODEL.RETINANET.SOFT_TARGET_LOSS: unknown soft-target loss 'bce'"):
        loss_config_from_cfg(cfg)


@pytest.mark.parametrize("old, new", [
    ("MODEL.LOSS_NORMALIZER", "MODEL.RETINANET.LOSS_NORMALIZER"),
    ("MODEL.ASSIGNER.TOPK.K", "MODEL.ASSIGNER.TOPK.TOPK"),
    ("MODEL.ASSIGNER.NOISY_ANCHOR.TOPN", "MODEL.ASSIGNER.NOISY_ANCHOR.TOPK"),
    ("MODEL.ASSIGNER.HAMBOX.K", "MODEL.ASSIGNER.HAMBOX.ANCHORS_PER_GT"),
    ("MODEL.ASSIGNER.HAMBOX.T", "MODEL.ASSIGNER.HAMBOX.REGRESSED_IOU_THRESHOLD"),
    ("MODEL.ASSIGNER.HAMBOX.BASE", "MODEL.ASSIGNER.HAMBOX.BASE_ASSIGNER"),
])  # fmt: skip
def test_renamed_keys_are_refused_naming_the_new_key(old, new, tmp_path):
    """From the command line and from a file: no silent alias, the error names the new key."""
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        _cfg([old, 1])
    *parents, leaf = old.split(".")
    text = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(parents)) + f"{'  ' * len(parents)}{leaf}: 1\n"
    (tmp_path / "old.yaml").write_text(text)
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        get_cfg().merge_from_file(str(tmp_path / "old.yaml"))


def test_old_loss_normalizer_values_are_refused_naming_the_new_ones():
    from iou_aware_retinanet.config import loss_normalizer_from_cfg

    for old, new in (("torchvision", "per_image"), ("detectron2", "batch_ema")):
        with pytest.raises(ValueError, match=f"'{old}' is now '{new}'"):
            loss_normalizer_from_cfg(_cfg(["MODEL.RETINANET.LOSS_NORMALIZER", old]), "torchvision")
    assert loss_normalizer_from_cfg(_cfg(), "torchvision") == "per_image"
    assert loss_normalizer_from_cfg(_cfg(), "detectron2") == "batch_ema"


@pytest.mark.parametrize("loss", SOFT_TARGET_LOSSES)
def test_classification_loss_of_soft_targets_follows_the_loss_config(loss):
    """One foreground anchor with soft target 0.7, one background anchor."""
    from iou_aware_retinanet.core import dense_detection_losses
    from iou_aware_retinanet.core.assigners import Assignment
    from iou_aware_retinanet.core.boxes import BoxCoder

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, K, generator=gen)
    anchors = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]])
    assignment = Assignment(labels=torch.tensor([1, K]), matched_gt=torch.tensor([0, -1]),
                            cls_targets=torch.tensor([0.7, 1.0]))
    config = LossConfig(soft_target_loss=loss)
    losses = dense_detection_losses(logits, torch.zeros(1, 2, 4), None, anchors, [assignment],
                                    [torch.tensor([[0.0, 0, 10, 10]])], BoxCoder(), config)
    targets = torch.tensor([[0.0, 0.7, 0.0], [0.0, 0.0, 0.0]])
    if loss == "focal":
        expected = soft_target_focal_loss(logits[0], targets, config.focal_alpha, config.focal_gamma)
    else:
        expected = quality_focal_loss(logits[0], targets, config.focal_gamma)
    torch.testing.assert_close(losses["loss_cls"], expected.sum().reshape(1))
    other = classification_loss(logits, torch.tensor([[1, K]]), torch.tensor([[0.7, 1.0]]), None,
                                config.focal_alpha, config.focal_gamma,
                                next(x for x in SOFT_TARGET_LOSSES if x != loss))
    assert not torch.allclose(losses["loss_cls"], other)  # the choice matters


def test_loss_config_rejects_an_unknown_soft_target_loss():
    with pytest.raises(ValueError, match="quality_focal"):
        LossConfig(soft_target_loss="bce")


# ------------------------------------------------------- one check, key named
@pytest.mark.parametrize("opts, key", [
    (["MODEL.ASSIGNER.NAME", "hungarian"], "MODEL.ASSIGNER.NAME"),
    (["MODEL.ASSIGNER.NAME", "topk", "MODEL.ASSIGNER.TOPK.TOPK", 0], "MODEL.ASSIGNER.TOPK"),
    (["MODEL.ASSIGNER.NAME", "atss", "MODEL.ASSIGNER.ATSS.TOPK", 0], "MODEL.ASSIGNER.ATSS"),
    (["MODEL.ASSIGNER.NAME", "max_iou", "MODEL.RETINANET.IOU_THRESHOLDS", [0.5, 0.4]], "MODEL.ASSIGNER.MAX_IOU"),
    (["MODEL.ASSIGNER.NAME", "hambox", "MODEL.ASSIGNER.HAMBOX.BASE_ASSIGNER", "nope"],
     "MODEL.ASSIGNER.HAMBOX: BASE_ASSIGNER='nope'"),
])  # fmt: skip
def test_assigner_errors_name_the_key_and_carry_the_core_message(opts, key):
    cfg = _cfg(opts)
    with pytest.raises(ValueError) as info:
        build_assigner_from_cfg(cfg)
    message = str(info.value)
    assert message.startswith(key + ":")
    # The core's own message follows: the check stands once, in the core.
    name = cfg.MODEL.ASSIGNER.NAME
    with pytest.raises(ValueError) as core:
        assigner_from_cfg(name, cfg, K)
    assert message.endswith(str(core.value))


@pytest.mark.parametrize("build, key, value, core", [
    (loss_config_from_cfg, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "l2", lambda v: LossConfig(box_loss_type=v)),
    (inference_config_from_cfg, "MODEL.IOU_AWARE.ALPHA", 1.5, None),
    (inference_config_from_cfg, "MODEL.IOU_AWARE.THRESHOLD_ON", "both", None),
])  # fmt: skip
def test_loss_and_inference_errors_name_the_key(build, key, value, core):
    from iou_aware_retinanet.core import InferenceConfig

    cfg = _cfg([key, value])
    with pytest.raises(ValueError) as info:
        build(cfg)
    field = {"MODEL.IOU_AWARE.ALPHA": "alpha", "MODEL.IOU_AWARE.THRESHOLD_ON": "threshold_on"}.get(key)
    core = core or (lambda v: InferenceConfig(**{field: v}))
    with pytest.raises(ValueError) as expected:
        core(value)
    assert str(info.value) == f"{key}: {expected.value}"


def test_builders_give_the_core_objects_of_the_config():
    cfg = _cfg(["MODEL.IOU_AWARE.ALPHA", 0.3, "MODEL.IOU_AWARE.THRESHOLD_ON", "fused",
                "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "giou", "MODEL.IOU_AWARE.LOSS_WEIGHT", 2.0])
    loss = loss_config_from_cfg(cfg)
    assert (loss.box_loss_type, loss.iou_loss_weight, loss.focal_alpha) == (
        "giou", 2.0, cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA)
    inference = inference_config_from_cfg(cfg, clip_to_image=True)
    assert (inference.alpha, inference.threshold_on, inference.clip_to_image) == (0.3, "fused", True)
    assert inference.max_detections == cfg.TEST.DETECTIONS_PER_IMAGE
    cfg.MODEL.IOU_AWARE.ALPHA = "None"  # from the command line
    assert inference_config_from_cfg(cfg).alpha is None


def test_inference_defaults_in_code_equal_the_config_defaults():
    """A model built in code (``InferenceConfig()``) detects as one built from a
    default config: every inference option has one default."""
    from iou_aware_retinanet.core import InferenceConfig

    assert InferenceConfig() == inference_config_from_cfg(get_cfg())
    assert InferenceConfig(clip_to_image=True) == inference_config_from_cfg(get_cfg(), clip_to_image=True)


def test_assigners_live_in_fvcores_registry_and_a_new_one_is_buildable_by_name():
    from fvcore.common.registry import Registry

    from iou_aware_retinanet.core.assigners import ASSIGNER_REGISTRY, MaxIoUAssigner, register_assigner

    assert isinstance(ASSIGNER_REGISTRY, Registry)
    assert ASSIGNER_REGISTRY.get("max_iou") is MaxIoUAssigner
    assert available_assigners() == sorted(name for name, _ in ASSIGNER_REGISTRY)
    with pytest.raises(ValueError, match="'max_iou' is already registered"):
        register_assigner("max_iou")(MaxIoUAssigner)

    @register_assigner("everything_background_for_test")
    class EverythingBackground(MaxIoUAssigner):
        pass

    try:
        cfg = _cfg(["MODEL.ASSIGNER.NAME", "everything_background_for_test"])
        assert type(build_assigner_from_cfg(cfg)) is EverythingBackground
        with pytest.raises(ValueError, match="unknown label assigner 'nope'; valid choices: .*everything_background"):
            build_assigner("nope", K)
    finally:
        ASSIGNER_REGISTRY._obj_map.pop("everything_background_for_test")
