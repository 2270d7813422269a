"""AP90 (precision at IoU 0.9 alone) next to COCOeval's standard metrics, on hand-made cases."""
import contextlib
import io

import pytest
from pycocotools.coco import COCO

from iou_aware_retinanet.tv.evaluation import coco_evaluate


def _coco_gt():
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "square"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


@pytest.mark.parametrize(
    "width, expected_ap75, expected_ap90",
    [
        (40, 100.0, 100.0),  # exact box: IoU 1
        (38, 100.0, 100.0),  # IoU 38/40 = 0.95
        (35, 100.0, 0.0),  # IoU 35/40 = 0.875: above 0.75, below 0.9
        (28, 0.0, 0.0),  # IoU 0.7
    ],
)
def test_ap90_counts_only_detections_with_iou_at_least_0_9(width, expected_ap75, expected_ap90):
    detection = {"image_id": 1, "category_id": 1, "bbox": [10, 10, width, 40], "score": 0.9}
    metrics = coco_evaluate(_coco_gt(), [detection])
    assert metrics["AP75"] == pytest.approx(expected_ap75)
    assert metrics["AP90"] == pytest.approx(expected_ap90)
    assert metrics["AP50"] == pytest.approx(100.0)
