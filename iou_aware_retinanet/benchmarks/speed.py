"""Speed and memory of IoU-aware RetinaNet next to its baselines, measured side by side.

    python -m iou_aware_retinanet.benchmarks.speed                      # both settings
    python -m iou_aware_retinanet.benchmarks.speed --setting shapes     # or: --setting r50
    python -m iou_aware_retinanet.benchmarks.speed --quick              # shapes, 3 repeats, < 2 min
    python -m iou_aware_retinanet.benchmarks.speed --repeats 20 --threads 2 --json speed.json

With Detectron2 importable (see docs/getting_started.md) the Detectron2 rows run too.

Every comparison is a pair (A, B) timed in one process on the same inputs,
from the same weights, and reported as the ratio B / A of the medians:

1. IoU-aware vs baseline: the project's model with ``MODEL.IOU_AWARE.ENABLED``
   False (A) and True (B), same backbone, for a training step (forward,
   backward, SGD step) and for inference (eval mode, ``no_grad``, forward
   including post-processing), with the score threshold on S ("fused", the
   official code's) and on p ("cls", the default). On the torchvision
   front-end, and on Detectron2's when it is importable.
2. Post-processing of one image, ``core.postprocess_image`` (score fusion,
   per-level top-k, decoding, NMS), on the IoU-aware model's head outputs:
   plain p (A) vs the fused S = p^alpha * IoU^(1 - alpha) (B).
3. Peers, the branch off: torchvision's stock
   ``torchvision.models.detection.RetinaNet`` (A) vs the project's torchvision
   front-end (B); with Detectron2, Detectron2's ``RetinaNet`` (A) vs the
   project's ``IoUAwareRetinaNet`` meta-architecture (B).
4. Peak memory of every model in every mode: the growth of the peak resident
   set size in a fresh process per (model, mode), as
   ``iou_aware_retinanet.benchmarks.assigners`` measures it (``tracemalloc``
   cannot see torch's CPU allocations). The processes are forked from a server
   that has only imported the modules, so each starts clean without paying
   the imports again.

Settings: ``shapes`` is ``configs/Shapes/iou_aware_retinanet.yaml`` (tiny
ResNet + FPN, 256x256 images, batch 8 for training, 1 for inference);
``r50`` is ``configs/Base-IoUAwareRetinaNet.yaml`` (the COCO model: R-50-FPN,
FrozenBN, FREEZE_AT 2, 80 classes) with random weights (nothing is
downloaded), 512x512 images, batch 2 for training, 1 for inference.

Method. Timing: after one warm-up call per model, A and B alternate (A, B,
A, B, ...) and each model's median is taken, so drift on a noisy machine hits
both alike. Inputs: random images and 5 random ground-truth boxes per image,
fixed seed. Weights: one model per front-end is built, its head calibrated
(below), and its state dict copied into every model of that front-end (the
branch-off models drop ``head.iou_pred``). Training uses SGD with a tiny
learning rate: an SGD step costs the same whatever the rate, and the weights,
hence the work per step, stay put. The torchvision models take RGB input
(``INPUT.FORMAT RGB``, the same normalization in RGB order), because the stock
model cannot flip channels: the peers then compute identical numbers.

Head calibration. An untrained head outputs p = 0.01 everywhere, so nothing
passes the 0.05 score threshold, while the fused S = sqrt(0.01 * 0.5) = 0.07
lets every (anchor, class) pair through: neither is what a trained model
feeds post-processing. The output convs are rescaled so that on the inference
images about ``CANDIDATES_PER_IMAGE`` pairs have p above the threshold, box
deltas have std ``DELTA_STD`` and IoU predictions spread around
``IOU_CENTER`` (see ``calibrate_head``). Inference cost depends on these
choices; the detections per image are printed next to every inference ratio.

On a machine shared with other jobs, pin ``--threads`` (e.g. 1): intra-op
threads that compete with another job for the same cores slow every model
down many times, and unevenly so.
"""
import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import Tensor, nn

from ..config import add_iou_aware_retinanet_config
from ..core import image_predictions, postprocess_image
from ..core.inference import select_level_candidates
from ..tv import get_cfg
from ..tv import build_model as build_tv_model
from .assigners import MEMORY_METHOD_MAXRSS, MEMORY_METHOD_VMHWM, _reset_peak_rss, _rss_kib, random_gt_boxes
from .peers import build_torchvision_retinanet

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

