"""Detectron2's periodic checkpoints with the torchvision engine's guarantee:
a checkpoint is written only from weights that are finite and still give a
finite loss, so the last checkpoint of a run that blew up resumes.

Detectron2's ``PeriodicCheckpointer`` saves iteration i's weights right after
iteration i, before anyone knows whether they still give a finite loss: a step
that blows the weights up to 1e15 without a NaN yet is saved, and ``--resume``
fails again. :class:`FiniteCheckpointer` keeps a copy of iteration i's state
(model, optimizer, scheduler: what Detectron2's checkpointer saves) and writes
it after iteration i + 1 has run, which Detectron2 only lets happen when its
loss was finite. ``model_final`` (no next loss) is checked for NaN / inf only.
Files are written to a temporary name and renamed, so a crash mid-write leaves
the previous checkpoint as the last one; a checkpoint truncated anyway (a full
disk, a copy) is skipped on ``--resume`` for the newest older one that loads
(:func:`resume_from_newest_readable`), as the torchvision engine does. Both rules
are :mod:`iou_aware_retinanet.faults`', shared by the two front-ends.
"""
import copy
import logging
import os
from typing import Callable, List, Optional

import torch
from detectron2.engine import HookBase, hooks

from ..atomic import atomic_write
from ..faults import (
    FiniteLossCheckpoints, NonFiniteLossError, last_good_note, load_newest_readable, non_finite_tensors,
    non_finite_weights_error,
)  # fmt: skip

__all__ = ["FiniteCheckpointer", "use_finite_checkpointer", "name_last_good_checkpoint", "resume_from_newest_readable"]

logger = logging.getLogger(__name__)


class FiniteCheckpointer(HookBase):
    """Drop-in for ``hooks.PeriodicCheckpointer`` (same file names, same period); when it
    writes is :class:`~iou_aware_retinanet.faults.FiniteLossCheckpoints`' rule."""

    def __init__(self, checkpointer, period: int, file_prefix: str = "model"):
        self.checkpointer, self.period, self.file_prefix = checkpointer, int(period), file_prefix
        self.schedule: Optional[FiniteLossCheckpoints] = None
        self.last_good: Optional[str] = None

    def before_train(self) -> None:
        self.schedule = FiniteLossCheckpoints(
            self.period, self.trainer.max_iter, self._state, self._write, self.file_prefix
        )
        if self.checkpointer.has_checkpoint():  # resumed: that one is good
            self.last_good = self.checkpointer.get_checkpoint_file()

    def after_step(self) -> None:
        # Detectron2 raised before the hooks if this iteration's loss was not finite.
        self.schedule.loss_was_finite()
        self.schedule.after_step(self.trainer.iter)

    def last_good_note(self) -> str:
        return last_good_note(self.last_good)

    def _state(self, iteration: int) -> dict:
        # What Detectron2's Checkpointer.save(name, iteration=...) writes, copied now: the
        # file is written after the next step has changed the live objects.
        state = {"model": {k: v.detach().clone() for k, v in self.checkpointer.model.state_dict().items()}}
        for key, obj in self.checkpointer.checkpointables.items():
            state[key] = copy.deepcopy(obj.state_dict())
        state["iteration"] = iteration
        return state

    def _write(self, name: str, iteration: int, state: dict) -> None:
        bad = non_finite_tensors(state["model"])
        if bad:
            raise non_finite_weights_error(bad, iteration, name, self.last_good)
        basename = f"{name}.pth"
        path = os.path.join(self.checkpointer.save_dir, basename)
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
        self.checkpointer.tag_last_checkpoint(basename)
        self.last_good = path
        logger.info("Saved checkpoint %s (iteration %d)", path, iteration)


def use_finite_checkpointer(hook_list: List[HookBase]) -> List[HookBase]:
    """``DefaultTrainer.build_hooks()`` with its PeriodicCheckpointer replaced, in place in the order."""
    return [
        FiniteCheckpointer(h.checkpointer, h.period, h.file_prefix) if isinstance(h, hooks.PeriodicCheckpointer) else h
        for h in hook_list
    ]


def name_last_good_checkpoint(error: FloatingPointError, hook_list: List[HookBase]) -> NonFiniteLossError:
    """Detectron2's "Loss became infinite or NaN" error, ending with the last good checkpoint."""
    finite = [h for h in hook_list if isinstance(h, FiniteCheckpointer)]
    note = finite[0].last_good_note() if finite else ""
    return NonFiniteLossError(f"{error} {note}".strip())


def resume_from_newest_readable(checkpointer, resume_or_load: Callable[[bool], None], resume: bool) -> None:
    """``resume_or_load(resume)`` (``DefaultTrainer``'s), but an unreadable ``last_checkpoint``
    falls back, with a warning, to the newest older ``model_*.pth`` of the run that loads."""
    if not (resume and checkpointer.has_checkpoint()):
        resume_or_load(resume)
        return

    def parse(path):  # mmap: parses the archive without reading the tensors (Detectron2 then loads it)
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    load_newest_readable(checkpointer.save_dir, checkpointer.get_checkpoint_file(), parse, checkpointer.tag_last_checkpoint)
    resume_or_load(True)
