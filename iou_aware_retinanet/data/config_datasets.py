"""The config's own COCO-format datasets, ``DATASETS.COCO_INSTANCES``, read for both
front-ends: a list of ``[name, json_file, image_root]``."""
from typing import Dict, Tuple

__all__ = ["coco_instances_from_cfg"]


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
