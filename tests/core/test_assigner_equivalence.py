"""The vectorised, chunked assigners against straightforward restatements of
what they implement (Detectron2's Matcher, the official ATSS loop), on random
multi-level anchor grids; chunking invariance; bounded memory."""
import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.ops import box_iou

from iou_aware_retinanet.benchmarks.assigners import make_retinanet_anchors
from iou_aware_retinanet.core import AnchorSet, build_assigner
from iou_aware_retinanet.core.assigners import BACKGROUND, IGNORE
from iou_aware_retinanet.core import boxes as boxes_module

from .assigner_inputs import NUM_CLASSES as K
from .assigner_inputs import random_grid, random_gts, shuffled_within_levels
from .reference_atss import reference_atss

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
D2_MISSING_REASON = (
    "Detectron2 is not installed (it is not on PyPI; build it from source): the comparison "
    "with detectron2.modeling.matcher.Matcher itself is skipped, the restatement above still runs"
)


# ------------------------------------------------------------------- Max-IoU
def matcher_reference(iou: torch.Tensor):
    """Detectron2's ``Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)``
    restated on a full (G, A) IoU matrix: (matches, match_labels in {0, -1, 1})."""
    matched_vals, matches = iou.max(dim=0)
    match_labels = torch.ones_like(matches)
    match_labels[matched_vals < 0.4] = 0
    match_labels[(matched_vals >= 0.4) & (matched_vals < 0.5)] = -1
    for g in range(iou.shape[0]):
        # Every anchor tied for the GT's highest IoU, even when that IoU is 0.
        match_labels[iou[g] == iou[g].max()] = 1
    return matches, match_labels


def labels_from_matcher(matches, match_labels, gt_classes):
    labels = gt_classes[matches].clone()
    labels[match_labels == 0] = K
    labels[match_labels == -1] = -1
    return labels


def max_iou_inputs(seed: int):
    """Random grid and GTs, plus duplicated GTs and anchors (exact ties), plus a
    GT far outside the grid (best IoU 0)."""
    anchors = random_grid(seed)
    gt_boxes, gt_classes = random_gts(seed, 1 + seed % 15, anchors)
    gt_boxes = torch.cat([gt_boxes, gt_boxes[:1], torch.tensor([[5000.0, 5000, 5010, 5010]])])
    gt_classes = torch.cat([gt_classes, (gt_classes[:1] + 1) % K, torch.tensor([1])])
    boxes = torch.cat([anchors.boxes, anchors.boxes[-7:]])  # duplicates in a last level
    anchors = AnchorSet(boxes, anchors.num_per_level + (7,), anchors.num_per_location)
    return anchors, gt_boxes, gt_classes


def compare_with_matcher(out, iou, gt_classes, matcher):
    """Detectron2 would make every anchor foreground for the GT with best IoU 0
    (the deliberate difference): compare against the Matcher run on the GTs that
    overlap some anchor, and map its GT indices back."""
    overlapping = torch.nonzero(iou.max(dim=1).values > 0).squeeze(1)
    assert overlapping.numel() < iou.shape[0]  # the input has a non-overlapping GT
    matches, match_labels = matcher(iou[overlapping])
    expected = labels_from_matcher(overlapping[matches], match_labels, gt_classes)
    assert torch.equal(out.labels, expected)
    fg = match_labels == 1
    assert torch.equal(out.matched_gt[fg], overlapping[matches[fg]])
    assert torch.equal(out.matched_gt[match_labels == 0], torch.full_like(matches[match_labels == 0], BACKGROUND))
    assert torch.equal(out.matched_gt[match_labels == -1], torch.full_like(matches[match_labels == -1], IGNORE))


