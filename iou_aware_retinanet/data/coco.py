"""A COCO-format detection reader for the torchvision front-end (no Detectron2).

:func:`load_coco_detection` parses an ``instances_*.json`` file with
pycocotools, checks it, and turns it into one :class:`CocoRecord` per image
(absolute file path, size, COCO image id, XYXY boxes, contiguous class
indices). :class:`CocoDetectionDataset` serves those records in torchvision's
detection convention, and :func:`collate_detection` batches them.

Bad input is either an error that names the file (and the annotation or image
at fault) or a documented repair whose count is logged to the
``iou_aware_retinanet.data`` logger:

==================================================  =========================================
json file missing                                   FileNotFoundError
not valid JSON / not a COCO object                  ValueError
no images, or no categories                         ValueError
duplicate image / annotation / category ids         ValueError
an id that is not an integer or a string, or ids    ValueError naming the entry
of both kinds in one list
two image ids with the same ``file_name``           ValueError naming both ids
image entry without a positive height / width       ValueError
image files missing under ``image_root``            FileNotFoundError (count + first names)
annotation without id / image_id / category_id /    ValueError naming the annotation
bbox, or with a bbox that is not 4 numbers
annotation of an unknown category or image          ValueError naming annotation and id
``iscrowd`` not 0 / 1, ``area`` not a number        ValueError naming the annotation
annotation without ``iscrowd`` / ``area``           filled: ``iscrowd`` 0, ``area`` the (clipped)
                                                    box's, as Detectron2 does for its own
                                                    datasets (info, count)
box partly outside its image                        clipped to the image (warning, count)
non-finite box, or empty after clipping             skipped (warning, count)
``iscrowd: 1`` annotation                           skipped, as Detectron2's RetinaNet
                                                    ignores crowd boxes in training (info, count)
image without (usable) annotations                  kept as a negative image; dropped with
                                                    ``drop_images_without_boxes=True`` (info, count)
==================================================  =========================================

A missing ``annotations`` list is read as "no annotations" (COCO's
``image_info`` test files have none).

Evaluation uses the same boxes as training: ``CocoDetectionData.coco`` (the
ground truth for COCOeval, on both front-ends) holds the repaired annotations,
clipped to their image, without the skipped ones, with ``iscrowd`` / ``area``
filled; crowd annotations stay in it as COCOeval's ignore regions. A detector
cannot predict a box outside the image, so judging it against the unclipped
box would only lower AP. Image and category ids keep their type (integers, or
strings as some exporters write them) in the records and in the results. Contiguous class indices follow the
category ids in increasing order, as Detectron2 does, so both front-ends
number the classes the same way.
"""
import contextlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO

logger = logging.getLogger("iou_aware_retinanet.data")

# How many missing image files an error message lists.
_MAX_NAMES_SHOWN = 5


@dataclass
class CocoRecord:
    """One image and its boxes, ready to be read by :class:`CocoDetectionDataset`."""

    file_name: str  # absolute or relative to the working directory: image_root joined in
    height: int
    width: int
    image_id: Union[int, str]  # the COCO image id, for evaluation (its type as in the file)
    boxes: np.ndarray  # (N, 4) float32, XYXY absolute pixels
    classes: np.ndarray  # (N,) int64 contiguous class indices 0..K-1


@dataclass
class CocoDetectionData:
    """What :func:`load_coco_detection` returns: the records and the class mapping."""

    json_file: str
    image_root: str
    records: List[CocoRecord]
    class_names: List[str]  # contiguous index -> category name
    category_ids: List[Union[int, str]]  # contiguous index -> COCO category id (its type as in the file)
    coco: COCO = field(repr=False)  # the parsed file, e.g. as COCOeval's ground truth

    @property
    def category_id_to_contiguous(self) -> Dict[Union[int, str], int]:
        return {cat_id: i for i, cat_id in enumerate(self.category_ids)}

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.records)


# --------------------------------------------------------------------------- parsing and checking


def _read_json(json_file: str) -> dict:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: {json_file}")
    try:
        with open(json_file, "r", encoding="utf-8") as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_file} is not valid JSON: {e}") from e
    if not isinstance(dataset, dict):
        raise ValueError(f"{json_file}: expected a COCO json object, got a {type(dataset).__name__}")
    return dataset


def _require_unique_ids(items: Sequence[dict], kind: str, json_file: str) -> None:
    """Ids present, unique, and all integers or all strings (results carry them back as they are)."""
    seen, first = set(), None
    for position, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise ValueError(f"{json_file}: {kind} entry #{position} has no 'id'")
        value = item["id"]
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise ValueError(
                f"{json_file}: {kind} entry #{position} has 'id' {value!r}: ids are integers (or strings)"
            )
        if first is None:
            first = value
        elif isinstance(value, str) != isinstance(first, str):
            raise ValueError(
                f"{json_file}: the {kind} ids mix integers and strings ({first!r} and {value!r}): use one kind"
            )
        if value in seen:
            raise ValueError(f"{json_file}: duplicate {kind} id {value!r}")
        seen.add(value)


