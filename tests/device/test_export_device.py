"""Export of a model that lives on the test device: the TorchScript trace runs there and
gives the eager model's detections; the ONNX graph (run by onnxruntime on the CPU) gives
them too."""
import numpy as np
import pytest
import torch

from iou_aware_retinanet.tv import build_model
from iou_aware_retinanet.tv.export import ExportableDetector, export_model

from ..tv.helpers import scramble_head, tiny_cfg
from .helpers import assert_on

SIZES = [(96, 128), (120, 90)]  # the trace sees the first


def _model(device):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(["MODEL.DEVICE", str(device), "MODEL.RETINANET.SCORE_THRESH_TEST", 0.3]))
    scramble_head(model)
    return model.eval()


def _images(device):
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(3, h, w, generator=gen).to(device) for h, w in SIZES]


def _assert_close(got, expected):
    boxes, scores, labels = (torch.as_tensor(np.asarray(x.cpu() if torch.is_tensor(x) else x)) for x in got[:3])
    assert len(expected[0]) > 5, "a test needs detections"
    torch.testing.assert_close(boxes, expected[0].cpu(), rtol=0, atol=2e-2)
    torch.testing.assert_close(scores, expected[1].cpu(), rtol=0, atol=1e-3)
    assert torch.equal(labels.long(), expected[2].cpu().long())


def test_torchscript_trace_on_device(device, tmp_path):
    model = _model(device)
    images = _images(device)
    path = export_model(model, images[0], str(tmp_path / "model.ts"), "torchscript")
    loaded = torch.jit.load(path, map_location=device)
    wrapper = ExportableDetector(model)
    for image in images:
        with torch.no_grad():
            expected = wrapper(image)
            got = loaded(image)
        assert_on(device, list(got))
        _assert_close(got, expected)


def test_onnx_export_of_a_device_model(device, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
    pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")
    model = _model(device)
    images = _images(device)
    path = export_model(model, images[0], str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    wrapper = ExportableDetector(model)
    for image in images:
        with torch.no_grad():
            expected = wrapper(image)
        _assert_close(session.run(None, {"image": image.cpu().numpy()}), expected)
