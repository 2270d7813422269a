"""The accuracy study: its statistics by hand (studies/stats.py), its rescoring on a hand-made image, its plan, and tiny end-to-end runs."""
import json
import math
import os

import numpy as np
import pytest
import torch

from iou_aware_retinanet.core import BoxCoder, InferenceConfig
from iou_aware_retinanet.studies import accuracy, stats

MINI = ["DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_val',)",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]  # fmt: skip


def test_rank_averages_ties():
    assert stats.rank(np.array([10.0, 30.0, 20.0, 30.0])).tolist() == [1.0, 3.5, 2.0, 3.5]


def test_spearman_and_pearson_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert stats.spearman(x, x ** 3) == pytest.approx(1.0)  # monotone: rank correlation 1
    assert stats.pearson(x, x ** 3) < 0.99  # ... but not linear
    assert stats.spearman(x, -x) == pytest.approx(-1.0)
    # x = [1, 2, 3], y = [1, 3, 2]: ranks equal values; r = 0.5 by hand.
    assert stats.pearson(np.array([1.0, 2, 3]), np.array([1.0, 3, 2])) == pytest.approx(0.5)
    assert math.isnan(stats.pearson(x, np.ones(4)))  # constant: undefined, not a crash


# ------------------------------------------------------------------ the bootstrap, by hand


def test_bootstrap_interval_of_two_seeds_by_hand():
    # Resamplings of [1, -1]: (1, 1), (1, -1), (-1, 1), (-1, -1), means -1, 0, 0, 1. Linear quantiles:
    # 2.5 % at position 0.075 of the sorted means -> -1 + 0.075; 97.5 % at 2.925 -> 0 + 0.925.
    assert stats.bootstrap_interval([1.0, -1.0]) == pytest.approx((-0.925, 0.925))


