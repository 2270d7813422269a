"""The project's config keys, and how both front-ends turn a config into core objects.

Detectron2 idiom: ``add_iou_aware_retinanet_config(cfg)`` adds the new keys,
with their defaults, to a config that already has Detectron2's (RetinaNet)
keys; Detectron2's global defaults are never touched. Works on Detectron2's
``CfgNode`` and on fvcore's (the torchvision front-end's config).
"""
import ast
import logging
from dataclasses import replace
from typing import Dict, List, Sequence, Tuple

from .core import InferenceConfig, LossConfig
from .core.assigners import assigner_class

logger = logging.getLogger(__name__)

# Keys of earlier releases of this project: merging a file or an override that
# still uses one fails with a KeyError naming the new key (yacs'
# ``register_renamed_key``), never silently.
RENAMED_KEYS = {
    "MODEL.LOSS_NORMALIZER": (
        "MODEL.RETINANET.LOSS_NORMALIZER",
        'values: "per_image" (was "torchvision"), "batch_ema" (was "detectron2")',
    ),
    "MODEL.ASSIGNER.TOPK.K": ("MODEL.ASSIGNER.TOPK.TOPK", None),
    "MODEL.ASSIGNER.NOISY_ANCHOR.TOPN": ("MODEL.ASSIGNER.NOISY_ANCHOR.TOPK", None),
    "MODEL.ASSIGNER.HAMBOX.K": ("MODEL.ASSIGNER.HAMBOX.ANCHORS_PER_GT", None),
    "MODEL.ASSIGNER.HAMBOX.T": ("MODEL.ASSIGNER.HAMBOX.REGRESSED_IOU_THRESHOLD", None),
    "MODEL.ASSIGNER.HAMBOX.BASE": (
        "MODEL.ASSIGNER.HAMBOX.BASE_ASSIGNER",
        '"" is HAMBox\'s single MATCH_THRESHOLD (was BASE "max_iou"); "max_iou" now means the max_iou assigner',
    ),
}


