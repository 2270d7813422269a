"""Mixed precision of the torchvision engine, under Detectron2's key ``SOLVER.AMP.ENABLED``.

As Detectron2's ``AMPTrainer``: the forward pass, losses included, runs under
``torch.autocast``; on CUDA in float16 (``AMPTrainer``'s default precision)
with the loss scaled by a ``torch.amp.GradScaler`` for the backward pass.
On the CPU autocast runs in bfloat16 and nothing is scaled: bfloat16 has
float32's exponent range, so gradients cannot underflow the way float16's do.

What stays float32 under autocast is the model's business, as in Detectron2:
anchors, box decoding, the IoU targets, every loss and NMS's inputs (see
``core.losses`` and ``core.inference``); the convolutions run in the autocast
type.
"""
import contextlib
from typing import Optional

import torch

__all__ = ["autocast", "autocast_dtype", "build_grad_scaler"]

_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}


def autocast_dtype(device) -> torch.dtype:
    """The autocast type of ``device``: float16 on CUDA, bfloat16 on the CPU."""
    device_type = torch.device(device).type
    if device_type not in _DTYPES:
        raise ValueError(
            f"SOLVER.AMP.ENABLED: mixed precision runs on 'cuda' or 'cpu' devices, not {device_type!r} "
            "(MODEL.DEVICE); set SOLVER.AMP.ENABLED False"
        )
    return _DTYPES[device_type]


def autocast(device, enabled: bool = True):
    """``torch.autocast`` in :func:`autocast_dtype` on ``device``; a no-op context when not ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=autocast_dtype(device))


def build_grad_scaler(device, enabled: bool) -> Optional[torch.amp.GradScaler]:
    """The loss scaler of a mixed-precision run on ``device``: a ``GradScaler`` on CUDA
    (float16), None on the CPU (bfloat16 needs none) or when ``enabled`` is False."""
    if not enabled:
        return None
    autocast_dtype(device)  # refuses devices without autocast
    if torch.device(device).type != "cuda":
        return None
    return torch.amp.GradScaler("cuda")
