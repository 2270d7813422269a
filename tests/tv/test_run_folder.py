"""The torchvision engine's OUTPUT_DIR: nothing of a run or of the user is overwritten, one run at a
time, --resume continues only the same run, and what is knowable before training fails before it."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from iou_aware_retinanet.run_folder import RunLock
from iou_aware_retinanet.tv import engine
from iou_aware_retinanet.tv.checkpoint import last_checkpoint, load_checkpoint

from .engine_helpers import fresh_datasets_root, tiny_cfg, write_coco  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """6 iterations, checkpoints at iterations 2 and 5 (final), no evaluation."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("finished"), **{"DATASETS.TEST": "()"})
    engine.train(cfg)
    return cfg


def _copy(finished_run, tmp_path, **overrides):
    run = tmp_path / "run"
    shutil.copytree(finished_run.OUTPUT_DIR, run)
    return run, tiny_cfg(run, **{"DATASETS.TEST": "()", **overrides})


def test_a_folder_holding_only_a_checkpoint_is_a_run(tmp_path):
    """Weights someone keeps as OUTPUT_DIR/model_0000002.pth: a new run would overwrite them at iteration 2."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_0000002.pth").write_bytes(b"my weights")
    with pytest.raises(FileExistsError, match=r"already holds a training run \(model_0000002.pth\)"):
        engine.train(tiny_cfg(out, **{"DATASETS.TEST": "()"}))
    assert (out / "model_0000002.pth").read_bytes() == b"my weights" and os.listdir(out) == ["model_0000002.pth"]


def test_a_users_config_yaml_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "config.yaml"
    mine.write_text("_BASE_: ../configs/Shapes/iou_aware_retinanet.yaml\nSOLVER:\n  MAX_ITER: 6\n")
    with pytest.raises(FileExistsError, match=r"config.yaml exists and is not a config this project saved"):
        engine.train(tiny_cfg(out, **{"DATASETS.TEST": "()"}))
    assert mine.read_text().startswith("_BASE_: ../configs") and not (out / "log.txt").exists()


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path):
    out = tmp_path / "out"
    with RunLock(str(out)):
        with pytest.raises(RuntimeError, match=rf"OUTPUT_DIR {out} is in use by another training run"):
            engine.train(tiny_cfg(out, **{"DATASETS.TEST": "()"}))
    assert sorted(os.listdir(out)) == ["run.lock"]


@pytest.mark.parametrize(
    "change, key",
    [({"MODEL.ASSIGNER.NAME": "atss"}, "MODEL.ASSIGNER.NAME"), ({"SOLVER.IMS_PER_BATCH": 4}, "SOLVER.IMS_PER_BATCH"),
     ({"MODEL.RETINANET.NUM_CLASSES": 6}, "MODEL.RETINANET.NUM_CLASSES")],
)
def test_resume_under_another_config_is_refused(finished_run, tmp_path, change, key):
    run, cfg = _copy(finished_run, tmp_path, **change)
    before = (run / "config.yaml").read_text()
    with pytest.raises(ValueError, match=rf"--resume would continue the run of .*under another configuration \({key}: "):
        engine.train(cfg, resume=True)
    assert (run / "config.yaml").read_text() == before


def test_resume_after_a_num_classes_change_names_the_file_and_the_tensor(finished_run, tmp_path):
    """Without the run's config.yaml (a folder copied without it), the checkpoint itself is checked."""
    run, cfg = _copy(finished_run, tmp_path, **{"MODEL.RETINANET.NUM_CLASSES": 6})
    (run / "config.yaml").unlink()
    with pytest.raises(ValueError, match=r"model_final\.pth does not fit this model: .*head\.cls_logits\.\w+: \(\d+.*NUM_CLASSES"):
        engine.train(cfg, resume=True)


def test_resume_survives_a_metrics_line_cut_short_and_removes_orphaned_temporaries(finished_run, tmp_path):
    run, cfg = _copy(finished_run, tmp_path, **{"SOLVER.MAX_ITER": 7})
    with open(run / "metrics.json", "a") as f:
        f.write('{"iteration": 7, "total_lo')  # a kill during the append
    orphan = run / f"model_0000008.pth.{2**22 + 777}-0123abcd.tmp"  # its process is gone
    orphan.write_bytes(b"half a checkpoint")
    engine.train(cfg, resume=True)  # iteration 6 only
    assert not orphan.exists()
    records = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [5, 6]
    assert load_checkpoint(last_checkpoint(str(run)))["iteration"] == 6


def test_a_test_image_of_another_size_fails_before_training(tmp_path):
    json_file, image_root = write_coco(str(tmp_path / "data"))
    cv2.imwrite(os.path.join(image_root, "img3.png"), np.zeros((64, 81, 3), np.uint8))  # annotated 64 x 80
    cfg = tiny_cfg(tmp_path / "out", **{
        "DATASETS.COCO_INSTANCES": f"[['mine', '{json_file}', '{image_root}']]",
        "DATASETS.TRAIN": "('mine',)", "DATASETS.TEST": "('mine',)", "MODEL.RETINANET.NUM_CLASSES": 2,
    })  # fmt: skip
    with pytest.raises(ValueError, match=r"DATASETS.TEST 'mine': image file .*img3.png is 64 x 81 .*64 x 80.*before training"):
        engine.train(cfg)
    assert not (tmp_path / "out" / "last_checkpoint").exists()


def test_a_training_image_that_is_no_image_or_of_another_size_fails_before_training(tmp_path, monkeypatch):
    """Without DATALOADER.CACHE_IMAGES the images are decoded by the loader, iteration after
    iteration: their headers are read before the first one."""
    json_file, image_root = write_coco(str(tmp_path / "data"))
    steps = []
    monkeypatch.setattr(engine, "run_step", lambda *args, **kwargs: steps.append(1))

    def cfg(out):
        return tiny_cfg(tmp_path / out, **{
            "DATASETS.COCO_INSTANCES": f"[['mine', '{json_file}', '{image_root}']]", "DATASETS.TRAIN": "('mine',)",
            "DATASETS.TEST": "()", "MODEL.RETINANET.NUM_CLASSES": 2, "DATALOADER.CACHE_IMAGES": False,
        })  # fmt: skip

    cv2.imwrite(os.path.join(image_root, "img2.png"), np.zeros((64, 79, 3), np.uint8))  # annotated 64 x 80
    with pytest.raises(ValueError, match=r"DATASETS.TRAIN .*img2.png is 64 x 79 .*64 x 80.*before training"):
        engine.train(cfg("a"))
    with open(os.path.join(image_root, "img2.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(OSError, match=r"DATASETS.TRAIN .*could not read image file .*img2.png.*before training"):
        engine.train(cfg("b"))
    assert steps == []  # no iteration ran
