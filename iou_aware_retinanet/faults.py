"""Non-finite losses and weights: the errors both front-ends raise, and the one check.

A run that blows up must never leave a checkpoint it cannot resume from; both
front-ends' checkpointers check the tensors with :func:`non_finite_tensors`
before they write, and name the last good checkpoint in the error.
"""
from typing import List, Optional

import os

import torch
from torch import nn

__all__ = [
    "NonFiniteLossError", "NonFiniteWeightsError", "non_finite_tensors", "non_finite_weights_error",
    "last_good_note", "resume_candidates",
]  # fmt: skip


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


def non_finite_weights_error(bad: List[str], iteration: int, name: str, last_good: Optional[str]) -> NonFiniteWeightsError:
    """The error of a checkpoint ``name`` refused because the tensors ``bad`` are NaN / inf."""
    return NonFiniteWeightsError(
        f"Weights became infinite or NaN by iteration {iteration} ({', '.join(bad[:5])}"
        f"{', ...' if len(bad) > 5 else ''}): {name}.pth not written. {last_good_note(last_good)} "
        "Try a lower SOLVER.BASE_LR, a longer SOLVER.WARMUP_ITERS or SOLVER.CLIP_GRADIENTS."
    )


def resume_candidates(folder: str, named: str) -> List[str]:
    """``named``, then every other ``model_*.pth`` of ``folder``, newest first: what a resume
    tries in turn when a checkpoint is unreadable (truncated by a full disk, say)."""
    others = (os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("model_") and f.endswith(".pth"))
    return [named] + sorted((p for p in others if p != named), key=os.path.getmtime, reverse=True)
