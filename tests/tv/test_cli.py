"""``python -m iou_aware_retinanet {train,eval,predict}``: argument handling and a tiny run of each command."""
import json
import os
import subprocess
import sys

import cv2
import pytest
from pycocotools.coco import COCO

from iou_aware_retinanet.tv.cli import main

from .engine_helpers import SHAPES_CONFIG, fresh_datasets_root, tiny_opts  # noqa: F401 (autouse fixture)
from .helpers import REPO


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``train`` through the CLI: (output dir, KEY VALUE opts, results)."""
    out = tmp_path_factory.mktemp("cli_train")
    opts = tiny_opts(out, max_iter=4)
    results = main(["train", "--config-file", SHAPES_CONFIG, *opts])
    return out, opts, results


def test_train_then_eval_reproduces_the_metrics(trained, capsys):
    out, opts, train_results = trained
    assert os.path.isfile(out / "model_final.pth") and os.path.isfile(out / "config.yaml")
    assert set(train_results) == {"shapes_mini_val"}
    results = main(["eval", "--config-file", SHAPES_CONFIG, *opts])  # OUTPUT_DIR/model_final.pth
    assert results["shapes_mini_val"]["bbox"] == pytest.approx(train_results["shapes_mini_val"]["bbox"], nan_ok=True)
    results = main(["eval", "--config-file", SHAPES_CONFIG, "--weights", str(out / "model_0000002.pth"), *opts])
    assert set(results["shapes_mini_val"]["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert os.path.isfile(out / "inference" / "config.yaml")


def _val_images(n):
    from iou_aware_retinanet.data.builtin import builtin_dataset_paths

    _, image_root = builtin_dataset_paths("shapes_mini_val")
    return [os.path.join(image_root, f"{i:06d}.png") for i in range(n)]


def test_predict_folder_and_single_file(trained, tmp_path, capsys):
    out, opts, _ = trained
    inputs = _val_images(2)
    coco = main(["predict", "--config-file", SHAPES_CONFIG, "--input", *inputs, "--output", str(tmp_path / "drawn"),
                 "--min-score", "0.0", *opts])  # fmt: skip
    printed = capsys.readouterr().out
    for path in inputs:
        drawn = tmp_path / "drawn" / os.path.basename(path)
        assert cv2.imread(str(drawn)).shape == (128, 128, 3)  # the standard shapes size
        assert f"{path}: " in printed and "detections" in printed
    predictions = tmp_path / "drawn" / "predictions.json"
    assert json.load(open(predictions)) == coco
    index = COCO(str(predictions))  # a valid COCO file, scores included
    assert [c["name"] for c in index.loadCats(index.getCatIds())] == ["rectangle", "ellipse", "triangle", "cross"]
    assert len(index.getImgIds()) == 2
    assert coco["annotations"] and all("score" in a and "pred_iou" in a for a in coco["annotations"])

    main(["predict", "--config-file", SHAPES_CONFIG, "--input", inputs[0], "--output", str(tmp_path / "one.png"),
          "--min-score", "1.0", *opts])  # fmt: skip
    assert cv2.imread(str(tmp_path / "one.png")) is not None
    assert json.load(open(tmp_path / "one.json"))["annotations"] == []
    assert "0 detections" in capsys.readouterr().out


def test_predict_bad_inputs_are_named(trained, tmp_path):
    out, opts, _ = trained
    missing = str(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        main(["predict", "--config-file", SHAPES_CONFIG, "--input", missing, "--output", str(tmp_path / "o"), *opts])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    with pytest.raises(OSError, match="broken.png"):
        main(["predict", "--config-file", SHAPES_CONFIG, "--input", str(broken), "--output", str(tmp_path / "o"), *opts])


def test_eval_without_weights_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_final.pth"):
        main(["eval", "--config-file", SHAPES_CONFIG, *tiny_opts(tmp_path)])


def test_argument_errors(tmp_path):
    with pytest.raises(SystemExit):
        main([])  # no command
    with pytest.raises(SystemExit):
        main(["train"])  # no --config-file
    with pytest.raises(SystemExit):
        main(["fit", "--config-file", SHAPES_CONFIG])
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        main(["train", "--config-file", str(tmp_path / "no_such.yaml")])
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        main(["train", "--config-file", SHAPES_CONFIG, "SOLVER.MAX_ITER"])
    with pytest.raises(KeyError, match="SOLVER.NO_SUCH_KEY"):
        main(["train", "--config-file", SHAPES_CONFIG, "SOLVER.NO_SUCH_KEY", "1"])
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP"):
        main(["train", "--config-file", SHAPES_CONFIG, *tiny_opts(tmp_path), "INPUT.RANDOM_FLIP", "vertical"])


def test_module_entry_point_help():
    run = subprocess.run(
        [sys.executable, "-m", "iou_aware_retinanet", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "train" in run.stdout and "predict" in run.stdout
