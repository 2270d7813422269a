"""Where the time of a training step goes, against what the machine can do.

    python -m iou_aware_retinanet.benchmarks.breakdown --config-file configs/Shapes/iou_aware_retinanet.yaml
        [--steps 30] [--warmup 5] [--threads N] [--profile 15] [--json breakdown.json] [--quick] [KEY VALUE ...]

On the config's model and real batches of its training data (the engine's
loader, loaded beforehand), prints:

* the forward pass's FLOPs per batch, counted by fvcore's ``FlopCountAnalysis``
  (backbone + FPN, head); fvcore counts one multiply-add as one "flop", so
  FLOPs = 2 x its count, and a training step (forward + backward) is taken as
  3 x the forward's FLOPs;
* the machine's peak in the same process and with the same intra-op threads:
  a large float32 (and bfloat16) matrix product, a large 3x3 convolution, and
  one of the head's 3x3 convolutions on its largest feature map (the
  convolutions in the default and the channels-last memory format);
* the step's median time and its achieved GFLOP/s, and where its time goes:
  input transform, backbone + FPN forward, head forward, anchors, label
  assignment, losses, backward (with gradient clipping), optimizer step,
  other (LR schedule, loss values, glue), in ms and % of the step, with the
  achieved GFLOP/s where a FLOP count applies;
* the convolutions on their own: each convolution call of a training forward
  (backbone, FPN, head, as recorded on one real batch) timed on its
  own, forward and backward, on random tensors of its shapes, in the default
  and the channels-last memory format, summed over the step's calls: what
  the step's convolutions cost with this machine's kernels at these shapes,
  with nothing around them, next to the profile's time of the same kernels
  inside the step;
* then, from ``torch.profiler`` over a few more steps (``--profile K``, 0 to
  skip): the operator calls per step and the K operators with the most self
  CPU time, with their calls per step (many small operators point to Python
  overhead, few large ones to the kernels).

The step is the engine's own :func:`~iou_aware_retinanet.tv.engine.run_step`
(forward, backward, optimizer and LR-scheduler step, as the main job runs
it), timed piece by piece with forward hooks on the model's backbone, head and
anchor generator, the optimizer's step hooks and a clock around the assigner's
calls: nothing the model computes changes. The parts tile the step; the
plain step, without the hooks, is timed alternately with the timed one and
printed next to it. Times are medians over ``--steps`` steps after
``--warmup`` steps. ``--quick`` is a tiny version (a 16-image dataset, 2 images
a batch, small peak problems) that checks the command works in seconds.
"""
import argparse
import copy
import json
import os
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..studies.recipe import MAIN_CONFIG
from ..tv.cli import setup_cfg
from ..tv.data import build_train_loader, load_train_records
from ..tv.engine import run_step, seed_all
from ..tv.model import build_model
from ..tv.solver import build_lr_scheduler, build_optimizer
from . import speed

__all__ = ["PARTS", "QUICK_OPTS", "load_batches", "fresh_training_state", "machine_info", "setup_cpu_cfg", "main"]

# Overrides of --quick: a 16-image dataset, not decoded into memory, batches of 2.
QUICK_OPTS = ["DATASETS.TRAIN", "('shapes_mini_train',)", "DATALOADER.CACHE_IMAGES", "False",
              "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2"]
# The parts of a step, in the order they run.
PARTS = ("input transform", "backbone + FPN forward", "head forward", "anchors", "assignment", "losses",
         "backward", "optimizer step", "other")
# A training step's FLOPs per forward FLOP: forward + backward (about twice the forward).
STEP_FLOPS_PER_FORWARD = 3
# The float32 kernels whose best GFLOP/s is the machine's peak.
PEAK_KERNELS = ("matmul float32", "conv3x3 large", "conv3x3 large, channels-last")
# Steps under torch.profiler, after the timed ones (profiling slows them: never timed together).
PROFILE_STEPS = 5
# Distinct batches loaded (the steps cycle through them).
MAX_BATCHES = 40


# --------------------------------------------------------------------------- shared with levers.py

def load_batches(cfg, count: int) -> list:
    """``count`` training batches ``(images, targets)`` from the engine's loader (seed ``cfg.SEED``), in memory."""
    records, _ = load_train_records(cfg)
    loader_iter = iter(build_train_loader(cfg, max(cfg.SEED, 0), 0, records))
    return [next(loader_iter) for _ in range(count)]


def fresh_training_state(cfg, seed: int = 0):
    """(model in train mode, optimizer, LR scheduler) as the engine builds them, from ``seed``."""
    seed_all(seed)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    return model, optimizer, build_lr_scheduler(cfg, optimizer)


