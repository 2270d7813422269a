"""What the project's Detectron2 entry points (``train_net.py``, the demo) add to
Detectron2's own behaviour, so that they give the guarantees the torchvision
front-end gives:

* configs are read with a **safe** YAML loader: Detectron2's
  ``CfgNode.merge_from_file`` defaults to ``allow_unsafe=True``, under which a
  ``!!python/object/apply`` tag in a downloaded config runs code;
* ``.pkl`` weights (read with plain ``pickle`` by Detectron2's checkpointer,
  which can run code) load only with an explicit ``--allow-pickle``;
* ``--eval-only`` refuses to evaluate a randomly initialised model (empty
  ``MODEL.WEIGHTS``);
* an integer written for a float key (``SOLVER.BASE_LR 1``) is accepted.

Detectron2 itself is not patched: these wrap its calls.
"""
import os
from typing import Sequence

from detectron2.config import get_cfg

from ..config import add_iou_aware_retinanet_config
from ..config_files import load_config

__all__ = ["setup_project_cfg", "check_weights_file", "check_eval_weights"]

PICKLE_SUFFIXES = (".pkl", ".pickle")


def setup_project_cfg(config_file: str, opts: Sequence[str] = (), freeze: bool = True):
    """Detectron2's config + the project's keys + ``config_file`` (safe YAML) + ``opts``, checked
    (:func:`~iou_aware_retinanet.config_files.load_config`, shared with the torchvision front-end)."""
    cfg = get_cfg()
    add_iou_aware_retinanet_config(cfg)
    return load_config(cfg, config_file, opts, freeze=freeze)


def check_weights_file(path: str, allow_pickle: bool = False, key: str = "MODEL.WEIGHTS") -> None:
    """Refuse pickled weights unless the user opted in: unpickling a file can run any code."""
    if path and path.lower().endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise ValueError(
            f"{key}={path!r} is a pickle file, which Detectron2 reads with plain pickle (it can run code). "
            "Pass --allow-pickle if you trust the file, or convert it to a .pth state dict."
        )


def check_eval_weights(cfg, resume: bool = False) -> None:
    """``--eval-only`` needs trained weights: MODEL.WEIGHTS, or OUTPUT_DIR/last_checkpoint with --resume."""
    has_last = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not cfg.MODEL.WEIGHTS and not has_last:
        raise ValueError(
            "--eval-only with MODEL.WEIGHTS empty would evaluate a randomly initialised model: "
            "pass MODEL.WEIGHTS path/to/model_final.pth (or --resume with an OUTPUT_DIR holding a run)"
        )
    if cfg.MODEL.WEIGHTS and not cfg.MODEL.WEIGHTS.startswith(("detectron2://", "http://", "https://")):
        if not os.path.isfile(cfg.MODEL.WEIGHTS):
            raise FileNotFoundError(f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r}: file not found")
