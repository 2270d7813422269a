"""The Detectron2 entry points' guarantees: safe YAML, no unrequested pickle, no random-weight
evaluation, no overwritten inputs (iou_aware_retinanet.d2.entry, train_net.py, the demo)."""
import os
import runpy

import cv2
import numpy as np
import pytest

from .helpers import D2_MISSING_REASON, REPO

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

from iou_aware_retinanet.d2 import demo  # noqa: E402
from iou_aware_retinanet.d2.entry import check_eval_weights, check_weights_file, setup_project_cfg  # noqa: E402

SHAPES = os.path.join(REPO, "configs", "Shapes", "iou_aware_retinanet.yaml")


def test_python_tags_in_a_config_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(
        f'_BASE_: "{SHAPES}"\n'
        f"OUTPUT_DIR: !!python/object/apply:os.system [\"touch {marker}\"]\n"
    )
    with pytest.raises(Exception, match="python/object/apply|could not determine a constructor"):
        setup_project_cfg(str(evil))
    assert not marker.exists()


def test_shipped_config_loads_safely_and_ints_fill_float_keys():
    cfg = setup_project_cfg(SHAPES, ["SOLVER.BASE_LR", "1"])
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    assert cfg.MODEL.META_ARCHITECTURE == "IoUAwareRetinaNet"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        setup_project_cfg("nope.yaml")


def test_pickle_weights_need_an_explicit_opt_in():
    with pytest.raises(ValueError, match="--allow-pickle"):
        check_weights_file("R-50.pkl")
    check_weights_file("R-50.pkl", allow_pickle=True)
    check_weights_file("model_final.pth")
    check_weights_file("")


def test_eval_only_refuses_random_weights(tmp_path):
    cfg = setup_project_cfg(SHAPES, ["OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError, match="randomly initialised"):
        check_eval_weights(cfg)
    train_net = runpy.run_path(os.path.join(REPO, "train_net.py"), run_name="train_net")
    args = train_net["get_parser"]().parse_args(["--config-file", SHAPES, "--eval-only", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError, match="randomly initialised"):
        train_net["main"](args)
    args = train_net["get_parser"]().parse_args(["--config-file", SHAPES, "MODEL.WEIGHTS", "x.pkl", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError, match="pickle"):
        train_net["main"](args)


def test_demo_refuses_to_overwrite_its_input(tmp_path):
    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.full((40, 50, 3), 128, np.uint8))
    original = image.read_bytes()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")  # never read: the check comes first
    for output in (str(tmp_path), str(image)):
        with pytest.raises(FileExistsError, match="overwrite the input image"):
            demo.main(["--config-file", SHAPES, "--input", str(image), "--output", output,
                       "--opts", "MODEL.WEIGHTS", str(weights)])  # fmt: skip
    assert image.read_bytes() == original


def test_config_datasets_are_checked_before_detectron2_reads_them(tmp_path):
    from iou_aware_retinanet.d2 import register_config_datasets

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cfg = setup_project_cfg(SHAPES, ["OUTPUT_DIR", str(tmp_path)], freeze=False)
    cfg.DATASETS.COCO_INSTANCES = [["bad_json", str(bad), str(tmp_path)]]
    with pytest.raises(ValueError, match="bad.json"):
        register_config_datasets(cfg)


def test_num_classes_is_checked_against_the_datasets(tmp_path):
    from iou_aware_retinanet.d2.datasets import check_num_classes

    cfg = setup_project_cfg(SHAPES, ["MODEL.RETINANET.NUM_CLASSES", "3"])  # shapes has 4
    with pytest.raises(ValueError, match="MODEL.RETINANET.NUM_CLASSES 4"):
        check_num_classes(cfg)
    cfg = setup_project_cfg(SHAPES, ["MODEL.RETINANET.NUM_CLASSES", "6"])
    with pytest.raises(ValueError, match="NUM_CLASSES=6 but DATASETS.TEST 'shapes_val' has 4 categories"):
        check_num_classes(cfg)
    check_num_classes(setup_project_cfg(SHAPES))


def test_train_net_checks_num_classes_before_training(tmp_path):
    train_net = runpy.run_path(os.path.join(REPO, "train_net.py"), run_name="train_net")
    args = train_net["get_parser"]().parse_args(
        ["--config-file", SHAPES, "MODEL.RETINANET.NUM_CLASSES", "2", "OUTPUT_DIR", str(tmp_path / "out")]
    )
    with pytest.raises(ValueError, match="set MODEL.RETINANET.NUM_CLASSES 4"):
        train_net["main"](args)
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_detectron2_front_end_has_only_its_own_loss_normalizer():
    from detectron2.modeling import build_model

    cfg = setup_project_cfg(SHAPES, ["MODEL.RETINANET.LOSS_NORMALIZER", "per_image"])
    with pytest.raises(ValueError, match="MODEL.RETINANET.LOSS_NORMALIZER='per_image' is not supported by the detectron2"):
        build_model(cfg)
    build_model(setup_project_cfg(SHAPES, ["MODEL.RETINANET.LOSS_NORMALIZER", "batch_ema"]))


def test_a_truncated_image_is_named_by_the_detectron2_loader(tmp_path):
    from iou_aware_retinanet.d2.datasets import FileNamingDatasetMapper

    image = tmp_path / "cut.png"
    cv2.imwrite(str(image), np.full((40, 50, 3), 128, np.uint8))
    image.write_bytes(image.read_bytes()[:40])  # truncated
    mapper = FileNamingDatasetMapper(setup_project_cfg(SHAPES), is_train=False)
    with pytest.raises(OSError, match="could not load image file .*cut.png"):
        mapper({"file_name": str(image), "height": 40, "width": 50, "image_id": 1, "annotations": []})


def test_corrupt_test_image_fails_before_training_on_the_detectron2_path(tmp_path):
    import shutil

    from iou_aware_retinanet.data.builtin import builtin_dataset_paths

    json_file, image_root = builtin_dataset_paths("shapes_mini_val", str(tmp_path / "datasets"))
    images = tmp_path / "images"
    shutil.copytree(image_root, images)
    (images / "000002.png").write_bytes(b"garbage")
    train_net = runpy.run_path(os.path.join(REPO, "train_net.py"), run_name="train_net")
    args = train_net["get_parser"]().parse_args([
        "--config-file", SHAPES, "OUTPUT_DIR", str(tmp_path / "out"),
        "DATASETS.COCO_INSTANCES", repr([["corrupt_val", json_file, str(images)]]), "DATASETS.TEST", "('corrupt_val',)",
    ])  # fmt: skip
    with pytest.raises(OSError, match=r"corrupt_val.*000002.png.*before training"):
        train_net["main"](args)
    assert not (tmp_path / "out" / "model_final.pth").exists()
