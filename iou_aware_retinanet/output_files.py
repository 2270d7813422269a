"""What ``predict`` (torchvision front-end) and the demo (Detectron2) may write: never over an
input image, and over an existing file only when an earlier run of theirs wrote it.

Both write their drawn images and a COCO-format ``predictions.json`` (``<name>.json`` beside a
single output image) whose ``images`` list each ``drawn_file``: that json is the record of
what a rerun may replace.
"""
import json
import os
from typing import Sequence

__all__ = ["refuse_overwriting_inputs", "refuse_overwriting_user_files", "earlier_outputs", "predictions_json_path"]


def predictions_json_path(out_paths: Sequence[str], single_file: bool, output: str) -> str:
    """``<output>/predictions.json``, or ``<name>.json`` beside a single output image."""
    return os.path.splitext(out_paths[0])[0] + ".json" if single_file else os.path.join(output, "predictions.json")


def refuse_overwriting_inputs(inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Raise before anything is written when an output file would replace an input image."""
    sources = {os.path.realpath(p) for p in inputs}
    clashes = [p for p in outputs if os.path.realpath(p) in sources]
    if clashes:
        raise FileExistsError(
            f"--output would overwrite the input image {clashes[0]}"
            f"{f' (and {len(clashes) - 1} more)' if len(clashes) > 1 else ''}: choose another --output folder or file"
        )


def earlier_outputs(json_path: str) -> set:
    """The files an earlier ``predict`` / demo wrote, as its json lists them (the json itself
    and the drawn images); empty when ``json_path`` is not such a json."""
    try:
        with open(json_path, "r", encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return set()
    images = content.get("images") if isinstance(content, dict) else None
    if not isinstance(images, list) or not all(isinstance(i, dict) and isinstance(i.get("drawn_file"), str) for i in images):
        return set()
    return {os.path.realpath(json_path)} | {os.path.realpath(i["drawn_file"]) for i in images}


def refuse_overwriting_user_files(outputs: Sequence[str], json_path: str) -> None:
    """Raise before anything is written when an output would replace a file that no earlier
    ``predict`` / demo wrote (its predictions json lists what it wrote): a user's own file."""
    ours = earlier_outputs(json_path)
    foreign = [p for p in list(outputs) + [json_path] if os.path.exists(p) and os.path.realpath(p) not in ours]
    if foreign:
        raise FileExistsError(
            f"--output would overwrite {foreign[0]}{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''}, "
            f"which no earlier prediction there wrote ({json_path} does not list it): choose another --output"
        )
