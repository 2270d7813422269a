"""Invariants of the static assigners over random layouts and ground truth (hypothesis)."""
import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou

from iou_aware_retinanet.core import DegenerateBoxWarning, build_assigner
from iou_aware_retinanet.core.assigners import BACKGROUND, IGNORE
from iou_aware_retinanet.core.boxes import box_centers

from .assigner_inputs import NUM_CLASSES as K
from .assigner_inputs import random_grid, random_gts, shuffled_within_levels

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def scenes(draw):
    """A random anchor grid and random GTs, sometimes with degenerate boxes mixed in."""
    seed = draw(st.integers(0, 2**31 - 1))
    anchors = random_grid(seed)
    if draw(st.booleans()):
        anchors = shuffled_within_levels(anchors, seed)
    num_gts = draw(st.integers(0, 20))
    gt_boxes, gt_classes = random_gts(seed, num_gts, anchors, min_size=draw(st.sampled_from([1.0, 4.0, 16.0])))
    valid = torch.ones(num_gts, dtype=torch.bool)
    if num_gts and draw(st.booleans()):
        # Collapse some boxes to zero width: dropped, indices of the rest unchanged.
        bad = torch.rand(num_gts, generator=torch.Generator().manual_seed(seed)) < 0.3
        gt_boxes[bad, 2] = gt_boxes[bad, 0]
        valid = ~bad
    return anchors, gt_boxes, gt_classes, valid


def assign(name, scene, **kwargs):
    anchors, gt_boxes, gt_classes, _ = scene
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateBoxWarning)
        return build_assigner(name, K, **kwargs)(anchors, gt_boxes, gt_classes)


def check_common(out, scene):
    """Label range, label/matched_gt consistency, indices of valid GTs only."""
    anchors, gt_boxes, gt_classes, valid = scene
    labels, matched = out.labels, out.matched_gt
    assert labels.shape == matched.shape == (len(anchors),)
    assert bool(((labels >= -1) & (labels <= K)).all())
    fg = matched >= 0
    assert torch.equal(fg, (labels >= 0) & (labels < K))
    assert torch.equal(matched == BACKGROUND, labels == K)
    assert torch.equal(matched == IGNORE, labels == -1)
    assert bool((matched >= IGNORE).all())
    if fg.any():
        assert int(matched[fg].max()) < gt_boxes.shape[0]
        assert bool(valid[matched[fg]].all())  # never a dropped box
        assert torch.equal(labels[fg], gt_classes[matched[fg]])


def valid_iou(scene):
    """(G, A) IoU with dropped GTs' rows set to -1."""
    anchors, gt_boxes, _, valid = scene
    iou = box_iou(gt_boxes, anchors.boxes)
    iou[~valid] = -1
    return iou


@PROPERTY_SETTINGS
@given(scene=scenes())
def test_max_iou_invariants(scene):
    out = assign("max_iou", scene)
    check_common(out, scene)
    fg = out.matched_gt >= 0
    if fg.any():
        iou = valid_iou(scene)
        best = iou.max(dim=0).values
        # A foreground anchor learns from a GT it overlaps most.
        assert torch.equal(iou[out.matched_gt[fg], torch.nonzero(fg).squeeze(1)], best[fg])
        assert bool((best[fg] > 0).all())