def setup_cpu_cfg(config_file: str, opts: Sequence[str]):
    """The config, refused with an error naming the key unless it runs on the CPU: the
    benchmarks time the CPU's step with wall clocks (a GPU's work runs asynchronously)."""
    cfg = setup_cfg(config_file, opts)
    if torch.device(cfg.MODEL.DEVICE).type != "cpu":
        raise ValueError(
            f"{config_file}: MODEL.DEVICE is {cfg.MODEL.DEVICE!r}; this benchmark times the training step on "
            "the CPU: add MODEL.DEVICE cpu"
        )
    return cfg


def machine_info() -> dict:
    """CPU, cores, torch versions, intra-op threads and load, as ``benchmarks.speed`` reports them."""
    info = speed.machine_info(None)
    info.pop("detectron2")  # not used here
    return info


def median_ms(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


# --------------------------------------------------------------------------- FLOPs and peak

def count_forward_macs(model, images, targets) -> Dict[str, object]:
    """fvcore's multiply-add counts of the backbone + FPN and of the head on one batch,
    and the shape of the largest feature map the head runs on.

    Counted on a copy of the model: tracing runs the forward, which would move
    the BatchNorm running statistics of the model itself."""
    from fvcore.nn import FlopCountAnalysis

    model = copy.deepcopy(model)
    with torch.no_grad():
        batched, _ = model.transform(images, [dict(t) for t in targets])
        features = list(model.backbone(batched.tensors).values())

    def count(module, inputs) -> int:
        analysis = FlopCountAnalysis(module, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing's own warnings, not the reader's business
            return int(analysis.total())

    return {
        "backbone": count(model.backbone, (batched.tensors,)),
        "head": count(model.head, (features,)),
        "head_input_shape": tuple(features[0].shape),
    }


def measure_peak(head_input_shape: Sequence[int], quick: bool = False, repeats: int = 5) -> Dict[str, dict]:
    """GFLOP/s of large dense kernels with the current intra-op threads (what the machine can do),
    and of one 3x3 convolution of the head on its largest feature map (``head_input_shape``)."""
    n = 256 if quick else 2048
    conv_n, conv_c, conv_hw = (2, 32, 32) if quick else (8, 128, 64)
    head_n, head_c, head_h, head_w = head_input_shape
    results = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            ms = median_ms(lambda: torch.mm(a, b), repeats)
            name = "matmul " + str(dtype).replace("torch.", "")
            results[name] = {"shape": f"{n}x{n} @ {n}x{n}", "ms": ms, "gflops": 2 * n**3 / ms / 1e6}
        shapes = {"conv3x3 large": (conv_n, conv_c, conv_hw, conv_hw),
                  "conv3x3 of the head": (head_n, head_c, head_h, head_w)}
        for name, (bn, c, h, w) in shapes.items():
            for suffix, memory_format in (("", torch.contiguous_format), (", channels-last", torch.channels_last)):
                conv = nn.Conv2d(c, c, 3, padding=1).to(memory_format=memory_format)
                x = torch.randn(bn, c, h, w).contiguous(memory_format=memory_format)
                ms = median_ms(lambda: conv(x), repeats)
                flops = 2 * bn * c * c * 9 * h * w
                results[name + suffix] = {
                    "shape": f"({bn}, {c}, {h}, {w}) -> {c} channels", "ms": ms, "gflops": flops / ms / 1e6,
                }
    return results


class _ConvolutionRecorder(TorchFunctionMode):
    """Records every 2-D convolution call, by module or functional (the head's output convs are
    functional): weight and input shapes, geometry, and whether input and weight need gradients."""

    def __init__(self):
        super().__init__()
        self.calls: List[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.conv2d or func is torch.conv2d:
            bound = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args), **kwargs)
            x, weight = bound["input"], bound["weight"]

            def pair(value, default):
                value = bound.get(value, default)
                if isinstance(value, str):  # padding "same" / "valid"
                    return value
                return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

            self.calls.append({
                "weight_shape": tuple(weight.shape), "bias": bound.get("bias") is not None,
                "stride": pair("stride", 1), "padding": pair("padding", 0), "dilation": pair("dilation", 1),
                "groups": int(bound.get("groups", 1)), "input_shape": tuple(x.shape),
                "input_grad": bool(x.requires_grad), "weight_grad": bool(weight.requires_grad),
            })
        return func(*args, **kwargs)


def record_convolutions(model, images, targets) -> List[dict]:
    """Every 2-D convolution of one training forward of backbone + FPN and head, in order:
    weight and input shapes, stride, padding, dilation, groups, and whether its input and its
    weight need gradients. Recorded on a copy of the model (the forward moves BatchNorm statistics)."""
    model = copy.deepcopy(model)
    batched, _ = model.transform(images, [dict(t) for t in targets])
    with _ConvolutionRecorder() as recorder:
        model.head(list(model.backbone(batched.tensors).values()))
    return recorder.calls


def _conv_macs(call: dict) -> int:
    out_c, in_c_per_group, kh, kw = call["weight_shape"]
    n, _, h, w = call["input_shape"]
    padding, stride, dilation = call["padding"], call["stride"], call["dilation"]
    if padding == "same":  # stride 1 (PyTorch's rule): the output keeps the input's size
        out_h, out_w = h, w
    else:
        padding = (0, 0) if padding == "valid" else padding
        out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n * out_c * out_h * out_w * in_c_per_group * kh * kw


def time_convolutions(calls: Sequence[dict], repeats: int = 5) -> Dict[str, dict]:
    """The convolutions on their own: each distinct call of ``calls`` timed alone, forward +
    backward (the gradients the model needs: weight, bias, input), on random tensors of its
    shapes, median of ``repeats``; summed over the step's calls. Per memory format:
    {"ms", "forward_ms", "gflop", "gflops", "calls"}."""
    counts: Dict[tuple, int] = {}
    for call in calls:
        key = tuple(sorted(call.items()))
        counts[key] = counts.get(key, 0) + 1
    results = {}
    for name, memory_format in (("default", torch.contiguous_format), ("channels-last", torch.channels_last)):
        total_ms = forward_ms = flops = 0.0
        for key, count in counts.items():
            call = dict(key)
            weight = torch.randn(call["weight_shape"]).contiguous(memory_format=memory_format)
            weight.requires_grad_(call["weight_grad"])
            bias = torch.zeros(call["weight_shape"][0], requires_grad=call["weight_grad"]) if call["bias"] else None
            x = torch.randn(call["input_shape"]).contiguous(memory_format=memory_format)
            x.requires_grad_(call["input_grad"])
            needs_grad = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
            geometry = dict(stride=call["stride"], padding=call["padding"], dilation=call["dilation"],
                            groups=call["groups"])

            def forward():
                return torch.nn.functional.conv2d(x, weight, bias, **geometry)

            grad = torch.randn_like(forward())

            def forward_backward():
                # autograd.grad, not .backward(): nothing accumulates into .grad between repeats
                if needs_grad:
                    torch.autograd.grad(forward(), needs_grad, grad)
                else:
                    forward()

            with torch.no_grad():
                forward_ms += count * median_ms(forward, repeats)
            total_ms += count * median_ms(forward_backward, repeats)
            macs = _conv_macs(call)
            flops += count * 2 * macs * (1 + call["input_grad"] + call["weight_grad"])  # forward + each gradient
        results[name] = {"ms": total_ms, "forward_ms": forward_ms, "gflop": flops / 1e9,
                         "gflops": flops / total_ms / 1e6, "calls": len(calls)}
    return results


# --------------------------------------------------------------------------- the timed step

class _TimedAssigner:
    """The model's assigner, with the time of its calls added up; every attribute passes through."""

    def __init__(self, assigner):
        self._assigner = assigner
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._assigner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self._assigner, name)


