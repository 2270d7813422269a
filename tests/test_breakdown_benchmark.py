"""The step breakdown and the speed levers run end to end and report what they promise;
the anchor cache (one of the levers) returns exactly the anchors it replaces.

Both benchmarks run once in ``--quick`` mode (a 16-image shapes dataset generated
in a temporary folder, batches of 2, one intra-op thread); the assertions are on
the structure and the invariants of the results, never on speed.
"""
import contextlib
import io
import json
import math
import statistics

import pytest
import torch
from torch import nn

from iou_aware_retinanet.benchmarks import breakdown, levers
from iou_aware_retinanet.tv import anchors as tv_anchors
from iou_aware_retinanet.tv.cli import setup_cfg
from iou_aware_retinanet.tv.engine import run_step


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IOU_AWARE_RETINANET_DATASETS", str(tmp_path_factory.mktemp("datasets")))
        yield


def _run(module, argv, json_path):
    """(returned results, printed text, JSON file contents) of ``module.main(argv)``."""
    out = io.StringIO()
    threads = torch.get_num_threads()  # --threads sets it process-wide: restore it for other tests
    try:
        with contextlib.redirect_stdout(out):
            result = module.main(argv + ["--json", str(json_path)])
    finally:
        torch.set_num_threads(threads)
    return result, out.getvalue(), json.loads(json_path.read_text())


@pytest.fixture(scope="module")
def breakdown_run(datasets, tmp_path_factory):
    return _run(breakdown, ["--quick", "--threads", "1"], tmp_path_factory.mktemp("breakdown") / "breakdown.json")


@pytest.fixture(scope="module")
def levers_run(datasets, tmp_path_factory):
    return _run(levers, ["--quick", "--threads", "1"], tmp_path_factory.mktemp("levers") / "levers.json")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# --------------------------------------------------------------------------- breakdown

def test_breakdown_parts_tile_every_step(breakdown_run):
    result = breakdown_run[0]
    timed = result["per_step"]["timed"]
    assert len(timed) == result["steps"] == 3
    for step in timed:
        assert set(step) == set(breakdown.PARTS) | {"step"}
        assert all(step[name] >= 0 for name in breakdown.PARTS), step
        assert sum(step[name] for name in breakdown.PARTS) == pytest.approx(step["step"], rel=1e-9)


def test_breakdown_summary_is_consistent(breakdown_run):
    s = breakdown_run[0]["summary"]
    assert [p["part"] for p in s["parts"]] == list(breakdown.PARTS)
    for p in s["parts"]:
        assert p["ms"] >= 0 and p["share"] == pytest.approx(p["ms"] / s["step_ms"])
    # Medians of the parts need not add up to the median step exactly, but nearly.
    assert s["parts_sum_ms"] == pytest.approx(s["step_ms"], rel=0.5)
    assert _positive(s["step_ms"]) and _positive(s["plain_step_ms"])
    assert s["step_gflop"] == pytest.approx(breakdown.STEP_FLOPS_PER_FORWARD * s["forward_gflop"])
    assert s["achieved_gflops"] == pytest.approx(s["step_gflop"] * 1e3 / s["plain_step_ms"])
    with_flops = {p["part"] for p in s["parts"] if p["gflops"] is not None}
    assert with_flops == {"backbone + FPN forward", "head forward", "backward"}
    for p in s["parts"]:
        if p["gflops"] is not None:
            assert p["gflops"] == pytest.approx(p["gflop"] * 1e3 / p["ms"])


def _conv_macs(module: nn.Module, input_sizes) -> int:
    """Multiply-adds of every Conv2d of ``module`` (3x3, stride 1, padding 1 in the head)
    applied once to each (N, C, H, W) size of ``input_sizes``."""
    per_pixel = sum(
        m.in_channels // m.groups * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        for m in module.modules() if isinstance(m, nn.Conv2d)
    )
    return sum(n * h * w * per_pixel for n, _, h, w in input_sizes)


