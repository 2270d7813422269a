"""The accuracy study: its statistics by hand, its rescoring on a hand-made image, and a tiny end-to-end run."""
import json
import math
import os

import numpy as np
import pytest
import torch

from iou_aware_retinanet.core import BoxCoder, InferenceConfig
from iou_aware_retinanet.studies import accuracy


def test_rank_averages_ties():
    assert accuracy.rank(np.array([10.0, 30.0, 20.0, 30.0])).tolist() == [1.0, 3.5, 2.0, 3.5]


def test_spearman_and_pearson_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert accuracy.spearman(x, x ** 3) == pytest.approx(1.0)  # monotone: rank correlation 1
    assert accuracy.pearson(x, x ** 3) < 0.99  # ... but not linear
    assert accuracy.spearman(x, -x) == pytest.approx(-1.0)
    # x = [1, 2, 3], y = [1, 3, 2]: ranks equal values; r = 0.5 by hand.
    assert accuracy.pearson(np.array([1.0, 2, 3]), np.array([1.0, 3, 2])) == pytest.approx(0.5)
    assert math.isnan(accuracy.pearson(x, np.ones(4)))  # constant: undefined, not a crash


class _Model:
    box_coder = BoxCoder()
    inference_config = InferenceConfig(alpha=0.5, score_thresh=0.0, nms_thresh=0.5)


def _image(pred_ious):
    """One level, two anchors on one object: anchor 0 is exact, anchor 1 is shifted
    by 5 px (IoU 1/3 with the GT); both boxes are taken as is (zero deltas)."""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]])
    return accuracy.ImageOutputs(
        image_id=1,
        cls_probs=[torch.tensor([[0.5], [0.9]])],
        box_deltas=[torch.zeros(2, 4)],
        ious=[torch.tensor(pred_ious)],
        anchors=[anchors],
        image_size=(20, 20),
        original_size=(40, 40),  # the network saw the image at half size
        gt_boxes=torch.tensor([[0.0, 0.0, 20.0, 20.0]]),
        gt_classes=torch.tensor([0]),
    )


def test_truth_ious_measure_decoded_boxes_against_the_resized_gt():
    ious = accuracy.truth_ious(_image([0.5, 0.5]), BoxCoder())
    assert ious[0].tolist() == pytest.approx([1.0, 1.0 / 3.0])


def test_upper_bound_rescoring_keeps_the_well_placed_box():
    item, model = _image([0.2, 0.9]), _Model()  # the branch wrongly prefers the shifted box
    predicted = accuracy.detect(item, model, alpha=0.5)
    truth = accuracy.detect(item, model, alpha=0.5, iou_source="truth")
    # Overlap of the two boxes is 1/3 < NMS 0.5: both survive, ranked by S.
    assert predicted["scores"].tolist() == pytest.approx([math.sqrt(0.9 * 0.9), math.sqrt(0.5 * 0.2)])
    assert truth["scores"].tolist() == pytest.approx([math.sqrt(0.5 * 1.0), math.sqrt(0.9 / 3.0)])
    # Boxes come back in original coordinates (x2).
    assert truth["boxes"][0].tolist() == pytest.approx([0.0, 0.0, 20.0, 20.0])
    # IoU_eval of each detection against the same-class GT, original coordinates.
    assert accuracy.iou_eval(truth, item).tolist() == pytest.approx([1.0, 1.0 / 3.0])


def test_iou_eval_ignores_other_classes():
    item = _image([0.5, 0.5])
    det = accuracy.detect(item, _Model(), alpha=1.0)
    det["labels"] = torch.tensor([1, 1])
    assert accuracy.iou_eval(det, item).tolist() == [0.0, 0.0]


def _metrics(ap, ap75, ap90=1.0, apl=3.0):
    return {"AP": ap, "AP50": 20.0, "AP75": ap75, "AP90": ap90, "APs": 1.0, "APm": 2.0, "APl": apl}


def test_results_table_reports_mean_std():
    rows = {
        "retinanet": {"model": "retinanet", "scoring": "p",
                      "per_seed": {0: _metrics(10.0, 5.0), 1: _metrics(12.0, 7.0, apl=float("nan"))}},
    }  # fmt: skip
    lines = accuracy.results_table(rows).splitlines()
    cells = lines[2].split(" | ")
    assert cells[3:5] == ["11.00 ± 1.41", "20.00 ± 0.00"]
    assert cells[9].rstrip(" |") == "3.00"  # APl: the NaN seed is left out of the mean


def test_paired_differences_and_verdicts_by_hand():
    ref = {"per_seed": {0: _metrics(10.0, 5.0), 1: _metrics(12.0, 5.0), 2: _metrics(11.0, 5.0)}}
    # AP deltas per seed: +4, +1, +4 -> mean 3, std sqrt(3), SE 1: 3 > 2 SE, a win.
    better = {"per_seed": {0: _metrics(14.0, 7.0), 1: _metrics(13.0, 4.0), 2: _metrics(15.0, 7.0)}}
    d = accuracy.paired_difference(better, ref, "AP")
    assert d["deltas"] == [4.0, 1.0, 4.0]
    assert (d["mean"], d["std"], d["se"]) == pytest.approx((3.0, math.sqrt(3.0), 1.0))
    assert d["verdict"] == "wins"
    # AP75 deltas +2, -1, +2: mean 1 < 2 SE (SE 1): no significant difference.
    assert accuracy.paired_difference(better, ref, "AP75")["verdict"] == "no significant difference"
    # Only the seeds both rows have are paired; one seed gives no verdict.
    single = {"per_seed": {1: _metrics(9.0, 5.0)}}
    assert accuracy.paired_difference(single, ref, "AP")["verdict"] == "n/a (1 seed)"
    worse = {"per_seed": {s: _metrics(m["AP"] - 3.0 - 0.1 * s, 5.0) for s, m in ref["per_seed"].items()}}
    assert accuracy.paired_difference(worse, ref, "AP")["verdict"] == "loses"
    table = accuracy.paired_table({"retinanet": {"model": "retinanet", "scoring": "p", **ref},
                                   "x": {"model": "x", "scoring": "S", **better}}, "retinanet")  # fmt: skip
    assert "+4.00, +1.00, +4.00" in table and "+3.00 ± 1.73 (1.00)" in table and "| wins |" in table


