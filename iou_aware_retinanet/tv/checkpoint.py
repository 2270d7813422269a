"""``MODEL.WEIGHTS`` for the torchvision front-end: what it can load, and saving.

Accepted files (a local path or an http(s) URL, read with
``torch.load(weights_only=True)``):

* a checkpoint of this front-end: ``{"model": state_dict, ...}`` as written
  by :func:`save_checkpoint` (Detectron2's checkpoint layout), or a bare
  ``model.state_dict()``;
* torchvision ImageNet ResNet classification weights (``resnet50-*.pth``):
  loaded into ``backbone.body``, the classifier (``fc.*``) dropped.

Refused with a ValueError: Detectron2 ``.pkl`` / ``detectron2://`` files and
Detectron2 ``.pth`` checkpoints (different parameter names). Loading is
fvcore's (Detectron2's) checkpointer's: parameters whose shapes differ are
skipped with a warning and missing / unexpected keys are logged, so e.g. a
baseline checkpoint loads into an IoU-aware model, whose ``iou_pred`` then
starts from its initialisation.

:class:`Checkpointer` is fvcore's ``Checkpointer`` (Detectron2's file layout:
``{"model": ..., <checkpointable>: state_dict, **extra}`` and a
``last_checkpoint`` file naming the newest) with reads through
``torch.load(weights_only=True)``, atomic writes, NaN / inf weights refused
and an exact resume (:meth:`Checkpointer.resume`): the training engine's and
the user's one checkpointer.
"""
import logging
import os
import pickle
from typing import Mapping, Optional

import torch
from fvcore.common.checkpoint import Checkpointer as _FvcoreCheckpointer
from torch import nn

from ..atomic import atomic_write
from ..faults import last_good_note, load_newest_readable, non_finite_tensors, non_finite_weights_error
from ..weights_fit import check_state_dict_fits
from . import distributed as comm
from .config import check_weights_path

logger = logging.getLogger(__name__)

__all__ = ["Checkpointer", "last_checkpoint", "load_checkpoint", "load_weights", "save_checkpoint", "write_last_checkpoint"]


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
    except pickle.UnpicklingError as e:  # an object weights_only=True does not read (e.g. code)
        raise RuntimeError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e


def _state_dict_of(checkpoint, path: str) -> Mapping[str, torch.Tensor]:
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"MODEL.WEIGHTS={path!r} holds no state dict (expected a dict of tensors or {{'model': ...}})")
    return state


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
    # BatchNorm's step counters match any BN model: they prove nothing about the weights.
    if not any(
        key in own and own[key].shape == value.shape and not key.endswith("num_batches_tracked")
        for key, value in state.items()
    ):
        raise ValueError(
            f"MODEL.WEIGHTS={path!r}: no parameter of the checkpoint matches the model "
            "(names or shapes differ everywhere): is it a checkpoint of this model?"
        )
    logger.info("Loading MODEL.WEIGHTS %s", path)
    # fvcore's model loading: skips (and logs) shape mismatches, loads the rest with
    # strict=False, logs missing / unexpected keys. The state dict keeps its _metadata.
    checkpointer = Checkpointer(model)
    incompatible = checkpointer._load_model({"model": state})
    checkpointer._log_incompatible_keys(incompatible)
    return incompatible  # missing_keys, unexpected_keys, incorrect_shapes