def test_bootstrap_interval_of_three_seeds_by_hand():
    # 27 resamplings of [1, 2, 3]: the smallest mean is 1 (once), the next 4/3 (three times); the
    # 2.5 % quantile sits at position 0.65: 1 + 0.65 * (4/3 - 1). Symmetric at the top.
    low, high = stats.bootstrap_interval([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((1.0 + 0.65 / 3.0, 3.0 - 0.65 / 3.0))
    assert stats.bootstrap_interval([2.0, 2.0, 2.0]) == pytest.approx((2.0, 2.0))
    assert all(math.isnan(v) for v in stats.bootstrap_interval([2.0]))


def test_percentile_bootstrap_with_three_seeds_is_liberal():
    """Documented behaviour: one negative seed of three does not stop a 'win' when the others are large.
    [-0.1, 5, 5]: the smallest mean -0.1 (once), the next (-0.1 - 0.1 + 5) / 3 = 1.6 (6 times):
    the 2.5 % quantile is -0.1 + 0.65 * 1.7 = 1.005 > 0."""
    s = stats.summarize([-0.1, 5.0, 5.0])
    assert s["low"] == pytest.approx(1.005)
    assert stats.interval_verdict(s) == "wins"


def test_exact_enumeration_is_the_bootstrap_distribution():
    """Up to 6 values every resampling is enumerated; many random resamplings converge to the same interval."""
    values = np.array([0.3, -1.2, 2.5, 0.9, 1.4])
    exact = stats.bootstrap_means(values)
    assert len(exact) == 5**5
    drawn = values[np.random.default_rng(1).integers(0, 5, size=(400000, 5))].mean(axis=1)
    assert np.quantile(drawn, [0.025, 0.975]) == pytest.approx(stats.bootstrap_interval(values), abs=0.03)
    # Seven values and more: 10,000 seeded random resamplings, the same interval on every call.
    seven = np.arange(7.0)
    assert len(stats.bootstrap_means(seven)) == stats.BOOTSTRAP_RESAMPLES
    assert stats.bootstrap_interval(seven) == stats.bootstrap_interval(seven)
    assert 0.0 < stats.bootstrap_interval(seven)[0] < 3.0 < stats.bootstrap_interval(seven)[1] < 6.0


def _metrics(ap, ap75, ap90=1.0, apl=3.0, dets=100.0):
    return {"AP": ap, "AP50": 20.0, "AP75": ap75, "AP90": ap90, "APs": 1.0, "APm": 2.0, "APl": apl, "dets/img": dets}


def _row(model, per_seed, scoring="S", postprocess="default"):
    return {"model": model, "scoring": scoring, "postprocess": postprocess, "alpha": "0.5", "alpha_swept": False,
            "reference": None, "per_seed": per_seed}  # fmt: skip


def test_results_table_reports_mean_std():
    rows = {"retinanet": _row("retinanet", {0: _metrics(10.0, 5.0), 1: _metrics(12.0, 7.0, apl=float("nan"))}, "p")}
    cells = accuracy.results_table(rows).splitlines()[2].split(" | ")
    assert cells[1:4] == ["p", "default", "2"]
    assert cells[4:6] == ["11.00 ± 1.41", "20.00 ± 0.00"]
    assert cells[10] == "3.00"  # APl: the NaN seed is left out of the mean
    assert cells[11].rstrip(" |") == "100.00 ± 0.00"  # detections per image


def test_paired_differences_and_verdicts_by_hand():
    ref = _row("retinanet", {0: _metrics(10.0, 5.0), 1: _metrics(12.0, 5.0), 2: _metrics(11.0, 5.0)}, "p")
    # AP deltas per seed: +4, +1, +4 -> mean 3, std sqrt(3), SE 1. The 27 resamplings' smallest means
    # are 1 (once) and 2 (3 times): the interval starts at 1 + 0.65 * 1 = 1.65 > 0, a win.
    better = _row("x", {0: _metrics(14.0, 7.0), 1: _metrics(13.0, 4.0), 2: _metrics(15.0, 7.0)})
    d = accuracy.paired_difference(better, ref, "AP")
    assert d["deltas"] == [4.0, 1.0, 4.0]
    assert (d["mean"], d["std"], d["se"]) == pytest.approx((3.0, math.sqrt(3.0), 1.0))
    assert (d["low"], d["high"]) == pytest.approx((1.65, 4.0))
    assert d["verdict"] == "wins"
    # AP75 deltas +2, -1, +2: the interval starts at -1 + 0.65 * 1: no significant difference.
    d75 = accuracy.paired_difference(better, ref, "AP75")
    assert d75["low"] == pytest.approx(-0.35)
    assert d75["verdict"] == "no significant difference"
    # Only the seeds both rows have are paired; one seed gives no verdict.
    assert accuracy.paired_difference(_row("y", {1: _metrics(9.0, 5.0)}), ref, "AP")["verdict"] == "n/a (1 seed)"
    worse = _row("z", {s: _metrics(m["AP"] - 3.0 - 0.1 * s, 5.0) for s, m in ref["per_seed"].items()})
    assert accuracy.paired_difference(worse, ref, "AP")["verdict"] == "loses"
    # A difference that is the same on every seed: a zero-width interval.
    same = accuracy.paired_difference(_row("w", {s: _metrics(m["AP"] + 0.5, 5.0) for s, m in ref["per_seed"].items()}), ref, "AP")
    assert (same["low"], same["high"]) == pytest.approx((0.5, 0.5)) and same["verdict"] == "wins"
    table = accuracy.paired_table({"retinanet": ref, "x": better}, [("x", "retinanet")])
    assert "+4.00, +1.00, +4.00" in table and "+3.00 (1.00) [+1.65, +4.00]" in table and "| wins |" in table
    assert "| retinanet, p, default |" in table


def test_comparison_pairs_match_post_processing_and_target_gradient():
    rows = {}
    for key, model, pp in [("retinanet", "retinanet", "default"), ("retinanet/official", "retinanet", "official"),
                           ("iou_aware", "iou_aware", "default"), ("iou_aware/official", "iou_aware", "official"),
                           ("target_gradient_off", "target_gradient_off", "default")]:  # fmt: skip
        rows[key] = _row(model, {0: _metrics(1.0, 1.0)}, postprocess=pp)
        rows[key]["reference"] = None if model == "retinanet" else accuracy.scoring_key("retinanet", pp)
    pairs = accuracy.comparison_pairs(rows)
    assert pairs["baseline"] == [("iou_aware", "retinanet"), ("iou_aware/official", "retinanet/official"),
                                 ("target_gradient_off", "retinanet")]  # fmt: skip
    assert pairs["gradient"] == [("iou_aware", "target_gradient_off")]  # the official one has no partner
    assert pairs["official"] == [("retinanet/official", "retinanet"), ("iou_aware/official", "iou_aware")]


# ------------------------------------------------------------------ rescoring a hand-made image


class _Model:
    box_coder = BoxCoder()
    inference_config = InferenceConfig(alpha=0.5, score_thresh=0.0, nms_thresh=0.5)
    iou_aware = True


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


def test_predictor_statistics_of_a_hand_made_image_by_hand():
    """Two detections: the exact box (IoU_eval 1, the only one matched) and the shifted one (1/3)."""
    wrong = accuracy.predictor_stats([_image([0.2, 0.9])], _Model())  # the branch prefers the shifted box
    assert (wrong["detections"], wrong["matched"]) == (2.0, 1.0)
    # Two points: every correlation is +-1. S = sqrt(p * IoU) = [sqrt(0.1), 0.9] against IoU_eval [1, 1/3].
    assert wrong["all_pearson_S"] == pytest.approx(-1.0) and wrong["all_spearman_S"] == pytest.approx(-1.0)
    assert wrong["all_pearson_p"] == pytest.approx(-1.0)  # p = [0.5, 0.9]
    assert math.isnan(wrong["matched_pearson_S"])  # one matched detection: undefined
    assert wrong["matched_iou_mae"] == pytest.approx(0.8)  # |0.2 - 1|
    assert (wrong["positives"], wrong["positives_mae"]) == (1.0, pytest.approx(0.8))
    right = accuracy.predictor_stats([_image([0.9, 0.2])], _Model())  # S = [sqrt(0.45), sqrt(0.18)]: now S ranks right
    assert right["all_pearson_S"] == pytest.approx(1.0) and right["all_pearson_p"] == pytest.approx(-1.0)
    verdict = accuracy.s_against_p({0: right, 1: right, 2: right}, "all_pearson")
    assert verdict["values"] == pytest.approx([2.0, 2.0, 2.0]) and verdict["verdict"] == "S correlates better"
    worse = {"all_pearson_S": -1.0, "all_pearson_p": 1.0}  # a seed where S ranks wrong and p right
    mixed = accuracy.s_against_p({0: worse, 1: right}, "all_pearson")
    assert mixed["values"] == [-2.0, 2.0] and mixed["verdict"] == "no significant difference"
    assert accuracy.s_against_p({0: right, 1: right}, "all_pearson")["verdict"] == "S correlates better"
    assert accuracy.s_against_p({0: worse, 1: worse}, "all_pearson")["verdict"] == "p correlates better"
    table = accuracy.predictor_table({"iou_aware": {0: wrong, 1: right}})
    assert "| iou_aware | matched detections: mean |predicted IoU - IoU_eval| | 0.800, 0.100 |" in table


def test_iou_calibration_of_positive_anchors_by_hand():
    # Anchor 0 is the GT itself (true IoU 1), anchor 1 has IoU 1/3 < 0.5: not a positive.
    cal = accuracy.iou_calibration([_image([0.75, 0.9])], _Model())
    assert cal["n"] == 1
    assert cal["mae"] == pytest.approx(0.25)  # |0.75 - 1|
    assert cal["bins"][0]["mean_true"] == pytest.approx(1.0)


# ------------------------------------------------------------------ the plan


def test_plan_is_the_main_schedule_with_five_and_three_seeds(tmp_path):
    plan = accuracy.study_plan(list(accuracy.TRAINED), None)
    counts = {name: sum(1 for n, _ in plan if n == name) for name in accuracy.TRAINED}
    assert counts == {"retinanet": 5, "iou_aware": 5, "target_gradient_off": 5, "topk": 3, "atss": 3, "noisy_anchor": 3,
                      "hambox": 3, "task_aligned": 3, "retinanet_hard": 3, "iou_aware_hard": 3}  # fmt: skip
    assert plan[:3] == [("retinanet", 0), ("iou_aware", 0), ("target_gradient_off", 0)]  # seed by seed
    assert plan[-3:] == [("retinanet", 4), ("iou_aware", 4), ("target_gradient_off", 4)]
    assert accuracy.study_plan(["topk"], [7]) == [("topk", 7)]
    with pytest.raises(ValueError, match="unknown --configs"):
        accuracy.study_plan(["nope"], None)
    main_job = accuracy.get_cfg()
    main_job.merge_from_file(str(accuracy.CONFIG_DIR / "iou_aware_retinanet.yaml"))
    for name in accuracy.TRAINED:
        cfg = accuracy.study_cfg(name, 3, None, tmp_path, [], accuracy.CONFIG_DIR)
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS) == (
            main_job.SOLVER.MAX_ITER, main_job.SOLVER.STEPS, main_job.SOLVER.WARMUP_ITERS)
        assert cfg.SEED == 3 and cfg.OUTPUT_DIR == str(tmp_path / "runs" / name / "seed3")
        assert cfg.MODEL.IOU_AWARE.ENABLED == (name not in ("retinanet", "retinanet_hard"))
        assert cfg.DATASETS.TRAIN == (("shapes_hard_train",) if name.endswith("_hard") else ("shapes_train",))
    short = accuracy.study_cfg("iou_aware", 0, 2000, tmp_path, [], accuracy.CONFIG_DIR)
    assert (short.SOLVER.MAX_ITER, short.SOLVER.STEPS, short.SOLVER.WARMUP_ITERS) == (2000, (1400, 1800), 285)


def test_list_prints_the_plan_and_trains_nothing(tmp_path, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("--list trained a model")

    monkeypatch.setattr(accuracy, "train", no_training)
    final = tmp_path / "runs" / "iou_aware" / "seed2" / "model_final.pth"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"")
    result = accuracy.main(["--list", "--output-dir", str(tmp_path)])
    assert len(result["plan"]) == 36
    text = capsys.readouterr().out
    assert "36 models (35 to train, 1 trained)" in text
    assert "| iou_aware | iou_aware_retinanet.yaml | shapes_train | 0, 1, 2, 3, 4 | 4500 |" in text
    assert "4 to train, 1 trained" in text
    # 30 models at 128 px and 6 at 256 px (four times the pixels), minus the trained one.
    per_model = 4500 * accuracy.SECONDS_PER_ITERATION / 60 + accuracy.EVALUATION_MINUTES
    hard = 4500 * accuracy.SECONDS_PER_ITERATION * 4 / 60 + accuracy.EVALUATION_MINUTES
    assert f"estimated {(29 * per_model + 6 * hard) / 60:.1f} h" in text


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="--shard"):
        accuracy.main(["--shard", "2/2"])
    with pytest.raises(ValueError, match="--processes"):
        accuracy.main(["--processes", "2", "--shard", "0/2"])
    with pytest.raises(ValueError, match="KEY VALUE"):
        accuracy.main(["--list", "SOLVER.BASE_LR"])