@pytest.mark.parametrize("seed", range(8))
def test_max_iou_equals_matcher_restatement(seed):
    anchors, gt_boxes, gt_classes = max_iou_inputs(seed)
    out = build_assigner("max_iou", K)(anchors, gt_boxes, gt_classes)
    iou = box_iou(gt_boxes, anchors.boxes)
    compare_with_matcher(out, iou, gt_classes, matcher_reference)
    # The deliberate difference itself: Detectron2's rule on all GTs would turn
    # (nearly) every anchor foreground because of the far GT.
    _, all_labels = matcher_reference(iou)
    assert bool((all_labels == 1).all()) and out.num_foreground < len(anchors)


@pytest.mark.skipif(not HAS_DETECTRON2, reason=D2_MISSING_REASON)
@pytest.mark.parametrize("seed", range(8))
def test_max_iou_equals_detectron2_matcher(seed):
    from detectron2.modeling.matcher import Matcher
    from detectron2.structures import Boxes, pairwise_iou

    anchors, gt_boxes, gt_classes = max_iou_inputs(seed)
    out = build_assigner("max_iou", K)(anchors, gt_boxes, gt_classes)
    iou = pairwise_iou(Boxes(gt_boxes), Boxes(anchors.boxes))
    compare_with_matcher(out, iou, gt_classes, Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True))


# ---------------------------------------------------------------------- ATSS
@pytest.mark.parametrize("seed", range(16))
def test_atss_equals_official_per_gt_loop(seed):
    """Default options (topk 9) and a smaller topk, on grids with several levels
    and anchors per location; continuous random GT centres, so no distance ties
    between locations. Half the cases scramble the anchor order inside levels."""
    anchors = random_grid(seed)
    if seed % 2:
        anchors = shuffled_within_levels(anchors, seed)
    gt_boxes, gt_classes = random_gts(seed, 4 + (seed * 7) % 30, anchors)
    num_foreground = 0
    for kwargs in ({}, {"topk": 3}):
        out = build_assigner("atss", K, **kwargs)(anchors, gt_boxes, gt_classes)
        expected = reference_atss(anchors, gt_boxes, **kwargs)
        assert torch.equal(out.matched_gt, expected)
        fg = expected >= 0
        assert torch.equal(out.labels[fg], gt_classes[expected[fg]])
        assert bool((out.labels[~fg] == K).all())
        num_foreground += out.num_foreground
    assert num_foreground > 0


def test_atss_equals_official_loop_on_a_real_size_image():
    """A 400x600 image with the real RetinaNet anchor configuration (P3-P7, 9
    anchors per location)."""
    anchors = make_retinanet_anchors((400, 600))
    gt_boxes, gt_classes = random_gts(3, 40, anchors, min_size=8)
    out = build_assigner("atss", K)(anchors, gt_boxes, gt_classes)
    assert torch.equal(out.matched_gt, reference_atss(anchors, gt_boxes))


