"""Accuracy study: does the IoU branch (and do the assigners) buy AP here, and by how much?

    python -m iou_aware_retinanet.studies.accuracy --list              # the plan: models, seeds, estimated cost
    python -m iou_aware_retinanet.studies.accuracy --processes 2       # the whole study, two 1-thread processes
    python -m iou_aware_retinanet.studies.accuracy --quick             # baseline vs IoU-aware, seed 0
    python -m iou_aware_retinanet.studies.accuracy [--seeds 0 1 2] [--iters N] [--configs retinanet iou_aware ...] \\
        [--only-trained] [--shard I/N] [--threads N] [--output-dir output/study/accuracy] [KEY VALUE ...]

On the torchvision front-end (no Detectron2 needed), from the Shapes configs
of ``configs/Shapes`` at their own schedule: the main job's (4,500
iterations, learning-rate steps at 70 % and 90 %); ``--iters`` scales it for
a smoke run. The plan (``--list`` prints it): the baseline RetinaNet, the
IoU-aware model and the IoU-aware model without the gradient through its
IoU target with 5 seeds; the IoU-aware model with each other assigner (TopK,
ATSS, noisy-anchor, HAMBox, task-aligned) with 3; baseline and IoU-aware on
the harder data (``shapes_hard``) with 3. Trailing ``KEY VALUE`` pairs
override every config, e.g. ``DATASETS.TRAIN`` / ``DATASETS.TEST`` /
``DATASETS.COCO_INSTANCES`` to run the study on your own COCO-format dataset.

Per trained model the validation set goes through the network once; every
scoring is then the core's ``postprocess_image`` on those outputs, so alpha
and the post-processing (inference only) are swept on one trained model:

* alpha (none, 0.3 ... 0.7, 1.0) on the IoU-aware models trained with and
  without the target gradient (the paper's Tables 2-3 were trained without,
  its Table 4 compares both);
* the default post-processing (threshold on p, Detectron2's top-k of
  (anchor, class) pairs) against the official code's (per level the top
  1,000 anchors by their best-class S, threshold 0.05 on S, then NMS), for
  every model, with the detections per image;
* the upper bound replaces the predicted IoU of every candidate by IoU_truth,
  the IoU of its decoded box with the nearest ground-truth box of any class
  (paper Table 6).

Differences are paired by seed (the same seed gives both models the same data
order, flips and shared-layer initialisation): per-seed deltas of AP, AP75
and AP90 (COCOeval precision at IoU 0.9), their mean, standard error and a
paired bootstrap 95 % interval (every resampling of the seeds with
replacement when there are at most 6, else 10,000 random ones; percentile
interval). The verdict is *wins* (or *loses*) where that interval lies above
(or below) zero. With 3 to 5 seeds the percentile bootstrap is liberal (its
interval is narrower than Student's t would give), so read it with the
per-seed deltas, which are printed.

The IoU predictor, for every seed of every model: calibration (predicted
against true IoU of the positive anchors, and of the final detections that
match a ground truth of their class) and Pearson / Spearman of S, p and the
predicted IoU with IoU_eval (IoU with the nearest ground truth of the same
class) over the final detections, with the mean over seeds, its bootstrap
interval, and the paired difference S - p per seed. Plots of the first seed:
``correlation.png`` and ``calibration.png`` (need matplotlib: the
``analysis`` extra).

Trained models are kept under ``OUTPUT_DIR/runs/<model>/seed<k>``; a rerun
reuses every ``model_final.pth`` it finds (delete the folder to retrain) and
resumes a half-trained model from its last checkpoint; each model's scorings
are kept in its ``study_eval.json`` (keyed by its weights file), so a rerun
evaluates only new models. ``--shard I/N`` trains and evaluates every N-th
model of the plan from the I-th and writes no report; ``--processes N`` runs
N such shards side by side (1 thread each unless ``--threads``; their logs
in ``OUTPUT_DIR/shard<I>.log``), then the report; ``--only-trained``
reports on what is there and trains nothing. The report names the data
fingerprint of every dataset, the CPU, the library versions and the commit;
everything printed is also written to ``accuracy.md`` and ``accuracy.json``.
"""
import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou

from ..atomic import atomic_write
from ..core import image_predictions, postprocess_image
from ..data.builtin import shapes_fingerprints
from ..tv.cli import setup_logging
from ..tv.config import get_cfg
from ..tv.data import build_test_loader, resolve_dataset
from ..tv.engine import load_model, train
from ..tv.evaluation import coco_evaluate, detections_to_coco
from .stats import interval_verdict, pearson, spearman, summarize

logger = logging.getLogger("iou_aware_retinanet.studies.accuracy")  # not __main__ under -m

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "Shapes"


@dataclass(frozen=True)
class StudyModel:
    """One trained configuration of the study."""

    config: str  # file in the Shapes config folder
    group: str  # its seeds: GROUP_SEEDS[group]
    reference: Optional[str] = None  # the baseline its paired differences are taken against
    opts: Tuple[str, ...] = ()  # overrides on top of the config file


# name -> model. Every one but the two baselines has the IoU branch.
TRAINED = OrderedDict(
    [
        ("retinanet", StudyModel("retinanet.yaml", "main")),
        ("iou_aware", StudyModel("iou_aware_retinanet.yaml", "main", "retinanet")),
        ("target_gradient_off", StudyModel("target_gradient_off.yaml", "main", "retinanet")),
        ("topk", StudyModel("topk.yaml", "assigners", "retinanet")),
        ("atss", StudyModel("atss.yaml", "assigners", "retinanet")),
        ("noisy_anchor", StudyModel("noisy_anchor.yaml", "assigners", "retinanet")),
        ("hambox", StudyModel("hambox.yaml", "assigners", "retinanet")),
        ("task_aligned", StudyModel("task_aligned.yaml", "assigners", "retinanet")),
        ("retinanet_hard", StudyModel("iou_aware_retinanet_hard.yaml", "hard", None, ("MODEL.IOU_AWARE.ENABLED", "False"))),
        ("iou_aware_hard", StudyModel("iou_aware_retinanet_hard.yaml", "hard", "retinanet_hard")),
    ]
)
GROUP_SEEDS = {"main": (0, 1, 2, 3, 4), "assigners": (0, 1, 2), "hard": (0, 1, 2)}
QUICK_CONFIGS = ("retinanet", "iou_aware")
ALPHA_SWEPT = ("iou_aware", "target_gradient_off")  # the paper's Table 4 (on) and Tables 2-3 (off) settings
UPPER_BOUND = ("iou_aware",)
PLOTTED = ("retinanet", "iou_aware")  # the correlation and calibration plots: their first seed
ALPHAS = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0)  # None: p * IoU
POSTPROCESSINGS = ("default", "official")
# The official code's post-processing (mmdetection's RetinaNet test: nms_pre 1,000 anchors per level by their
# best-class S, score_thr 0.05 on S, NMS 0.5, 100 per image): inference options on top of the model's.
OFFICIAL_POSTPROCESSING = {"threshold_on": "fused", "candidates": "anchors"}
# AP90: COCOeval precision at IoU 0.9 alone (the paper's VOC table gains most at AP80 / AP90).
STUDY_METRICS = ("AP", "AP50", "AP75", "AP90", "APs", "APm", "APl", "dets/img")
PAIRED_METRICS = ("AP", "AP75", "AP90")
# Training cost per iteration of the Shapes recipe (batch 8, 128 px) in a 1-thread process with a
# second one beside it: 4.7 min per 2,000-iteration model on a 2-core AMD EPYC. --list scales it by
# iterations, batch and pixels (a guide, not a measurement of your machine).
SECONDS_PER_ITERATION = 4.7 * 60 / 2000
EVALUATION_MINUTES = 1.0  # per model, at most: one pass over the validation set, then every scoring


