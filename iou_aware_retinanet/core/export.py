"""What both front-ends' exporters share: the ONNX export call and the example image.

Detection post-processing has data-dependent shapes (the number of candidates
above the score threshold), which ``torch.export`` (PyTorch's default ONNX
path) refuses; the TorchScript-based exporter (``dynamo=False``) traces it.
The post-processing itself is written so that one trace holds for every image
size: see ``core.inference`` (top-k counts and finite-score filters computed
from the traced shapes while tracing).
"""
from typing import Dict, IO, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ONNX_OPSET", "example_image", "onnx_export"]

ONNX_OPSET = 17


def example_image(size: int, seed: int = 0) -> Tensor:
    """A deterministic (3, size, size) image in [0, 1]: a trace's example input."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=generator)


def onnx_export(
    module: nn.Module,
    args: tuple,
    f: IO[bytes],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Dict[str, Dict[int, str]],
) -> None:
    """``torch.onnx.export`` with the TorchScript-based exporter and the project's opset."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install -e '.[export]'") from None
    with torch.no_grad():
        torch.onnx.export(
            module, args, f, dynamo=False, opset_version=ONNX_OPSET,
            input_names=list(input_names), output_names=list(output_names), dynamic_axes=dynamic_axes,
        )  # fmt: skip
