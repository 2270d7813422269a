"""Run a trained IoU-aware RetinaNet (Detectron2) on images and draw the detections.

Configs are read with a safe YAML loader, ``.pth`` weights with
``torch.load(weights_only=True)`` and refused unless every weight of the
model is in them, ``.pkl`` weights need ``--allow-pickle``, and an output that
would overwrite an input image, or a file no earlier run of the demo wrote, is
refused before anything is written. Besides the drawn images it writes the
detections (COCO format, with scores) to ``predictions.json`` in the output
folder (``<name>.json`` beside a single output image), which also records what
it wrote.

    python -m iou_aware_retinanet.d2.demo --config-file configs/Shapes/iou_aware_retinanet.yaml \
        --input img1.png img2.png --output out_dir/ --opts MODEL.WEIGHTS output/model_final.pth

Each box is labelled with its class, its fused score S and its predicted IoU.
"""
import argparse
import glob
import json
import logging
import os

import cv2

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.evaluation.coco_evaluation import instances_to_coco_json

from ..atomic import atomic_write
from ..output_files import predictions_json_path, refuse_overwriting_inputs, refuse_overwriting_user_files
from ..visualize import draw_detections
from .entry import CheckedCheckpointer, check_eval_weights, check_weights_file, setup_project_cfg

logger = logging.getLogger("iou_aware_retinanet.d2.demo")


def setup_cfg(args):
    cfg = setup_project_cfg(args.config_file, args.opts)
    check_weights_file(cfg.MODEL.WEIGHTS, allow_pickle=args.allow_pickle)
    check_eval_weights(cfg)  # no drawing from a randomly initialised model
    return cfg


def build_predictor(cfg, allow_pickle: bool = False) -> DefaultPredictor:
    """Detectron2's ``DefaultPredictor``, its weights loaded by :class:`CheckedCheckpointer`
    (no code from the file; every weight of the model from it) instead of its own checkpointer."""
    weights = cfg.MODEL.WEIGHTS
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""  # DefaultPredictor's own loading: skipped
    predictor = DefaultPredictor(cfg)
    CheckedCheckpointer(predictor.model, require_all=True, allow_pickle=allow_pickle).load(weights, checkpointables=[])
    return predictor


def get_parser():
    parser = argparse.ArgumentParser(description="IoU-aware RetinaNet demo (Detectron2)")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, help="images or glob patterns")
    parser.add_argument("--output", required=True, help="output folder (or file, for one input)")
    parser.add_argument("--min-score", type=float, default=0.3, help="draw boxes with S above this")
    parser.add_argument("--allow-pickle", action="store_true", help="allow .pkl MODEL.WEIGHTS (pickle can run code)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO)
    args = get_parser().parse_args(argv)
    cfg = setup_cfg(args)
    paths = [p for pattern in args.input for p in sorted(glob.glob(os.path.expanduser(pattern)))]
    if not paths:
        raise FileNotFoundError(f"no image matches {args.input}")
    single_file = len(paths) == 1 and os.path.splitext(args.output)[1] != "" and not os.path.isdir(args.output)
    outputs = [args.output if single_file else os.path.join(args.output, os.path.basename(p)) for p in paths]
    json_path = predictions_json_path(outputs, single_file, args.output)
    refuse_overwriting_inputs(paths, outputs + [json_path])
    refuse_overwriting_user_files(outputs, json_path)  # only what an earlier run wrote is replaced
    if not single_file:
        os.makedirs(args.output, exist_ok=True)
    predictor = build_predictor(cfg, args.allow_pickle)
    class_names, to_dataset_id = None, None
    if cfg.DATASETS.TEST:
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        class_names = metadata.get("thing_classes", None)
        mapping = metadata.get("thing_dataset_id_to_contiguous_id", None)
        to_dataset_id = {v: k for k, v in mapping.items()} if mapping else None
    record = {"images": [], "annotations": []}
    for image_id, (path, out) in enumerate(zip(paths, outputs), start=1):
        image = cv2.imread(path, cv2.IMREAD_COLOR)  # BGR, Detectron2's default INPUT.FORMAT
        if image is None:
            raise ValueError(f"cannot read image {path}")
        if cfg.INPUT.FORMAT == "RGB":
            image = image[:, :, ::-1]
        instances = predictor(image)["instances"].to("cpu")
        ious = instances.pred_ious.numpy() if instances.has("pred_ious") else None
        drawn = draw_detections(
            image if cfg.INPUT.FORMAT == "BGR" else image[:, :, ::-1],
            instances.pred_boxes.tensor.numpy(),
            instances.pred_classes.numpy(),
            instances.scores.numpy(),
            ious,
            class_names,
            min_score=args.min_score,
        )
        if not cv2.imwrite(out, drawn):
            raise OSError(f"could not write {out}")
        logger.info("%s: %d detections -> %s", path, len(instances), out)
        record["images"].append({"id": image_id, "file_name": os.path.abspath(path), "height": image.shape[0],
                                 "width": image.shape[1], "drawn_file": os.path.abspath(out)})  # fmt: skip
        kept = instances[instances.scores >= args.min_score]  # what is drawn
        ious = kept.pred_ious.tolist() if kept.has("pred_ious") else None
        for k, det in enumerate(instances_to_coco_json(kept, image_id)):
            if to_dataset_id is not None:
                det["category_id"] = to_dataset_id[det["category_id"]]
            if ious is not None:
                det["pred_iou"] = ious[k]
            area = det["bbox"][2] * det["bbox"][3]
            record["annotations"].append({"id": len(record["annotations"]) + 1, "area": area, "iscrowd": 0, **det})
    record["categories"] = [
        {"id": to_dataset_id.get(i, i) if to_dataset_id else i, "name": name} for i, name in enumerate(class_names or [])
    ]
    with atomic_write(json_path) as f:
        json.dump(record, f)
    logger.info("detections (COCO format, with scores) and what this run wrote: %s", json_path)


if __name__ == "__main__":
    main()
