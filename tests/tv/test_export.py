"""Export with post-processing inside: the ONNX graph (run by onnxruntime) and the TorchScript
trace give the PyTorch model's detections, for images of other sizes than the trace's."""
import numpy as np
import pytest
import torch

from iou_aware_retinanet.tv import build_model
from iou_aware_retinanet.tv.cli import main
from iou_aware_retinanet.tv.export import OUTPUT_NAMES, ExportableDetector, export_model

from .helpers import tiny_cfg, scramble_head

# Sizes the model resizes differently (the test size is 96 x 128); the trace sees the first.
SIZES = [(96, 128), (120, 90), (64, 200)]


def _model(iou_aware=True):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(["MODEL.IOU_AWARE.ENABLED", iou_aware, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.3]))
    scramble_head(model)
    return model.eval()


def _images(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=gen) for h, w in SIZES]


def _assert_same(got, expected):
    boxes, scores, labels, cls_scores, ious = (torch.as_tensor(np.asarray(x)) for x in got)
    assert len(expected[0]) > 5, "a test needs detections"
    assert boxes.shape == expected[0].shape
    torch.testing.assert_close(boxes, expected[0], rtol=0, atol=1e-3)  # pixels
    torch.testing.assert_close(scores, expected[1], rtol=0, atol=1e-4)
    assert torch.equal(labels.long(), expected[2].long())
    torch.testing.assert_close(cls_scores, expected[3], rtol=0, atol=1e-4)
    torch.testing.assert_close(ious, expected[4], rtol=0, atol=1e-4)


@pytest.mark.parametrize("iou_aware", [True, False])
def test_onnx_export_matches_pytorch(tmp_path, iou_aware):
    ort = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
    pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")
    model = _model(iou_aware)
    path = export_model(model, torch.rand(3, *SIZES[0]), str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    wrapper = ExportableDetector(model)
    for image in _images():
        with torch.no_grad():
            expected = wrapper(image)
        _assert_same(session.run(None, {"image": image.numpy()}), expected)
    if not iou_aware:
        assert bool((torch.as_tensor(session.run(None, {"image": image.numpy()})[4]) == 1).all())


def test_torchscript_export_matches_pytorch(tmp_path):
    model = _model()
    path = export_model(model, torch.rand(3, *SIZES[0]), str(tmp_path / "model.ts"), "torchscript")
    loaded = torch.jit.load(path)
    wrapper = ExportableDetector(model)
    for image in _images():
        with torch.no_grad():
            _assert_same([t.numpy() for t in loaded(image)], wrapper(image))


def test_export_command_and_bad_format(tmp_path):
    pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")
    from .engine_helpers import SHAPES_CONFIG

    weights = tmp_path / "w.pth"
    from iou_aware_retinanet.tv.cli import setup_cfg
    from iou_aware_retinanet.tv.checkpoint import save_checkpoint

    cfg = setup_cfg(SHAPES_CONFIG, ["OUTPUT_DIR", str(tmp_path / "run")])
    save_checkpoint(build_model(cfg), str(weights))
    out = main(["export", "--config-file", SHAPES_CONFIG, "--weights", str(weights), "OUTPUT_DIR", str(tmp_path / "run")])
    assert out == str(tmp_path / "run" / "model.onnx") and (tmp_path / "run" / "model.onnx").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["export", "--config-file", SHAPES_CONFIG, "--format", "tflite"])
    with pytest.raises(ValueError, match="--format"):
        export_model(build_model(cfg).eval(), torch.rand(3, 128, 128), str(tmp_path / "x"), "tflite")
