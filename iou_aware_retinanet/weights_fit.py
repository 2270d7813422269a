"""Whether a weights file fits a model: the one rule of both front-ends.

Evaluating, drawing, exporting or resuming from a file that left some of the
model's tensors at their initialisation reports the results of a partly random
model as if they were real, so there every tensor must come from the file
(``require_all``). Initialising a training run (``MODEL.WEIGHTS`` without
``--resume``) may load a part, e.g. ImageNet weights into the backbone, but not
nothing.
"""
from typing import Iterable, Mapping, Sequence, Tuple

__all__ = ["WeightsMismatchError", "check_weights_fit", "check_state_dict_fits", "IGNORED_MISSING"]

# Tensors that are no weights: BatchNorm's step counter, the torchvision model's
# moving average of the loss normalizer (training statistics inference does not use).
IGNORED_MISSING = ("num_batches_tracked", "loss_normalizer_ema")

_SHOWN = 3


class WeightsMismatchError(ValueError):
    """A weights file that does not fit the model; the message names the file and the tensors."""


def check_weights_fit(
    path: str,
    model_keys: Iterable[str],
    missing: Sequence[str],
    incorrect_shapes: Sequence[Tuple[str, tuple, tuple]] = (),
    require_all: bool = True,
    purpose: str = "evaluation, prediction, export and resume",
) -> None:
    """Raise :class:`WeightsMismatchError` when ``path`` does not fit.

    ``missing``: the model's tensors the file did not fill (absent, or of another
    shape); ``incorrect_shapes``: ``(key, shape in the file, shape in the model)``.
    """
    model_keys = [k for k in model_keys if not k.endswith(IGNORED_MISSING)]
    missing = [k for k in missing if not k.endswith(IGNORED_MISSING)]
    wrong_shape = {key: (theirs, ours) for key, theirs, ours in incorrect_shapes}
    missing = sorted(set(missing) | set(wrong_shape))
    if not missing or (not require_all and len(missing) < len(model_keys)):
        return
    examples = [
        f"{key}: {tuple(wrong_shape[key][0])} in the file, {tuple(wrong_shape[key][1])} in the model"
        if key in wrong_shape else f"{key}: not in the file"
        for key in (sorted(wrong_shape) + [k for k in missing if k not in wrong_shape])[:_SHOWN]
    ]  # fmt: skip
    hint = (
        "a tensor of another shape: was it trained with another MODEL.RETINANET.NUM_CLASSES (or anchors, "
        "backbone)?"
        if wrong_shape
        else "names that differ: is it a checkpoint of the other front-end, or of another model?"
    )
    if len(missing) >= len(model_keys):
        lead = f"none of the model's {len(model_keys)} weights is in it"
    else:
        lead = f"{len(missing)} of the model's {len(model_keys)} weights are missing or of another shape"
    need = f"{purpose[0].upper()}{purpose[1:]} need every weight from the file." if require_all else (
        "Nothing of it would initialise the model.")  # fmt: skip
    raise WeightsMismatchError(
        f"{path} does not fit this model: {lead} ({'; '.join(examples)}{'; ...' if len(missing) > _SHOWN else ''}). "
        f"{hint[0].upper()}{hint[1:]} {need}"
    )


def check_state_dict_fits(path: str, model_state: Mapping, file_state: Mapping, purpose: str = "resume") -> None:
    """For a strict load (a resume): every tensor of ``model_state`` in ``file_state`` (read
    from ``path``) with its shape, and no tensor the model does not have; raises
    :class:`WeightsMismatchError` naming the file and the tensors, where
    ``load_state_dict(strict=True)``'s own error names neither the file nor what to change."""
    missing = [k for k in model_state if k not in file_state]
    shapes = [
        (k, tuple(file_state[k].shape), tuple(v.shape))
        for k, v in model_state.items()
        if k in file_state and hasattr(file_state[k], "shape") and tuple(file_state[k].shape) != tuple(v.shape)
    ]  # fmt: skip
    check_weights_fit(path, model_state.keys(), missing, shapes, require_all=True, purpose=purpose)
    unexpected = [k for k in file_state if k not in model_state and not k.endswith(IGNORED_MISSING)]
    if unexpected:
        raise WeightsMismatchError(
            f"{path} does not fit this model: it holds {len(unexpected)} tensors the model does not have "
            f"({', '.join(unexpected[:_SHOWN])}{', ...' if len(unexpected) > _SHOWN else ''}): was it trained with "
            f"another config (MODEL.IOU_AWARE.ENABLED, MODEL.RETINANET.NUM_CONVS, the backbone)? "
            f"{purpose[0].upper()}{purpose[1:]} needs the model it was written from."
        )
