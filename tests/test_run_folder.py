"""OUTPUT_DIR rules shared by both front-ends (iou_aware_retinanet.run_folder), without Detectron2."""
import os
import signal
import subprocess
import sys
import time

import pytest

from iou_aware_retinanet.run_folder import (
    RunLock, check_config_replaceable, check_resume_config, claim_output_dir, refuse_to_overwrite_a_run,
    remove_orphaned_temporaries,
)  # fmt: skip
from iou_aware_retinanet.tv import get_cfg

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the run lock is POSIX's flock")


def _dump(**changes):
    cfg = get_cfg()
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg.dump()


def test_the_lock_is_held_across_processes_and_freed_by_a_kill(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from iou_aware_retinanet.run_folder import RunLock; "
         f"lock = RunLock({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"in use by another training run \(pid {holder.pid} "):
            RunLock(str(tmp_path))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(str(tmp_path)):  # the kill freed it
        pass
    RunLock(str(tmp_path)).release()


def test_a_folder_with_any_checkpoint_holds_a_run(tmp_path):
    refuse_to_overwrite_a_run(str(tmp_path / "absent"))
    (tmp_path / "log.txt").write_text("a run that failed before its first checkpoint")
    (tmp_path / "run.lock").write_text("")
    refuse_to_overwrite_a_run(str(tmp_path))
    (tmp_path / "model_0004999.pth").write_bytes(b"weights someone put here")
    with pytest.raises(FileExistsError, match=r"already holds a training run \(model_0004999.pth\)"):
        refuse_to_overwrite_a_run(str(tmp_path))


def test_config_yaml_is_replaced_only_when_it_is_a_full_dump(tmp_path):
    path = tmp_path / "config.yaml"
    check_config_replaceable(str(path), _dump())  # absent
    path.write_text(_dump(**{"SOLVER.BASE_LR": 0.5}))  # an earlier save of the project: replaceable
    check_config_replaceable(str(path), _dump())
    for mine in ("_BASE_: ../Base.yaml\nSOLVER:\n  BASE_LR: 0.5\n", "not: [valid", ""):
        path.write_text(mine)
        with pytest.raises(FileExistsError, match="not a config this project saved"):
            check_config_replaceable(str(path), _dump())
    path.write_text(_dump())  # identical: nothing to replace
    check_config_replaceable(str(path), _dump())


def test_resume_config_names_every_changed_key_that_matters(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(_dump())
    check_resume_config(str(path), _dump(**{"SOLVER.MAX_ITER": 99, "TEST.EVAL_PERIOD": 5, "MODEL.DEVICE": "cpu"}))
    with pytest.raises(ValueError, match=r"MODEL.ASSIGNER.NAME: 'max_iou' in the run, 'atss' now; SOLVER.IMS_PER_BATCH: 16 in the run, 4 now"):
        check_resume_config(str(path), _dump(**{"MODEL.ASSIGNER.NAME": "atss", "SOLVER.IMS_PER_BATCH": 4}))


def test_claim_checks_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    lock = claim_output_dir(str(out), _dump(), resume=False)
    with pytest.raises(RuntimeError, match="in use"):
        claim_output_dir(str(out), _dump(), resume=False)
    lock.release()
    (out / "config.yaml").write_text(_dump())
    (out / "model_final.pth").write_bytes(b"w")
    (out / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(FileExistsError, match="--resume"):
        claim_output_dir(str(out), _dump(), resume=False)
    with pytest.raises(ValueError, match="MODEL.RETINANET.NUM_CLASSES: 80 in the run, 3 now"):
        claim_output_dir(str(out), _dump(**{"MODEL.RETINANET.NUM_CLASSES": 3}), resume=True)
    claim_output_dir(str(out), _dump(**{"SOLVER.MAX_ITER": 10}), resume=True).release()  # the lock was freed on each refusal


def test_only_temporaries_of_dead_processes_are_removed(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    time.sleep(0.1)
    dead = tmp_path / f"model_0000009.pth.{child.pid}-0123abcd.tmp"
    alive = tmp_path / f"last_checkpoint.{os.getppid()}-89abcdef.tmp"
    mine = tmp_path / f"metrics.json.{os.getpid()}-0000ffff.tmp"
    other = tmp_path / "notes.1234-abc.tmp"  # not atomic_write's pattern
    for f in (dead, alive, mine, other):
        f.write_text("x")
    assert remove_orphaned_temporaries(str(tmp_path)) == [dead.name]
    assert alive.exists() and mine.exists() and other.exists() and not dead.exists()