def _check_structure(dataset: dict, json_file: str) -> None:
    """Errors that make the file unusable, before pycocotools indexes it."""
    for key in ("images", "categories"):
        if not isinstance(dataset.get(key), list) or not dataset[key]:
            raise ValueError(f"{json_file}: no {key} (the '{key}' list is missing or empty)")
    annotations = dataset.setdefault("annotations", [])
    if not isinstance(annotations, list):
        raise ValueError(f"{json_file}: 'annotations' must be a list")
    _require_unique_ids(dataset["images"], "image", json_file)
    _require_unique_ids(dataset["categories"], "category", json_file)
    _require_unique_ids(annotations, "annotation", json_file)

    for image in dataset["images"]:
        for key in ("file_name", "height", "width"):
            if key not in image:
                raise ValueError(f"{json_file}: image {image['id']} has no '{key}'")
        height, width = image["height"], image["width"]
        if not (_is_number(height) and _is_number(width)) or min(height, width) <= 0:
            raise ValueError(
                f"{json_file}: image {image['id']} has invalid size {image['height']} x {image['width']}"
            )
    by_file = {}
    for image in dataset["images"]:
        name = os.path.normpath(str(image["file_name"]))
        if name in by_file:
            raise ValueError(
                f"{json_file}: images {by_file[name]!r} and {image['id']!r} have the same file_name "
                f"{image['file_name']!r}: one image would count twice (merge their annotations into one image)"
            )
        by_file[name] = image["id"]

    image_ids = {image["id"] for image in dataset["images"]}
    category_ids = {cat["id"] for cat in dataset["categories"]}
    for ann in annotations:
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise ValueError(f"{json_file}: annotation {ann['id']} has no '{key}'")
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"{json_file}: annotation {ann['id']} has bbox {bbox!r}, expected [x, y, w, h]")
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"{json_file}: annotation {ann['id']} has category_id {ann['category_id']!r}, "
                f"which is not among the categories {sorted(category_ids)}"
            )
        if ann["image_id"] not in image_ids:
            raise ValueError(
                f"{json_file}: annotation {ann['id']} has image_id {ann['image_id']!r}, which is not among the images"
            )
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            raise ValueError(f"{json_file}: annotation {ann['id']} has iscrowd {ann['iscrowd']!r}, expected 0 or 1")
        if "area" in ann and not (_is_number(ann["area"]) and math.isfinite(ann["area"]) and ann["area"] >= 0):
            raise ValueError(f"{json_file}: annotation {ann['id']} has area {ann['area']!r}, expected a number >= 0")


def _is_number(value) -> bool:
    """int or float (NaN included: it is handled later), but not bool or str."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _index(dataset: dict) -> COCO:
    """A pycocotools COCO object over an already parsed dataset, without its prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_image_files(coco: COCO, image_root: str, json_file: str) -> None:
    """Fail early, listing the first few, when image files are missing (one stat per image)."""
    missing = [
        img["file_name"]
        for img in coco.dataset["images"]
        if not os.path.isfile(os.path.join(image_root, img["file_name"]))
    ]
    if missing:
        shown = ", ".join(missing[:_MAX_NAMES_SHOWN]) + (", ..." if len(missing) > _MAX_NAMES_SHOWN else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(coco.dataset['images'])} images listed in {json_file} "
            f"are missing under {image_root}: {shown}"
        )


# --------------------------------------------------------------------------- boxes


@dataclass
class _BoxCounts:
    """How many annotations were repaired or skipped, for the log."""

    clipped: int = 0
    invalid: int = 0
    crowd: int = 0
    filled_iscrowd: int = 0
    filled_area: int = 0


def _repair_annotations(dataset: dict, counts: _BoxCounts) -> Dict[object, List[float]]:
    """The annotations as training and evaluation use them, in place in ``dataset``: boxes
    clipped to their image, non-finite or empty ones removed, ``iscrowd`` / ``area`` filled.
    Returns each kept annotation's clipped XYXY box, by annotation id."""
    sizes = {image["id"]: (int(image["width"]), int(image["height"])) for image in dataset["images"]}
    kept, xyxy = [], {}
    for ann in dataset["annotations"]:
        width, height = sizes[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = [x, y, x + w, y + h]
        if not all(math.isfinite(v) for v in box):
            counts.invalid += 1
            continue
        clipped = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
                   min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]  # fmt: skip
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            counts.invalid += 1
            continue
        if clipped != box:
            counts.clipped += 1
            ann["bbox"] = [clipped[0], clipped[1], clipped[2] - clipped[0], clipped[3] - clipped[1]]
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            counts.filled_iscrowd += 1
        if "area" not in ann:
            ann["area"] = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
            counts.filled_area += 1
        counts.crowd += int(bool(ann["iscrowd"]))
        xyxy[ann["id"]] = clipped
        kept.append(ann)
    dataset["annotations"] = kept
    return xyxy


