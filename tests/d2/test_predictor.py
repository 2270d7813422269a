"""DefaultPredictor round trip and the demo script."""
import os

import numpy as np
import pytest

from .helpers import D2_MISSING_REASON, project_cfg, scramble_head

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

import cv2  # noqa: E402
import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from iou_aware_retinanet.d2 import demo  # noqa: E402


@pytest.fixture
def checkpoint(tmp_path):
    cfg = project_cfg(opts=["MODEL.RETINANET.SCORE_THRESH_TEST", 0.05])
    torch.manual_seed(0)
    model = build_model(cfg)
    scramble_head(model)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    return cfg, model


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 255, (120, 150, 3), dtype=np.uint8)


def test_default_predictor_round_trip(checkpoint):
    cfg, model = checkpoint
    predictor = DefaultPredictor(cfg)
    image = _image()
    instances = predictor(image)["instances"]
    assert len(instances) > 0
    assert instances.has("pred_ious") and instances.has("cls_scores")
    assert instances.image_size == (120, 150)  # boxes are in the input image's frame

    # Same weights, same image, called directly: same detections.
    model.eval()
    with torch.no_grad():
        direct = model([{"image": torch.as_tensor(image.transpose(2, 0, 1).astype("float32")),
                         "height": 120, "width": 150}])[0]["instances"]
    torch.testing.assert_close(instances.scores, direct.scores)
    torch.testing.assert_close(instances.pred_ious, direct.pred_ious)


def test_demo_draws_detections(checkpoint, tmp_path):
    cfg, _ = checkpoint
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(cfg.dump())
    image_path = tmp_path / "in.png"
    cv2.imwrite(str(image_path), _image(1))
    out_path = tmp_path / "out.png"
    demo.main(["--config-file", str(config_file), "--input", str(image_path),
               "--output", str(out_path), "--min-score", "0.0"])
    drawn = cv2.imread(str(out_path))
    assert drawn.shape == (120, 150, 3)
    assert not np.array_equal(drawn, cv2.imread(str(image_path)))  # something was drawn


def test_demo_missing_input_is_a_clear_error(checkpoint, tmp_path):
    cfg, _ = checkpoint
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(cfg.dump())
    with pytest.raises(FileNotFoundError, match="no image matches"):
        demo.main(["--config-file", str(config_file), "--input", str(tmp_path / "nope.png"),
                   "--output", str(tmp_path / "o.png")])
