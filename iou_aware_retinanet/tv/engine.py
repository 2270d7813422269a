"""Training and evaluation loop of the torchvision front-end, with Detectron2's semantics.

    from iou_aware_retinanet.tv import get_cfg
    from iou_aware_retinanet.tv.engine import train, load_model, evaluate

    cfg = get_cfg(); cfg.merge_from_file("configs/Shapes/iou_aware_retinanet.yaml")
    results = train(cfg)                 # {"shapes_val": {"bbox": {"AP": ..., ...}}}
    model = load_model(cfg, "output/.../model_final.pth")
    result = evaluate(cfg, model, "shapes_val")   # metrics and COCO detections

What :func:`train` does, as Detectron2's ``DefaultTrainer`` would:

* SGD with Detectron2's parameter groups (``SOLVER.WEIGHT_DECAY_NORM`` for
  normalization layers, ``SOLVER.BIAS_LR_FACTOR`` / ``WEIGHT_DECAY_BIAS`` for
  biases), optional per-parameter gradient clipping
  (``SOLVER.CLIP_GRADIENTS``), and the ``WarmupMultiStepLR`` /
  ``WarmupCosineLR`` schedules, fvcore's ParamSchedulers composed as
  Detectron2's ``build_lr_scheduler`` does: the learning rate of iteration
  ``i`` is ``BASE_LR * f(i / MAX_ITER)``, Detectron2's to the last bit;
* a tqdm progress bar (losses, learning rate, it/s); every 20 iterations a
  line in ``OUTPUT_DIR/log.txt`` and a json object in
  ``OUTPUT_DIR/metrics.json`` (window medians of the losses, as Detectron2);
* a checkpoint ``model_<iter>.pth`` after every ``SOLVER.CHECKPOINT_PERIOD``
  iterations and ``model_final.pth`` at the end, each written atomically,
  ``last_checkpoint`` naming the newest (fvcore's ``Checkpointer``, see
  :class:`.checkpoint.Checkpointer`); they hold the model, optimizer,
  scheduler, iteration and seed, and load with ``torch.load(weights_only=True)``;
* ``resume=True`` continues from ``last_checkpoint``: the data order, the
  flips and the global RNG are functions of ``(seed, iteration)``
  (:mod:`.data`; the global generator is reseeded each iteration), so a
  resumed run ends with the same weights as an uninterrupted one;
* a non-finite loss stops the run with :class:`NonFiniteLossError` before
  the optimizer step, so no checkpoint holds the damage;
* evaluation on ``DATASETS.TEST`` every ``TEST.EVAL_PERIOD`` iterations
  (0: never) and after the last one;
* under torchrun (:mod:`.distributed`): ``SOLVER.IMS_PER_BATCH`` is the total
  batch, split over the processes; DistributedDataParallel for the training
  step; rank 0 alone writes files; evaluation sharded over the processes.
"""
import contextlib
import datetime
import inspect
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)
from torch import nn
from tqdm import tqdm

from . import checkpoint as _checkpoint
from .checkpoint import load_checkpoint, load_weights, write_last_checkpoint
from ..atomic import atomic_write
from ..data.coco import read_image_rgb
from ..faults import (
    NonFiniteLossError, NonFiniteWeightsError, last_good_note, non_finite_tensors, non_finite_weights_error,
    resume_candidates,
)  # fmt: skip
from .data import (
    build_train_loader, check_batch_divisible, dataset_class_names, derive_seed, load_dataset, load_train_records,
    resolve_dataset,
)  # fmt: skip
from .evaluation import EvaluationResult, check_num_classes, curve_table, safe_folder_name, evaluate, evaluation_points, format_metrics_table, read_metrics
from .config import check_cfg
from .model import build_model
from . import distributed as comm

logger = logging.getLogger(__name__)
# Every-20-iterations lines: log.txt only (the console has the progress bar).
progress_logger = logging.getLogger(__name__ + ".progress")

__all__ = [
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "non_finite_tensors",
    "LRMultiplier",
    "build_lr_scheduler",
    "build_optimizer",
    "evaluate",
    "evaluate_all",
    "get_default_optimizer_params",
    "load_model",
    "lr_multiplier",
    "resolve_seed",
    "seed_all",
    "train",
]

LOG_PERIOD = 20
NORM_MODULE_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)  # fmt: skip


# --------------------------------------------------------------------------- seeds