def add_iou_aware_retinanet_config(cfg) -> None:
    """Add the IoU-aware RetinaNet keys to ``cfg`` in place."""
    CN = type(cfg)

    # Your own COCO-format datasets, usable by name in DATASETS.TRAIN / TEST on
    # both front-ends: a list of [name, json_file, image_root].
    cfg.DATASETS.COCO_INSTANCES = []

    # Decode every training image once, before training, and keep it in memory
    # (uint8, H x W x 3 bytes each): the data pipeline then costs a conversion
    # and a flip per sample. For datasets that fit in RAM (the built-in shapes:
    # 98 MB); the torchvision engine refuses it above half the machine's memory.
    # The Detectron2 path reads images with Detectron2's DatasetMapper and
    # ignores it (train_net.py says so in its log).
    cfg.DATALOADER.CACHE_IMAGES = False

    # Keep the model's 4-D weights, and so every feature map, in the channels-last
    # memory format: the same maths (rounding differs at ~1e-6), and a faster
    # training step on CPUs whose convolution kernels prefer it (docs/performance.md).
    # Off by default (Detectron2's contiguous layout); checkpoints load either way.
    cfg.MODEL.CHANNELS_LAST = False

    # The IoU branch: head conv, BCE loss, fused inference score.
    cfg.MODEL.IOU_AWARE = CN()
    # False gives plain RetinaNet (no branch, no loss_iou, score = p).
    cfg.MODEL.IOU_AWARE.ENABLED = True
    cfg.MODEL.IOU_AWARE.LOSS_WEIGHT = 1.0
    # Gradient of L_IoU through the IoU target into the box branch (paper
    # Table 4; the official code leaves the target undetached).
    cfg.MODEL.IOU_AWARE.TARGET_GRADIENT = True
    # S = p^ALPHA * IoU^(1 - ALPHA); null (None) means the plain product p * IoU.
    cfg.MODEL.IOU_AWARE.ALPHA = 0.5
    # What MODEL.RETINANET.SCORE_THRESH_TEST is compared with: "cls" (p; top-k,
    # NMS and the ranking then use S) or "fused" (S itself). S > p wherever
    # IoU > p, so 0.05 on S lets more pairs into NMS for the same AP: +16 to
    # +19 % inference time over plain RetinaNet on the trained tiny model,
    # against none measurable with "cls" (ratio 0.98 to 1.00;
    # benchmarks/trained_inference.py, docs/results.md "Inference cost").
    cfg.MODEL.IOU_AWARE.THRESHOLD_ON = "cls"
    # What the per-level top-k (MODEL.RETINANET.TOPK_CANDIDATES_TEST) counts:
    # "pairs", the (anchor, class) pairs of highest S that pass the threshold
    # (Detectron2's RetinaNet); "anchors", the anchors of highest best-class S,
    # chosen before the threshold, with every pair of theirs that passes (the
    # official code's mmdetection nms_pre). "anchors" with THRESHOLD_ON "fused" is
    # the official post-processing (configs/COCO-Detection/*_official_postprocessing.yaml).
    cfg.MODEL.IOU_AWARE.CANDIDATES = "pairs"

    # How the summed losses are normalized: "per_image" divides each image's
    # losses by its positives and averages over images (torchvision's RetinaNet);
    # "batch_ema" divides the batch's sum by a moving average (momentum 0.9, start
    # 100) of the batch's positives (Detectron2's RetinaNet); "" is the front-end's
    # upstream RetinaNet ("per_image" on torchvision, "batch_ema" on Detectron2).
    # The Detectron2 front-end takes "" or "batch_ema" only.
    cfg.MODEL.RETINANET.LOSS_NORMALIZER = ""
    # Classification loss of the soft targets of Noisy-anchor / task-aligned:
    # "focal" (focal loss on soft targets) or "quality_focal" (GFL / TOOD); "" is
    # the assigner's own (its reference code's), written to the log.
    cfg.MODEL.RETINANET.SOFT_TARGET_LOSS = ""

    # Label assignment, replacing RetinaNet's Matcher.
    cfg.MODEL.ASSIGNER = CN()
    cfg.MODEL.ASSIGNER.NAME = "max_iou"
    # Max-IoU takes its thresholds from MODEL.RETINANET.IOU_THRESHOLDS / IOU_LABELS.
    cfg.MODEL.ASSIGNER.MAX_IOU = CN()
    cfg.MODEL.ASSIGNER.MAX_IOU.ALLOW_LOW_QUALITY_MATCHES = True
    # Every top-k of an assigner is spelled TOPK.
    cfg.MODEL.ASSIGNER.TOPK = CN()
    cfg.MODEL.ASSIGNER.TOPK.TOPK = 9
    cfg.MODEL.ASSIGNER.TOPK.MIN_IOU = 0.0
    cfg.MODEL.ASSIGNER.ATSS = CN()
    cfg.MODEL.ASSIGNER.ATSS.TOPK = 9
    cfg.MODEL.ASSIGNER.ATSS.CENTER_EPS = 0.01
    cfg.MODEL.ASSIGNER.ATSS.ENSURE_POSITIVE = False
    # Dynamic assigners: they look at the detached predictions of the current step.
    cfg.MODEL.ASSIGNER.NOISY_ANCHOR = CN()
    cfg.MODEL.ASSIGNER.NOISY_ANCHOR.TOPK = 30  # the paper's configs (code default: 50)
    cfg.MODEL.ASSIGNER.NOISY_ANCHOR.ALPHA = 0.75
    cfg.MODEL.ASSIGNER.HAMBOX = CN()
    # The static assignment HAMBox compensates: "" is its own, one IoU threshold
    # (MATCH_THRESHOLD) without low-quality matches (the public reimplementation);
    # or the name of a static assigner, built from its own keys.
    cfg.MODEL.ASSIGNER.HAMBOX.BASE_ASSIGNER = ""
    cfg.MODEL.ASSIGNER.HAMBOX.MATCH_THRESHOLD = 0.35
    # Anchors each GT should end with (the paper's K).
    cfg.MODEL.ASSIGNER.HAMBOX.ANCHORS_PER_GT = 5
    # IoU of a regressed box with a GT above which its anchor compensates that GT,
    # and at or above which an unmatched anchor is ignored (the paper's T).
    cfg.MODEL.ASSIGNER.HAMBOX.REGRESSED_IOU_THRESHOLD = 0.5
    cfg.MODEL.ASSIGNER.TASK_ALIGNED = CN()
    cfg.MODEL.ASSIGNER.TASK_ALIGNED.TOPK = 13
    cfg.MODEL.ASSIGNER.TASK_ALIGNED.ALPHA = 1.0
    cfg.MODEL.ASSIGNER.TASK_ALIGNED.BETA = 6.0
    cfg.MODEL.ASSIGNER.TASK_ALIGNED.CENTER_EPS = 0.01
    # Use the IoU branch's prediction as u in the alignment metric s^ALPHA * u^BETA.
    cfg.MODEL.ASSIGNER.TASK_ALIGNED.USE_IOU_PREDICTION = False

    for old, (new, note) in RENAMED_KEYS.items():
        if not cfg.key_is_renamed(old):
            cfg.register_renamed_key(old, new, note)


