"""COCO bbox evaluation of the torchvision front-end (pycocotools), like Detectron2's ``COCOEvaluator``.

    result = evaluate(cfg, model, "shapes_val")
    result.metrics["AP50"], result.detections[0]["pred_iou"]

Writes ``<output_dir>/coco_instances_results.json`` (COCO results: image_id,
category_id, bbox XYWH, score = the fused score S, plus ``cls_score`` p and
``pred_iou`` when the model has the IoU branch) and ``<output_dir>/metrics.json``
(AP, AP50, AP75, APs, APm, APl x 100, AP90 (precision at IoU 0.9 alone), and AP
per category as ``AP-<name>``).
``output_dir`` defaults to ``OUTPUT_DIR/inference/<dataset>``.
"""
import contextlib
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from ..atomic import atomic_write
from ..data.config_datasets import check_num_classes as _check_num_classes
from .data import build_test_loader, load_dataset
from .distributed import gather, get_rank, get_world_size

logger = logging.getLogger(__name__)

__all__ = [
    "BBOX_METRICS",
    "EvaluationResult",
    "coco_evaluate",
    "detections_to_coco",
    "evaluate",
    "format_metrics_table",
    "inference_on_dataset",
    "curve_table",
    "evaluation_points",
    "read_metrics",
    "read_metrics_file",
]

BBOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class EvaluationResult:
    dataset_name: str
    metrics: Dict[str, float]  # BBOX_METRICS and "AP-<category>", x 100
    detections: List[dict] = field(repr=False)  # COCO results, see the module doc
    output_dir: Optional[str] = None


def atomic_write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        json.dump(obj, f)


def detections_to_coco(output: Dict[str, torch.Tensor], image_id, category_ids: Sequence) -> List[dict]:
    """One image's model output (XYXY boxes, contiguous labels) as COCO result dicts."""
    boxes = output["boxes"].detach().cpu().to(torch.float64)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].tolist()
    labels = output["labels"].tolist()
    cls_scores = output["cls_scores"].tolist() if "cls_scores" in output else None
    ious = output["pred_ious"].tolist() if "pred_ious" in output else None
    results = []
    for k in range(len(scores)):
        result = {
            "image_id": _coco_id(image_id),
            "category_id": _coco_id(category_ids[labels[k]]),
            "bbox": [round(v, 4) for v in xywh[k]],
            "score": float(scores[k]),
        }
        if cls_scores is not None:
            result["cls_score"] = float(cls_scores[k])
        if ious is not None:
            result["pred_iou"] = float(ious[k])
        results.append(result)
    return results


def _coco_id(value):
    """An image or category id as the json has it: a string stays a string (some exporters write
    ``"7"``; turned into 7 it would match nothing in the ground truth), a number becomes an int."""
    return value if isinstance(value, str) else int(value)


@torch.no_grad()
def inference_on_dataset(model, loader, category_ids: Sequence[int]) -> List[dict]:
    """COCO results of ``model`` (put in eval mode, restored after) on every batch of ``loader``."""
    return [r for image_results in _inference_per_image(model, loader, category_ids) for r in image_results]


@torch.no_grad()
def _inference_per_image(model, loader, category_ids: Sequence[int]) -> List[List[dict]]:
    """COCO results of each image of ``loader``, in loader order."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    results, start, num_images = [], time.perf_counter(), 0
    try:
        for images, targets in loader:
            outputs = model([image.to(device) for image in images])
            for output, target in zip(outputs, targets):
                results.append(detections_to_coco(output, target["image_id"], category_ids))
            num_images += len(images)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    logger.info("Inference on %d images: %.1f s (%.3f s / image)", num_images, elapsed, elapsed / max(num_images, 1))
    return results


def _sharded_inference(cfg, model, dataset_name: str, data, batch_size: int) -> Optional[List[dict]]:
    """Image i on rank i % world; the per-image results gathered on rank 0 and put back in
    file order, so rank 0 holds exactly the single-process list (None on the other ranks).
    With batch_size 1 (the default) each image's output does not depend on its batch mates."""
    rank, world = get_rank(), get_world_size()
    indices = list(range(rank, len(data), world))
    loader = build_test_loader(cfg, dataset_name, batch_size=batch_size, data=data, indices=indices)
    mine = list(zip(indices, _inference_per_image(model, loader, data.category_ids)))
    gathered = gather(mine, dst=0)
    if gathered is None:
        return None
    ordered = sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])
    return [r for _, image_results in ordered for r in image_results]


