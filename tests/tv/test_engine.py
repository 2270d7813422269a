"""The torchvision front-end's training / evaluation engine: a tiny end-to-end run,
exact resume, NaN stop, LR schedule, parameter groups, data order and flips, bad input."""
import json
import logging
import math
import os
import re

import pytest
import torch

from iou_aware_retinanet.tv import data as tv_data
from iou_aware_retinanet.tv import engine
from iou_aware_retinanet.tv.checkpoint import last_checkpoint, load_checkpoint
from iou_aware_retinanet.tv.data import (
    SeededHorizontalFlip,
    TrainingSampler,
    UnknownDatasetError,
    build_flip,
    build_train_loader,
    load_train_records,
    resolve_dataset,
)
from iou_aware_retinanet.tv.evaluation import BBOX_METRICS, coco_evaluate, evaluate
from iou_aware_retinanet.tv.model import IoUAwareRetinaNet

from .engine_helpers import fresh_datasets_root, tiny_cfg, write_coco  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 iterations in one go, checkpoints and evaluation every 3, evaluated on shapes_mini_val at the end."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("straight"), **{"TEST.EVAL_PERIOD": 3})
    results = engine.train(cfg)
    return cfg, results


def _state(path):
    return load_checkpoint(path)


# --------------------------------------------------------------------------- end to end


