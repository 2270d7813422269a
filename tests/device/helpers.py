"""Shared by the device-clean tests: tensors on the test device, configs, and checks
that every output lives where its inputs did."""
import os
from typing import Iterable

import torch
from torch import Tensor

from iou_aware_retinanet.config import build_assigner_from_cfg
from iou_aware_retinanet.core import Assigner, available_assigners
from iou_aware_retinanet.tv import get_cfg
from iou_aware_retinanet.tv.amp import autocast_dtype

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_CONFIG = os.path.join(REPO, "configs", "Base-IoUAwareRetinaNet.yaml")
ASSIGNERS = tuple(available_assigners())
NUM_CLASSES = 3


def assigner_on_config(name: str, num_classes: int = NUM_CLASSES, max_block_elements=None) -> Assigner:
    """The assigner ``name`` with the base config's options; a small ``max_block_elements``
    makes it work through the GTs in chunks (on it and on any assigner it wraps)."""
    cfg = get_cfg()
    cfg.merge_from_file(BASE_CONFIG)
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.ASSIGNER.NAME = name
    assigner = build_assigner_from_cfg(cfg)
    if max_block_elements is not None:
        for obj in [assigner] + [v for v in vars(assigner).values() if isinstance(v, Assigner)]:
            obj.max_block_elements = max_block_elements
    return assigner


def tensors_in(obj) -> Iterable[Tensor]:
    """Every tensor in nested lists / tuples / dicts / dataclass-like objects."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value)
    elif hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from tensors_in(value)


def assert_on(device: torch.device, obj) -> None:
    """Every tensor of ``obj`` is on ``device`` (index ignored when the device names none)."""
    tensors = list(tensors_in(obj))
    assert tensors, "nothing to check"
    for t in tensors:
        assert t.device.type == device.type, f"a {tuple(t.shape)} tensor is on {t.device}, expected {device}"
        if device.index is not None:
            assert t.device.index == device.index, f"a {tuple(t.shape)} tensor is on {t.device}, expected {device}"


def amp_dtype(device: torch.device) -> torch.dtype:
    return autocast_dtype(device)


def fused_score_dtype(device: torch.device, alpha: float) -> torch.dtype:
    """The type autocast gives S = p^alpha * IoU^(1 - alpha) computed from autocast-typed p
    and IoU: what 'scores follow autocast' means for the fused score (pow runs in
    float32 under CUDA's autocast, in the input type under the CPU's)."""
    dtype = amp_dtype(device)
    p = torch.full((2,), 0.5, device=device, dtype=dtype)
    with torch.autocast(device.type, dtype=dtype):
        return (p.pow(alpha) * p.pow(1 - alpha)).dtype
