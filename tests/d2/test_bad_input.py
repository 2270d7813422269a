"""Bad input on the Detectron2 path fails before any work, naming the file and the key, or is
repaired as on the torchvision path (the same ground truth for evaluation)."""
import os
import runpy

import cv2
import numpy as np
import pytest
import torch

from ..data.test_coco_ground_truth import perfect_detections, write_dataset
from .helpers import D2_MISSING_REASON, REPO

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from iou_aware_retinanet.d2.datasets import CheckedCOCOEvaluator, FileNamingDatasetMapper, check_8_bit  # noqa: E402
from iou_aware_retinanet.d2.datasets import register_config_datasets  # noqa: E402
from iou_aware_retinanet.d2.entry import setup_project_cfg  # noqa: E402
from iou_aware_retinanet.data.coco import load_coco_detection  # noqa: E402

SHAPES = os.path.join(REPO, "configs", "Shapes", "iou_aware_retinanet.yaml")
H_WRONG = 50  # a test image's height on disk; its annotation says 48


def _train_net():
    return runpy.run_path(os.path.join(REPO, "train_net.py"), run_name="train_net")


def _forget(name):
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)


def _register(name, json_file, root):
    _forget(name)
    cfg = setup_project_cfg(SHAPES, ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"], freeze=False)
    cfg.DATASETS.COCO_INSTANCES = [[name, json_file, root]]
    register_config_datasets(cfg)


@pytest.mark.parametrize(
    "variant",
    [{"with_area": False, "with_iscrowd": False}, {"image_ids": ("a", "b"), "category_ids": ("7", "3")}],
    ids=["no_area_no_iscrowd", "string_ids"],
)
def test_evaluator_uses_the_repaired_ground_truth(tmp_path, variant):
    """Detectron2's COCOEvaluator reads the raw json: KeyError 'area' after training, and the
    unclipped box; the project's evaluator scores the same perfect detector 100, as the
    torchvision path does."""
    name = f"bad_input_{tmp_path.name}"
    json_file, root = write_dataset(str(tmp_path), **variant)
    _register(name, json_file, root)
    DatasetCatalog.get(name)  # sets the category id mapping, as the test loader does
    evaluator = CheckedCOCOEvaluator(name, output_dir=str(tmp_path / "inference"))
    evaluator.reset()
    data = load_coco_detection(json_file, root)
    for record in data.records:
        instances = Instances((record.height, record.width))
        instances.pred_boxes = Boxes(torch.as_tensor(record.boxes))
        instances.scores = torch.linspace(0.9, 0.8, len(record.boxes))
        instances.pred_classes = torch.as_tensor(record.classes)
        evaluator.process([{"image_id": record.image_id}], [{"instances": instances}])
    assert len(perfect_detections(data)) == 3
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def _own_dataset_args(tmp_path, json_file, root, *extra):
    return _train_net()["get_parser"]().parse_args([
        "--config-file", SHAPES, *extra,
        "DATASETS.COCO_INSTANCES", f"[['mine', '{json_file}', '{root}']]",
        "DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "('mine',)",
        "MODEL.RETINANET.NUM_CLASSES", "2", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "out"),
    ])  # fmt: skip


def test_a_test_image_of_another_size_fails_before_training(tmp_path):
    json_file, root = write_dataset(str(tmp_path / "data"), sizes={1: (H_WRONG, 64)})
    good_json, good_root = write_dataset(str(tmp_path / "good"))
    _forget("mine")
    _forget("mine_train")
    args = _own_dataset_args(tmp_path, json_file, root)
    args.opts += ["DATASETS.COCO_INSTANCES", f"[['mine', '{json_file}', '{root}'], ['mine_train', '{good_json}', '{good_root}']]",
                  "DATASETS.TRAIN", "('mine_train',)"]  # fmt: skip
    with pytest.raises(ValueError, match=r"DATASETS.TEST 'mine': image file .*img1.png is 50 x 64 .*48 x 64.*before training"):
        _train_net()["main"](args)
    assert not (tmp_path / "out" / "model_final.pth").exists()



def test_16_bit_images_are_refused_naming_the_file(tmp_path):
    path = str(tmp_path / "deep.png")
    cv2.imwrite(path, np.full((8, 8), 40000, np.uint16))
    with pytest.raises(ValueError, match=r"deep.png has 'I;16' pixels .*Convert it to 8 bits"):
        check_8_bit(path)
    mapper = FileNamingDatasetMapper(setup_project_cfg(SHAPES), is_train=False)
    with pytest.raises(OSError, match="deep.png"):
        mapper({"file_name": path, "height": 8, "width": 8, "image_id": 1})
    ok = str(tmp_path / "ok.png")
    cv2.imwrite(ok, np.full((8, 8, 3), 200, np.uint8))
    check_8_bit(ok)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER.MAX_ITER", "-5"], r"SOLVER.MAX_ITER must be >= 1 \(an integer\), got -5"),
        (["SOLVER.BASE_LR", "1e999"], r"SOLVER.BASE_LR=inf .*finite"),
        (["SOLVER.IMS_PER_BATCH", "0"], r"SOLVER.IMS_PER_BATCH must be >= 1"),
    ],
)
def test_train_net_names_the_key_of_a_bad_number(tmp_path, opts, message):
    args = _train_net()["get_parser"]().parse_args(["--config-file", SHAPES, *opts, "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError, match=message):
        _train_net()["main"](args)
    assert not os.listdir(tmp_path)


def test_demo_replaces_only_what_an_earlier_run_of_it_wrote(tmp_path):
    import json

    from detectron2.modeling import build_model

    from iou_aware_retinanet.d2 import demo

    weights = tmp_path / "w.pth"
    torch.save({"model": build_model(setup_project_cfg(SHAPES, ["MODEL.DEVICE", "cpu"])).state_dict()}, str(weights))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "street.png"), np.full((48, 64, 3), 90, np.uint8))
    out = tmp_path / "drawn"
    out.mkdir()
    mine = out / "street.png"  # the user's own file, under the name the demo would write
    mine.write_bytes(b"my photo")
    args = ["--config-file", SHAPES, "--input", str(inputs / "*.png"), "--output", str(out), "--min-score", "0.0",
            "--opts", "MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", "cpu"]  # fmt: skip
    with pytest.raises(FileExistsError, match=r"would overwrite .*street.png, which no earlier prediction there wrote"):
        demo.main(args)
    assert mine.read_bytes() == b"my photo"
    mine.unlink()
    demo.main(args)
    demo.main(args)  # its own earlier output: replaced
    assert sorted(os.listdir(out)) == ["predictions.json", "street.png"]
    record = json.loads((out / "predictions.json").read_text())
    assert record["images"][0]["drawn_file"] == str(mine)
    assert [c["name"] for c in record["categories"]] == ["rectangle", "ellipse", "triangle", "cross"]


def test_a_training_image_of_another_size_fails_before_training(tmp_path):
    """Detectron2's mapper checks the size of each image when it loads it, iterations into the run."""
    json_file, root = write_dataset(str(tmp_path / "data"), sizes={0: (48, 70)})  # annotated 48 x 64
    _forget("mine")
    args = _own_dataset_args(tmp_path, json_file, root)
    args.opts += ["DATASETS.TEST", "()"]
    with pytest.raises(ValueError, match=r"DATASETS.TRAIN 'mine': image file .*img0.png is 48 x 70 .*48 x 64.*before training"):
        _train_net()["main"](args)
    assert not (tmp_path / "out" / "last_checkpoint").exists()