def resolve_seed(cfg) -> int:
    """``SEED``, or a fresh random seed when it is negative (Detectron2's ``-1``).

    With several processes the one drawn on rank 0 is used by all: the data
    order and the initial weights must agree across ranks."""
    if cfg.SEED >= 0:
        return int(cfg.SEED)
    seed = os.getpid() + int(datetime.datetime.now().strftime("%S%f")) + int.from_bytes(os.urandom(2), "big")
    seed = comm.broadcast_object(seed)
    logger.info("SEED is %d: using the random seed %d", cfg.SEED, seed)
    return seed


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- optimizer


def get_default_optimizer_params(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: Optional[float] = None,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: Optional[float] = None,
) -> List[dict]:
    """Detectron2's parameter groups: normalization parameters get ``weight_decay_norm``;
    parameters named ``bias`` get ``base_lr * bias_lr_factor`` and, when set,
    ``weight_decay_bias`` (which then wins over ``weight_decay_norm`` for norm
    biases, as in Detectron2). Frozen and shared parameters are counted once.
    Parameters with equal hyper-parameters share a group, in model order."""
    groups: "OrderedDict[tuple, List[nn.Parameter]]" = OrderedDict()
    seen = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr, decay = base_lr, weight_decay
            if isinstance(module, NORM_MODULE_TYPES) and weight_decay_norm is not None:
                decay = weight_decay_norm
            if name == "bias":
                lr = base_lr * bias_lr_factor
                if weight_decay_bias is not None:
                    decay = weight_decay_bias
            groups.setdefault((lr, decay), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.SGD:
    """SGD over :func:`get_default_optimizer_params` (Detectron2's ``build_optimizer``)."""
    solver = cfg.SOLVER
    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        bias_lr_factor=solver.BIAS_LR_FACTOR,
        weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
    )
    return torch.optim.SGD(
        params, lr=solver.BASE_LR, momentum=solver.MOMENTUM, nesterov=solver.NESTEROV,
        weight_decay=solver.WEIGHT_DECAY,
    )


def clip_gradients(cfg, optimizer: torch.optim.Optimizer) -> None:
    """``SOLVER.CLIP_GRADIENTS``, per parameter as Detectron2 does: each parameter's
    gradient values ("value") or gradient norm ("norm") is clipped on its own."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            if clip.CLIP_TYPE == "value":
                torch.nn.utils.clip_grad_value_(param, clip.CLIP_VALUE)
            else:
                torch.nn.utils.clip_grad_norm_(param, clip.CLIP_VALUE, clip.NORM_TYPE)


# --------------------------------------------------------------------------- learning rate


def _steps(cfg) -> List[int]:
    steps = [int(s) for s in cfg.SOLVER.STEPS]
    kept = [s for s in steps if s <= cfg.SOLVER.MAX_ITER]
    if len(kept) != len(steps):
        logger.warning("SOLVER.STEPS %s: values beyond SOLVER.MAX_ITER %d are ignored", steps, cfg.SOLVER.MAX_ITER)
    return kept


def _multi_step(cfg) -> MultiStepParamScheduler:
    """``GAMMA ** (number of STEPS <= iteration)``. fvcore wants milestones strictly inside
    (0, MAX_ITER): a step at 0 (or repeated) goes into the values instead, and one at
    MAX_ITER changes no trained iteration. For the usual increasing steps in between
    these are Detectron2's values, ``GAMMA ** k``."""
    steps = _steps(cfg)
    milestones = sorted({s for s in steps if 0 < s < cfg.SOLVER.MAX_ITER})
    values = [cfg.SOLVER.GAMMA ** sum(s <= m for s in steps) for m in [0] + milestones]
    return MultiStepParamScheduler(values=values, milestones=milestones, num_updates=cfg.SOLVER.MAX_ITER)


def _with_warmup(schedule: ParamScheduler, factor: float, length: float, method: str) -> CompositeParamScheduler:
    """``schedule`` preceded by a warmup over the first ``length`` (a fraction) of training:
    "linear" from ``factor * schedule(0)`` to ``schedule(length)``, "constant" at the former.

    Detectron2's ``WarmupParamScheduler`` (without ``RESCALE_INTERVAL``, a key this
    front-end does not have), composed here from fvcore's schedulers: fvcore has no
    warmup scheduler and this front-end must run without Detectron2.
    """
    start = factor * schedule(0.0)
    if method == "constant":
        warmup = ConstantParamScheduler(start)
    elif method == "linear":
        warmup = LinearParamScheduler(start, schedule(length))
    else:
        raise ValueError(f"SOLVER.WARMUP_METHOD={method!r}; supported: 'linear', 'constant'")
    return CompositeParamScheduler(
        [warmup, schedule], lengths=[length, 1.0 - length], interval_scaling=["rescaled", "fixed"]
    )


