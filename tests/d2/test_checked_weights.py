"""The Detectron2 path reads checkpoints without running code, whatever torch's default, and refuses
weights that do not fit the model (train_net.py --eval-only / --resume / MODEL.WEIGHTS, the demo)."""
import os
import runpy

import cv2
import numpy as np
import pytest
import torch

from .helpers import D2_MISSING_REASON, REPO

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

from iou_aware_retinanet.d2 import demo  # noqa: E402
from iou_aware_retinanet.d2.entry import CheckedCheckpointer, setup_project_cfg  # noqa: E402
from iou_aware_retinanet.weights_fit import WeightsMismatchError  # noqa: E402

SHAPES = os.path.join(REPO, "configs", "Shapes", "iou_aware_retinanet.yaml")


class _WritesAMarker:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code in a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _train_net():
    return runpy.run_path(os.path.join(REPO, "train_net.py"), run_name="train_net")


def _args(tmp_path, *extra):
    return _train_net()["get_parser"]().parse_args(
        ["--config-file", SHAPES, *extra, "DATASETS.TEST", "()", "DATASETS.TRAIN", "()", "OUTPUT_DIR", str(tmp_path / "out")]
    )


def _d2_model(cfg):
    from detectron2.modeling import build_model

    return build_model(cfg)


@pytest.fixture
def d2_weights(tmp_path):
    cfg = setup_project_cfg(SHAPES, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    path = tmp_path / "d2_model.pth"
    torch.save({"model": _d2_model(cfg).state_dict(), "iteration": 9}, str(path))
    return path


@pytest.fixture
def torchvision_weights(tmp_path):
    """A torchvision-engine checkpoint of the same config: none of its names is Detectron2's."""
    from iou_aware_retinanet.tv import build_model
    from iou_aware_retinanet.tv.checkpoint import save_checkpoint
    from iou_aware_retinanet.tv.cli import setup_cfg

    path = tmp_path / "tv_model_final.pth"
    save_checkpoint(build_model(setup_cfg(SHAPES)), str(path))
    return path


@pytest.mark.parametrize("force_old_default", [False, True])
def test_eval_only_never_runs_code_from_a_checkpoint(tmp_path, monkeypatch, d2_weights, force_old_default):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 gives torch 2.0-2.5's default (unpickle anything)."""
    if force_old_default:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code_ran"
    evil = tmp_path / "model_final.pth"
    state = torch.load(str(d2_weights), weights_only=True)
    torch.save({**state, "payload": _WritesAMarker(marker)}, str(evil))
    with pytest.raises(RuntimeError, match=r"model_final\.pth.*weights_only=True"):
        _train_net()["main"](_args(tmp_path, "--eval-only", "MODEL.WEIGHTS", str(evil), "MODEL.DEVICE", "cpu"))
    assert not marker.exists()
    # The same through the demo, and through a resume of a run whose last checkpoint is the payload.
    with pytest.raises(RuntimeError, match="weights_only=True"):
        demo.build_predictor(setup_project_cfg(SHAPES, ["MODEL.WEIGHTS", str(evil), "MODEL.DEVICE", "cpu"]))
    model = _d2_model(setup_project_cfg(SHAPES, ["MODEL.DEVICE", "cpu"]))
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(RuntimeError, match="weights_only=True"):
        CheckedCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert not marker.exists()


def test_eval_only_and_demo_refuse_a_torchvision_checkpoint(tmp_path, torchvision_weights):
    with pytest.raises(WeightsMismatchError, match=r"tv_model_final\.pth does not fit this model: 136 of the model's 138"):
        _train_net()["main"](_args(tmp_path, "--eval-only", "MODEL.WEIGHTS", str(torchvision_weights), "MODEL.DEVICE", "cpu"))
    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(WeightsMismatchError, match="does not fit this model"):
        demo.main(["--config-file", SHAPES, "--input", str(image), "--output", str(tmp_path / "drawn"),
                   "--opts", "MODEL.WEIGHTS", str(torchvision_weights), "MODEL.DEVICE", "cpu"])  # fmt: skip
    assert not (tmp_path / "drawn").exists() or not os.listdir(tmp_path / "drawn")
    # Initialising a training run: a partial fit is fine (e.g. ImageNet weights), none is refused.
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict()}, str(unrelated))
    model = _d2_model(setup_project_cfg(SHAPES, ["MODEL.DEVICE", "cpu"]))
    with pytest.raises(WeightsMismatchError, match=r"unrelated\.pth.*none of the model's.*Nothing of it would initialise"):
        CheckedCheckpointer(model).resume_or_load(str(unrelated), resume=False)


def test_weights_of_another_num_classes_are_refused_naming_the_tensor(tmp_path, d2_weights):
    model = _d2_model(setup_project_cfg(SHAPES, ["MODEL.DEVICE", "cpu", "MODEL.RETINANET.NUM_CLASSES", "7"]))
    with pytest.raises(WeightsMismatchError, match=r"d2_model\.pth.*head\.cls_score\.\w+: \(.*NUM_CLASSES"):
        CheckedCheckpointer(model, require_all=True).load(str(d2_weights), checkpointables=[])
    # A resume restores everything: the same refusal without require_all.
    (tmp_path / "last_checkpoint").write_text("d2_model.pth")
    model = _d2_model(setup_project_cfg(SHAPES, ["MODEL.DEVICE", "cpu", "MODEL.RETINANET.NUM_CLASSES", "7"]))
    with pytest.raises(WeightsMismatchError, match="NUM_CLASSES"):
        CheckedCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    # Partly fitting weights still initialise a training run (the mismatched head is left out).
    model = _d2_model(setup_project_cfg(SHAPES, ["MODEL.DEVICE", "cpu", "MODEL.RETINANET.NUM_CLASSES", "7"]))
    CheckedCheckpointer(model).resume_or_load(str(d2_weights), resume=False)
    # And weights that fit load, for evaluation too.
    model = _d2_model(setup_project_cfg(SHAPES, ["MODEL.DEVICE", "cpu"]))
    CheckedCheckpointer(model, require_all=True).load(str(d2_weights), checkpointables=[])
    reference = torch.load(str(d2_weights), weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
