"""Export the Detectron2 front-end's model, as Detectron2's ``tools/deploy/export_model.py`` does.

    python -m iou_aware_retinanet.d2.export --config-file configs/Shapes/iou_aware_retinanet.yaml \\
        --export-method tracing --format onnx --output exported/ MODEL.WEIGHTS output/model_final.pth

``--export-method scripting`` (``--format torchscript``): ``torch.jit.script``
through Detectron2's ``scripting_with_instances``. The scripted model takes
what the eager model takes, ``List[Dict[str, Tensor]]`` with an ``"image"``
(3, H, W) in ``INPUT.FORMAT`` channel order, 0-255, and returns one scripted
``Instances`` per image, in the coordinates of the input image
(:func:`scripted_to_instances` turns it back into ``Instances``;
Detectron2's ``detector_postprocess`` rescales it, as for its own scripted
RetinaNet).

``--export-method tracing`` (``--format torchscript`` or ``onnx``):
Detectron2's ``TracingAdapter`` around ``model(inputs)``, traced on one image
(``--sample-image``, resized as ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``
say, else a random image of the test size). The trace takes one image tensor
(3, H, W) of any size and returns the output ``Instances``' fields as a flat
tuple, in the order of :func:`traced_output_names` (field names sorted, then the
image size), with post-processing (threshold, per-level top-k, fusion, NMS)
inside.

Output fields: ``pred_boxes`` (XYXY, input pixels), ``scores`` (the fused
S = p^alpha * IoU^(1 - alpha)), ``pred_classes``; with the IoU branch also
``cls_scores`` (p) and ``pred_ious`` (the predicted IoU). The files are
``OUTPUT/model.ts`` or ``OUTPUT/model.onnx``; an existing file is never
replaced, nor the weights file.
"""
import argparse
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from ..atomic import atomic_write
from ..core.export import example_image, onnx_export
from .entry import CheckedCheckpointer, check_weights_file, setup_project_cfg

__all__ = [
    "EXPORT_METHODS", "FORMATS", "output_fields", "script_model", "scripted_to_instances", "trace_model",
    "traced_output_names", "sample_inputs", "export_model", "output_path", "main",
]  # fmt: skip

logger = logging.getLogger(__name__)