def lr_multiplier(cfg) -> ParamScheduler:
    """The learning rate divided by the base one, as a function of ``where = iteration / MAX_ITER``.

    WarmupMultiStepLR: ``GAMMA ** (number of STEPS <= iteration)``; WarmupCosineLR:
    from 1 down to ``BASE_LR_END / BASE_LR`` over ``MAX_ITER``. Before
    ``WARMUP_ITERS`` (capped at ``MAX_ITER``): "linear" goes from
    ``WARMUP_FACTOR`` times the schedule's value at 0 to its value at the end
    of the warmup; "constant" stays at the former.
    """
    solver = cfg.SOLVER
    if solver.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
        schedule = _multi_step(cfg)
    elif solver.LR_SCHEDULER_NAME == "WarmupCosineLR":
        schedule = CosineParamScheduler(1.0, solver.BASE_LR_END / solver.BASE_LR)
    else:
        raise ValueError(
            f"SOLVER.LR_SCHEDULER_NAME={solver.LR_SCHEDULER_NAME!r}; supported: 'WarmupMultiStepLR', 'WarmupCosineLR'"
        )
    length = min(solver.WARMUP_ITERS / solver.MAX_ITER, 1.0)
    return _with_warmup(schedule, solver.WARMUP_FACTOR, length, solver.WARMUP_METHOD)


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """``lr = initial_lr * multiplier(last_epoch / max_iter)`` for every group; ``step()`` after each iteration.

    Detectron2's ``LRMultiplier``, written here (fvcore has none; Detectron2 may
    not be imported by this front-end). Its ``state_dict`` is the position
    only: the schedule itself comes from the config, so a resumed run may
    change e.g. ``SOLVER.STEPS``. It holds the keys the earlier hand-written
    scheduler saved (``_step_count`` and ``_last_lr`` too, which Detectron2's
    drops), so checkpoints of either resume exactly.
    """

    _STATE = ("last_epoch", "base_lrs", "_step_count", "_last_lr")

    def __init__(self, optimizer, multiplier: ParamScheduler, max_iter: int, last_iter: int = -1):
        if not isinstance(multiplier, ParamScheduler):
            raise TypeError(f"multiplier must be an fvcore ParamScheduler, got {type(multiplier).__name__}")
        self._multiplier, self._max_iter = multiplier, max_iter
        super().__init__(optimizer, last_iter)

    def get_lr(self) -> List[float]:
        multiplier = self._multiplier(self.last_epoch / self._max_iter)
        return [base * multiplier for base in self.base_lrs]

    def state_dict(self) -> dict:
        return {key: self.__dict__[key] for key in self._STATE if key in self.__dict__}

    def load_state_dict(self, state_dict: dict) -> None:
        missing = [key for key in ("last_epoch", "base_lrs") if key not in state_dict]
        if missing:
            raise ValueError(f"the checkpoint's scheduler state has no {', '.join(missing)}: cannot resume its position")
        self.__dict__.update({key: state_dict[key] for key in self._STATE if key in state_dict})


def build_lr_scheduler(cfg, optimizer) -> LRMultiplier:
    """Detectron2's ``build_lr_scheduler``: :func:`lr_multiplier` driving every group of ``optimizer``."""
    return LRMultiplier(optimizer, lr_multiplier(cfg), max_iter=cfg.SOLVER.MAX_ITER)


# --------------------------------------------------------------------------- checkpoints and logs


