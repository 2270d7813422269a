"""Dynamic assigners (Noisy-anchor, HAMBox, task-aligned): hand-computed cases,
numerical guards and invariants over random inputs."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iou_aware_retinanet.core import AnchorSet, Predictions, build_assigner
from iou_aware_retinanet.core.assigners import BACKGROUND, IGNORE
from iou_aware_retinanet.core.assigners.noisy_anchor import cleanliness

K = 3  # classes


def _anchors(boxes):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    return AnchorSet(boxes, (len(boxes),), 1)


def _predictions(pred_boxes, probs=None, ious=None):
    pred_boxes = torch.tensor(pred_boxes, dtype=torch.float32)
    if probs is None:
        probs = torch.full((len(pred_boxes), K), 0.1)
    return Predictions(cls_probs=torch.as_tensor(probs, dtype=torch.float32), boxes=pred_boxes,
                       ious=None if ious is None else torch.as_tensor(ious, dtype=torch.float32))


FAR = [[200, 200, 210, 210], [300, 300, 310, 310], [400, 400, 410, 410],
       [500, 500, 510, 510], [600, 600, 610, 610]]


# ---------------------------------------------------------------- HAMBox
def _hambox(**kwargs):
    base = build_assigner("max_iou", K, thresholds=[0.35], labels=[0, 1], allow_low_quality_matches=False)
    return build_assigner("hambox", K, base=base, **kwargs)


def test_hambox_compensates_k_minus_m_best_regressed_anchors():
    """GT [0,0,10,10]: anchors 0, 1 match it statically (IoU 1 and 0.8 >= 0.35).
    Anchors 2-6 are far away (anchor IoU 0) but regress onto the GT with IoU
    0.9, 0.7, 0.6, 0.5 and 0. K = 5, M = 2: the K - M = 3 best with IoU > 0.5
    (anchors 2, 3, 4) are compensated with classification weights = their
    regressed IoU; anchor 5 (IoU 0.5 >= T, not selected) is ignored; anchor 6
    stays background."""
    anchors = _anchors([[0, 0, 10, 10], [0, 0, 10, 8]] + FAR)
    preds = _predictions([[0, 0, 10, 10], [0, 0, 10, 8],
                          [0, 0, 10, 9], [0, 0, 10, 7], [0, 0, 10, 6], [0, 0, 10, 5],
                          [600, 600, 610, 610]])
    out = _hambox(anchors_per_gt=5, regressed_iou_threshold=0.5)(anchors, torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([2]), preds)
    assert out.matched_gt.tolist() == [0, 0, 0, 0, 0, IGNORE, BACKGROUND]
    assert out.labels.tolist() == [2, 2, 2, 2, 2, -1, K]
    torch.testing.assert_close(out.cls_weights, torch.tensor([1, 1, 0.9, 0.7, 0.6, 1, 1]))
    assert out.box_weights is None and out.cls_targets is None


def test_hambox_takes_only_k_minus_m_and_ignores_the_rest():
    """Four well-regressed unmatched anchors, room for three."""
    anchors = _anchors([[0, 0, 10, 10], [0, 0, 10, 8]] + FAR[:4])
    preds = _predictions([[0, 0, 10, 10], [0, 0, 10, 8],
                          [0, 0, 10, 9], [0, 0, 10, 8], [0, 0, 10, 7], [0, 0, 10, 6]])
    out = _hambox(anchors_per_gt=5, regressed_iou_threshold=0.5)(anchors, torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0]), preds)
    assert out.matched_gt.tolist() == [0, 0, 0, 0, 0, IGNORE]


def test_hambox_gt_with_enough_anchors_gets_none_and_conflicts_go_to_higher_iou():
    """K = 2. GT 0 already has 2 static anchors (0, 1); GT 1 has none. Far
    anchors 2 and 3 regress onto GT 1 with IoU 0.9 and 0.8: GT 1 takes both.
    Anchor 4 regresses onto GT 0 with IoU 0.7, but GT 0 is full: ignored."""
    anchors = _anchors([[0, 0, 10, 10], [0, 0, 10, 9]] + FAR[:3])
    preds = _predictions([[0, 0, 10, 10], [0, 0, 10, 9],
                          [20, 0, 30, 9], [20, 0, 30, 8], [0, 0, 10, 7]])
    gts = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
    out = _hambox(anchors_per_gt=2, regressed_iou_threshold=0.5)(anchors, gts, torch.tensor([0, 1]), preds)
    # GT 1 takes its 2 best (0.9, 0.8); anchor 4 overlaps GT 0 (0.7 >= T) but
    # GT 0 is full: ignored, not a negative.
    assert out.matched_gt.tolist() == [0, 0, 1, 1, IGNORE]
    torch.testing.assert_close(out.cls_weights, torch.tensor([1, 1, 0.9, 0.8, 1]))


def test_hambox_anchor_wanted_by_two_gts_goes_to_the_higher_regressed_iou():
    anchors = _anchors(FAR[:2])
    # Anchor 0's box overlaps GT 0 with IoU 0.6 and GT 1 with IoU 0.8.
    gts = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 7.5]])
    preds = _predictions([[0, 0, 10, 6], [600, 600, 610, 610]])
    iou0, iou1 = 0.6, 6 / 7.5
    out = _hambox(anchors_per_gt=1, regressed_iou_threshold=0.5)(anchors, gts, torch.tensor([0, 1]), preds)
    assert out.matched_gt.tolist() == [1, BACKGROUND]
    assert out.cls_weights[0].item() == pytest.approx(iou1)
    assert iou1 > iou0


def test_hambox_rejects_a_dynamic_base():
    dynamic = build_assigner("noisy_anchor", K)
    with pytest.raises(ValueError, match="static"):
        build_assigner("hambox", K, base=dynamic)


# ---------------------------------------------------------- Noisy anchor
def test_cleanliness_hand_computed():
    """loc = [0.9, 0.5], cls = [0.6, 0.2], alpha = 0.75.
    c_raw = 0.75 * loc / 0.7 + 0.25 * cls / 0.4 = [1.339286, 0.660714]
    rescaled into [mean(loc), 1] = [0.7, 1]: [1.0, 0.7].
    f(loc) = [10, 2] / 6, f(cls) = [2.5, 1.25] / 1.875:
    r = 0.75 * [5/3, 1/3] + 0.25 * [4/3, 2/3] = [19/12, 5/12] (mean 1)."""
    soft, weights = cleanliness(torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.2]), alpha=0.75)
    torch.testing.assert_close(soft, torch.tensor([1.0, 0.7]))
    torch.testing.assert_close(weights, torch.tensor([19 / 12, 5 / 12]))


@pytest.mark.parametrize(
    "loc, cls",
    [
        ([1.0, 0.5, 0.2], [0.3, 0.3, 0.9]),  # a perfect box: f(1) is infinite
        ([0.5, 0.5], [1.0, 0.2]),  # a certain classifier
        ([0.4, 0.4, 0.4], [0.2, 0.2, 0.2]),  # all candidates equal
        ([0.0, 0.0], [0.0, 0.0]),  # nothing regressed, nothing classified
        ([0.7], [0.6]),  # a single candidate
    ],
)
def test_cleanliness_is_finite_at_the_edges(loc, cls):
    soft, weights = cleanliness(torch.tensor(loc), torch.tensor(cls), alpha=0.75)
    assert torch.isfinite(soft).all() and torch.isfinite(weights).all()
    assert ((soft >= 0) & (soft <= 1)).all()
    assert (weights > 0).all()
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-4)


def test_all_equal_candidates_get_hard_labels():
    soft, weights = cleanliness(torch.tensor([0.4, 0.4]), torch.tensor([0.2, 0.2]), alpha=0.75)
    torch.testing.assert_close(soft, torch.ones(2))
    torch.testing.assert_close(weights, torch.ones(2))


def test_noisy_anchor_assigner_end_to_end():
    """Two anchors on the GT (top-k = 2), one far. Predicted boxes give loc =
    [0.9, 0.5]; predicted probabilities of the GT class (1) give cls = [0.6, 0.2]:
    the values of the hand-computed case above."""
    anchors = _anchors([[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]])
    probs = [[0.1, 0.6, 0.1], [0.1, 0.2, 0.1], [0.1, 0.9, 0.1]]
    preds = _predictions([[0, 0, 10, 9], [0, 0, 10, 5], [50, 50, 60, 60]], probs)
    out = build_assigner("noisy_anchor", K, topk=2)(anchors, torch.tensor([[0.0, 0, 10, 10]]),
                                                     torch.tensor([1]), preds)
    assert out.matched_gt.tolist() == [0, 0, BACKGROUND]
    assert out.labels.tolist() == [1, 1, K]
    torch.testing.assert_close(out.cls_targets[:2], torch.tensor([1.0, 0.7]))
    torch.testing.assert_close(out.cls_weights, torch.tensor([19 / 12, 5 / 12, 1.0]))
    torch.testing.assert_close(out.box_weights, out.cls_weights)


def test_noisy_anchor_candidate_learns_from_its_max_iou_gt():
    """Top-1 per GT: GT 0 takes anchor 0 (IoU 1), GT 1 takes anchor 1 (IoU 1).
    Each candidate learns from its own max-IoU GT (anchor 0 overlaps GT 1 with
    0.5 only)."""
    anchors = _anchors([[0, 0, 10, 10], [0, 0, 20, 10], [50, 50, 60, 60]])
    preds = _predictions([[0, 0, 10, 10], [0, 0, 20, 10], [50, 50, 60, 60]])
    gts = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 10]])
    out = build_assigner("noisy_anchor", K, topk=1)(anchors, gts, torch.tensor([0, 2]), preds)
    assert out.matched_gt.tolist() == [0, 1, BACKGROUND]



def test_noisy_anchor_takes_no_anchor_that_misses_every_gt():
    """Top-k larger than the anchors a GT overlaps: anchors 2 and 3 overlap neither
    GT (IoU 0), so they are no candidates of anything and stay background, rather
    than filling the top-k and being matched to GT 0 (the argmax of an all-zero
    IoU column) as positives of an object they do not touch."""
    anchors = _anchors([[0, 0, 10, 10], [100, 100, 110, 110], [50, 50, 60, 60], [200, 0, 210, 10]])
    gts = torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110]])
    preds = _predictions(anchors.boxes.tolist())
    out = build_assigner("noisy_anchor", K, topk=3)(anchors, gts, torch.tensor([0, 2]), preds)
    assert out.matched_gt.tolist() == [0, 1, BACKGROUND, BACKGROUND]
    assert out.labels.tolist() == [0, 2, K, K]
    # Background anchors keep the default weight; the candidates' weights average to 1.
    assert out.cls_weights[2:].tolist() == [1.0, 1.0]
    torch.testing.assert_close(out.cls_weights[:2].mean(), torch.tensor(1.0))


def test_noisy_anchor_with_a_gt_that_overlaps_no_anchor():
    anchors = _anchors([[0, 0, 10, 10], [50, 50, 60, 60]])
    out = build_assigner("noisy_anchor", K, topk=2)(
        anchors, torch.tensor([[100.0, 100, 110, 110]]), torch.tensor([1]), _predictions(anchors.boxes.tolist())
    )
    assert out.matched_gt.tolist() == [BACKGROUND, BACKGROUND]
    assert out.labels.tolist() == [K, K]

# ---------------------------------------------------------- task aligned
def test_task_aligned_hand_computed():
    """One GT [0,0,10,10] of class 0; three anchors with centres inside, one
    outside. Predicted boxes give u = [1.0, 0.8, 0.5, 1.0], p(class 0) =
    [0.5, 0.9, 0.9, 0.9]. t = p * u^6 = [0.5, 0.2359, 0.0141, 0.9].
    top-k = 3 takes anchors 3, 0, 1; anchor 3's centre is outside the GT, so
    positives are 0 and 1. t_hat = t / max(t) * max(u) over them =
    [1.0, 0.2359 / 0.5 * 1.0]."""
    anchors = _anchors([[0, 0, 10, 10], [2, 2, 8, 8], [1, 1, 9, 9], [20, 20, 30, 30]])
    preds = _predictions(
        [[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 5], [0, 0, 10, 10]],
        [[0.5, 0.1, 0.1], [0.9, 0.1, 0.1], [0.9, 0.1, 0.1], [0.9, 0.1, 0.1]],
    )
    out = build_assigner("task_aligned", K, topk=3)(anchors, torch.tensor([[0.0, 0, 10, 10]]),
                                                     torch.tensor([0]), preds)
    assert out.matched_gt.tolist() == [0, 0, BACKGROUND, BACKGROUND]
    t = torch.tensor([0.5, 0.9 * 0.8**6])
    expected = t / (t.max() + 1e-7) * 1.0
    torch.testing.assert_close(out.cls_targets[:2], expected)
    assert out.cls_targets[2:].eq(0).all()
    torch.testing.assert_close(out.box_weights, out.cls_targets)


def test_task_aligned_conflict_goes_to_the_higher_predicted_iou():
    """Anchor 0 is the top-1 candidate of both GTs. Its predicted box
    [2,2,18,17] has IoU 240/400 = 0.6 with GT 0 and 240/256 = 0.9375 with GT 1;
    metrics: GT 0 0.99 * 0.6^6 = 0.046 > GT 1 0.02 * 0.9375^6 = 0.014. TOOD
    resolves by IoU, not metric: GT 1 wins."""
    anchors = _anchors([[0, 0, 20, 20], [100, 100, 110, 110]])
    gts = torch.tensor([[0.0, 0, 20, 20], [2, 2, 18, 18]])
    preds = _predictions([[2, 2, 18, 17], [100, 100, 110, 110]],
                         [[0.99, 0.02, 0.1], [0.1, 0.1, 0.1]])
    out = build_assigner("task_aligned", K, topk=1)(anchors, gts, torch.tensor([0, 1]), preds)
    assert out.matched_gt.tolist() == [1, BACKGROUND]


def test_task_aligned_iou_prediction_option():
    anchors = _anchors([[0, 0, 10, 10], [1, 1, 9, 9]])
    # Predicted boxes say anchor 0 is better; the IoU branch says anchor 1.
    preds = _predictions([[0, 0, 10, 10], [0, 0, 10, 6]], [[0.5, 0.1, 0.1]] * 2, ious=[0.2, 0.9])
    gt, cls = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0])
    by_box = build_assigner("task_aligned", K, topk=1)(anchors, gt, cls, preds)
    by_branch = build_assigner("task_aligned", K, topk=1, use_iou_prediction=True)(anchors, gt, cls, preds)
    assert by_box.matched_gt.tolist() == [0, BACKGROUND]
    assert by_branch.matched_gt.tolist() == [BACKGROUND, 0]
    with pytest.raises(ValueError, match="IoU branch"):
        build_assigner("task_aligned", K, use_iou_prediction=True)(
            anchors, gt, cls, _predictions([[0, 0, 10, 10], [0, 0, 10, 6]]))


# ------------------------------------------------------------- shared
@pytest.mark.parametrize("name", ["noisy_anchor", "task_aligned"])
def test_dynamic_assigners_need_predictions(name):
    with pytest.raises(ValueError, match="predictions"):
        build_assigner(name, K)(_anchors([[0, 0, 10, 10]]), torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0]))


def _random_case(draw_seed, num_gt, extreme):
    g = torch.Generator().manual_seed(draw_seed)
    # Three levels of a small anchor grid, 3 anchors per location.
    boxes, per_level = [], []
    for stride in (8, 16, 32):
        n = 64 // stride
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        ctr = (torch.stack([xs, ys], -1).reshape(-1, 1, 2).float() + 0.5) * stride
        sizes = torch.tensor([[2.0, 2.0], [3.0, 1.5], [1.5, 3.0]]) * stride
        level = torch.cat([ctr - sizes / 2, ctr + sizes / 2], -1).reshape(-1, 4)
        boxes.append(level)
        per_level.append(len(level))
    anchors = AnchorSet(torch.cat(boxes), tuple(per_level), 3)
    xy = torch.rand(num_gt, 2, generator=g) * 50
    wh = 2 + torch.rand(num_gt, 2, generator=g) * 40
    gt = torch.cat([xy, xy + wh], 1)
    cls = torch.randint(0, K, (num_gt,), generator=g)
    a = anchors.boxes
    jitter = torch.randn(a.shape, generator=g) * 4
    pred_boxes = a + jitter
    pred_boxes[:, 2:] = torch.maximum(pred_boxes[:, 2:], pred_boxes[:, :2] + 1)
    probs = torch.rand(len(a), K, generator=g)
    if extreme:  # saturated probabilities and perfect boxes
        probs[: len(a) // 3] = 1.0
        pred_boxes[:num_gt] = gt
    ious = torch.rand(len(a), generator=g)
    return anchors, gt, cls, Predictions(probs, pred_boxes, ious)


def _dynamic(name):
    if name == "hambox":
        return _hambox()
    return build_assigner(name, K)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_gt=st.integers(0, 12), extreme=st.booleans(),
       name=st.sampled_from(["noisy_anchor", "hambox", "task_aligned"]))
def test_dynamic_assigner_invariants(seed, num_gt, extreme, name):
    anchors, gt, cls, preds = _random_case(seed, num_gt, extreme)
    out = _dynamic(name)(anchors, gt, cls, preds)
    fg = out.matched_gt >= 0
    assert ((out.labels >= -1) & (out.labels <= K)).all()
    assert torch.equal(out.labels[fg], cls[out.matched_gt[fg]])
    assert (out.labels[out.matched_gt == BACKGROUND] == K).all()
    assert (out.labels[out.matched_gt == IGNORE] == -1).all()
    if num_gt > 0:
        assert (out.matched_gt[fg] < num_gt).all()
    if out.cls_targets is not None:
        assert torch.isfinite(out.cls_targets).all()
        assert ((out.cls_targets[fg] >= 0) & (out.cls_targets[fg] <= 1)).all()
    for weights in (out.cls_weights, out.box_weights):
        if weights is not None:
            assert torch.isfinite(weights).all()
            if name != "task_aligned":  # TOOD's weight is its soft target, which may be 0
                assert (weights[fg] > 0).all()
            assert (weights[fg] >= 0).all()


def test_dynamic_assigners_with_no_ground_truth():
    anchors, gt, cls, preds = _random_case(0, 0, False)
    for name in ("noisy_anchor", "hambox", "task_aligned"):
        out = _dynamic(name)(anchors, gt, cls, preds)
        assert (out.labels == K).all() and (out.matched_gt == BACKGROUND).all()
