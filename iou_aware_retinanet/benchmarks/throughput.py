"""Training throughput: what the data pipeline and the engine add to the model's own step.

    python -m iou_aware_retinanet.benchmarks.throughput [--config-file configs/Shapes/iou_aware_retinanet.yaml]
        [--iters 200] [--rounds 2] [--threads N] [KEY VALUE ...]

Two ways to run the same iterations of the same config, alternated
``--rounds`` times in one process (so both see the same machine):

* **engine**: :func:`~iou_aware_retinanet.tv.engine.do_train` as the main
  job runs it: data-loader workers decoding PNGs, seeded flips, progress
  bar, metrics.json / log.txt lines, the final checkpoint;
* **in memory**: the same number of :func:`~iou_aware_retinanet.tv.engine.run_step`
  calls (forward, backward, SGD step) on batches loaded beforehand.

Prints images/s of both and the ratio engine / in-memory of the wall time
per iteration (target <= 1.10: the pipeline should cost at most 10 %).
"""
import argparse
import statistics
import tempfile
import time
from typing import Optional, Sequence

import torch

from ..studies.recipe import MAIN_CONFIG
from ..tv.cli import setup_cfg
from ..tv.data import build_train_loader, load_train_records
from ..tv.engine import Checkpointer, build_lr_scheduler, build_optimizer, do_train, run_step, seed_all
from ..tv.model import build_model


def _fresh(cfg):
    seed_all(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    return model, optimizer, build_lr_scheduler(cfg, optimizer)


def time_engine(cfg, records, iters: int) -> float:
    """Seconds of ``do_train`` over ``iters`` iterations (the main job's loop)."""
    model, optimizer, scheduler = _fresh(cfg)
    with tempfile.TemporaryDirectory() as out:
        run_cfg = cfg.clone()
        run_cfg.defrost()
        run_cfg.merge_from_list(["OUTPUT_DIR", out, "SOLVER.MAX_ITER", iters, "SOLVER.CHECKPOINT_PERIOD", iters, "TEST.EVAL_PERIOD", 0])
        run_cfg.freeze()
        checkpointer = Checkpointer(out, model, optimizer, scheduler)
        start = time.perf_counter()
        do_train(run_cfg, model, optimizer, scheduler, checkpointer, 0, 0, records)
        return time.perf_counter() - start


def time_in_memory(cfg, records, iters: int) -> float:
    """Seconds of ``iters`` bare ``run_step`` calls on batches already in memory."""
    model, optimizer, scheduler = _fresh(cfg)
    loader_iter = iter(build_train_loader(cfg, 0, 0, records))
    batches = [next(loader_iter) for _ in range(iters)]
    del loader_iter
    model.train()
    start = time.perf_counter()
    for i, (images, targets) in enumerate(batches):
        run_step(cfg, model, optimizer, scheduler, images, targets, i)
    return time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=str(MAIN_CONFIG))
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config_file, args.opts)
    records, _ = load_train_records(cfg)
    batch = cfg.SOLVER.IMS_PER_BATCH
    engine, memory = [], []
    for _ in range(args.rounds):
        engine.append(time_engine(cfg, records, args.iters))
        memory.append(time_in_memory(cfg, records, args.iters))
    e, m = statistics.median(engine), statistics.median(memory)
    print(f"{args.config_file}: {args.iters} iterations x {batch} images, {args.rounds} rounds, "
          f"{torch.get_num_threads()} intra-op threads, DATALOADER.NUM_WORKERS {cfg.DATALOADER.NUM_WORKERS}")
    print("| loop | s / iteration | images / s |")
    print("|---|---:|---:|")
    print(f"| engine (do_train) | {e / args.iters:.4f} | {args.iters * batch / e:.1f} |")
    print(f"| in memory (run_step) | {m / args.iters:.4f} | {args.iters * batch / m:.1f} |")
    print(f"ratio engine / in memory: {e / m:.3f} (target <= 1.10)")
    return {"engine_s": engine, "in_memory_s": memory, "ratio": e / m}


if __name__ == "__main__":
    main()
