"""Static assigners (Max-IoU, TopK, ATSS) on tiny hand-made anchor layouts whose
expected labels are derived in the comments, plus the shared input handling:
empty and degenerate ground truth, bad classes, bad names and options."""
import math

import pytest
import torch

from iou_aware_retinanet.core import DegenerateBoxWarning, available_assigners, build_assigner
from iou_aware_retinanet.core.assigners import BACKGROUND, IGNORE

from .assigner_inputs import NUM_CLASSES as K
from .assigner_inputs import anchor_set, gts

FAR = [100, 100, 110, 110]  # overlaps nothing in the cases below


# ------------------------------------------------------------------- Max-IoU
def test_max_iou_thresholds_and_ignore_band():
    """GT [0,0,10,10] (area 100) against anchors that are its top part:
    IoU = height / 10. 1.0 and 0.5 (>= 0.5) are foreground, 0.45 and 0.4
    (in [0.4, 0.5)) ignored, 0.3 and 0 (< 0.4) background. The low-quality rule
    adds nothing: the GT's best anchor (IoU 1) is foreground already."""
    anchors = anchor_set([[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4.5], [0, 0, 10, 4],
                          [0, 0, 10, 3], FAR])
    out = build_assigner("max_iou", K)(anchors, *gts([[0, 0, 10, 10]], [1]))
    assert out.labels.tolist() == [1, 1, -1, -1, K, K]
    assert out.matched_gt.tolist() == [0, 0, IGNORE, IGNORE, BACKGROUND, BACKGROUND]
    assert out.num_foreground == 2


def test_max_iou_low_quality_matches_include_ties():
    """GT 0 [0,0,10,10] is matched normally by anchor 0 (IoU 1). GT 1
    [200,200,210,210] overlaps anchors 1 and 2 with IoU 0.3 each (a 10x3 strip at
    its bottom and at its top) and anchor 3 with 0.2: its best IoU 0.3 < 0.4, so
    both tied best anchors become foreground (label 2) by the low-quality rule;
    anchor 3 stays background. Without the rule GT 1 gets nothing."""
    anchors = anchor_set([[0, 0, 10, 10], [200, 200, 210, 203], [200, 207, 210, 210],
                          [200, 200, 210, 202], FAR])
    gt_boxes, gt_classes = gts([[0, 0, 10, 10], [200, 200, 210, 210]], [0, 2])
    out = build_assigner("max_iou", K)(anchors, gt_boxes, gt_classes)
    assert out.labels.tolist() == [0, 2, 2, K, K]
    assert out.matched_gt.tolist() == [0, 1, 1, BACKGROUND, BACKGROUND]

    strict = build_assigner("max_iou", K, allow_low_quality_matches=False)(anchors, gt_boxes, gt_classes)
    assert strict.labels.tolist() == [0, K, K, K, K]


def test_max_iou_low_quality_anchor_keeps_its_own_best_gt():
    """GT A [0,0,10,10] and GT B [0,0,10,40]. Anchor 0 [0,0,10,12] has IoU
    100/120 = 0.83 with A and 120/400 = 0.3 with B; it is B's best anchor, so the
    low-quality rule makes it foreground, but (Detectron2's Matcher) it learns
    from its own best GT, A. B ends with no anchor."""
    anchors = anchor_set([[0, 0, 10, 12], FAR])
    out = build_assigner("max_iou", K)(anchors, *gts([[0, 0, 10, 10], [0, 0, 10, 40]], [1, 2]))
    assert out.matched_gt.tolist() == [0, BACKGROUND]
    assert out.labels.tolist() == [1, K]


def test_max_iou_gt_overlapping_nothing_makes_no_low_quality_match():
    """A GT with best IoU 0 has every anchor "tied" for its best; Detectron2 would
    turn them all foreground. The project deliberately matches none."""
    anchors = anchor_set([[0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30]])
    out = build_assigner("max_iou", K)(anchors, *gts([[500, 500, 510, 510]], [1]))
    assert out.labels.tolist() == [K, K, K]
    assert out.matched_gt.tolist() == [BACKGROUND] * 3


