"""Command line of the torchvision front-end: train, evaluate, predict.

    python -m iou_aware_retinanet train   --config-file FILE [--resume] [KEY VALUE ...]
    python -m iou_aware_retinanet eval    --config-file FILE [--weights W] [KEY VALUE ...]
    python -m iou_aware_retinanet predict --config-file FILE --input IMG [IMG ...] --output OUT
                                          [--weights W] [--min-score S] [KEY VALUE ...]
    python -m iou_aware_retinanet export  --config-file FILE [--weights W] [--format onnx|torchscript]
                                          [--output model.onnx] [KEY VALUE ...]

(also installed as ``iou-aware-retinanet``). Trailing ``KEY VALUE`` pairs
override the config, as with Detectron2's ``train_net.py``; put them after
the options. ``eval``, ``predict`` and ``export`` load ``--weights``, else
``MODEL.WEIGHTS``, else ``OUTPUT_DIR/model_final.pth``.
"""
import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

import cv2
import torch
from tqdm import tqdm

from ..config_files import load_config
from .config import get_cfg
from ..visualize import draw_detections
from .data import dataset_categories, read_images, resolve_dataset
from ..output_files import predictions_json_path, refuse_overwriting_inputs, refuse_overwriting_user_files
from ..run_folder import check_config_replaceable, save_config
from .engine import console_filter, evaluate_all, load_model, log_to_file, train
from .evaluation import atomic_write_json, detections_to_coco
from .export import FORMATS, run_export
from . import distributed as comm

logger = logging.getLogger(__name__)