def test_make_retinanet_anchors_layout():
    """800x1333 -> padded 800x1344 -> 100x168, 50x84, 25x42, 13x21, 7x11
    locations x 9 anchors = 201,600; location-major, anchor-minor."""
    anchors = make_retinanet_anchors((800, 1333))
    assert anchors.num_per_level == tuple(9 * n for n in (16800, 4200, 1050, 273, 77))
    assert len(anchors) == 201_600 and anchors.num_per_location == 9
    centres = (anchors.boxes[:, :2] + anchors.boxes[:, 2:]) / 2
    torch.testing.assert_close(centres[:9], torch.zeros(9, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(centres[9:18], torch.tensor([[8.0, 0.0]]).expand(9, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(centres[9 * 168], torch.tensor([0.0, 8.0]), atol=1e-4, rtol=0)
    areas = (anchors.boxes[:9, 2] - anchors.boxes[:9, 0]) * (anchors.boxes[:9, 3] - anchors.boxes[:9, 1])
    expected = torch.tensor([32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)]).repeat_interleave(3) ** 2
    torch.testing.assert_close(areas, expected)
    level4 = anchors.boxes[-77 * 9:]
    assert float(level4[:, 2].sub(level4[:, 0]).min()) > 512 * 0.7  # sizes grow per level


# ------------------------------------------------------------------ chunking
CHUNKED_CASES = [
    ("max_iou", {}),
    ("topk", {"topk": 5}),
    ("topk", {"topk": 9, "min_iou": 0.2}),
    ("atss", {}),
    ("atss", {"ensure_positive": True}),
]


@pytest.mark.parametrize("name, kwargs", CHUNKED_CASES)
@pytest.mark.parametrize("seed", range(3))
def test_results_do_not_depend_on_the_block_size(name, kwargs, seed):
    """max_block_elements=1 forces one GT per block."""
    anchors = random_grid(100 + seed)
    gt_boxes, gt_classes = random_gts(seed, 25, anchors)
    gt_boxes = torch.cat([gt_boxes, gt_boxes[:3]])  # duplicates: ties across blocks
    gt_classes = torch.cat([gt_classes, gt_classes[:3]])
    whole = build_assigner(name, K, **kwargs)(anchors, gt_boxes, gt_classes)
    small = build_assigner(name, K, max_block_elements=len(anchors) * 2, **kwargs)(anchors, gt_boxes, gt_classes)
    tiny = build_assigner(name, K, max_block_elements=1, **kwargs)(anchors, gt_boxes, gt_classes)
    for out in (small, tiny):
        assert torch.equal(out.labels, whole.labels)
        assert torch.equal(out.matched_gt, whole.matched_gt)
    assert whole.num_foreground > 0


# -------------------------------------------------------------------- memory
class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


MANY_GTS = 1000
BLOCK = 1 << 18  # 262k elements: a full 1000 x 45k IoU matrix would be 45M


@pytest.fixture(scope="module")
def crowded_image():
    """44,973 anchors (a 400x560 image, P3-P7, 9 per location) and 1,000 GTs."""
    anchors = make_retinanet_anchors((400, 560))
    gt_boxes, gt_classes = random_gts(0, MANY_GTS, anchors, min_size=4, max_size=200)
    return anchors, gt_boxes, gt_classes


@pytest.mark.parametrize("name", ["max_iou", "topk"])
def test_iou_blocks_stay_bounded(name, crowded_image, monkeypatch):
    anchors, gt_boxes, gt_classes = crowded_image
    largest = []

    original = boxes_module.pairwise_box_iou

    def recording_box_iou(boxes1, boxes2):
        iou = original(boxes1, boxes2)
        largest.append(iou.numel())
        return iou

    monkeypatch.setattr(boxes_module, "pairwise_box_iou", recording_box_iou)
    out = build_assigner(name, K, max_block_elements=BLOCK)(anchors, gt_boxes, gt_classes)
    assert len(largest) > 1 and max(largest) <= BLOCK
    assert out.num_foreground > 0


@pytest.mark.parametrize("name, kwargs", [("max_iou", {}), ("topk", {}), ("atss", {}),
                                          ("atss", {"ensure_positive": True})])
def test_no_gt_by_anchor_matrix_is_ever_allocated(name, kwargs, crowded_image):
    """Every tensor created during assignment stays within a small multiple of
    the block (the IoU of a block builds a few (g, A) planes) or of
    the per-anchor / per-candidate sizes, far below the 50M-element GT x anchor
    matrix. For ATSS the block holds the (g, locations) distances and the
    (G, candidates) IoUs: G x 405 here."""
    anchors, gt_boxes, gt_classes = crowded_image
    num_anchors = len(anchors)
    num_candidates = len(anchors.num_per_level) * 9 * anchors.num_per_location
    bound = max(2 * BLOCK, 4 * num_anchors, 4 * MANY_GTS * num_candidates)
    assert bound < MANY_GTS * num_anchors / 8
    recorder = LargestTensor()
    with recorder:
        out = build_assigner(name, K, max_block_elements=BLOCK, **kwargs)(anchors, gt_boxes, gt_classes)
    assert 0 < recorder.numel <= bound
    assert out.num_foreground > 0