def test_max_iou_equal_iou_goes_to_the_first_gt():
    """Two identical GTs: every anchor's IoU ties; like argmax, GT 0 wins."""
    anchors = anchor_set([[0, 0, 10, 10], [0, 0, 10, 6], FAR])
    out = build_assigner("max_iou", K)(anchors, *gts([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 2]))
    assert out.matched_gt.tolist() == [0, 0, BACKGROUND]
    assert out.labels.tolist() == [1, 1, K]


def test_max_iou_custom_thresholds():
    """A single threshold 0.35 with labels (background, foreground): 0.4 -> fg."""
    anchors = anchor_set([[0, 0, 10, 4], [0, 0, 10, 3]])
    out = build_assigner("max_iou", K, thresholds=[0.35], labels=[0, 1],
                         allow_low_quality_matches=False)(anchors, *gts([[0, 0, 10, 10]], [0]))
    assert out.labels.tolist() == [0, K]


# ---------------------------------------------------------------------- TopK
TOPK_ANCHORS = [[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 6], FAR]


def test_topk_takes_k_best_per_gt():
    """GT [0,0,10,10]: IoUs 1.0, 0.8, 0.6, 0 -> k = 2 takes anchors 0 and 1."""
    out = build_assigner("topk", K, topk=2)(anchor_set(TOPK_ANCHORS), *gts([[0, 0, 10, 10]], [2]))
    assert out.matched_gt.tolist() == [0, 0, BACKGROUND, BACKGROUND]
    assert out.labels.tolist() == [2, 2, K, K]


def test_topk_conflict_goes_to_higher_iou():
    """GT 0 [0,0,10,10] claims anchors 0 (IoU 1) and 1 (0.8); GT 1 [0,0,10,8]
    claims anchors 1 (IoU 1) and 0 (0.8; anchor 2 has 60/80 = 0.75). Anchor 0
    goes to GT 0, anchor 1 to GT 1; anchor 2 was claimed by nobody."""
    out = build_assigner("topk", K, topk=2)(anchor_set(TOPK_ANCHORS),
                                         *gts([[0, 0, 10, 10], [0, 0, 10, 8]], [0, 1]))
    assert out.matched_gt.tolist() == [0, 1, BACKGROUND, BACKGROUND]
    assert out.labels.tolist() == [0, 1, K, K]


def test_topk_min_iou_floor():
    """k = 3 would take IoUs 1.0, 0.8, 0.6; min_iou 0.7 drops the 0.6 claim."""
    out = build_assigner("topk", K, topk=3, min_iou=0.7)(anchor_set(TOPK_ANCHORS), *gts([[0, 0, 10, 10]]))
    assert out.matched_gt.tolist() == [0, 0, BACKGROUND, BACKGROUND]


def test_topk_never_takes_iou_zero_anchors():
    """A 1x1 GT touches only anchor 0 (IoU 1/100); k = 3 does not fill up its
    quota with anchors that do not overlap it."""
    anchors = anchor_set([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30], FAR])
    out = build_assigner("topk", K, topk=3)(anchors, *gts([[50, 50, 51, 51]], [1]))
    assert out.matched_gt.tolist() == [0, BACKGROUND, BACKGROUND, BACKGROUND]


