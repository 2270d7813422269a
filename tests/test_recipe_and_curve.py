"""The recipe search (probe configs, reuse of finished probes) and the learning-curve reader."""
import json

import pytest

from iou_aware_retinanet.data.synthetic import SHAPES_PRESETS, ShapesSpec, shapes_preset
from iou_aware_retinanet.studies import recipe
from iou_aware_retinanet.tv.evaluation import curve_table, evaluation_points


def test_presets_name_the_two_difficulties():
    assert shapes_preset("hard") == ShapesSpec()  # the hard data: ShapesSpec's defaults
    standard = shapes_preset("standard")
    assert standard.image_size == (128, 128) and standard.max_clutter == 0 and standard.min_object_size == 16.0
    with pytest.raises(ValueError, match="standard"):
        shapes_preset("easy")
    assert set(SHAPES_PRESETS) == {"standard", "hard"}


def test_probe_config_applies_the_data_variant_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("IOU_AWARE_RETINANET_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setitem(
        recipe.DATA, "tiny", recipe.DataVariant("tiny_train", "tiny_val", ShapesSpec(image_size=64, min_object_size=8.0), 3, 2)
    )
    probe = recipe.Probe("p", "what", ("SOLVER.BASE_LR", "0.02"), "tiny")
    cfg = recipe.probe_cfg(probe, tmp_path / "out")
    assert cfg.SOLVER.BASE_LR == 0.02
    assert cfg.DATASETS.TRAIN == ("tiny_train",) and cfg.DATASETS.TEST == ("tiny_val",)
    names = [entry[0] for entry in cfg.DATASETS.COCO_INSTANCES]
    assert names == ["tiny_train", "tiny_val"]
    assert all(json.load(open(entry[1]))["images"] for entry in cfg.DATASETS.COCO_INSTANCES)
    assert cfg.OUTPUT_DIR == str(tmp_path / "out" / "p") and cfg.TEST.EVAL_PERIOD == 0
    with pytest.raises(ValueError, match="unknown data variant"):
        recipe.probe_cfg(recipe.Probe("q", "", (), "nope"), tmp_path)


def test_finished_probes_are_reused_and_tabled(tmp_path):
    result = {"probe": "x_v128_lr04", "what": "", "data": "v128", "opts": [], "iterations": 2000, "ims_per_batch": 8,
              "threads": 1, "wall_s": 246.0, "metrics": {"AP": 11.09, "AP50": 23.44, "AP75": 9.11, "APs": 11.56,
                                                         "APm": 12.14, "APl": float("nan")}}  # fmt: skip
    (tmp_path / "x_v128_lr04").mkdir()
    (tmp_path / "x_v128_lr04" / "result.json").write_text(json.dumps(result))
    probe = next(p for p in recipe.PROBES if p.name == "x_v128_lr04")
    assert recipe.run_probe(probe, tmp_path) == json.loads(json.dumps(result))  # no training
    row = recipe.table([result]).splitlines()[2]
    assert "| x_v128_lr04 | LR 0.04 | v128 | 2000 x 8 | 1 | 4.1 | 11.1 | 23.4 | 9.1 |" in row


def test_learning_curve_points_from_metrics_records():
    records = [
        {"iteration": 19, "total_loss": 2.0},
        {"iteration": 999, "bbox/AP": 11.0, "bbox/AP50": 26.3, "bbox/AP75": 6.4},
        {"iteration": 1019, "total_loss": 1.5},
        {"iteration": 1999, "bbox/AP": 27.3, "bbox/AP50": 53.3, "bbox/AP75": 24.6},
    ]
    points = evaluation_points(records)
    assert [(p["iteration"], p["AP"]) for p in points] == [(1000, 11.0), (2000, 27.3)]
    assert curve_table(points).splitlines()[3] == "| 2000 | 27.3 | 53.3 | 24.6 |"
    two = [{"iteration": 9, "a/bbox/AP": 1.0, "a/bbox/AP50": 2.0, "a/bbox/AP75": 0.5,
            "b/bbox/AP": 3.0, "b/bbox/AP50": 4.0, "b/bbox/AP75": 2.5}]  # fmt: skip
    assert evaluation_points(two, "b")[0]["AP"] == 3.0 and evaluation_points(two)[0]["AP"] == 1.0
