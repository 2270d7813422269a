"""Benchmark of the label assigners on a real-size RetinaNet anchor set.

    python -m iou_aware_retinanet.benchmarks.assigners [--repeats 5] [--num-gts 10 100 1000] [--quick] [--threads N]

Times ``max_iou``, ``topk`` and ``atss`` on the ~200k anchors of an 800x1333
image against 10 / 100 / 1,000 random ground-truth boxes, next to a
baseline run in the same invocation: Detectron2's ``Matcher`` +
``pairwise_iou`` (when Detectron2 is importable) for Max-IoU.

Peak memory is measured per row in a fresh subprocess, as the growth of the
process's peak resident set size over its size once the inputs are built
(``tracemalloc`` cannot see torch's CPU allocations). On Linux the peak is
reset through ``/proc/self/clear_refs`` and read from ``VmHWM``; elsewhere
``ru_maxrss`` is used, which also counts the import-time peak.

This module also provides ``make_retinanet_anchors`` and ``random_gt_boxes``,
which the tests use.
"""
import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core import AnchorSet, build_assigner

# ----------------------------------------------------------------- inputs


def make_retinanet_anchors(
    image_size: Tuple[int, int],
    strides: Sequence[int] = (8, 16, 32, 64, 128),
    sizes: Sequence[float] = (32, 64, 128, 256, 512),
    scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    size_divisibility: int = 32,
    offset: float = 0.0,
) -> AnchorSet:
    """RetinaNet's anchors of one (height, width) image, P3-P7 by default.

    The image is padded to ``size_divisibility`` as Detectron2 pads its
    batches, so an 800x1333 image gives 100x168 ... 7x11 feature maps and
    201,600 anchors. Order: level by level, location-major (row by row), the
    ``len(scales) * len(aspect_ratios)`` anchors of a location consecutive,
    as Detectron2 flattens them. Aspect ratio is height / width.
    """
    height, width = image_size
    if size_divisibility > 1:
        height = int(math.ceil(height / size_divisibility) * size_divisibility)
        width = int(math.ceil(width / size_divisibility) * size_divisibility)
    levels: List[Tensor] = []
    for stride, size in zip(strides, sizes):
        # One anchor shape per (scale, ratio), centred on (0, 0).
        cell = []
        for scale in scales:
            area = (size * scale) ** 2
            for ratio in aspect_ratios:
                w = math.sqrt(area / ratio)
                h = w * ratio
                cell.append((-w / 2, -h / 2, w / 2, h / 2))
        cell = torch.tensor(cell, dtype=torch.float32)  # (a, 4)
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        ys = (torch.arange(rows, dtype=torch.float32) + offset) * stride
        xs = (torch.arange(cols, dtype=torch.float32) + offset) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)  # (locations, 1, 4)
        levels.append((shifts + cell[None]).reshape(-1, 4))
    return AnchorSet(
        boxes=torch.cat(levels),
        num_per_level=tuple(len(level) for level in levels),
        num_per_location=len(scales) * len(aspect_ratios),
    )


def random_gt_boxes(
    num_gts: int,
    image_size: Tuple[int, int],
    num_classes: int = 80,
    seed: int = 0,
    min_size: float = 8.0,
    max_size: float = 600.0,
) -> Tuple[Tensor, Tensor]:
    """COCO-like random objects: log-uniform size and aspect ratio, inside the image."""
    gen = torch.Generator().manual_seed(seed)
    height, width = image_size
    size = torch.exp(
        torch.empty(num_gts).uniform_(math.log(min_size), math.log(max_size), generator=gen)
    )
    ratio = torch.exp(torch.empty(num_gts).uniform_(math.log(1 / 3), math.log(3), generator=gen))
    w = (size / ratio.sqrt()).clamp(max=width - 1.0)
    h = (size * ratio.sqrt()).clamp(max=height - 1.0)
    x1 = torch.rand(num_gts, generator=gen) * (width - w)
    y1 = torch.rand(num_gts, generator=gen) * (height - h)
    boxes = torch.stack((x1, y1, x1 + w, y1 + h), dim=1)
    classes = torch.randint(num_classes, (num_gts,), generator=gen)
    return boxes, classes


# -------------------------------------------------------------- benchmark

IMAGE_SIZE = (800, 1333)
NUM_CLASSES = 80
METHODS = ("max_iou", "d2_matcher", "topk", "atss")
PROJECT_ASSIGNERS = ("max_iou", "topk", "atss")
BASELINE_OF = {"max_iou": "d2_matcher"}
MEMORY_METHOD_VMHWM = "peak RSS growth per fresh subprocess (VmHWM reset via /proc/self/clear_refs)"
MEMORY_METHOD_MAXRSS = "peak RSS growth per fresh subprocess (ru_maxrss; includes the import-time peak)"


def detectron2_available() -> bool:
    try:
        from detectron2.modeling.matcher import Matcher  # noqa: F401
        from detectron2.structures import Boxes, pairwise_iou  # noqa: F401
    except ImportError:
        return False
    return True


