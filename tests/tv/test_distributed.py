"""Multi-process training and evaluation (torchrun, gloo on this CPU) of the torchvision front-end.

Two real 2-process runs (``python -m torch.distributed.run --nproc_per_node 2``)
of a tiny config, compared with one process: the same weights (2 x 4 images vs
1 x 8), an exact resume, rank 0's files only, sharded evaluation equal to the
single-process one. FrozenBN and the torchvision (per-image) loss normalizer
make the two set-ups the same maths, up to the order of float sums.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from iou_aware_retinanet.tv import backbone as tv_backbone
from iou_aware_retinanet.tv.data import TrainingSampler, check_batch_divisible, resolve_dataset
from iou_aware_retinanet.tv.engine import load_model, train
from iou_aware_retinanet.tv.evaluation import evaluate
from iou_aware_retinanet.tv.model import build_model

from .engine_helpers import SHAPES_CONFIG, fresh_datasets_root, tiny_cfg, tiny_opts  # noqa: F401 (fixture)

GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
needs_gloo = pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is unavailable in this torch build")

MAX_ITER = 4
# Every option shared by the 1- and 2-process runs; IMS_PER_BATCH is the total batch.
RUN = {
    "SOLVER.IMS_PER_BATCH": "8",
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RETINANET.LOSS_NORMALIZER": "per_image",
    "SOLVER.CHECKPOINT_PERIOD": "2",
    "TEST.EVAL_PERIOD": "2",
}
# Max abs weight difference, 2 processes x 4 images vs 1 process x 8, after 4 SGD steps:
# measured 1.5e-8 (float32 rounding: DDP averages two half-batch gradients, one process
# sums one batch). 1e-6 leaves a wide margin and still catches any wrong image or scale.
WEIGHT_TOLERANCE = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(command, output_dir, *extra, nproc=2):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "iou_aware_retinanet", command, "--config-file", SHAPES_CONFIG, *extra,
        *tiny_opts(output_dir, MAX_ITER, **RUN),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def datasets_ready():
    # Generated once here, so the subprocesses only read them.
    cfg = tiny_cfg("unused")
    for name in ("shapes_mini_train", "shapes_mini_val"):
        resolve_dataset(cfg, name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, datasets_ready):
    out = tmp_path_factory.mktemp("one") / "run"
    torch.manual_seed(0)
    train(tiny_cfg(out, MAX_ITER, **RUN))
    return str(out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, datasets_ready):
    out = tmp_path_factory.mktemp("two") / "run"
    proc = _torchrun("train", str(out))
    return str(out), proc.stdout + proc.stderr


# --------------------------------------------------------------------------- in-process units


def test_sampler_shards_are_the_single_process_batches():
    for start_iter in (0, 3):
        whole = iter(TrainingSampler(10, 4, seed=5, start_iter=start_iter))
        shards = [iter(TrainingSampler(10, 4, seed=5, start_iter=start_iter, rank=r, world_size=2)) for r in (0, 1)]
        for _ in range(7):  # crosses epochs (10 images, 4 per iteration)
            assert next(shards[0]) + next(shards[1]) == next(whole)


def test_total_batch_must_divide_by_processes():
    cfg = tiny_cfg("unused", **{"SOLVER.IMS_PER_BATCH": 6})
    check_batch_divisible(cfg, 2)
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH=6"):
        check_batch_divisible(cfg, 4)
    with pytest.raises(ValueError, match="divisible"):
        TrainingSampler(10, 6, seed=0, rank=0, world_size=4)


def test_syncbn_is_batchnorm_in_one_process_and_needs_gpus_with_several(monkeypatch):
    cfg = tiny_cfg("unused", **{"MODEL.RESNETS.NORM": "SyncBN"})
    model = build_model(cfg)
    norms = [m for m in model.backbone.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)  # as Detectron2 in one process
    monkeypatch.setattr(tv_backbone, "get_world_size", lambda: 2)
    assert tv_backbone.get_norm("SyncBN", "MODEL.RESNETS.NORM") is nn.SyncBatchNorm
    with pytest.raises(ValueError, match="MODEL.RESNETS.NORM='SyncBN'.*needs GPUs"):
        build_model(cfg)  # MODEL.DEVICE cpu: torch's DDP refuses SyncBatchNorm on CPU


# --------------------------------------------------------------------------- torchrun runs


@needs_gloo
def test_two_processes_train_the_single_process_weights(one_process, two_processes):
    two, _ = two_processes
    a, b = _weights(os.path.join(one_process, "model_final.pth")), _weights(os.path.join(two, "model_final.pth"))
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())
    assert diff < WEIGHT_TOLERANCE, diff
    # Logged losses: the mean over the ranks, i.e. the single-process batch's loss.
    (loss1,) = [r for r in _metrics(one_process) if "total_loss" in r]
    (loss2,) = [r for r in _metrics(two) if "total_loss" in r]
    for key in ("total_loss", "loss_cls", "loss_box_reg", "loss_iou"):
        assert loss2[key] == pytest.approx(loss1[key], rel=1e-5), key


@needs_gloo
def test_only_rank0_writes(one_process, two_processes):
    two, output = two_processes
    assert sorted(f for f in os.listdir(two) if not f.startswith("events.")) == sorted(
        f for f in os.listdir(one_process) if not f.startswith("events.")
    )
    # metrics.json: the same records (iterations, keys) as one process, none twice.
    assert [(r["iteration"], sorted(r)) for r in _metrics(two)] == [(r["iteration"], sorted(r)) for r in _metrics(one_process)]
    # TensorBoard events from one process only (the pid is in the file name).
    pids = {f.split(".")[-2] for f in os.listdir(two) if f.startswith("events.")}
    assert len(pids) == 1, os.listdir(two)
    with open(os.path.join(two, "log.txt")) as f:
        log = f.read()
    assert log.count("Saved checkpoint") == 2 and log.count("Evaluation results for bbox") == 2
    # The console of both ranks: rank 1 printed no INFO line.
    assert output.count("Evaluation results for bbox") == 2 and "rank 1 of 2" not in output


@needs_gloo
def test_two_process_resume_is_exact(tmp_path, two_processes):
    two, _ = two_processes
    killed = str(tmp_path / "killed")
    shutil.copytree(two, killed)
    # As if killed after the checkpoint of iteration 1: no final weights, last_checkpoint back.
    os.remove(os.path.join(killed, "model_final.pth"))
    with open(os.path.join(killed, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    _torchrun("train", killed, "--resume")
    a, b = _weights(os.path.join(two, "model_final.pth")), _weights(os.path.join(killed, "model_final.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["iteration"] for r in _metrics(killed)] == [r["iteration"] for r in _metrics(two)]


@needs_gloo
def test_distributed_evaluation_equals_single_process(tmp_path, two_processes):
    two, _ = two_processes
    cfg = tiny_cfg(str(tmp_path / "single"), MAX_ITER, **RUN)
    single = evaluate(cfg, load_model(cfg, os.path.join(two, "model_final.pth")), "shapes_mini_val")
    # The final evaluation of the 2-process training run (sharded, gathered on rank 0) ...
    final = _metrics(two)[-1]
    for key, value in single.metrics.items():
        assert final[f"bbox/{key}"] == pytest.approx(value, nan_ok=True, abs=0), key
    with open(os.path.join(two, "inference", "shapes_mini_val", "coco_instances_results.json")) as f:
        assert json.load(f) == single.detections
    # ... and the eval command under torchrun.
    evaluated = str(tmp_path / "eval")
    _torchrun("eval", evaluated, "--weights", os.path.join(two, "model_final.pth"))
    with open(os.path.join(evaluated, "inference", "shapes_mini_val", "coco_instances_results.json")) as f:
        assert json.load(f) == single.detections
    with open(os.path.join(evaluated, "inference", "shapes_mini_val", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics.keys() == single.metrics.keys()
    assert all(metrics[k] == single.metrics[k] or (metrics[k] != metrics[k] and single.metrics[k] != single.metrics[k]) for k in metrics)


def _non_finite_worker(rank, world, folder):
    import torch.distributed as dist

    from iou_aware_retinanet.tv.engine import NonFiniteLossError, _check_finite

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        loss = torch.tensor(float("nan") if rank == 1 else 1.0)  # only rank 1's loss is bad
        try:
            _check_finite({"loss_cls": loss}, loss, iteration=5)
            message = "no error"
        except NonFiniteLossError as e:
            message = str(e)
        with open(f"{folder}/rank{rank}.txt", "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    import torch.multiprocessing as mp

    # fork: the children inherit the imported modules (a spawn re-imports them, ~15 s here).
    mp.start_processes(_non_finite_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert "another process" in results[0] and "iteration 5" in results[0]
    assert "loss_cls=nan" in results[1]
