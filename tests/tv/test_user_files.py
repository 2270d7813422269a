"""The torchvision front-end never overwrites what the user owns, and refuses weights that do not fit."""
import hashlib
import os

import pytest
import torch

from iou_aware_retinanet.tv import build_model
from iou_aware_retinanet.tv.checkpoint import save_checkpoint
from iou_aware_retinanet.tv.cli import main, setup_cfg
from iou_aware_retinanet.tv.export import check_export_output

from .engine_helpers import SHAPES_CONFIG, fresh_datasets_root  # noqa: F401 (autouse fixture)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def weights(tmp_path):
    cfg = setup_cfg(SHAPES_CONFIG, ["OUTPUT_DIR", str(tmp_path / "run")])
    torch.manual_seed(0)
    path = tmp_path / "run" / "model_final.pth"
    save_checkpoint(build_model(cfg), str(path))
    return path


def _export(weights, *extra):
    return main(["export", "--config-file", SHAPES_CONFIG, "--weights", str(weights), "--format", "torchscript",
                 *extra, "OUTPUT_DIR", str(weights.parent)])  # fmt: skip


def test_export_refuses_to_overwrite_its_weights(weights):
    before = _digest(weights)
    with pytest.raises(FileExistsError, match="input file"):
        _export(weights, "--output", str(weights))
    assert _digest(weights) == before
    link = weights.parent / "hard_link.pth"
    os.link(weights, link)  # another name for the same file
    with pytest.raises(FileExistsError, match="input file"):
        _export(weights, "--output", str(link))
    assert _digest(weights) == before


def test_export_refuses_a_user_file_but_replaces_its_own_export(weights, tmp_path):
    notes = tmp_path / "notes.ts"
    notes.write_text("my notes")
    with pytest.raises(FileExistsError, match="not an earlier torchscript export"):
        _export(weights, "--output", str(notes))
    assert notes.read_text() == "my notes"
    other_weights = tmp_path / "other.ts"
    save_checkpoint(torch.nn.Linear(2, 2), str(other_weights))  # a torch.save zip, not TorchScript
    with pytest.raises(FileExistsError, match="not an earlier torchscript export"):
        _export(weights, "--output", str(other_weights))
    out = tmp_path / "model.ts"
    assert _export(weights, "--output", str(out)) == str(out)
    assert _export(weights, "--output", str(out)) == str(out)  # its own export: replaced
    torch.jit.load(str(out))
    config = tmp_path / "my_config.yaml"
    config.write_text("_BASE_: base.yaml\n")
    with pytest.raises(FileExistsError, match="input file"):
        check_export_output(str(config), "onnx", [str(weights), str(config)])


def test_eval_never_replaces_a_users_config_in_inference(weights):
    mine = weights.parent / "inference" / "config.yaml"
    mine.parent.mkdir()
    mine.write_text("# the config I evaluated with last week\nSOLVER:\n  BASE_LR: 0.1\n")
    args = ["eval", "--config-file", SHAPES_CONFIG, "--weights", str(weights), "OUTPUT_DIR", str(weights.parent),
            "DATASETS.TEST", "('shapes_mini_val',)"]  # fmt: skip
    with pytest.raises(FileExistsError, match=r"inference/config.yaml exists and is not a config this project saved"):
        main(args)
    assert mine.read_text().startswith("# the config I evaluated with last week")


def test_metrics_with_a_line_cut_short_by_a_kill(tmp_path, caplog):
    from iou_aware_retinanet.tv.evaluation import read_metrics

    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 19, "loss": 1.5}\n{"iteration": 39, "loss": 1.2}\n{"iteration": 59, "lo')
    assert read_metrics(str(tmp_path)) == [{"iteration": 19, "loss": 1.5}, {"iteration": 39, "loss": 1.2}]
    assert "cut short" in caplog.text and str(path) in caplog.text
    path.write_text('{"iteration": 19, "loss": 1.5}\n{"iteration": 3\n{"iteration": 59, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"{path}, line 2: not a json record"):
        read_metrics(str(tmp_path))


class _WritesAMarker:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code in a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_no_checkpoint_runs_code_under_the_old_torch_default(weights, tmp_path, monkeypatch, command):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is torch 2.0-2.5's default (unpickle anything); every load
    passes weights_only=True itself, which the variable does not override."""
    from iou_aware_retinanet.tv.checkpoint import load_checkpoint

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    state = torch.load(str(weights), weights_only=True)
    torch.save({**state, "payload": _WritesAMarker(marker)}, str(evil))
    image = tmp_path / "in.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    extra = {"eval": ["DATASETS.TEST", "('shapes_mini_val',)"], "predict": [], "export": []}[command]
    flags = {"eval": [], "predict": ["--input", str(image), "--output", str(tmp_path / "drawn")],
             "export": ["--format", "torchscript", "--output", str(tmp_path / "m.ts")]}[command]  # fmt: skip
    with pytest.raises(RuntimeError, match=r"evil\.pth with torch.load\(weights_only=True\)"):
        main([command, "--config-file", SHAPES_CONFIG, "--weights", str(evil), *flags,
              "OUTPUT_DIR", str(tmp_path / "out"), *extra])  # fmt: skip
    with pytest.raises(RuntimeError, match="weights_only=True"):
        load_checkpoint(str(evil))  # what --resume reads
    assert not marker.exists()


def test_predict_replaces_only_what_an_earlier_prediction_wrote(weights, tmp_path):
    import cv2
    import numpy as np

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "street.png"), np.full((48, 64, 3), 90, np.uint8))
    out = tmp_path / "drawn"
    out.mkdir()
    mine = out / "street.png"  # the user's own photo, not an input, under the name predict would write
    mine.write_bytes(b"my photo")
    args = ["predict", "--config-file", SHAPES_CONFIG, "--weights", str(weights), "--input", str(inputs),
            "--output", str(out), "OUTPUT_DIR", str(weights.parent)]  # fmt: skip
    with pytest.raises(FileExistsError, match=r"would overwrite .*street.png, which no earlier prediction there wrote"):
        main(args)
    assert mine.read_bytes() == b"my photo" and sorted(os.listdir(out)) == ["street.png"]
    mine.unlink()
    (out / "predictions.json").write_text('{"my": "notes"}')
    with pytest.raises(FileExistsError, match="predictions.json"):
        main(args)
    (out / "predictions.json").unlink()
    main(args)
    main(args)  # its own earlier outputs: replaced
    assert sorted(os.listdir(out)) == ["predictions.json", "street.png"]