SEED = 0
WARMUP = 1
QUICK_REPEATS = 3
POSTPROCESS_REPEAT_FACTOR = 10  # post-processing is fast: time it this many times more often
MEMORY_RUNS = 2  # calls per memory measurement (the first allocates optimizer state)
GTS_PER_IMAGE = 5
LEARNING_RATE = 1e-5
MODES = ("train", "inference")

# Head calibration (see the module docstring).
CANDIDATES_PER_IMAGE = 1000  # (anchor, class) pairs with p above MODEL.RETINANET.SCORE_THRESH_TEST
CLS_LOGIT_STD = 2.0
DELTA_STD = 0.1  # decoded boxes stay near their anchors, so NMS has overlaps to suppress
IOU_LOGIT_STD = 1.0
IOU_CENTER = 0.3


# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Setting:
    name: str
    config_file: str  # under configs/
    opts: Tuple = ()  # merge_from_list overrides, applied on both front-ends
    image_size: Tuple[int, int] = (256, 256)  # (height, width); the models do not resize it
    train_batch: int = 8
    inference_batch: int = 1
    repeats: int = 10  # default timed runs per model

    def describe(self) -> str:
        h, w = self.image_size
        return (f"configs/{self.config_file}{' + overrides' if self.opts else ''}, {h}x{w} images, "
                f"train batch {self.train_batch}, inference batch {self.inference_batch}")


SETTINGS = {
    "shapes": Setting("shapes", "Shapes/iou_aware_retinanet.yaml"),
    "r50": Setting(
        "r50",
        "Base-IoUAwareRetinaNet.yaml",
        opts=(
            "MODEL.DEVICE", "cpu",
            "MODEL.WEIGHTS", "",  # random init: nothing to download
            "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
            "MODEL.RESNETS.DEPTH", 50,
            "MODEL.RETINANET.NUM_CLASSES", 80,
        ),
        image_size=(512, 512),
        train_batch=2,
        repeats=3,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Pair:
    label: str
    frontend: str  # "tv" or "d2"
    a: str
    b: str


IOU_AWARE_PAIRS = (
    # Threshold on S (MODEL.IOU_AWARE.THRESHOLD_ON "fused", the official code's): S >= p wherever
    # IoU >= p, so it lets more pairs into NMS than the default threshold on p ("cls").
    Pair("tv: RetinaNet -> IoU-aware, threshold on S", "tv", "tv_retinanet", "tv_iou_aware"),
    Pair("d2: RetinaNet -> IoU-aware, threshold on S", "d2", "d2_retinanet", "d2_iou_aware"),
    Pair("tv: RetinaNet -> IoU-aware, threshold on p", "tv", "tv_retinanet", "tv_iou_aware_cls"),
    Pair("d2: RetinaNet -> IoU-aware, threshold on p", "d2", "d2_retinanet", "d2_iou_aware_cls"),
)
PEER_PAIRS = (
    Pair("tv: torchvision -> project", "tv", "tv_stock", "tv_retinanet"),
    Pair("d2: Detectron2 -> project", "d2", "d2_stock", "d2_retinanet"),
)
MODELS = {
    "tv_stock": "torchvision.models.detection.RetinaNet",
    "tv_retinanet": "iou_aware_retinanet.tv.build_model, MODEL.IOU_AWARE.ENABLED False",
    "tv_iou_aware": "iou_aware_retinanet.tv.build_model, MODEL.IOU_AWARE.THRESHOLD_ON fused",
    "tv_iou_aware_cls": "iou_aware_retinanet.tv.build_model, MODEL.IOU_AWARE.THRESHOLD_ON cls",
    "d2_stock": "detectron2.modeling.meta_arch.RetinaNet",
    "d2_retinanet": "IoUAwareRetinaNet (Detectron2 meta-arch), MODEL.IOU_AWARE.ENABLED False",
    "d2_iou_aware": "IoUAwareRetinaNet (Detectron2 meta-arch), MODEL.IOU_AWARE.THRESHOLD_ON fused",
    "d2_iou_aware_cls": "IoUAwareRetinaNet (Detectron2 meta-arch), MODEL.IOU_AWARE.THRESHOLD_ON cls",
}
# The model whose calibrated weights every model of its front-end starts from.
SOURCE_MODEL = {"tv": "tv_iou_aware", "d2": "d2_iou_aware"}


def detectron2_status() -> Tuple[Optional[str], Optional[str]]:
    """(Detectron2 version, None) when the Detectron2 rows can run, else (None, why not)."""
    try:
        import detectron2
        from detectron2.modeling import build_model  # noqa: F401

        from .. import d2  # noqa: F401  (registers IoUAwareRetinaNet and the tiny backbone)
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return detectron2.__version__, None


# -------------------------------------------------------------------- models


def _size_opts(setting: Setting) -> list:
    """Resize to the images' own size: no model rescales anything."""
    h, w = setting.image_size
    short, long = min(h, w), max(h, w)
    return ["INPUT.MIN_SIZE_TRAIN", (short,), "INPUT.MAX_SIZE_TRAIN", long,
            "INPUT.MIN_SIZE_TEST", short, "INPUT.MAX_SIZE_TEST", long]


def tv_config(setting: Setting, iou_aware: bool, threshold_on: str = "fused"):
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / setting.config_file))
    cfg.merge_from_list(list(setting.opts) + _size_opts(setting) + [
        "MODEL.IOU_AWARE.ENABLED", iou_aware, "MODEL.IOU_AWARE.THRESHOLD_ON", threshold_on,
    ])  # fmt: skip
    if cfg.INPUT.FORMAT == "BGR":
        # torchvision's stock RetinaNet takes RGB and cannot flip channels; the same
        # normalization in RGB order lets the peers compute identical numbers.
        cfg.INPUT.FORMAT = "RGB"
        cfg.MODEL.PIXEL_MEAN = list(cfg.MODEL.PIXEL_MEAN)[::-1]
        cfg.MODEL.PIXEL_STD = list(cfg.MODEL.PIXEL_STD)[::-1]
    return cfg


