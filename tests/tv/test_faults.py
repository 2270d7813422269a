"""Bad input and faults on the torchvision front-end: each case fails clearly, before damage."""
import os
import shutil

import pytest
import torch

from iou_aware_retinanet.atomic import atomic_write
from iou_aware_retinanet.tv import engine
from iou_aware_retinanet.tv.checkpoint import Checkpointer, last_checkpoint, load_checkpoint, save_checkpoint
from iou_aware_retinanet.tv.cli import main, setup_cfg
from iou_aware_retinanet.tv.evaluation import safe_folder_name
from iou_aware_retinanet.tv.model import build_model

from .engine_helpers import SHAPES_CONFIG, fresh_datasets_root, tiny_cfg, tiny_opts  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """6 iterations, checkpoints at iterations 2 and 5 (final)."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("finished"), **{"DATASETS.TEST": "()"})
    engine.train(cfg)
    return cfg


# ------------------------------------------------------------------ weights that blew up


def test_exploded_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """Weights blown up to 1e30 (finite) after iteration 2: BatchNorm still gives a finite loss,
    but its running variance overflows; the checkpoint due after iteration 3 is refused (a
    non-finite loss or weight, whichever shows first), and the error names the last good one."""
    cfg = tiny_cfg(tmp_path, **{"DATASETS.TEST": "()", "SOLVER.CHECKPOINT_PERIOD": 2})
    real_step = engine.run_step

    def explode_after_2(cfg_, model, optimizer, scheduler, images, targets, iteration, *args):
        values = real_step(cfg_, model, optimizer, scheduler, images, targets, iteration, *args)
        if iteration == 2:
            with torch.no_grad():
                next(model.parameters()).mul_(1e30)
        return values

    monkeypatch.setattr(engine, "run_step", explode_after_2)
    with pytest.raises(FloatingPointError, match=r"iteration [34]") as info:
        engine.train(cfg)
    assert isinstance(info.value, (engine.NonFiniteLossError, engine.NonFiniteWeightsError))
    assert "model_0000001.pth" in str(info.value) and "--resume" in str(info.value)
    assert last_checkpoint(cfg.OUTPUT_DIR).endswith("model_0000001.pth")
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_0000003.pth"))
    weights = load_checkpoint(last_checkpoint(cfg.OUTPUT_DIR))["model"]
    assert max(float(v.abs().max()) for v in weights.values() if v.is_floating_point()) < 1e6


def test_checkpointer_refuses_nan_weights_and_names_the_last_good_one(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = build_model(cfg)
    optimizer = engine.build_optimizer(cfg, model)
    checkpointer = Checkpointer(model, str(tmp_path), optimizer=optimizer, scheduler=engine.build_lr_scheduler(cfg, optimizer))
    good = checkpointer.save("model_0000000", iteration=0, seed=7)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(engine.NonFiniteWeightsError, match="by iteration 1 .*model_0000001.pth not written") as info:
        checkpointer.save("model_0000001", iteration=1, seed=7)
    assert good in str(info.value)
    assert last_checkpoint(str(tmp_path)) == good and not os.path.exists(tmp_path / "model_0000001.pth")
    assert engine.non_finite_tensors(model) == [next(n for n, _ in model.named_parameters())]


# ------------------------------------------------------------------ checkpoints on disk


def test_truncated_checkpoint_is_named_and_resume_falls_back(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run.OUTPUT_DIR, run)
    final = run / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(RuntimeError, match="model_final.pth.*truncated"):
        load_checkpoint(str(final))
    cfg = finished_run.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(run)
    engine.train(cfg, resume=True)  # from model_0000002: iterations 3..5 again
    assert load_checkpoint(str(final))["iteration"] == 5
    straight = load_checkpoint(os.path.join(finished_run.OUTPUT_DIR, "model_final.pth"))["model"]
    resumed = load_checkpoint(str(final))["model"]
    assert all(torch.equal(v, resumed[k]) for k, v in straight.items())


def test_atomic_write_leaves_the_old_file_when_the_write_raises(tmp_path):
    path = tmp_path / "metrics.json"
    with atomic_write(str(path)) as f:
        f.write("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(str(path)) as f:
            f.write("half of the new")
            1 / 0
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]  # no temporary left
    with atomic_write(str(path), "wb") as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["metrics.json"]
    with pytest.raises(ValueError, match="mode='a'"):
        with atomic_write(str(path), "a"):
            pass


def test_checkpoint_write_that_fails_leaves_the_last_good_one(finished_run, tmp_path, monkeypatch):
    cfg = finished_run
    model = build_model(cfg)
    optimizer = engine.build_optimizer(cfg, model)
    checkpointer = Checkpointer(model, str(tmp_path), optimizer=optimizer, scheduler=engine.build_lr_scheduler(cfg, optimizer))
    good = checkpointer.save("model_final", iteration=0, seed=7)
    before = open(good, "rb").read()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_final", iteration=1, seed=7)
    assert open(good, "rb").read() == before and last_checkpoint(str(tmp_path)) == good
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]


def test_resume_reads_checkpoints_of_the_hand_written_engine(finished_run, tmp_path):
    """A checkpoint as the engine wrote it before fvcore (its own scheduler's state, plain
    torch.save) resumes and ends as an uninterrupted run."""
    straight = load_checkpoint(os.path.join(finished_run.OUTPUT_DIR, "model_final.pth"))
    old = load_checkpoint(os.path.join(finished_run.OUTPUT_DIR, "model_0000002.pth"))
    assert set(old["scheduler"]) == {"last_epoch", "base_lrs", "_step_count", "_last_lr"}
    run = tmp_path / "run"
    run.mkdir()
    torch.save(
        {key: old[key] for key in ("model", "optimizer", "scheduler", "iteration", "seed")}, run / "model_0000002.pth"
    )
    (run / "last_checkpoint").write_text("model_0000002.pth")
    cfg = finished_run.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(run)
    engine.train(cfg, resume=True)
    resumed = load_checkpoint(str(run / "model_final.pth"))
    assert resumed["iteration"] == 5 and resumed["scheduler"] == straight["scheduler"]
    assert all(torch.equal(v, resumed["model"][k]) for k, v in straight["model"].items())


def test_resume_is_strict_and_names_what_is_missing(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run.OUTPUT_DIR, run)
    cfg = tiny_cfg(run, **{"DATASETS.TEST": "()", "MODEL.IOU_AWARE.ENABLED": False})  # no iou_pred
    with pytest.raises(ValueError, match="MODEL.IOU_AWARE.ENABLED: True in the run, False now"):
        engine.train(cfg, resume=True)  # the run's config.yaml says what it was trained with
    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").unlink()  # without it, the checkpoint itself is checked
    with pytest.raises(ValueError, match=r"model_final\.pth does not fit this model: it holds 2 tensors .*iou_pred"):
        engine.train(cfg, resume=True)
    (run / "config.yaml").write_text(saved)
    weights_only = load_checkpoint(str(run / "model_0000002.pth"))
    torch.save({"model": weights_only["model"], "iteration": 2}, run / "model_0000002.pth")
    (run / "last_checkpoint").write_text("model_0000002.pth")
    with pytest.raises(ValueError, match="cannot be resumed from: it has no optimizer, scheduler, seed"):
        engine.train(_in(finished_run, run), resume=True)
    (run / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(FileNotFoundError, match="model_0000009.pth"):
        engine.train(_in(finished_run, run), resume=True)


def _in(cfg, output_dir):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def test_new_run_in_an_existing_run_folder_is_refused(finished_run):
    before = open(os.path.join(finished_run.OUTPUT_DIR, "metrics.json")).read()
    with pytest.raises(FileExistsError, match="--resume"):
        engine.train(finished_run)
    assert open(os.path.join(finished_run.OUTPUT_DIR, "metrics.json")).read() == before


def test_evaluating_weights_that_do_not_fit_is_refused(finished_run, tmp_path):
    cfg = finished_run
    classifier = {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3),
                  "layer1.0.bn1.num_batches_tracked": torch.tensor(5)}  # fmt: skip
    path = str(tmp_path / "imagenet_like.pth")
    torch.save(classifier, path)
    with pytest.raises(ValueError, match="no parameter of the checkpoint matches"):
        engine.load_model(cfg, path)
    # A baseline checkpoint into an IoU-aware model: the IoU branch would stay random.
    baseline_cfg = tiny_cfg(tmp_path / "b", **{"MODEL.IOU_AWARE.ENABLED": False})
    save_checkpoint(build_model(baseline_cfg), str(tmp_path / "baseline.pth"))
    with pytest.raises(ValueError, match="iou_pred"):
        engine.load_model(cfg, str(tmp_path / "baseline.pth"))


# ------------------------------------------------------------------ config and datasets


def test_more_classes_than_categories_fails_before_training(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"MODEL.RETINANET.NUM_CLASSES": 6})
    with pytest.raises(ValueError, match=r"NUM_CLASSES=6 but dataset 'shapes_mini_val' has 4 categories"):
        engine.train(cfg)
    assert not os.path.exists(tmp_path / "model_final.pth")


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/tmp/x", ""])
def test_dataset_names_that_are_paths_are_refused(name):
    with pytest.raises(ValueError, match="results folder"):
        safe_folder_name(name)


def test_dataset_named_dotdot_cannot_overwrite_the_run(tmp_path):
    from iou_aware_retinanet.data.builtin import builtin_dataset_paths

    json_file, image_root = builtin_dataset_paths("shapes_mini_val")
    cfg = tiny_cfg(tmp_path, **{"DATASETS.COCO_INSTANCES": repr([["..", json_file, image_root]]), "DATASETS.TEST": "('..',)"})
    with pytest.raises(ValueError, match="cannot name its results folder"):
        engine.train(cfg)


def test_integer_for_a_float_key_is_accepted(tmp_path):
    cfg = setup_cfg(SHAPES_CONFIG, tiny_opts(tmp_path) + ["SOLVER.BASE_LR", "1"])
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)


# ------------------------------------------------------------------ predict


def test_predict_refuses_to_overwrite_its_inputs(finished_run, tmp_path):
    from iou_aware_retinanet.data.builtin import builtin_dataset_paths

    _, image_root = builtin_dataset_paths("shapes_mini_val")
    folder = tmp_path / "images"
    shutil.copytree(image_root, folder)
    image = folder / "000000.png"
    original = image.read_bytes()
    opts = ["OUTPUT_DIR", finished_run.OUTPUT_DIR, "MODEL.WEIGHTS", os.path.join(finished_run.OUTPUT_DIR, "model_final.pth")]
    opts += tiny_opts(finished_run.OUTPUT_DIR)[2:]
    for output in (str(folder), str(image)):
        with pytest.raises(FileExistsError, match="overwrite the input image"):
            main(["predict", "--config-file", SHAPES_CONFIG, "--input", str(image), "--output", output, *opts])
    assert image.read_bytes() == original
    with pytest.raises(ValueError, match=r"--min-score must lie in \[0, 1\]"):
        main(["predict", "--config-file", SHAPES_CONFIG, "--input", str(image), "--output", str(tmp_path / "o"),
              "--min-score", "2", *opts])  # fmt: skip
    # A folder as --input: every image in it.
    coco = main(["predict", "--config-file", SHAPES_CONFIG, "--input", str(folder), "--output", str(tmp_path / "drawn"), *opts])
    assert len(coco["images"]) == len([f for f in os.listdir(folder) if f.endswith(".png")])


def test_corrupt_test_image_fails_before_training(tmp_path):
    from iou_aware_retinanet.data.builtin import builtin_dataset_paths

    json_file, image_root = builtin_dataset_paths("shapes_mini_val")
    images = tmp_path / "val_images"
    shutil.copytree(image_root, images)
    (images / "000003.png").write_bytes(b"not a png")
    cfg = tiny_cfg(tmp_path / "out", **{"DATASETS.COCO_INSTANCES": repr([["broken_val", json_file, str(images)]]),
                                         "DATASETS.TEST": "('broken_val',)"})  # fmt: skip
    with pytest.raises(OSError, match=r"broken_val.*000003.png.*before training"):
        engine.train(cfg)
    assert not os.path.exists(tmp_path / "out" / "model_final.pth")
