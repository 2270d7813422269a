"""Accuracy study: does the IoU branch (and do the assigners) buy AP here?

    python -m iou_aware_retinanet.studies.accuracy            # full: 8 trained configs x 3 seeds
    python -m iou_aware_retinanet.studies.accuracy --quick    # baseline vs IoU-aware, 1 seed
    python -m iou_aware_retinanet.studies.accuracy [--seeds 0 1 2] [--iters 2000] [--only-trained] \\
        [--configs retinanet iou_aware ...] [--threads N] [--output-dir output/study/accuracy] [KEY VALUE ...]

On the torchvision front-end (no Detectron2 needed), from the Shapes configs
of ``configs/Shapes`` with a shortened schedule (``--iters``; the learning
rate steps at 70 % and 90 %). Trailing ``KEY VALUE`` pairs override every
config, e.g. ``DATASETS.TRAIN`` / ``DATASETS.TEST`` / ``DATASETS.COCO_INSTANCES``
to run the study on your own COCO-format dataset.

Per trained model the validation set goes through the network once
(:class:`~iou_aware_retinanet.tv.model.DenseOutputs`); every scoring is then
the core's ``postprocess_image`` on those outputs, so alpha (inference only)
is swept on one trained model, and the upper bound replaces the predicted IoU
of every candidate by IoU_truth, the IoU of its decoded box with the nearest
ground-truth box of any class (paper Table 6).

The correlation analysis (paper Fig. 4) takes the detections of the first
seed: IoU_eval (IoU with the nearest GT of the same class) against the
confidence, for the baseline's p, the IoU-aware S with the predicted IoU, and
S with IoU_truth; Pearson and Spearman are printed and a scatter plot (one
panel per scoring) is written to ``correlation.png`` (needs matplotlib: the
``analysis`` extra).

Differences to the baseline RetinaNet are paired by seed (same data order,
flips and shared-layer initialisation): per-seed deltas of AP, AP75 and AP90
(COCOeval precision at IoU 0.9), their mean ± std (SE), and a verdict: *wins*
or *loses* only where |mean| > 2 SE. The correlation panels are repeated for
the detections whose class matches a GT they overlap at IoU >= 0.5. The IoU
branch's calibration (predicted vs true IoU of every positive anchor of the
validation images) and ``loss_iou`` minus the entropy of its targets during
training (``loss_iou_minus_entropy`` in metrics.json) go to ``calibration.png``.

Trained models are kept under ``OUTPUT_DIR/runs/<config>/seed<k>``; a rerun
reuses every ``model_final.pth`` it finds (delete the folder to retrain) and
resumes a half-trained model from its last checkpoint; each model's scorings
are kept in its ``study_eval.json`` (keyed by its weights file), so a rerun
evaluates only new models and the two whose outputs the plots need;
``--only-trained`` evaluates what is there and trains nothing. Everything printed is also
written to ``accuracy.md`` and ``accuracy.json``.
"""
import argparse
import json
import logging
import math
import os
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou

from ..atomic import atomic_write
from ..core import image_predictions, postprocess_image
from ..tv.cli import setup_logging
from ..tv.config import get_cfg
from ..tv.data import build_test_loader
from ..tv.engine import load_model, train
from ..tv.evaluation import coco_evaluate, detections_to_coco

logger = logging.getLogger("iou_aware_retinanet.studies.accuracy")  # not __main__ under -m

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "Shapes"
# name -> config file in configs/Shapes. Every one but "retinanet" has the IoU branch.
TRAINED = OrderedDict(
    [
        ("retinanet", "retinanet.yaml"),
        ("iou_aware", "iou_aware_retinanet.yaml"),
        ("target_gradient_off", "target_gradient_off.yaml"),
        ("topk", "topk.yaml"),
        ("atss", "atss.yaml"),
        ("noisy_anchor", "noisy_anchor.yaml"),
        ("hambox", "hambox.yaml"),
        ("task_aligned", "task_aligned.yaml"),
    ]
)
QUICK_CONFIGS = ("retinanet", "iou_aware")
ALPHAS = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0)  # None: p * IoU
# AP90: COCOeval precision at IoU 0.9 alone (the paper's VOC table gains most at AP80 / AP90).
STUDY_METRICS = ("AP", "AP50", "AP75", "AP90", "APs", "APm", "APl")
PAIRED_METRICS = ("AP", "AP75", "AP90")