def d2_config(setting: Setting, iou_aware: bool, meta_architecture: str = "IoUAwareRetinaNet", threshold_on: str = "fused"):
    from detectron2.config import get_cfg as get_d2_cfg

    cfg = get_d2_cfg()
    add_iou_aware_retinanet_config(cfg)
    cfg.merge_from_file(str(CONFIGS / setting.config_file))
    cfg.merge_from_list(list(setting.opts) + _size_opts(setting) + [
        "MODEL.IOU_AWARE.ENABLED", iou_aware, "MODEL.META_ARCHITECTURE", meta_architecture,
        "MODEL.IOU_AWARE.THRESHOLD_ON", threshold_on,
    ])  # fmt: skip
    return cfg


@contextlib.contextmanager
def _random_init_expected():
    """Silence the backbone's warning that random weights under FrozenBN / frozen
    stages train badly (r50): speed does not care, and random init is the point."""
    logger = logging.getLogger("iou_aware_retinanet.tv.backbone")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_named_model(setting: Setting, name: str) -> nn.Module:
    """One of ``MODELS``, randomly initialised (seeded)."""
    torch.manual_seed(SEED)
    with _random_init_expected():
        if name == "tv_stock":
            return build_torchvision_retinanet(tv_config(setting, iou_aware=False))
        if name in ("tv_retinanet", "tv_iou_aware", "tv_iou_aware_cls"):
            threshold_on = "cls" if name.endswith("_cls") else "fused"
            return build_tv_model(tv_config(setting, iou_aware=name != "tv_retinanet", threshold_on=threshold_on))
    from detectron2.modeling import build_model as build_d2_model

    if name == "d2_stock":
        return build_d2_model(d2_config(setting, iou_aware=False, meta_architecture="RetinaNet"))
    if name in ("d2_retinanet", "d2_iou_aware", "d2_iou_aware_cls"):
        threshold_on = "cls" if name.endswith("_cls") else "fused"
        return build_d2_model(d2_config(setting, iou_aware=name != "d2_retinanet", threshold_on=threshold_on))
    raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")


def copy_weights(state: Dict[str, Tensor], model: nn.Module) -> None:
    """Load ``state``; only the IoU branch may be left over (branch-off models lack it), and the
    loss normalizer's moving average (a training statistic: stock torchvision has none)."""
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith("head.iou_pred.") and k != "loss_normalizer_ema"]
    missing = [k for k in result.missing_keys if k != "loss_normalizer_ema"]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")


def load_model(setting: Setting, name: str, state: Dict[str, Tensor]) -> nn.Module:
    model = build_named_model(setting, name)
    copy_weights(state, model)
    return model


