"""The speed / memory benchmark runs end to end and reports what it promises.

One run of ``main --quick --repeats 1 --threads 1`` on a shrunken shapes
setting (128x128 images, training batch 2) so the whole module takes seconds;
the assertions are on the structure of the results and the printed tables,
never on speed.
"""
import contextlib
import dataclasses
import importlib.util
import io
import json
import math

import pytest
import torch

from iou_aware_retinanet.benchmarks import speed

MODES = {"train", "inference"}
HAS_D2 = importlib.util.find_spec("detectron2") is not None


def _frontends():
    return {"tv", "d2"} if HAS_D2 else {"tv"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(returned results, printed text, JSON file contents) of one quick run."""
    json_path = tmp_path_factory.mktemp("speed") / "speed.json"
    tiny = dataclasses.replace(speed.SETTINGS["shapes"], image_size=(128, 128), train_batch=2)
    out = io.StringIO()
    threads = torch.get_num_threads()  # --threads sets it process-wide: restore it for other tests
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            mp.setitem(speed.SETTINGS, "shapes", tiny)
            results = speed.main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(json_path)])
    finally:
        torch.set_num_threads(threads)
    return results, out.getvalue(), json.loads(json_path.read_text())


def _check_ratio_row(row):
    for key in ("a_ms", "b_ms"):
        assert math.isfinite(row[key]) and row[key] > 0, row
    assert row["ratio"] == pytest.approx(row["b_ms"] / row["a_ms"], rel=1e-9)


def test_quick_runs_shapes_only(run):
    results, _, _ = run
    assert list(results["settings"]) == ["shapes"]
    machine = results["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["threads"] == 1
    assert machine["torch"] and machine["torchvision"]


def test_iou_aware_and_peer_pairs_present(run):
    res = run[0]["settings"]["shapes"]
    expected_iou = {(p.label, m) for p in speed.IOU_AWARE_PAIRS if p.frontend in _frontends() for m in MODES}
    expected_peer = {(p.label, m) for p in speed.PEER_PAIRS if p.frontend in _frontends() for m in MODES}
    assert {(r["pair"], r["mode"]) for r in res["iou_aware"]} == expected_iou
    assert {(r["pair"], r["mode"]) for r in res["peers"]} == expected_peer
    assert len(res["iou_aware"]) == len(expected_iou) and len(res["peers"]) == len(expected_peer)
    for row in res["iou_aware"] + res["peers"]:
        _check_ratio_row(row)
        if row["mode"] == "inference":
            assert row["a_detections"] >= 0 and row["b_detections"] >= 0
    # the IoU-aware pairs compare the branch off (A) with the branch on (B)
    assert {(r["a"], r["b"]) for r in res["iou_aware"]} >= {("tv_retinanet", "tv_iou_aware")}
    assert {(r["a"], r["b"]) for r in res["peers"]} >= {("tv_stock", "tv_retinanet")}


def test_detectron2_rows_iff_importable(run):
    results, text, _ = run
    res = results["settings"]["shapes"]
    d2_rows = [r for r in res["iou_aware"] + res["peers"] if r["a"].startswith("d2_")]
    d2_memory = [m for m in res["memory"] if m["model"].startswith("d2_")]
    assert bool(d2_rows) == bool(d2_memory) == HAS_D2
    assert (results["detectron2_skipped"] is None) == HAS_D2
    assert ("Detectron2 rows skipped" in text) != HAS_D2
    if HAS_D2:
        assert ("d2_stock", "d2_retinanet") in {(r["a"], r["b"]) for r in d2_rows}


def test_postprocess_row(run):
    res = run[0]["settings"]["shapes"]
    (row,) = res["postprocess"]
    _check_ratio_row(row)
    assert row["a"] == "plain p" and row["b"].startswith("fused S")
    # the head calibration puts about CANDIDATES_PER_IMAGE pairs above the threshold
    assert abs(row["a_nms_inputs"] - speed.CANDIDATES_PER_IMAGE) <= 10
    assert row["b_nms_inputs"] > 0 and row["a_detections"] > 0 and row["b_detections"] > 0


def test_memory_rows(run):
    res = run[0]["settings"]["shapes"]
    expected = {(m, mode) for m in speed.MODELS if m.split("_")[0] in _frontends() for mode in MODES}
    assert {(m["model"], m["mode"]) for m in res["memory"]} == expected
    assert len(res["memory"]) == len(expected)
    for m in res["memory"]:
        assert math.isfinite(m["peak_mib"]) and m["peak_mib"] >= 0
        assert m["memory_method"].startswith("peak RSS growth")
    train = {m["model"]: m["peak_mib"] for m in res["memory"] if m["mode"] == "train"}
    assert all(mib > 0 for mib in train.values())  # activations and gradients must show


def test_printed_tables_match_results(run):
    results, text, _ = run
    res = results["settings"]["shapes"]
    assert "| pair | mode | A | B | A ms | B ms | B/A | dets/img A, B |" in text
    assert "| model | mode | peak MiB |" in text
    for row in res["iou_aware"] + res["peers"] + res["postprocess"]:
        assert f"| {row['pair']} | {row['mode']} | {row['a']} | {row['b']} | " in text
        assert f"| {row['ratio']:.3f} |" in text
    for m in res["memory"]:
        assert f"| {m['model']} | {m['mode']} | {m['peak_mib']:.1f} |" in text
    assert results["machine"]["cpu"] in text


def test_json_matches_returned_results(run):
    results, _, written = run
    assert written == json.loads(json.dumps(results))


def test_interleaved_medians_alternates():
    calls = []
    a_ms, b_ms = speed.interleaved_medians(lambda: calls.append("A"), lambda: calls.append("B"), repeats=3, warmup=1)
    assert calls == ["A", "B"] * 4
    assert a_ms >= 0 and b_ms >= 0