def alpha_name(alpha: Optional[float]) -> str:
    return "none (p*IoU)" if alpha is None else f"{alpha:g}"


# ------------------------------------------------------------------ the plan and its configs


def scaled_schedule(cfg, iters: Optional[int]) -> List[str]:
    """Overrides that scale the config's schedule (steps, warmup) to ``iters``; none for its own length."""
    if iters is None or iters == cfg.SOLVER.MAX_ITER:
        return []
    ratio = iters / cfg.SOLVER.MAX_ITER
    steps = tuple(max(1, round(s * ratio)) for s in cfg.SOLVER.STEPS)
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", repr(steps),
        "SOLVER.WARMUP_ITERS", str(min(cfg.SOLVER.WARMUP_ITERS, iters // 7)),
        "SOLVER.CHECKPOINT_PERIOD", str(min(cfg.SOLVER.CHECKPOINT_PERIOD, iters)),
    ]  # fmt: skip


def study_cfg(name: str, seed: int, iters: Optional[int], output_dir: Path, opts: Sequence[str], config_dir: Path):
    path = Path(config_dir) / TRAINED[name].config
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the study from a clone of the repository or pass --config-dir")
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(TRAINED[name].opts) + list(opts))
    cfg.merge_from_list(scaled_schedule(cfg, iters))
    # A killed study resumes inside a model too: the configs checkpoint every 1,000 iterations.
    cfg.merge_from_list(["SEED", seed, "OUTPUT_DIR", str(Path(output_dir) / "runs" / name / f"seed{seed}"), "TEST.EVAL_PERIOD", 0])
    cfg.freeze()
    return cfg


def study_plan(names: Sequence[str], seeds: Optional[Sequence[int]]) -> List[Tuple[str, int]]:
    """(model, seed) pairs, seed by seed: a study stopped half-way has every model's first seeds."""
    unknown = [n for n in names if n not in TRAINED]
    if unknown:
        raise ValueError(f"unknown --configs {unknown}; valid choices: {', '.join(TRAINED)}")
    per_model = {n: list(seeds) if seeds is not None else list(GROUP_SEEDS[TRAINED[n].group]) for n in names}
    all_seeds = sorted({s for v in per_model.values() for s in v})
    return [(n, s) for s in all_seeds for n in names if s in per_model[n]]


def parse_shard(text: str) -> Tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return index, count


def estimated_minutes(cfg) -> float:
    """Rough training + evaluation minutes of one model (see SECONDS_PER_ITERATION)."""
    pixels = cfg.INPUT.MAX_SIZE_TRAIN * cfg.INPUT.MAX_SIZE_TRAIN / 128.0**2
    batch = cfg.SOLVER.IMS_PER_BATCH / 8.0
    return cfg.SOLVER.MAX_ITER * SECONDS_PER_ITERATION * pixels * batch / 60.0 + EVALUATION_MINUTES


def model_state(cfg) -> str:
    if os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth")):
        return "trained"
    if os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return "partly trained"
    return "to train"


