"""Data loading of the torchvision front-end: named datasets, deterministic
training order and augmentation, test loaders.

Dataset names (``DATASETS.TRAIN`` / ``DATASETS.TEST``) resolve like this:

1. ``DATASETS.COCO_INSTANCES``: a list of ``[name, json_file, image_root]``,
   the config's own COCO-format datasets;
2. the named datasets of :mod:`iou_aware_retinanet.data.builtin` (the
   synthetic shapes splits, generated on first use; Detectron2's COCO names;
   :func:`~iou_aware_retinanet.data.builtin.register_coco_dataset`).

Reproducibility: what the model sees at iteration ``i`` is a pure function of
``(seed, i)``, so that a run killed and resumed from a checkpoint computes
exactly what an uninterrupted run does.

* :class:`TrainingSampler`: an infinite stream of sample positions; position
  ``p`` is element ``p % N`` of epoch ``p // N``'s permutation, drawn from a
  ``torch.Generator`` seeded with ``(seed, epoch)``. Iteration ``i`` takes
  positions ``[i * B, (i + 1) * B)``; starting at any iteration needs no
  other state.
* :class:`SeededHorizontalFlip`: flips sample ``(epoch, index)`` when a
  ``torch.Generator`` seeded with ``(seed, epoch, index)`` says so, whatever
  DataLoader worker loads it.
"""
import hashlib
import json
import logging
import os
import time
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..data import builtin
from .distributed import get_rank, get_world_size
from ..data.config_datasets import check_num_classes, coco_instances_from_cfg
from ..data.coco import (
    CocoDetectionData,
    CocoDetectionDataset,
    CocoRecord,
    collate_detection,
    decode_images,
    decoded_size_bytes,
    hflip,
    load_coco_detection,
    read_image_rgb,
)

logger = logging.getLogger(__name__)

__all__ = [
    "UnknownDatasetError",
    "SeededHorizontalFlip",
    "TrainingDataset",
    "TrainingSampler",
    "build_flip",
    "build_test_loader",
    "build_train_loader",
    "check_batch_divisible",
    "decode_train_images",
    "dataset_categories",
    "dataset_class_names",
    "read_images",
    "derive_seed",
    "load_dataset",
    "load_train_records",
    "resolve_dataset",
]


class UnknownDatasetError(KeyError):
    """A dataset name that neither DATASETS.COCO_INSTANCES nor the built-in names define."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


def derive_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (and their order), the same on every machine."""
    digest = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- names


def resolve_dataset(cfg, name: str, key: str = "DATASETS") -> Tuple[str, str]:
    """(json file, image folder) of dataset ``name``; generates a built-in shapes split if needed.

    ``key`` (e.g. ``"DATASETS.TRAIN"``) is named in the error for an unknown name.
    """
    own = coco_instances_from_cfg(cfg)
    if name in own:
        return own[name]
    try:
        return builtin.builtin_dataset_paths(name)
    except KeyError:
        known = list(own) + builtin.builtin_dataset_names()
        raise UnknownDatasetError(
            f"{key}: unknown dataset {name!r}. Known names: {', '.join(known)}. Name your own COCO-format "
            "dataset with DATASETS.COCO_INSTANCES [[name, json_file, image_root]]."
        ) from None


def load_dataset(cfg, name: str, key: str = "DATASETS.TEST", drop_empty: bool = False) -> CocoDetectionData:
    """Read dataset ``name`` (see :func:`resolve_dataset`) and check it against the config's classes."""
    json_file, image_root = resolve_dataset(cfg, name, key)
    data = load_coco_detection(json_file, image_root, drop_images_without_boxes=drop_empty)
    check_num_classes(
        cfg.MODEL.RETINANET.NUM_CLASSES, data.num_classes, f"dataset {name!r}", key == "DATASETS.TEST", json_file
    )
    return data


def dataset_categories(cfg, name: str) -> Optional[List[Tuple[int, str]]]:
    """(COCO category id, name) of ``name``'s classes in contiguous order (increasing id),
    read without loading or generating images; None, with a warning, when unavailable."""
    if name in builtin.BUILTIN_SHAPES and name not in coco_instances_from_cfg(cfg):
        # The generator numbers the categories 1..K in this order.
        return [(i + 1, n) for i, n in enumerate(builtin.shapes_class_names(name))]
    try:
        json_file, _ = resolve_dataset(cfg, name)
        with open(json_file, "r", encoding="utf-8") as f:
            categories = json.load(f)["categories"]
        # Ids keep their type (strings stay strings, as in the ground truth); sorted as the reader sorts them.
        return [(c["id"] if isinstance(c["id"], str) else int(c["id"]), str(c["name"]))
                for c in sorted(categories, key=lambda c: c["id"])]  # fmt: skip
    except (OSError, KeyError, TypeError, ValueError) as e:
        logger.warning("categories of dataset %r unavailable (%s); using class indices", name, e)
        return None


