"""Training and evaluation loop of the torchvision front-end, with Detectron2's semantics.

    from iou_aware_retinanet.tv import get_cfg
    from iou_aware_retinanet.tv.engine import train, load_model, evaluate

    cfg = get_cfg(); cfg.merge_from_file("configs/Shapes/iou_aware_retinanet.yaml")
    results = train(cfg)                 # {"shapes_val": {"bbox": {"AP": ..., ...}}}
    model = load_model(cfg, "output/.../model_final.pth")
    result = evaluate(cfg, model, "shapes_val")   # metrics and COCO detections

The loop, as Detectron2's ``DefaultTrainer``; its parts live where Detectron2
keeps them: the optimizer, gradient clipping and learning-rate schedules in
:mod:`.solver`, checkpoints in :mod:`.checkpoint` (when they are written:
:class:`~iou_aware_retinanet.faults.FiniteLossCheckpoints`), metrics and logs
in :mod:`.events`. What :func:`train` does:

* SGD with Detectron2's parameter groups, clipping and schedules (:mod:`.solver`);
* a tqdm progress bar (losses, learning rate, it/s); every 20 iterations a
  line in ``OUTPUT_DIR/log.txt`` and a json object in
  ``OUTPUT_DIR/metrics.json`` (window medians of the losses, as Detectron2);
* a checkpoint ``model_<iter>.pth`` after every ``SOLVER.CHECKPOINT_PERIOD``
  iterations (written once the next iteration's loss is finite) and
  ``model_final.pth`` at the end, each written atomically, ``last_checkpoint``
  naming the newest; they hold the model, optimizer, scheduler, iteration and
  seed, and load with ``torch.load(weights_only=True)``;
* ``resume=True`` continues from ``last_checkpoint``: the data order, the
  flips and the global RNG are functions of ``(seed, iteration)``
  (:mod:`.data`; the global generator is reseeded each iteration), so a
  resumed run ends with the same weights as an uninterrupted one;
* a non-finite loss stops the run with :class:`NonFiniteLossError` before
  the optimizer step, so no checkpoint holds the damage;
* ``SOLVER.AMP.ENABLED``: the forward pass under autocast (float16 and a
  ``GradScaler`` on CUDA, bfloat16 on the CPU; :mod:`.amp`), as Detectron2's
  ``AMPTrainer``; a step the scaler skips because the gradients overflowed is
  not a non-finite loss, and the scaler's state is in every checkpoint;
* evaluation on ``DATASETS.TEST`` every ``TEST.EVAL_PERIOD`` iterations
  (0: never) and after the last one;
* under torchrun (:mod:`.distributed`): ``SOLVER.IMS_PER_BATCH`` is the total
  batch, split over the processes; DistributedDataParallel for the training
  step; rank 0 alone writes files; evaluation sharded over the processes.
"""
import datetime
import inspect
import logging
import os
import random
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data.builtin import log_data_fingerprints
from ..data.coco import check_image_headers, check_images_decode
from ..faults import FiniteLossCheckpoints, NonFiniteLossError, NonFiniteWeightsError, non_finite_tensors
from .checkpoint import Checkpointer, load_weights
from .data import (
    build_train_loader, check_batch_divisible, dataset_class_names, derive_seed, load_dataset, load_train_records,
    resolve_dataset,
)  # fmt: skip
from .evaluation import EvaluationResult, check_num_classes, curve_table, safe_folder_name, evaluate, evaluation_points, format_metrics_table, read_metrics
from .config import check_cfg
from .events import LOG_PERIOD, MetricsWriter, console_filter, log_to_file
from .model import build_model
from .solver import (
    NORM_MODULE_TYPES, LRMultiplier, build_lr_scheduler, build_optimizer, clip_gradients, get_default_optimizer_params,
    lr_multiplier,
)  # fmt: skip
from . import amp
from . import distributed as comm
from ..run_folder import claim_output_dir, save_config
from ..weights_fit import check_weights_fit

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- evaluation


