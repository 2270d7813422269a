"""What the project's Detectron2 entry points (``train_net.py``, the demo) add to
Detectron2's own behaviour, so that they give the guarantees the torchvision
front-end gives:

* configs are read with a **safe** YAML loader: Detectron2's
  ``CfgNode.merge_from_file`` defaults to ``allow_unsafe=True``, under which a
  ``!!python/object/apply`` tag in a downloaded config runs code;
* every ``.pth`` checkpoint is read with ``torch.load(weights_only=True)``
  (:class:`CheckedCheckpointer`), whatever torch's default or
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say: no checkpoint can run code;
  ``.pkl`` weights (read with plain ``pickle`` by Detectron2's checkpointer,
  which can run code) load only with an explicit ``--allow-pickle``;
* weights that do not fit the model are refused: every tensor must come from
  the file for ``--eval-only``, the demo and ``--resume``, at least one when
  ``MODEL.WEIGHTS`` initialises a training run (:mod:`..weights_fit`);
* ``--eval-only`` refuses to evaluate a randomly initialised model (empty
  ``MODEL.WEIGHTS``);
* an integer written for a float key (``SOLVER.BASE_LR 1``) is accepted.

Detectron2 itself is not patched: these wrap its calls.
"""
import os
import pickle
from typing import Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg

from ..config import add_iou_aware_retinanet_config
from ..config_files import load_config
from ..weights_fit import check_weights_fit

__all__ = ["setup_project_cfg", "check_weights_file", "check_eval_weights", "CheckedCheckpointer"]

PICKLE_SUFFIXES = (".pkl", ".pickle")
# pycls files: Detectron2 reads them with a plain torch.load (code runs under the old default).
UNSAFE_SUFFIXES = PICKLE_SUFFIXES + (".pyth",)


def setup_project_cfg(config_file: str, opts: Sequence[str] = (), freeze: bool = True):
    """Detectron2's config + the project's keys + ``config_file`` (safe YAML) + ``opts``, checked
    (:func:`~iou_aware_retinanet.config_files.load_config`, shared with the torchvision front-end)."""
    cfg = get_cfg()
    add_iou_aware_retinanet_config(cfg)
    return load_config(cfg, config_file, opts, freeze=freeze)


def check_weights_file(path: str, allow_pickle: bool = False, key: str = "MODEL.WEIGHTS") -> None:
    """Refuse pickled weights unless the user opted in: unpickling a file can run any code."""
    if path and path.lower().endswith(UNSAFE_SUFFIXES) and not allow_pickle:
        raise ValueError(
            f"{key}={path!r} is a pickle file, which Detectron2 unpickles (plain pickle, or torch.load without "
            "weights_only for .pyth): it can run code. "
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


class CheckedCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` that runs no code from a file and loads only weights that fit.

    * ``.pth`` (and any non-pickle) files are read with ``torch.load(weights_only=True)``: an explicit
      argument, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` does not override (torch < 2.6 defaulted to
      ``weights_only=False``, under which a crafted checkpoint runs code);
    * ``.pkl`` / ``.pickle`` / ``.pyth`` files, which Detectron2 unpickles, only with ``allow_pickle``;
    * the weights must fit the model (:func:`~iou_aware_retinanet.weights_fit.check_weights_fit`):
      every tensor when ``require_all`` or when resuming (all checkpointables loaded), at least one otherwise.
    """

    def __init__(self, model, save_dir: str = "", *, require_all: bool = False, allow_pickle: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.require_all, self.allow_pickle = require_all, allow_pickle
        self._loading = None  # (path, whether every weight is required) during load()

    def load(self, path, checkpointables=None):
        # checkpointables None: everything is restored (a resume), so the model must fit entirely.
        self._loading = (path, self.require_all or checkpointables is None)
        try:
            return super().load(path, checkpointables=checkpointables)
        finally:
            self._loading = None

    def _load_file(self, filename):
        if filename.lower().endswith(UNSAFE_SUFFIXES):
            check_weights_file(filename, self.allow_pickle)
        return super()._load_file(filename)

    def _torch_load(self, f):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # an object weights_only does not read: possibly code
            raise RuntimeError(f"cannot read {f} with torch.load(weights_only=True) (it holds more than tensors): {e}") from e
        except (RuntimeError, EOFError, OSError) as e:
            raise RuntimeError(f"cannot read {f}: {e}. The file is truncated or not a PyTorch checkpoint") from e

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        path, require_all = self._loading or ("the checkpoint", self.require_all)
        # pixel_mean / pixel_std come from the config (Detectron2 never reports them missing).
        model_keys = [k for k in self.model.state_dict() if k not in ("pixel_mean", "pixel_std")]
        check_weights_fit(
            path, model_keys, incompatible.missing_keys, incompatible.incorrect_shapes,
            require_all=require_all, purpose="evaluation, the demo, export and resume",
        )
        return incompatible