def test_iou_calibration_of_positive_anchors_by_hand():
    # Anchor 0 is the GT itself (true IoU 1), anchor 1 has IoU 1/3 < 0.5: not a positive.
    cal = accuracy.iou_calibration([_image([0.75, 0.9])], _Model())
    assert cal["n"] == 1
    assert cal["mae"] == pytest.approx(0.25)  # |0.75 - 1|
    assert cal["bins"][0]["mean_true"] == pytest.approx(1.0)


def test_tiny_study_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the correlation plot needs matplotlib (the 'analysis' extra)")
    monkeypatch.setenv("IOU_AWARE_RETINANET_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "study"
    summary = accuracy.main(
        ["--configs", "retinanet", "iou_aware", "--seeds", "0", "1", "--iters", "10", "--output-dir", str(out),
         "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_val',)",
         "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]
    )  # fmt: skip
    rows = summary["rows"]
    expected = ["retinanet"] + [f"iou_aware/{a}" for a in accuracy.ALPHAS] + ["iou_aware/truth"]
    assert list(rows) == expected
    assert all(len(row["per_seed"]) == 2 for row in rows.values())
    # alpha = 1 on the IoU-aware model is its plain p ranking; both are scored from the same outputs.
    for metrics in list(rows["iou_aware/1.0"]["per_seed"].values()) + list(rows["iou_aware/truth"]["per_seed"].values()):
        assert set(metrics) == set(accuracy.STUDY_METRICS)
    assert [c["label"].split(":")[0] for c in summary["correlation"]] == [
        "baseline RetinaNet", "IoU-aware, p alone", "IoU-aware", "IoU-aware"
    ]  # fmt: skip
    assert (out / "correlation.png").stat().st_size > 0
    assert (out / "calibration.png").stat().st_size > 0
    assert summary["calibration"]["n"] > 0 and 0.0 <= summary["calibration"]["mae"] <= 1.0
    assert "Paired differences" in (out / "accuracy.md").read_text()
    results_section = (out / "accuracy.md").read_text().split("Paired differences")[0]
    assert results_section.count("| iou_aware") == len(accuracy.ALPHAS) + 1
    paired_section = (out / "accuracy.md").read_text().split("Paired differences")[1].split("Correlation")[0]
    assert paired_section.count("| iou_aware") == len(accuracy.ALPHAS) + 1  # every row but the baseline
    assert json.loads((out / "accuracy.json").read_text())["seeds"] == [0, 1]
    # A rerun reuses the trained models instead of training again.
    mtime = (out / "runs" / "iou_aware" / "seed0" / "model_final.pth").stat().st_mtime
    accuracy.main(["--configs", "iou_aware", "--seeds", "0", "--iters", "10", "--output-dir", str(out),
                   "DATASETS.TEST", "('shapes_mini_val',)"])  # fmt: skip
    assert (out / "runs" / "iou_aware" / "seed0" / "model_final.pth").stat().st_mtime == mtime


def test_only_trained_evaluates_what_exists_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("IOU_AWARE_RETINANET_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "study"
    opts = ["DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_val',)",
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip
    accuracy.main(["--configs", "retinanet", "--seeds", "0", "--iters", "10", "--output-dir", str(out), *opts])
    summary = accuracy.main(["--configs", "retinanet", "--seeds", "0", "3", "--iters", "10", "--only-trained",
                             "--output-dir", str(out), *opts])  # fmt: skip
    assert summary["missing"] == ["retinanet/seed3"]
    assert list(summary["rows"]["retinanet"]["per_seed"]) == [0]
    assert not (out / "runs" / "retinanet" / "seed3").exists()
    assert "Not trained yet" in (out / "accuracy.md").read_text()


def test_each_model_is_evaluated_once(tmp_path, monkeypatch):
    """A rerun takes a model's rows from its study_eval.json; new weights invalidate them."""
    monkeypatch.setenv("IOU_AWARE_RETINANET_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "study"
    argv = ["--configs", "topk", "--seeds", "0", "--iters", "10", "--output-dir", str(out),
            "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_val',)",
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip
    first = accuracy.main(argv)
    assert (out / "runs" / "topk" / "seed0" / accuracy.EVAL_CACHE).is_file()

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(accuracy, "load_model", no_evaluation)
    assert json.dumps(accuracy.main(argv)["rows"]) == json.dumps(first["rows"])  # NaN == NaN as text
    weights = out / "runs" / "topk" / "seed0" / "model_final.pth"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "retrained"
    with pytest.raises(AssertionError, match="evaluated again"):
        accuracy.main(argv)
