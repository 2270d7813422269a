"""The GPU check's quick mode on the CPU: every section of the script runs (small) and
reports, so the one command prepared for a GPU keeps working between GPU runs."""
import json
import os
import subprocess
import sys

from iou_aware_retinanet.benchmarks.gpu_check import SECTIONS, Report, round_robin_medians
from iou_aware_retinanet.data.builtin import DATASETS_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_mode_on_cpu_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{DATASETS_ENV: str(tmp_path / "datasets")})
    env.pop("IOU_AWARE_TEST_DEVICE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "iou_aware_retinanet.benchmarks.gpu_check", "--device", "cpu", "--quick",
         "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failed"] == [] and result["quick"] and result["machine"]["device"] == "cpu"
    assert set(result["sections"]) == set(SECTIONS)
    # The table printed is the table written.
    for section, item, value, status in result["table"]:
        assert f"| {section} | {item} | {value} | {status} |" in proc.stdout

    tests = result["sections"]["tests"]
    assert tests["passed"] >= 1 and tests["failed"] == 0 and tests["device"] == "cpu"

    rows = result["sections"]["assigners"]["rows"]
    assert {r["assigner"] for r in rows} >= {"max_iou", "atss", "noisy_anchor", "task_aligned"}
    assert all(r["time_ms"] > 0 and r["peak_mib"] is None for r in rows)  # no device memory on a CPU

    r50 = result["sections"]["r50"]
    trained = {(r["model"], r["amp"]) for r in r50["train"]}
    assert {("tv_iou_aware", False), ("tv_retinanet", True), ("tv_stock", True)} <= trained
    assert {r["model"] for r in r50["inference"]} >= {"tv_retinanet", "tv_iou_aware_cls", "tv_iou_aware"}
    assert all(r["ms"] > 0 for r in r50["train"] + r50["inference"])

    for section, amp in (("main_job", False), ("main_job_amp", True)):
        job = result["sections"][section]
        assert job["amp"] is amp and job["iterations"] == job["max_iter"] == 4
        assert 0.0 <= job["bbox"]["AP"] <= 100.0 and job["it_per_s"] > 0


def test_a_failed_device_test_fails_the_check():
    report = Report()
    report.add("tests", "tests/device on cuda", "3 passed, 1 failed, 0 skipped", "FAILED")
    report.add("r50", "train tv: IoU-aware / RetinaNet", "1.010")
    assert report.failed == ["tests: tests/device on cuda"]
    assert report.table().splitlines()[2] == "| tests | tests/device on cuda | 3 passed, 1 failed, 0 skipped | FAILED |"


def test_round_robin_calls_each_run_in_turn():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = round_robin_medians(runs, repeats=2, warmup=1, sync=lambda: calls.append("sync"))
    assert calls == ["a", "b", "c", "sync"] + ["a", "sync", "b", "sync", "c", "sync"] * 2
    assert set(medians) == {"a", "b", "c"} and all(ms >= 0 for ms in medians.values())


def test_wheel_list_names_what_the_gpu_machine_lacks():
    """``tools/gpu_wheels.py --list`` (no download): every package the project or Detectron2
    imports that the GPU machine does not have, and the Detectron2 wheel's status."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_wheels.py"), "--list"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = [line.split("==")[0] for line in proc.stdout.splitlines() if "==" in line]
    assert names == ["fvcore", "iopath", "yacs", "termcolor", "pycocotools", "omegaconf", "antlr4-python3-runtime"]
    assert "detectron2" in proc.stdout
