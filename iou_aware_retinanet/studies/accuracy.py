"""Accuracy study: does the IoU branch (and do the assigners) buy AP here?

    python -m iou_aware_retinanet.studies.accuracy            # full: 8 trained configs x 3 seeds
    python -m iou_aware_retinanet.studies.accuracy --quick    # baseline vs IoU-aware, 1 seed
    python -m iou_aware_retinanet.studies.accuracy [--seeds 0 1 2] [--iters 900] \\
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

Trained models are kept under ``OUTPUT_DIR/runs/<config>/seed<k>``; a rerun
reuses every ``model_final.pth`` it finds (delete the folder to retrain).
Everything printed is also written to ``accuracy.md`` and ``accuracy.json``.
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

from ..core import postprocess_image
from ..tv.cli import setup_logging
from ..tv.config import get_cfg
from ..tv.data import build_test_loader
from ..tv.engine import load_model, train
from ..tv.evaluation import BBOX_METRICS, coco_evaluate, detections_to_coco

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


def alpha_name(alpha: Optional[float]) -> str:
    return "none (p*IoU)" if alpha is None else f"{alpha:g}"


# ------------------------------------------------------------------ training


def schedule_opts(iters: int) -> List[str]:
    """The Shapes schedule (steps at 70 % and 90 %) shortened to ``iters`` iterations."""
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", f"({int(iters * 0.7)}, {int(iters * 0.9)})",
        "SOLVER.WARMUP_ITERS", str(min(300, iters // 7)),
        "SOLVER.CHECKPOINT_PERIOD", str(iters),
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
    train(train_cfg)
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
    model.return_dense_outputs = True
    items = []
    try:
        for images, targets in loader:
            dense = model(images)
            heads = dense.head_outputs
            for i, target in enumerate(targets):
                items.append(
                    ImageOutputs(
                        image_id=int(target["image_id"]),
                        cls_probs=[x[i].sigmoid() for x in heads["cls_logits"]],
                        box_deltas=[x[i] for x in heads["bbox_regression"]],
                        ious=[x[i].sigmoid() for x in heads["iou_logits"]] if "iou_logits" in heads else None,
                        anchors=dense.anchors[i],
                        image_size=tuple(dense.image_sizes[i]),
                        original_size=tuple(dense.original_image_sizes[i]),
                        gt_boxes=target["boxes"],
                        gt_classes=target["labels"],
                    )
                )
    finally:
        model.return_dense_outputs = False
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
    return {name: metrics[name] for name in BBOX_METRICS}


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


def results_table(rows: "OrderedDict[str, dict]", reference: Optional[str]) -> str:
    """Markdown: one row per (model, scoring), mean ± sample std over seeds, and
    the difference of the means of AP and AP75 from the ``reference`` row."""
    header = ["model", "scoring", "seeds", *BBOX_METRICS]
    if reference:
        header += ["ΔAP", "ΔAP75"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    ref = rows.get(reference) if reference else None
    for row in rows.values():
        per_seed = row["per_seed"]
        cells = [row["model"], row["scoring"], str(len(per_seed))]
        cells += [mean_std([m[k] for m in per_seed]) for k in BBOX_METRICS]
        if ref is not None:
            for k in ("AP", "AP75"):
                delta = statistics.mean(m[k] for m in per_seed) - statistics.mean(m[k] for m in ref["per_seed"])
                cells.append(f"{delta:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correlation_table(panels) -> str:
    lines = ["| detections | confidence | n | Pearson | Spearman |", "|---|---|---|---|---|"]
    for p in panels:
        lines.append(f"| {p['model']} | {p['label']} | {len(p['iou_eval'])} | {p['pearson']:.3f} | {p['spearman']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the study


def add_row(rows, key, model, scoring, metrics):
    rows.setdefault(key, {"model": model, "scoring": scoring, "per_seed": []})["per_seed"].append(metrics)


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
    eval_logger = logging.getLogger("iou_aware_retinanet.tv.evaluation")
    for name in names:
        for seed_index, seed in enumerate(seeds):
            cfg = study_cfg(name, seed, args.iters, out, args.opts, Path(args.config_dir))
            weights = train_or_reuse(cfg)
            model = load_model(cfg, weights)
            dataset = cfg.DATASETS.TEST[0]
            datasets += [dataset] if dataset not in datasets else []
            items, data = collect_outputs(model, cfg, dataset)
            level = eval_logger.level
            eval_logger.setLevel(logging.WARNING)  # COCOeval's printout, dozens of times
            try:
                config_alpha = model.inference_config.alpha
                if not model.iou_aware:
                    add_row(rows, name, name, "p", evaluate_scoring(items, data, model, 1.0))
                elif name == "iou_aware":
                    for alpha in ALPHAS:
                        scoring = "p" if alpha == 1.0 else f"S, alpha {alpha_name(alpha)}"
                        add_row(rows, f"{name}/{alpha}", name, scoring, evaluate_scoring(items, data, model, alpha))
                    add_row(
                        rows, f"{name}/truth", f"{name} (upper bound)", f"S with IoU_truth, alpha {alpha_name(config_alpha)}",
                        evaluate_scoring(items, data, model, config_alpha, "truth"),
                    )  # fmt: skip
                else:
                    add_row(rows, name, name, f"S, alpha {alpha_name(config_alpha)}", evaluate_scoring(items, data, model, config_alpha))
            finally:
                eval_logger.setLevel(level)
            if seed_index == 0 and name in ("retinanet", "iou_aware"):
                panels += correlation_panels(name, items, model, args.max_samples)
            logger.info("%s seed %d done (%.1f min so far)", name, seed, (time.perf_counter() - start) / 60)

    reference = "retinanet" if "retinanet" in rows else None
    table = results_table(rows, reference)
    report = [
        f"Accuracy on {', '.join(datasets)}, "
        f"{args.iters} iterations per model, seeds {seeds}; mean ± sample std over seeds; "
        f"Δ: difference of the means from the baseline RetinaNet.",
        "",
        table,
    ]
    if panels:
        png = str(out / "correlation.png")
        plot_correlation([p for p in panels if p["plot"]], png)
        report += ["", f"Correlation of confidence with IoU_eval (seed {seeds[0]}; plot: {png}):", "", correlation_table(panels)]
    report += ["", f"Study time: {(time.perf_counter() - start) / 60:.1f} min"]
    text = "\n".join(report)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text(text + "\n", encoding="utf-8")
    summary = {
        "iters": args.iters, "seeds": list(seeds), "configs": list(names),
        "rows": rows,
        "correlation": [{k: v for k, v in p.items() if k not in ("iou_eval", "confidence")} | {"n": len(p["iou_eval"])} for p in panels],
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
        panels.append(
            {"model": name, "label": label, "plot": plot, "iou_eval": x, "confidence": y,
             "pearson": pearson(x, y), "spearman": spearman(x, y)}
        )  # fmt: skip
    return panels


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iou_aware_retinanet.studies.accuracy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="baseline and IoU-aware only, seed 0 (~10 min)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--configs", nargs="+", metavar="NAME", help=f"subset of: {', '.join(TRAINED)}")
    parser.add_argument("--iters", type=int, default=2000, help="training iterations per model (default 2000: the full study in < 2 h)")
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
