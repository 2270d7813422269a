"""Solver of the torchvision front-end, as Detectron2's ``solver/``: parameter groups,
SGD, per-parameter gradient clipping and the learning-rate schedules.

* SGD with Detectron2's parameter groups (``SOLVER.WEIGHT_DECAY_NORM`` for
  normalization layers, ``SOLVER.BIAS_LR_FACTOR`` / ``WEIGHT_DECAY_BIAS`` for
  biases), optional per-parameter gradient clipping (``SOLVER.CLIP_GRADIENTS``);
* the ``WarmupMultiStepLR`` / ``WarmupCosineLR`` schedules, fvcore's
  ParamSchedulers composed as Detectron2's ``build_lr_scheduler`` does: the
  learning rate of iteration ``i`` is ``BASE_LR * f(i / MAX_ITER)``,
  Detectron2's to the last bit.
"""
import logging
from collections import OrderedDict
from typing import List, Optional

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

logger = logging.getLogger(__name__)

__all__ = [
    "NORM_MODULE_TYPES",
    "LRMultiplier",
    "build_lr_scheduler",
    "build_optimizer",
    "clip_gradients",
    "get_default_optimizer_params",
    "lr_multiplier",
]

NORM_MODULE_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)  # fmt: skip


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
    change e.g. ``SOLVER.STEPS``. It holds torch's scheduler keys
    (``_step_count`` and ``_last_lr`` too, which Detectron2's drops), so a
    resumed run restores the scheduler exactly.
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