def dataset_class_names(cfg, name: str) -> Optional[List[str]]:
    """Class names of ``name`` in contiguous order (see :func:`dataset_categories`)."""
    categories = dataset_categories(cfg, name)
    return None if categories is None else [n for _, n in categories]


def load_train_records(cfg) -> Tuple[List[CocoRecord], List[str]]:
    """Records of every ``DATASETS.TRAIN`` dataset, concatenated, and the class names.

    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` drops images without boxes, as in
    Detectron2. The datasets must share their categories.
    """
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty: nothing to train on")
    records, reference = [], None
    for name in names:
        data = load_dataset(cfg, name, "DATASETS.TRAIN", drop_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        categories = list(zip(data.category_ids, data.class_names))
        if reference is None:
            reference = (name, categories)
        elif categories != reference[1]:
            raise ValueError(
                f"DATASETS.TRAIN: datasets {reference[0]!r} and {name!r} have different categories "
                f"({reference[1]} vs {categories})"
            )
        records.extend(data.records)
    if not records:
        raise ValueError(
            f"DATASETS.TRAIN {names}: no training images left (DATALOADER.FILTER_EMPTY_ANNOTATIONS "
            f"is {cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS} and no image has a box)"
        )
    return records, [n for _, n in reference[1]]


# --------------------------------------------------------------------------- training order and augmentation


class TrainingSampler(Sampler):
    """Batches of ``(epoch, index)`` keys for iterations ``start_iter, start_iter + 1, ...`` (infinite).

    Sample position ``p = iteration * batch_size + j`` is ``index =
    perm_e[p % size]`` of epoch ``e = p // size``, ``perm_e`` being a random
    permutation from a generator seeded with ``(seed, e)``.

    With ``world_size`` processes, ``batch_size`` is the total batch (Detectron2's
    ``SOLVER.IMS_PER_BATCH``) and rank ``r`` yields its contiguous slice
    ``j in [r * b, (r + 1) * b)``, ``b = batch_size / world_size``, of every
    global batch: the ranks' batches of an iteration together are the one
    process batch of that iteration, from any ``start_iter``.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, start_iter: int = 0, shuffle: bool = True,
        rank: int = 0, world_size: int = 1,
    ):  # fmt: skip
        if size < 1 or batch_size < 1 or start_iter < 0:
            raise ValueError(f"need size >= 1, batch_size >= 1, start_iter >= 0; got {size}, {batch_size}, {start_iter}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(
                f"need 0 <= rank < world_size and batch_size divisible by world_size; got rank {rank}, "
                f"world_size {world_size}, batch_size {batch_size}"
            )
        self.size, self.batch_size, self.seed = size, batch_size, int(seed)
        self.start_iter, self.shuffle = start_iter, shuffle
        self.rank, self.world_size = rank, world_size

    def permutation(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        local = self.batch_size // self.world_size
        position = self.start_iter * self.batch_size
        epoch, perm = -1, []
        while True:
            batch = []
            first = position + self.rank * local
            for p in range(first, first + local):
                if p // self.size != epoch:
                    epoch = p // self.size
                    perm = self.permutation(epoch)
                batch.append((epoch, perm[p % self.size]))
            yield batch
            position += self.batch_size


class SeededHorizontalFlip:
    """Mirror sample ``(epoch, index)`` with probability ``prob``, decided by ``(seed, epoch, index)``."""

    def __init__(self, seed: int, prob: float = 0.5):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}")
        self.seed, self.prob = int(seed), prob

    def flips(self, epoch: int, index: int) -> bool:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index))
        return float(torch.rand((), generator=generator)) < self.prob

    def __call__(self, image: torch.Tensor, target: dict, epoch: int, index: int):
        if not self.flips(epoch, index):
            return image, target
        return hflip(image, target)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, prob={self.prob})"


def build_flip(cfg, seed: int) -> Optional[SeededHorizontalFlip]:
    """``INPUT.RANDOM_FLIP``: "horizontal" or "none"; anything else is an error."""
    flip = cfg.INPUT.RANDOM_FLIP
    if flip == "horizontal":
        return SeededHorizontalFlip(seed)
    if flip == "none":
        return None
    raise ValueError(
        f"INPUT.RANDOM_FLIP={flip!r} is not supported by the torchvision front-end; supported: 'horizontal', 'none'"
    )


class TrainingDataset(Dataset):
    """Records served by ``(epoch, index)`` keys (see :class:`TrainingSampler`), flipped by ``flip``;
    ``decoded``: the records' images decoded beforehand (see :func:`decode_train_images`)."""

    def __init__(self, records: Sequence[CocoRecord], flip: Optional[SeededHorizontalFlip] = None, decoded=None):
        self.base = CocoDetectionDataset(records, decoded=decoded)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        image, target = self.base[index]
        if self.flip is not None:
            image, target = self.flip(image, target, epoch, index)
        return image, target


# DATALOADER.CACHE_IMAGES refuses a dataset whose decoded images would take more than
# this share of the machine's memory (the data-loader workers share the cache, fork).
CACHE_MAX_MEMORY_FRACTION = 0.5


def _physical_memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def decode_train_images(cfg, records: Sequence[CocoRecord]):
    """``DATALOADER.CACHE_IMAGES``: every training image decoded once, before training
    (uint8, H x W x 3 bytes each), or None when the key is False.

    Decoding a PNG per sample is most of what the data pipeline costs on a
    small CPU; with the images in memory a sample is a conversion and a flip,
    cheap enough for the main process (``DATALOADER.NUM_WORKERS 0``). A dataset
    larger than half the machine's memory is refused with an error naming the key.
    """
    if not cfg.DATALOADER.CACHE_IMAGES:
        return None
    size, memory = decoded_size_bytes(records), _physical_memory_bytes()
    if memory is not None and size > CACHE_MAX_MEMORY_FRACTION * memory:
        raise ValueError(
            f"DATALOADER.CACHE_IMAGES: the {len(records)} training images take {size / 2**30:.1f} GiB decoded, "
            f"more than {CACHE_MAX_MEMORY_FRACTION:.0%} of this machine's {memory / 2**30:.1f} GiB; "
            "set DATALOADER.CACHE_IMAGES False (and DATALOADER.NUM_WORKERS > 0) for this dataset"
        )
    start = time.perf_counter()
    decoded = decode_images(records)
    logger.info(
        "Decoded the %d training images into memory (%.0f MB) in %.1f s (DATALOADER.CACHE_IMAGES)",
        len(records), size / 1e6, time.perf_counter() - start,
    )
    return decoded


def _worker_init(worker_id: int) -> None:
    # Nothing here draws from a global generator; keep numpy / random
    # deterministic anyway, for code that someone adds later.
    import random

    import numpy as np

    seed = torch.initial_seed() % (1 << 32)
    random.seed(seed)
    np.random.seed(seed)


def _loader(dataset, cfg, seed: int, **kwargs) -> DataLoader:
    num_workers = cfg.DATALOADER.NUM_WORKERS
    if num_workers < 0:
        raise ValueError(f"DATALOADER.NUM_WORKERS must be >= 0, got {num_workers}")
    return DataLoader(
        dataset,
        num_workers=num_workers,
        collate_fn=collate_detection,
        worker_init_fn=_worker_init if num_workers else None,
        # A private generator: creating the loader does not consume the global RNG.
        generator=torch.Generator().manual_seed(derive_seed(seed, 1)),
        **kwargs,
    )


def build_train_loader(cfg, seed: int, start_iter: int = 0, records: Optional[Sequence[CocoRecord]] = None):
    """Infinite loader of ``(images, targets)`` batches of ``SOLVER.IMS_PER_BATCH``, from ``start_iter`` on."""
    if records is None:
        records, _ = load_train_records(cfg)
    dataset = TrainingDataset(records, build_flip(cfg, seed), decode_train_images(cfg, records))
    world = get_world_size()
    check_batch_divisible(cfg, world)
    sampler = TrainingSampler(len(dataset), cfg.SOLVER.IMS_PER_BATCH, seed, start_iter, rank=get_rank(), world_size=world)
    return _loader(dataset, cfg, seed, batch_sampler=sampler)


def check_batch_divisible(cfg, world_size: int) -> None:
    """``SOLVER.IMS_PER_BATCH`` is the total batch over all processes (Detectron2's convention)."""
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is the total batch over all processes and "
            f"must be divisible by the number of processes ({world_size})"
        )


def build_test_loader(
    cfg, dataset_name: str, batch_size: int = 1, data: Optional[CocoDetectionData] = None,
    indices: Optional[Sequence[int]] = None,
):  # fmt: skip
    """Loader of ``dataset_name`` in file order (every image, annotated or not), with ``loader.data``
    the :class:`~iou_aware_retinanet.data.coco.CocoDetectionData` (class mapping, COCO ground truth).
    ``indices``: only these images (a process's shard), in this order."""
    if data is None:
        data = load_dataset(cfg, dataset_name, "DATASETS.TEST")
    dataset = CocoDetectionDataset(data.records)
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    loader = _loader(dataset, cfg, seed=0, batch_size=batch_size, shuffle=False)
    loader.data = data
    return loader


def read_images(paths: Sequence[str]) -> List[torch.Tensor]:
    """RGB float (3, H, W) images in [0, 1]; an error naming the first file that is missing or unreadable."""
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input image not found: {path}")
        rgb = read_image_rgb(path)
        images.append(torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float().div_(255.0))
    return images