class Checkpointer(_checkpoint.Checkpointer):
    """Saves and restores everything an exact resume needs, in ``output_dir``.

    fvcore's ``Checkpointer`` through :class:`.checkpoint.Checkpointer` (weights_only
    reads, atomic writes), with: saving refused for NaN / inf weights, BatchNorm
    buffers given by the caller, a strict model load on resume, and a fallback to
    the newest older readable checkpoint when the named one is truncated.
    """

    def __init__(self, output_dir: str, model, optimizer, scheduler):
        super().__init__(model, output_dir, optimizer=optimizer, scheduler=scheduler)
        self.output_dir, self.optimizer, self.scheduler = output_dir, optimizer, scheduler
        self.last_saved: Optional[str] = None  # the newest checkpoint written or resumed from
        self._loaded: Optional[str] = None  # the file _load_file read

    def last_good_note(self) -> str:
        return last_good_note(self.last_saved)

    def save(self, name: str, iteration: int, seed: int, buffers: Optional[Dict[str, torch.Tensor]] = None) -> str:
        """Write ``name``.pth; refuses (NonFiniteWeightsError) when a weight is NaN or inf.

        ``buffers`` replace the model's own (BatchNorm statistics taken before a forward pass)."""
        state = self.model.state_dict()
        if buffers:
            state.update(buffers)
        bad = non_finite_tensors(state)
        if comm.get_world_size() > 1:
            bad = comm.broadcast_object(bad)  # rank 0's verdict: every rank raises together, or none
        if bad:
            raise non_finite_weights_error(bad, iteration, name, self.last_saved)
        if comm.is_main_process():
            path = super().save(name, state=state, iteration=int(iteration), seed=int(seed))
        else:  # only rank 0 writes (the weights are the same on every rank)
            path = os.path.join(self.output_dir, f"{name}.pth")
        self.last_saved = path
        logger.info("Saved checkpoint %s (iteration %d)", path, iteration)
        return path

    def resume(self) -> Optional[dict]:
        """Load ``last_checkpoint`` into model, optimizer and scheduler; None when there is none.

        Returns what else the checkpoint holds (``iteration``, ``seed``)."""
        if not self.has_checkpoint():
            return None
        extra = self.load(self.get_checkpoint_file())  # fvcore: _load_file, _load_model, then the checkpointables
        self.last_saved = self._loaded
        logger.info("Resuming from %s (iteration %d)", self.last_saved, extra["iteration"])
        return extra

    def _load_file(self, f: str) -> dict:
        checkpoint, self._loaded = self._load_newest_readable(f)
        missing = [key for key in ("optimizer", "scheduler", "iteration", "seed") if key not in checkpoint]
        if missing:
            raise ValueError(f"{self._loaded} cannot be resumed from: it has no {', '.join(missing)}")
        return checkpoint

    def _load_model(self, checkpoint: dict):
        # Strict, unlike fvcore's (which skips mismatched shapes and missing keys with a
        # warning): a resume restores every tensor of this model, or fails.
        self.model.load_state_dict(checkpoint.pop("model"))
        return None  # nothing incompatible to log

    def _load_newest_readable(self, named: str):
        """``named`` loaded, or else the newest older ``model_*.pth`` that loads (a truncated
        file, e.g. from a full disk, falls back to the previous good checkpoint)."""
        errors = []
        for path in resume_candidates(self.output_dir, named):
            try:
                checkpoint = load_checkpoint(path)
            except (OSError, RuntimeError, ValueError, EOFError) as e:
                errors.append(f"{path}: {e}")
                logger.warning("Cannot read checkpoint %s (%s); trying an older one", path, e)
                continue
            if path != named:
                logger.warning("%s is unreadable: resuming from the older checkpoint %s", named, path)
                if comm.is_main_process():
                    write_last_checkpoint(self.output_dir, os.path.basename(path))
            return checkpoint, path
        raise RuntimeError("no readable checkpoint to resume from in " + self.output_dir + ":\n" + "\n".join(errors))


_WARNED_NO_TENSORBOARD = False


