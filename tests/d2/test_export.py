"""Deploying the Detectron2 model: scripting, tracing, ONNX, against eager detections."""
import pytest

from .helpers import D2_MISSING_REASON, project_cfg, scramble_head

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402

from iou_aware_retinanet.core import available_assigners  # noqa: E402
from iou_aware_retinanet.d2.export import (  # noqa: E402
    export_model,
    output_fields,
    script_model,
    scripted_to_instances,
    trace_model,
    traced_output_names,
)

# The trace's example size first; the others differ in height, width and aspect.
SIZES = [(128, 160), (96, 224), (64, 96), (160, 128)]


def _model(iou_aware=True, opts=(), scramble=True):
    torch.manual_seed(0)
    model = build_model(project_cfg(opts=["MODEL.IOU_AWARE.ENABLED", iou_aware, *opts]))
    if scramble:
        scramble_head(model)
    return model.eval()


def _image(size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, *size, generator=g) * 255


def _eager(model, image):
    with torch.no_grad():
        return model([{"image": image}])[0]["instances"]


def _assert_same_detections(actual, expected, fields):
    assert len(expected) > 0  # a comparison of empty results would prove little
    assert len(actual) == len(expected)
    for name in fields:
        a, e = actual.get(name), expected.get(name)
        if name == "pred_boxes":
            a, e = a.tensor, e.tensor
        if name == "pred_classes":
            assert torch.equal(a, e), name
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4, msg=name)


def _scripted_detections(scripted, image, fields):
    with torch.no_grad():
        out = scripted([{"image": image}])[0]
    h, w = image.shape[-2:]
    return detector_postprocess(scripted_to_instances(out, fields), h, w)  # what the eager forward applies


@pytest.mark.parametrize("iou_aware", [True, False])
def test_scripted_model_matches_eager_on_several_sizes(iou_aware):
    model = _model(iou_aware)
    scripted = script_model(model)
    fields = output_fields(model)
    assert ("pred_ious" in fields) == iou_aware
    for size in SIZES:
        image = _image(size)
        _assert_same_detections(_scripted_detections(scripted, image, fields), _eager(model, image), fields)


@pytest.mark.parametrize("assigner", available_assigners())
def test_every_assigner_scripts(assigner):
    model = _model(opts=["MODEL.ASSIGNER.NAME", assigner])
    image = _image(SIZES[1])
    _assert_same_detections(_scripted_detections(script_model(model), image, output_fields(model)), _eager(model, image), output_fields(model))


OPTION_CASES = [
    ["MODEL.IOU_AWARE.THRESHOLD_ON", "fused"],
    ["MODEL.IOU_AWARE.ALPHA", None],
    ["MODEL.IOU_AWARE.CANDIDATES", "anchors", "MODEL.IOU_AWARE.THRESHOLD_ON", "fused"],  # the official rule
]


@pytest.mark.parametrize("opts", OPTION_CASES)
def test_scripting_follows_the_inference_options(opts):
    model = _model(opts=opts)
    image = _image(SIZES[0])
    _assert_same_detections(_scripted_detections(script_model(model), image, output_fields(model)), _eager(model, image), output_fields(model))


def test_scripting_reads_a_replaced_inference_config():
    """``model.inference_config`` replaced after construction (as the benchmarks do) is what runs."""
    import dataclasses

    model = _model()
    image = _image(SIZES[0])
    before = len(_eager(model, image))
    model.inference_config = dataclasses.replace(model.inference_config, max_detections=5)
    after = _eager(model, image)
    assert before > 5 >= len(after)
    _assert_same_detections(_scripted_detections(script_model(model), image, output_fields(model)), after, output_fields(model))


def _traced_detections(traced, adapter, image):
    with torch.no_grad():
        return adapter.outputs_schema(traced(image))[0]["instances"]


@pytest.mark.parametrize("iou_aware", [True, False])
def test_trace_matches_eager_on_other_sizes(iou_aware):
    model = _model(iou_aware)
    traced, adapter = trace_model(model, [{"image": _image(SIZES[0], seed=0)}])
    for size in SIZES:
        image = _image(size)
        _assert_same_detections(_traced_detections(traced, adapter, image), _eager(model, image), output_fields(model))


@pytest.mark.parametrize("opts", OPTION_CASES[::2])
def test_trace_follows_the_inference_options(opts):
    model = _model(opts=opts)
    traced, adapter = trace_model(model, [{"image": _image(SIZES[0], seed=0)}])
    for size in SIZES[1:3]:
        image = _image(size)
        _assert_same_detections(_traced_detections(traced, adapter, image), _eager(model, image), output_fields(model))


def test_trace_of_an_image_without_detections_generalizes():
    """Traced while the example gives no detection at all: nothing of that count
    (no top-k size, no empty-NMS shortcut) may be frozen into the graph."""
    model = _model(scramble=False)
    image = _image(SIZES[0], seed=0)
    with torch.no_grad():
        model.head.cls_score.bias.fill_(-20.0)  # p ~ 2e-9 everywhere
    assert len(_eager(model, image)) == 0
    traced, adapter = trace_model(model, [{"image": image}])
    scramble_head(model)  # the trace shares the parameters, in place
    for size in SIZES[:2]:
        image = _image(size)
        _assert_same_detections(_traced_detections(traced, adapter, image), _eager(model, image), output_fields(model))


@pytest.mark.parametrize("iou_aware", [True, False])
def test_onnx_export_runs_in_onnxruntime_with_the_eager_detections(iou_aware, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the export extra: pip install -e '.[export]'")
    ort = pytest.importorskip("onnxruntime", reason="checking the ONNX file needs onnxruntime (export extra)")
    model = _model(iou_aware)
    path = export_model(model, str(tmp_path / "model.onnx"), "tracing", "onnx", [{"image": _image(SIZES[0], seed=0)}])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = traced_output_names(model)
    assert [o.name for o in session.get_outputs()] == names
    for size in SIZES:
        image = _image(size)
        expected = _eager(model, image)
        outputs = dict(zip(names, session.run(None, {"image": image.numpy()})))
        assert list(outputs["image_size"]) == list(size)
        assert len(outputs["scores"]) == len(expected) > 0
        for name in output_fields(model):
            value = expected.get(name)
            value = value.tensor if name == "pred_boxes" else value
            actual = torch.from_numpy(outputs[name])
            if name == "pred_classes":
                assert torch.equal(actual, value), name
            else:
                torch.testing.assert_close(actual, value, rtol=1e-5, atol=1e-3, msg=name)


def test_scripting_to_onnx_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs --export-method tracing"):
        export_model(_model(), str(tmp_path / "model.onnx"), "scripting", "onnx")
    assert not (tmp_path / "model.onnx").exists()
