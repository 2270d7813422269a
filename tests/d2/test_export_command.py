"""python -m iou_aware_retinanet.d2.export: one test per export method and format, and
what it refuses to overwrite."""
import os

import pytest

from .helpers import D2_MISSING_REASON, project_cfg, scramble_head

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402

from iou_aware_retinanet.d2.export import main, output_fields, scripted_to_instances, traced_output_names  # noqa: E402
from iou_aware_retinanet.weights_fit import WeightsMismatchError  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model's config file and weights (a scrambled head stands in for training)."""
    root = tmp_path_factory.mktemp("run")
    cfg = project_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 96  # the random example image's size
    torch.manual_seed(0)
    model = build_model(cfg)
    scramble_head(model)
    DetectionCheckpointer(model, save_dir=str(root)).save("model_final")
    config_file = root / "config.yaml"
    config_file.write_text(cfg.dump())
    return str(config_file), str(root / "model_final.pth"), model.eval()


def _image(size=(112, 144)):
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, *size, generator=g) * 255


def _run(trained, tmp_path, *args, weights=None):
    config_file, default_weights, _ = trained
    return main(["--config-file", config_file, "--output", str(tmp_path / "exported"), *args,
                 "MODEL.WEIGHTS", default_weights if weights is None else weights])  # fmt: skip


def _expected(model, image):
    with torch.no_grad():
        instances = model([{"image": image}])[0]["instances"]
    assert len(instances) > 0
    return {name: (instances.get(name).tensor if name == "pred_boxes" else instances.get(name)) for name in output_fields(model)}


def _assert_matches(actual: dict, expected: dict):
    for name, value in expected.items():
        if name == "pred_classes":
            assert torch.equal(actual[name], value), name
        else:
            torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-3, msg=name)


def test_scripting_to_torchscript(trained, tmp_path):
    path = _run(trained, tmp_path, "--export-method", "scripting", "--format", "torchscript")
    assert path == str(tmp_path / "exported" / "model.ts")
    model = trained[2]
    image = _image()
    with torch.no_grad():
        out = torch.jit.load(path)([{"image": image}])[0]
    # Before Detectron2's detector_postprocess, as Detectron2's scripted RetinaNet: applied here.
    instances = detector_postprocess(scripted_to_instances(out, output_fields(model)), *image.shape[1:])
    actual = {name: instances.get(name) for name in output_fields(model)}
    actual["pred_boxes"] = actual["pred_boxes"].tensor
    _assert_matches(actual, _expected(model, image))


def test_tracing_to_torchscript(trained, tmp_path):
    path = _run(trained, tmp_path, "--export-method", "tracing", "--format", "torchscript")
    assert path.endswith("model.ts")
    model = trained[2]
    image = _image()  # not the trace's example size
    with torch.no_grad():
        outputs = dict(zip(traced_output_names(model), torch.jit.load(path)(image)))
    _assert_matches(outputs, _expected(model, image))


def test_tracing_to_onnx(trained, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the export extra: pip install -e '.[export]'")
    ort = pytest.importorskip("onnxruntime", reason="checking the ONNX file needs onnxruntime (export extra)")
    path = _run(trained, tmp_path, "--export-method", "tracing", "--format", "onnx")
    assert path.endswith("model.onnx")
    model = trained[2]
    image = _image()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outputs = dict(zip(traced_output_names(model), session.run(None, {"image": image.numpy()})))
    _assert_matches({k: torch.from_numpy(v) for k, v in outputs.items()}, _expected(model, image))


def test_sample_image_is_read_and_resized_for_the_trace(trained, tmp_path):
    import cv2

    sample = tmp_path / "sample.png"
    cv2.imwrite(str(sample), (_image((60, 80)).permute(1, 2, 0).numpy()).astype("uint8"))
    path = _run(trained, tmp_path, "--export-method", "tracing", "--sample-image", str(sample))
    model = trained[2]
    image = _image()
    with torch.no_grad():
        outputs = dict(zip(traced_output_names(model), torch.jit.load(path)(image)))
    _assert_matches(outputs, _expected(model, image))
    with pytest.raises(FileNotFoundError, match="--sample-image"):
        _run(trained, tmp_path / "other", "--sample-image", str(tmp_path / "missing.png"))


def test_an_existing_output_is_never_replaced(trained, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "model.ts").write_bytes(b"the user's file")
    with pytest.raises(FileExistsError, match="exists"):
        _run(trained, tmp_path, "--export-method", "scripting")
    assert (out / "model.ts").read_bytes() == b"the user's file"


def test_the_weights_file_is_never_replaced(trained, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    weights = out / "model.ts"
    weights.write_bytes(open(trained[1], "rb").read())
    before = weights.read_bytes()
    with pytest.raises(FileExistsError, match="is MODEL.WEIGHTS"):
        _run(trained, tmp_path, "--export-method", "tracing", weights=str(weights))
    assert weights.read_bytes() == before


def test_bad_requests_are_refused_before_anything_is_written(trained, tmp_path):
    with pytest.raises(ValueError, match="needs --export-method tracing"):
        _run(trained, tmp_path, "--export-method", "scripting", "--format", "onnx")
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        _run(trained, tmp_path, weights="")
    with pytest.raises(ValueError, match="pickle"):
        _run(trained, tmp_path, weights=str(tmp_path / "weights.pkl"))
    assert not os.path.exists(tmp_path / "exported")


def test_weights_that_do_not_fit_are_refused(trained, tmp_path):
    """Weights of another model (here without the IoU branch) would export a partly random one."""
    torch.manual_seed(0)
    other = build_model(project_cfg(opts=["MODEL.IOU_AWARE.ENABLED", False]))
    DetectionCheckpointer(other, save_dir=str(tmp_path)).save("plain_retinanet")
    with pytest.raises(WeightsMismatchError, match="iou_pred"):
        _run(trained, tmp_path, weights=str(tmp_path / "plain_retinanet.pth"))
    assert not os.path.exists(tmp_path / "exported" / "model.ts")
