"""``MODEL.WEIGHTS`` for the torchvision front-end: what it can load, and saving.

Accepted files (a local path or an http(s) URL, read with
``torch.load(weights_only=True)``):

* a checkpoint of this front-end: ``{"model": state_dict, ...}`` as written
  by :func:`save_checkpoint` (Detectron2's checkpoint layout), or a bare
  ``model.state_dict()``;
* torchvision ImageNet ResNet classification weights (``resnet50-*.pth``):
  loaded into ``backbone.body``, the classifier (``fc.*``) dropped.

Refused with a ValueError: Detectron2 ``.pkl`` / ``detectron2://`` files and
Detectron2 ``.pth`` checkpoints (different parameter names). As Detectron2's
checkpointer does, parameters whose shapes differ are skipped with a warning
and missing / unexpected keys are logged, so e.g. a baseline checkpoint loads
into an IoU-aware model, whose ``iou_pred`` then starts from its
initialisation.
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from .config import check_weights_path

logger = logging.getLogger(__name__)

__all__ = ["last_checkpoint", "load_checkpoint", "load_weights", "save_checkpoint", "write_last_checkpoint"]


def _read(path: str):
    if path.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.WEIGHTS={path!r}: file not found")
    return _torch_load(path)


def _torch_load(path: str):
    """``torch.load(weights_only=True)`` with errors that name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:  # e.g. "PytorchStreamReader failed ..." for a truncated file
        raise RuntimeError(
            f"cannot read {path}: {e}. The file is truncated or not a PyTorch checkpoint "
            "(an interrupted copy or a full disk?)"
        ) from e


def _state_dict_of(checkpoint, path: str) -> Mapping[str, torch.Tensor]:
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"MODEL.WEIGHTS={path!r} holds no state dict (expected a dict of tensors or {{'model': ...}})")
    return state


def _with_metadata(values: Dict[str, torch.Tensor], like: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """``values`` as a state dict carrying ``like``'s module versions (``_metadata``),
    which ``load_state_dict`` uses to upgrade old layouts."""
    out = OrderedDict(values)
    metadata = getattr(like, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out


def _is_detectron2(state: Mapping) -> bool:
    return any(k.startswith(("backbone.bottom_up.", "head.cls_subnet.", "head.bbox_subnet.")) for k in state)


def _is_torchvision_classifier(state: Mapping) -> bool:
    return "conv1.weight" in state and "layer1.0.conv1.weight" in state


def load_weights(model: nn.Module, path: str):
    """Load ``path`` into ``model`` (see the module doc); returns torch's incompatible-keys tuple."""
    check_weights_path(path)
    state = _state_dict_of(_read(path), path)
    if _is_detectron2(state):
        raise ValueError(
            f"MODEL.WEIGHTS={path!r} is a Detectron2 checkpoint; its parameter names differ from the "
            "torchvision front-end's. Use it with the Detectron2 front-end."
        )
    if _is_torchvision_classifier(state):
        logger.info("MODEL.WEIGHTS=%s: torchvision ImageNet classifier weights, loaded into backbone.body", path)
        state = {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}

    own = model.state_dict()
    loadable = {}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            logger.warning(
                "Skip loading %s: shape %s in the checkpoint, %s in the model", key, tuple(value.shape),
                tuple(own[key].shape),
            )
            continue
        loadable[key] = value
    # BatchNorm's step counters match any BN model: they prove nothing about the weights.
    if not any(key in own and not key.endswith("num_batches_tracked") for key in loadable):
        raise ValueError(
            f"MODEL.WEIGHTS={path!r}: no parameter of the checkpoint matches the model "
            "(names or shapes differ everywhere): is it a checkpoint of this model?"
        )
    incompatible = model.load_state_dict(_with_metadata(loadable, state), strict=False)
    if incompatible.missing_keys:
        logger.warning("Keys not found in %s (left as initialised): %s", path, ", ".join(incompatible.missing_keys))
    if incompatible.unexpected_keys:
        logger.warning("Keys of %s not in the model (ignored): %s", path, ", ".join(incompatible.unexpected_keys))
    return incompatible


def save_checkpoint(model: nn.Module, path: str, state: Optional[Mapping] = None, **extra) -> None:
    """Write ``{"model": model.state_dict(), **extra}`` atomically (loadable by :func:`load_weights`).

    The file is written to ``<path>.tmp``, flushed to disk, then renamed over
    ``path``: a kill at any moment leaves either the old file or the new one.
    ``extra`` must hold only what ``torch.load(weights_only=True)`` reads back
    (tensors, numbers, strings, lists / dicts of them), e.g. an optimizer's
    ``state_dict()``. ``state`` replaces ``model.state_dict()`` when given.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_save({"model": model.state_dict() if state is None else state, **extra}, path)


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """A training checkpoint written by :func:`save_checkpoint`, read with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a training checkpoint (no 'model' entry)")
    return checkpoint


LAST_CHECKPOINT = "last_checkpoint"


def write_last_checkpoint(output_dir: str, file_name: str) -> None:
    """Record ``file_name`` (in ``output_dir``) as the newest checkpoint, atomically (Detectron2's layout)."""
    path = os.path.join(output_dir, LAST_CHECKPOINT)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(file_name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def last_checkpoint(output_dir: str):
    """Path of the checkpoint ``output_dir/last_checkpoint`` names, or None when there is none."""
    path = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as f:
        name = f.read().strip()
    checkpoint = os.path.join(output_dir, name)
    if not name or not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"{path} names {name!r}, which is not in {output_dir}")
    return checkpoint