@PROPERTY_SETTINGS
@given(scene=scenes(), k=st.integers(1, 12), min_iou=st.sampled_from([0.0, 0.3]))
def test_topk_invariants(scene, k, min_iou):
    out = assign("topk", scene, topk=k, min_iou=min_iou)
    check_common(out, scene)
    assert not bool((out.labels == -1).any())
    fg = out.matched_gt >= 0
    counts = torch.bincount(out.matched_gt[fg], minlength=scene[1].shape[0])
    assert bool((counts <= k).all())
    if fg.any():
        iou = valid_iou(scene)
        anchor_idx = torch.nonzero(fg).squeeze(1)
        won = iou[out.matched_gt[fg], anchor_idx]
        assert bool((won > 0).all()) and bool((won >= min_iou).all())
        # Conflicts: the winner has the highest IoU among the GTs that claimed the
        # anchor (the anchor is among their k best, IoU > 0 and >= min_iou).
        # Where several anchors tie for a GT's k-th IoU, which of them topk took
        # is unspecified: count the tied ones as claims only when all fit in k.
        kth = iou.topk(min(k, iou.shape[1]), dim=1).values[:, -1:]
        unambiguous = (iou >= kth).sum(dim=1, keepdim=True) <= k
        claims = ((iou > kth) | ((iou == kth) & unambiguous)) & (iou > 0) & (iou >= min_iou)
        rival = torch.where(claims, iou, torch.full_like(iou, -1)).max(dim=0).values
        assert bool((won >= rival[anchor_idx]).all())


def atss_claims(assigner, scene):
    """(G, A) IoU where the GT's own ATSS rules make the anchor positive, else -1."""
    anchors, gt_boxes, _, valid = scene
    claims = torch.full((gt_boxes.shape[0], len(anchors)), -1.0)
    rows = torch.nonzero(valid).squeeze(1)
    if rows.numel() == 0:
        return claims
    cand_idx, cand_iou = assigner.candidates(anchors, gt_boxes[rows])
    threshold = cand_iou.mean(dim=1, keepdim=True) + cand_iou.std(dim=1, keepdim=True)
    ctr = box_centers(anchors.boxes)[cand_idx]
    gt = gt_boxes[rows][:, None]
    inside = torch.stack((ctr[..., 0] - gt[..., 0], ctr[..., 1] - gt[..., 1],
                          gt[..., 2] - ctr[..., 0], gt[..., 3] - ctr[..., 1])).amin(dim=0) > 0.01
    positive = (cand_iou >= threshold) & inside
    claims[rows[:, None].expand_as(cand_idx)[positive], cand_idx[positive]] = cand_iou[positive]
    return claims


@PROPERTY_SETTINGS
@given(scene=scenes(), topk=st.sampled_from([3, 9]))
def test_atss_invariants(scene, topk):
    assigner = build_assigner("atss", K, topk=topk)
    out = assign("atss", scene, topk=topk)
    check_common(out, scene)
    assert not bool((out.labels == -1).any())  # ATSS never ignores
    fg = out.matched_gt >= 0
    anchors, gt_boxes = scene[0], scene[1]
    claims = atss_claims(assigner, scene)
    # Foreground exactly where some GT's rules claim the anchor ...
    assert torch.equal(fg, (claims >= 0).any(dim=0))
    if fg.any():
        anchor_idx = torch.nonzero(fg).squeeze(1)
        matched = out.matched_gt[fg]
        # ... the winner is the claiming GT with the highest IoU ...
        assert torch.equal(claims[matched, anchor_idx], claims[:, anchor_idx].max(dim=0).values)
        # ... and the anchor's centre lies inside its GT.
        ctr = box_centers(anchors.boxes[fg])
        gt = gt_boxes[matched]
        assert bool(((ctr > gt[:, :2]) & (ctr < gt[:, 2:])).all())


@PROPERTY_SETTINGS
@given(scene=scenes())
def test_atss_ensure_positive_only_adds(scene):
    """ensure_positive keeps every default positive and only adds anchors that
    were background, for GTs that had none, at most one per such GT."""
    plain = assign("atss", scene)
    fed = assign("atss", scene, ensure_positive=True)
    check_common(fed, scene)
    kept = plain.matched_gt >= 0
    assert torch.equal(fed.matched_gt[kept], plain.matched_gt[kept])
    added = (fed.matched_gt >= 0) & ~kept
    gts_with_positives = set(plain.matched_gt[kept].tolist())
    added_gts = fed.matched_gt[added].tolist()
    assert len(added_gts) == len(set(added_gts))
    assert not gts_with_positives & set(added_gts)
    if added.any():
        iou = valid_iou(scene)
        assert bool((iou[fed.matched_gt[added], torch.nonzero(added).squeeze(1)] > 0).all())
