"""Config of the torchvision front-end: a subset of Detectron2's keys, plus the project's.

``get_cfg()`` returns an fvcore ``CfgNode`` holding the Detectron2 config keys
this front-end honours, with Detectron2's names and default values
(``detectron2/config/defaults.py``), then the project's keys
(:func:`iou_aware_retinanet.config.add_iou_aware_retinanet_config`). The same
YAML experiment file therefore means the same thing on both front-ends:

* a key that is not in the subset is an error when the file is merged
  (``KeyError: Non-existent config key``), never silently ignored;
* a key in the subset set to a value this front-end cannot honour (a ResNet
  norm other than FrozenBN / BN / GN, a Detectron2 ``.pkl`` in
  ``MODEL.WEIGHTS``, ...) is a ``ValueError`` naming the key and what is
  supported, raised once, by whoever reads the key: :func:`check_cfg` for
  the run's keys (VERSION, META_ARCHITECTURE, WEIGHTS, INPUT, SOLVER), the
  builders of :func:`~.model.build_model` for the model's.

Because the defaults are Detectron2's, a bare ``get_cfg()`` does not describe
a buildable RetinaNet (``MODEL.META_ARCHITECTURE`` is ``"GeneralizedRCNN"``,
``MODEL.FPN.IN_FEATURES`` is empty, ...): start from a YAML file such as
``configs/Base-IoUAwareRetinaNet.yaml``, exactly as with Detectron2.

YAML files are read with ``yaml.safe_load`` (fvcore's default
``allow_unsafe=False``): Python tags such as ``!!python/object`` are rejected.
``_BASE_`` inheritance works as in Detectron2.

Keys honoured, beyond the project's own (``MODEL.IOU_AWARE``, ``MODEL.ASSIGNER``):

========================================  ===================================================
``VERSION``                               2 only
``MODEL.META_ARCHITECTURE``               ``"IoUAwareRetinaNet"`` only
``MODEL.DEVICE``                          any ``torch.device`` string
``MODEL.WEIGHTS``                         "" (from scratch), a checkpoint of this front-end,
                                          or torchvision ImageNet ResNet weights (.pth);
                                          not Detectron2 .pkl files
``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``      in ``INPUT.FORMAT`` channel order, 0-255 scale
``MODEL.BACKBONE.NAME``                   see :data:`~.backbone.BACKBONES`
``MODEL.BACKBONE.FREEZE_AT``              0..5, Detectron2's meaning
``MODEL.RESNETS.*``                       DEPTH, OUT_FEATURES, NORM, NUM_GROUPS,
                                          WIDTH_PER_GROUP, STRIDE_IN_1X1, RES5_DILATION (1),
                                          RES2_OUT_CHANNELS, STEM_OUT_CHANNELS,
                                          DEFORM_* (off)
``MODEL.FPN.*``                           IN_FEATURES, OUT_CHANNELS, NORM, FUSE_TYPE ("sum")
``MODEL.ANCHOR_GENERATOR.*``              NAME (DefaultAnchorGenerator), SIZES,
                                          ASPECT_RATIOS, OFFSET
``MODEL.RETINANET.*``                     all of Detectron2's (NORM: "" or "GN")
``INPUT.*``                               MIN_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING ("choice"),
                                          MAX_SIZE_TRAIN, MIN_SIZE_TEST, MAX_SIZE_TEST,
                                          RANDOM_FLIP ("none", "horizontal"), FORMAT
                                          ("BGR", "RGB")
``DATASETS.*``                            TRAIN, TEST
``DATALOADER.*``                          NUM_WORKERS, FILTER_EMPTY_ANNOTATIONS,
                                          CACHE_IMAGES (the project's)
``SOLVER.*``                              the optimizer, schedule and checkpoint keys below;
                                          AMP.ENABLED: mixed precision (:mod:`.amp`)
``TEST.*``                                DETECTIONS_PER_IMAGE, EVAL_PERIOD
``OUTPUT_DIR``, ``SEED``,                 as in Detectron2
``CUDNN_BENCHMARK``
========================================  ===================================================

The DATASETS / DATALOADER / SOLVER / TEST.EVAL_PERIOD / OUTPUT_DIR / SEED keys
are read by the train / evaluate entry point, not by the model.
"""
from typing import List

from fvcore.common.config import CfgNode as CN

from ..config import add_iou_aware_retinanet_config
from ..config_files import check_finite, check_solver
from .amp import autocast_dtype

__all__ = ["get_cfg", "check_cfg", "META_ARCHITECTURE", "CfgNode"]

CfgNode = CN

META_ARCHITECTURE = "IoUAwareRetinaNet"
INPUT_FORMATS = ("BGR", "RGB")
MIN_SIZE_TRAIN_SAMPLINGS = ("choice",)
RANDOM_FLIPS = ("none", "horizontal")
LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR")
WARMUP_METHODS = ("linear", "constant")
CLIP_TYPES = ("value", "norm")