def test_training_run_writes_everything(straight_run):
    cfg, results = straight_run
    out = cfg.OUTPUT_DIR
    for name in ("config.yaml", "log.txt", "metrics.json", "model_0000002.pth", "model_final.pth", "last_checkpoint"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"

    checkpoint = load_checkpoint(os.path.join(out, "model_final.pth"))  # weights_only=True
    assert checkpoint["iteration"] == 5 and checkpoint["seed"] == 7
    assert {"model", "optimizer", "scheduler"} <= set(checkpoint)
    assert load_checkpoint(os.path.join(out, "model_0000002.pth"))["iteration"] == 2

    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    assert [(line["iteration"], "bbox/AP" in line) for line in lines] == [(2, True), (5, False), (5, True)]
    assert {"total_loss", "loss_cls", "loss_box_reg", "loss_iou", "lr", "time", "data_time"} <= set(lines[1])
    assert "iter: 5" in open(os.path.join(out, "log.txt")).read()

    inference = os.path.join(out, "inference", "shapes_mini_val")
    metrics = json.load(open(os.path.join(inference, "metrics.json")))
    assert set(BBOX_METRICS) <= set(metrics)
    assert metrics == pytest.approx(results["shapes_mini_val"]["bbox"], nan_ok=True)
    detections = json.load(open(os.path.join(inference, "coco_instances_results.json")))
    assert detections, "an untrained model still scores some anchors above 0.05"
    assert {"image_id", "category_id", "bbox", "score", "cls_score", "pred_iou"} <= set(detections[0])
    assert all(d["category_id"] in (1, 2, 3, 4) and len(d["bbox"]) == 4 for d in detections)


def test_evaluate_api_returns_metrics_and_detections(straight_run, tmp_path):
    cfg, _ = straight_run
    model = engine.load_model(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    result = evaluate(cfg, model, "shapes_mini_val", output_dir=str(tmp_path))
    saved = json.load(open(os.path.join(cfg.OUTPUT_DIR, "inference", "shapes_mini_val", "coco_instances_results.json")))
    assert result.detections == saved  # deterministic inference, same weights
    assert set(BBOX_METRICS) <= set(result.metrics)
    assert os.path.isfile(tmp_path / "metrics.json")
    assert not model.training


def test_no_detections_gives_zero_ap_and_a_warning(straight_run, tmp_path, caplog):
    cfg, _ = straight_run
    cfg.defrost()
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 1.0  # nothing passes
    model = engine.load_model(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    with caplog.at_level(logging.WARNING):
        result = evaluate(cfg, model, "shapes_mini_val", output_dir=str(tmp_path))
    assert result.detections == []
    assert all(result.metrics[k] == 0.0 for k in BBOX_METRICS)
    assert "No detections" in caplog.text


# --------------------------------------------------------------------------- resume and NaN


def test_kill_and_resume_gives_identical_weights(straight_run, tmp_path, monkeypatch):
    cfg_straight, _ = straight_run
    # Workers while killed, none after: the data must not depend on them either.
    cfg = tiny_cfg(tmp_path, **{"DATASETS.TEST": "()", "DATALOADER.NUM_WORKERS": 1})
    real_step = engine.run_step

    def killed_at_4(cfg_, model, optimizer, scheduler, images, targets, iteration, *args):
        if iteration == 4:
            raise KeyboardInterrupt
        return real_step(cfg_, model, optimizer, scheduler, images, targets, iteration, *args)

    monkeypatch.setattr(engine, "run_step", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg)
    assert last_checkpoint(cfg.OUTPUT_DIR).endswith("model_0000002.pth")
    monkeypatch.setattr(engine, "run_step", real_step)
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 0
    engine.train(cfg, resume=True)

    straight = _state(os.path.join(cfg_straight.OUTPUT_DIR, "model_final.pth"))
    resumed = _state(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for index, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][index]["momentum_buffer"])
    assert straight["scheduler"] == resumed["scheduler"]
    iterations = [json.loads(line)["iteration"] for line in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    assert iterations == sorted(set(iterations))


def test_resume_without_checkpoint_starts_fresh_and_after_the_end_only_evaluates(tmp_path):
    cfg = tiny_cfg(tmp_path, max_iter=2, **{"DATASETS.TEST": "()"})
    engine.train(cfg, resume=True)  # nothing to resume: from scratch
    assert load_checkpoint(os.path.join(tmp_path, "model_final.pth"))["iteration"] == 1
    before = os.path.getmtime(os.path.join(tmp_path, "model_final.pth"))
    engine.train(cfg, resume=True)  # finished: no more training
    assert os.path.getmtime(os.path.join(tmp_path, "model_final.pth")) == before


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, **{"DATASETS.TEST": "()"})
    real_loss = IoUAwareRetinaNet.compute_loss_and_metrics
    calls = []

    def nan_at_iteration_4(self, *args, **kwargs):
        losses, metrics = real_loss(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:  # iteration 4
            losses["loss_box_reg"] = losses["loss_box_reg"] * float("nan")
        return losses, metrics

    monkeypatch.setattr(IoUAwareRetinaNet, "compute_loss_and_metrics", nan_at_iteration_4)
    with pytest.raises(engine.NonFiniteLossError, match=r"iteration 4") as info:
        engine.train(cfg)
    assert isinstance(info.value, FloatingPointError)
    assert "loss_box_reg=nan" in str(info.value) and "loss_cls=" in str(info.value)
    path = last_checkpoint(cfg.OUTPUT_DIR)
    assert path.endswith("model_0000002.pth")
    assert not os.path.exists(os.path.join(tmp_path, "model_final.pth"))
    checkpoint = load_checkpoint(path)
    assert checkpoint["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


# --------------------------------------------------------------------------- solver


def _solver_cfg(tmp_path, **solver):
    cfg = tiny_cfg(tmp_path)
    cfg.defrost()
    for key, value in solver.items():
        cfg.SOLVER[key] = value
    return cfg


def _lrs(cfg, bias_lr_factor=1.0):
    """The learning rate of every iteration, as the engine's scheduler sets it (largest group first)."""
    cfg.SOLVER.BIAS_LR_FACTOR = bias_lr_factor
    optimizer = engine.build_optimizer(cfg, torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)))
    scheduler = engine.build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(cfg.SOLVER.MAX_ITER):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def _detectron2_formula(cfg, i):
    """Detectron2's WarmupParamScheduler over MultiStep / Cosine, written out by hand."""
    s = cfg.SOLVER
    where, length = i / s.MAX_ITER, min(s.WARMUP_ITERS / s.MAX_ITER, 1.0)

    def schedule(w):
        if s.LR_SCHEDULER_NAME == "WarmupCosineLR":
            end = s.BASE_LR_END / s.BASE_LR
            return end + 0.5 * (1 - end) * (1 + math.cos(math.pi * w))
        return s.GAMMA ** sum(step <= round(w * s.MAX_ITER) for step in s.STEPS if step <= s.MAX_ITER)

    if where + 1e-6 > length:
        return schedule(where)
    start = s.WARMUP_FACTOR * schedule(0.0)
    if s.WARMUP_METHOD == "constant":
        return start
    alpha = where / length
    return schedule(length) * alpha + start * (1 - alpha)


SHAPES_SCHEDULES = {
    "shapes-multistep": [],  # configs/Shapes: 300 warmup iterations, x0.1 at 3150 and 4050 of 4500
    "shapes-cosine": ["SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR", "SOLVER.BASE_LR_END", "0.0004"],
    "shapes-30-iterations": ["SOLVER.MAX_ITER", "30"],  # the warmup capped at MAX_ITER, steps ignored
}


@pytest.mark.parametrize("opts", SHAPES_SCHEDULES.values(), ids=SHAPES_SCHEDULES.keys())
def test_every_lr_of_the_shapes_schedules_is_detectron2s(opts):
    from iou_aware_retinanet.tv.cli import setup_cfg

    from .engine_helpers import SHAPES_CONFIG

    cfg = setup_cfg(SHAPES_CONFIG, opts).clone()
    cfg.defrost()
    lrs = [group[0] for group in _lrs(cfg)]
    base = cfg.SOLVER.BASE_LR
    for i, lr in enumerate(lrs):
        assert lr == pytest.approx(base * _detectron2_formula(cfg, i), rel=1e-12, abs=0), i
    if not opts:  # the main job's schedule, by hand
        assert len(lrs) == 4500 and base == 0.04
        assert lrs[0] == base * cfg.SOLVER.WARMUP_FACTOR and lrs[300] == lrs[3149] == base
        assert lrs[3150] == lrs[4049] == pytest.approx(base * 0.1) and lrs[4050] == lrs[4499] == pytest.approx(base * 0.01)

    # Bit for bit: Detectron2's own build_lr_scheduler on the same SOLVER keys.
    d2_config = pytest.importorskip("detectron2.config")
    from detectron2.solver import build_lr_scheduler

    d2_cfg = d2_config.get_cfg()
    for key in ("LR_SCHEDULER_NAME", "MAX_ITER", "BASE_LR", "BASE_LR_END", "GAMMA", "STEPS", "WARMUP_FACTOR",
                "WARMUP_ITERS", "WARMUP_METHOD"):  # fmt: skip
        d2_cfg.SOLVER[key] = cfg.SOLVER[key]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = build_lr_scheduler(d2_cfg, optimizer)
    for i, lr in enumerate(lrs):
        assert lr == optimizer.param_groups[0]["lr"], i
        optimizer.step()
        scheduler.step()


def test_warmup_multistep_lr_values(tmp_path):
    cfg = _solver_cfg(
        tmp_path, BASE_LR=0.1, WARMUP_ITERS=10, WARMUP_FACTOR=0.001, STEPS=(20, 30), GAMMA=0.1, MAX_ITER=40
    )
    # Hand-computed: linear warmup 0.001 -> 1 over 10 iterations, then x0.1 at 20 and at 30.
    expected = {0: 1e-4, 5: 0.1 * (0.001 * 0.5 + 0.5), 9: 0.1 * (0.001 * 0.1 + 0.9), 10: 0.1,
                19: 0.1, 20: 0.01, 29: 0.01, 30: 0.001, 39: 0.001}  # fmt: skip
    # The scheduler applies it to every group (bias groups scaled by BIAS_LR_FACTOR).
    lrs = _lrs(cfg, bias_lr_factor=2.0)
    for iteration, lr in expected.items():
        assert lrs[iteration] == pytest.approx([lr, 2 * lr], rel=1e-12), iteration
    multiplier = engine.lr_multiplier(cfg)
    assert [multiplier(i / 40) * 0.1 for i in range(40)] == [weight for weight, _ in lrs]


def test_warmup_variants_and_cosine(tmp_path):
    # A step inside the warmup: the warmup ends at the stepped value (Detectron2's WarmupParamScheduler).
    cfg = _solver_cfg(tmp_path, WARMUP_ITERS=10, WARMUP_FACTOR=0.5, STEPS=(4,), GAMMA=0.1, MAX_ITER=20, BASE_LR=1.0)
    lrs = [g[0] for g in _lrs(cfg)]
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[5] == pytest.approx(0.5 * 0.5 + 0.1 * 0.5)
    assert lrs[10] == pytest.approx(0.1)
    cfg.SOLVER.WARMUP_METHOD = "constant"
    lrs = [g[0] for g in _lrs(cfg)]
    assert lrs[9] == pytest.approx(0.5) and lrs[10] == pytest.approx(0.1)
    # Cosine from 1 to BASE_LR_END / BASE_LR.
    cfg = _solver_cfg(tmp_path, LR_SCHEDULER_NAME="WarmupCosineLR", WARMUP_ITERS=0, BASE_LR=0.1,
                      BASE_LR_END=0.01, MAX_ITER=100)  # fmt: skip
    lrs = [g[0] for g in _lrs(cfg)]
    assert lrs[0] == pytest.approx(0.1) and lrs[50] == pytest.approx(0.1 * (0.1 + 0.5 * 0.9))
    assert engine.lr_multiplier(cfg)(1.0) == pytest.approx(0.1)
    # Steps beyond MAX_ITER are ignored.
    cfg = _solver_cfg(tmp_path, WARMUP_ITERS=0, STEPS=(5, 500), MAX_ITER=10, BASE_LR=1.0)
    assert [g[0] for g in _lrs(cfg)][9] == pytest.approx(0.1)
    # As before fvcore: a step at 0 applies from the start, a repeated step twice, one at MAX_ITER nowhere.
    cfg = _solver_cfg(tmp_path, WARMUP_ITERS=0, STEPS=(0, 4, 4, 10), MAX_ITER=10, BASE_LR=1.0)
    assert [g[0] for g in _lrs(cfg)] == pytest.approx([0.1] * 4 + [0.001] * 6)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("LR_SCHEDULER_NAME", "WarmupStepWithFixedGammaLR", "SOLVER.LR_SCHEDULER_NAME='WarmupStepWithFixedGammaLR'"),
        ("WARMUP_METHOD", "exp", "SOLVER.WARMUP_METHOD='exp'"),
        ("MAX_ITER", 0, "SOLVER.MAX_ITER must be >= 1"),
        ("CHECKPOINT_PERIOD", 0, "SOLVER.CHECKPOINT_PERIOD must be >= 1"),
        ("BASE_LR", 0.0, "SOLVER.BASE_LR must be positive"),
        ("STEPS", (5, 3), "SOLVER.STEPS must be increasing"),
    ],
)
def test_unsupported_solver_values_name_the_key(tmp_path, key, value, message):
    cfg = _solver_cfg(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.train(cfg)
    assert not os.path.exists(os.path.join(tmp_path, "config.yaml"))  # failed before anything was written
    if key in ("LR_SCHEDULER_NAME", "WARMUP_METHOD"):  # the scheduler's builder names the key too
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.lr_multiplier(cfg)


def test_scheduler_state_resumes_the_position(tmp_path):
    cfg = _solver_cfg(tmp_path, BASE_LR=0.1, WARMUP_ITERS=10, STEPS=(20,), MAX_ITER=40)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))
    optimizer = engine.build_optimizer(cfg, model)
    scheduler = engine.build_lr_scheduler(cfg, optimizer)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    # The keys checkpoints hold: torch's scheduler state, position only.
    assert set(state) == {"last_epoch", "base_lrs", "_step_count", "_last_lr"} and state["last_epoch"] == 15
    fresh_optimizer = engine.build_optimizer(cfg, model)
    resumed = engine.build_lr_scheduler(cfg, fresh_optimizer)
    resumed.load_state_dict(state)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        fresh_optimizer.step()
        resumed.step()
        assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert resumed.state_dict() == scheduler.state_dict()
    with pytest.raises(ValueError, match="scheduler state has no last_epoch"):
        resumed.load_state_dict({"base_lrs": [0.1]})


