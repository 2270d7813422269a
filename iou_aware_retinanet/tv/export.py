"""Export the torchvision front-end's model with its post-processing inside.

    python -m iou_aware_retinanet export --config-file FILE [--weights W] \\
        [--format onnx|torchscript] [--output model.onnx] [KEY VALUE ...]

The exported graph takes one RGB image, float (3, H, W) in [0, 1], of any
size (it is resized as the config's ``INPUT.*_TEST`` say, like the PyTorch
model) and returns the final detections, in input-image pixels:

    boxes (D, 4) XYXY, scores (D,) the fused S, labels (D,) contiguous class
    indices, cls_scores (D,) p, pred_ious (D,) the predicted IoU

with the threshold, the per-level top-k, the fusion and torchvision's NMS
inside (ONNX ``TopK`` / ``NonMaxSuppression``). Without the IoU branch,
``cls_scores`` equals ``scores`` and ``pred_ious`` is all ones.

ONNX goes through PyTorch's TorchScript-based exporter (``dynamo=False``):
the ``torch.export`` path refuses the data-dependent shapes of detection
post-processing (the number of candidates above the threshold). TorchScript
is a trace of the same wrapper (``torch.jit.trace``), valid for any image
size the trace's ops allow; ONNX needs the ``export`` extra
(``onnx``, ``onnxruntime`` to check it).
"""
import logging
import os
import zipfile
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..atomic import atomic_write
from ..core import export as core_export
from .engine import load_model

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
OUTPUT_NAMES = ("boxes", "scores", "labels", "cls_scores", "pred_ious")


class ExportableDetector(nn.Module):
    """One image in, the five detection tensors out (a fixed-arity graph for exporters)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        det = self.model([image])[0]
        scores = det["scores"]
        cls_scores = det.get("cls_scores", scores)
        pred_ious = det.get("pred_ious", torch.ones_like(scores))
        return det["boxes"], scores, det["labels"], cls_scores, pred_ious


def example_image(cfg) -> Tensor:
    """A deterministic image of the test size (the trace's example input)."""
    return core_export.example_image(int(cfg.INPUT.MIN_SIZE_TEST))


def export_model(model: nn.Module, example: Tensor, output: str, fmt: str = "onnx") -> str:
    """Write ``model`` (an eval-mode torchvision-front-end model) to ``output``; returns the path.
    An existing ``output`` is replaced only when it is an earlier export in ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    check_export_output(output, fmt, ())
    wrapper = ExportableDetector(model).eval()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with torch.no_grad(), atomic_write(output, "wb") as f:
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(wrapper, (example,), check_trace=False), f)
        else:
            core_export.onnx_export(
                wrapper, (example,), f, input_names=["image"], output_names=OUTPUT_NAMES,
                dynamic_axes={"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in OUTPUT_NAMES}},
            )  # fmt: skip
    logger.info("Exported %s (%s)", output, fmt)
    return output


def default_output(cfg, fmt: str) -> str:
    return os.path.join(cfg.OUTPUT_DIR, "model.onnx" if fmt == "onnx" else "model.ts")


def is_export_of(path: str, fmt: str) -> bool:
    """Whether the file ``path`` is an earlier export in ``fmt`` (what ``export`` may replace)."""
    if fmt == "torchscript":  # a zip archive with TorchScript code (a torch.save file has none)
        try:
            with zipfile.ZipFile(path) as archive:
                return any("/code/" in name for name in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
    except Exception:  # not an ONNX protobuf (or onnx missing: then nothing is replaced)
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0 and len(model.graph.output) > 0


def check_export_output(output: str, fmt: str, inputs: Sequence[str]) -> None:
    """Refuse, before any work, an ``output`` that is one of the ``inputs`` (the weights, the
    config) or an existing file that is not an earlier export in ``fmt``: export never
    overwrites a file the user owns."""
    real = os.path.realpath(output)
    for path in inputs:
        if path and os.path.exists(path) and (real == os.path.realpath(path) or _same_file(output, path)):
            raise FileExistsError(f"--output {output} is the input file {path}: choose another --output")
    if os.path.isdir(output):
        raise IsADirectoryError(f"--output {output} is a folder: name the file to write, e.g. {os.path.join(output, 'model.onnx')}")
    if os.path.exists(output) and not is_export_of(output, fmt):
        raise FileExistsError(
            f"--output {output} exists and is not an earlier {fmt} export: export replaces only its own "
            "files; choose another --output (or remove the file yourself)"
        )


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links too
    except OSError:
        return False


def run_export(cfg, weights: str, fmt: str = "onnx", output: Optional[str] = None, config_file: str = "") -> str:
    """Load ``weights`` (refused unless they fit the model) and export; ``output`` defaults to
    ``OUTPUT_DIR/model.onnx`` (``model.ts``). Neither the weights nor the config nor any file
    that is not an earlier export is overwritten."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    output = output or default_output(cfg, fmt)
    check_export_output(output, fmt, [weights, config_file])
    model = load_model(cfg, weights)
    return export_model(model, example_image(cfg), output, fmt)