def plan_text(plan, args) -> str:
    """What ``--list`` prints: every model the study would train, and the estimated cost."""
    rows, total, states = OrderedDict(), 0.0, {}
    for name, seed in plan:
        cfg = study_cfg(name, seed, args.iters, Path(args.output_dir), args.opts, Path(args.config_dir))
        state = model_state(cfg)
        states[state] = states.get(state, 0) + 1
        minutes = estimated_minutes(cfg)
        total += minutes if state != "trained" else 0.0
        row = rows.setdefault(name, {"seeds": [], "cfg": cfg, "minutes": minutes, "states": []})
        row["seeds"].append(seed)
        row["states"].append(state)
    lines = [
        "| model | config | trained on | seeds | iterations | est. min per model | state |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for name, row in rows.items():
        cfg = row["cfg"]
        extra = " ".join(TRAINED[name].opts)
        states_text = [f"{row['states'].count(s)} {s}" for s in dict.fromkeys(row["states"])]
        lines.append(
            f"| {name} | {TRAINED[name].config}{' ' + extra if extra else ''} | {', '.join(cfg.DATASETS.TRAIN)} "
            f"| {', '.join(map(str, row['seeds']))} | {cfg.SOLVER.MAX_ITER} | {row['minutes']:.1f} "
            f"| {', '.join(states_text)} |"
        )
    lines += [
        "",
        f"{len(plan)} models ({', '.join(f'{n} {s}' for s, n in states.items())}); estimated {total / 60:.1f} h of "
        f"training and evaluation still to do: about {total / 120:.1f} h of wall time as two 1-thread processes side "
        f"by side on two cores (--processes 2), scaled from {SECONDS_PER_ITERATION * 2000 / 60:.1f} min per "
        "2,000-iteration model at 128 px, linear in iterations, batch and pixels: a guide, not a measurement of this machine.",
    ]
    return "\n".join(lines)


# What a trained model in a run folder must have been trained with to be reused.
RUN_KEYS = ("SEED", "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.WARMUP_ITERS", "SOLVER.BASE_LR", "SOLVER.IMS_PER_BATCH",
            "DATASETS.TRAIN", "INPUT", "MODEL")  # fmt: skip


def check_run_folder(cfg) -> None:
    """Refuse a run folder whose saved config.yaml differs from ``cfg`` on RUN_KEYS: its weights
    would silently stand for another model (e.g. a study of another length in the same folder)."""
    path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    if not os.path.isfile(path):
        return
    saved = get_cfg()
    saved.set_new_allowed(True)
    try:
        saved.merge_from_file(path)
    except Exception as e:  # a run of another version of the project: keys renamed since
        raise ValueError(f"{path} cannot be read as this version's config ({e}): use another --output-dir") from None
    for key in RUN_KEYS:
        mine, theirs = cfg, saved
        for part in key.split("."):
            mine, theirs = mine[part], theirs.get(part)
        if mine != theirs:
            raise ValueError(
                f"{cfg.OUTPUT_DIR} holds a run trained with other settings ({key} differs from this study's; see its "
                f"config.yaml): use another --output-dir, or delete the folder to retrain"
            )


def train_or_reuse(cfg) -> str:
    check_run_folder(cfg)
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if os.path.isfile(final):
        logger.info("Reusing %s", final)
        return final
    train_cfg = cfg.clone()
    train_cfg.defrost()
    train_cfg.DATASETS.TEST = ()  # the study evaluates from cached outputs below
    train(train_cfg, resume=True)  # continues a model a killed study left half-trained
    return final


# ------------------------------------------------------------------ inference


@dataclass
class ImageOutputs:
    """One validation image: the raw head outputs per level (probabilities, not logits)."""

    image_id: int
    cls_probs: List[Tensor]  # [(A_l, K)]
    box_deltas: List[Tensor]  # [(A_l, 4)]
    ious: Optional[List[Tensor]]  # [(A_l,)] predicted IoU, None without the branch
    anchors: List[Tensor]  # [(A_l, 4)], resized-image coordinates
    image_size: tuple  # resized (h, w)
    original_size: tuple
    gt_boxes: Tensor  # (G, 4) XYXY, original coordinates
    gt_classes: Tensor  # (G,)


@torch.no_grad()
def collect_outputs(model, cfg, dataset_name: str):
    """Run ``model`` once over ``dataset_name``; returns (outputs per image, the dataset)."""
    loader = build_test_loader(cfg, dataset_name)
    model.eval()
    items = []
    for images, targets in loader:
        dense = model.dense_outputs(images)
        heads = dense.head_outputs
        for i, target in enumerate(targets):
            cls_probs, box_deltas, ious = image_predictions(
                heads["cls_logits"], heads["bbox_regression"], heads.get("iou_logits"), i
            )
            items.append(
                ImageOutputs(
                    image_id=int(target["image_id"]),
                    cls_probs=cls_probs,
                    box_deltas=box_deltas,
                    ious=ious,
                    anchors=dense.anchors[i],
                    image_size=tuple(dense.image_sizes[i]),
                    original_size=tuple(dense.original_image_sizes[i]),
                    gt_boxes=target["boxes"],
                    gt_classes=target["labels"],
                )
            )
    return items, loader.data


def truth_ious(item: ImageOutputs, box_coder) -> List[Tensor]:
    """IoU_truth per anchor: IoU of its decoded box with the nearest GT of any class (0 without GT)."""
    gt = resize_boxes(item.gt_boxes, item.original_size, item.image_size)
    out = []
    for deltas, anchors in zip(item.box_deltas, item.anchors):
        if gt.shape[0] == 0:
            out.append(deltas.new_zeros(deltas.shape[0]))
            continue
        boxes = box_coder.apply_deltas(deltas, anchors)
        out.append(box_iou(boxes, gt).max(dim=1).values.nan_to_num(0.0))
    return out


def inference_config(model, alpha, postprocess: str = "default"):
    """The model's inference options with ``alpha``; "official": the official code's post-processing."""
    if postprocess not in POSTPROCESSINGS:
        raise ValueError(f"unknown post-processing {postprocess!r}; valid choices: {', '.join(POSTPROCESSINGS)}")
    config = replace(model.inference_config, alpha=alpha)
    return replace(config, **OFFICIAL_POSTPROCESSING) if postprocess == "official" else config


def detect(item: ImageOutputs, model, alpha, iou_source: str = "predicted", postprocess: str = "default") -> Dict[str, Tensor]:
    """Detections of one image (original coordinates) under a scoring.

    ``iou_source``: "predicted" (the branch's IoU; plain p without the branch)
    or "truth" (IoU_truth, the upper bound)."""
    if iou_source == "truth":
        ious = truth_ious(item, model.box_coder)
    else:
        ious = item.ious
    det = postprocess_image(
        cls_probs=item.cls_probs, box_deltas=item.box_deltas, ious=ious, anchors=item.anchors,
        box_coder=model.box_coder, image_size=item.image_size, config=inference_config(model, alpha, postprocess),
    )  # fmt: skip
    return {
        "boxes": resize_boxes(det.boxes, item.image_size, item.original_size),
        "scores": det.scores,
        "labels": det.classes,
        "cls_scores": det.cls_scores,
        "ious": det.ious,
    }


def evaluate_scoring(items, data, model, alpha, iou_source="predicted", postprocess="default") -> Dict[str, float]:
    results, count = [], 0
    for item in items:
        det = detect(item, model, alpha, iou_source, postprocess)
        count += det["scores"].shape[0]
        results.extend(detections_to_coco(det, item.image_id, data.category_ids))
    metrics = coco_evaluate(data.coco, results, [item.image_id for item in items])
    metrics["dets/img"] = count / max(1, len(items))
    return {name: metrics[name] for name in STUDY_METRICS}


# ------------------------------------------------------------------ correlation


def iou_eval(det: Dict[str, Tensor], item: ImageOutputs) -> Tensor:
    """IoU of each detection with the nearest GT of the same class (0 when the class is absent)."""
    out = det["scores"].new_zeros(det["scores"].shape[0])
    if item.gt_boxes.shape[0] == 0 or out.numel() == 0:
        return out
    iou = box_iou(det["boxes"], item.gt_boxes)  # (D, G)
    same_class = det["labels"][:, None] == item.gt_classes[None, :]
    return torch.where(same_class, iou, torch.zeros_like(iou)).max(dim=1).values


def correlation_samples(items, model, alpha, iou_source, max_samples: int, seed: int = 0):
    """(IoU_eval, confidence) of up to ``max_samples`` detections, sampled uniformly with ``seed``."""
    ious, scores = [], []
    for item in items:
        det = detect(item, model, alpha, iou_source)
        ious.append(iou_eval(det, item))
        scores.append(det["scores"])
    ious, scores = torch.cat(ious).numpy(), torch.cat(scores).numpy()
    if len(ious) > max_samples:
        keep = np.random.default_rng(seed).choice(len(ious), max_samples, replace=False)
        ious, scores = ious[keep], scores[keep]
    return ious.astype(np.float64), scores.astype(np.float64)


def plot_correlation(panels, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install -e '.[analysis]'): %s not written", path)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), sharex=True, sharey=True)
    for ax, panel in zip(np.atleast_1d(axes), panels):
        ax.scatter(panel["iou_eval"], panel["confidence"], s=2, alpha=0.25, linewidths=0)
        ax.set_title(f"{panel['label']}\nPearson {panel['pearson']:.3f}, Spearman {panel['spearman']:.3f}", fontsize=10)
        ax.set_xlabel("IoU_eval (nearest GT of the same class)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("detection confidence")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ statistics over seeds

def paired_difference(row: dict, reference: dict, metric: str) -> Optional[dict]:
    """Per-seed differences ``row - reference`` on the seeds both have, summarized, with the verdict.

    The same seed gives both models the same data order, flips and
    initialisation of the shared layers, so the per-seed difference removes
    most of the seed-to-seed spread. A row *wins* (or *loses*) where the paired
    bootstrap 95 % interval of the mean difference lies above (or below) zero.
    """
    seeds = [s for s in row["per_seed"] if s in reference["per_seed"]]
    summary = summarize([row["per_seed"][s][metric] - reference["per_seed"][s][metric] for s in seeds])
    if summary is None:
        return None
    summary["deltas"] = summary["values"]
    summary["verdict"] = interval_verdict(summary)
    return summary


# ------------------------------------------------------------------ report


def _mean_std(values: Sequence[float]) -> str:
    s = summarize(values)
    if s is None:
        return "nan"
    return f"{s['mean']:.2f}" if s["n"] == 1 else f"{s['mean']:.2f} ± {s['std']:.2f}"


def _interval(s: dict, digits: int = 2) -> str:
    if s["n"] < 2:
        return f"{s['mean']:+.{digits}f}"
    return f"{s['mean']:+.{digits}f} ({s['se']:.{digits}f}) [{s['low']:+.{digits}f}, {s['high']:+.{digits}f}]"


def results_table(rows: "OrderedDict[str, dict]") -> str:
    """Markdown: one row per (model, scoring, post-processing), mean ± sample std over seeds."""
    header = ["model", "scoring", "post-processing", "seeds", *STUDY_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows.values():
        per_seed = list(row["per_seed"].values())
        cells = [row["model"], row["scoring"], row["postprocess"], str(len(per_seed))]
        cells += [_mean_std([m.get(k, float("nan")) for m in per_seed]) for k in STUDY_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: "OrderedDict[str, dict]", pairs: Sequence[Tuple[str, str]]) -> str:
    """Markdown: per-seed differences of each (row, reference) pair, mean (SE) [95 % interval], verdict."""
    header = ["model", "scoring", "post-processing", "against"]
    for metric in PAIRED_METRICS:
        header += [f"Δ{metric} per seed", f"Δ{metric} mean (SE) [95 % CI]", f"{metric} verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key, reference_key in pairs:
        row, reference = rows[key], rows[reference_key]
        cells = [row["model"], row["scoring"], row["postprocess"], f"{reference['model']}, {reference['scoring']}, {reference['postprocess']}"]
        for metric in PAIRED_METRICS:
            d = paired_difference(row, reference, metric)
            if d is None:
                cells += ["-", "-", "-"]
                continue
            cells += [", ".join(f"{x:+.2f}" for x in d["deltas"]), _interval(d), d["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def postprocessing_table(rows: "OrderedDict[str, dict]", name: str) -> str:
    """Markdown: the alpha sweep of one model under both post-processings, means over seeds."""
    metrics = ("AP", "AP75", "AP90", "dets/img")
    header = ["alpha", *[f"{m} (default)" for m in metrics], *[f"{m} (official)" for m in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    sweep = [r for r in rows.values() if r["model"] == name and r.get("alpha_swept")]
    for alpha in dict.fromkeys(r["alpha"] for r in sweep):
        cells = [alpha]
        for postprocess in POSTPROCESSINGS:
            row = next((r for r in sweep if r["alpha"] == alpha and r["postprocess"] == postprocess), None)
            for m in metrics:
                cells.append("-" if row is None else _mean_std([v[m] for v in row["per_seed"].values()]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_pairs(rows: "OrderedDict[str, dict]") -> Dict[str, List[Tuple[str, str]]]:
    """The paired comparisons the report makes, each (row key, reference row key), by section."""
    against_baseline = [(k, r["reference"]) for k, r in rows.items() if r["reference"] in rows]
    gradient = [
        (scoring_key("iou_aware", p), scoring_key("target_gradient_off", p)) for p in POSTPROCESSINGS
        if scoring_key("iou_aware", p) in rows and scoring_key("target_gradient_off", p) in rows
    ]  # fmt: skip
    official = [
        (scoring_key(name, "official"), scoring_key(name, "default")) for name in TRAINED
        if scoring_key(name, "official") in rows and scoring_key(name, "default") in rows
    ]  # fmt: skip
    return {"baseline": against_baseline, "gradient": gradient, "official": official}


# ------------------------------------------------------------------ the IoU predictor

# (key in a model's predictor stats, what the report calls it). "matched": the detections whose
# class matches a ground truth they overlap with IoU_eval >= 0.5.
PREDICTOR_QUANTITIES = (
    ("positives_mae", "positive anchors: mean |predicted IoU - true IoU|"),
    ("positives_pearson", "positive anchors: Pearson(predicted IoU, true IoU)"),
    ("positives_spearman", "positive anchors: Spearman(predicted IoU, true IoU)"),
    ("matched_iou_mae", "matched detections: mean |predicted IoU - IoU_eval|"),
    ("matched_pearson_iou", "matched detections: Pearson(predicted IoU, IoU_eval)"),
    ("matched_pearson_S", "matched detections: Pearson(S, IoU_eval)"),
    ("matched_pearson_p", "matched detections: Pearson(p, IoU_eval)"),
    ("matched_spearman_iou", "matched detections: Spearman(predicted IoU, IoU_eval)"),
    ("matched_spearman_S", "matched detections: Spearman(S, IoU_eval)"),
    ("matched_spearman_p", "matched detections: Spearman(p, IoU_eval)"),
    ("all_pearson_S", "all detections: Pearson(S, IoU_eval)"),
    ("all_pearson_p", "all detections: Pearson(p, IoU_eval)"),
    ("all_spearman_S", "all detections: Spearman(S, IoU_eval)"),
    ("all_spearman_p", "all detections: Spearman(p, IoU_eval)"),
)
# S against p, per seed: does the fused score rank by localisation better than the model's own p?
S_AGAINST_P = ("matched_pearson", "matched_spearman", "all_pearson", "all_spearman")


def correlations(iou: np.ndarray, confidence: np.ndarray, matched: np.ndarray, label: str) -> Dict[str, float]:
    return {
        f"all_pearson_{label}": pearson(iou, confidence),
        f"all_spearman_{label}": spearman(iou, confidence),
        f"matched_pearson_{label}": pearson(iou[matched], confidence[matched]),
        f"matched_spearman_{label}": spearman(iou[matched], confidence[matched]),
    }


def final_detections(items, model) -> Dict[str, np.ndarray]:
    """IoU_eval, S, p and the predicted IoU (empty without the branch) of every final detection
    at the model's configured scoring (default post-processing)."""
    alpha = model.inference_config.alpha if model.iou_aware else 1.0
    columns = {"iou_eval": [], "S": [], "p": [], "predicted": []}
    for item in items:
        det = detect(item, model, alpha)
        columns["iou_eval"].append(iou_eval(det, item))
        columns["S"].append(det["scores"])
        columns["p"].append(det["cls_scores"])
        if det["ious"] is not None:
            columns["predicted"].append(det["ious"])
    return {k: torch.cat(v).double().numpy() if v else np.zeros(0) for k, v in columns.items()}


def predictor_stats(items, model) -> Dict[str, float]:
    """The IoU predictor of one trained model, over the final detections at its configured scoring
    (default post-processing) and, with the branch, over the positive anchors (:func:`iou_calibration`)."""
    det = final_detections(items, model)
    iou, S, p, predicted = det["iou_eval"], det["S"], det["p"], det["predicted"]
    matched = iou >= 0.5
    out = {"detections": float(len(iou)), "matched": float(matched.sum())}
    out.update(correlations(iou, p, matched, "p"))
    if model.iou_aware:
        out.update(correlations(iou, S, matched, "S"))
        out.update(correlations(iou, predicted, matched, "iou"))
        out["matched_iou_mae"] = float(np.abs(predicted[matched] - iou[matched]).mean()) if matched.any() else float("nan")
        cal = iou_calibration(items, model)
        out.update({"positives": float(cal["n"]), "positives_mae": cal["mae"], "positives_pearson": cal["pearson"],
                    "positives_spearman": spearman(cal["true"], cal["predicted"])})  # fmt: skip
    return out


def predictor_table(predictor: "OrderedDict[str, Dict[int, dict]]") -> str:
    """Markdown: each quantity per seed, and its mean over seeds with the bootstrap interval."""
    lines = ["| model | quantity | per seed | mean (SE) [95 % CI] |", "|---|---|---|---|"]
    for name, per_seed in predictor.items():
        for key, label in PREDICTOR_QUANTITIES:
            s = summarize([stats[key] for stats in per_seed.values() if key in stats])
            if s is None:
                continue
            values = ", ".join(f"{stats[key]:.3f}" for stats in per_seed.values() if key in stats)
            lines.append(f"| {name} | {label} | {values} | {_interval(s, 3).lstrip('+')} |")
    return "\n".join(lines)


def s_against_p(per_seed: Dict[int, dict], correlation: str) -> Optional[dict]:
    """Per-seed difference correlation(S) - correlation(p) with IoU_eval, summarized, with its verdict."""
    deltas = [stats[f"{correlation}_S"] - stats[f"{correlation}_p"] for stats in per_seed.values() if f"{correlation}_S" in stats]
    summary = summarize(deltas)
    if summary is not None:
        summary["verdict"] = interval_verdict(summary, "S correlates better", "p correlates better")
    return summary


def s_against_p_table(predictor: "OrderedDict[str, Dict[int, dict]]") -> str:
    lines = ["| model | correlation with IoU_eval | S - p per seed | mean (SE) [95 % CI] | verdict |", "|---|---|---|---|---|"]
    for name, per_seed in predictor.items():
        for correlation in S_AGAINST_P:
            s = s_against_p(per_seed, correlation)
            if s is None:
                continue
            subset, method = correlation.split("_")
            what = f"{method.capitalize()}, {subset} detections"
            lines.append(f"| {name} | {what} | {', '.join(f'{d:+.3f}' for d in s['values'])} | {_interval(s, 3)} | {s['verdict']} |")
    return "\n".join(lines)


def correlation_table(panels) -> str:
    lines = [
        "| detections | confidence | n | Pearson | Spearman | n (IoU_eval >= 0.5) | Pearson (IoU_eval >= 0.5) | Spearman (IoU_eval >= 0.5) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in panels:
        lines.append(
            f"| {p['model']} | {p['label']} | {p['n']} | {p['pearson']:.3f} | {p['spearman']:.3f} "
            f"| {p['n_matched']} | {p['pearson_matched']:.3f} | {p['spearman_matched']:.3f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ scoring one trained model


@dataclass(frozen=True)
class Scoring:
    key: str  # row key of the report
    label: str
    alpha: Optional[float]
    postprocess: str = "default"
    iou_source: str = "predicted"  # "truth": the upper bound
    alpha_swept: bool = False


def scoring_key(name: str, postprocess: str = "default", alpha: Optional[str] = None) -> str:
    """Row key: the model's name for its configured scoring, then what differs from it."""
    return name + ("/official" if postprocess == "official" else "") + (f"/alpha {alpha}" if alpha is not None else "")


def model_scorings(name: str, model) -> List[Scoring]:
    """Every scoring of one trained model: its configured one under both post-processings;
    for ALPHA_SWEPT models every alpha; for UPPER_BOUND models S with IoU_truth."""
    if not model.iou_aware:
        return [Scoring(scoring_key(name, pp), "p", 1.0, pp) for pp in POSTPROCESSINGS]
    config_alpha = model.inference_config.alpha
    swept = name in ALPHA_SWEPT
    alphas = list(dict.fromkeys(ALPHAS + (config_alpha,))) if swept else [config_alpha]
    out = []
    for pp in POSTPROCESSINGS:
        for a in alphas:
            key = scoring_key(name, pp, None if a == config_alpha else alpha_name(a))
            out.append(Scoring(key, "p" if a == 1.0 else f"S, alpha {alpha_name(a)}", a, pp, alpha_swept=swept))
    if name in UPPER_BOUND:
        out.append(Scoring(f"{name}/truth", f"S with IoU_truth, alpha {alpha_name(config_alpha)}", config_alpha, iou_source="truth"))
    return out


def evaluate_model(name: str, model, items, data) -> dict:
    """Every scoring's metrics, as rows [key, model, scoring, post-processing, alpha swept, metrics],
    and the IoU predictor's statistics."""
    eval_logger = logging.getLogger("iou_aware_retinanet.tv.evaluation")
    level = eval_logger.level
    eval_logger.setLevel(logging.WARNING)  # COCOeval's printout, dozens of times
    try:
        rows = []
        for s in model_scorings(name, model):
            label = f"{name} (upper bound)" if s.iou_source == "truth" else name
            metrics = evaluate_scoring(items, data, model, s.alpha, s.iou_source, s.postprocess)
            rows.append([s.key, label, s.label, s.postprocess, s.alpha_swept, alpha_name(s.alpha), metrics])
        return {"rows": rows, "predictor": predictor_stats(items, model)}
    finally:
        eval_logger.setLevel(level)


# Each model is evaluated once: its rows are kept next to its weights, keyed by the weights
# file (size, mtime), the dataset and what the rows hold, so a rerun only aggregates.
EVAL_CACHE = "study_eval.json"
EVAL_FORMAT = 2  # bump when evaluate_model's output changes


def _cache_key(weights: str, dataset: str) -> dict:
    stat = os.stat(weights)
    return {
        "format": EVAL_FORMAT, "weights_bytes": stat.st_size, "weights_mtime_ns": stat.st_mtime_ns, "dataset": dataset,
        "alphas": [alpha_name(a) for a in ALPHAS], "postprocessings": list(POSTPROCESSINGS), "metrics": list(STUDY_METRICS),
    }  # fmt: skip


def cached_model_eval(cfg, weights: str) -> Optional[dict]:
    path = os.path.join(cfg.OUTPUT_DIR, EVAL_CACHE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        cache = json.load(f)
    if cache.get("key") != _cache_key(weights, cfg.DATASETS.TEST[0]):
        return None  # retrained, or another dataset / scoring list: evaluate again
    logger.info("Reusing the evaluation of %s (%s)", weights, EVAL_CACHE)
    return cache["eval"]


def write_model_eval(cfg, weights: str, model_eval: dict) -> None:
    path = os.path.join(cfg.OUTPUT_DIR, EVAL_CACHE)
    with atomic_write(path) as f:
        json.dump({"key": _cache_key(weights, cfg.DATASETS.TEST[0]), "eval": model_eval}, f, indent=1)


def add_rows(rows, name: str, seed: int, model_rows: List[list]) -> None:
    reference = TRAINED[name].reference
    for key, model, scoring, postprocess, swept, alpha, metrics in model_rows:
        row = rows.setdefault(key, {
            "model": model, "scoring": scoring, "postprocess": postprocess, "alpha": alpha, "alpha_swept": swept,
            "reference": None if reference is None else scoring_key(reference, postprocess),
            "per_seed": {},
        })  # fmt: skip
        row["per_seed"][seed] = metrics


# ------------------------------------------------------------------ provenance


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_commit() -> Optional[str]:
    """The commit of the checkout the study runs from ("+ local changes" when tracked files differ)."""
    root = str(Path(__file__).resolve().parents[2])
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")


def environment() -> Dict[str, object]:
    import cv2
    import torchvision

    return {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": np.__version__, "opencv": cv2.__version__, "commit": git_commit(),
    }  # fmt: skip


def data_fingerprints(plan, args) -> Dict[str, str]:
    """Fingerprints of the built-in datasets the plan trains and evaluates on (generated here if missing)."""
    datasets = {}
    for name in dict.fromkeys(n for n, _ in plan):
        cfg = study_cfg(name, 0, args.iters, Path(args.output_dir), args.opts, Path(args.config_dir))
        for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
            for dataset in names:
                if dataset not in datasets:
                    datasets[dataset] = resolve_dataset(cfg, dataset, key)
    return shapes_fingerprints(datasets)


# ------------------------------------------------------------------ the study


def run_study(args) -> dict:
    out = Path(args.output_dir)
    names = args.configs or (QUICK_CONFIGS if args.quick else tuple(TRAINED))
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else None)
    plan = study_plan(names, seeds)
    shard_index, shard_count = parse_shard(args.shard)
    report = shard_count == 1
    first_seed = {}
    for name, seed in plan:
        first_seed.setdefault(name, seed)
    start = time.perf_counter()
    rows: "OrderedDict[str, dict]" = OrderedDict()
    predictor: "OrderedDict[str, Dict[int, dict]]" = OrderedDict()
    panels, datasets, calibration, train_seconds, missing = [], [], None, OrderedDict(), []
    for name, seed in plan[shard_index::shard_count]:
        cfg = study_cfg(name, seed, args.iters, out, args.opts, Path(args.config_dir))
        if args.only_trained and not os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth")):
            logger.info("%s seed %d: not trained yet, left out (--only-trained)", name, seed)
            missing.append(f"{name}/seed{seed}")
            continue
        check_run_folder(cfg)
        weights = train_or_reuse(cfg)
        dataset = cfg.DATASETS.TEST[0]
        datasets += [dataset] if dataset not in datasets else []
        needs_plots = report and seed == first_seed[name] and name in PLOTTED
        model_eval = cached_model_eval(cfg, weights)
        if model_eval is None or needs_plots:
            model = load_model(cfg, weights)
            items, data = collect_outputs(model, cfg, dataset)
            if model_eval is None:
                model_eval = evaluate_model(name, model, items, data)
                write_model_eval(cfg, weights, model_eval)
            if needs_plots:
                panels += correlation_panels(name, items, model, args.max_samples)
                if model.iou_aware:
                    calibration = iou_calibration(items, model)
                    calibration["run"] = cfg.OUTPUT_DIR
                    det = final_detections(items, model)
                    matched = det["iou_eval"] >= 0.5
                    calibration["detections_true"], calibration["detections_predicted"] = det["iou_eval"][matched], det["predicted"][matched]
        add_rows(rows, name, seed, model_eval["rows"])
        predictor.setdefault(name, OrderedDict())[seed] = model_eval["predictor"]
        train_seconds[f"{name}/seed{seed}"] = training_seconds(cfg.OUTPUT_DIR)
        logger.info("%s seed %d done (%.1f min so far)", name, seed, (time.perf_counter() - start) / 60)
    if not report:
        print(f"Shard {args.shard}: {len(train_seconds)} models trained and evaluated in {(time.perf_counter() - start) / 60:.1f} min")
        return {"shard": args.shard, "models": list(train_seconds)}
    return write_report(args, plan, rows, predictor, panels, calibration, datasets, train_seconds, missing, start)


def write_report(args, plan, rows, predictor, panels, calibration, datasets, train_seconds, missing, start) -> dict:
    out = Path(args.output_dir)
    env = environment()
    fingerprints = data_fingerprints(plan, args)
    iterations = sorted({study_cfg(n, s, args.iters, out, args.opts, Path(args.config_dir)).SOLVER.MAX_ITER for n, s in plan})
    seeds_by_model = OrderedDict()
    for name, seed in plan:
        seeds_by_model.setdefault(name, []).append(seed)
    report = [
        f"Accuracy on {', '.join(datasets)}; {'/'.join(map(str, iterations))} iterations per model; seeds: "
        + "; ".join(f"{n} {s}" for n, s in seeds_by_model.items()) + ". Mean ± sample std over seeds.",
        "",
        f"Data fingerprints (sha256 of decoded pixels and annotations): "
        + (", ".join(f"{d} {f[:16]}" for d, f in fingerprints.items()) or "none (no built-in dataset)") + ".",
        f"CPU: {env['cpu']} ({env['cpu_count']} cores); torch {env['torch']}, torchvision {env['torchvision']}, "
        f"numpy {env['numpy']}, opencv {env['opencv']}, Python {env['python']}; commit {env['commit'] or 'unknown'}.",
        "",
        results_table(rows),
    ]
    pairs = comparison_pairs(rows)
    verdict_rule = ("verdict 'wins' / 'loses' where the paired bootstrap 95 % interval of the mean difference lies above / "
                    "below zero (seeds resampled with replacement, percentile interval); mean (SE) [95 % CI]")  # fmt: skip
    if pairs["baseline"]:
        report += ["", "Paired differences from the baseline of the same data and post-processing (same seed: same data "
                   "order, flips and shared-layer initialisation); " + verdict_rule + ":", "", paired_table(rows, pairs["baseline"])]  # fmt: skip
    if pairs["gradient"]:
        report += ["", "Target gradient on against off (paper Table 4), paired by seed; " + verdict_rule + ":", "",
                   paired_table(rows, pairs["gradient"])]  # fmt: skip
    if pairs["official"]:
        report += ["", "The official post-processing (per level the top 1,000 anchors by best-class S, threshold 0.05 on S, "
                   "NMS) against the default (threshold 0.05 on p, top 1,000 (anchor, class) pairs by S per level, NMS), "
                   "same trained models; " + verdict_rule + ":", "", paired_table(rows, pairs["official"])]  # fmt: skip
    for name in ALPHA_SWEPT:
        if any(r["model"] == name and r["alpha_swept"] for r in rows.values()):
            report += ["", f"Alpha sweep of {name} under both post-processings (mean ± std over seeds):", "",
                       postprocessing_table(rows, name)]  # fmt: skip
    if predictor:
        report += ["", "The IoU predictor, per seed (matched: detections whose class matches a ground truth they overlap "
                   "with IoU_eval >= 0.5; mean (SE) [bootstrap 95 % CI over seeds]):", "", predictor_table(predictor)]  # fmt: skip
        if any(s_against_p(per_seed, "matched_pearson") for per_seed in predictor.values()):
            report += ["", "Does S correlate with IoU_eval better than the model's own p? Per-seed difference of the "
                       "correlations, verdict from its bootstrap 95 % interval:", "", s_against_p_table(predictor)]  # fmt: skip
    if panels:
        png = str(out / "correlation.png")
        plot_correlation([p for p in panels if p["plot"]], png)
        report += [
            "", f"Correlation of confidence with IoU_eval (first seed; plot: {png}); the last three columns keep "
            "the detections whose class matches a GT they overlap with IoU >= 0.5:", "", correlation_table(panels),
        ]  # fmt: skip
    if calibration is not None:
        png = str(out / "calibration.png")
        plot_calibration(calibration, png)
        report += ["", calibration_text(calibration) + f" (plot: {png})"]
    if missing:
        report += ["", f"Not trained yet, left out of every table (--only-trained): {', '.join(missing)}"]
    trained = [v for v in train_seconds.values() if v is not None]
    report += [
        "",
        f"Training time of the {len(trained)} models found (their log.txt): {sum(trained) / 60:.1f} min in all, "
        f"{statistics.mean(trained) / 60 if trained else float('nan'):.1f} min per model; "
        f"this command's time (training what was missing, evaluating everything): {(time.perf_counter() - start) / 60:.1f} min",
    ]
    text = "\n".join(report)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(str(out / "accuracy.md")) as f:
        f.write(text + "\n")
    summary = {
        "iterations": iterations, "seeds": seeds_by_model, "configs": list(seeds_by_model),
        "data_fingerprints": fingerprints, "environment": env,
        "rows": rows,
        "paired": {section: [{"row": k, "reference": r, **{m: paired_difference(rows[k], rows[r], m) for m in PAIRED_METRICS}}
                             for k, r in section_pairs] for section, section_pairs in pairs.items()},
        "predictor": predictor,
        "s_against_p": {name: {c: s_against_p(per_seed, c) for c in S_AGAINST_P} for name, per_seed in predictor.items()},
        "correlation": [{k: v for k, v in p.items() if k not in ("iou_eval", "confidence")} for p in panels],
        "calibration": calibration and {k: v for k, v in calibration.items() if not isinstance(v, np.ndarray)},
        "training_seconds": train_seconds, "missing": missing,
    }  # fmt: skip
    with atomic_write(str(out / "accuracy.json")) as f:
        json.dump(summary, f, indent=1)
    return summary


def shard_argv(args, index: int, count: int) -> List[str]:
    """The command line of shard ``index`` of ``count`` for the same study."""
    argv = ["--shard", f"{index}/{count}", "--threads", str(args.threads or 1), "--output-dir", str(args.output_dir),
            "--config-dir", str(args.config_dir), "--max-samples", str(args.max_samples)]  # fmt: skip
    if args.quick:
        argv.append("--quick")
    if args.seeds is not None:
        argv += ["--seeds", *map(str, args.seeds)]
    if args.configs:
        argv += ["--configs", *args.configs]
    if args.iters is not None:
        argv += ["--iters", str(args.iters)]
    return argv + list(args.opts)


def run_processes(args) -> dict:
    """``args.processes`` shards side by side (their output in OUTPUT_DIR/shard<i>.log), then the report."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = args.configs or (QUICK_CONFIGS if args.quick else tuple(TRAINED))
    data_fingerprints(study_plan(names, args.seeds if args.seeds is not None else ([0] if args.quick else None)), args)
    threads = str(args.threads or 1)
    children = []
    try:
        for i in range(args.processes):
            log = open(out / f"shard{i}.log", "a", encoding="utf-8")  # a rerun appends: the log of a resumed study stays whole
            command = [sys.executable, "-m", "iou_aware_retinanet.studies.accuracy", *shard_argv(args, i, args.processes)]
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            children.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            logger.info("Shard %d/%d started (pid %d), its log: %s", i, args.processes, children[-1][0].pid, log.name)
        codes = [child.wait() for child, _ in children]
    finally:
        for child, log in children:
            if child.poll() is None:  # interrupted: stop the shards too (a rerun resumes them)
                child.terminate()
                child.wait()
            log.close()
    failed = [f"{i} ({out / f'shard{i}.log'})" for i, code in enumerate(codes) if code != 0]
    if failed:
        raise RuntimeError(f"study shard(s) failed: {', '.join(failed)}; rerun the same command to continue")
    return run_study(argparse.Namespace(**{**vars(args), "only_trained": True, "shard": "0/1"}))


def correlation_panels(name: str, items, model, max_samples: int) -> List[dict]:
    """The Fig. 4 panels this model contributes: the baseline's p; the IoU-aware model's
    p (text only), S with the predicted IoU, and S with IoU_truth."""
    alpha = model.inference_config.alpha
    if not model.iou_aware:
        specs = [("baseline RetinaNet: p", 1.0, "predicted", True)]
    else:
        specs = [
            ("IoU-aware, p alone", 1.0, "predicted", False),
            (f"IoU-aware: S (predicted IoU, alpha {alpha_name(alpha)})", alpha, "predicted", True),
            ("IoU-aware: S with IoU_truth (upper bound)", alpha, "truth", True),
        ]
    panels = []
    for label, a, source, plot in specs:
        x, y = correlation_samples(items, model, a, source, max_samples)
        matched = x >= 0.5  # the class matches a GT the box overlaps with IoU >= 0.5
        panels.append(
            {"model": name, "label": label, "plot": plot, "iou_eval": x, "confidence": y, "n": len(x),
             "pearson": pearson(x, y), "spearman": spearman(x, y), "n_matched": int(matched.sum()),
             "pearson_matched": pearson(x[matched], y[matched]), "spearman_matched": spearman(x[matched], y[matched])}
        )  # fmt: skip
    return panels


# ------------------------------------------------------------------ calibration of the IoU branch


def iou_calibration(items, model, fg_threshold: float = 0.5, bins: int = 10) -> dict:
    """Predicted IoU against the true IoU of every positive anchor of the validation images.

    Positive: anchor IoU >= ``fg_threshold`` with some GT (RetinaNet's foreground
    rule); true IoU: IoU of the anchor's decoded box with that GT, the target
    the branch is trained on. Returns both arrays, the mean absolute error,
    Pearson, and a binned curve (mean true IoU per bin of predicted IoU).
    """
    predicted, true = [], []
    for item in items:
        if item.ious is None or item.gt_boxes.shape[0] == 0:
            continue
        gt = resize_boxes(item.gt_boxes, item.original_size, item.image_size)
        for deltas, anchors, ious in zip(item.box_deltas, item.anchors, item.ious):
            best, which = box_iou(anchors, gt).max(dim=1)
            fg = best >= fg_threshold
            if not fg.any():
                continue
            boxes = model.box_coder.apply_deltas(deltas[fg], anchors[fg])
            true.append(box_iou(boxes, gt).gather(1, which[fg][:, None]).squeeze(1).nan_to_num(0.0))
            predicted.append(ious[fg])
    if not predicted:
        return {"n": 0, "mae": float("nan"), "pearson": float("nan"), "bins": [], "predicted": np.zeros(0), "true": np.zeros(0)}
    p = torch.cat(predicted).double().numpy()
    t = torch.cat(true).double().numpy()
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    curve = [
        {"low": float(edges[b]), "high": float(edges[b + 1]), "n": int((index == b).sum()),
         "mean_predicted": float(p[index == b].mean()), "mean_true": float(t[index == b].mean())}
        for b in range(bins) if (index == b).any()
    ]  # fmt: skip
    return {"n": len(p), "mae": float(np.abs(p - t).mean()), "pearson": pearson(t, p), "bins": curve, "predicted": p, "true": t}


def calibration_text(cal: dict) -> str:
    text = (
        f"IoU branch calibration ({cal.get('run', '')}): {cal['n']} positive anchors of the validation images, "
        f"mean |predicted IoU - true IoU| = {cal['mae']:.3f}, Pearson {cal['pearson']:.3f}"
    )
    true, predicted = cal.get("detections_true", np.zeros(0)), cal.get("detections_predicted", np.zeros(0))
    if len(true):
        text += (f"; {len(true)} final detections matching a GT: mean |predicted IoU - IoU_eval| = "
                 f"{np.abs(predicted - true).mean():.3f}, Pearson {pearson(true, predicted):.3f}")  # fmt: skip
    return text


def plot_calibration(cal: dict, path: str) -> None:
    """Predicted vs true IoU of the positives, and loss_iou minus its floor during training."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install -e '.[analysis]'): %s not written", path)
        return
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(10, 4.2))
    keep = np.random.default_rng(0).permutation(len(cal["true"]))[:10000]
    ax.scatter(cal["true"][keep], cal["predicted"][keep], s=2, alpha=0.2, linewidths=0, label="positive anchors")
    if len(cal.get("detections_true", ())):
        ax.scatter(cal["detections_true"], cal["detections_predicted"], s=4, alpha=0.4, linewidths=0, color="C2",
                   label="final detections matching a GT (x: IoU_eval)")  # fmt: skip
    ax.plot([b["mean_true"] for b in cal["bins"]], [b["mean_predicted"] for b in cal["bins"]], "o-", color="C3",
            label="binned by predicted IoU")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax.set_xlabel("true IoU (decoded box vs its GT)")
    ax.set_ylabel("predicted IoU")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"IoU branch: MAE {cal['mae']:.3f}, Pearson {cal['pearson']:.3f}", fontsize=10)
    records = []
    metrics_file = os.path.join(cal.get("run", ""), "metrics.json")
    if os.path.isfile(metrics_file):
        with open(metrics_file, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if "loss_iou_minus_entropy" in r]
    if records:
        it = [r["iteration"] + 1 for r in records]
        ax_loss.plot(it, [r["loss_iou"] for r in records], lw=1, label="loss_iou (BCE)")
        ax_loss.plot(it, [r["loss_iou_minus_entropy"] for r in records], lw=1, label="loss_iou - entropy of its targets")
        ax_loss.legend(fontsize=8)
    ax_loss.set_xlabel("iteration")
    ax_loss.grid(alpha=0.3)
    ax_loss.set_title("the branch's progress: BCE above its floor", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_seconds(output_dir: str) -> Optional[float]:
    """Seconds the engine reported for training this run (its log.txt), None if not found."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isfile(path):
        return None
    seconds = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if "Trained " in line and " iterations in " in line:
                seconds = float(line.split(" iterations in ")[1].split(" s")[0])
    return seconds


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iou_aware_retinanet.studies.accuracy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--list", action="store_true", help="print the models the study would train, their state and the estimated cost; train nothing")
    parser.add_argument("--quick", action="store_true", help="baseline and IoU-aware only, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", help="the same seeds for every model (default: 0-4 for the baseline, "
                        "IoU-aware and target-gradient-off models, 0-2 for the others; --quick: 0)")  # fmt: skip
    parser.add_argument("--configs", nargs="+", metavar="NAME", help=f"subset of: {', '.join(TRAINED)}")
    parser.add_argument("--iters", type=int, help="training iterations per model (default: the configs' own, 4,500; "
                        "the learning-rate steps and warmup scale with it)")  # fmt: skip
    parser.add_argument("--only-trained", action="store_true",
                        help="evaluate the models already trained; train nothing (the others are listed as missing)")
    parser.add_argument("--processes", type=int, default=1, help="shards run side by side, then the report (default 1)")
    parser.add_argument("--shard", default="0/1", metavar="I/N", help="train and evaluate every N-th model from the I-th; "
                        "no report unless N is 1")  # fmt: skip
    parser.add_argument("--max-samples", type=int, default=10000, help="detections per correlation plot panel")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; 1 per process with --processes)")
    parser.add_argument("--output-dir", default="output/study/accuracy")
    parser.add_argument("--config-dir", default=str(CONFIG_DIR), help="folder of the Shapes configs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="overrides for every config")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = get_parser().parse_args(argv)
    if args.iters is not None and args.iters < 10:
        raise ValueError(f"--iters must be >= 10, got {args.iters}")
    if len(args.opts) % 2:
        raise ValueError(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    if args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.processes > 1 and args.shard != "0/1":
        raise ValueError("--processes starts its own shards: leave out --shard")
    parse_shard(args.shard)
    setup_logging()
    if args.list:
        names = args.configs or (QUICK_CONFIGS if args.quick else tuple(TRAINED))
        plan = study_plan(names, args.seeds if args.seeds is not None else ([0] if args.quick else None))
        text = plan_text(plan, args)
        print(text)
        return {"plan": plan, "text": text}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)
    if args.processes > 1:
        return run_processes(args)
    return run_study(args)


if __name__ == "__main__":
    main()