def coco_evaluate(coco_gt, results: List[dict], image_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """COCOeval bbox metrics (x 100) of ``results`` against ``coco_gt``; zeros and a warning without detections."""
    class_names = [coco_gt.cats[c]["name"] for c in sorted(coco_gt.cats)]
    if not results:
        logger.warning("No detections at all: every AP is 0 (is the model trained? is the score threshold too high?)")
        metrics = {name: 0.0 for name in BBOX_METRICS + ("AP90",)}
        metrics.update({f"AP-{name}": 0.0 for name in class_names})
        return metrics
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to its input
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = list(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info("COCOeval:\n%s", stdout.getvalue().rstrip())
    metrics = {name: _percent(coco_eval.stats[i]) for i, name in enumerate(BBOX_METRICS)}
    # precision: (iou thresholds, recall, category, area range, max dets)
    precision = coco_eval.eval["precision"]
    # AP at IoU 0.9 alone (the paper's VOC table shows the largest gains at AP80 / AP90).
    at_90 = precision[int(np.argmin(np.abs(coco_eval.params.iouThrs - 0.9))), :, :, 0, -1]
    at_90 = at_90[at_90 > -1]
    metrics["AP90"] = _percent(float(np.mean(at_90)) if at_90.size else -1.0)
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        metrics[f"AP-{coco_gt.cats[cat_id]['name']}"] = _percent(float(np.mean(p)) if p.size else -1.0)
    return metrics


def _percent(value: float) -> float:
    # COCOeval reports -1 when there is no ground truth (e.g. no small objects): NaN, as Detectron2.
    return float(value) * 100 if value >= 0 else float("nan")


def format_metrics_table(metrics: Dict[str, float], dataset_name: str = "") -> str:
    """The AP table Detectron2's COCOEvaluator logs, plus per-category AP."""
    def row(names):
        cells = [f"{metrics[n]:.3f}" if not math.isnan(metrics[n]) else "nan" for n in names]
        widths = [max(len(n), len(c)) for n, c in zip(names, cells)]
        head = "| " + " | ".join(n.center(w) for n, w in zip(names, widths)) + " |"
        rule = "|" + "|".join(":" + "-" * w + ":" for w in widths) + "|"
        body = "| " + " | ".join(c.center(w) for c, w in zip(cells, widths)) + " |"
        return "\n".join([head, rule, body])

    title = f"Evaluation results for bbox{f' on {dataset_name}' if dataset_name else ''}:"
    per_category = [n for n in metrics if n.startswith("AP-")]
    text = f"{title}\n{row(BBOX_METRICS)}"
    if per_category:
        text += f"\nPer-category bbox AP:\n{row(per_category)}"
    return text


def safe_folder_name(dataset_name: str) -> str:
    """``dataset_name`` if it can name a folder inside OUTPUT_DIR/inference, else a ValueError.

    Dataset names become folder names: ``..``, a path separator or an absolute
    path would write outside OUTPUT_DIR or over the run's own files.
    """
    bad = (
        not dataset_name or dataset_name in (".", "..") or os.sep in dataset_name
        or (os.altsep and os.altsep in dataset_name) or "\x00" in dataset_name
    )  # fmt: skip
    if bad:
        raise ValueError(
            f"dataset name {dataset_name!r} cannot name its results folder OUTPUT_DIR/inference/<name>: "
            "use a name without '/', and not '.' or '..'"
        )
    return dataset_name


def check_num_classes(cfg, dataset_name: str, category_ids: Sequence) -> None:
    """A model with more classes than the dataset has categories cannot be evaluated on it."""
    _check_num_classes(cfg.MODEL.RETINANET.NUM_CLASSES, len(category_ids), f"dataset {dataset_name!r}", is_test=True)


def evaluate(
    cfg, model, dataset_name: str, output_dir: Optional[str] = None, batch_size: int = 1
) -> Optional[EvaluationResult]:
    """Run ``model`` on ``dataset_name``, write the results and metrics json files, log the AP table.

    With several processes (torchrun) every rank must call it: the images are
    sharded over the ranks, rank 0 evaluates and writes, the others return None."""
    if output_dir is None:
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference", safe_folder_name(dataset_name))
    if get_world_size() > 1:
        data = load_dataset(cfg, dataset_name, "DATASETS.TEST")
        check_num_classes(cfg, dataset_name, data.category_ids)
        logger.info("Evaluating %s (%d images, on %d processes)", dataset_name, len(data), get_world_size())
        detections = _sharded_inference(cfg, model, dataset_name, data, batch_size)
        if detections is None:
            return None
    else:
        loader = build_test_loader(cfg, dataset_name, batch_size=batch_size)
        data = loader.data
        check_num_classes(cfg, dataset_name, data.category_ids)
        logger.info("Evaluating %s (%d images)", dataset_name, len(data))
        detections = inference_on_dataset(model, loader, data.category_ids)
    atomic_write_json(os.path.join(output_dir, "coco_instances_results.json"), detections)
    metrics = coco_evaluate(data.coco, detections, [r.image_id for r in data.records])
    atomic_write_json(os.path.join(output_dir, "metrics.json"), metrics)
    logger.info("%s", format_metrics_table(metrics, dataset_name))
    return EvaluationResult(dataset_name, metrics, detections, output_dir)


# --------------------------------------------------------------------------- learning curve

CURVE_METRICS = ("AP", "AP50", "AP75")


def read_metrics(output_dir: str) -> List[Dict]:
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {output_dir} the OUTPUT_DIR of a training run?")
    return read_metrics_file(path)


def read_metrics_file(path: str) -> List[Dict]:
    """The records of a ``metrics.json`` (one json object per line). A last line cut short (a
    kill during its append) is dropped with a warning; any other unreadable line is an error
    naming the file and the line."""
    with open(path, "r", encoding="utf-8") as f:
        lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if position == len(lines) - 1 and not line.endswith("\n"):
                logger.warning("%s: dropped its last line %d, cut short (an interrupted write): %r", path, number, line[:80])
                break
            raise ValueError(f"{path}, line {number}: not a json record ({e}): {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: not a json object: {line[:80]!r}")
        records.append(record)
    return records


def evaluation_points(records: Sequence[Dict], dataset: Optional[str] = None) -> List[Dict]:
    """One dict per evaluation: iteration and the bbox metrics of ``dataset`` (default: the only / first one)."""
    points = []
    for record in records:
        keys = [k for k in record if k.endswith("bbox/AP")]
        if not keys:
            continue
        key = next((k for k in keys if dataset and k.startswith(dataset + "/")), sorted(keys)[0])
        prefix = key[: -len("AP")]
        points.append({"iteration": record["iteration"] + 1, **{m: record[prefix + m] for m in CURVE_METRICS}})
    return points


def curve_table(points: Sequence[Dict]) -> str:
    lines = ["| iteration | " + " | ".join(CURVE_METRICS) + " |", "|---:|" + "---:|" * len(CURVE_METRICS)]
    for p in points:
        lines.append(f"| {p['iteration']} | " + " | ".join(f"{p[m]:.1f}" for m in CURVE_METRICS) + " |")
    return "\n".join(lines)