def build_assigner_from_cfg(cfg):
    """The label assigner named by ``MODEL.ASSIGNER.NAME``, built by its own ``from_cfg``."""
    cls = _assigner_class(cfg)
    try:
        return cls.from_cfg(cfg, cfg.MODEL.RETINANET.NUM_CLASSES)
    except ValueError as e:
        raise ValueError(f"MODEL.ASSIGNER.{cfg.MODEL.ASSIGNER.NAME.upper()}: {e}") from None


def _assigner_class(cfg):
    try:
        return assigner_class(cfg.MODEL.ASSIGNER.NAME)
    except ValueError as e:
        raise ValueError(f"MODEL.ASSIGNER.NAME: {e}") from None


def _build_naming_keys(cls, fields: Dict[str, Tuple[str, object]], **fixed):
    """``cls(**fixed, **values)`` where ``fields`` maps each field to (config key, value).

    The core dataclass checks its own values (``__post_init__``); setting them one
    at a time only tells which key a rejected value came from.
    """
    built = cls(**fixed)
    for field, (key, value) in fields.items():
        try:
            built = replace(built, **{field: value})
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return built


def soft_target_loss_from_cfg(cfg) -> str:
    """``MODEL.RETINANET.SOFT_TARGET_LOSS``, or, when empty, the chosen assigner's own loss (logged)."""
    value = cfg.MODEL.RETINANET.SOFT_TARGET_LOSS
    if value:
        return value
    value = _assigner_class(cfg).soft_target_loss
    logger.info(
        "MODEL.RETINANET.SOFT_TARGET_LOSS is empty: soft targets are trained with %r, the %s assigner's own",
        value, cfg.MODEL.ASSIGNER.NAME,
    )
    return value


def loss_config_from_cfg(cfg) -> LossConfig:
    """The losses' options."""
    r = cfg.MODEL.RETINANET
    return _build_naming_keys(LossConfig, {
        "focal_alpha": ("MODEL.RETINANET.FOCAL_LOSS_ALPHA", r.FOCAL_LOSS_ALPHA),
        "focal_gamma": ("MODEL.RETINANET.FOCAL_LOSS_GAMMA", r.FOCAL_LOSS_GAMMA),
        "box_loss_type": ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", r.BBOX_REG_LOSS_TYPE),
        "smooth_l1_beta": ("MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", r.SMOOTH_L1_LOSS_BETA),
        "iou_loss_weight": ("MODEL.IOU_AWARE.LOSS_WEIGHT", cfg.MODEL.IOU_AWARE.LOSS_WEIGHT),
        "iou_target_gradient": ("MODEL.IOU_AWARE.TARGET_GRADIENT", cfg.MODEL.IOU_AWARE.TARGET_GRADIENT),
        "soft_target_loss": ("MODEL.RETINANET.SOFT_TARGET_LOSS", soft_target_loss_from_cfg(cfg)),
    })  # fmt: skip