# ------------------------------------------------------------------ tiny end-to-end runs


def test_tiny_study_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the correlation plot needs matplotlib (the 'analysis' extra)")
    monkeypatch.setenv("IOU_AWARE_RETINANET_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "study"
    summary = accuracy.main(["--configs", "retinanet", "iou_aware", "--seeds", "0", "1", "--iters", "10",
                             "--output-dir", str(out), *MINI])  # fmt: skip
    rows = summary["rows"]
    sweep = [accuracy.scoring_key("iou_aware", pp, None if a == 0.5 else accuracy.alpha_name(a))
             for pp in accuracy.POSTPROCESSINGS for a in accuracy.ALPHAS]  # fmt: skip
    assert list(rows) == ["retinanet", "retinanet/official", *sweep, "iou_aware/truth"]
    assert all(len(row["per_seed"]) == 2 for row in rows.values())
    for row in rows.values():
        for metrics in row["per_seed"].values():
            assert set(metrics) == set(accuracy.STUDY_METRICS)
            assert 0 <= metrics["dets/img"] <= 100
    assert rows["iou_aware/official"]["reference"] == "retinanet/official"
    assert [c["label"].split(":")[0] for c in summary["correlation"]] == [
        "baseline RetinaNet", "IoU-aware, p alone", "IoU-aware", "IoU-aware"
    ]  # fmt: skip
    assert (out / "correlation.png").stat().st_size > 0
    assert (out / "calibration.png").stat().st_size > 0
    assert summary["calibration"]["n"] > 0 and 0.0 <= summary["calibration"]["mae"] <= 1.0
    assert set(summary["predictor"]) == {"retinanet", "iou_aware"}
    assert "positives_mae" in summary["predictor"]["iou_aware"][0] and "positives_mae" not in summary["predictor"]["retinanet"][0]
    assert set(summary["data_fingerprints"]) == {"shapes_mini_train", "shapes_mini_val"}
    assert summary["environment"]["cpu"] and summary["environment"]["opencv"]
    text = (out / "accuracy.md").read_text()
    assert summary["data_fingerprints"]["shapes_mini_val"][:16] in text
    assert text.count("| iou_aware | S, alpha 0.5 | official | retinanet, p, official |") == 1
    assert "Alpha sweep of iou_aware" in text and "Does S correlate" in text
    saved = json.loads((out / "accuracy.json").read_text())
    assert saved["seeds"] == {"retinanet": [0, 1], "iou_aware": [0, 1]} and saved["iterations"] == [10]
    # A rerun reuses the trained models instead of training again.
    mtime = (out / "runs" / "iou_aware" / "seed0" / "model_final.pth").stat().st_mtime
    accuracy.main(["--configs", "iou_aware", "--seeds", "0", "--iters", "10", "--output-dir", str(out), *MINI])
    assert (out / "runs" / "iou_aware" / "seed0" / "model_final.pth").stat().st_mtime == mtime


def test_shards_split_the_plan_and_only_trained_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("IOU_AWARE_RETINANET_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "study"
    common = ["--configs", "retinanet", "--seeds", "0", "3", "--iters", "10", "--output-dir", str(out), *MINI]
    shard = accuracy.main(["--shard", "1/2", *common])
    assert shard["models"] == ["retinanet/seed3"]  # plan [(retinanet, 0), (retinanet, 3)], every 2nd from the 1st
    assert not (out / "runs" / "retinanet" / "seed0").exists() and not (out / "accuracy.md").exists()
    summary = accuracy.main(["--only-trained", *common])
    assert summary["missing"] == ["retinanet/seed0"]
    assert list(summary["rows"]["retinanet"]["per_seed"]) == [3]
    assert not (out / "runs" / "retinanet" / "seed0").exists()
    assert "Not trained yet" in (out / "accuracy.md").read_text()
    # The same folder for a study of another length: its models would silently stand for others.
    with pytest.raises(ValueError, match="SOLVER.MAX_ITER differs"):
        accuracy.main(["--only-trained", *common[:6], "20", *common[7:]])


def test_two_processes_side_by_side_then_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("IOU_AWARE_RETINANET_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "study"
    summary = accuracy.main(["--processes", "2", "--configs", "retinanet", "topk", "--seeds", "0", "--iters", "10",
                             "--output-dir", str(out), *MINI])  # fmt: skip
    assert set(summary["rows"]) == {"retinanet", "retinanet/official", "topk", "topk/official"}
    for i, name in enumerate(["retinanet", "topk"]):
        assert (out / "runs" / name / "seed0" / accuracy.EVAL_CACHE).is_file()
        assert f"Shard {i}/2: 1 models trained" in (out / f"shard{i}.log").read_text()
    assert summary["missing"] == []


def test_each_model_is_evaluated_once(tmp_path, monkeypatch):
    """A rerun takes a model's rows from its study_eval.json; new weights invalidate them."""
    monkeypatch.setenv("IOU_AWARE_RETINANET_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "study"
    argv = ["--configs", "topk", "--seeds", "0", "--iters", "10", "--output-dir", str(out), *MINI]
    first = accuracy.main(argv)
    assert (out / "runs" / "topk" / "seed0" / accuracy.EVAL_CACHE).is_file()

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(accuracy, "load_model", no_evaluation)
    again = accuracy.main(argv)
    assert json.dumps(again["rows"]) == json.dumps(first["rows"])  # NaN == NaN as text
    assert json.dumps(again["predictor"]) == json.dumps(first["predictor"])
    weights = out / "runs" / "topk" / "seed0" / "model_final.pth"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "retrained"
    with pytest.raises(AssertionError, match="evaluated again"):
        accuracy.main(argv)