class StepClock:
    """Hooks that stamp the time of each piece of :func:`run_step`; removed by :meth:`close`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.marks: Dict[str, float] = {}
        self.assigner = _TimedAssigner(model.assigner)
        self._original_assigner = model.assigner
        model.assigner = self.assigner
        self._handles = []
        for name, module in (("backbone", model.backbone), ("head", model.head), ("anchors", model.anchor_generator)):
            self._handles.append(module.register_forward_pre_hook(self._stamp(name + "_start")))
            self._handles.append(module.register_forward_hook(self._stamp(name + "_end")))
        self._handles.append(model.register_forward_hook(self._stamp("forward_end")))
        self._handles.append(optimizer.register_step_pre_hook(self._stamp("optimizer_start")))
        self._handles.append(optimizer.register_step_post_hook(self._stamp("optimizer_end")))

    def _stamp(self, name: str):
        def hook(*_):
            self.marks[name] = time.perf_counter()

        return hook

    def run(self, step: Callable[[], object]) -> Dict[str, float]:
        """Seconds of each of :data:`PARTS` in one call of ``step``, and ``"step"``, the whole."""
        self.marks.clear()
        self.assigner.seconds = 0.0
        start = time.perf_counter()
        step()
        end = time.perf_counter()
        m = self.marks
        order = ["backbone_start", "backbone_end", "head_start", "head_end", "anchors_start", "anchors_end",
                 "forward_end", "optimizer_start", "optimizer_end"]
        missing = [name for name in order if name not in m]
        if missing or any(m[a] > m[b] for a, b in zip(order, order[1:])):
            raise RuntimeError(
                "the training step did not run backbone, head, anchors, loss, backward and optimizer step "
                f"once each in this order (stamps: {sorted(m, key=m.get)}); the breakdown needs that order"
            )
        assignment = self.assigner.seconds
        parts = {
            "input transform": m["backbone_start"] - start,
            "backbone + FPN forward": m["backbone_end"] - m["backbone_start"],
            "head forward": m["head_end"] - m["head_start"],
            "anchors": m["anchors_end"] - m["anchors_start"],
            "assignment": assignment,
            "losses": m["forward_end"] - m["anchors_end"] - assignment,
            "backward": m["optimizer_start"] - m["forward_end"],
            "optimizer step": m["optimizer_end"] - m["optimizer_start"],
            # The LR schedule, the loss values, and the glue between backbone, head and anchors.
            "other": end - m["optimizer_end"] + (m["head_start"] - m["backbone_end"])
            + (m["anchors_start"] - m["head_end"]),
        }
        parts["step"] = end - start
        return parts

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.model.assigner = self._original_assigner


def time_step_parts(cfg, batches: Sequence, steps: int, warmup: int, profile_steps: int = 0) -> dict:
    """Per-step seconds of each part (timed steps) and of the plain step (no hooks), alternated;
    with ``profile_steps``, then the operators of that many steps (:func:`profile_ops`)."""
    model, optimizer, scheduler = fresh_training_state(cfg)
    iteration = 0

    def step():
        nonlocal iteration
        images, targets = batches[iteration % len(batches)]
        run_step(cfg, model, optimizer, scheduler, images, targets, iteration)
        iteration += 1

    for _ in range(warmup):
        step()
    timed, plain = [], []
    for _ in range(steps):
        clock = StepClock(model, optimizer)
        try:
            timed.append(clock.run(step))
        finally:
            clock.close()
        start = time.perf_counter()
        step()
        plain.append(time.perf_counter() - start)
    result = {"timed": timed, "plain": plain}
    if profile_steps:
        result["profile"] = profile_ops(step, profile_steps)
    return result


def profile_ops(step: Callable[[], object], steps: int) -> dict:
    """torch.profiler's operator calls of ``steps`` calls of ``step``: the number of operator calls
    per step, and each operator's calls and self CPU time per step, largest time first."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own log ("no GPU found") is noise here
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ops = sorted(
        ({"op": e.key, "calls": e.count / steps, "self_ms": e.self_cpu_time_total / 1000 / steps} for e in events),
        key=lambda op: -op["self_ms"],
    )
    return {"steps": steps, "aten_calls_per_step": sum(op["calls"] for op in ops), "ops": ops}