class MetricsWriter:
    """Detectron2's ``JSONWriter`` + ``CommonMetricPrinter`` + ``TensorboardXWriter``: window
    medians every ``period`` iterations, and every record also as TensorBoard scalars in
    ``OUTPUT_DIR`` (when the ``tensorboard`` package is installed: the ``tensorboard`` extra)."""

    def __init__(self, output_dir: str, max_iter: int, period: int = LOG_PERIOD):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "metrics.json")
        self.max_iter, self.period = max_iter, period
        self.window: List[Dict[str, float]] = []
        self._events = None  # torch.utils.tensorboard.SummaryWriter, opened at the first record
        self.enabled = comm.is_main_process()  # rank 0 writes the run's metrics; the others nothing

    def _event_writer(self):
        if self._events is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package
                global _WARNED_NO_TENSORBOARD
                if not _WARNED_NO_TENSORBOARD:
                    logger.info("No TensorBoard events: the tensorboard package is not installed (pip install tensorboard)")
                    _WARNED_NO_TENSORBOARD = True
                self._events = False
            else:
                self._events = SummaryWriter(self.output_dir)
        return self._events

    def close(self) -> None:
        if self._events:
            self._events.close()
        self._events = None

    def truncate_after(self, iteration: int) -> None:
        """Drop lines past ``iteration`` (left by a run killed after its last checkpoint)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path, "r", encoding="utf-8") as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("iteration", -1) <= iteration]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(lines)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        events = self._event_writer()
        if events:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    events.add_scalar(key, value, record["iteration"])
            events.flush()

    def add(self, iteration: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.window.append(values)
        if (iteration + 1) % self.period == 0 or iteration == self.max_iter - 1:
            self.flush(iteration)

    def flush(self, iteration: int) -> None:
        keys = [k for k in self.window[-1] if k not in ("lr", "time", "data_time")]
        record = {"iteration": iteration}
        record.update({k: statistics.median(v[k] for v in self.window) for k in keys})
        record["lr"] = self.window[-1]["lr"]
        record["time"] = statistics.mean(v["time"] for v in self.window)
        record["data_time"] = statistics.mean(v["data_time"] for v in self.window)
        record["eta_seconds"] = record["time"] * (self.max_iter - iteration - 1)
        self.write(record)
        eta = str(datetime.timedelta(seconds=int(record["eta_seconds"])))
        losses = "  ".join(f"{k}: {record[k]:.4g}" for k in keys)
        progress_logger.info(
            "eta: %s  iter: %d  %s  time: %.4f  data_time: %.4f  lr: %.6g",
            eta, iteration, losses, record["time"], record["data_time"], record["lr"],
        )
        self.window = []


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(progress_logger.name)


@contextlib.contextmanager
def log_to_file(output_dir: str):
    """Append the project's INFO logs to ``output_dir/log.txt`` for the duration of the block
    (rank 0 only: the other processes of a torchrun job write no file)."""
    if not comm.is_main_process():
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    project = logging.getLogger("iou_aware_retinanet")
    handler = logging.FileHandler(os.path.join(output_dir, "log.txt"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S"))
    old_level = project.level
    if project.getEffectiveLevel() > logging.INFO:
        project.setLevel(logging.INFO)
    project.addHandler(handler)
    try:
        yield
    finally:
        project.removeHandler(handler)
        project.setLevel(old_level)
        handler.close()


def console_filter() -> logging.Filter:
    """Keeps the every-20-iterations lines off a console handler (see :func:`.cli.setup_logging`)."""
    return _ConsoleFilter()


def save_config(cfg, path: str) -> None:
    with atomic_write(path) as f:
        f.write(cfg.dump())


# --------------------------------------------------------------------------- evaluation


def load_model(cfg, weights: str):
    """The model of ``cfg`` with ``weights`` loaded, in eval mode."""
    check_cfg(cfg)  # the run's keys (INPUT: the test-time resizing); build_model checks the model's
    model = build_model(cfg)
    incompatible = load_weights(model, weights)
    # Evaluating or predicting with layers left at their initialisation reports the
    # results of a partly random model as if they were real: refuse.
    # Training statistics inference does not use: BatchNorm's step counter, the loss normalizer's average.
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked") and k != "loss_normalizer_ema"]
    if missing:
        raise ValueError(
            f"{weights} does not hold every weight of this model ({len(missing)} missing, e.g. "
            f"{', '.join(missing[:3])}): evaluation and prediction need a checkpoint trained with this config"
        )
    return model.eval()


def evaluate_all(cfg, model) -> "OrderedDict[str, Dict[str, Dict[str, float]]]":
    """Evaluate on every ``DATASETS.TEST`` dataset: ``{name: {"bbox": metrics}}``, like Detectron2's ``test``."""
    results = OrderedDict()
    for name in cfg.DATASETS.TEST:
        result: Optional[EvaluationResult] = evaluate(cfg, model, name)  # every rank: sharded
        if result is not None:  # rank 0 (Detectron2's non-main processes get {} too)
            results[name] = {"bbox": result.metrics}
    return results