def inference_config_from_cfg(cfg, clip_to_image: bool = False) -> InferenceConfig:
    alpha = cfg.MODEL.IOU_AWARE.ALPHA
    if isinstance(alpha, str):  # YAML null is None; "None" from the command line is a string
        if alpha.lower() != "none":
            raise ValueError(f"MODEL.IOU_AWARE.ALPHA must be a number in [0, 1] or null, got {alpha!r}")
        alpha = None
    r = cfg.MODEL.RETINANET
    return _build_naming_keys(InferenceConfig, {
        "alpha": ("MODEL.IOU_AWARE.ALPHA", None if alpha is None else float(alpha)),
        "score_thresh": ("MODEL.RETINANET.SCORE_THRESH_TEST", r.SCORE_THRESH_TEST),
        "threshold_on": ("MODEL.IOU_AWARE.THRESHOLD_ON", cfg.MODEL.IOU_AWARE.THRESHOLD_ON),
        "candidates": ("MODEL.IOU_AWARE.CANDIDATES", cfg.MODEL.IOU_AWARE.CANDIDATES),
        "topk_candidates": ("MODEL.RETINANET.TOPK_CANDIDATES_TEST", r.TOPK_CANDIDATES_TEST),
        "nms_thresh": ("MODEL.RETINANET.NMS_THRESH_TEST", r.NMS_THRESH_TEST),
        "max_detections": ("TEST.DETECTIONS_PER_IMAGE", cfg.TEST.DETECTIONS_PER_IMAGE),
    }, clip_to_image=clip_to_image)  # fmt: skip


def ints_as_floats(cfg, opts: Sequence[str]) -> List[str]:
    """``KEY VALUE`` pairs with an integer VALUE written as a float where KEY holds a float
    (``SOLVER.BASE_LR 1``), which yacs would reject as a type mismatch."""
    out = list(opts)
    for i in range(0, len(out) - 1, 2):
        node = cfg
        try:
            for part in str(out[i]).split("."):
                node = node[part]
            value = ast.literal_eval(str(out[i + 1]))
        except (KeyError, TypeError, ValueError, SyntaxError):
            continue  # unknown keys and strings: yacs reports / handles them
        if isinstance(node, float) and isinstance(value, int) and not isinstance(value, bool):
            out[i + 1] = str(float(value))
    return out


LOSS_NORMALIZERS = ("per_image", "batch_ema")
# The normalizer of each front-end's upstream RetinaNet, what "" selects.
UPSTREAM_LOSS_NORMALIZER = {"torchvision": "per_image", "detectron2": "batch_ema"}


def loss_normalizer_from_cfg(cfg, frontend: str) -> str:
    """``MODEL.RETINANET.LOSS_NORMALIZER`` resolved for ``frontend`` ("torchvision" or "detectron2"):
    "per_image" or "batch_ema"."""
    value = cfg.MODEL.RETINANET.LOSS_NORMALIZER
    allowed = LOSS_NORMALIZERS if frontend == "torchvision" else ("batch_ema",)
    if value and value not in allowed:
        renamed = {"torchvision": "per_image", "detectron2": "batch_ema"}.get(value)
        hint = f" ({value!r} is now {renamed!r})" if renamed else ""
        raise ValueError(
            f"MODEL.RETINANET.LOSS_NORMALIZER={value!r} is not supported by the {frontend} front-end{hint}; "
            f"valid choices: {', '.join(repr(v) for v in ('', *allowed))}"
        )
    return value or UPSTREAM_LOSS_NORMALIZER[frontend]
