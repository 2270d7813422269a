"""The framework-free COCO reader: bad input, records, the Dataset, flipping, collation."""
import json
import logging
import math
import os

import cv2
import numpy as np
import pytest
import torch

from iou_aware_retinanet.data.coco import (
    CocoDetectionDataset,
    decode_images,
    decoded_size_bytes,
    collate_detection,
    hflip,
    hflip_boxes,
    load_coco_detection,
)

LOGGER = "iou_aware_retinanet.data"
H, W = 20, 30  # size of the images of the small hand-written datasets


def _image_entry(image_id, file_name=None, height=H, width=W):
    return {"id": image_id, "file_name": file_name or f"{image_id}.png", "height": height, "width": width}


def _ann(ann_id, image_id, bbox, category_id=3, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


def _dataset(annotations=(), images=None):
    """Two images, categories with non-contiguous ids 3 ("b") and 7 ("a")."""
    return {
        "images": images if images is not None else [_image_entry(1), _image_entry(2)],
        "annotations": list(annotations),
        "categories": [{"id": 7, "name": "a"}, {"id": 3, "name": "b"}],
    }


def _write(tmp_path, dataset, write_images=True):
    """Write ``dataset`` as tmp_path/ann.json and its images (solid colour PNGs)."""
    image_root = tmp_path / "images"
    image_root.mkdir(exist_ok=True)
    if write_images:
        for img in dataset.get("images", []):
            image = np.full((img["height"], img["width"], 3), (255, 0, 0), dtype=np.uint8)  # BGR blue
            cv2.imwrite(str(image_root / img["file_name"]), image)
    json_file = tmp_path / "ann.json"
    json_file.write_text(json.dumps(dataset))
    return str(json_file), str(image_root)


# --------------------------------------------------------------------------- valid input


def test_records_boxes_and_class_mapping(tmp_path):
    json_file, image_root = _write(
        tmp_path, _dataset([_ann(1, 1, [1, 2, 10, 5], category_id=7), _ann(2, 1, [0, 0, 4, 4], category_id=3)])
    )
    data = load_coco_detection(json_file, image_root)
    assert data.category_ids == [3, 7]  # sorted by id, as Detectron2
    assert data.class_names == ["b", "a"]
    assert data.category_id_to_contiguous == {3: 0, 7: 1}
    assert data.num_classes == 2
    assert [r.image_id for r in data.records] == [1, 2]
    first = data.records[0]
    assert first.file_name == f"{image_root}/1.png"
    assert (first.height, first.width) == (H, W)
    assert first.boxes.dtype == np.float32 and first.classes.dtype == np.int64
    np.testing.assert_allclose(first.boxes, [[1, 2, 11, 7], [0, 0, 4, 4]])
    np.testing.assert_array_equal(first.classes, [1, 0])
    assert data.records[1].boxes.shape == (0, 4)
    assert len(data.coco.getAnnIds()) == 2


def test_missing_annotations_list_means_no_boxes(tmp_path):
    dataset = _dataset()
    del dataset["annotations"]
    data = load_coco_detection(*_write(tmp_path, dataset))
    assert [len(r.boxes) for r in data.records] == [0, 0]


def test_images_without_boxes_are_kept_or_dropped(tmp_path, caplog):
    json_file, image_root = _write(tmp_path, _dataset([_ann(1, 2, [1, 1, 5, 5])]))
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert [r.image_id for r in load_coco_detection(json_file, image_root).records] == [1, 2]
    assert "1 images without boxes, kept as negatives" in caplog.text
    caplog.clear()
    data = load_coco_detection(json_file, image_root, drop_images_without_boxes=True)
    assert [r.image_id for r in data.records] == [2]
    assert "1 images without boxes, dropped" in caplog.text


# --------------------------------------------------------------------------- errors


def test_missing_json(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco_detection(path, str(tmp_path))


def test_malformed_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_coco_detection(str(path), str(tmp_path))


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="list.json"):
        load_coco_detection(str(path), str(tmp_path))


@pytest.mark.parametrize("key", ["images", "categories"])
def test_no_images_or_no_categories(tmp_path, key):
    dataset = _dataset()
    dataset[key] = []
    json_file, image_root = _write(tmp_path, dataset)
    with pytest.raises(ValueError, match=f"ann.json: no {key}"):
        load_coco_detection(json_file, image_root)
    del dataset[key]
    json_file, image_root = _write(tmp_path, dataset)
    with pytest.raises(ValueError, match=f"no {key}"):
        load_coco_detection(json_file, image_root)


def test_missing_image_files_are_counted_and_named(tmp_path):
    images = [_image_entry(i) for i in range(1, 9)]
    json_file, image_root = _write(tmp_path, _dataset(images=images))
    for i in (2, 5, 6, 7, 8, 1):
        (tmp_path / "images" / f"{i}.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_coco_detection(json_file, image_root)
    message = str(err.value)
    assert "6 of 8 images" in message and "ann.json" in message and image_root in message
    assert "1.png, 2.png, 5.png" in message and message.endswith(", ...")


def test_unknown_category(tmp_path):
    anns = [_ann(1, 1, [1, 1, 2, 2]), _ann(55, 1, [1, 1, 2, 2], category_id=99)]
    json_file, image_root = _write(tmp_path, _dataset(anns))
    with pytest.raises(ValueError, match="ann.json: annotation 55 has category_id 99"):
        load_coco_detection(json_file, image_root)


def test_unknown_image(tmp_path):
    json_file, image_root = _write(tmp_path, _dataset([_ann(12, 42, [1, 1, 2, 2])]))
    with pytest.raises(ValueError, match="ann.json: annotation 12 has image_id 42"):
        load_coco_detection(json_file, image_root)


@pytest.mark.parametrize("bbox", [[1, 2, 3], "1,2,3,4", [1, 2, "3", 4], None])
def test_malformed_bbox(tmp_path, bbox):
    json_file, image_root = _write(tmp_path, _dataset([_ann(8, 1, bbox)]))
    with pytest.raises(ValueError, match="annotation 8 has bbox"):
        load_coco_detection(json_file, image_root)


def test_annotation_without_required_key(tmp_path):
    ann = _ann(4, 1, [1, 1, 2, 2])
    del ann["category_id"]
    json_file, image_root = _write(tmp_path, _dataset([ann]))
    with pytest.raises(ValueError, match="annotation 4 has no 'category_id'"):
        load_coco_detection(json_file, image_root)


@pytest.mark.parametrize("kind", ["image", "annotation", "category"])
def test_duplicate_ids(tmp_path, kind):
    dataset = _dataset([_ann(1, 1, [1, 1, 2, 2]), _ann(2, 1, [1, 1, 2, 2])])
    key = {"image": "images", "annotation": "annotations", "category": "categories"}[kind]
    dataset[key][1]["id"] = dataset[key][0]["id"]
    json_file, image_root = _write(tmp_path, dataset)
    with pytest.raises(ValueError, match=f"duplicate {kind} id"):
        load_coco_detection(json_file, image_root)


def test_image_without_size(tmp_path):
    dataset = _dataset()
    dataset["images"][1]["height"] = 0
    json_file, image_root = _write(tmp_path, dataset, write_images=False)
    with pytest.raises(ValueError, match="image 2 has invalid size"):
        load_coco_detection(json_file, image_root)


# --------------------------------------------------------------------------- repairs, with logged counts


def test_boxes_outside_the_image_are_clipped(tmp_path, caplog):
    anns = [_ann(1, 1, [-3, 2, 10, 5]), _ann(2, 1, [25, 15, 10, 10]), _ann(3, 1, [1, 1, 2, 2])]
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = load_coco_detection(*_write(tmp_path, _dataset(anns)))
    np.testing.assert_allclose(data.records[0].boxes, [[0, 2, 7, 7], [25, 15, W, H], [1, 1, 3, 3]])
    assert "clipped 2 boxes extending outside their image" in caplog.text
    assert "ann.json" in caplog.text


def test_degenerate_and_non_finite_boxes_are_skipped(tmp_path, caplog):
    anns = [
        _ann(1, 1, [1, 1, 0, 5]),  # zero width
        _ann(2, 1, [1, 1, 4, -2]),  # negative height
        _ann(3, 1, [math.nan, 1, 4, 4]),
        _ann(4, 1, [40, 1, 4, 4]),  # entirely right of the image: empty after clipping
        _ann(5, 1, [1, 1, 4, 4]),
    ]
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = load_coco_detection(*_write(tmp_path, _dataset(anns)))
    np.testing.assert_allclose(data.records[0].boxes, [[1, 1, 5, 5]])
    assert "skipped 4 boxes with zero or negative width/height" in caplog.text
    assert "clipped" not in caplog.text


def test_crowd_annotations_are_skipped(tmp_path, caplog):
    anns = [_ann(1, 1, [1, 1, 4, 4], iscrowd=1), _ann(2, 1, [2, 2, 4, 4])]
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = load_coco_detection(*_write(tmp_path, _dataset(anns)))
    np.testing.assert_allclose(data.records[0].boxes, [[2, 2, 6, 6]])
    assert "skipped 1 crowd annotations" in caplog.text


# --------------------------------------------------------------------------- Dataset and transforms


def test_dataset_item_shapes_and_rgb_order(tmp_path):
    json_file, image_root = _write(tmp_path, _dataset([_ann(1, 1, [1, 2, 10, 5], category_id=7)]))
    dataset = CocoDetectionDataset(load_coco_detection(json_file, image_root).records)
    assert len(dataset) == 2
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    # The file is pure blue (BGR 255, 0, 0): RGB channel 2 is 1, channel 0 is 0.
    assert image[2].min() == 1.0 and image[0].max() == 0.0
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (1, 4)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1]
    assert target["image_id"] == 1
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_undecodable_image_names_the_file(tmp_path):
    json_file, image_root = _write(tmp_path, _dataset())
    (tmp_path / "images" / "2.png").write_bytes(b"not a png")
    dataset = CocoDetectionDataset(load_coco_detection(json_file, image_root).records)
    with pytest.raises(OSError, match="2.png"):
        dataset[1]


def test_image_size_disagreeing_with_annotations(tmp_path):
    json_file, image_root = _write(tmp_path, _dataset())
    cv2.imwrite(str(tmp_path / "images" / "1.png"), np.zeros((5, 5, 3), np.uint8))
    dataset = CocoDetectionDataset(load_coco_detection(json_file, image_root).records)
    with pytest.raises(ValueError, match="1.png is 5 x 5"):
        dataset[0]


def test_decoded_images_give_the_same_samples(tmp_path):
    json_file, image_root = _write(tmp_path, _dataset([_ann(1, 1, [1, 2, 10, 5])]))
    records = load_coco_detection(json_file, image_root).records
    decoded = decode_images(records)
    assert [d.shape for d in decoded] == [(H, W, 3)] * len(records) and decoded[0].dtype == np.uint8
    assert decoded_size_bytes(records) == sum(d.nbytes for d in decoded)
    from_files, from_memory = CocoDetectionDataset(records), CocoDetectionDataset(records, decoded=decoded)
    samples = [from_files[i] for i in range(len(records))]
    for (a, ta), (b, tb) in zip(samples, [from_memory[i] for i in range(len(records))]):
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and ta["image_id"] == tb["image_id"]
    # The files are not read again: without them the samples are still there.
    for record in records:
        os.remove(record.file_name)
    assert all(torch.equal(from_memory[i][0], samples[i][0]) for i in range(len(records)))
    with pytest.raises(ValueError, match="1 decoded images for 2 records"):
        CocoDetectionDataset(records, decoded=decoded[:1])


def test_decoding_checks_sizes_and_names_unreadable_files(tmp_path):
    json_file, image_root = _write(tmp_path, _dataset())
    records = load_coco_detection(json_file, image_root).records
    cv2.imwrite(str(tmp_path / "images" / "1.png"), np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="1.png is 5 x 5"):
        decode_images(records)
    (tmp_path / "images" / "1.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="1.png"):
        decode_images(records)


def test_hflip_boxes_by_hand():
    boxes = torch.tensor([[2.0, 3.0, 10.0, 8.0], [0.0, 0.0, 30.0, 20.0]])
    expected = torch.tensor([[20.0, 3.0, 28.0, 8.0], [0.0, 0.0, 30.0, 20.0]])
    assert torch.equal(hflip_boxes(boxes, 30), expected)


def test_hflip_flips_image_and_boxes_together():
    image = torch.zeros(3, H, W)
    image[:, 3:8, 2:10] = 1.0  # a bright patch exactly under the box
    target = {"boxes": torch.tensor([[2.0, 3.0, 10.0, 8.0]]), "labels": torch.tensor([0]), "image_id": 5}
    flipped, flipped_target = hflip(image, target)
    assert torch.equal(flipped_target["boxes"], torch.tensor([[20.0, 3.0, 28.0, 8.0]]))
    assert flipped[:, 3:8, 20:28].min() == 1.0 and flipped.sum() == image.sum()
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 10.0, 8.0]]))  # input untouched
    assert flipped_target["image_id"] == 5


def test_collate_and_data_loader(tmp_path):
    json_file, image_root = _write(tmp_path, _dataset([_ann(1, 1, [1, 2, 10, 5])]))
    dataset = CocoDetectionDataset(load_coco_detection(json_file, image_root).records, hflip)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 2 and images[0].shape == (3, H, W)
    assert [t["image_id"] for t in targets] == [1, 2]


def test_reads_the_generated_shapes_dataset(shapes_stats_split):
    json_file, image_dir, spec = shapes_stats_split
    data = load_coco_detection(json_file, image_dir)
    assert data.class_names == list(spec.classes)
    assert len(data) == len(data.coco.imgs)  # negatives are kept
    image, target = CocoDetectionDataset(data.records)[0]
    assert image.shape == (3, *spec.image_size)
    assert target["labels"].max() < len(spec.classes)