def _output_convs(model: nn.Module, frontend: str) -> Dict[str, nn.Conv2d]:
    head = model.head
    if frontend == "tv":
        return {"cls": head.classification_head.cls_logits, "box": head.regression_head.bbox_reg,
                "iou": head.iou_pred}
    return {"cls": head.cls_score, "box": head.bbox_pred, "iou": head.iou_pred}


def _box_tower(model: nn.Module, frontend: str) -> nn.Module:
    """The module whose output, per level, the box and IoU convs take."""
    return model.head.regression_head.conv if frontend == "tv" else model.head.bbox_subnet


@torch.no_grad()
def calibrate_head(model: nn.Module, frontend: str, inputs: tuple, score_thresh: float) -> None:
    """Rescale the head's output convs (in place) so that the outputs on ``inputs``
    look like a trained model's to post-processing.

    Each output is bias + w * x: scaling w sets the spread across anchors, the
    bias sets the level. Class logits: std ``CLS_LOGIT_STD``, and about
    ``CANDIDATES_PER_IMAGE`` (anchor, class) pairs per image above the score
    threshold; box deltas: std ``DELTA_STD``, centred on 0; IoU logits: std
    ``IOU_LOGIT_STD``, centred on logit(``IOU_CENTER``).
    """
    convs = _output_convs(model, frontend)
    outputs: Dict[str, List[Tensor]] = {key: [] for key in convs}
    tower_outputs: List[Tensor] = []

    def collect(store):
        return lambda module, args, output: store.append(output)

    # The box and IoU convs run as functions of their weights (core.box_and_iou_conv_outputs),
    # which module hooks do not see: take the box tower's output and apply them here.
    handles = [convs["cls"].register_forward_hook(collect(outputs["cls"])),
               _box_tower(model, frontend).register_forward_hook(collect(tower_outputs))]
    model.eval()
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    for key in ("box", "iou"):
        outputs[key] = [convs[key](feature) for feature in tower_outputs]

    num_images = outputs["cls"][0].shape[0]
    targets = {
        "cls": (CLS_LOGIT_STD, None),
        "box": (DELTA_STD, 0.0),
        "iou": (IOU_LOGIT_STD, math.log(IOU_CENTER / (1 - IOU_CENTER))),
    }
    for key, conv in convs.items():
        spread = torch.cat([(out - conv.bias.view(1, -1, 1, 1)).flatten() for out in outputs[key]])
        std, center = targets[key]
        scale = std / max(float(spread.std()), 1e-12)
        conv.weight.mul_(scale)
        if key == "cls":
            # The k-th largest logit lands on the threshold: about k pairs pass it.
            k = min(CANDIDATES_PER_IMAGE * num_images, spread.numel())
            kth_largest = float((spread * scale).topk(k).values[-1])
            center = math.log(score_thresh / (1 - score_thresh)) - kth_largest
        conv.bias.fill_(center)


# -------------------------------------------------------------------- inputs


def synthetic_batch(setting: Setting, batch: int, num_classes: int, seed: int):
    """RGB images in [0, 1] and torchvision targets with ``GTS_PER_IMAGE`` random boxes each."""
    h, w = setting.image_size
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, h, w, generator=gen) for _ in range(batch)]
    targets = []
    for i in range(batch):
        boxes, labels = random_gt_boxes(
            GTS_PER_IMAGE, (h, w), num_classes, seed=seed * 1000 + i, max_size=0.8 * min(h, w)
        )
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def to_detectron2(images: List[Tensor], targets: Optional[List[dict]]) -> List[dict]:
    """The same batch as Detectron2 model inputs: BGR on a 0-255 scale, ``Instances``."""
    from detectron2.structures import Boxes, Instances

    batch = []
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        entry = {"image": image.flip(0) * 255.0, "height": h, "width": w}
        if targets is not None:
            entry["instances"] = Instances(
                (h, w), gt_boxes=Boxes(targets[i]["boxes"]), gt_classes=targets[i]["labels"]
            )
        batch.append(entry)
    return batch


def model_inputs(setting: Setting, frontend: str, mode: str, num_classes: int) -> tuple:
    """Positional arguments of ``model(...)``: identical content for every model and run."""
    train = mode == "train"
    batch = setting.train_batch if train else setting.inference_batch
    images, targets = synthetic_batch(setting, batch, num_classes, seed=SEED + (0 if train else 1))
    if frontend == "tv":
        return (images, targets) if train else (images,)
    return (to_detectron2(images, targets if train else None),)