def _flatten(results: Dict[str, Dict[str, Dict[str, float]]]) -> Dict[str, float]:
    """Detectron2's ``flatten_results_dict`` of what ``test`` returns (one dataset: no dataset prefix)."""
    if len(results) == 1:
        results = next(iter(results.values()))
        return {f"{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items()}
    return {f"{name}/{task}/{k}": v for name, r in results.items() for task, m in r.items() for k, v in m.items()}


# --------------------------------------------------------------------------- training


def _to_device(images, targets, device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def _check_finite(loss_dict: Dict[str, torch.Tensor], total: torch.Tensor, iteration: int) -> None:
    if comm.get_world_size() > 1:
        return _check_finite_all_ranks(loss_dict, total, iteration)
    if torch.isfinite(total) and all(torch.isfinite(v) for v in loss_dict.values()):
        return
    _raise_non_finite(loss_dict, total, iteration)


def _check_finite_all_ranks(loss_dict: Dict[str, torch.Tensor], total: torch.Tensor, iteration: int) -> None:
    # Every rank learns whether any rank's loss is bad, so that all stop here: one rank
    # raising alone would leave the others waiting in the backward pass's all-reduce.
    bad = not (torch.isfinite(total) and all(torch.isfinite(v) for v in loss_dict.values()))
    if not comm.any_true(bad):
        return
    if bad:
        _raise_non_finite(loss_dict, total, iteration)
    raise NonFiniteLossError(
        f"Loss became infinite or NaN at iteration {iteration} in another process (this is rank "
        f"{comm.get_rank()}). Training stopped before the optimizer step; no checkpoint holds weights that "
        "gave this loss. Try a lower SOLVER.BASE_LR, a longer SOLVER.WARMUP_ITERS or SOLVER.CLIP_GRADIENTS."
    )


def _raise_non_finite(loss_dict: Dict[str, torch.Tensor], total: torch.Tensor, iteration: int) -> None:
    terms = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in loss_dict.items())
    raise NonFiniteLossError(
        f"Loss became infinite or NaN at iteration {iteration}: total={float(total.detach()):.6g} ({terms}). "
        "Training stopped before the optimizer step; no checkpoint holds weights that gave this loss. "
        "Try a lower SOLVER.BASE_LR, a longer SOLVER.WARMUP_ITERS or SOLVER.CLIP_GRADIENTS."
    )


def run_step(cfg, model, optimizer, scheduler, images, targets, iteration: int, before_update=None) -> Dict[str, float]:
    """One SGD step; returns the loss values. Raises :class:`NonFiniteLossError` before stepping.

    ``before_update()`` runs once the loss is known to be finite, before the
    weights change: the weights are then those the previous step left, proven
    usable by a finite loss (the engine writes its periodic checkpoints there).

    ``model`` may be a ``DistributedDataParallel`` wrapper: the returned values are
    then the means over the processes (Detectron2's ``_write_metrics``).
    """
    loss_dict = model(images, targets)
    total = sum(loss_dict.values())
    _check_finite(loss_dict, total, iteration)
    if before_update is not None:
        before_update()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    clip_gradients(cfg, optimizer)
    optimizer.step()
    scheduler.step()
    values = {"total_loss": float(total.detach())}
    values.update({k: float(v.detach()) for k, v in loss_dict.items()})
    values.update(getattr(_unwrap(model), "training_metrics", None) or {})  # e.g. loss_iou_minus_entropy
    if comm.get_world_size() > 1:
        values = comm.all_reduce_mean(values)
    return values


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _wrap_ddp(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes (itself otherwise).

    As Detectron2's ``create_ddp_model``: ``broadcast_buffers=False``, each
    process keeps its own BatchNorm statistics and loss-normalizer average
    (rank 0's are the ones checkpointed)."""
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    device_ids = [device.index if device.index is not None else comm.get_local_rank()] if device.type == "cuda" else None
    # Newer torch renamed the option (the old name warns); both mean "no buffer sync per forward".
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **no_sync)


def _next_batch(data_iter, iteration: int):
    try:
        return next(data_iter)
    except Exception as e:
        if hasattr(e, "add_note"):
            e.add_note(f"(while loading the training batch of iteration {iteration})")
        raise


def _lr_of_largest_group(optimizer) -> float:
    return max(optimizer.param_groups, key=lambda g: len(g["params"]))["lr"]


def _progress_bar(start_iter: int, max_iter: int) -> tqdm:
    tty = sys.stderr.isatty()
    return tqdm(
        total=max_iter, initial=start_iter, desc="train", unit="it", dynamic_ncols=True,
        mininterval=0.5 if tty else 30.0, file=sys.stderr, disable=not comm.is_main_process(),
    )  # fmt: skip


def do_train(cfg, model, optimizer, scheduler, checkpointer, start_iter: int, seed: int, records) -> None:
    """Iterations ``start_iter .. MAX_ITER - 1``, with logging, checkpoints and periodic evaluation."""
    max_iter, device = cfg.SOLVER.MAX_ITER, next(model.parameters()).device
    writer = MetricsWriter(cfg.OUTPUT_DIR, max_iter)
    writer.truncate_after(start_iter - 1)
    loader = build_train_loader(cfg, seed, start_iter, records)
    data_iter = iter(loader)
    bar = _progress_bar(start_iter, max_iter)
    model.train()
    trained = _wrap_ddp(model)  # the training forward / backward; model stays the unwrapped one
    pending = _PendingCheckpoint(checkpointer, seed)
    train_start, iteration = time.perf_counter(), start_iter - 1
    try:
        for iteration in range(start_iter, max_iter):
            start = time.perf_counter()
            images, targets = _to_device(*_next_batch(data_iter, iteration), device)
            data_time = time.perf_counter() - start
            # Anything random in the step (e.g. the model's size sampling) depends on (seed, iteration) only.
            torch.manual_seed(derive_seed(seed, 2, iteration))
            lr = _lr_of_largest_group(optimizer)
            pending.before_forward(model)
            try:
                values = run_step(cfg, trained, optimizer, scheduler, images, targets, iteration, pending.save)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{e} {checkpointer.last_good_note()}") from None
            values.update(lr=lr, time=time.perf_counter() - start, data_time=data_time)
            writer.add(iteration, values)
            bar.set_postfix_str(
                " ".join(f"{k.replace('loss_', '')}={values[k]:.3f}" for k in values if "loss" in k) + f" lr={lr:.4g}",
                refresh=False,
            )
            bar.update(1)
            _after_step(cfg, model, checkpointer, writer, iteration, seed, pending)
    finally:
        bar.close()
        writer.close()
        del data_iter  # shuts the workers down
    done = iteration + 1 - start_iter if max_iter > start_iter else 0
    if done:
        elapsed = time.perf_counter() - train_start
        logger.info(
            "Trained %d iterations in %.1f s: %.2f it/s, %.1f images/s",
            done, elapsed, done / elapsed, done * cfg.SOLVER.IMS_PER_BATCH / elapsed,
        )


class _PendingCheckpoint:
    """A periodic checkpoint of iteration i is written during iteration i + 1, once its loss
    is finite and before the weights change (so, from weights that still give a finite
    loss: a step that blew the weights up to 1e15 without NaN yet is never saved)."""

    def __init__(self, checkpointer, seed: int):
        self.checkpointer, self.seed, self.due, self.buffers = checkpointer, seed, None, None

    def before_forward(self, model) -> None:
        # A training forward pass updates BatchNorm's running statistics: keep those of
        # iteration i, so the checkpoint holds exactly the state after iteration i.
        if self.due is not None:
            names = {k for k, _ in model.named_buffers()}
            self.buffers = {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}

    def save(self) -> None:
        if self.due is not None:
            name, iteration = self.due
            self.due = None
            self.checkpointer.save(name, iteration, self.seed, self.buffers)
            self.buffers = None



def _after_step(cfg, model, checkpointer, writer, iteration: int, seed: int, pending: _PendingCheckpoint) -> None:
    next_iter, max_iter = iteration + 1, cfg.SOLVER.MAX_ITER
    if next_iter == max_iter:
        pending.due = None  # superseded by model_final (no next loss: weights checked for NaN / inf only)
        checkpointer.save("model_final", iteration, seed)
    elif next_iter % cfg.SOLVER.CHECKPOINT_PERIOD == 0:
        pending.due = (f"model_{iteration:07d}", iteration)
    period = cfg.TEST.EVAL_PERIOD
    if period > 0 and next_iter % period == 0 and next_iter != max_iter and cfg.DATASETS.TEST:
        results = evaluate_all(cfg, model)
        writer.write({"iteration": iteration, **_flatten(results)})
        model.train()


def _check_test_datasets(cfg, class_names: List[str]) -> None:
    """Fail on unknown test dataset names before training; warn when their classes differ."""
    for name in cfg.DATASETS.TEST:
        resolve_dataset(cfg, name, "DATASETS.TEST")
        safe_folder_name(name)
        names = dataset_class_names(cfg, name)
        if names is not None and cfg.MODEL.RETINANET.NUM_CLASSES > len(names):
            check_num_classes(cfg, name, names)  # fails now, not after training
        if names is not None and names != class_names:
            logger.warning("DATASETS.TEST %r has classes %s, the training data %s", name, names, class_names)
        _check_images_decode(load_dataset(cfg, name, "DATASETS.TEST"), name)


def _check_images_decode(data, name: str) -> None:
    """Decode every test image once before training: a corrupt file fails now, not after the run."""
    start = time.perf_counter()
    for record in data.records:
        try:
            read_image_rgb(record.file_name)
        except OSError as e:
            raise OSError(f"DATASETS.TEST {name!r}: {e} (checked before training)") from None
    logger.info("Checked %d images of %s in %.1f s", len(data.records), name, time.perf_counter() - start)


def train(cfg, resume: bool = False) -> "OrderedDict[str, Dict[str, Dict[str, float]]]":
    """Train as the config says, then evaluate on ``DATASETS.TEST``; returns those results.

    ``resume``: continue from ``OUTPUT_DIR/last_checkpoint`` when there is
    one; otherwise start at iteration 0 from ``MODEL.WEIGHTS`` (model weights
    only), as Detectron2's ``resume_or_load``.
    """
    cfg = cfg.clone()
    cfg.freeze()
    check_cfg(cfg)  # the run's keys (SOLVER included): fail before any data is read
    world = comm.get_world_size()
    if world > 1:
        check_batch_divisible(cfg, world)
    if not resume:
        _refuse_to_overwrite_a_run(cfg.OUTPUT_DIR)
    comm.synchronize()  # every rank has looked at OUTPUT_DIR before rank 0 writes into it
    if world > 1:
        _prepare_datasets_on_rank0(cfg)
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with log_to_file(cfg.OUTPUT_DIR):
        if comm.is_main_process():
            save_config(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
        logger.info("Full config saved to %s:\n%s", os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump())
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
        seed = resolve_seed(cfg)
        seed_all(seed)
        model = build_model(cfg)  # its builders validate the model's keys: before any data is read
        records, class_names = load_train_records(cfg)  # (no global RNG: the weights do not depend on the order)
        _check_test_datasets(cfg, class_names)
        optimizer = build_optimizer(cfg, model)
        scheduler = build_lr_scheduler(cfg, optimizer)
        checkpointer = Checkpointer(cfg.OUTPUT_DIR, model, optimizer, scheduler)
        start_iter = 0
        checkpoint = checkpointer.resume() if resume else None
        if checkpoint is not None:
            start_iter = int(checkpoint["iteration"]) + 1
            seed = _resumed_seed(cfg, seed, int(checkpoint["seed"]))
        elif cfg.MODEL.WEIGHTS:
            load_weights(model, cfg.MODEL.WEIGHTS)
        logger.info(
            "Training %d images of %s, iterations %d..%d, seed %d",
            len(records), ", ".join(cfg.DATASETS.TRAIN), start_iter, cfg.SOLVER.MAX_ITER - 1, seed,
        )
        do_train(cfg, model, optimizer, scheduler, checkpointer, start_iter, seed, records)
        results = evaluate_all(cfg, model)
        if results:  # rank 0
            final = MetricsWriter(cfg.OUTPUT_DIR, cfg.SOLVER.MAX_ITER)
            final.write({"iteration": cfg.SOLVER.MAX_ITER - 1, **_flatten(results)})
            final.close()
            _log_learning_curve(cfg.OUTPUT_DIR)
        return results


def _prepare_datasets_on_rank0(cfg) -> None:
    """Rank 0 resolves (and generates, for the built-in shapes splits) every dataset first,
    so the processes do not write the same files at once; an error stops every rank."""
    error = None
    if comm.is_main_process():
        try:
            for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
                for name in names:
                    resolve_dataset(cfg, name, key)
        except Exception as e:  # re-raised on rank 0 below, reported on the others
            error = e
    message = comm.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 could not prepare the datasets: {message}")


def _log_learning_curve(output_dir: str) -> None:
    points = evaluation_points(read_metrics(output_dir))
    if len(points) > 1:
        logger.info("Learning curve (%s/metrics.json):\n%s", output_dir, curve_table(points))


def _refuse_to_overwrite_a_run(output_dir: str) -> None:
    """A new run in the folder of another would mix their checkpoints and erase its history."""
    left = [f for f in ("last_checkpoint", "metrics.json", "model_final.pth") if os.path.exists(os.path.join(output_dir, f))]
    if left:
        raise FileExistsError(
            f"OUTPUT_DIR {output_dir} already holds a training run ({', '.join(left)}). Continue it with "
            "--resume, or start the new run in another OUTPUT_DIR (or delete the old one yourself)."
        )


def _resumed_seed(cfg, seed: int, checkpoint_seed: int) -> int:
    if cfg.SEED < 0:
        return checkpoint_seed
    if seed != checkpoint_seed:
        logger.warning(
            "SEED is %d but the checkpoint was trained with seed %d: the resumed run will not match an "
            "uninterrupted one", seed, checkpoint_seed,
        )
    return seed


__all__ += ["Checkpointer", "MetricsWriter", "do_train", "format_metrics_table", "log_to_file", "run_step"]