def load_model(cfg, weights: str):
    """The model of ``cfg`` with ``weights`` loaded, in eval mode."""
    check_cfg(cfg)  # the run's keys (INPUT: the test-time resizing); build_model checks the model's
    model = build_model(cfg)
    incompatible = load_weights(model, weights)
    # Evaluating, predicting or exporting with layers left at their initialisation reports
    # the results of a partly random model as if they were real: refuse.
    check_weights_fit(
        weights, model.state_dict().keys(), incompatible.missing_keys, incompatible.incorrect_shapes,
        require_all=True, purpose="evaluation, prediction and export",
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


def run_step(
    cfg, model, optimizer, scheduler, images, targets, iteration: int, before_update=None, grad_scaler=None
) -> Dict[str, float]:
    """One SGD step; returns the loss values. Raises :class:`NonFiniteLossError` before stepping.

    ``before_update()`` runs once the loss is known to be finite, before the
    weights change: the weights are then those the previous step left, proven
    usable by a finite loss (the engine writes its periodic checkpoints there).

    With ``SOLVER.AMP.ENABLED`` the forward pass runs under autocast; a
    ``grad_scaler`` (float16) scales the loss for the backward pass, as
    Detectron2's ``AMPTrainer``: clipping sees the unscaled gradients, and a step
    whose gradients overflowed is skipped by the scaler (which lowers its scale),
    not reported as a non-finite loss.

    ``model`` may be a ``DistributedDataParallel`` wrapper: the returned values are
    then the means over the processes (Detectron2's ``_write_metrics``).
    """
    with amp.autocast(images[0].device, cfg.SOLVER.AMP.ENABLED):
        loss_dict, metrics = model(images, targets, with_metrics=True)
    total = sum(loss_dict.values())
    _check_finite(loss_dict, total, iteration)
    if before_update is not None:
        before_update()
    optimizer.zero_grad(set_to_none=True)
    if grad_scaler is None:
        total.backward()
        clip_gradients(cfg, optimizer)
        optimizer.step()
    else:
        grad_scaler.scale(total).backward()
        grad_scaler.unscale_(optimizer)
        clip_gradients(cfg, optimizer)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    scheduler.step()
    values = {"total_loss": float(total.detach())}
    values.update({k: float(v.detach()) for k, v in loss_dict.items()})
    values.update(metrics)  # statistics of the step that are not losses, e.g. loss_iou_minus_entropy
    if comm.get_world_size() > 1:
        values = comm.all_reduce_mean(values)
    return values


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


def do_train(
    cfg, model, optimizer, scheduler, checkpointer, start_iter: int, seed: int, records, grad_scaler=None
) -> None:
    """Iterations ``start_iter .. MAX_ITER - 1``, with logging, checkpoints and periodic evaluation;
    ``grad_scaler``: the loss scaler of a float16 run (:func:`.amp.build_grad_scaler`)."""
    max_iter, device = cfg.SOLVER.MAX_ITER, next(model.parameters()).device
    writer = MetricsWriter(cfg.OUTPUT_DIR, max_iter)
    writer.truncate_after(start_iter - 1)
    loader = build_train_loader(cfg, seed, start_iter, records)
    data_iter = iter(loader)
    bar = _progress_bar(start_iter, max_iter)
    model.train()
    trained = _wrap_ddp(model)  # the training forward / backward; model stays the unwrapped one
    checkpoints = _checkpoint_schedule(cfg, model, checkpointer, seed, grad_scaler)
    train_start, iteration = time.perf_counter(), start_iter - 1
    try:
        for iteration in range(start_iter, max_iter):
            start = time.perf_counter()
            images, targets = _to_device(*_next_batch(data_iter, iteration), device)
            data_time = time.perf_counter() - start
            # Anything random in the step (e.g. the model's size sampling) depends on (seed, iteration) only.
            torch.manual_seed(derive_seed(seed, 2, iteration))
            lr = _lr_of_largest_group(optimizer)
            try:
                values = run_step(
                    cfg, trained, optimizer, scheduler, images, targets, iteration, checkpoints.loss_was_finite,
                    grad_scaler,
                )
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{e} {checkpointer.last_good_note()}") from None
            values.update(lr=lr, time=time.perf_counter() - start, data_time=data_time)
            writer.add(iteration, values)
            bar.set_postfix_str(
                " ".join(f"{k.replace('loss_', '')}={values[k]:.3f}" for k in values if "loss" in k) + f" lr={lr:.4g}",
                refresh=False,
            )
            bar.update(1)
            checkpoints.after_step(iteration)
            _evaluate_periodically(cfg, model, writer, iteration)
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


def _checkpoint_schedule(cfg, model, checkpointer: Checkpointer, seed: int, grad_scaler=None) -> FiniteLossCheckpoints:
    """The run's checkpoints. A checkpoint is written during the next iteration, before the
    weights change (run_step's ``before_update``): model, optimizer, scheduler and loss
    scaler are then still those of its iteration; only the buffers (BatchNorm's running
    statistics, the loss normalizer's average) moved in the forward pass, so they are
    copied after the step."""
    buffer_names = {name for name, _ in model.named_buffers()}

    def buffers_now(iteration: int) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k in buffer_names}

    def write(name: str, iteration: int, buffers: Dict[str, torch.Tensor]) -> None:
        state = model.state_dict()
        state.update(buffers)
        scaler = {} if grad_scaler is None else {"grad_scaler": grad_scaler.state_dict()}
        checkpointer.save(name, state=state, iteration=int(iteration), seed=int(seed), **scaler)

    return FiniteLossCheckpoints(cfg.SOLVER.CHECKPOINT_PERIOD, cfg.SOLVER.MAX_ITER, buffers_now, write)


