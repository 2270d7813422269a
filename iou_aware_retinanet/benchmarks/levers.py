"""Levers on the training step's speed, each measured side by side with the default step.

    python -m iou_aware_retinanet.benchmarks.levers [--config-file configs/Shapes/iou_aware_retinanet.yaml]
        [--levers channels_last anchor_cache compile bf16 threads_1 threads_2 channels_last+anchor_cache ...]
        [--steps 20] [--rounds 5] [--warmup 3] [--threads N] [--json levers.json] [--quick] [KEY VALUE ...]

Every lever is a variant of the engine's :func:`~iou_aware_retinanet.tv.engine.run_step`
on the config's model, built from the same seed and fed the same real
batches of its training data (loaded beforehand):

* ``channels_last``: ``MODEL.CHANNELS_LAST`` (channels-last weights, and so feature maps);
* ``anchor_cache``: the anchor generator keeps the anchors of each
  feature-map size (``AnchorGenerator(cache=True)``) instead of regenerating
  them every forward; the values are identical;
* ``compile``: ``torch.compile`` of the backbone + FPN and of the head (the
  dense network; assignment and losses are Python over data-dependent shapes);
  the compile time is printed apart (the warm-up steps less the default's);
* ``bf16``: ``SOLVER.AMP.ENABLED`` (autocast in bfloat16 on the CPU): the
  numerics change;
* ``threads_1`` / ``threads_2``: 1 or 2 intra-op threads (``torch.set_num_threads``);
  skipped when it is the default's count.

Levers joined by "+" (``--levers channels_last+anchor_cache``) apply together.

Method, as ``benchmarks/throughput.py``: each round times ``--steps`` steps of
the default, then of each lever (their order rotating from round to round),
then of the default again; a block's time is
its median step, a lever's ratio in a round is its time over the mean of the
round's two default blocks, and the ratio printed is the median over
``--rounds`` rounds (< 1: the lever is faster; speed-up = 1 / ratio). The
ratio of the round's second default block to its first is printed too: how
far the machine drifted within a round. Next to each ratio: the largest
relative difference of the first step's loss values from the default's, the
same first batch from the same weights (0: the lever computes the same numbers).
``--quick`` (a 16-image dataset, batches of 2, no ``compile``) checks the
command works in seconds. Nothing here changes the config's defaults.
"""
import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..studies.recipe import MAIN_CONFIG
from ..tv.engine import run_step
from .breakdown import QUICK_OPTS, fresh_training_state, load_batches, machine_info, setup_cpu_cfg

__all__ = ["LEVERS", "QUICK_LEVERS", "Variant", "build_variant", "lever_parts", "main"]

LEVERS = ("channels_last", "anchor_cache", "compile", "bf16", "threads_1", "threads_2")
QUICK_LEVERS = tuple(lever for lever in LEVERS if lever != "compile")  # compiling takes minutes
DESCRIPTIONS = {
    "default": "the config as it is",
    "channels_last": "channels-last weights and feature maps (MODEL.CHANNELS_LAST)",
    "anchor_cache": "anchors cached per feature-map size",
    "compile": "torch.compile of backbone + FPN and head",
    "bf16": "bfloat16 autocast (SOLVER.AMP.ENABLED)",
    "threads_1": "1 intra-op thread",
    "threads_2": "2 intra-op threads",
}
# Distinct batches loaded (the steps cycle through them).
MAX_BATCHES = 20