# --------------------------------------------------------------------------- report

def summarize(timed: List[Dict[str, float]], plain: List[float], macs: Dict[str, int]) -> dict:
    step_ms = 1000 * statistics.median(t["step"] for t in timed)
    forward_flops = 2 * (macs["backbone"] + macs["head"])
    flops_of = {
        "backbone + FPN forward": 2 * macs["backbone"],
        "head forward": 2 * macs["head"],
        "backward": (STEP_FLOPS_PER_FORWARD - 1) * forward_flops,
    }
    parts = []
    for name in PARTS:
        ms = 1000 * statistics.median(t[name] for t in timed)
        flops = flops_of.get(name)
        parts.append({
            "part": name,
            "ms": ms,
            "share": ms / step_ms,
            "gflop": flops / 1e9 if flops else None,
            "gflops": flops / ms / 1e6 if flops and ms > 0 else None,
        })
    plain_ms = 1000 * statistics.median(plain)
    step_flops = STEP_FLOPS_PER_FORWARD * forward_flops
    return {
        "forward_gmac": {"backbone": macs["backbone"] / 1e9, "head": macs["head"] / 1e9,
                         "total": (macs["backbone"] + macs["head"]) / 1e9},
        "forward_gflop": forward_flops / 1e9,
        "step_gflop": step_flops / 1e9,
        "step_ms": step_ms,
        "plain_step_ms": plain_ms,
        "achieved_gflops": step_flops / plain_ms / 1e6,
        "parts": parts,
        "parts_sum_ms": sum(p["ms"] for p in parts),
    }