def num_classes_of(setting: Setting) -> int:
    return tv_config(setting, iou_aware=True).MODEL.RETINANET.NUM_CLASSES


# ------------------------------------------------------------------- running


def make_runner(model: nn.Module, frontend: str, mode: str, inputs: tuple) -> Callable[[], object]:
    """A call doing one training step (forward, backward, SGD step) or one inference."""
    if mode == "inference":
        model.eval()

        def infer():
            with torch.no_grad():
                return model(*inputs)

        return infer

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LEARNING_RATE, momentum=0.9, weight_decay=1e-4)

    def train_step():
        optimizer.zero_grad()
        with _event_storage(frontend):
            losses = model(*inputs)
        sum(losses.values()).backward()
        optimizer.step()
        return losses

    return train_step


def _event_storage(frontend: str):
    """Detectron2's models log to an EventStorage during training, as its trainer provides."""
    if frontend != "d2":
        return contextlib.nullcontext()
    from detectron2.utils.events import EventStorage

    return EventStorage()


def detections_per_image(frontend: str, outputs: list) -> float:
    counts = [len(o["boxes"]) if frontend == "tv" else len(o["instances"]) for o in outputs]
    return sum(counts) / len(counts)


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleaved_medians(run_a, run_b, repeats: int, warmup: int = WARMUP) -> Tuple[float, float]:
    """Median milliseconds of A and of B, timed alternately (A, B, A, B, ...)."""
    for _ in range(warmup):
        run_a()
        run_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(_seconds(run_a))
        times_b.append(_seconds(run_b))
    return 1000 * statistics.median(times_a), 1000 * statistics.median(times_b)


def _ratio_row(label, mode, a, b, a_ms, b_ms) -> dict:
    return {"pair": label, "mode": mode, "a": a, "b": b, "a_ms": a_ms, "b_ms": b_ms, "ratio": b_ms / a_ms}


def time_pair(setting: Setting, pair: Pair, mode: str, state, inputs: tuple, repeats: int) -> dict:
    """Build A and B from the same weights and time them interleaved on ``inputs``."""
    model_a, model_b = (load_model(setting, name, state) for name in (pair.a, pair.b))
    run_a = make_runner(model_a, pair.frontend, mode, inputs)
    run_b = make_runner(model_b, pair.frontend, mode, inputs)
    a_ms, b_ms = interleaved_medians(run_a, run_b, repeats)
    row = _ratio_row(pair.label, mode, pair.a, pair.b, a_ms, b_ms)
    if mode == "inference":
        row["a_detections"] = detections_per_image(pair.frontend, run_a())
        row["b_detections"] = detections_per_image(pair.frontend, run_b())
    return row


@torch.no_grad()
def dense_outputs(model: nn.Module, images: List[Tensor]) -> dict:
    """Per-level head outputs of the first image, as post-processing receives them
    (probabilities, deltas, IoUs, anchors): the torchvision model's own forward,
    stopped before post-processing (``model.dense_outputs``)."""
    model.eval()
    dense = model.dense_outputs(images)
    heads = dense.head_outputs
    cls_probs, box_deltas, ious = image_predictions(heads["cls_logits"], heads["bbox_regression"], heads["iou_logits"], 0)
    return {
        "cls_probs": cls_probs, "box_deltas": box_deltas, "ious": ious,
        "anchors": dense.anchors[0], "image_size": tuple(dense.image_sizes[0]),
    }  # fmt: skip


def time_postprocess(setting: Setting, state, inputs: tuple, repeats: int) -> dict:
    """``core.postprocess_image`` on one image: plain p (A) vs fused S (B)."""
    model = load_model(setting, SOURCE_MODEL["tv"], state)
    dense = dense_outputs(model, inputs[0])
    config = model.inference_config

    def run(ious):
        return lambda: postprocess_image(
            dense["cls_probs"], dense["box_deltas"], ious, dense["anchors"], model.box_coder,
            dense["image_size"], config,
        )

    run_a, run_b = run(None), run(dense["ious"])
    a_ms, b_ms = interleaved_medians(run_a, run_b, repeats * POSTPROCESS_REPEAT_FACTOR)
    row = _ratio_row("postprocess_image", "per image", "plain p", f"fused S (alpha {config.alpha})",
                     a_ms, b_ms)
    row["a_detections"], row["b_detections"] = len(run_a()), len(run_b())
    # NMS input: the (anchor, class) pairs left after thresholding and per-level top-k.
    for side, ious in (("a", None), ("b", dense["ious"])):
        row[f"{side}_nms_inputs"] = sum(
            len(select_level_candidates(p, None if ious is None else ious[level], config)[0])
            for level, p in enumerate(dense["cls_probs"])
        )
    return row


