"""Datasets on the Detectron2 side: the built-in shapes datasets and the
config's own COCO-format datasets (``DATASETS.COCO_INSTANCES``)."""
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils import comm

from ..data.builtin import ensure_generated, register_builtin_datasets
from ..data.coco import load_coco_detection, read_image_rgb
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
            classes = MetadataCatalog.get(name).get("thing_classes", None) if name in DatasetCatalog.list() else None
            if classes is None:
                continue  # known only once loaded (e.g. Detectron2's own COCO names: 80)
            if len(classes) > num_classes:
                raise ValueError(
                    f"{key} {name!r} has {len(classes)} categories but MODEL.RETINANET.NUM_CLASSES is "
                    f"{num_classes}: set MODEL.RETINANET.NUM_CLASSES {len(classes)}"
                )
            if key == "DATASETS.TEST" and len(classes) < num_classes:
                raise ValueError(
                    f"MODEL.RETINANET.NUM_CLASSES={num_classes} but {key} {name!r} has {len(classes)} categories: "
                    "detections of the extra classes would have no category in the evaluation"
                )


register_builtin_datasets()


class FileNamingDatasetMapper:
    """Detectron2's ``DatasetMapper`` whose errors name the image file (a truncated or
    corrupt image otherwise fails inside PIL / the worker with no file name)."""

    def __init__(self, cfg, is_train: bool = True):
        from detectron2.data import DatasetMapper

        self.mapper = DatasetMapper(cfg, is_train)

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except Exception as e:
            raise OSError(f"could not load image file {dataset_dict.get('file_name')}: {type(e).__name__}: {e}") from e


def check_test_images(cfg) -> None:
    """Decode every ``DATASETS.TEST`` image once, before training: a corrupt file fails now,
    naming it, instead of in the evaluation after the whole run (as on the torchvision path)."""
    for name in cfg.DATASETS.TEST:
        for record in DatasetCatalog.get(name):
            try:
                read_image_rgb(record["file_name"])  # the project's one image decoder, as the torchvision engine
            except OSError as e:
                raise OSError(f"DATASETS.TEST {name!r}: {e} (checked before training)") from None