def test_param_groups_follow_detectron2(tmp_path):
    cfg = _solver_cfg(tmp_path, BASE_LR=0.1, WEIGHT_DECAY=1e-4, WEIGHT_DECAY_NORM=0.0, BIAS_LR_FACTOR=2.0)
    model = engine.build_model(cfg)
    model.backbone.body.conv1.weight.requires_grad_(False)  # frozen: left out
    optimizer = engine.build_optimizer(cfg, model)
    hyper = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(hyper) == sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    assert id(model.backbone.body.conv1.weight) not in hyper
    assert len(optimizer.param_groups) == len({(g["lr"], g["weight_decay"]) for g in optimizer.param_groups})

    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = modules[name.rsplit(".", 1)[0]]
        is_norm = isinstance(module, engine.NORM_MODULE_TYPES)
        is_bias = name.endswith(".bias")
        expected = (0.2 if is_bias else 0.1, 0.0 if is_norm else 1e-4)
        assert hyper[id(param)] == pytest.approx(expected), name
    # Both kinds exist in this model (BN backbone, GN head).
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in modules.values())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in modules.values())

    cfg.SOLVER.WEIGHT_DECAY_BIAS = 5e-4  # wins over WEIGHT_DECAY_NORM for norm biases, as in Detectron2
    optimizer = engine.build_optimizer(cfg, model)
    hyper = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    gn = next(m for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert hyper[id(gn.bias)] == 5e-4 and hyper[id(gn.weight)] == 0.0


def test_gradient_clipping_is_per_parameter(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.defrost()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((4,), 10.0), torch.full((4,), 0.1)
    optimizer = torch.optim.SGD([a, b], lr=0.1)
    engine.clip_gradients(cfg, optimizer)
    assert a.grad.norm() == pytest.approx(1.0) and torch.allclose(b.grad, torch.full((4,), 0.1))
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    engine.clip_gradients(cfg, optimizer)
    assert a.grad.abs().max() <= 1.0


# --------------------------------------------------------------------------- data order and flips


def _stream(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_order_is_a_function_of_seed_and_iteration():
    a = _stream(TrainingSampler(10, 3, seed=1), 8)
    assert a == _stream(TrainingSampler(10, 3, seed=1), 8)
    assert a != _stream(TrainingSampler(10, 3, seed=2), 8)
    assert _stream(TrainingSampler(10, 3, seed=1, start_iter=5), 3) == a[5:8]
    positions = [key for batch in a for key in batch]
    for epoch in (0, 1):
        indices = [i for e, i in positions if e == epoch]
        assert sorted(indices) == list(range(10))  # each epoch is a permutation
    assert [i for e, i in positions if e == 0] != [i for e, i in positions if e == 1]


def test_train_loader_batches_are_reproducible(tmp_path):
    cfg = tiny_cfg(tmp_path)
    records, names = load_train_records(cfg)
    assert names == ["rectangle", "ellipse", "triangle", "cross"]

    def batches(seed, start_iter=0, n=3):
        loader = iter(build_train_loader(cfg, seed, start_iter, records))
        return [next(loader) for _ in range(n)]

    first, again, other = batches(0), batches(0), batches(1)
    for (imgs_a, tgts_a), (imgs_b, tgts_b) in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(imgs_a, imgs_b))
        assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(tgts_a, tgts_b))
    ids = lambda bs: [t["image_id"] for _, tgts in bs for t in tgts]  # noqa: E731
    assert ids(first) != ids(other)
    assert ids(batches(0, start_iter=2, n=1)) == ids(first)[4:6]


def test_cached_images_give_the_same_batches(tmp_path):
    records, _ = load_train_records(tiny_cfg(tmp_path))

    def batches(**overrides):
        loader = iter(build_train_loader(tiny_cfg(tmp_path, **overrides), 0, 0, records))
        return [next(loader) for _ in range(4)]

    from_files = batches(**{"DATALOADER.CACHE_IMAGES": False})
    for workers in (0, 1):
        cached = batches(**{"DATALOADER.CACHE_IMAGES": True, "DATALOADER.NUM_WORKERS": workers})
        for (imgs_a, tgts_a), (imgs_b, tgts_b) in zip(from_files, cached):
            assert all(torch.equal(x, y) for x, y in zip(imgs_a, imgs_b))
            assert [t["image_id"] for t in tgts_a] == [t["image_id"] for t in tgts_b]
            assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(tgts_a, tgts_b))


