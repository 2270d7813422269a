"""The project on a GPU, in one command: device-clean tests, the main job, R-50 speed and
memory with and without mixed precision, the assigners.

    python -m iou_aware_retinanet.benchmarks.gpu_check                        # CUDA, all sections
    python -m iou_aware_retinanet.benchmarks.gpu_check --json gpu_check.json  # + the results as JSON
    python -m iou_aware_retinanet.benchmarks.gpu_check --sections tests r50   # some sections only
    python -m iou_aware_retinanet.benchmarks.gpu_check --device cpu --quick   # seconds, on the CPU

Prints one table (section, item, result, status) and, with ``--json``, writes it
with every measurement. The sections, in the order they run:

``tests``
    The device-clean tests (``tests/device``: core, both front-ends' models, engine,
    export) with ``IOU_AWARE_TEST_DEVICE`` set to the device, in a subprocess:
    passed / failed / skipped, and the failed tests' names.
``assigners``
    Every registered assigner on the ~200k anchors of one 800x1333 image against 100
    and 1,000 random GTs (80 classes; the dynamic ones with random predictions):
    median time and peak device memory above the inputs, next to Detectron2's
    ``Matcher`` + ``pairwise_iou`` (what its RetinaNet runs) where Detectron2 is
    importable.
``r50``
    R-50-FPN, random weights, 80 classes, 800x1333 images (the COCO config
    ``configs/Base-IoUAwareRetinaNet.yaml``): a training step (batch 2, SGD) of the
    IoU-aware model, the project's RetinaNet (the branch off) and torchvision's stock
    RetinaNet, float32 and mixed precision (autocast + GradScaler, as the engine
    runs ``SOLVER.AMP.ENABLED``), with peak device memory; inference (batch 1) of the
    project's RetinaNet and the IoU-aware model with ``THRESHOLD_ON`` "cls" and
    "fused", the head calibrated to a trained model's candidate counts as
    :mod:`.speed` does. The same rows for Detectron2's ``RetinaNet`` and the
    project's meta-architecture where Detectron2 is importable. The models of one
    comparison are timed round-robin (A, B, C, A, B, C, ...) and compared by their
    medians.
``main_job`` / ``main_job_amp``
    ``configs/Shapes/iou_aware_retinanet.yaml`` trained on the device, float32 and
    then with ``SOLVER.AMP.ENABLED``: iterations/s of the training loop, wall time,
    AP / AP50 / AP75 on ``shapes_val``.

``--device cpu --quick`` runs every section small (a tiny model instead of R-50,
a small image for the assigners, a 4-iteration main job on the mini shapes splits,
one device-clean test) so that the test suite can keep the script working.
A section that raises is reported as failed and the others still run; the exit
status is 1 when a section or a device-clean test failed. ``--time-limit-s`` (default 420)
skips the sections that would start too late to end within that many seconds.
"""
import argparse
import contextlib
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torchvision
from torch import nn