# ---------------------------------------------------------------------- ATSS
def test_atss_threshold_is_mean_plus_unbiased_std():
    """GT [0,0,10,10], centre (5,5), one level, topk 6. Candidate anchors
    (6 nearest centres) are sub-boxes of the GT, IoU = their area / 100:
      0 [0,0,10,8]  IoU 0.8, centre (5,4)    1 [0,0,10,7]  IoU 0.7, centre (5,3.5)
      2..5 1-px strips along the four sides, IoU 0.1, centres 4.5 px away.
    Anchor 6 (centre 20 px away) is not a candidate.
    mean = 1.9 / 6 = 0.3167; unbiased std = sqrt(0.5683 / 5) = 0.3372;
    threshold 0.654 -> anchors 0 and 1 (centres inside) are foreground. (With the
    biased std, 0.3078, the threshold would be 0.624: same here.)"""
    anchors = anchor_set([[0, 0, 10, 8], [0, 0, 10, 7], [0, 0, 10, 1], [0, 9, 10, 10],
                          [0, 0, 1, 10], [9, 0, 10, 10], [20, 0, 30, 10]])
    gt_boxes, gt_classes = gts([[0, 0, 10, 10]], [1])
    assigner = build_assigner("atss", K, topk=6)
    cand_idx, cand_iou = assigner.candidates(anchors, gt_boxes)
    assert sorted(cand_idx[0].tolist()) == [0, 1, 2, 3, 4, 5]
    ious = torch.tensor([0.8, 0.7, 0.1, 0.1, 0.1, 0.1])
    assert cand_iou[0].sort(descending=True).values.tolist() == pytest.approx(ious.tolist(), abs=1e-6)
    assert float(ious.mean() + ious.std()) == pytest.approx(0.6539, abs=1e-4)
    out = assigner(anchors, gt_boxes, gt_classes)
    assert out.matched_gt.tolist() == [0, 0] + [BACKGROUND] * 5
    assert out.labels.tolist() == [1, 1] + [K] * 5


def test_atss_unbiased_std_matters():
    """GT [0,0,10,10], topk 4: candidates [0,0,10,5] (IoU 0.5), [0,5.5,10,10]
    (0.45) and two neighbours with IoU 0. mean 0.2375; sum of squared
    deviations 0.2269. Unbiased std sqrt(0.2269 / 3) = 0.2750 -> threshold
    0.5125: no positive (the official torch.std). A biased std,
    sqrt(0.2269 / 4) = 0.2382, would give 0.4757 and make anchor 0 positive."""
    anchors = anchor_set([[0, 0, 10, 5], [0, 5.5, 10, 10], [10, 0, 20, 10], [-10, 0, 0, 10], FAR])
    gt_boxes, gt_classes = gts([[0, 0, 10, 10]], [0])
    assigner = build_assigner("atss", K, topk=4)
    _, cand_iou = assigner.candidates(anchors, gt_boxes)
    assert sorted(cand_iou[0].tolist(), reverse=True) == pytest.approx([0.5, 0.45, 0, 0], abs=1e-6)
    out = assigner(anchors, gt_boxes, gt_classes)
    assert out.num_foreground == 0


def test_atss_candidate_centre_must_be_inside_by_more_than_eps():
    """GT [0,0,10,10], topk 5. Candidate 0 is the wide anchor [-10,0,10.01,10]
    (IoU 100/200.1 = 0.4998, centre x = 0.005); four 0.5-px strips inside the GT
    have IoU 0.05. mean 0.1400, unbiased std 0.2011 -> threshold 0.3411: anchor 0
    passes the IoU test but its centre is only 0.005 px inside (<= 0.01), so the
    GT gets no positive. Widening it to x2 = 10.03 puts the centre 0.015 px
    inside: then it is foreground."""
    strips = [[0, 0, 10, 0.5], [0, 9.5, 10, 10], [0, 0, 0.5, 10], [9.5, 0, 10, 10], FAR]
    gt_boxes, gt_classes = gts([[0, 0, 10, 10]], [2])
    assigner = build_assigner("atss", K, topk=5)
    out = assigner(anchor_set([[-10, 0, 10.01, 10]] + strips), gt_boxes, gt_classes)
    assert out.num_foreground == 0
    out = assigner(anchor_set([[-10, 0, 10.03, 10]] + strips), gt_boxes, gt_classes)
    assert out.matched_gt.tolist() == [0] + [BACKGROUND] * 5
    assert out.labels.tolist() == [2] + [K] * 5