def test_cache_larger_than_half_the_memory_is_refused(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, **{"DATALOADER.CACHE_IMAGES": True})
    records, _ = load_train_records(cfg)
    size = sum(3 * r.height * r.width for r in records)
    monkeypatch.setattr(tv_data, "_physical_memory_bytes", lambda: 2 * size - 2)
    with pytest.raises(ValueError, match="DATALOADER.CACHE_IMAGES: the .* training images take"):
        build_train_loader(cfg, 0, 0, records)
    monkeypatch.setattr(tv_data, "_physical_memory_bytes", lambda: 2 * size)
    assert len(tv_data.decode_train_images(cfg, records)) == len(records)
    off = tiny_cfg(tmp_path, **{"DATALOADER.CACHE_IMAGES": False})
    assert tv_data.decode_train_images(off, records) is None  # the key off: nothing decoded


def test_seeded_flip_is_deterministic_and_correct():
    flip = SeededHorizontalFlip(seed=3)
    decisions = [flip.flips(0, i) for i in range(400)]
    assert decisions == [SeededHorizontalFlip(seed=3).flips(0, i) for i in range(400)]
    assert decisions != [SeededHorizontalFlip(seed=4).flips(0, i) for i in range(400)]
    assert decisions != [flip.flips(1, i) for i in range(400)]  # epochs differ
    assert 150 < sum(decisions) < 250

    image = torch.zeros(3, 10, 20)
    image[:, 2:5, 1:4] = 1.0  # a bright box at x 1..4, y 2..5
    target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "labels": torch.tensor([0]), "image_id": 1}
    index = decisions.index(True)
    flipped, flipped_target = flip(image, target, 0, index)
    assert torch.equal(flipped, image.flip(-1))
    assert flipped_target["boxes"].tolist() == [[16.0, 2.0, 19.0, 5.0]]  # x -> 20 - x
    assert flipped[:, 2:5, 16:19].eq(1.0).all() and flipped.sum() == image.sum()
    assert target["boxes"].tolist() == [[1.0, 2.0, 4.0, 5.0]]  # input untouched
    same, same_target = flip(image, target, 0, decisions.index(False))
    assert same is image and same_target is target


