"""Inference cost of the IoU branch on *trained* weights, with the AP each setting gives.

    python -m iou_aware_retinanet.benchmarks.trained_inference \\
        --baseline output/study/accuracy/runs/retinanet/seed0/model_final.pth \\
        --iou-aware output/study/accuracy/runs/iou_aware/seed0/model_final.pth [--images 100] [--repeats 5]

(the weights the accuracy study trains). Both models run on the same
``shapes_val`` images, batch 1, eval mode, ``no_grad``; the forward includes
post-processing. The baseline (RetinaNet, score p, threshold 0.05 on p) and
the IoU-aware model under each post-processing setting alternate image by
image (A, B, A, B, ...), ``--repeats`` passes over the images, and the ratio
B / A of the total times is printed with the AP of each setting on all of
``shapes_val`` (one evaluation per setting) and the detections per image it
returns.

Settings of the IoU-aware model (``MODEL.IOU_AWARE.THRESHOLD_ON`` /
``MODEL.RETINANET.SCORE_THRESH_TEST``): threshold 0.05 on S (``fused``), on
p (``cls``), and on S at higher values, as FCOS-style detectors retune it.
Results: docs/results.md, "Inference cost on trained weights".
"""
import argparse
import dataclasses
import logging
import time
from typing import List, Optional, Sequence

import torch

from ..studies.recipe import MAIN_CONFIG
from ..tv.cli import setup_cfg
from ..tv.data import build_test_loader
from ..tv.engine import load_model
from ..tv.evaluation import coco_evaluate, inference_on_dataset

SETTINGS = (("fused", 0.05), ("cls", 0.05), ("fused", 0.1), ("fused", 0.15), ("fused", 0.2))


def _cfg(config_file: str, iou_aware: bool, opts: Sequence[str]):
    extra = ["MODEL.IOU_AWARE.ENABLED", str(iou_aware)]
    return setup_cfg(config_file, list(opts) + extra)


def _with_setting(model, threshold_on: str, score_thresh: float):
    model.inference_config = dataclasses.replace(model.inference_config, threshold_on=threshold_on, score_thresh=score_thresh)
    return model


@torch.no_grad()
def time_alternating(model_a, model_b, images: List[torch.Tensor], repeats: int):
    total_a = total_b = 0.0
    for image in images[:3]:  # warm-up
        model_a([image]), model_b([image])
    for _ in range(repeats):
        for image in images:
            start = time.perf_counter()
            model_a([image])
            total_a += time.perf_counter() - start
            start = time.perf_counter()
            model_b([image])
            total_b += time.perf_counter() - start
    n = repeats * len(images)
    return total_a / n, total_b / n


@torch.no_grad()
def detections_per_image(model, images) -> float:
    return sum(len(model([image])[0]["scores"]) for image in images) / len(images)


def evaluate_ap(cfg, model, dataset: str) -> dict:
    loader = build_test_loader(cfg, dataset)
    logging.getLogger("iou_aware_retinanet.tv.evaluation").setLevel(logging.WARNING)
    detections = inference_on_dataset(model, loader, loader.data.category_ids)
    metrics = coco_evaluate(loader.data.coco, detections, [r.image_id for r in loader.data.records])
    return {k: metrics[k] for k in ("AP", "AP50", "AP75", "AP90")}


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="weights of the baseline RetinaNet (IOU_AWARE.ENABLED False)")
    parser.add_argument("--iou-aware", required=True, help="weights of the IoU-aware model")
    parser.add_argument("--config-file", default=str(MAIN_CONFIG))
    parser.add_argument("--images", type=int, default=100, help="validation images timed (default 100)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_cfg = _cfg(args.config_file, False, args.opts)
    aware_cfg = _cfg(args.config_file, True, args.opts)
    dataset = aware_cfg.DATASETS.TEST[0]
    baseline = load_model(base_cfg, args.baseline)
    aware = load_model(aware_cfg, args.iou_aware)
    loader = build_test_loader(aware_cfg, dataset)
    images = [im for batch, _ in zip(loader, range(args.images)) for im in batch[0]]

    base_ap = evaluate_ap(base_cfg, baseline, dataset)
    rows = []
    default = (aware_cfg.MODEL.IOU_AWARE.THRESHOLD_ON, aware_cfg.MODEL.RETINANET.SCORE_THRESH_TEST)
    for threshold_on, thresh in SETTINGS:
        _with_setting(aware, threshold_on, thresh)
        ap = evaluate_ap(aware_cfg, aware, dataset)
        a_s, b_s = time_alternating(baseline, aware, images, args.repeats)
        rows.append({
            "setting": f"threshold {thresh:g} on {'S' if threshold_on == 'fused' else 'p'}",
            "default": (threshold_on, thresh) == default,
            "baseline_ms": 1000 * a_s, "iou_aware_ms": 1000 * b_s, "ratio": b_s / a_s,
            "dets_per_image": detections_per_image(aware, images[:20]), **ap,
        })  # fmt: skip
    best_ap = max(r["AP"] for r in rows)
    print(f"{dataset}: {len(images)} images x {args.repeats} passes, batch 1, {torch.get_num_threads()} threads; "
          f"baseline RetinaNet AP {base_ap['AP']:.2f} (AP75 {base_ap['AP75']:.2f}), "
          f"{detections_per_image(baseline, images[:20]):.0f} detections per image")  # fmt: skip
    print("| IoU-aware setting | baseline ms | IoU-aware ms | ratio | AP | AP75 | AP90 | AP - best | dets / image |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mark = " (config default)" if r["default"] else ""
        print(f"| {r['setting']}{mark} | {r['baseline_ms']:.2f} | {r['iou_aware_ms']:.2f} | {r['ratio']:.3f} "
              f"| {r['AP']:.2f} | {r['AP75']:.2f} | {r['AP90']:.2f} | {r['AP'] - best_ap:+.2f} | {r['dets_per_image']:.0f} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
