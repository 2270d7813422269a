"""Inputs shared by the assigner tests: hand-written anchor sets and random
multi-level anchor grids with random ground truth."""
import torch

from iou_aware_retinanet.benchmarks.assigners import make_retinanet_anchors, random_gt_boxes
from iou_aware_retinanet.core import AnchorSet

NUM_CLASSES = 3  # K: background label is 3


def anchor_set(boxes, num_per_level=None, num_per_location=1) -> AnchorSet:
    """An AnchorSet from a list of (x1, y1, x2, y2); one level unless told."""
    boxes = torch.tensor(boxes, dtype=torch.float32)
    if num_per_level is None:
        num_per_level = (boxes.shape[0],)
    return AnchorSet(boxes, tuple(num_per_level), num_per_location)


def gts(boxes, classes=None):
    """(G, 4) float boxes and (G,) classes (0, 1, 2, 0, ... unless given)."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if classes is None:
        classes = [i % NUM_CLASSES for i in range(boxes.shape[0])]
    return boxes, torch.tensor(classes, dtype=torch.long)


def random_grid(seed: int, small: bool = True) -> AnchorSet:
    """A real RetinaNet-style anchor grid (several levels, several anchors per
    location, location-major), with a random image size, level count and
    anchor shapes so the tests see many layouts."""
    gen = torch.Generator().manual_seed(seed)

    def randint(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    num_levels = randint(2, 4)
    height, width = (randint(48, 128), randint(48, 160)) if small else (randint(300, 500), randint(300, 600))
    num_scales, num_ratios = randint(1, 3), randint(1, 3)
    scales = [2 ** (i / num_scales) for i in range(num_scales)]
    ratios = [0.5, 1.0, 2.0][:num_ratios]
    strides = [8 * 2**i for i in range(num_levels)]
    sizes = [4 * s for s in strides]
    return make_retinanet_anchors((height, width), strides, sizes, scales, ratios, size_divisibility=8)


def image_size_of(anchors: AnchorSet):
    """(height, width) covered by the first level's anchor centres."""
    first = anchors.boxes[: anchors.num_per_level[0]]
    centres = (first[:, :2] + first[:, 2:]) / 2
    return float(centres[:, 1].max()) + 1, float(centres[:, 0].max()) + 1


def random_gts(seed: int, num_gts: int, anchors: AnchorSet, min_size=2.0, max_size=None):
    """Random boxes with continuous random centres inside the anchor grid's image."""
    height, width = image_size_of(anchors)
    max_size = max_size or 0.8 * min(height, width)
    return random_gt_boxes(num_gts, (height, width), NUM_CLASSES, seed=seed,
                           min_size=min_size, max_size=max_size)


def shuffled_within_levels(anchors: AnchorSet, seed: int) -> AnchorSet:
    """Same anchors, order scrambled inside each level (anchors of a location no
    longer consecutive), which the assigners must not care about."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.cat([torch.randperm(s.stop - s.start, generator=gen) + s.start
                      for s in anchors.level_slices()])
    return AnchorSet(anchors.boxes[perm], anchors.num_per_level, anchors.num_per_location)
