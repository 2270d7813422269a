"""Detectron2 deployment of a model that lives on the test device: the scripted model and
the trace run there and give the eager model's detections."""
import pytest

from ..d2.helpers import D2_MISSING_REASON, project_cfg, scramble_head
from .helpers import assert_on

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402

from iou_aware_retinanet.d2.export import output_fields, script_model, scripted_to_instances, trace_model  # noqa: E402

SIZES = [(128, 160), (96, 224)]  # the trace's example first


def _model(device, iou_aware):
    torch.manual_seed(0)
    model = build_model(project_cfg(opts=["MODEL.DEVICE", str(device), "MODEL.IOU_AWARE.ENABLED", iou_aware]))
    scramble_head(model)
    return model.eval()


def _image(size, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, *size, generator=g) * 255).to(device)


def _assert_same(actual, expected, fields, device):
    assert len(expected) > 0 and len(actual) == len(expected)
    for name in fields:
        a, e = actual.get(name), expected.get(name)
        if name == "pred_boxes":
            a, e = a.tensor, e.tensor
        assert_on(device, [a])
        if name == "pred_classes":
            assert torch.equal(a, e), name
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.parametrize("iou_aware", [True, False])
def test_scripted_and_traced_model_on_device(device, iou_aware):
    model = _model(device, iou_aware)
    fields = output_fields(model)
    scripted = script_model(model)
    traced, adapter = trace_model(model, [{"image": _image(SIZES[0], device, seed=0)}])
    for size in SIZES:
        image = _image(size, device)
        with torch.no_grad():
            eager = model([{"image": image}])[0]["instances"]
            out = scripted([{"image": image}])[0]
            from_trace = adapter.outputs_schema(traced(image))[0]["instances"]
        from_script = detector_postprocess(scripted_to_instances(out, fields), *size)
        _assert_same(from_script, eager, fields, device)
        _assert_same(from_trace, eager, fields, device)