def d2_matcher_runner(anchors: AnchorSet, gt_boxes: Tensor, gt_classes: Tensor) -> Callable[[], Tensor]:
    """What Detectron2's ``RetinaNet.label_anchors`` does for one image, as a callable."""
    from detectron2.modeling.matcher import Matcher
    from detectron2.structures import Boxes, pairwise_iou

    matcher = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)
    anchor_boxes, gts = Boxes(anchors.boxes), Boxes(gt_boxes)

    def run():
        matches, match_labels = matcher(pairwise_iou(gts, anchor_boxes))
        labels = gt_classes[matches]
        labels[match_labels == 0] = NUM_CLASSES
        labels[match_labels == -1] = -1
        return labels

    return run


def _make_runner(method: str, anchors: AnchorSet, gt_boxes: Tensor, gt_classes: Tensor) -> Callable[[], object]:
    if method in PROJECT_ASSIGNERS:
        assigner = build_assigner(method, NUM_CLASSES)
        return lambda: assigner(anchors, gt_boxes, gt_classes)
    if method == "d2_matcher":
        return d2_matcher_runner(anchors, gt_boxes, gt_classes)
    raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _rss_kib("VmHWM") is not None


def run_worker(method: str, num_gts: int, repeats: int) -> dict:
    """Time one method in this (fresh) process and measure its peak memory growth."""
    anchors = make_retinanet_anchors(IMAGE_SIZE)
    gt_boxes, gt_classes = random_gt_boxes(num_gts, IMAGE_SIZE, NUM_CLASSES, seed=num_gts)
    run = _make_runner(method, anchors, gt_boxes, gt_classes)
    use_hwm = _reset_peak_rss()
    if use_hwm:
        base_kib = _rss_kib("VmRSS")
    else:
        base_kib = _rss_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak_kib = _rss_kib("VmHWM") if use_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "num_gts": num_gts,
        "num_anchors": len(anchors),
        "time_ms": 1000 * statistics.median(times),
        "peak_mib": max(0, peak_kib - base_kib) / 1024,
        "memory_method": MEMORY_METHOD_VMHWM if use_hwm else MEMORY_METHOD_MAXRSS,
    }


def _spawn(method: str, num_gts: int, repeats: int, threads: Optional[int]) -> dict:
    """Run one row in a fresh interpreter, so its peak memory is its own."""
    module = __spec__.name if __spec__ is not None else "iou_aware_retinanet.benchmarks.assigners"
    cmd = [sys.executable, "-m", module, "--worker", method, "--num-gts", str(num_gts),
           "--repeats", str(repeats)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker {' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (median reported)")
    parser.add_argument("--num-gts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--quick", action="store_true", help="2 repeats, 10 and 100 GTs only")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.num_gts[0], args.repeats)))
        return

    repeats, num_gts_list = args.repeats, args.num_gts
    if args.quick:
        repeats = min(repeats, 2)
        num_gts_list = [n for n in num_gts_list if n <= 100] or [10]
    has_d2 = detectron2_available()
    anchors = make_retinanet_anchors(IMAGE_SIZE)

    rows = []
    memory_method = None
    for num_gts in num_gts_list:
        results = {}
        for method in METHODS:
            if method == "d2_matcher" and not has_d2:
                continue
            results[method] = _spawn(method, num_gts, repeats, args.threads)
            memory_method = results[method]["memory_method"]
        rows.append((num_gts, results))

    print(f"Label assignment, one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image: {len(anchors):,} anchors "
          f"(P3-P7, {anchors.num_per_location} per location), {NUM_CLASSES} classes")
    print(f"torch {torch.__version__}, CPU, intra-op threads: {torch.get_num_threads()}; "
          f"Detectron2 {'importable' if has_d2 else 'not importable: Matcher baseline skipped'}")
    print(f"time: median of {repeats} calls after 1 warm-up; memory: {memory_method}")
    print("speedup = baseline time / project time (same GT boxes, same anchors)")
    print()
    header = (f"{'GTs':>5} | {'assigner':<8} | {'time ms':>9} | {'peak MiB':>8} | "
              f"{'baseline':<14} | {'base ms':>9} | {'base MiB':>8} | {'speedup':>7}")
    print(header)
    print("-" * len(header))
    for num_gts, results in rows:
        for name in PROJECT_ASSIGNERS:
            mine = results[name]
            base_name = BASELINE_OF.get(name)
            base = results.get(base_name) if base_name else None
            speedup = f"{base['time_ms'] / mine['time_ms']:.1f}x" if base else "-"
            print(f"{num_gts:>5} | {name:<8} | {mine['time_ms']:>9.1f} | {mine['peak_mib']:>8.0f} | "
                  f"{(base_name if base else '-'):<14} | {_fmt(base and base['time_ms'], '.1f'):>9} | "
                  f"{_fmt(base and base['peak_mib'], '.0f'):>8} | {speedup:>7}")
    print()
    by_gts = dict(rows)
    if 1000 in by_gts:
        peak = max(by_gts[1000][name]["peak_mib"] for name in PROJECT_ASSIGNERS)
        print(f"largest peak of the project's assigners at 1000 GTs: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