def _detectron2_subset() -> CN:
    """Detectron2's default values of the keys this front-end honours."""
    _C = CN()
    _C.VERSION = 2

    _C.MODEL = CN()
    _C.MODEL.DEVICE = "cuda"
    _C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    _C.MODEL.WEIGHTS = ""
    _C.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
    _C.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]

    _C.INPUT = CN()
    _C.INPUT.MIN_SIZE_TRAIN = (800,)
    _C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    _C.INPUT.MAX_SIZE_TRAIN = 1333
    _C.INPUT.MIN_SIZE_TEST = 800
    _C.INPUT.MAX_SIZE_TEST = 1333
    _C.INPUT.RANDOM_FLIP = "horizontal"
    _C.INPUT.FORMAT = "BGR"

    _C.DATASETS = CN()
    _C.DATASETS.TRAIN = ()
    _C.DATASETS.TEST = ()

    _C.DATALOADER = CN()
    _C.DATALOADER.NUM_WORKERS = 4
    _C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

    _C.MODEL.BACKBONE = CN()
    _C.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    _C.MODEL.BACKBONE.FREEZE_AT = 2

    _C.MODEL.FPN = CN()
    _C.MODEL.FPN.IN_FEATURES = []
    _C.MODEL.FPN.OUT_CHANNELS = 256
    _C.MODEL.FPN.NORM = ""
    _C.MODEL.FPN.FUSE_TYPE = "sum"

    _C.MODEL.ANCHOR_GENERATOR = CN()
    _C.MODEL.ANCHOR_GENERATOR.NAME = "DefaultAnchorGenerator"
    _C.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]]
    _C.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    _C.MODEL.ANCHOR_GENERATOR.OFFSET = 0.0

    _C.MODEL.RETINANET = CN()
    _C.MODEL.RETINANET.NUM_CLASSES = 80
    _C.MODEL.RETINANET.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    _C.MODEL.RETINANET.NUM_CONVS = 4
    _C.MODEL.RETINANET.IOU_THRESHOLDS = [0.4, 0.5]
    _C.MODEL.RETINANET.IOU_LABELS = [0, -1, 1]
    _C.MODEL.RETINANET.PRIOR_PROB = 0.01
    _C.MODEL.RETINANET.SCORE_THRESH_TEST = 0.05
    _C.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.RETINANET.NMS_THRESH_TEST = 0.5
    _C.MODEL.RETINANET.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    _C.MODEL.RETINANET.FOCAL_LOSS_GAMMA = 2.0
    _C.MODEL.RETINANET.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.RETINANET.SMOOTH_L1_LOSS_BETA = 0.1
    _C.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "smooth_l1"
    _C.MODEL.RETINANET.NORM = ""

    _C.MODEL.RESNETS = CN()
    _C.MODEL.RESNETS.DEPTH = 50
    _C.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    _C.MODEL.RESNETS.NUM_GROUPS = 1
    _C.MODEL.RESNETS.NORM = "FrozenBN"
    _C.MODEL.RESNETS.WIDTH_PER_GROUP = 64
    _C.MODEL.RESNETS.STRIDE_IN_1X1 = True
    _C.MODEL.RESNETS.RES5_DILATION = 1
    _C.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    _C.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    _C.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, False, False]
    _C.MODEL.RESNETS.DEFORM_MODULATED = False
    _C.MODEL.RESNETS.DEFORM_NUM_GROUPS = 1

    _C.SOLVER = CN()
    _C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    _C.SOLVER.MAX_ITER = 40000
    _C.SOLVER.BASE_LR = 0.001
    _C.SOLVER.BASE_LR_END = 0.0
    _C.SOLVER.MOMENTUM = 0.9
    _C.SOLVER.NESTEROV = False
    _C.SOLVER.WEIGHT_DECAY = 0.0001
    _C.SOLVER.WEIGHT_DECAY_NORM = 0.0
    _C.SOLVER.GAMMA = 0.1
    _C.SOLVER.STEPS = (30000,)
    _C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
    _C.SOLVER.WARMUP_ITERS = 1000
    _C.SOLVER.WARMUP_METHOD = "linear"
    _C.SOLVER.CHECKPOINT_PERIOD = 5000
    _C.SOLVER.IMS_PER_BATCH = 16
    _C.SOLVER.BIAS_LR_FACTOR = 1.0
    _C.SOLVER.WEIGHT_DECAY_BIAS = None
    _C.SOLVER.CLIP_GRADIENTS = CN({"ENABLED": False})
    _C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    _C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    _C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    # Mixed precision (see .amp): autocast, plus a GradScaler on CUDA.
    _C.SOLVER.AMP = CN({"ENABLED": False})

    _C.TEST = CN()
    _C.TEST.EVAL_PERIOD = 0
    _C.TEST.DETECTIONS_PER_IMAGE = 100

    _C.OUTPUT_DIR = "./output"
    _C.SEED = -1
    _C.CUDNN_BENCHMARK = False
    return _C


