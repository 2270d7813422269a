"""Named datasets, for both front-ends.

Built-in synthetic datasets (see :mod:`iou_aware_retinanet.data.synthetic`),
generated on first use under ``$IOU_AWARE_RETINANET_DATASETS`` (default
``./datasets``, relative to the working directory, like Detectron2's
``DETECTRON2_DATASETS``):

=======================  ======  ====  ==========  ===============================================
name                     images  seed  difficulty  files
=======================  ======  ====  ==========  ===============================================
``shapes_train``         2000    0     standard    shapes/train/, shapes/annotations/instances_train.json
``shapes_val``           300     1     standard    shapes/val/, shapes/annotations/instances_val.json
``shapes_mini_train``    16      2     standard    shapes/mini_train/, .../instances_mini_train.json
``shapes_mini_val``      16      3     standard    shapes/mini_val/, .../instances_mini_val.json
``shapes_hard_train``    1000    0     hard        shapes_hard/train/, .../instances_train.json
``shapes_hard_val``      200     1     hard        shapes_hard/val/, .../instances_val.json
=======================  ======  ====  ==========  ===============================================

The difficulties are :data:`~iou_aware_retinanet.data.synthetic.SHAPES_PRESETS`:
"standard" (128 px, objects from 16 px, no distractors, at least 75 % of
every object visible) is what a small model learns from scratch on a CPU in
minutes; "hard" is ShapesSpec's defaults (256 px, objects from 8 px, heavy
clutter including outlines of the shapes, 50 % occlusion).

Detectron2's COCO names, resolved the way Detectron2 does (under
``$DETECTRON2_DATASETS``, default ``./datasets``) so that the torchvision
front-end accepts them too; they are never generated or downloaded:
``coco_2017_train``, ``coco_2017_val``, ``coco_2017_val_100``.

Your own COCO-format dataset: with Detectron2, register it with
``detectron2.data.datasets.register_coco_instances(name, {}, json_file,
image_root)``; with the torchvision front-end, pass the json file and image
folder directly, or name them with :func:`register_coco_dataset`.

:func:`register_builtin_datasets` registers the shapes datasets in
Detectron2's ``DatasetCatalog`` / ``MetadataCatalog``; loading one through the
catalog generates it first. ``COCOEvaluator`` reads ``metadata.json_file``
itself, without going through the catalog, hence :func:`ensure_generated`,
which the trainer calls for its train and test datasets before it starts.
"""
import functools
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from .synthetic import SHAPES_PRESETS, ShapesSpec, dataset_fingerprint, dataset_paths, generate_shapes_dataset

logger = logging.getLogger("iou_aware_retinanet.data")

DATASETS_ENV = "IOU_AWARE_RETINANET_DATASETS"
DETECTRON2_DATASETS_ENV = "DETECTRON2_DATASETS"


@dataclass(frozen=True)
class ShapesSplit:
    """A named split of the synthetic shapes dataset."""

    split: str
    num_images: int
    seed: int
    spec: ShapesSpec = ShapesSpec()
    name: str = "shapes"  # folder under the datasets root


_STANDARD = SHAPES_PRESETS["standard"]
_HARD = SHAPES_PRESETS["hard"]

BUILTIN_SHAPES: Dict[str, ShapesSplit] = {
    # The default: learnable from scratch on a CPU in minutes (128 px).
    "shapes_train": ShapesSplit("train", 2000, seed=0, spec=_STANDARD),
    "shapes_val": ShapesSplit("val", 300, seed=1, spec=_STANDARD),
    # For tests and smoke runs: a few seconds to generate and train on.
    "shapes_mini_train": ShapesSplit("mini_train", 16, seed=2, spec=_STANDARD),
    "shapes_mini_val": ShapesSplit("mini_val", 16, seed=3, spec=_STANDARD),
    # ShapesSpec's defaults (256 px, 8 px objects, heavy clutter and occlusion).
    "shapes_hard_train": ShapesSplit("train", 1000, seed=0, spec=_HARD, name="shapes_hard"),
    "shapes_hard_val": ShapesSplit("val", 200, seed=1, spec=_HARD, name="shapes_hard"),
}

# name -> (image folder, json file), relative to $DETECTRON2_DATASETS: Detectron2's layout.
BUILTIN_COCO: Dict[str, Tuple[str, str]] = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
    "coco_2017_val_100": ("coco/val2017", "coco/annotations/instances_val2017_100.json"),
}

# Filled by register_coco_dataset: name -> (json file, image folder).
_USER_DATASETS: Dict[str, Tuple[str, str]] = {}
# The root each shapes dataset was registered with in Detectron2, so that
# ensure_generated writes where the catalog (and COCOEvaluator) will read.
_REGISTERED_ROOTS: Dict[str, str] = {}


def datasets_root() -> str:
    """Where the built-in synthetic datasets live: $IOU_AWARE_RETINANET_DATASETS or ./datasets."""
    return os.path.expanduser(os.environ.get(DATASETS_ENV, "datasets"))


def detectron2_datasets_root() -> str:
    """Where Detectron2 looks for COCO: $DETECTRON2_DATASETS or ./datasets."""
    return os.path.expanduser(os.environ.get(DETECTRON2_DATASETS_ENV, "datasets"))


def builtin_dataset_names() -> List[str]:
    """Every name :func:`builtin_dataset_paths` resolves."""
    return list(BUILTIN_SHAPES) + list(BUILTIN_COCO) + list(_USER_DATASETS)


def shapes_class_names(name: str) -> List[str]:
    """Class names of a built-in shapes dataset, in contiguous-index order."""
    return list(_shapes_split(name).spec.classes)