def _load(value: Optional[float]) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _gflops(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(result: dict) -> List[str]:
    machine, s = result["machine"], result["summary"]
    best_peak = max(result["peak"][name]["gflops"] for name in PEAK_KERNELS)
    lines = [
        f"{result['config']}: {result['images_per_batch']} images of {result['image_size']} a batch, "
        f"{result['steps']} steps after {result['warmup']} warm-up",
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} intra-op threads, "
        f"torch {machine['torch']}, load average {_load(machine['load_average_1min'])}",
        "",
        f"forward FLOPs per batch (fvcore): backbone + FPN {s['forward_gmac']['backbone']:.3f} GMAC, "
        f"head {s['forward_gmac']['head']:.3f} GMAC; training step ~{STEP_FLOPS_PER_FORWARD}x forward = "
        f"{s['step_gflop']:.2f} GFLOP",
        "",
        "| peak kernel | shape | ms | GFLOP/s |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {name} | {p['shape']} | {p['ms']:.2f} | {p['gflops']:.1f} |" for name, p in result["peak"].items()]
    lines += [
        "",
        f"training step: {s['plain_step_ms']:.1f} ms ({s['step_ms']:.1f} ms with the timing hooks), "
        f"{s['achieved_gflops']:.1f} GFLOP/s = {s['achieved_gflops'] / best_peak:.0%} of the float32 peak "
        f"({best_peak:.1f} GFLOP/s, the best of: {', '.join(PEAK_KERNELS)})",
        "",
        "| part | ms | % of step | GFLOP | GFLOP/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in s["parts"]:
        gflop = "-" if p["gflop"] is None else f"{p['gflop']:.2f}"
        lines.append(f"| {p['part']} | {p['ms']:.2f} | {100 * p['share']:.1f} | {gflop} | {_gflops(p['gflops'])} |")
    lines.append(f"| sum of the parts | {s['parts_sum_ms']:.2f} | {100 * s['parts_sum_ms'] / s['step_ms']:.1f} | | |")
    alone = result.get("convolutions")
    if alone:
        lines += ["", f"the step's {alone['default']['calls']} convolution calls, each timed alone "
                  "(forward + backward, random tensors of their shapes):", "",
                  "| memory format | ms | forward ms | GFLOP | GFLOP/s | % of the plain step |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {c['ms']:.2f} | {c['forward_ms']:.2f} | {c['gflop']:.2f} | {c['gflops']:.1f} | "
                  f"{100 * c['ms'] / s['plain_step_ms']:.0f} |" for name, c in alone.items()]
    profile = result["per_step"].get("profile")
    if profile and result["profile_top"]:
        lines += [
            "",
            f"operators (torch.profiler, {profile['steps']} steps): "
            f"{profile['aten_calls_per_step']:.0f} aten calls a step (nested ones included); "
            f"the {result['profile_top']} with the most self CPU time:",
            "",
            "| operator | calls / step | self ms / step |",
            "|---|---:|---:|",
        ]
        top = profile["ops"][: result["profile_top"]]
        lines += [f"| {op['op']} | {op['calls']:.0f} | {op['self_ms']:.2f} |" for op in top]
    return lines


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=str(MAIN_CONFIG))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (default 5; --quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", type=int, default=15, metavar="K",
                        help="then profile a few steps and print the K operators with the most time (0: don't)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--quick", action="store_true", help="tiny version: seconds, figures meaningless")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    if steps < 1 or warmup < 0:
        parser.error("need --steps >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = setup_cpu_cfg(args.config_file, (QUICK_OPTS if args.quick else []) + list(args.opts))
    batches = load_batches(cfg, min(2 * steps + warmup, MAX_BATCHES))
    images, targets = batches[0]
    model, _, _ = fresh_training_state(cfg)
    macs = count_forward_macs(model, images, targets)
    convolutions = time_convolutions(record_convolutions(model, images, targets), repeats=2 if args.quick else 5)
    del model
    peak = measure_peak(macs["head_input_shape"], quick=args.quick)
    times = time_step_parts(cfg, batches, steps, warmup, (1 if args.quick else PROFILE_STEPS) if args.profile else 0)
    result = {
        "config": args.config_file,
        "images_per_batch": len(images),
        "image_size": "x".join(str(s) for s in images[0].shape[-2:]),
        "steps": steps,
        "warmup": warmup,
        "profile_top": args.profile,
        "machine": machine_info(),
        "peak": peak,
        "convolutions": convolutions,
        "summary": summarize(times["timed"], times["plain"], macs),
        "per_step": times,
    }
    print("\n".join(format_report(result)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