# -------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryJob:
    setting: Setting
    model: str
    mode: str
    weights_file: str
    threads: Optional[int] = None


def measure_peak_memory(job: MemoryJob) -> dict:
    """Run in a fresh process: peak RSS growth over ``MEMORY_RUNS`` calls of one model in one mode."""
    if job.threads:
        torch.set_num_threads(job.threads)
    # Detectron2's anchor generator warns on every fresh process; once in the main one is enough.
    warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
    frontend = job.model.split("_")[0]
    # mmap: the loaded weights leave no freed heap behind for the measured calls to reuse.
    model = load_model(job.setting, job.model, torch.load(job.weights_file, mmap=True, weights_only=True))
    run = make_runner(model, frontend, job.mode, model_inputs(job.setting, frontend, job.mode,
                                                               num_classes_of(job.setting)))
    use_hwm = _reset_peak_rss()
    if use_hwm:
        base_kib = _rss_kib("VmRSS")
    else:
        base_kib = _rss_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(MEMORY_RUNS):
        run()
    peak_kib = _rss_kib("VmHWM") if use_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model": job.model,
        "mode": job.mode,
        "peak_mib": max(0, peak_kib - base_kib) / 1024,
        "memory_method": MEMORY_METHOD_VMHWM if use_hwm else MEMORY_METHOD_MAXRSS,
    }


# What the fork server imports once: torch, torchvision, both front-ends (the
# package imports Detectron2's when it is installed). Not this module: run as
# ``python -m``, it is re-run in each child as ``__mp_main__``, and runpy warns
# when it finds it imported already.
FORKSERVER_PRELOAD = [
    "torchvision.models.detection", "iou_aware_retinanet.tv", "iou_aware_retinanet.benchmarks.assigners",
]


