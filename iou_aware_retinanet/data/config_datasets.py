"""What both front-ends read of the config's datasets: ``DATASETS.COCO_INSTANCES`` (a list of
``[name, json_file, image_root]``), and ``MODEL.RETINANET.NUM_CLASSES`` against their categories."""
import logging
from typing import Dict, Tuple

__all__ = ["coco_instances_from_cfg", "check_num_classes"]

logger = logging.getLogger(__name__)


def coco_instances_from_cfg(cfg) -> Dict[str, Tuple[str, str]]:
    """``{name: (json_file, image_root)}`` of ``cfg.DATASETS.COCO_INSTANCES``, in config order.

    An entry that is not three non-empty strings, or a name given twice with
    different files, is a ValueError naming the key; a repeated identical entry
    counts once.
    """
    datasets: Dict[str, Tuple[str, str]] = {}
    for entry in cfg.DATASETS.COCO_INSTANCES:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 3
            or not all(isinstance(v, str) and v for v in entry)
        ):
            raise ValueError(
                f"DATASETS.COCO_INSTANCES entries are [name, json_file, image_root] (three strings), got {entry!r}"
            )
        name, json_file, image_root = entry
        if name in datasets and datasets[name] != (json_file, image_root):
            raise ValueError(f"DATASETS.COCO_INSTANCES names {name!r} twice, with different files")
        datasets[name] = (json_file, image_root)
    return datasets


def check_num_classes(num_classes: int, num_categories: int, dataset: str, is_test: bool, source: str = "") -> None:
    """``MODEL.RETINANET.NUM_CLASSES`` against the categories of ``dataset`` (words naming it,
    e.g. ``"DATASETS.TEST 'val'"``; ``source``: its json file), before any training: more
    categories than classes is an error; so are more classes than a test dataset has
    categories (detections of the extra classes would have no category to be evaluated as);
    a training dataset with fewer categories only gets a warning (the extra classes never
    get a positive)."""
    of = f" (categories of {source})" if source else ""
    if num_categories > num_classes:
        raise ValueError(
            f"{dataset} has {num_categories} categories but MODEL.RETINANET.NUM_CLASSES is {num_classes}{of}: "
            f"set MODEL.RETINANET.NUM_CLASSES {num_categories}"
        )
    if num_categories < num_classes and is_test:
        raise ValueError(
            f"MODEL.RETINANET.NUM_CLASSES={num_classes} but {dataset} has {num_categories} categories{of}: "
            f"detections of classes {num_categories}..{num_classes - 1} would have no category. "
            f"Set MODEL.RETINANET.NUM_CLASSES {num_categories}."
        )
    if num_categories < num_classes:
        logger.warning(
            "%s has %d categories, MODEL.RETINANET.NUM_CLASSES is %d: the extra classes never get a positive",
            dataset, num_categories, num_classes,
        )
