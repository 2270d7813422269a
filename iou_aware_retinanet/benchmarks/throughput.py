"""Training throughput: what the data pipeline and the engine add to the model's own step.

    python -m iou_aware_retinanet.benchmarks.throughput [--config-file configs/Shapes/iou_aware_retinanet.yaml]
        [--iters 200] [--short 40] [--rounds 3] [--threads N] [KEY VALUE ...]

Two ways to run the same iterations of the same config, alternated
``--rounds`` times in one process (so both see the same machine):

* **engine**: :func:`~iou_aware_retinanet.tv.engine.do_train` as the main
  job runs it: the data loader (decoding or cached images, seeded flips,
  workers if the config has them), progress bar, metrics.json / log.txt lines
  and TensorBoard events, the final checkpoint;
* **in memory**: the same number of :func:`~iou_aware_retinanet.tv.engine.run_step`
  calls (forward, backward, SGD step) on batches loaded beforehand.

Each round runs both loops for ``--short`` and for ``--iters`` iterations.
The difference of the two wall times over ``iters - short`` iterations is the
steady-state cost of one iteration (what a job of thousands of iterations
pays per step); what is left of the short run is the loop's fixed start-up cost
(starting workers, decoding a cache, importing TensorBoard), paid once per
run and printed apart. Prints images/s and the ratio engine / in memory of
the per-iteration times (1.0: the data pipeline and the engine add nothing
to the model's step), medians over the rounds.
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
from ..tv.checkpoint import Checkpointer
from ..tv.engine import do_train, run_step, seed_all
from ..tv.solver import build_lr_scheduler, build_optimizer
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
        checkpointer = Checkpointer(model, out, optimizer=optimizer, scheduler=scheduler)
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


def steady_and_fixed(short_s: float, long_s: float, short: int, iters: int):
    """(seconds per iteration, fixed seconds) of a loop timed over ``short`` and ``iters`` iterations."""
    per_iter = (long_s - short_s) / (iters - short)
    return per_iter, short_s - short * per_iter


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=str(MAIN_CONFIG))
    parser.add_argument("--iters", type=int, default=200, help="iterations of the long runs")
    parser.add_argument("--short", type=int, default=40, help="iterations of the short runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not 0 < args.short < args.iters:
        parser.error("need 0 < --short < --iters")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config_file, args.opts)
    records, _ = load_train_records(cfg)
    batch = cfg.SOLVER.IMS_PER_BATCH
    engine, memory, ratios = [], [], []
    for _ in range(args.rounds):
        e_short, m_short = time_engine(cfg, records, args.short), time_in_memory(cfg, records, args.short)
        e_long, m_long = time_engine(cfg, records, args.iters), time_in_memory(cfg, records, args.iters)
        engine.append(steady_and_fixed(e_short, e_long, args.short, args.iters))
        memory.append(steady_and_fixed(m_short, m_long, args.short, args.iters))
        ratios.append(engine[-1][0] / memory[-1][0])
    e_iter = statistics.median(e for e, _ in engine)
    m_iter = statistics.median(m for m, _ in memory)
    e_fixed = statistics.median(f for _, f in engine)
    ratio = statistics.median(ratios)
    print(f"{args.config_file}: {args.short} and {args.iters} iterations x {batch} images, {args.rounds} rounds, "
          f"{torch.get_num_threads()} intra-op threads, DATALOADER.NUM_WORKERS {cfg.DATALOADER.NUM_WORKERS}, "
          f"DATALOADER.CACHE_IMAGES {cfg.DATALOADER.CACHE_IMAGES}")
    print("| loop | s / iteration | images / s |")
    print("|---|---:|---:|")
    print(f"| engine (do_train) | {e_iter:.4f} | {batch / e_iter:.1f} |")
    print(f"| in memory (run_step) | {m_iter:.4f} | {batch / m_iter:.1f} |")
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"ratio engine / in memory (median over rounds): {ratio:.3f}")
    print(f"engine start-up, once per run: {e_fixed:.2f} s")
    return {"engine": engine, "in_memory": memory, "ratios": ratios, "ratio": ratio, "engine_fixed_s": e_fixed}


if __name__ == "__main__":
    main()