def _process_context():
    """Fork from a server that imported the libraries but ran nothing; spawn where
    fork servers do not exist."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def measure_memory(jobs: Sequence[MemoryJob]) -> List[dict]:
    """One fresh process per job, one at a time. As with any multiprocessing that
    does not fork the caller, a calling script needs the ``if __name__ == "__main__"`` guard."""
    ctx = _process_context()
    rows = []
    for job in jobs:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            rows.append(pool.submit(measure_peak_memory, job).result())
    return rows


# ---------------------------------------------------------------------- main


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stderr: stdout holds only the report


def run_setting(setting: Setting, repeats: int, frontends: Sequence[str], workdir: str,
                threads: Optional[int] = None, log: Callable[[str], None] = _progress) -> dict:
    """Every pair, the post-processing row and the memory rows of one setting."""
    num_classes = num_classes_of(setting)
    score_thresh = tv_config(setting, iou_aware=True).MODEL.RETINANET.SCORE_THRESH_TEST
    inputs = {(fe, mode): model_inputs(setting, fe, mode, num_classes) for fe in frontends for mode in MODES}

    states, weight_files = {}, {}
    for fe in frontends:
        source = build_named_model(setting, SOURCE_MODEL[fe])
        calibrate_head(source, fe, inputs[fe, "inference"], score_thresh)
        states[fe] = source.state_dict()
        weight_files[fe] = os.path.join(workdir, f"{setting.name}_{fe}.pt")
        torch.save(states[fe], weight_files[fe])

    results = {"setting": asdict(setting), "description": setting.describe(), "repeats": repeats,
               "num_classes": num_classes}
    for section, pairs in (("iou_aware", IOU_AWARE_PAIRS), ("peers", PEER_PAIRS)):
        rows = []
        for pair in pairs:
            if pair.frontend not in frontends:
                continue
            for mode in MODES:
                log(f"  timing {pair.label}, {mode} ...")
                rows.append(time_pair(setting, pair, mode, states[pair.frontend], inputs[pair.frontend, mode],
                                      repeats))
        results[section] = rows
    log("  timing postprocess_image ...")
    results["postprocess"] = [time_postprocess(setting, states["tv"], inputs["tv", "inference"], repeats)]

    models = [m for m in MODELS if m.split("_")[0] in frontends]
    jobs = [MemoryJob(setting, m, mode, weight_files[m.split("_")[0]], threads) for m in models for mode in MODES]
    log(f"  measuring memory ({len(jobs)} processes) ...")
    results["memory"] = measure_memory(jobs)
    return results


def machine_info(d2_version: Optional[str]) -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = models[0] if models else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "detectron2": d2_version,
        "threads": torch.get_num_threads(),
        # Other jobs on the cores skew timings (the ratios less so): worth knowing.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _fmt_load(load: Optional[float]) -> str:
    return "unknown" if load is None else f"{load:.2f}"


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _ratio_table(rows: List[dict]) -> List[str]:
    lines = ["| pair | mode | A | B | A ms | B ms | B/A | dets/img A, B |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        dets = f"{r['a_detections']:.0f}, {r['b_detections']:.0f}" if "a_detections" in r else "-"
        lines.append(f"| {r['pair']} | {r['mode']} | {r['a']} | {r['b']} | {_ms(r['a_ms'])} | {_ms(r['b_ms'])} "
                     f"| {r['ratio']:.3f} | {dets} |")
    return lines


def format_setting(name: str, res: dict, d2_skip_reason: Optional[str]) -> List[str]:
    lines = [f"## {name}: {res['description']}, {res['num_classes']} classes", ""]
    lines += [f"timing: median of {res['repeats']} interleaved runs per model after {WARMUP} warm-up", ""]
    lines += ["### 1. IoU-aware vs baseline (same backbone, same weights)", ""] + _ratio_table(res["iou_aware"])
    post = res["postprocess"][0]
    lines += ["", "### 2. Post-processing per image: core.postprocess_image (fusion + per-level top-k + NMS)", ""]
    lines += _ratio_table(res["postprocess"])
    lines += ["", f"NMS inputs (pairs after threshold and top-k): plain p {post['a_nms_inputs']}, "
                  f"fused S {post['b_nms_inputs']}"]
    lines += ["", "### 3. Peers (IoU branch off)", ""] + _ratio_table(res["peers"])
    if d2_skip_reason:
        lines += ["", f"Detectron2 rows skipped: Detectron2 is not importable ({d2_skip_reason})"]
    lines += ["", "### 4. Peak memory", "", "| model | mode | peak MiB |", "|---|---|---:|"]
    lines += [f"| {m['model']} | {m['mode']} | {m['peak_mib']:.1f} |" for m in res["memory"]]
    if res["memory"]:
        lines += ["", f"memory: {res['memory'][0]['memory_method']}, {MEMORY_RUNS} calls"]
    return lines


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=list(SETTINGS) + ["both"], default="both")
    parser.add_argument("--repeats", type=int, help="timed runs per model (default: 10 shapes, 3 r50)")
    parser.add_argument("--quick", action="store_true", help=f"shapes only, {QUICK_REPEATS} repeats")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(SETTINGS) if args.setting == "both" else [args.setting]
    if args.quick:
        names = ["shapes"]
    d2_version, d2_skip_reason = detectron2_status()
    frontends = ["tv"] + (["d2"] if d2_version else [])
    machine = machine_info(d2_version)

    results = {"machine": machine, "detectron2_skipped": d2_skip_reason, "models": MODELS, "settings": {}}
    with tempfile.TemporaryDirectory(prefix="speed_benchmark_") as workdir:
        for name in names:
            setting = SETTINGS[name]
            repeats = args.repeats or (QUICK_REPEATS if args.quick else setting.repeats)
            _progress(f"setting {name} ...")
            results["settings"][name] = run_setting(setting, repeats, frontends, workdir, args.threads)

    lines = ["# Speed and memory: IoU-aware RetinaNet vs baselines", ""]
    lines += [f"machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']}, torch "
              f"{machine['torch']}, torchvision {machine['torchvision']}, Detectron2 "
              f"{machine['detectron2'] or 'not importable'}; intra-op threads {machine['threads']}; "
              f"load average {_fmt_load(machine['load_average_1min'])}"]
    lines += ["models: " + "; ".join(f"{k} = {v}" for k, v in MODELS.items() if k.split('_')[0] in frontends)]
    lines += ["ratio B/A = median B ms / median A ms (A and B timed alternately on the same inputs)"]
    for name, res in results["settings"].items():
        lines += [""] + format_setting(name, res, d2_skip_reason)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