def _image_boxes(
    annotations: Sequence[dict], xyxy: Dict[object, List[float]], cat_to_index: Dict[object, int]
) -> Tuple[np.ndarray, np.ndarray]:
    """The training boxes (XYXY, clipped) of one image's repaired annotations and their
    contiguous classes; crowd annotations are left out."""
    boxes, classes = [], []
    for ann in annotations:
        if ann["iscrowd"]:
            continue
        boxes.append(xyxy[ann["id"]])
        classes.append(cat_to_index[ann["category_id"]])
    return (
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(classes, dtype=np.int64),
    )


def _log_counts(json_file: str, counts: _BoxCounts, num_empty: int, dropped: bool) -> None:
    if counts.clipped:
        logger.warning("%s: clipped %d boxes extending outside their image", json_file, counts.clipped)
    if counts.invalid:
        logger.warning(
            "%s: skipped %d boxes with zero or negative width/height after clipping, or non-finite coordinates",
            json_file,
            counts.invalid,
        )
    if counts.crowd:
        logger.info("%s: skipped %d crowd annotations (iscrowd=1) for training", json_file, counts.crowd)
    if counts.filled_iscrowd or counts.filled_area:
        logger.info(
            "%s: filled 'iscrowd' (0) in %d and 'area' (the box's) in %d annotations that had none",
            json_file, counts.filled_iscrowd, counts.filled_area,
        )
    if num_empty:
        action = "dropped" if dropped else "kept as negatives"
        logger.info("%s: %d images without boxes, %s", json_file, num_empty, action)


# --------------------------------------------------------------------------- public API


def load_coco_detection(
    json_file: str, image_root: str, drop_images_without_boxes: bool = False
) -> CocoDetectionData:
    """Read a COCO instances file into per-image records (see the module docstring for bad input).

    Images with no usable box are kept by default: training on them teaches
    the detector the background (Detectron2's
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` drops them instead; pass
    ``drop_images_without_boxes=True`` to do the same).
    """
    json_file = os.fspath(json_file)
    image_root = os.fspath(image_root)
    dataset = _read_json(json_file)
    _check_structure(dataset, json_file)
    counts = _BoxCounts()
    xyxy = _repair_annotations(dataset, counts)
    coco = _index(dataset)
    _check_image_files(coco, image_root, json_file)

    category_ids = sorted(coco.cats.keys())
    class_names = [coco.cats[cat_id]["name"] for cat_id in category_ids]
    cat_to_index = {cat_id: i for i, cat_id in enumerate(category_ids)}

    records, num_empty = [], 0
    for image_id in sorted(coco.imgs.keys()):
        image = coco.imgs[image_id]
        width, height = int(image["width"]), int(image["height"])
        boxes, classes = _image_boxes(coco.imgToAnns[image_id], xyxy, cat_to_index)
        if len(boxes) == 0:
            num_empty += 1
            if drop_images_without_boxes:
                continue
        records.append(
            CocoRecord(
                file_name=os.path.join(image_root, image["file_name"]),
                height=height,
                width=width,
                image_id=image_id,
                boxes=boxes,
                classes=classes,
            )
        )
    _log_counts(json_file, counts, num_empty, drop_images_without_boxes)
    return CocoDetectionData(
        json_file=json_file,
        image_root=image_root,
        records=records,
        class_names=class_names,
        category_ids=category_ids,
        coco=coco,
    )