def save_checkpoint(model: nn.Module, path: str, state: Optional[Mapping] = None, **extra) -> None:
    """Write ``{"model": model.state_dict(), **extra}`` atomically (loadable by :func:`load_weights`).

    The file is written to ``<path>.tmp``, flushed to disk, then renamed over
    ``path``: a kill at any moment leaves either the old file or the new one.
    ``extra`` must hold only what ``torch.load(weights_only=True)`` reads back
    (tensors, numbers, strings, lists / dicts of them), e.g. an optimizer's
    ``state_dict()``. ``state`` replaces ``model.state_dict()`` when given.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save({"model": model.state_dict() if state is None else state, **extra}, f)


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
    with atomic_write(os.path.join(output_dir, LAST_CHECKPOINT)) as f:
        f.write(file_name)


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


class Checkpointer(_FvcoreCheckpointer):
    """fvcore's ``Checkpointer`` with what this project needs more.

    * :meth:`_load_file` reads with ``torch.load(weights_only=True)`` (fvcore's
      ``torch.load`` unpickles anything, i.e. runs code from the file), names
      the file in its errors and requires a ``"model"`` entry;
    * :meth:`save` and :meth:`tag_last_checkpoint` write atomically (fvcore
      writes in place: a kill mid-write leaves a truncated newest checkpoint);
      :meth:`save` refuses NaN / inf weights (:class:`~..faults.NonFiniteWeightsError`,
      naming the last good checkpoint), returns the path and takes the model
      ``state`` to write; under torchrun only rank 0 writes;
    * :meth:`resume` restores model (strictly: every tensor, or fail),
      checkpointables and extras from ``last_checkpoint``, falling back to the
      newest older readable ``model_*.pth`` when that one is truncated;
    * :meth:`get_checkpoint_file` fails when ``last_checkpoint`` names a file that
      is not there (fvcore returns the path, which then fails as "not found").

    Messages go to this module's logger (the project's ``log.txt``).
    """

    def __init__(self, model: nn.Module, save_dir: str = "", **checkpointables):
        super().__init__(model, save_dir, save_to_disk=comm.is_main_process(), **checkpointables)
        self.logger = logger
        self.last_saved: Optional[str] = None  # the newest checkpoint written or resumed from

    def last_good_note(self) -> str:
        return last_good_note(self.last_saved)

    def save(self, name: str, state: Optional[Mapping] = None, **extra) -> Optional[str]:
        """Write ``save_dir/<name>.pth`` atomically and name it in ``last_checkpoint``:
        ``{"model": state or model.state_dict(), <checkpointable>: its state_dict(), **extra}``.
        ``extra`` must be readable with ``weights_only=True``. Returns the path (None without a
        ``save_dir``); raises NonFiniteWeightsError, writing nothing, for NaN / inf weights."""
        if not self.save_dir:
            return None
        state = self.model.state_dict() if state is None else state
        bad = non_finite_tensors(state)
        if comm.get_world_size() > 1:
            bad = comm.broadcast_object(bad)  # rank 0's verdict: every rank raises together, or none
        if bad:
            raise non_finite_weights_error(bad, extra.get("iteration"), name, self.last_saved)
        path = os.path.join(self.save_dir, f"{name}.pth")
        if self.save_to_disk:  # rank 0 (the weights are the same on every rank)
            data = {"model": state}
            data.update((key, obj.state_dict()) for key, obj in self.checkpointables.items())
            data.update(extra)
            os.makedirs(self.save_dir, exist_ok=True)
            with atomic_write(path, "wb") as f:
                torch.save(data, f)
            self.tag_last_checkpoint(os.path.basename(path))
        self.last_saved = path
        logger.info("Saved checkpoint %s%s", path, f" (iteration {extra['iteration']})" if "iteration" in extra else "")
        return path

    def resume(self, required=("iteration",)) -> Optional[dict]:
        """Load ``last_checkpoint`` into the model and checkpointables; None when there is none.

        Returns what else the checkpoint holds (e.g. ``iteration``, ``seed``); a
        checkpoint without a checkpointable or a ``required`` entry is refused."""
        if not self.has_checkpoint():
            return None
        checkpoint, path = load_newest_readable(
            self.save_dir, self.get_checkpoint_file(), self._load_file, self._retag
        )
        missing = [key for key in (*self.checkpointables, *required) if key not in checkpoint]
        if missing:
            raise ValueError(f"{path} cannot be resumed from: it has no {', '.join(missing)}")
        # Strict, unlike fvcore's load (which skips mismatched shapes and missing keys with a
        # warning): a resume restores every tensor of this model, or fails naming the file and
        # the tensors (e.g. after a MODEL.RETINANET.NUM_CLASSES change).
        state = checkpoint.pop("model")
        check_state_dict_fits(path, self.model.state_dict(), state, purpose="resume")
        self.model.load_state_dict(state)
        for key, obj in self.checkpointables.items():
            obj.load_state_dict(checkpoint.pop(key))
        self.last_saved = path
        logger.info("Resuming from %s%s", path, f" (iteration {checkpoint['iteration']})" if "iteration" in checkpoint else "")
        return checkpoint

    def _retag(self, basename: str) -> None:
        if self.save_to_disk:
            self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_last_checkpoint(self.save_dir, last_filename_basename)

    def get_checkpoint_file(self) -> str:
        return last_checkpoint(self.save_dir) or ""

    def _load_file(self, f: str) -> dict:
        return load_checkpoint(f)