def test_breakdown_head_flops_match_its_convolutions(datasets):
    """fvcore sees every level of the head: its count is the convolutions' multiply-adds
    (counted here by hand from the layers) plus a little for the group norms."""
    cfg = setup_cfg(str(breakdown.MAIN_CONFIG), breakdown.QUICK_OPTS)
    images, targets = breakdown.load_batches(cfg, 1)[0]
    model, _, _ = breakdown.fresh_training_state(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs = breakdown.count_forward_macs(model, images, targets)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "counting moved the model's state"
    with torch.no_grad():
        batched, _ = model.transform(images, targets)
        features = list(model.backbone(batched.tensors).values())
    by_hand = _conv_macs(model.head, [f.shape for f in features])
    assert by_hand <= macs["head"] <= 1.05 * by_hand
    assert macs["head_input_shape"] == tuple(features[0].shape)
    assert macs["backbone"] > 0


def test_breakdown_convolution_macs_by_hand():
    call = {"weight_shape": (8, 3, 3, 3), "stride": (2, 2), "padding": (1, 1), "dilation": (1, 1),
            "input_shape": (2, 3, 9, 9)}
    assert breakdown._conv_macs(call) == 2 * 8 * 5 * 5 * (3 * 3 * 3)  # 9 px, stride 2, pad 1 -> 5 px
    call.update(weight_shape=(8, 1, 3, 3), groups=3)  # depthwise-like: in-channels per group
    assert breakdown._conv_macs(call) == 2 * 8 * 5 * 5 * 9
    call.update(stride=(1, 1), padding="same")
    assert breakdown._conv_macs(call) == 2 * 8 * 9 * 9 * 9
    call.update(padding="valid")
    assert breakdown._conv_macs(call) == 2 * 8 * 7 * 7 * 9


def test_breakdown_records_functional_convolutions_and_their_gradients():
    """Module and functional calls, positional or keyword arguments, string padding, and
    which of input and weight need gradients."""
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    frozen = torch.randn(5, 4, 1, 1)  # no gradient, as a frozen layer's
    x = torch.randn(2, 3, 8, 8)
    with breakdown._ConvolutionRecorder() as recorder:
        y = conv(x)
        torch.nn.functional.conv2d(y, frozen, None, padding="same")
        torch.nn.functional.conv2d(input=y, weight=frozen, dilation=2)
    first, second, third = recorder.calls
    assert first["weight_shape"] == (4, 3, 3, 3) and first["stride"] == (2, 2) and first["padding"] == (1, 1)
    assert first["bias"] and first["weight_grad"] and not first["input_grad"]
    assert second["padding"] == "same" and not second["bias"] and second["input_grad"] and not second["weight_grad"]
    assert third["dilation"] == (2, 2) and third["padding"] == (0, 0) and third["input_shape"] == (2, 4, 4, 4)
    timed = breakdown.time_convolutions(recorder.calls, repeats=1)
    assert timed["default"]["calls"] == 3
    macs = [breakdown._conv_macs(c) for c in recorder.calls]
    # forward + weight gradient; forward + input gradient (twice)
    assert timed["default"]["gflop"] == pytest.approx(2 * (2 * macs[0] + 2 * macs[1] + 2 * macs[2]) / 1e9)


def test_breakdown_times_each_of_the_steps_convolutions(breakdown_run, datasets):
    """The recorded calls are the step's convolutions (as many as the profiler counts), their
    multiply-adds are fvcore's count less the norms, and both memory formats time them all."""
    result, text, _ = breakdown_run
    cfg = setup_cfg(str(breakdown.MAIN_CONFIG), breakdown.QUICK_OPTS)
    images, targets = breakdown.load_batches(cfg, 1)[0]
    model, _, _ = breakdown.fresh_training_state(cfg)
    calls = breakdown.record_convolutions(model, images, targets)
    ops = {op["op"]: op for op in result["per_step"]["profile"]["ops"]}
    assert len(calls) == ops["aten::convolution"]["calls"]
    assert calls[0]["input_grad"] is False and all(c["input_grad"] for c in calls[1:])  # only the stem's input is data
    assert all(c["weight_grad"] for c in calls)  # the Shapes configs freeze nothing
    macs = breakdown.count_forward_macs(model, images, targets)
    conv_macs = sum(breakdown._conv_macs(c) for c in calls)
    assert 0.95 * (macs["backbone"] + macs["head"]) <= conv_macs <= macs["backbone"] + macs["head"]
    alone = result["convolutions"]
    assert set(alone) == {"default", "channels-last"}
    for c in alone.values():
        assert c["calls"] == len(calls)
        assert _positive(c["ms"]) and _positive(c["forward_ms"]) and c["forward_ms"] < c["ms"]
        # forward + weight gradient for the stem, + input gradient for the rest
        assert c["gflop"] == pytest.approx((3 * 2 * conv_macs - 2 * breakdown._conv_macs(calls[0])) / 1e9)
        assert f"| {'default' if c is alone['default'] else 'channels-last'} | {c['ms']:.2f} |" in text


def test_breakdown_reports_peak_and_prints_every_part(breakdown_run):
    result, text, from_json = breakdown_run
    assert set(breakdown.PEAK_KERNELS) <= set(result["peak"])
    assert all(_positive(p["gflops"]) and _positive(p["ms"]) for p in result["peak"].values())
    for name in breakdown.PARTS:
        assert f"| {name} |" in text
    for name in result["peak"]:
        assert f"| {name} |" in text
    assert "GFLOP/s" in text and "% of the float32 peak" in text
    assert from_json["summary"] == json.loads(json.dumps(result["summary"]))
    assert result["machine"]["threads"] == 1


def test_breakdown_profiles_the_operators(breakdown_run):
    result, text, _ = breakdown_run
    profile = result["per_step"]["profile"]
    ops = {op["op"]: op for op in profile["ops"]}
    # A training step of a convolutional net: convolutions forward and backward, the SGD update.
    assert {"aten::convolution", "aten::convolution_backward"} <= set(ops)
    assert ops["aten::convolution"]["calls"] == ops["aten::convolution_backward"]["calls"] > 0
    assert all(op["self_ms"] >= 0 and op["calls"] > 0 for op in profile["ops"])
    assert [op["self_ms"] for op in profile["ops"]] == sorted((op["self_ms"] for op in profile["ops"]), reverse=True)
    assert profile["aten_calls_per_step"] == pytest.approx(sum(op["calls"] for op in profile["ops"]))
    top = profile["ops"][: result["profile_top"]]
    assert all(f"| {op['op']} |" in text for op in top)


# --------------------------------------------------------------------------- levers

def test_levers_ratios_are_positive_and_finite(levers_run):
    result, text, from_json = levers_run
    measured = [row["lever"] for row in result["levers"]]
    # --threads 1: the 1-thread lever is the default itself.
    assert result["default_threads"] == 1 and result["skipped"] == ["threads_1"]
    assert measured == [name for name in levers.QUICK_LEVERS if name != "threads_1"]
    for row in result["levers"]:
        assert len(row["ratios"]) == result["rounds"] == 1
        assert all(_positive(r) for r in row["ratios"]), row
        assert row["ratio"] == statistics.median(row["ratios"])
        assert row["speedup"] == pytest.approx(1 / row["ratio"])
        assert _positive(row["ms"]) and _positive(row["default_ms"])
        assert math.isfinite(row["first_loss_rel_diff"]) and row["first_loss_rel_diff"] >= 0
        assert f"| {row['lever']}: " in text
    assert all(_positive(d) for d in result["drift"])
    assert [row["lever"] for row in from_json["levers"]] == measured
    assert "threads_1: skipped" in text


def test_levers_that_keep_the_numbers_keep_them(levers_run):
    rows = {row["lever"]: row for row in levers_run[0]["levers"]}
    assert rows["anchor_cache"]["first_loss_rel_diff"] == 0.0
    assert rows["threads_2"]["threads"] == 2
    # bfloat16 changes the numbers, but not by much on the first step.
    assert 0 < rows["bf16"]["first_loss_rel_diff"] < 0.1


@pytest.mark.parametrize("name", ["fast", "channels_last+fast", "bf16+bf16", "threads_1+threads_2"])
def test_levers_unknown_or_repeated_names_are_refused(name):
    with pytest.raises(ValueError, match="lever"):
        levers.build_variant(name, None, 1)


def test_levers_joined_by_plus_apply_together():
    cfg = setup_cfg(str(breakdown.MAIN_CONFIG), breakdown.QUICK_OPTS)
    variant = levers.build_variant("channels_last+anchor_cache+bf16+threads_2", cfg, 1)
    assert variant.threads == 2 and variant.cfg.SOLVER.AMP.ENABLED and not cfg.SOLVER.AMP.ENABLED
    assert variant.cfg.MODEL.CHANNELS_LAST and not cfg.MODEL.CHANNELS_LAST
    assert variant.model.anchor_generator.cache
    convs = [m for m in variant.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    default = levers.build_variant("default", cfg, 1)
    assert default.threads == 1 and not default.model.anchor_generator.cache and not default.cfg.SOLVER.AMP.ENABLED
    assert not convs[0].weight.is_contiguous() or convs[0].weight.shape[-1] == 1
    assert all(c.weight.is_contiguous() for c in default.model.modules() if isinstance(c, nn.Conv2d))


# --------------------------------------------------------------------------- anchor cache

def _generator(cache: bool) -> tv_anchors.AnchorGenerator:
    sizes = [[16.0, 20.2], [32.0, 40.3], [64.0, 80.6]]
    return tv_anchors.AnchorGenerator(sizes, [[0.5, 1.0, 2.0]] * 3, strides=[8, 16, 32], offset=0.5, cache=cache)


def _call(generator, height: int, width: int, dtype=torch.float32, batch: int = 2):
    from torchvision.models.detection.image_list import ImageList

    features = [torch.zeros(batch, 4, -(-height // s), -(-width // s), dtype=dtype) for s in (8, 16, 32)]
    images = ImageList(torch.zeros(batch, 3, height, width), [(height, width)] * batch)
    return generator(images, features)


def test_anchor_cache_returns_identical_anchors():
    plain, cached = _generator(False), _generator(True)
    calls = [(64, 64, torch.float32), (96, 64, torch.float32), (64, 64, torch.float32),
             (64, 64, torch.bfloat16), (64, 64, torch.float64), (96, 64, torch.float32)]
    for height, width, dtype in calls:
        expected, got = _call(plain, height, width, dtype), _call(cached, height, width, dtype)
        assert len(got) == len(expected) == 2
        for e, g in zip(expected, got):
            assert g.dtype == e.dtype and torch.equal(g, e)
    # float32 and bfloat16 features share float32 anchors: 3 sizes x types cached.
    assert len(cached._cached) == 3 and not plain._cached
    assert _call(cached, 64, 64)[0] is _call(cached, 64, 64)[0]


def test_anchor_cache_keeps_the_recently_used_sizes():
    generator = _generator(True)
    sizes = [(32 + 32 * i, 64) for i in range(tv_anchors.MAX_CACHED_SIZES + 2)]
    for height, width in sizes[:-2]:
        _call(generator, height, width)
    _call(generator, *sizes[0])  # used again: the second size is now the least recently used
    for height, width in sizes[-2:]:
        _call(generator, height, width)
    assert len(generator._cached) == tv_anchors.MAX_CACHED_SIZES
    kept = {key[0][0] for key in generator._cached}  # the finest level's (H, W)
    assert kept == {(-(-h // 8), -(-w // 8)) for h, w in [sizes[0]] + sizes[3:]}


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_anchor_cache_is_bypassed_while_tracing():
    generator = _generator(True)
    traced = torch.jit.trace(
        lambda x: _call(generator, x.shape[-2], x.shape[-1])[0], torch.zeros(1, 3, 64, 64), check_trace=False
    )
    assert not generator._cached
    assert torch.equal(traced(torch.zeros(1, 3, 64, 64)), _call(_generator(False), 64, 64)[0])


def test_training_with_the_anchor_cache_is_identical(datasets):
    """Three training steps from the same weights on the same batches: the same losses
    and the same weights, to the bit, with and without the cache."""
    cfg = setup_cfg(str(breakdown.MAIN_CONFIG), breakdown.QUICK_OPTS)
    batches = breakdown.load_batches(cfg, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for cache in (False, True):
            model, optimizer, scheduler = breakdown.fresh_training_state(cfg)
            model.anchor_generator.cache = cache
            losses = [run_step(cfg, model, optimizer, scheduler, images, targets, i)
                      for i, (images, targets) in enumerate(batches)]
            runs.append((losses, model.state_dict()))
    finally:
        torch.set_num_threads(threads)
    (plain_losses, plain_state), (cached_losses, cached_state) = runs
    assert cached_losses == plain_losses
    assert all(torch.equal(plain_state[k], cached_state[k]) for k in plain_state)


def test_compile_lever_runs_the_same_step(datasets):
    """The compile lever's plumbing (backbone and head compiled in place), with the "eager"
    backend: Dynamo captures the graphs and runs them as they are, so the step's losses
    are the default's. (The default backend, inductor, takes minutes to compile.)"""
    cfg = setup_cfg(str(breakdown.MAIN_CONFIG), breakdown.QUICK_OPTS)
    batches = breakdown.load_batches(cfg, 1)
    threads = torch.get_num_threads()
    try:
        default = levers.build_variant("default", cfg, 1)
        compiled = levers.build_variant("compile", cfg, 1, compile_backend="eager")
        for variant in (default, compiled):
            variant.block_seconds(batches, 1)
    finally:
        torch.set_num_threads(threads)
    assert compiled.first_losses == pytest.approx(default.first_losses, rel=1e-6)
    assert compiled.iteration == 1


@pytest.mark.parametrize("module", [breakdown, levers], ids=["breakdown", "levers"])
def test_a_gpu_config_is_refused_naming_the_key(module):
    with pytest.raises(ValueError, match="MODEL.DEVICE is 'cuda'.*MODEL.DEVICE cpu"):
        module.main(["--quick", "MODEL.DEVICE", "cuda"])
