"""train_net.py's OUTPUT_DIR: a finished run, a user's config.yaml and a running run are never
overwritten; --resume continues only the same run; temporaries of interrupted writes are removed."""
import os
import runpy

import pytest
import torch

from .helpers import D2_MISSING_REASON, REPO

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

from iou_aware_retinanet.d2.entry import setup_project_cfg  # noqa: E402
from iou_aware_retinanet.run_folder import RunLock  # noqa: E402

SHAPES = os.path.join(REPO, "configs", "Shapes", "iou_aware_retinanet.yaml")


def _train_net():
    return runpy.run_path(os.path.join(REPO, "train_net.py"), run_name="train_net")


def _main(out, *args, config=SHAPES):
    train_net = _train_net()
    parsed = train_net["get_parser"]().parse_args(
        ["--config-file", str(config), *args, "DATASETS.TRAIN", "('no_such_dataset',)", "DATASETS.TEST", "()",
         "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out)]  # fmt: skip
    )
    return train_net["main"](parsed)


def _finished_run(out, *opts):
    """A run's folder as train_net.py leaves it: its config, checkpoints and their index."""
    os.makedirs(out, exist_ok=True)
    cfg = setup_project_cfg(SHAPES, ["DATASETS.TRAIN", "('no_such_dataset',)", "DATASETS.TEST", "()",
                                     "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out), *opts])  # fmt: skip
    (out / "config.yaml").write_text(cfg.dump())
    (out / "model_final.pth").write_bytes(b"the run's weights")
    (out / "last_checkpoint").write_text("model_final.pth")
    return cfg


def test_a_new_run_into_a_finished_run_is_refused(tmp_path):
    out = tmp_path / "out"
    _finished_run(out)
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(FileExistsError, match=r"already holds a training run \(last_checkpoint, model_final.pth\).*--resume"):
        _main(out)
    assert (out / "model_final.pth").read_bytes() == b"the run's weights"
    assert (out / "config.yaml").read_text() == config_before


def test_a_users_config_yaml_in_output_dir_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "config.yaml"
    mine.write_text(f'_BASE_: "{SHAPES}"\n# my notes\nSOLVER:\n  MAX_ITER: 5\n')
    before = mine.read_text()
    with pytest.raises(FileExistsError, match=r"config.yaml exists and is not a config this project saved"):
        _main(out, config=mine)
    assert mine.read_text() == before
    # --eval-only writes its config beside its results, in OUTPUT_DIR/inference, and only there.
    weights = tmp_path / "w.pth"
    from detectron2.modeling import build_model

    torch.save({"model": build_model(setup_project_cfg(SHAPES, ["MODEL.DEVICE", "cpu"])).state_dict()}, str(weights))
    assert _main(out, "--eval-only", "MODEL.WEIGHTS", str(weights), config=mine) == {}
    assert mine.read_text() == before
    assert (out / "inference" / "config.yaml").read_text().startswith("CUDNN_BENCHMARK")


def test_a_second_run_into_a_running_runs_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    with RunLock(str(out)):  # a run that has not yet written a checkpoint or a metrics line
        with pytest.raises(RuntimeError, match=rf"OUTPUT_DIR {out} is in use by another training run \(pid {os.getpid()}"):
            _main(out)
    assert not (out / "config.yaml").exists()
    with pytest.raises(KeyError, match="no_such_dataset"):  # free again: this run gets as far as its data
        _main(out)


@pytest.mark.parametrize(
    "change, key",
    [(["MODEL.ASSIGNER.NAME", "atss"], "MODEL.ASSIGNER.NAME"), (["SOLVER.IMS_PER_BATCH", "4"], "SOLVER.IMS_PER_BATCH"),
     (["MODEL.RETINANET.NUM_CLASSES", "7"], "MODEL.RETINANET.NUM_CLASSES")],
)
def test_resume_under_another_config_is_refused_naming_the_key(tmp_path, change, key):
    out = tmp_path / "out"
    _finished_run(out)
    before = (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match=rf"--resume would continue the run of .*config.yaml under another configuration \({key}: "):
        _main(out, "--resume", *change)
    assert (out / "config.yaml").read_text() == before
    # What may change on resume: how long it trains, where it runs, how it is evaluated.
    (out / "metrics.json").write_text('{"iteration": 19, "loss": 1.0}\n{"iteration": 39, "lo')  # killed mid-append
    with pytest.raises(KeyError, match="no_such_dataset"):
        _main(out, "--resume", "SOLVER.MAX_ITER", "99", "TEST.EVAL_PERIOD", "5")
    # The line cut short is gone: Detectron2's writer appends the next record on a line of its own.
    assert (out / "metrics.json").read_text() == '{"iteration": 19, "loss": 1.0}\n'


def test_temporaries_of_interrupted_writes_are_removed_when_a_run_starts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = 2**22 + 12345  # above the default pid_max of 2**22: no such process
    orphan = out / f"model_0000009.pth.{dead}-0123abcd.tmp"
    orphan.write_bytes(b"half a checkpoint")
    alive = out / f"last_checkpoint.{os.getppid()}-0123abcd.tmp"  # a living process's write in progress
    alive.write_text("x")
    with pytest.raises(KeyError, match="no_such_dataset"):
        _main(out)
    assert not orphan.exists() and alive.exists()
