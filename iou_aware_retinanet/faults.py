"""Non-finite losses and weights: the errors both front-ends raise, the one check, and
the one rule of when a checkpoint is written.

A run that blows up must never leave a checkpoint it cannot resume from; both
front-ends' checkpointers check the tensors with :func:`non_finite_tensors`
before they write, name the last good checkpoint in the error, write their
periodic checkpoints by :class:`FiniteLossCheckpoints`, and resume from the
newest checkpoint that loads (:func:`load_newest_readable`).
"""
import logging
import os
import pickle
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "NonFiniteLossError", "NonFiniteWeightsError", "non_finite_tensors", "non_finite_weights_error",
    "last_good_note", "resume_candidates", "load_newest_readable", "FiniteLossCheckpoints",
]  # fmt: skip

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the iteration and every loss term."""


class NonFiniteWeightsError(FloatingPointError):
    """A parameter or buffer became NaN or infinite; nothing is saved from such weights."""


def non_finite_tensors(model_or_state) -> List[str]:
    """Names of the parameters and buffers (of a model, or in a state dict) holding NaN or inf."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return [
        name for name, t in state.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]  # fmt: skip


def last_good_note(path: Optional[str]) -> str:
    """The sentence every fault error ends with."""
    if path:
        return f"The last good checkpoint is {path} (resume from it with --resume)."
    return "No checkpoint was written by this run."


def non_finite_weights_error(
    bad: List[str], iteration: Optional[int], name: str, last_good: Optional[str]
) -> NonFiniteWeightsError:
    """The error of a checkpoint ``name`` refused because the tensors ``bad`` are NaN / inf."""
    when = "" if iteration is None else f" by iteration {iteration}"
    return NonFiniteWeightsError(
        f"Weights became infinite or NaN{when} ({', '.join(bad[:5])}"
        f"{', ...' if len(bad) > 5 else ''}): {name}.pth not written. {last_good_note(last_good)} "
        "Try a lower SOLVER.BASE_LR, a longer SOLVER.WARMUP_ITERS or SOLVER.CLIP_GRADIENTS."
    )


def resume_candidates(folder: str, named: str) -> List[str]:
    """``named``, then every other ``model_*.pth`` of ``folder``, newest first: what a resume
    tries in turn when a checkpoint is unreadable (truncated by a full disk, say)."""
    others = (os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("model_") and f.endswith(".pth"))
    return [named] + sorted((p for p in others if p != named), key=os.path.getmtime, reverse=True)


# What reading a truncated or foreign checkpoint raises (torch.load, and our readers' wrappers).
UNREADABLE_CHECKPOINT_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)


def load_newest_readable(
    folder: str, named: str, read: Callable[[str], Any], retag: Callable[[str], None]
) -> Tuple[Any, str]:
    """``(read(path), path)`` for ``named``, or else for the newest older ``model_*.pth`` of
    ``folder`` that reads: a checkpoint truncated by a full disk or a cut copy falls back,
    with a warning, to the previous good one, which ``retag(basename)`` then records as
    the last checkpoint. RuntimeError, naming every file, when none reads."""
    errors = []
    for path in resume_candidates(folder, named):
        try:
            result = read(path)
        except UNREADABLE_CHECKPOINT_ERRORS as e:
            errors.append(f"{path}: {e}")
            logger.warning("Cannot read checkpoint %s (%s); trying an older one", path, e)
            continue
        if path != named:
            logger.warning("%s is unreadable: resuming from the older checkpoint %s", named, path)
            retag(os.path.basename(path))
        return result, path
    raise RuntimeError(f"no readable checkpoint to resume from in {folder}:\n" + "\n".join(errors))


class FiniteLossCheckpoints:
    """When a run's checkpoints are written, on both front-ends.

    The periodic checkpoint of iteration i (every ``period`` iterations) is
    written only once iteration i + 1's loss is known to be finite: a step that
    blew the weights up to 1e15 without a NaN yet is then never saved, and the
    last checkpoint of a run that diverged resumes. ``model_final`` follows the
    last iteration at once (there is no next loss; the writer still refuses
    NaN / inf weights).

    ``snapshot(iteration)`` captures what the checkpoint of ``iteration`` must
    hold, taken right after that iteration; ``write(name, iteration, snapshot)``
    writes it. The front-end calls :meth:`after_step` after every iteration and
    :meth:`loss_was_finite` as soon as an iteration's loss is known to be finite.
    """

    def __init__(
        self,
        period: int,
        max_iter: int,
        snapshot: Callable[[int], Any],
        write: Callable[[str, int, Any], None],
        file_prefix: str = "model",
    ):
        if period < 1:
            raise ValueError(f"the checkpoint period must be >= 1, got {period}")
        self.period, self.max_iter, self.file_prefix = int(period), int(max_iter), file_prefix
        self.snapshot, self.write = snapshot, write
        self.pending: Optional[Tuple[str, int, Any]] = None  # (name, iteration, snapshot) awaiting a finite loss

    def loss_was_finite(self) -> None:
        """The current iteration's loss is finite: the state before it is good, write it."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.write(*pending)

    def after_step(self, iteration: int) -> None:
        if iteration + 1 >= self.max_iter:
            self.pending = None  # superseded by model_final
            self.write("model_final", iteration, self.snapshot(iteration))
        elif (iteration + 1) % self.period == 0:
            self.pending = (f"{self.file_prefix}_{iteration:07d}", iteration, self.snapshot(iteration))
