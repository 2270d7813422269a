"""train_net.py: train, evaluate with COCOEvaluator, resume and --eval-only, on the CPU."""
import json
import os
import runpy

import pytest

from .helpers import D2_MISSING_REASON, REPO

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

from detectron2.engine import default_argument_parser  # noqa: E402


def _train_net():
    return runpy.run_path(os.path.join(REPO, "train_net.py"), run_name="train_net")


def _opts(tmp_path, *extra):
    return [
        "--config-file", os.path.join(REPO, "configs", "Shapes", "iou_aware_retinanet.yaml"),
        *extra,
        "DATASETS.TRAIN", "('shapes_mini_train',)",
        "DATASETS.TEST", "('shapes_mini_val',)",
        "SOLVER.MAX_ITER", "3",
        "SOLVER.CHECKPOINT_PERIOD", "2",
        "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MIN_SIZE_TEST", "128",
        "OUTPUT_DIR", str(tmp_path / "out"),
        # 3 iterations leave p near the focal prior 0.01: let some through the threshold on p.
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.005",
    ]


@pytest.fixture
def datasets_root(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    monkeypatch.setenv("IOU_AWARE_RETINANET_DATASETS", str(root))
    # The catalog was registered at import with the default root; point the
    # mini datasets at this test's root.
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from iou_aware_retinanet.data import builtin

    for name in ("shapes_mini_train", "shapes_mini_val"):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        builtin._REGISTERED_ROOTS.pop(name, None)
    builtin.register_builtin_datasets(str(root))
    return root


def test_train_evaluate_resume_eval_only(tmp_path, datasets_root):
    train_net = _train_net()
    train_net["main"](default_argument_parser().parse_args(_opts(tmp_path)))
    out = tmp_path / "out"
    assert (out / "model_final.pth").exists() and (out / "model_0000001.pth").exists()
    assert (out / "inference" / "coco_instances_results.json").exists()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_iou" in m for m in metrics)
    final = [m for m in metrics if "bbox/AP" in m][-1]  # the evaluation after training
    assert {f"bbox/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")} <= set(final)

    # --eval-only on the final weights reproduces the end-of-training evaluation.
    eval_args = default_argument_parser().parse_args(
        _opts(tmp_path, "--eval-only") + ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    )
    evaluated = train_net["main"](eval_args)
    assert evaluated["bbox"]["AP50"] == pytest.approx(final["bbox/AP50"])

    # --resume picks up model_final (iteration 3 of 3): no training step, no crash.
    (out / "metrics.json").unlink()
    train_net["main"](default_argument_parser().parse_args(_opts(tmp_path, "--resume")))
    resumed = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert not any("loss_iou" in m for m in resumed)


def test_config_datasets_are_registered(tmp_path, datasets_root):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog

    from iou_aware_retinanet import add_iou_aware_retinanet_config
    from iou_aware_retinanet.d2 import register_config_datasets
    from iou_aware_retinanet.data.builtin import builtin_dataset_paths

    json_file, image_root = builtin_dataset_paths("shapes_mini_val", str(datasets_root))
    cfg = get_cfg()
    add_iou_aware_retinanet_config(cfg)
    cfg.DATASETS.COCO_INSTANCES = [["my_shapes", json_file, image_root]]
    cfg.DATASETS.TEST = ("my_shapes",)
    register_config_datasets(cfg)
    register_config_datasets(cfg)  # idempotent
    assert len(DatasetCatalog.get("my_shapes")) == 16
    cfg.DATASETS.COCO_INSTANCES = [["my_shapes", json_file, "/elsewhere"]]
    with pytest.raises(ValueError, match="already registered"):
        register_config_datasets(cfg)
    cfg.DATASETS.COCO_INSTANCES = [["only_a_name"]]
    with pytest.raises(ValueError, match="name, json_file, image_root"):
        register_config_datasets(cfg)