def test_random_flip_values(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.defrost()
    assert isinstance(build_flip(cfg, 0), SeededHorizontalFlip)
    cfg.INPUT.RANDOM_FLIP = "none"
    assert build_flip(cfg, 0) is None
    cfg.INPUT.RANDOM_FLIP = "vertical"
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP='vertical'"):
        build_flip(cfg, 0)
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP"):
        engine.train(cfg)


# --------------------------------------------------------------------------- bad input


def _own_dataset_cfg(tmp_path, json_file, image_root, **overrides):
    opts = {
        "DATASETS.COCO_INSTANCES": f"[['mine', '{json_file}', '{image_root}']]",
        "DATASETS.TRAIN": "('mine',)",
        "DATASETS.TEST": "()",
        "MODEL.RETINANET.NUM_CLASSES": 2,
        "SOLVER.MAX_ITER": 2,
    }
    opts.update(overrides)
    return tiny_cfg(tmp_path / "out", **opts)


def test_unknown_dataset_name(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"DATASETS.TRAIN": "('no_such_set',)"})
    with pytest.raises(UnknownDatasetError, match=r"DATASETS.TRAIN: unknown dataset 'no_such_set'.*shapes_train"):
        engine.train(cfg)
    cfg = tiny_cfg(tmp_path, **{"DATASETS.TEST": "('no_such_val',)"})
    with pytest.raises(UnknownDatasetError, match="DATASETS.TEST: unknown dataset 'no_such_val'"):
        engine.train(cfg)
    assert not os.path.exists(os.path.join(tmp_path, "model_final.pth"))  # failed before training