def test_atss_candidates_are_k_times_anchors_per_location_per_level():
    """Two levels, 2 concentric anchors per location, topk 1 -> each level gives
    the 2 anchors of its nearest location. GT centre (7,5): level 0 locations
    (5,5) and (15,5) -> anchors 0, 1; level 1 locations (10,10) and (30,10) ->
    anchors 4, 5. Scrambling the order inside levels (anchors of a location no
    longer consecutive) must give the same candidate boxes."""
    boxes = [[0, 0, 10, 10], [-5, -5, 15, 15], [10, 0, 20, 10], [5, -5, 25, 15],  # level 0
             [0, 0, 20, 20], [-10, -10, 30, 30], [20, 0, 40, 20], [10, -10, 50, 30]]  # level 1
    anchors = anchor_set(boxes, num_per_level=(4, 4), num_per_location=2)
    gt_boxes, _ = gts([[2, 0, 12, 10]])
    assigner = build_assigner("atss", K, topk=1)
    cand_idx, _ = assigner.candidates(anchors, gt_boxes)
    assert sorted(cand_idx[0].tolist()) == [0, 1, 4, 5]

    perm = [1, 3, 2, 0, 6, 4, 7, 5]
    scrambled = anchor_set([boxes[i] for i in perm], num_per_level=(4, 4), num_per_location=2)
    cand_idx, _ = assigner.candidates(scrambled, gt_boxes)
    assert sorted(perm[i] for i in cand_idx[0].tolist()) == [0, 1, 4, 5]


def test_atss_small_level_takes_all_its_anchors():
    """topk 9 x 1 anchor per location, but level 1 has only 2 anchors: both are
    candidates (k is capped by the level size), level 0 gives its 3."""
    anchors = anchor_set([[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10],
                          [0, 0, 40, 40], [40, 0, 80, 40]], num_per_level=(3, 2))
    cand_idx, _ = build_assigner("atss", K).candidates(anchors, gts([[0, 0, 10, 10]])[0])
    assert sorted(cand_idx[0].tolist()) == [0, 1, 2, 3, 4]


# Conflict: GT A [0,0,10,10] (centre (5,5)) and GT B [0,0,10,12] (centre (5,6)),
# topk 3, one level. Anchor 0 [0,0,10,11] has IoU 100/110 = 0.909 with A and
# 110/120 = 0.917 with B; anchor 1 [0,0,10,1] (IoU 0.1 with A, 0.083 with B);
# anchor 2 [0,10,10,11] (IoU 0 with A, 0.083 with B); anchor 3 far away.
# A: IoUs 0.909, 0.1, 0 -> threshold 0.336 + 0.499 = 0.835: anchor 0.
# B: IoUs 0.917, 0.083, 0.083 -> threshold 0.361 + 0.481 = 0.842: anchor 0.
# Anchor 0 goes to B (higher IoU); A is left without a positive.
CONFLICT_ANCHORS = [[0, 0, 10, 11], [0, 0, 10, 1], [0, 10, 10, 11], FAR]
CONFLICT_GTS = [[0, 0, 10, 10], [0, 0, 10, 12]]


def test_atss_conflict_goes_to_higher_iou():
    out = build_assigner("atss", K, topk=3)(anchor_set(CONFLICT_ANCHORS), *gts(CONFLICT_GTS, [0, 1]))
    assert out.matched_gt.tolist() == [1, BACKGROUND, BACKGROUND, BACKGROUND]
    assert out.labels.tolist() == [1, K, K, K]
    # Swapping the GTs' order does not change who wins.
    out = build_assigner("atss", K, topk=3)(anchor_set(CONFLICT_ANCHORS), *gts(CONFLICT_GTS[::-1], [1, 0]))
    assert out.matched_gt.tolist() == [0, BACKGROUND, BACKGROUND, BACKGROUND]