def read_image_rgb(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB; an error naming the file when OpenCV cannot read it."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"could not read or decode image file {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


Target = Dict[str, object]
Transform = Callable[[torch.Tensor, Target], Tuple[torch.Tensor, Target]]


def _check_image_size(rgb: np.ndarray, record: CocoRecord) -> None:
    _check_size(rgb.shape[:2], record.file_name, record.height, record.width)


def _check_size(size: Tuple[int, int], file_name: str, height: int, width: int) -> None:
    """``size``: (h, w) of the image as the reader returns it."""
    if tuple(size) != (height, width):
        raise ValueError(
            f"image file {file_name} is {size[0]} x {size[1]} (h x w), but its "
            f"annotations say {height} x {width}"
            + (
                " (the sizes are swapped: the file probably has an EXIF orientation, which the reader "
                "applies; annotate the rotated image, or strip the EXIF orientation)"
                if tuple(size) == (width, height) else ""
            )
        )


# EXIF orientations that turn the stored image by 90 degrees (the reader applies them).
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_HEADER_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP")


def check_image_headers(images: Iterable[Tuple[str, int, int]], what: str) -> int:
    """Read the header of every ``(file_name, height, width)`` (not the pixels) and compare
    the size, as the reader will see it (EXIF orientation applied), with the annotated one;
    returns how many. Cheap enough for every training image before training: a file that is
    no image or has another size fails now, not at the iteration that first loads it (a
    file truncated after its header still fails there)."""
    from PIL import Image  # torchvision's dependency; only the header is parsed

    count = 0
    for file_name, height, width in images:
        try:
            with Image.open(file_name) as image:
                w, h = image.size
                # EXIF sits in the header of these formats (a PNG's may follow the pixels: not read here).
                if image.format in _EXIF_HEADER_FORMATS and image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                    w, h = h, w
        except OSError as e:
            raise OSError(f"{what}: could not read image file {file_name}: {e} (checked before training)") from None
        try:
            _check_size((h, w), file_name, int(height), int(width))
        except ValueError as e:
            raise ValueError(f"{what}: {e} (checked before training)") from None
        count += 1
    return count


def check_images_decode(images: Iterable[Tuple[str, int, int]], what: str) -> int:
    """Decode every ``(file_name, height, width)`` once and compare its size with the annotated
    one; returns how many. Both front-ends run it on ``DATASETS.TEST`` before training, so a
    corrupt or wrongly sized test image fails now, naming ``what`` and the file, not in the
    evaluation after the run."""
    count = 0
    for file_name, height, width in images:
        try:
            _check_size(read_image_rgb(file_name).shape[:2], file_name, int(height), int(width))
        except (OSError, ValueError) as e:
            raise type(e)(f"{what}: {e} (checked before training)") from None
        count += 1
    return count


def decoded_size_bytes(records: Sequence[CocoRecord]) -> int:
    """Bytes the records' images take decoded (uint8 RGB), from their annotated sizes."""
    return sum(3 * r.height * r.width for r in records)


def decode_images(records: Sequence[CocoRecord]) -> List[np.ndarray]:
    """Every record's image, decoded once (uint8 (H, W, 3) RGB), checked against its size.

    For :class:`CocoDetectionDataset`'s ``decoded``: a dataset that fits in memory is
    then read from RAM instead of decoding a file per sample, which on a small CPU is
    most of what the data pipeline costs (docs/performance.md, "Training throughput").
    """
    images = []
    for record in records:
        rgb = read_image_rgb(record.file_name)
        _check_image_size(rgb, record)
        images.append(rgb)
    return images


class CocoDetectionDataset(torch.utils.data.Dataset):
    """Records as torchvision detection samples.

    Item ``i`` is ``(image, target)``: image float32 (3, H, W) RGB in [0, 1];
    target ``{"boxes": float32 (N, 4) XYXY, "labels": int64 (N,), "image_id": int}``.
    ``transforms`` is a callable ``(image, target) -> (image, target)``, such as
    :func:`hflip`. Resizing is left to the model
    (torchvision's ``GeneralizedRCNNTransform``). ``decoded``: the records'
    images already decoded (:func:`decode_images`), in the same order; the
    files are then not read again (the samples are identical).
    """

    def __init__(
        self, records: Sequence[CocoRecord], transforms: Optional[Transform] = None,
        decoded: Optional[Sequence[np.ndarray]] = None,
    ):  # fmt: skip
        self.records = list(records)
        self.transforms = transforms
        if decoded is not None and len(decoded) != len(self.records):
            raise ValueError(f"{len(decoded)} decoded images for {len(self.records)} records")
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Target]:
        record = self.records[index]
        if self.decoded is not None:
            rgb = self.decoded[index]
        else:
            rgb = read_image_rgb(record.file_name)
            _check_image_size(rgb, record)
        image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(255.0)
        target = {
            "boxes": torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(record.classes, dtype=torch.int64),
            "image_id": record.image_id,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def hflip(image: torch.Tensor, target: Target) -> Tuple[torch.Tensor, Target]:
    """An image (C, H, W) and its target mirrored left-right together (the target is copied)."""
    target = dict(target)
    target["boxes"] = hflip_boxes(target["boxes"], image.shape[-1])
    return image.flip(-1), target


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """XYXY boxes of an image of ``width`` pixels, mirrored left-right: x -> width - x."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def collate_detection(batch: Sequence[Tuple[torch.Tensor, Target]]) -> Tuple[List[torch.Tensor], List[Target]]:
    """(images, targets) lists: detection images differ in size, so they are not stacked."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