def test_coco_instances_resolve_first_and_are_checked(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    cfg = _own_dataset_cfg(tmp_path, json_file, image_root)
    assert resolve_dataset(cfg, "mine") == (json_file, image_root)
    cfg.defrost()
    cfg.DATASETS.COCO_INSTANCES = [["shapes_val", json_file, image_root]]  # shadows the built-in name
    assert resolve_dataset(cfg, "shapes_val") == (json_file, image_root)
    cfg.DATASETS.COCO_INSTANCES = [["mine", json_file]]
    with pytest.raises(ValueError, match=r"DATASETS.COCO_INSTANCES entries are \[name, json_file, image_root\]"):
        resolve_dataset(cfg, "mine")


def test_missing_image_and_malformed_json_name_the_file(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    os.remove(os.path.join(image_root, "img2.png"))
    with pytest.raises(FileNotFoundError, match="img2.png"):
        engine.train(_own_dataset_cfg(tmp_path, json_file, image_root))
    with open(json_file, "w") as f:
        f.write('{"images": [')
    with pytest.raises(ValueError, match=f"{json_file} is not valid JSON"):
        engine.train(_own_dataset_cfg(tmp_path, json_file, image_root))


def test_unreadable_image_named_through_the_worker(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    bad = os.path.join(image_root, "img1.png")
    with open(bad, "rb") as f:
        header = f.read(100)
    with open(bad, "wb") as f:
        f.write(header)  # the header survives (checked before training), the pixels are cut
    cfg = _own_dataset_cfg(
        tmp_path, json_file, image_root,
        **{"DATALOADER.NUM_WORKERS": 1, "DATALOADER.CACHE_IMAGES": False, "SOLVER.IMS_PER_BATCH": 4},
    )  # fmt: skip
    with pytest.raises(OSError, match="could not read or decode image file .*img1.png") as info:
        engine.train(cfg)
    assert "iteration 0" in "".join(getattr(info.value, "__notes__", []))


def test_unreadable_image_named_before_training_with_the_cache(tmp_path, monkeypatch):
    json_file, image_root = write_coco(str(tmp_path))
    with open(os.path.join(image_root, "img2.png"), "wb") as f:
        f.write(b"not a png")
    steps = []
    monkeypatch.setattr(engine, "run_step", lambda *args, **kwargs: steps.append(1))
    cfg = _own_dataset_cfg(tmp_path, json_file, image_root, **{"DATALOADER.CACHE_IMAGES": True})
    with pytest.raises(OSError, match="could not read or decode image file .*img2.png"):
        engine.train(cfg)
    assert steps == []  # no iteration ran


def test_images_without_annotations_train(tmp_path):
    json_file, image_root = write_coco(str(tmp_path), with_annotations=False)
    cfg = _own_dataset_cfg(tmp_path, json_file, image_root, **{"DATALOADER.FILTER_EMPTY_ANNOTATIONS": False})
    engine.train(cfg)
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    cfg = _own_dataset_cfg(tmp_path, json_file, image_root, OUTPUT_DIR=str(tmp_path / "filtered"))  # nothing left
    with pytest.raises(ValueError, match="no training images left"):
        engine.train(cfg)


def test_more_categories_than_num_classes(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    cfg = _own_dataset_cfg(tmp_path, json_file, image_root, **{"MODEL.RETINANET.NUM_CLASSES": 1})
    with pytest.raises(ValueError, match="2 categories but MODEL.RETINANET.NUM_CLASSES is 1"):
        engine.train(cfg)


def test_coco_evaluate_empty_results_directly(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    from iou_aware_retinanet.data.coco import load_coco_detection

    metrics = coco_evaluate(load_coco_detection(json_file, image_root).coco, [])
    assert {k: metrics[k] for k in BBOX_METRICS} == dict.fromkeys(BBOX_METRICS, 0.0)


def test_tensorboard_events_hold_what_metrics_json_holds(straight_run):
    """Every metrics.json record is also written as TensorBoard scalars (losses, lr, AP), as
    Detectron2's TensorboardXWriter writes its storage."""
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="the tensorboard extra is not installed"
    )
    cfg, _ = straight_run
    events = event_accumulator.EventAccumulator(cfg.OUTPUT_DIR)
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    lines = [json.loads(line) for line in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    assert {"loss_cls", "loss_iou", "lr", "bbox/AP", "bbox/AP75"} <= set(scalars)
    for line in lines:
        for key, value in line.items():
            if key != "iteration" and isinstance(value, float) and math.isfinite(value):
                assert scalars[key][line["iteration"]] == pytest.approx(value, rel=1e-6), key