def alpha_name(alpha: Optional[float]) -> str:
    return "none (p*IoU)" if alpha is None else f"{alpha:g}"


# ------------------------------------------------------------------ training


def schedule_opts(iters: int) -> List[str]:
    """The Shapes schedule (steps at 70 % and 90 %) shortened to ``iters`` iterations."""
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", f"({int(iters * 0.7)}, {int(iters * 0.9)})",
        "SOLVER.WARMUP_ITERS", str(min(300, iters // 7)),
        "SOLVER.CHECKPOINT_PERIOD", str(min(1000, iters)),  # a killed study resumes inside a model too
        "TEST.EVAL_PERIOD", "0",
    ]  # fmt: skip


def study_cfg(name: str, seed: int, iters: int, output_dir: Path, opts: Sequence[str], config_dir: Path):
    path = config_dir / TRAINED[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the study from a clone of the repository or pass --config-dir")
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(schedule_opts(iters) + list(opts))
    cfg.merge_from_list(["SEED", seed, "OUTPUT_DIR", str(output_dir / "runs" / name / f"seed{seed}"), "TEST.EVAL_PERIOD", 0])
    cfg.freeze()
    return cfg


def train_or_reuse(cfg) -> str:
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


def detect(item: ImageOutputs, model, alpha, iou_source: str = "predicted") -> Dict[str, Tensor]:
    """Detections of one image (original coordinates) under a scoring.

    ``iou_source``: "predicted" (the branch's IoU; plain p without the branch)
    or "truth" (IoU_truth, the upper bound)."""
    if iou_source == "truth":
        ious = truth_ious(item, model.box_coder)
    else:
        ious = item.ious
    config = replace(model.inference_config, alpha=alpha)
    det = postprocess_image(
        cls_probs=item.cls_probs, box_deltas=item.box_deltas, ious=ious, anchors=item.anchors,
        box_coder=model.box_coder, image_size=item.image_size, config=config,
    )  # fmt: skip
    return {
        "boxes": resize_boxes(det.boxes, item.image_size, item.original_size),
        "scores": det.scores,
        "labels": det.classes,
        "cls_scores": det.cls_scores,
    }


def evaluate_scoring(items, data, model, alpha, iou_source="predicted") -> Dict[str, float]:
    results = []
    for item in items:
        results.extend(detections_to_coco(detect(item, model, alpha, iou_source), item.image_id, data.category_ids))
    metrics = coco_evaluate(data.coco, results, [item.image_id for item in items])
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


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rank(x), rank(y))


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


# ------------------------------------------------------------------ report


def mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "nan"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def results_table(rows: "OrderedDict[str, dict]") -> str:
    """Markdown: one row per (model, scoring), mean ± sample std over seeds."""
    header = ["model", "scoring", "seeds", *STUDY_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows.values():
        per_seed = list(row["per_seed"].values())
        cells = [row["model"], row["scoring"], str(len(per_seed))]
        cells += [mean_std([m.get(k, float("nan")) for m in per_seed]) for k in STUDY_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_difference(row: dict, reference: dict, metric: str) -> Optional[dict]:
    """Per-seed differences ``row - reference`` on the seeds both have, and the verdict.

    The same seed gives both models the same data order, flips and
    initialisation of the shared layers, so the per-seed difference removes
    most of the seed-to-seed spread. A row *wins* (or *loses*) only where
    |mean| > 2 x its standard error (std / sqrt(n)), with n >= 2.
    """
    seeds = [s for s in row["per_seed"] if s in reference["per_seed"]]
    deltas = [row["per_seed"][s][metric] - reference["per_seed"][s][metric] for s in seeds]
    deltas = [d for d in deltas if not math.isnan(d)]
    if not deltas:
        return None
    mean = statistics.mean(deltas)
    std = statistics.stdev(deltas) if len(deltas) > 1 else float("nan")
    se = std / math.sqrt(len(deltas)) if len(deltas) > 1 else float("nan")
    if len(deltas) < 2 or math.isnan(se):
        verdict = "n/a (1 seed)"
    elif se == 0.0:
        verdict = "wins" if mean > 0 else ("loses" if mean < 0 else "no difference")
    elif mean > 2 * se:
        verdict = "wins"
    elif mean < -2 * se:
        verdict = "loses"
    else:
        verdict = "no significant difference"
    return {"deltas": deltas, "mean": mean, "std": std, "se": se, "n": len(deltas), "verdict": verdict}


def paired_table(rows: "OrderedDict[str, dict]", reference_key: str) -> str:
    """Markdown: per-seed differences from the reference row, mean ± std (SE), and the verdict."""
    reference = rows[reference_key]
    header = ["model", "scoring"]
    for metric in PAIRED_METRICS:
        header += [f"Δ{metric} per seed", f"Δ{metric} mean ± std (SE)", f"{metric} verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key, row in rows.items():
        if key == reference_key:
            continue
        cells = [row["model"], row["scoring"]]
        for metric in PAIRED_METRICS:
            d = paired_difference(row, reference, metric)
            if d is None:
                cells += ["-", "-", "-"]
                continue
            cells.append(", ".join(f"{x:+.2f}" for x in d["deltas"]))
            cells.append(f"{d['mean']:+.2f} ± {d['std']:.2f} ({d['se']:.2f})" if d["n"] > 1 else f"{d['mean']:+.2f}")
            cells.append(d["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
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


# ------------------------------------------------------------------ the study


def score_model(name: str, model, items, data) -> List[list]:
    """Every scoring of one trained model: [row key, model, scoring, metrics]."""
    eval_logger = logging.getLogger("iou_aware_retinanet.tv.evaluation")
    level = eval_logger.level
    eval_logger.setLevel(logging.WARNING)  # COCOeval's printout, dozens of times
    try:
        config_alpha = model.inference_config.alpha
        if not model.iou_aware:
            return [[name, name, "p", evaluate_scoring(items, data, model, 1.0)]]
        if name != "iou_aware":
            return [[name, name, f"S, alpha {alpha_name(config_alpha)}", evaluate_scoring(items, data, model, config_alpha)]]
        out = [
            [f"{name}/{alpha}", name, "p" if alpha == 1.0 else f"S, alpha {alpha_name(alpha)}",
             evaluate_scoring(items, data, model, alpha)]
            for alpha in ALPHAS
        ]  # fmt: skip
        out.append([
            f"{name}/truth", f"{name} (upper bound)", f"S with IoU_truth, alpha {alpha_name(config_alpha)}",
            evaluate_scoring(items, data, model, config_alpha, "truth"),
        ])  # fmt: skip
        return out
    finally:
        eval_logger.setLevel(level)


# Each model is evaluated once: its rows are kept next to its weights, keyed by the
# weights file (size, mtime) and what the rows hold, so a rerun only aggregates.
EVAL_CACHE = "study_eval.json"


def _cache_key(weights: str, dataset: str) -> dict:
    stat = os.stat(weights)
    return {
        "weights_bytes": stat.st_size, "weights_mtime_ns": stat.st_mtime_ns, "dataset": dataset,
        "alphas": [alpha_name(a) for a in ALPHAS], "metrics": list(STUDY_METRICS),
    }  # fmt: skip


def cached_model_rows(cfg, weights: str) -> Optional[List[list]]:
    path = os.path.join(cfg.OUTPUT_DIR, EVAL_CACHE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        cache = json.load(f)
    if cache.get("key") != _cache_key(weights, cfg.DATASETS.TEST[0]):
        return None  # retrained, or another dataset / scoring list: evaluate again
    logger.info("Reusing the evaluation of %s (%s)", weights, EVAL_CACHE)
    return cache["rows"]


def write_model_rows(cfg, weights: str, model_rows: List[list]) -> None:
    path = os.path.join(cfg.OUTPUT_DIR, EVAL_CACHE)
    with atomic_write(path) as f:
        json.dump({"key": _cache_key(weights, cfg.DATASETS.TEST[0]), "rows": model_rows}, f, indent=1)


def add_row(rows, key, model, scoring, seed, metrics):
    rows.setdefault(key, {"model": model, "scoring": scoring, "per_seed": {}})["per_seed"][seed] = metrics


def run_study(args) -> dict:
    out = Path(args.output_dir)
    names = args.configs or (QUICK_CONFIGS if args.quick else tuple(TRAINED))
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    unknown = [n for n in names if n not in TRAINED]
    if unknown:
        raise ValueError(f"unknown --configs {unknown}; valid choices: {', '.join(TRAINED)}")
    start = time.perf_counter()
    rows: "OrderedDict[str, dict]" = OrderedDict()
    panels, datasets = [], []
    calibration, train_seconds, missing = None, OrderedDict(), []
    for name in names:
        for seed_index, seed in enumerate(seeds):
            cfg = study_cfg(name, seed, args.iters, out, args.opts, Path(args.config_dir))
            if args.only_trained and not os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth")):
                logger.info("%s seed %d: not trained yet, left out (--only-trained)", name, seed)
                missing.append(f"{name}/seed{seed}")
                continue
            weights = train_or_reuse(cfg)
            dataset = cfg.DATASETS.TEST[0]
            datasets += [dataset] if dataset not in datasets else []
            needs_outputs = seed_index == 0 and name in ("retinanet", "iou_aware")  # the plots
            model_rows = None if needs_outputs else cached_model_rows(cfg, weights)
            if model_rows is None:
                model = load_model(cfg, weights)
                items, data = collect_outputs(model, cfg, dataset)
                model_rows = score_model(name, model, items, data)
                write_model_rows(cfg, weights, model_rows)
                if needs_outputs:
                    panels += correlation_panels(name, items, model, args.max_samples)
                if seed_index == 0 and name == "iou_aware":
                    calibration = iou_calibration(items, model)
                    calibration["run"] = cfg.OUTPUT_DIR
            for key, model_name, scoring, metrics in model_rows:
                add_row(rows, key, model_name, scoring, seed, metrics)
            train_seconds[f"{name}/seed{seed}"] = training_seconds(cfg.OUTPUT_DIR)
            logger.info("%s seed %d done (%.1f min so far)", name, seed, (time.perf_counter() - start) / 60)

    report = [
        f"Accuracy on {', '.join(datasets)}, {args.iters} iterations per model, seeds {seeds}; "
        "mean ± sample std over seeds.",
        "",
        results_table(rows),
    ]
    if "retinanet" in rows:
        report += [
            "",
            "Paired differences from the baseline RetinaNet (same seed: same data order, flips and shared-layer "
            "initialisation); verdict 'wins' / 'loses' where |mean| > 2 x SE, SE = std / sqrt(n):",
            "",
            paired_table(rows, "retinanet"),
        ]
    if panels:
        png = str(out / "correlation.png")
        plot_correlation([p for p in panels if p["plot"]], png)
        report += [
            "", f"Correlation of confidence with IoU_eval (seed {seeds[0]}; plot: {png}); the last three columns keep "
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
    (out / "accuracy.md").write_text(text + "\n", encoding="utf-8")
    summary = {
        "iters": args.iters, "seeds": list(seeds), "configs": list(names),
        "rows": rows,
        "correlation": [{k: v for k, v in p.items() if k not in ("iou_eval", "confidence")} for p in panels],
        "calibration": calibration and {k: v for k, v in calibration.items() if k not in ("predicted", "true")},
        "training_seconds": train_seconds, "missing": missing,
    }  # fmt: skip
    (out / "accuracy.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


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
    return (
        f"IoU branch calibration ({cal.get('run', '')}): {cal['n']} positive anchors of the validation images, "
        f"mean |predicted IoU - true IoU| = {cal['mae']:.3f}, Pearson {cal['pearson']:.3f}"
    )


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
    parser.add_argument("--quick", action="store_true", help="baseline and IoU-aware only, seed 0 (~10 min)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--configs", nargs="+", metavar="NAME", help=f"subset of: {', '.join(TRAINED)}")
    parser.add_argument("--iters", type=int, default=2000, help="training iterations per model (default 2000: the full study in < 2 h with two processes)")
    parser.add_argument("--only-trained", action="store_true",
                        help="evaluate the models already trained; train nothing (the others are listed as missing)")
    parser.add_argument("--max-samples", type=int, default=10000, help="detections per correlation panel")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--output-dir", default="output/study/accuracy")
    parser.add_argument("--config-dir", default=str(CONFIG_DIR), help="folder of the Shapes configs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="overrides for every config")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = get_parser().parse_args(argv)
    if args.iters < 10:
        raise ValueError(f"--iters must be >= 10, got {args.iters}")
    if len(args.opts) % 2:
        raise ValueError(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)
    return run_study(args)


if __name__ == "__main__":
    main()