@dataclass
class Variant:
    """One way to run the training step: its config, training state and intra-op threads."""

    name: str
    cfg: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    threads: int
    iteration: int = 0
    first_losses: Dict[str, float] = field(default_factory=dict)

    def step(self, batches: Sequence) -> None:
        images, targets = batches[self.iteration % len(batches)]
        values = run_step(self.cfg, self.model, self.optimizer, self.scheduler, images, targets, self.iteration)
        if self.iteration == 0:
            self.first_losses = values
        self.iteration += 1

    def block_seconds(self, batches: Sequence, steps: int) -> float:
        """Median seconds of ``steps`` steps, run with this variant's intra-op threads."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                self.step(batches)
                times.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(previous)
        return statistics.median(times)


def lever_parts(name: str) -> List[str]:
    """The levers of ``name``: one of :data:`LEVERS`, or several joined by "+" (applied together)."""
    parts = name.split("+")
    unknown = [part for part in parts if part not in LEVERS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(
            f"unknown lever {name!r}; known: {', '.join(LEVERS)}, or several joined by '+' "
            "(e.g. channels_last+anchor_cache), each once"
        )
    if sum(part.startswith("threads_") for part in parts) > 1:
        raise ValueError(f"lever {name!r}: at most one threads_N")
    return parts


def describe(name: str) -> str:
    return DESCRIPTIONS[name] if name == "default" else " + ".join(DESCRIPTIONS[part] for part in lever_parts(name))


def build_variant(name: str, cfg, threads: int, compile_backend: str = "inductor") -> Variant:
    """The default step (``name`` "default") or the levers of ``name`` (:func:`lever_parts`), from seed 0."""
    parts = [] if name == "default" else lever_parts(name)
    # Levers that are config keys go through the config, so the step timed is the one users get.
    keys = {"bf16": "SOLVER.AMP.ENABLED", "channels_last": "MODEL.CHANNELS_LAST"}
    if any(part in keys for part in parts):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.merge_from_list([item for part in parts if part in keys for item in (keys[part], True)])
        cfg.freeze()
    model, optimizer, scheduler = fresh_training_state(cfg)
    if "anchor_cache" in parts:
        model.anchor_generator.cache = True
    if "compile" in parts:
        model.backbone.compile(backend=compile_backend)
        model.head.compile(backend=compile_backend)
    for part in parts:
        if part.startswith("threads_"):
            threads = int(part.split("_")[1])
    return Variant(name, cfg, model, optimizer, scheduler, threads)


def _largest_relative_difference(values: Dict[str, float], reference: Dict[str, float]) -> float:
    return max(abs(values[k] - reference[k]) / max(abs(reference[k]), 1e-12) for k in reference)


def measure_levers(cfg, batches: Sequence, levers: Sequence[str], steps: int, rounds: int, warmup: int,
                   compile_backend: str = "inductor", progress: Callable[[str], None] = lambda _: None) -> dict:
    """Per-round times and ratios of each lever against the default (see the module doc)."""
    threads = torch.get_num_threads()
    default = build_variant("default", cfg, threads)
    variants = [build_variant(name, cfg, threads, compile_backend) for name in levers]
    warmup_s = {}
    for variant in [default] + variants:
        progress(f"warm-up: {variant.name}")
        start = time.perf_counter()
        if warmup:
            variant.block_seconds(batches, warmup)
        warmup_s[variant.name] = time.perf_counter() - start
    per_round = {v.name: [] for v in variants}
    drift = []
    for r in range(rounds):
        progress(f"round {r + 1} / {rounds}")
        before = default.block_seconds(batches, steps)
        # The levers' order rotates from round to round: none is always the farthest from a default block.
        shift = r % len(variants) if variants else 0
        times = {v.name: v.block_seconds(batches, steps) for v in variants[shift:] + variants[:shift]}
        after = default.block_seconds(batches, steps)
        drift.append(after / before)
        for name, seconds in times.items():
            per_round[name].append({"ms": 1000 * seconds, "default_ms": 1000 * (before + after) / 2,
                                    "ratio": 2 * seconds / (before + after)})
    rows = []
    for variant in variants:
        ratios = [r["ratio"] for r in per_round[variant.name]]
        ratio = statistics.median(ratios)
        rows.append({
            "lever": variant.name,
            "description": describe(variant.name),
            "threads": variant.threads,
            "ms": statistics.median(r["ms"] for r in per_round[variant.name]),
            "default_ms": statistics.median(r["default_ms"] for r in per_round[variant.name]),
            "ratio": ratio,
            "speedup": 1 / ratio,
            "ratios": ratios,
            "first_loss_rel_diff": _largest_relative_difference(variant.first_losses, default.first_losses),
            # What the warm-up cost beyond the default's: compiling, for "compile".
            "warmup_extra_s": warmup_s[variant.name] - warmup_s["default"],
        })
    return {"default_threads": threads, "warmup_s": warmup_s, "drift": drift, "levers": rows}


def format_report(result: dict) -> List[str]:
    machine = result["machine"]
    lines = [
        f"{result['config']}: {result['images_per_batch']} images a batch; {result['rounds']} rounds of "
        f"{result['steps']} steps per variant after {result['warmup']} warm-up steps",
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; "
        f"default: {result['default_threads']} intra-op threads",
        "",
        "| lever | ms / step | default ms / step | ratio (median) | speed-up | per-round ratios "
        "| first-step loss rel. diff |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in result["levers"]:
        lines.append(
            f"| {row['lever']}: {row['description']} | {row['ms']:.1f} | {row['default_ms']:.1f} "
            f"| {row['ratio']:.3f} | {row['speedup']:.2f}x | {', '.join(f'{r:.3f}' for r in row['ratios'])} "
            f"| {row['first_loss_rel_diff']:.1e} |"
        )
    lines.append("")
    lines.append(f"default's second block / first, per round (drift): {', '.join(f'{d:.3f}' for d in result['drift'])}")
    for row in result["levers"]:
        if "compile" in lever_parts(row["lever"]):
            lines.append(f"{row['lever']}: compile time (its warm-up beyond the default's {result['warmup']} steps): "
                         f"{row['warmup_extra_s']:.1f} s")
    for name in result["skipped"]:
        lines.append(f"{name}: skipped, it is the default's thread count")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=str(MAIN_CONFIG))
    parser.add_argument("--levers", nargs="+", default=None,
                        help=f"default: all ({', '.join(LEVERS)}); --quick: all but compile; "
                             "join levers by '+' to apply them together, e.g. channels_last+anchor_cache")
    parser.add_argument("--steps", type=int, default=None, help="steps per block (default 20; --quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5; --quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 3; --quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="the default's intra-op threads (default: torch's)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile lever")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--quick", action="store_true", help="tiny version: seconds, figures meaningless")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if steps < 1 or rounds < 1 or warmup < 0:
        parser.error("need --steps >= 1, --rounds >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    levers = list(dict.fromkeys(args.levers or (QUICK_LEVERS if args.quick else LEVERS)))
    for name in levers:
        try:
            lever_parts(name)
        except ValueError as e:
            parser.error(str(e))
    default_threads = torch.get_num_threads()
    skipped = [name for name in levers if name == f"threads_{default_threads}"]
    levers = [name for name in levers if name not in skipped]
    cfg = setup_cpu_cfg(args.config_file, (QUICK_OPTS if args.quick else []) + list(args.opts))
    batches = load_batches(cfg, min(warmup + rounds * steps, MAX_BATCHES))
    result = measure_levers(cfg, batches, levers, steps, rounds, warmup, args.compile_backend,
                            progress=lambda message: print(message, file=sys.stderr, flush=True))
    result.update({
        "config": args.config_file,
        "images_per_batch": len(batches[0][0]),
        "steps": steps,
        "rounds": rounds,
        "warmup": warmup,
        "machine": machine_info(),
        "skipped": skipped,
    })
    print("\n".join(format_report(result)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