def _evaluate_periodically(cfg, model, writer: MetricsWriter, iteration: int) -> None:
    next_iter, period = iteration + 1, cfg.TEST.EVAL_PERIOD
    if period > 0 and next_iter % period == 0 and next_iter != cfg.SOLVER.MAX_ITER and cfg.DATASETS.TEST:
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


def _check_train_images(cfg, records) -> None:
    """Every training image's header (its size) before training; with DATALOADER.CACHE_IMAGES
    the cache decodes and checks every image before the first iteration anyway."""
    if cfg.DATALOADER.CACHE_IMAGES:
        return
    start = time.perf_counter()
    check_image_headers(((r.file_name, r.height, r.width) for r in records), f"DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}")
    logger.info("Checked the headers of %d training images in %.1f s", len(records), time.perf_counter() - start)


def _check_images_decode(data, name: str) -> None:
    """Decode every test image once before training, comparing its size with the annotated one
    (the Detectron2 path's check too): a corrupt or wrongly sized file fails now, not after the run."""
    start = time.perf_counter()
    check_images_decode(((r.file_name, r.height, r.width) for r in data.records), f"DATASETS.TEST {name!r}")
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
    lock = _claim_output_dir(cfg, resume)  # before rank 0 writes anything into OUTPUT_DIR
    try:
        return _train(cfg, resume)
    finally:
        if lock is not None:
            lock.release()


def _claim_output_dir(cfg, resume: bool):
    """Rank 0 takes OUTPUT_DIR's lock and checks its rules (:func:`..run_folder.claim_output_dir`:
    no new run into a finished one, ``--resume`` only under the run's config, no user's
    ``config.yaml`` replaced); an error stops every rank."""
    error, lock = None, None
    if comm.is_main_process():
        try:
            lock = claim_output_dir(cfg.OUTPUT_DIR, cfg.dump(), resume)
        except Exception as e:  # re-raised on rank 0 below, reported on the others
            error = e
    if comm.get_world_size() > 1:
        message = comm.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is None and message is not None:
            raise RuntimeError(f"rank 0 refused OUTPUT_DIR: {message}")
    if error is not None:
        raise error
    return lock


def _train(cfg, resume: bool):
    world = comm.get_world_size()
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
        _check_train_images(cfg, records)
        _check_test_datasets(cfg, class_names)
        if comm.is_main_process():  # what the run trained and is evaluated on: see docs/study.md
            log_data_fingerprints({name: resolve_dataset(cfg, name) for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST)})
        optimizer = build_optimizer(cfg, model)
        scheduler = build_lr_scheduler(cfg, optimizer)
        checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, optimizer=optimizer, scheduler=scheduler)
        grad_scaler = amp.build_grad_scaler(cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED)
        if cfg.SOLVER.AMP.ENABLED:
            logger.info("Mixed precision: autocast to %s%s", amp.autocast_dtype(cfg.MODEL.DEVICE),
                        " with a GradScaler" if grad_scaler is not None else "")  # fmt: skip
        start_iter = 0
        checkpoint = checkpointer.resume(required=("iteration", "seed")) if resume else None
        if checkpoint is not None:
            start_iter = int(checkpoint["iteration"]) + 1
            seed = _resumed_seed(cfg, seed, int(checkpoint["seed"]))
            _resume_grad_scaler(grad_scaler, checkpoint)
        elif cfg.MODEL.WEIGHTS:
            load_weights(model, cfg.MODEL.WEIGHTS)
        logger.info(
            "Training %d images of %s, iterations %d..%d, seed %d",
            len(records), ", ".join(cfg.DATASETS.TRAIN), start_iter, cfg.SOLVER.MAX_ITER - 1, seed,
        )
        do_train(cfg, model, optimizer, scheduler, checkpointer, start_iter, seed, records, grad_scaler)
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


def _resume_grad_scaler(grad_scaler, checkpoint: dict) -> None:
    """The loss scale where the resumed run left it (an exact resume); a run that had none
    (float32, or bfloat16) starts from the scaler's initial scale."""
    if grad_scaler is None:
        return
    if "grad_scaler" in checkpoint:
        grad_scaler.load_state_dict(checkpoint["grad_scaler"])
    else:
        logger.info("The checkpoint holds no loss scaler state (a run without float16): starting a new scale")


def _resumed_seed(cfg, seed: int, checkpoint_seed: int) -> int:
    if cfg.SEED < 0:
        return checkpoint_seed
    if seed != checkpoint_seed:
        logger.warning(
            "SEED is %d but the checkpoint was trained with seed %d: the resumed run will not match an "
            "uninterrupted one", seed, checkpoint_seed,
        )
    return seed


# Re-exported from where they live (solver, checkpoint, events), for callers of the engine.
__all__ += [
    "Checkpointer", "LOG_PERIOD", "MetricsWriter", "NORM_MODULE_TYPES", "clip_gradients", "console_filter", "do_train",
    "format_metrics_table", "log_to_file", "run_step",
]  # fmt: skip