def get_cfg() -> CN:
    """A fresh config: Detectron2's defaults for the honoured keys, plus the project's keys."""
    cfg = _detectron2_subset()
    add_iou_aware_retinanet_config(cfg)
    return cfg


# --------------------------------------------------------------------------- checks


def _choice(cfg_value, key: str, choices) -> None:
    if cfg_value not in choices:
        raise ValueError(
            f"{key}={cfg_value!r} is not supported by the torchvision front-end; "
            f"supported: {', '.join(repr(c) for c in choices)}"
        )


def _positive_ints(values, key: str) -> List[int]:
    values = [values] if isinstance(values, int) else list(values)
    if not values or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in values):
        raise ValueError(f"{key} must be positive integers, got {values!r}")
    return values


def check_weights_path(path: str, key: str = "MODEL.WEIGHTS") -> None:
    """Reject weight files this front-end cannot read, before any work starts."""
    if not path:
        return
    lowered = path.lower()
    if lowered.startswith(("detectron2://", "catalog://")) or lowered.endswith(".pkl"):
        raise ValueError(
            f"{key}={path!r}: Detectron2 .pkl / model-zoo checkpoints (Caffe2 / MSRA layouts) "
            "cannot be loaded by the torchvision front-end. Supported: '' (train from scratch), "
            "a checkpoint written by this front-end (.pth), or torchvision ImageNet ResNet "
            "weights (.pth), as a local path or an http(s) URL."
        )


def _check_input(cfg) -> None:
    _choice(cfg.INPUT.FORMAT, "INPUT.FORMAT", INPUT_FORMATS)
    _choice(cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING, "INPUT.MIN_SIZE_TRAIN_SAMPLING", MIN_SIZE_TRAIN_SAMPLINGS)
    _choice(cfg.INPUT.RANDOM_FLIP, "INPUT.RANDOM_FLIP", RANDOM_FLIPS)
    _positive_ints(cfg.INPUT.MIN_SIZE_TRAIN, "INPUT.MIN_SIZE_TRAIN")
    _positive_ints(cfg.INPUT.MAX_SIZE_TRAIN, "INPUT.MAX_SIZE_TRAIN")
    _positive_ints(cfg.INPUT.MAX_SIZE_TEST, "INPUT.MAX_SIZE_TEST")
    if cfg.INPUT.MIN_SIZE_TEST != 0:  # 0: no resizing at test time, as in Detectron2
        _positive_ints(cfg.INPUT.MIN_SIZE_TEST, "INPUT.MIN_SIZE_TEST")
    for key in ("PIXEL_MEAN", "PIXEL_STD"):
        values = cfg.MODEL[key]
        if len(values) != 3:
            raise ValueError(f"MODEL.{key} needs 3 values (INPUT.FORMAT {cfg.INPUT.FORMAT}), got {list(values)}")
    if any(not s > 0 for s in cfg.MODEL.PIXEL_STD):
        raise ValueError(f"MODEL.PIXEL_STD must be positive, got {list(cfg.MODEL.PIXEL_STD)}")


def _check_solver(cfg) -> None:
    """The SOLVER keys (and TEST.EVAL_PERIOD) the training engine reads; each error names its key."""
    solver = cfg.SOLVER
    _choice(solver.LR_SCHEDULER_NAME, "SOLVER.LR_SCHEDULER_NAME", LR_SCHEDULERS)
    _choice(solver.WARMUP_METHOD, "SOLVER.WARMUP_METHOD", WARMUP_METHODS)
    _choice(solver.CLIP_GRADIENTS.CLIP_TYPE, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", CLIP_TYPES)
    check_solver(cfg)  # counts, rates, steps, TEST.EVAL_PERIOD: the checks both front-ends share
    if solver.AMP.ENABLED:
        autocast_dtype(cfg.MODEL.DEVICE)  # a ValueError naming SOLVER.AMP.ENABLED on devices without autocast


def check_cfg(cfg) -> None:
    """Raise ValueError for a value of the run's keys this front-end cannot honour.

    The keys the entry points and the input pipeline read: VERSION,
    MODEL.META_ARCHITECTURE, MODEL.WEIGHTS, INPUT, SOLVER. The model's keys are
    validated by the builders that read them, once, when
    :func:`~.model.build_model` builds (``train`` builds the model before it
    reads any data). Unknown keys never reach here: merging a file with one
    raises KeyError.
    """
    if cfg.VERSION != 2:
        raise ValueError(f"VERSION={cfg.VERSION!r}: only version 2 configs are supported")
    _choice(cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE", (META_ARCHITECTURE,))
    check_weights_path(cfg.MODEL.WEIGHTS)
    check_finite(cfg)  # NaN / inf anywhere (a config built in code skips the loader's check)
    _check_input(cfg)
    _check_solver(cfg)