EXPORT_METHODS = ("scripting", "tracing")
FORMATS = ("torchscript", "onnx")
FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def output_fields(model: nn.Module) -> Dict[str, type]:
    """The fields of the model's output ``Instances`` and their types (what
    ``scripting_with_instances`` needs to know)."""
    fields = {"pred_boxes": Boxes, "scores": Tensor, "pred_classes": Tensor}
    if model.iou_aware:
        fields.update(cls_scores=Tensor, pred_ious=Tensor)
    return fields


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the eval-mode model (Detectron2's scripting path)."""
    return scripting_with_instances(model.eval(), output_fields(model))


def scripted_to_instances(scripted, fields: Dict[str, type]) -> Instances:
    """A scripted model's output for one image as Detectron2's ``Instances``."""
    return Instances(scripted.image_size, **{name: getattr(scripted, name) for name in fields})


def trace_model(model: nn.Module, inputs: List[Dict[str, Tensor]]) -> Tuple[torch.jit.ScriptModule, TracingAdapter]:
    """The trace of ``model(inputs)`` through Detectron2's ``TracingAdapter``, and the
    adapter (its ``outputs_schema`` rebuilds ``[{"instances": Instances}]`` from the
    trace's flat outputs). ``inputs``: one image, ``[{"image": (3, H, W) tensor}]``."""
    if len(inputs) != 1 or set(inputs[0]) != {"image"}:
        raise ValueError("trace_model takes one image: [{'image': (3, H, W) tensor}]")
    # The adapter is a new module: eval() so an exporter restoring its mode leaves the model in eval.
    adapter = TracingAdapter(model.eval(), inputs).eval()
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter


def traced_output_names(model: nn.Module) -> List[str]:
    """Names of the trace's outputs, in order: the ``Instances`` fields sorted by
    name (how Detectron2's ``TracingAdapter`` flattens them), then the image size."""
    return sorted(output_fields(model)) + ["image_size"]


def sample_inputs(cfg, sample_image: Optional[str] = None) -> List[Dict[str, Tensor]]:
    """One model input for tracing: ``sample_image`` read in ``INPUT.FORMAT`` and resized
    for testing as ``DefaultPredictor`` does, else a random image of the test size."""
    if sample_image is None:
        size = int(cfg.INPUT.MIN_SIZE_TEST) or 512
        return [{"image": example_image(size) * 255.0}]
    if not os.path.isfile(sample_image):
        raise FileNotFoundError(f"--sample-image {sample_image}: file not found")
    image = read_image(sample_image, format=cfg.INPUT.FORMAT)
    if cfg.INPUT.MIN_SIZE_TEST > 0:
        resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        image = resize.get_transform(image).apply_image(image)
    return [{"image": torch.as_tensor(image.astype("float32").transpose(2, 0, 1).copy())}]


def export_model(
    model: nn.Module, path: str, method: str = "tracing", fmt: str = "torchscript",
    inputs: Optional[List[Dict[str, Tensor]]] = None,
) -> str:  # fmt: skip
    """Write ``model`` (eval mode, weights loaded) to ``path``; ``inputs`` is the
    trace's example (tracing only). Returns ``path``."""
    _check_method_and_format(method, fmt)
    model.eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if method == "scripting":
        exported = script_model(model)
        with atomic_write(path, "wb") as f:
            torch.jit.save(exported, f)
        logger.info("Exported %s (scripting, torchscript)", path)
        return path
    if inputs is None:
        raise ValueError("tracing needs an example input: inputs=[{'image': (3, H, W) tensor}]")
    traced, adapter = trace_model(model, inputs)
    if fmt == "torchscript":
        with atomic_write(path, "wb") as f:
            torch.jit.save(traced, f)
        logger.info("Exported %s (tracing, torchscript)", path)
        return path
    names = traced_output_names(model)
    with atomic_write(path, "wb") as f:
        onnx_export(
            adapter, adapter.flattened_inputs, f, input_names=["image"], output_names=names,
            dynamic_axes={"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in names[:-1]}},
        )  # fmt: skip
    logger.info("Exported %s (tracing, onnx)", path)
    return path


def _check_method_and_format(method: str, fmt: str) -> None:
    if method not in EXPORT_METHODS:
        raise ValueError(f"--export-method {method!r}; valid choices: {', '.join(EXPORT_METHODS)}")
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    if method == "scripting" and fmt == "onnx":
        # As in Detectron2's export_model.py: ONNX goes through a trace.
        raise ValueError("--format onnx needs --export-method tracing (scripting writes TorchScript only)")


def output_path(output_dir: str, fmt: str, weights: str = "") -> str:
    """``output_dir/model.ts`` or ``model.onnx``; refused if it exists (the user's file
    is never replaced) or is the weights file."""
    path = os.path.join(output_dir, FILE_NAMES[fmt])
    if weights and os.path.exists(weights) and os.path.realpath(path) == os.path.realpath(weights):
        raise FileExistsError(f"--output {output_dir}: {path} is MODEL.WEIGHTS; choose another --output folder")
    if os.path.lexists(path):
        raise FileExistsError(f"--output {output_dir}: {path} exists; move it away or choose another --output folder")
    return path


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iou_aware_retinanet.d2.export",
        description="Export IoU-aware RetinaNet (Detectron2) to TorchScript or ONNX.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="YAML config")
    parser.add_argument("--export-method", choices=EXPORT_METHODS, default="tracing", help="default tracing")
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="default torchscript")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for model.ts / model.onnx")
    parser.add_argument("--sample-image", metavar="IMG", help="the trace's example image (default: a random one)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow .pkl MODEL.WEIGHTS (pickle can run code)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides, e.g. MODEL.WEIGHTS model_final.pth")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns the written file."""
    logging.basicConfig(level=logging.INFO)
    args = get_parser().parse_args(argv)
    _check_method_and_format(args.export_method, args.format)
    cfg = setup_project_cfg(args.config_file, args.opts)
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ValueError(
            "MODEL.WEIGHTS is empty: the export would hold a randomly initialised model; "
            "pass MODEL.WEIGHTS path/to/model_final.pth"
        )
    check_weights_file(weights, allow_pickle=args.allow_pickle)
    path = output_path(args.output, args.format, weights)
    inputs = sample_inputs(cfg, args.sample_image) if args.export_method == "tracing" else None
    model = build_model(cfg)
    # No code from the file; every weight of the model from it.
    CheckedCheckpointer(model, require_all=True, allow_pickle=args.allow_pickle).load(weights, checkpointables=[])
    export_model(model, path, args.export_method, args.format, inputs)
    print(f"exported ({args.export_method}, {args.format}): {path}")
    return path


if __name__ == "__main__":
    main()
