"""Run a trained IoU-aware RetinaNet (Detectron2) on images and draw the detections.

    python -m iou_aware_retinanet.demo --config-file configs/Shapes/iou_aware_retinanet.yaml \
        --input img1.png img2.png --output out_dir/ --opts MODEL.WEIGHTS output/model_final.pth

Each box is labelled with its class, its fused score S and its predicted IoU.
"""
import argparse
import glob
import logging
import os

import cv2

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor

from . import add_iou_aware_retinanet_config
from .visualize import draw_detections

logger = logging.getLogger("iou_aware_retinanet.demo")


def setup_cfg(args):
    cfg = get_cfg()
    add_iou_aware_retinanet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="IoU-aware RetinaNet demo (Detectron2)")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, help="images or glob patterns")
    parser.add_argument("--output", required=True, help="output folder (or file, for one input)")
    parser.add_argument("--min-score", type=float, default=0.3, help="draw boxes with S above this")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO)
    args = get_parser().parse_args(argv)
    cfg = setup_cfg(args)
    predictor = DefaultPredictor(cfg)
    class_names = None
    if cfg.DATASETS.TEST:
        class_names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None)

    paths = [p for pattern in args.input for p in sorted(glob.glob(os.path.expanduser(pattern)))]
    if not paths:
        raise FileNotFoundError(f"no image matches {args.input}")
    single_file = len(paths) == 1 and os.path.splitext(args.output)[1] != ""
    if not single_file:
        os.makedirs(args.output, exist_ok=True)
    for path in paths:
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
        out = args.output if single_file else os.path.join(args.output, os.path.basename(path))
        cv2.imwrite(out, drawn)
        logger.info("%s: %d detections -> %s", path, len(instances), out)


if __name__ == "__main__":
    main()
