"""Shared by the train / evaluate / predict tests: a tiny Shapes config and small COCO files."""
import json
import os

import cv2
import numpy as np
import pytest

from iou_aware_retinanet.data.builtin import DATASETS_ENV
from iou_aware_retinanet.tv.cli import setup_cfg

from .helpers import CONFIGS

SHAPES_CONFIG = os.path.join(CONFIGS, "Shapes", "iou_aware_retinanet.yaml")
TINY_SIZE = 64  # the model resizes the 256 px shapes images to this


def tiny_opts(output_dir, max_iter=6, **overrides):
    """KEY VALUE overrides shrinking configs/Shapes/iou_aware_retinanet.yaml to a few-second run
    on the mini shapes splits."""
    opts = {
        "OUTPUT_DIR": str(output_dir),
        "DATASETS.TRAIN": "('shapes_mini_train',)",
        "DATASETS.TEST": "('shapes_mini_val',)",
        "DATALOADER.NUM_WORKERS": "0",
        "MODEL.RESNETS.DEPTH": "10",
        "MODEL.RESNETS.STEM_OUT_CHANNELS": "8",
        "MODEL.RESNETS.RES2_OUT_CHANNELS": "8",
        "MODEL.FPN.OUT_CHANNELS": "64",
        "INPUT.MIN_SIZE_TRAIN": f"({TINY_SIZE},)",
        "INPUT.MAX_SIZE_TRAIN": str(TINY_SIZE),
        "INPUT.MIN_SIZE_TEST": str(TINY_SIZE),
        "INPUT.MAX_SIZE_TEST": str(TINY_SIZE),
        "SOLVER.IMS_PER_BATCH": "2",
        "SOLVER.MAX_ITER": str(max_iter),
        "SOLVER.STEPS": f"({max_iter - 2},)",
        "SOLVER.WARMUP_ITERS": "2",
        "SOLVER.CHECKPOINT_PERIOD": "3",
        "SOLVER.BASE_LR": "0.01",
        # Few candidates: an untrained model scores every anchor alike, p ~ 0.01 (the
        # focal prior), which the default 0.05 threshold on p would drop entirely.
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST": "50",
        "MODEL.RETINANET.SCORE_THRESH_TEST": "0.005",
        "TEST.DETECTIONS_PER_IMAGE": "20",
        "SEED": "7",
    }
    opts.update({k: str(v) for k, v in overrides.items()})
    return [x for kv in opts.items() for x in kv]


def tiny_cfg(output_dir, max_iter=6, **overrides):
    return setup_cfg(SHAPES_CONFIG, tiny_opts(output_dir, max_iter, **overrides)).clone()


@pytest.fixture(scope="module", autouse=True)
def fresh_datasets_root(tmp_path_factory):
    """$IOU_AWARE_RETINANET_DATASETS set to a fresh folder for the whole module
    (autouse in every test module that imports it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv(DATASETS_ENV, str(tmp_path_factory.mktemp("datasets")))
    yield
    mp.undo()


def write_coco(root, num_images=4, with_annotations=True, size=(64, 80)):
    """A small COCO dataset of random images: (json file, image folder)."""
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(num_images):
        name = f"img{i}.png"
        cv2.imwrite(os.path.join(image_dir, name), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
        images.append({"id": i + 1, "file_name": name, "height": size[0], "width": size[1]})
        if with_annotations:
            annotations.append(
                {"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [5, 6, 30, 20], "iscrowd": 0}
            )
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    json_file = os.path.join(root, "instances.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file, image_dir