def test_atss_ensure_positive_does_not_steal_another_gts_anchor():
    """In the conflict case above, ensure_positive gives starved GT A its best
    *free* candidate, anchor 1 (IoU 0.1), not B's anchor 0."""
    out = build_assigner("atss", K, topk=3, ensure_positive=True)(
        anchor_set(CONFLICT_ANCHORS), *gts(CONFLICT_GTS, [0, 1]))
    assert out.matched_gt.tolist() == [1, 0, BACKGROUND, BACKGROUND]
    assert out.labels.tolist() == [1, 0, K, K]


def test_atss_threshold_above_every_candidate_and_ensure_positive():
    """GT [0,0,10,10], topk 3: candidates 0 [0,0,10,6] (IoU 0.6), 1 [0,4.1,10,10]
    (0.59), 2 [10,0,20,10] (0). mean 0.3967, unbiased std 0.3436 -> threshold
    0.740 > 0.6: no positive at all (ATSS issue 90), the official behaviour and
    the default. ensure_positive=True gives the GT its best candidate, anchor 0."""
    anchors = anchor_set([[0, 0, 10, 6], [0, 4.1, 10, 10], [10, 0, 20, 10], FAR])
    gt_boxes, gt_classes = gts([[0, 0, 10, 10]], [2])
    out = build_assigner("atss", K, topk=3)(anchors, gt_boxes, gt_classes)
    assert out.labels.tolist() == [K] * 4
    assert out.matched_gt.tolist() == [BACKGROUND] * 4
    out = build_assigner("atss", K, topk=3, ensure_positive=True)(anchors, gt_boxes, gt_classes)
    assert out.matched_gt.tolist() == [0, BACKGROUND, BACKGROUND, BACKGROUND]
    assert out.labels.tolist() == [2, K, K, K]


def test_atss_thin_gt_without_candidate_centre_inside():
    """Thin GT [1.2,0,1.7,10] (0.5 px wide, centre (1.45,5)). topk 3: anchor 0
    [0,0,2,10] contains it (IoU 5/20 = 0.25) but its centre x = 1 is outside;
    anchors 1, 2 have IoU 0. Threshold = 0.0833 + 0.1443 = 0.228 < 0.25, so only
    the centre rule rejects anchor 0: no positive. ensure_positive waives the
    centre rule for a starved GT's best candidate."""
    anchors = anchor_set([[0, 0, 2, 10], [-10, 0, 0, 10], [5, 0, 15, 10], FAR])
    gt_boxes, gt_classes = gts([[1.2, 0, 1.7, 10]], [1])
    assigner = build_assigner("atss", K, topk=3)
    _, cand_iou = assigner.candidates(anchors, gt_boxes)
    ious = cand_iou[0]
    assert float(ious.mean() + ious.std()) < 0.25
    assert build_assigner("atss", K, topk=3)(anchors, gt_boxes, gt_classes).num_foreground == 0
    out = build_assigner("atss", K, topk=3, ensure_positive=True)(anchors, gt_boxes, gt_classes)
    assert out.matched_gt.tolist() == [0, BACKGROUND, BACKGROUND, BACKGROUND]


def test_atss_ensure_positive_gives_up_without_overlap():
    """A GT overlapping none of its candidates (IoU 0) stays without positive."""
    anchors = anchor_set([[0, 0, 10, 10], [20, 0, 30, 10]])
    out = build_assigner("atss", K, topk=1, ensure_positive=True)(anchors, *gts([[12, 0, 18, 10]]))
    assert out.num_foreground == 0


def test_atss_never_ignores():
    """ATSS has no ignore band: every anchor is foreground or background."""
    anchors = anchor_set([[0, 0, 10, 10], [0, 0, 10, 4.5], [0, 0, 10, 4], [3, 3, 13, 13], FAR])
    out = build_assigner("atss", K, topk=5)(anchors, *gts([[0, 0, 10, 10]]))
    assert set(out.labels.tolist()) <= {0, K}
    assert IGNORE not in out.matched_gt.tolist()