def _shapes_split(name: str) -> ShapesSplit:
    if name not in BUILTIN_SHAPES:
        raise KeyError(f"{name!r} is not a built-in shapes dataset; those are: {', '.join(BUILTIN_SHAPES)}")
    return BUILTIN_SHAPES[name]


def _generate(name: str, root: str) -> Tuple[str, str]:
    split = _shapes_split(name)
    return generate_shapes_dataset(root, split.split, split.num_images, split.seed, spec=split.spec, name=split.name)


def _coco_paths(name: str) -> Tuple[str, str]:
    """Paths of a Detectron2 COCO name, with an error naming what is missing."""
    image_rel, json_rel = BUILTIN_COCO[name]
    root = detectron2_datasets_root()
    json_file, image_root = os.path.join(root, json_rel), os.path.join(root, image_rel)
    for path, what in ((json_file, "annotation file"), (image_root, "image folder")):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"dataset {name!r}: {what} {path} not found. Put COCO 2017 under "
                f"${DETECTRON2_DATASETS_ENV}/coco (now {root}) as Detectron2's datasets/README.md describes."
            )
    return json_file, image_root


def builtin_dataset_paths(name: str, root: Optional[str] = None) -> Tuple[str, str]:
    """(json file, image folder) of a named dataset; generates a shapes dataset if needed.

    ``root`` overrides :func:`datasets_root` for the shapes datasets (read
    when called: a Detectron2 registration made earlier with another root
    does not change it).
    Raises KeyError for an unknown name and FileNotFoundError when a COCO
    dataset is not on disk.
    """
    if name in BUILTIN_SHAPES:
        return _generate(name, root or datasets_root())
    if name in BUILTIN_COCO:
        return _coco_paths(name)
    if name in _USER_DATASETS:
        return _USER_DATASETS[name]
    raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(builtin_dataset_names())}")


def ensure_generated(names: Iterable[str], root: Optional[str] = None) -> List[str]:
    """Generate the built-in shapes datasets among ``names`` unless already on disk.

    Writes under ``root`` if given, else under the root the dataset was
    registered with in Detectron2 (where ``metadata.json_file`` points), else
    under :func:`datasets_root`. Other names (COCO, users' own) are left
    alone: there is nothing to generate. Returns the json files of the shapes
    datasets. Safe to call from several processes at once (every file is
    written atomically), though each then does the work.
    """
    return [
        _generate(name, root or _REGISTERED_ROOTS.get(name) or datasets_root())[0]
        for name in names
        if name in BUILTIN_SHAPES
    ]


def shapes_fingerprints(datasets: Mapping[str, Tuple[str, str]]) -> Dict[str, str]:
    """Data fingerprints (:func:`~iou_aware_retinanet.data.synthetic.dataset_fingerprint`)
    of the built-in shapes datasets among ``datasets`` (name -> (json file, image folder),
    as resolved for a run).

    A name counts only where it resolved to the generated copy (a user's
    ``DATASETS.COCO_INSTANCES`` entry of the same name is left out); other
    datasets are left out too: hashing the pixels of a COCO-size dataset would
    take minutes. A few seconds for ``shapes_train`` (2,000 PNGs decoded).
    """
    out = {}
    for name, (json_file, image_root) in datasets.items():
        if name not in BUILTIN_SHAPES:
            continue
        split = BUILTIN_SHAPES[name]
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(json_file))))  # <root>/<name>/annotations/
        generated = [os.path.normpath(p) for p in dataset_paths(root, split.split, split.name)]
        if generated == [os.path.normpath(os.path.abspath(p)) for p in (json_file, image_root)]:
            out[name] = dataset_fingerprint(json_file, image_root)
    return out


def log_data_fingerprints(datasets: Mapping[str, Tuple[str, str]]) -> Dict[str, str]:
    """Log (and return) :func:`shapes_fingerprints` of ``datasets``: what a run trained and was evaluated on."""
    fingerprints = shapes_fingerprints(datasets)
    for name, fingerprint in fingerprints.items():
        logger.info("Data fingerprint of %s (sha256 of decoded pixels and annotations): %s", name, fingerprint)
    return fingerprints


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """Name a COCO-format dataset for the torchvision front-end.

    With Detectron2, use ``detectron2.data.datasets.register_coco_instances``.
    """
    if name in BUILTIN_SHAPES or name in BUILTIN_COCO:
        raise ValueError(f"{name!r} is a built-in dataset name; choose another")
    if name in _USER_DATASETS and _USER_DATASETS[name] != (json_file, image_root):
        raise ValueError(f"dataset {name!r} is already registered with {_USER_DATASETS[name]}")
    _USER_DATASETS[name] = (json_file, image_root)


def _load_shapes_dicts(name: str, root: str):
    """What Detectron2's DatasetCatalog calls: generate if needed, then read as COCO."""
    from detectron2.data.datasets import load_coco_json

    json_file, image_root = _generate(name, root)
    return load_coco_json(json_file, image_root, name)


def register_builtin_datasets(root: Optional[str] = None) -> List[str]:
    """Register the shapes datasets with Detectron2's catalogs; return the names newly registered.

    Registration writes nothing: a dataset is generated when the catalog
    first loads it, or by :func:`ensure_generated`. Names already in the
    ``DatasetCatalog`` are left as they are, so calling this twice is
    harmless (the first root wins). Detectron2 registers the COCO names itself.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = root or datasets_root()
    registered = []
    for name, split in BUILTIN_SHAPES.items():
        if name in DatasetCatalog:
            continue
        json_file, image_root = dataset_paths(root, split.split, split.name)
        DatasetCatalog.register(name, functools.partial(_load_shapes_dicts, name, root))
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(split.spec.classes),
        )
        _REGISTERED_ROOTS[name] = root
        registered.append(name)
    return registered
