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
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..atomic import atomic_write
from .engine import load_model

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
OUTPUT_NAMES = ("boxes", "scores", "labels", "cls_scores", "pred_ious")
ONNX_OPSET = 17


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
    size = int(cfg.INPUT.MIN_SIZE_TEST)
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, size, size, generator=generator)


def export_model(model: nn.Module, example: Tensor, output: str, fmt: str = "onnx") -> str:
    """Write ``model`` (an eval-mode torchvision-front-end model) to ``output``; returns the path."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    wrapper = ExportableDetector(model).eval()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with torch.no_grad(), atomic_write(output, "wb") as f:
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(wrapper, (example,), check_trace=False), f)
        else:
            try:
                import onnx  # noqa: F401  (the exporter needs it)
            except ImportError:
                raise ImportError("ONNX export needs the onnx package: pip install -e '.[export]'") from None
            torch.onnx.export(
                wrapper, (example,), f, dynamo=False, opset_version=ONNX_OPSET,
                input_names=["image"], output_names=list(OUTPUT_NAMES),
                dynamic_axes={"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in OUTPUT_NAMES}},
            )  # fmt: skip
    logger.info("Exported %s (%s)", output, fmt)
    return output


def default_output(cfg, fmt: str) -> str:
    return os.path.join(cfg.OUTPUT_DIR, "model.onnx" if fmt == "onnx" else "model.ts")


def run_export(cfg, weights: str, fmt: str = "onnx", output: Optional[str] = None) -> str:
    model = load_model(cfg, weights)
    return export_model(model, example_image(cfg), output or default_output(cfg, fmt), fmt)
