"""The COCO reader's ground truth: what training and evaluation (both front-ends) use.

A perfect detector, one that returns exactly the boxes training is given, scores AP 100 whatever
the exporter left out (``area``, ``iscrowd``), however it typed its ids (strings), and whether the
boxes needed clipping."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from iou_aware_retinanet.data.coco import check_images_decode, load_coco_detection
from iou_aware_retinanet.tv.evaluation import coco_evaluate, detections_to_coco

W, H = 64, 48


def write_dataset(root, image_ids=(1, 2), category_ids=(7, 3), with_area=True, with_iscrowd=True, sizes=None):
    """Two images; image 0 has a box half outside on the right, both have a box inside."""
    os.makedirs(root, exist_ok=True)
    images, annotations = [], []
    for n, image_id in enumerate(image_ids):
        name = f"img{n}.png"
        h, w = (sizes or {}).get(n, (H, W))
        cv2.imwrite(os.path.join(root, name), np.full((h, w, 3), 40 * (n + 1), np.uint8))
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        boxes = [[4.0, 5.0, 20.0, 15.0]] + ([[50.0, 10.0, 30.0, 20.0]] if n == 0 else [])  # XYWH
        for k, box in enumerate(boxes):
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_ids[k % 2], "bbox": box}
            if with_area:
                ann["area"] = box[2] * box[3]
            if with_iscrowd:
                ann["iscrowd"] = 0
            annotations.append(ann)
    categories = [{"id": c, "name": f"class{c}"} for c in category_ids]
    json_file = os.path.join(root, "instances.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file, root


def perfect_detections(data):
    """Exactly the training boxes of every record, as the model's output would carry them."""
    results = []
    for record in data.records:
        n = len(record.boxes)
        output = {
            "boxes": torch.as_tensor(record.boxes), "scores": torch.linspace(0.9, 0.8, n),
            "labels": torch.as_tensor(record.classes),
        }  # fmt: skip
        results.extend(detections_to_coco(output, record.image_id, data.category_ids))
    return results


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"with_area": False, "with_iscrowd": False},
        {"category_ids": ("7", "3")},
        {"image_ids": ("a", "b"), "category_ids": ("7", "3"), "with_area": False},
    ],
    ids=["plain", "no_area_no_iscrowd", "string_category_ids", "string_ids_no_area"],
)
def test_a_perfect_detector_of_the_training_boxes_scores_100(tmp_path, variant):
    data = load_coco_detection(*write_dataset(str(tmp_path), **variant))
    # The box half outside image 0 is clipped at the right edge, for training and evaluation alike.
    assert data.records[0].boxes.tolist()[1] == [50.0, 10.0, 64.0, 30.0]
    gt = [a for a in data.coco.dataset["annotations"] if a["image_id"] == data.records[0].image_id]
    assert [a["bbox"] for a in gt][1] == [50.0, 10.0, 14.0, 20.0]
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in data.coco.dataset["annotations"])
    detections = perfect_detections(data)
    assert {d["category_id"] for d in detections} == set(variant.get("category_ids", (7, 3)))
    metrics = coco_evaluate(data.coco, detections, [r.image_id for r in data.records])
    assert metrics["AP"] == pytest.approx(100.0)


def test_missing_area_is_the_clipped_box_area_and_given_area_is_kept(tmp_path):
    data = load_coco_detection(*write_dataset(str(tmp_path), with_area=False))
    assert [a["area"] for a in data.coco.dataset["annotations"]] == [20 * 15, 14 * 20, 20 * 15]
    data = load_coco_detection(*write_dataset(str(tmp_path / "given")))
    assert [a["area"] for a in data.coco.dataset["annotations"]] == [20 * 15, 30 * 20, 20 * 15]


def _rewrite(json_file, edit):
    with open(json_file) as f:
        dataset = json.load(f)
    edit(dataset)
    with open(json_file, "w") as f:
        json.dump(dataset, f)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["images"][1].update(file_name="img0.png"), r"images 1 and 2 have the same file_name 'img0.png'"),
        (lambda d: d["images"][1].update(id="2"), r"image ids mix integers and strings \(1 and '2'\)"),
        (lambda d: d["categories"][0].update(id=7.0), r"category entry #0 has 'id' 7.0"),
        (lambda d: d["annotations"][0].update(iscrowd=2), r"annotation 1 has iscrowd 2"),
        (lambda d: d["annotations"][0].update(area="big"), r"annotation 1 has area 'big'"),
    ],
    ids=["duplicate_file_name", "mixed_id_types", "float_id", "iscrowd_2", "area_string"],
)
def test_ambiguous_ids_and_fields_name_the_file_and_the_entry(tmp_path, edit, message):
    json_file, root = write_dataset(str(tmp_path))
    _rewrite(json_file, edit)
    with pytest.raises(ValueError, match=message) as info:
        load_coco_detection(json_file, root)
    assert json_file in str(info.value)


def test_check_images_decode_compares_the_sizes(tmp_path):
    json_file, root = write_dataset(str(tmp_path), sizes={1: (H, W + 2)})
    data = load_coco_detection(json_file, root)
    entries = [(r.file_name, r.height, r.width) for r in data.records]
    with pytest.raises(ValueError, match=r"DATASETS.TEST 'mine': image file .*img1.png is 48 x 66 .* 48 x 64"):
        check_images_decode(entries, "DATASETS.TEST 'mine'")
    assert check_images_decode(entries[:1], "DATASETS.TEST 'mine'") == 1


def test_header_check_sees_the_size_the_reader_returns(tmp_path):
    """A JPEG stored 64 x 48 with EXIF orientation 6 (turn by 90 degrees) reads as 48 x 64: the
    header check, which decodes nothing, agrees with the decoding check on both annotations."""
    from PIL import Image

    from iou_aware_retinanet.data.coco import check_image_headers

    path = str(tmp_path / "turned.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48), (120, 30, 30)).save(path, exif=exif)
    for check in (check_image_headers, check_images_decode):
        assert check([(path, 64, 48)], "DATASETS.TRAIN 'mine'") == 1
        with pytest.raises(ValueError, match=r"turned.jpg is 64 x 48 .* 48 x 64 \(the sizes are swapped"):
            check([(path, 48, 64)], "DATASETS.TRAIN 'mine'")
    with pytest.raises(OSError, match=r"DATASETS.TRAIN 'mine': could not read image file .*nothing.png"):
        check_image_headers([(str(tmp_path / "nothing.png"), 4, 4)], "DATASETS.TRAIN 'mine'")