# ----------------------------------------------------- shared input handling
ALL_STATIC = ["max_iou", "topk", "atss"]


@pytest.mark.parametrize("name", ALL_STATIC)
def test_empty_gt_is_all_background(name):
    anchors = anchor_set([[0, 0, 10, 10], [5, 5, 15, 15], FAR])
    out = build_assigner(name, K)(anchors, torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.long))
    assert out.labels.tolist() == [K] * 3
    assert out.matched_gt.tolist() == [BACKGROUND] * 3
    assert out.labels.dtype == out.matched_gt.dtype == torch.long


@pytest.mark.parametrize("name", ALL_STATIC)
def test_degenerate_gts_are_dropped_and_indices_keep_caller_numbering(name):
    """GTs 0 (zero width), 1 (negative height) and 3 (NaN) are dropped with a
    warning; GT 2 and GT 4 keep their indices: anchors identical to them are
    matched to 2 and 4, with their classes."""
    anchors = anchor_set([[0, 0, 10, 10], [50, 50, 60, 60], FAR])
    gt_boxes = torch.tensor([[0, 0, 0, 10], [0, 10, 10, 0], [0, 0, 10, 10],
                             [math.nan, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    gt_classes = torch.tensor([0, 0, 1, 0, 2])
    kwargs = {"topk": 1} if name in ("atss", "topk") else {}
    with pytest.warns(DegenerateBoxWarning, match="3 ground-truth box"):
        out = build_assigner(name, K, **kwargs)(anchors, gt_boxes, gt_classes)
    assert out.matched_gt.tolist() == [2, 4, BACKGROUND]
    assert out.labels.tolist() == [1, 2, K]


@pytest.mark.parametrize("name", ALL_STATIC)
def test_only_degenerate_gts_is_all_background(name):
    anchors = anchor_set([[0, 0, 10, 10], FAR])
    with pytest.warns(DegenerateBoxWarning):
        out = build_assigner(name, K)(anchors, *gts([[0, 0, 10, 0], [5, 5, 5, 5]]))
    assert out.labels.tolist() == [K, K]
    assert out.matched_gt.tolist() == [BACKGROUND, BACKGROUND]


@pytest.mark.parametrize("bad_class", [-1, K])
def test_gt_class_out_of_range(bad_class):
    anchors = anchor_set([[0, 0, 10, 10]])
    with pytest.raises(ValueError, match="gt_classes"):
        build_assigner("max_iou", K)(anchors, *gts([[0, 0, 10, 10]], [bad_class]))


def test_gt_shapes_are_checked():
    anchors = anchor_set([[0, 0, 10, 10]])
    with pytest.raises(ValueError, match="gt_boxes"):
        build_assigner("atss", K)(anchors, torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="gt_classes"):
        build_assigner("atss", K)(anchors, torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))


def test_build_assigner_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="nope") as info:
        build_assigner("nope", 3)
    for name in ["atss", "max_iou", "topk"]:
        assert name in str(info.value)
    assert set(ALL_STATIC) <= set(available_assigners())


@pytest.mark.parametrize("name, kwargs", [
    ("max_iou", {"not_an_option": 1}),
    ("topk", {"k": 0}),
    ("topk", {"min_iou": 1.5}),
    ("atss", {"topk": 0}),
    ("atss", {"k": 9}),  # ATSS's option is called topk
    ("max_iou", {"thresholds": [0.5, 0.4]}),
    ("max_iou", {"thresholds": [0.4, 0.5], "labels": [0, 1]}),
    ("max_iou", {"labels": [0, 2, 1]}),
])
def test_build_assigner_bad_options(name, kwargs):
    with pytest.raises(ValueError):
        build_assigner(name, K, **kwargs)


def test_num_classes_must_be_positive():
    with pytest.raises(ValueError, match="num_classes"):
        build_assigner("atss", 0)