__all__ = [
    "main", "get_parser", "setup_cfg", "predict", "expand_inputs", "refuse_overwriting_inputs",
    "refuse_overwriting_user_files",
]  # fmt: skip

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class _TqdmHandler(logging.Handler):
    """Console logging (to the current ``sys.stdout``) that does not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # logging's convention
            self.handleError(record)


def setup_logging() -> None:
    """INFO logs of the project on stdout (once per process)."""
    project = logging.getLogger("iou_aware_retinanet")
    if any(isinstance(h, _TqdmHandler) for h in project.handlers):
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
    handler.addFilter(console_filter())
    project.addHandler(handler)
    project.setLevel(logging.INFO)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iou_aware_retinanet",
        description="IoU-aware RetinaNet, torchvision front-end: train, evaluate, predict, export.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{train,eval,predict,export}")
    commands.required = True

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--config-file", required=True, metavar="FILE", help="YAML config")
        return sub

    train_parser = add("train", "train, then evaluate on DATASETS.TEST")
    train_parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint")
    eval_parser = add("eval", "evaluate on DATASETS.TEST (COCO AP)")
    eval_parser.add_argument("--weights", metavar="PTH", help="weights (default: MODEL.WEIGHTS, else OUTPUT_DIR/model_final.pth)")
    predict_parser = add("predict", "draw the detections on images")
    predict_parser.add_argument("--input", nargs="+", required=True, metavar="IMG", help="image files or folders of images")
    predict_parser.add_argument("--output", required=True, metavar="OUT", help="image file (one input) or folder")
    predict_parser.add_argument("--weights", metavar="PTH", help="weights (default: MODEL.WEIGHTS, else OUTPUT_DIR/model_final.pth)")
    predict_parser.add_argument("--min-score", type=float, default=0.3, metavar="S", help="keep detections with score >= S (default 0.3)")
    export_parser = add("export", "write the model, post-processing included, as ONNX or TorchScript")
    export_parser.add_argument("--weights", metavar="PTH", help="weights (default: MODEL.WEIGHTS, else OUTPUT_DIR/model_final.pth)")
    export_parser.add_argument("--format", choices=FORMATS, default="onnx", help="default onnx")
    export_parser.add_argument("--output", metavar="FILE", help="default OUTPUT_DIR/model.onnx (model.ts for torchscript)")
    for sub in (train_parser, eval_parser, predict_parser, export_parser):
        sub.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides, e.g. SOLVER.MAX_ITER 100")
    return parser


def setup_cfg(config_file: str, opts: Sequence[str] = ()):
    """``get_cfg()`` + the file + the ``KEY VALUE`` overrides, checked and frozen
    (:func:`~iou_aware_retinanet.config_files.load_config`, shared with the Detectron2 path)."""
    return load_config(get_cfg(), config_file, opts)


def resolve_weights(cfg, weights: Optional[str]) -> str:
    """``--weights``, else ``MODEL.WEIGHTS``, else ``OUTPUT_DIR/model_final.pth``."""
    for candidate in (weights, cfg.MODEL.WEIGHTS):
        if candidate:
            return candidate
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if not os.path.isfile(final):
        raise FileNotFoundError(
            f"no weights to load: neither --weights nor MODEL.WEIGHTS is given and {final} does not exist"
        )
    return final


def run_eval(cfg, weights: Optional[str]):
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: nothing to evaluate on")
    for name in cfg.DATASETS.TEST:
        resolve_dataset(cfg, name, "DATASETS.TEST")  # unknown names fail before the model is built
    saved = os.path.join(cfg.OUTPUT_DIR, "inference", "config.yaml")
    check_config_replaceable(saved, cfg.dump())  # a user's file there is never replaced
    model = load_model(cfg, resolve_weights(cfg, weights))
    if comm.is_main_process():
        save_config(cfg, saved)
    return evaluate_all(cfg, model)  # sharded over the processes of a torchrun job


def _is_single_file(inputs: Sequence[str], output: str) -> bool:
    """One input and ``output`` named like an image file (not an existing folder)."""
    return len(inputs) == 1 and os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS and not os.path.isdir(output)


def _output_paths(inputs: Sequence[str], output: str) -> List[str]:
    """One PNG per input: ``output`` itself (as .png) for a single file, else files in the ``output`` folder."""
    if _is_single_file(inputs, output):
        return [os.path.splitext(output)[0] + ".png"]
    names = [os.path.splitext(os.path.basename(p))[0] + ".png" for p in inputs]
    if len(set(names)) != len(names):  # the same base name in different folders
        names = [f"{i:04d}_{n}" for i, n in enumerate(names)]
    return [os.path.join(output, n) for n in names]


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Image files, with each folder replaced by the images in it (sorted), as Detectron2's demo takes a glob."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, f) for f in os.listdir(path)
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(path, f))
            )  # fmt: skip
            if not found:
                raise FileNotFoundError(f"--input {path}: folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        else:
            files.append(path)
    return files


def _categories(cfg) -> List[tuple]:
    """(COCO category id, name) per class index: the first test dataset's, else (index, "index")."""
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    categories = dataset_categories(cfg, cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
    if categories is not None and len(categories) != num_classes:
        logger.warning(
            "DATASETS.TEST %r has %d categories, MODEL.RETINANET.NUM_CLASSES is %d: labelling with class indices",
            cfg.DATASETS.TEST[0], len(categories), num_classes,
        )
        categories = None
    return categories or [(i, str(i)) for i in range(num_classes)]


@torch.no_grad()
def _detect(model, image: torch.Tensor, min_score: float) -> dict:
    output = model([image.to(next(model.parameters()).device)])[0]
    keep = output["scores"] >= min_score
    return {k: v[keep].cpu() for k, v in output.items()}


def predict(cfg, inputs: Sequence[str], output: str, weights: Optional[str] = None, min_score: float = 0.3) -> dict:
    """Detect on ``inputs``, keep scores >= ``min_score``, draw them into PNGs and write a
    COCO-format json of the detections (with scores) next to them; returns the json's content."""
    if not 0.0 <= min_score <= 1.0:
        raise ValueError(f"--min-score must lie in [0, 1] (scores are probabilities), got {min_score}")
    inputs = expand_inputs(inputs)
    out_paths = _output_paths(inputs, output)
    json_path = predictions_json_path(out_paths, _is_single_file(inputs, output), output)
    refuse_overwriting_inputs(inputs, out_paths + [json_path])
    refuse_overwriting_user_files(out_paths, json_path)
    images = read_images(inputs)  # fails on the first missing / unreadable file, before any work
    model = load_model(cfg, resolve_weights(cfg, weights))
    categories = _categories(cfg)
    category_ids, names = [c for c, _ in categories], [n for _, n in categories]
    os.makedirs(os.path.dirname(os.path.abspath(out_paths[0])), exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": c, "name": n} for c, n in categories]}
    for image_id, (path, image, out_path) in enumerate(zip(inputs, images, out_paths), start=1):
        dets = _detect(model, image, min_score)
        bgr = (image.permute(1, 2, 0).flip(-1) * 255).round().to(torch.uint8).numpy()
        ious = dets["pred_ious"].numpy() if "pred_ious" in dets else None
        drawn = draw_detections(
            bgr, dets["boxes"].numpy(), dets["labels"].numpy(), dets["scores"].numpy(), ious, names
        )
        if not cv2.imwrite(out_path, drawn):
            raise OSError(f"could not write {out_path}")
        coco["images"].append(
            {"id": image_id, "file_name": os.path.abspath(path), "height": int(image.shape[1]),
             "width": int(image.shape[2]), "drawn_file": os.path.abspath(out_path)}
        )  # fmt: skip
        for det in detections_to_coco(dets, image_id, category_ids):
            area = det["bbox"][2] * det["bbox"][3]
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "area": area, "iscrowd": 0, **det})
        print(f"{path}: {len(dets['scores'])} detections with score >= {min_score} -> {out_path}")
    atomic_write_json(json_path, coco)
    print(f"detections (COCO format, with scores): {json_path}")
    return coco


def main(argv: Optional[Sequence[str]] = None):
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns the command's result."""
    args = get_parser().parse_args(argv)
    setup_logging()
    cfg = setup_cfg(args.config_file, args.opts)
    if comm.env_world_size() > 1:
        if args.command not in ("train", "eval"):
            raise RuntimeError(
                f"{args.command} runs in one process; WORLD_SIZE={comm.env_world_size()} (torchrun) is for train and eval"
            )
        if int(os.environ.get("RANK", "0")) != 0:
            # Detectron2's convention: rank 0 logs; the others report warnings and errors only.
            logging.getLogger("iou_aware_retinanet").setLevel(logging.WARNING)
        comm.init_from_env(cfg.MODEL.DEVICE)
        try:
            return _run(args, cfg)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    return _run(args, cfg)


def _run(args, cfg):
    if args.command == "train":
        return train(cfg, resume=args.resume)  # logs the AP table
    if args.command == "eval":
        with log_to_file(cfg.OUTPUT_DIR):
            return run_eval(cfg, args.weights)  # logs the AP table
    if args.command == "export":
        path = run_export(cfg, resolve_weights(cfg, args.weights), args.format, args.output, args.config_file)
        print(f"exported: {path}")
        return path
    return predict(cfg, args.input, args.output, args.weights, args.min_score)


if __name__ == "__main__":
    main()