from ..config import build_assigner_from_cfg
from ..core import Predictions, available_assigners
from ..core.boxes import BoxCoder
from ..tv.amp import autocast, build_grad_scaler
from .assigners import d2_matcher_runner, make_retinanet_anchors, random_gt_boxes
from .speed import (
    SOURCE_MODEL,
    Setting,
    build_named_model,
    calibrate_head,
    copy_weights,
    detectron2_status,
    detections_per_image,
    model_inputs,
    num_classes_of,
    tv_config,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DEVICE_TESTS = REPO / "tests" / "device"
MAIN_CONFIG = CONFIGS / "Shapes" / "iou_aware_retinanet.yaml"

SECTIONS = ("tests", "assigners", "r50", "main_job", "main_job_amp")
# Seconds a section needs on a GPU (guesses, for --time-limit-s); the AMP main job is
# expected to take what the float32 one took when that ran.
SECTION_SECONDS = {"tests": 90, "assigners": 30, "r50": 120, "main_job": 150, "main_job_amp": 150}
DEFAULT_TIME_LIMIT_S = 420
QUICK_TEST = "tests/device/test_core_device.py::test_head_outputs_under_autocast"

LEARNING_RATE = 1e-5  # the weights, hence the work per step, stay put
ASSIGNER_GTS = (100, 1000)
ASSIGNER_IMAGE = (800, 1333)
QUICK_ASSIGNER_GTS = (10, 50)
QUICK_ASSIGNER_IMAGE = (128, 160)
NUM_CLASSES = 80


def r50_setting(device: str) -> Setting:
    return Setting(
        "r50_800x1333",
        "Base-IoUAwareRetinaNet.yaml",
        opts=(
            "MODEL.DEVICE", device,
            "MODEL.WEIGHTS", "",  # random init: nothing to download
            "MODEL.RETINANET.NUM_CLASSES", NUM_CLASSES,
        ),
        image_size=(800, 1333),
        train_batch=2,
        inference_batch=1,
        repeats=10,
    )  # fmt: skip


def quick_setting(device: str) -> Setting:
    """A tiny model on small images: the r50 section's code in a second on a CPU."""
    return Setting(
        "quick",
        "Shapes/iou_aware_retinanet.yaml",
        opts=(
            "MODEL.DEVICE", device,
            "MODEL.RESNETS.DEPTH", 10, "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 8,
            "MODEL.FPN.OUT_CHANNELS", 64,
        ),
        image_size=(64, 96),
        train_batch=2,
        inference_batch=1,
        repeats=1,
    )  # fmt: skip


def main_job_opts(device: str, output_dir: str, quick: bool, amp: bool) -> List[str]:
    opts = ["MODEL.DEVICE", device, "OUTPUT_DIR", output_dir] + (["SOLVER.AMP.ENABLED", "True"] if amp else [])
    if quick:  # 4 iterations of a tiny model on the 16-image mini splits, 96 px (P6 not 1x1:
        # there PyTorch's CPU bfloat16 weight gradient of P7's stride-2 conv is garbage)
        opts += [
            "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_val',)",
            "MODEL.RESNETS.DEPTH", "10", "MODEL.RESNETS.STEM_OUT_CHANNELS", "8",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "8", "MODEL.FPN.OUT_CHANNELS", "64",
            "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
            "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)",
            "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0",
        ]  # fmt: skip
    return opts


# --------------------------------------------------------------------- report


@dataclass
class Report:
    """The table's rows (section, item, result, status) and every measurement, by section."""

    rows: List[List[str]] = field(default_factory=list)
    sections: Dict[str, object] = field(default_factory=dict)
    failed: List[str] = field(default_factory=list)

    def add(self, section: str, item: str, result: str, status: str = "ok") -> None:
        self.rows.append([section, item, result, status])
        if status.startswith("FAILED"):
            self.failed.append(f"{section}: {item}")

    def table(self) -> str:
        lines = ["| section | item | result | status |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout holds only the report


# --------------------------------------------------------------------- timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def round_robin_medians(runs: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                        sync: Callable[[], None]) -> Dict[str, float]:
    """Median milliseconds of each run, the runs called in turn (A, B, C, A, B, C, ...)
    so that drift hits all alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def peak_memory_mib(run: Callable[[], object], device: torch.device, calls: int = 2) -> Optional[float]:
    """Peak device memory above what was allocated before ``calls`` calls (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    for _ in range(calls):
        run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _mib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.0f} MiB"


# ---------------------------------------------------------------------- tests


def run_device_tests(report: Report, device: str, quick: bool) -> None:
    """``tests/device`` on ``device`` in a subprocess; counts from its JUnit XML."""
    if not DEVICE_TESTS.is_dir():
        report.add("tests", "tests/device", "not found (an installed copy has no tests)", "skipped")
        return
    target = QUICK_TEST if quick else "tests/device"
    env = dict(os.environ, IOU_AWARE_TEST_DEVICE=device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_tests_") as tmp:
        xml_path = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target, f"--junitxml={xml_path}"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if not os.path.exists(xml_path):
            tail = (proc.stdout + proc.stderr)[-2000:]
            report.sections["tests"] = {"returncode": proc.returncode, "output": tail}
            report.add("tests", target, f"pytest exited {proc.returncode} before running tests", "FAILED")
            return
        counts, failed, skipped = _junit_counts(xml_path)
    report.sections["tests"] = {"device": device, "target": target, "wall_s": wall, **counts,
                                "failed_tests": failed, "skip_reasons": skipped}  # fmt: skip
    result = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped in {wall:.0f} s"
    report.add("tests", f"{target} on {device}", result, "FAILED" if counts["failed"] or proc.returncode else "ok")
    for name in failed:
        report.add("tests", name, "failed", "FAILED")


def _junit_counts(xml_path: str):
    root = ElementTree.parse(xml_path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed, skipped = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            reason = case.find("skipped").get("message", "")
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return counts, failed, skipped


# ------------------------------------------------------------------ assigners


def _assigner(name: str):
    from ..tv import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / "Base-IoUAwareRetinaNet.yaml"))
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ASSIGNER.NAME = name
    return build_assigner_from_cfg(cfg)


def _random_predictions(anchors, device, seed: int = 0) -> Predictions:
    gen = torch.Generator().manual_seed(seed)
    num = len(anchors)
    deltas = torch.randn(num, 4, generator=gen) * 0.1
    return Predictions(
        cls_probs=torch.rand(num, NUM_CLASSES, generator=gen).to(device),
        boxes=BoxCoder().apply_deltas(deltas.to(device), anchors.boxes),
        ious=torch.rand(num, generator=gen).to(device),
    )


def run_assigners(report: Report, device: torch.device, quick: bool, d2_available: bool) -> None:
    from dataclasses import replace

    image = QUICK_ASSIGNER_IMAGE if quick else ASSIGNER_IMAGE
    gt_counts = QUICK_ASSIGNER_GTS if quick else ASSIGNER_GTS
    repeats = 1 if quick else 5
    sync = synchronizer(device)
    anchors = make_retinanet_anchors(image)
    anchors = replace(anchors, boxes=anchors.boxes.to(device))
    predictions = _random_predictions(anchors, device)
    rows = []
    for num_gts in gt_counts:
        boxes, classes = random_gt_boxes(num_gts, image, NUM_CLASSES, seed=num_gts, max_size=0.8 * min(image))
        boxes, classes = boxes.to(device), classes.to(device)
        runs = {}
        for name in available_assigners():
            assigner = _assigner(name)
            runs[name] = (lambda a=assigner: a(anchors, boxes, classes, predictions if a.needs_predictions else None))
        if d2_available:
            runs["d2_matcher"] = d2_matcher_runner(anchors, boxes, classes)
        for name, run in runs.items():
            ms = round_robin_medians({name: run}, repeats, warmup=1, sync=sync)[name]
            peak = peak_memory_mib(run, device, calls=1)
            foreground = None if name == "d2_matcher" else run().num_foreground
            rows.append({"assigner": name, "num_gts": num_gts, "time_ms": ms, "peak_mib": peak,
                         "foreground": foreground})  # fmt: skip
            report.add("assigners", f"{name}, {num_gts} GTs", f"{ms:.1f} ms, peak {_mib(peak)}")
    report.sections["assigners"] = {"image": list(image), "num_anchors": len(anchors), "repeats": repeats,
                                    "rows": rows}  # fmt: skip


# ------------------------------------------------------------------------ r50


def _to_device(inputs: tuple, frontend: str, device: torch.device) -> tuple:
    if frontend == "tv":
        images = [image.to(device) for image in inputs[0]]
        if len(inputs) == 1:
            return (images,)
        return images, [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in inputs[1]]
    batch = []
    for entry in inputs[0]:
        moved = dict(entry, image=entry["image"].to(device))
        if "instances" in entry:
            moved["instances"] = entry["instances"].to(device)
        batch.append(moved)
    return (batch,)


def _event_storage(frontend: str):
    if frontend != "d2":
        return contextlib.nullcontext()
    from detectron2.utils.events import EventStorage

    return EventStorage()


def train_runner(model: nn.Module, frontend: str, inputs: tuple, device: torch.device, amp: bool):
    """One SGD step as the engine runs it: autocast and a GradScaler with ``amp``."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, momentum=0.9)
    scaler = build_grad_scaler(device, amp)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _event_storage(frontend), autocast(device, amp):
            losses = model(*inputs)
        total = sum(losses.values())
        if scaler is None:
            total.backward()
            optimizer.step()
        else:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        return losses

    return step


def inference_runner(model: nn.Module, inputs: tuple):
    model.eval()

    def infer():
        with torch.no_grad():
            return model(*inputs)

    return infer


def _models(setting: Setting, names: Sequence[str], state, device: torch.device) -> Dict[str, nn.Module]:
    models = {}
    for name in names:
        model = build_named_model(setting, name).to(device)
        copy_weights(state, model)
        models[name] = model
    return models


def run_r50(report: Report, device: torch.device, quick: bool, frontends: Sequence[str]) -> None:
    setting = quick_setting(str(device)) if quick else r50_setting(str(device))
    warmup = 0 if quick else 2
    sync = synchronizer(device)
    num_classes = num_classes_of(setting)
    score_thresh = tv_config(setting, iou_aware=True).MODEL.RETINANET.SCORE_THRESH_TEST
    results = {"setting": setting.describe(), "repeats": setting.repeats, "train": [], "inference": []}
    for fe in frontends:
        prefix = fe + "_"
        train_inputs = _to_device(model_inputs(setting, fe, "train", num_classes), fe, device)
        infer_inputs = _to_device(model_inputs(setting, fe, "inference", num_classes), fe, device)
        source = build_named_model(setting, SOURCE_MODEL[fe]).to(device)
        calibrate_head(source, fe, infer_inputs, score_thresh)
        state = source.state_dict()
        del source

        # Training: IoU-aware, the project's RetinaNet, the stock one; float32 and AMP.
        names = [prefix + n for n in ("iou_aware", "retinanet", "stock")]
        for amp in (False, True):
            models = _models(setting, names, state, device)
            runs = {n: train_runner(m, fe, train_inputs, device, amp) for n, m in models.items()}
            medians = round_robin_medians(runs, setting.repeats, warmup, sync)
            for name, run in runs.items():
                peak = peak_memory_mib(run, device)
                results["train"].append({"model": name, "amp": amp, "ms": medians[name], "peak_mib": peak})
            _ratio_rows(report, f"train {fe}{', AMP' if amp else ''}", medians, names, results["train"], amp)
            del models, runs

        # Inference: the project's RetinaNet vs IoU-aware, threshold on p and on S.
        names = [prefix + n for n in ("retinanet", "iou_aware_cls", "iou_aware")]
        models = _models(setting, names, state, device)
        runs = {n: inference_runner(m, infer_inputs) for n, m in models.items()}
        medians = round_robin_medians(runs, setting.repeats * 2, warmup, sync)
        for name, run in runs.items():
            dets = detections_per_image(fe, run())
            results["inference"].append({"model": name, "ms": medians[name], "detections": dets,
                                         "peak_mib": peak_memory_mib(run, device)})  # fmt: skip
        base = medians[prefix + "retinanet"]
        dets = {r["model"]: r["detections"] for r in results["inference"]}
        for name in names[1:]:
            label = "IoU-aware (THRESHOLD_ON cls)" if name.endswith("_cls") else "IoU-aware (THRESHOLD_ON fused)"
            report.add("r50", f"inference {fe}: {label} / RetinaNet",
                       f"{medians[name] / base:.3f} ({medians[name]:.1f} / {base:.1f} ms; detections per image "
                       f"{dets[name]:.0f} / {dets[prefix + 'retinanet']:.0f})")
        del models, runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.sections["r50"] = results


def _ratio_rows(report: Report, label: str, medians: Dict[str, float], names: Sequence[str],
                rows: List[dict], amp: bool) -> None:
    iou_aware, retinanet, stock = names
    peaks = {r["model"]: r["peak_mib"] for r in rows if r["amp"] == amp}
    report.add("r50", f"{label}: IoU-aware / RetinaNet",
               f"{medians[iou_aware] / medians[retinanet]:.3f} ({medians[iou_aware]:.1f} / {medians[retinanet]:.1f} ms;"
               f" peak {_mib(peaks.get(iou_aware))} / {_mib(peaks.get(retinanet))})")
    peer = "torchvision" if stock.startswith("tv") else "Detectron2"
    report.add("r50", f"{label}: RetinaNet / {peer}'s",
               f"{medians[retinanet] / medians[stock]:.3f} ({medians[retinanet]:.1f} / {medians[stock]:.1f} ms;"
               f" peak {_mib(peaks.get(retinanet))} / {_mib(peaks.get(stock))})")
    if amp:
        fp32 = {r["model"]: r["ms"] for r in rows if not r["amp"]}
        report.add("r50", f"{label}: AMP / float32, IoU-aware",
                   f"{medians[iou_aware] / fp32[iou_aware]:.3f} ({medians[iou_aware]:.1f} / {fp32[iou_aware]:.1f} ms)")


# ------------------------------------------------------------------- main job


class _ThroughputLog(logging.Handler):
    """Picks the training loop's own 'Trained N iterations in S s: R it/s' line."""

    PATTERN = re.compile(r"Trained (\d+) iterations in ([\d.]+) s: ([\d.]+) it/s")

    def __init__(self):
        super().__init__(logging.INFO)
        self.found = None

    def emit(self, record):
        match = self.PATTERN.search(record.getMessage())
        if match:
            self.found = {"iterations": int(match.group(1)), "loop_s": float(match.group(2)),
                          "it_per_s": float(match.group(3))}  # fmt: skip


def run_main_job(report: Report, device: torch.device, quick: bool, amp: bool, workdir: str) -> None:
    from ..tv import get_cfg, train

    section = "main_job_amp" if amp else "main_job"
    cfg = get_cfg()
    cfg.merge_from_file(str(MAIN_CONFIG))
    cfg.merge_from_list(main_job_opts(str(device), os.path.join(workdir, section), quick, amp))
    handler = _ThroughputLog()
    project_logger = logging.getLogger("iou_aware_retinanet")
    project_logger.addHandler(handler)
    start = time.perf_counter()
    try:
        results = train(cfg)
    finally:
        project_logger.removeHandler(handler)
    wall = time.perf_counter() - start
    bbox = next(iter(results.values()))["bbox"]
    speed = handler.found or {}
    report.sections[section] = {"config": str(MAIN_CONFIG.relative_to(REPO)), "amp": amp, "wall_s": wall,
                                "max_iter": cfg.SOLVER.MAX_ITER, "bbox": bbox, **speed}  # fmt: skip
    it_s = f"{speed['it_per_s']:.1f} it/s" if speed else "it/s not logged"
    report.add(section, f"{MAIN_CONFIG.relative_to(CONFIGS)}{', SOLVER.AMP.ENABLED' if amp else ''}, "
                        f"{cfg.SOLVER.MAX_ITER} iterations",
               f"AP {bbox['AP']:.1f} / AP50 {bbox['AP50']:.1f} / AP75 {bbox['AP75']:.1f}; {it_s}; wall {wall:.0f} s")


# ----------------------------------------------------------------------- main


def machine_info(device: torch.device, d2_version: Optional[str], d2_reason: Optional[str]) -> dict:
    info = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "detectron2": d2_version,
        "detectron2_skipped": d2_reason,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="every section small: seconds on a CPU")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--time-limit-s", type=float, default=DEFAULT_TIME_LIMIT_S,
                        help=f"skip sections that would end after this many seconds (default {DEFAULT_TIME_LIMIT_S}; "
                             "0: no limit; --quick: none)")
    parser.add_argument("--json", help="write the table and every measurement to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (use --device cpu --quick for a dry run)")
    start = time.perf_counter()
    d2_version, d2_reason = detectron2_status()
    frontends = ["tv"] + (["d2"] if d2_version else [])
    report = Report()
    machine = machine_info(device, d2_version, d2_reason)
    if d2_reason:
        report.add("detectron2", "Detectron2 rows", f"not importable: {d2_reason}", "skipped")

    def write_json(total_s: float) -> None:
        if args.json:  # after every section: a run stopped from outside keeps what it measured
            Path(args.json).write_text(json.dumps(
                {"machine": machine, "quick": args.quick, "total_s": total_s, "table": report.rows,
                 "failed": report.failed, "sections": report.sections}, indent=2) + "\n")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        steps = {
            "tests": lambda: run_device_tests(report, str(device), args.quick),
            "assigners": lambda: run_assigners(report, device, args.quick, d2_version is not None),
            "r50": lambda: run_r50(report, device, args.quick, frontends),
            "main_job": lambda: run_main_job(report, device, args.quick, False, workdir),
            "main_job_amp": lambda: run_main_job(report, device, args.quick, True, workdir),
        }
        for name in SECTIONS:
            if name not in args.sections:
                continue
            elapsed = time.perf_counter() - start
            needs = SECTION_SECONDS[name]
            if name == "main_job_amp" and "main_job" in report.sections:
                needs = report.sections["main_job"]["wall_s"]
            if args.time_limit_s and not args.quick and elapsed + needs > args.time_limit_s:
                report.add(name, "section", f"not started: {elapsed:.0f} s spent of --time-limit-s {args.time_limit_s:.0f}",
                           "skipped")
                continue
            _progress(f"gpu_check: {name} ...")
            section_start = time.perf_counter()
            try:
                steps[name]()
            except Exception as e:  # reported, and the other sections still run
                logging.getLogger(__name__).exception("section %s failed", name)
                report.add(name, "section", f"{type(e).__name__}: {e}".replace("|", "/")[:300], "FAILED")
            _progress(f"gpu_check: {name} done in {time.perf_counter() - section_start:.0f} s")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_json(time.perf_counter() - start)

    total = time.perf_counter() - start
    gpu = machine.get("gpu", "no GPU")
    header = (f"GPU check on {machine['device']} ({gpu}); Python {machine['python']}, torch {machine['torch']}, "
              f"torchvision {machine['torchvision']}, CUDA {machine['cuda']}, Detectron2 "
              f"{machine['detectron2'] or 'not importable'}; {total:.0f} s{' (quick)' if args.quick else ''}")
    print(header)
    print()
    print(report.table())
    write_json(total)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
