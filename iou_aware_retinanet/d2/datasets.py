"""Datasets on the Detectron2 side: the built-in shapes datasets and the
config's own COCO-format datasets (``DATASETS.COCO_INSTANCES``), checked as on
the torchvision path, and evaluated against the same ground truth."""
import functools
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from PIL import Image

from ..data.builtin import ensure_generated, register_builtin_datasets
from ..data.coco import check_image_headers, check_images_decode, load_coco_detection
from ..data.config_datasets import check_num_classes as _check_num_classes
from ..data.config_datasets import coco_instances_from_cfg


def register_config_datasets(cfg) -> None:
    """Register every ``[name, json_file, image_root]`` of ``DATASETS.COCO_INSTANCES``
    with ``register_coco_instances``, and generate the built-in datasets the
    config trains or tests on (``COCOEvaluator`` reads their json directly)."""
    for name, (json_file, image_root) in coco_instances_from_cfg(cfg).items():
        if name in DatasetCatalog.list():
            known = MetadataCatalog.get(name)
            if (known.get("json_file"), known.get("image_root")) != (json_file, image_root):
                raise ValueError(f"dataset {name!r} is already registered with other files")
            continue
        # The project's checked reader first: a malformed json, missing images or bad
        # boxes get errors / counts naming the file, not a raw JSONDecodeError or a
        # silent drop inside Detectron2's loader.
        data = load_coco_detection(json_file, image_root)
        register_coco_instances(name, {}, json_file, image_root)
        MetadataCatalog.get(name).set(thing_classes=list(data.class_names))
    # One process per machine writes the files; the others wait for it.
    if comm.get_local_rank() == 0:
        ensure_generated(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    comm.synchronize()


def check_num_classes(cfg) -> None:
    """``MODEL.RETINANET.NUM_CLASSES`` against the categories of the train and test datasets."""
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
        for name in names:
            metadata = MetadataCatalog.get(name) if name in DatasetCatalog.list() else None
            classes = metadata.get("thing_classes", None) if metadata is not None else None
            if classes is None:
                continue  # known only once loaded (e.g. Detectron2's own COCO names: 80)
            _check_num_classes(
                num_classes, len(classes), f"{key} {name!r}", key == "DATASETS.TEST", metadata.get("json_file", "")
            )


register_builtin_datasets()


# PIL modes of more than 8 bits per channel: Detectron2's reader converts them to RGB by
# clipping at 255 (a 16-bit image turns white), where the torchvision path scales them.
_WIDE_PIL_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def check_8_bit(file_name: str) -> None:
    """Refuse an image Detectron2's reader would saturate (16-bit, 32-bit), naming the file;
    reads the header only."""
    with Image.open(file_name) as image:
        mode = image.mode
    if mode in _WIDE_PIL_MODES:
        raise ValueError(
            f"image file {file_name} has {mode!r} pixels (more than 8 bits): Detectron2's reader clips them at "
            "255 (the image turns white). Convert it to 8 bits, or use the torchvision front-end, which scales it"
        )


class FileNamingDatasetMapper:
    """Detectron2's ``DatasetMapper`` whose errors name the image file (a truncated or
    corrupt image otherwise fails inside PIL / the worker with no file name), and which
    refuses images of more than 8 bits (:func:`check_8_bit`)."""

    def __init__(self, cfg, is_train: bool = True):
        from detectron2.data import DatasetMapper

        self.mapper = DatasetMapper(cfg, is_train)

    def __call__(self, dataset_dict):
        try:
            check_8_bit(dataset_dict["file_name"])
            return self.mapper(dataset_dict)
        except Exception as e:
            raise OSError(f"could not load image file {dataset_dict.get('file_name')}: {type(e).__name__}: {e}") from e


def check_test_images(cfg) -> None:
    """Decode every ``DATASETS.TEST`` image once before training, comparing its size with the
    annotated one (the torchvision engine's check): a corrupt or wrongly sized test image fails
    now, naming it, instead of in the evaluation after the whole run."""
    for name in cfg.DATASETS.TEST:
        records = DatasetCatalog.get(name)
        check_images_decode(
            ((r["file_name"], r["height"], r["width"]) for r in records), f"DATASETS.TEST {name!r}"
        )
        for record in records:
            try:
                check_8_bit(record["file_name"])
            except (OSError, ValueError) as e:
                raise type(e)(f"DATASETS.TEST {name!r}: {e} (checked before training)") from None


def check_train_images(cfg) -> None:
    """Read the header of every ``DATASETS.TRAIN`` image before training: a file that is no
    image, has another size than annotated, or that Detectron2 would saturate
    (:func:`check_8_bit`) fails now, not when the loader first meets it."""
    for name in cfg.DATASETS.TRAIN:
        records = DatasetCatalog.get(name)
        check_image_headers(((r["file_name"], r["height"], r["width"]) for r in records), f"DATASETS.TRAIN {name!r}")
        for record in records:
            try:
                check_8_bit(record["file_name"])
            except (OSError, ValueError) as e:
                raise type(e)(f"DATASETS.TRAIN {name!r}: {e} (checked before training)") from None


def _ground_truth(json_file: str, image_root: str):
    stat = os.stat(json_file)  # a rewritten file is read again
    return _read_ground_truth(json_file, image_root, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_ground_truth(json_file: str, image_root: str, mtime_ns: int, size: int):
    return load_coco_detection(json_file, image_root).coco


class CheckedCOCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator`` against the ground truth the torchvision front-end uses:
    the project's reader's repaired annotations (boxes clipped to the image, the ones training
    skips left out, ``iscrowd`` / ``area`` filled; see :mod:`iou_aware_retinanet.data.coco`),
    instead of the raw json, which fails on a missing ``area`` after training."""

    def __init__(self, dataset_name: str, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        json_file, image_root = self._metadata.get("json_file", None), self._metadata.get("image_root", None)
        if json_file and image_root:
            self._coco_api = _ground_truth(json_file, image_root)
