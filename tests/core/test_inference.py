"""Score fusion and post-processing: hand cases showing that the fused score S,
not p, drives top-k, thresholding, NMS and ranking; non-finite inputs."""
import math

import pytest
import torch

from iou_aware_retinanet.core import BoxCoder, InferenceConfig, fuse_scores, postprocess_image


# --------------------------------------------------------------- fuse_scores
def test_fuse_scores_hand_values():
    """p = 0.64, IoU = 0.25: alpha 0.5 -> 0.8 * 0.5 = 0.4; alpha 0.75 ->
    0.64^0.75 * 0.25^0.25 = 0.7155 * 0.7071 = 0.5060; None -> p * IoU = 0.16."""
    p, iou = torch.tensor([[0.64]]), torch.tensor([[0.25]])
    assert float(fuse_scores(p, iou, 0.5)) == pytest.approx(0.4, rel=1e-6)
    assert float(fuse_scores(p, iou, 0.75)) == pytest.approx(0.64**0.75 * 0.25**0.25, rel=1e-6)
    assert float(fuse_scores(p, iou, None)) == pytest.approx(0.16, rel=1e-6)


def test_fuse_scores_extremes_and_broadcast():
    p = torch.tensor([[0.9, 0.2, 0.0], [0.5, 0.4, 1.0]])
    iou = torch.tensor([[0.3], [0.7]])  # class-agnostic, broadcast over classes
    assert fuse_scores(p, iou, 1.0) is p  # plain RetinaNet scoring, untouched
    assert fuse_scores(p, None, 0.5) is p
    torch.testing.assert_close(fuse_scores(p, iou, 0.0), iou.expand_as(p))
    torch.testing.assert_close(fuse_scores(p, iou, None), p * iou)
    torch.testing.assert_close(fuse_scores(p, iou, 0.5), (p * iou).sqrt())


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_fuse_scores_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        fuse_scores(torch.tensor([[0.5]]), torch.tensor([[0.5]]), alpha)
    with pytest.raises(ValueError, match="alpha"):
        InferenceConfig(alpha=alpha)


def test_inference_config_rejects_unknown_threshold_mode():
    with pytest.raises(ValueError, match="fused"):
        InferenceConfig(threshold_on="iou")


# ------------------------------------------------------------- postprocess
def boxes_in_a_row(n, size=10.0, gap=20.0):
    """n non-overlapping size x size anchors."""
    return torch.tensor([[i * gap, 0.0, i * gap + size, size] for i in range(n)])


def detect(probs, ious, anchors, deltas=None, **config):
    """One image, one level unless lists are given."""
    if not isinstance(probs, list):
        probs, ious, anchors = [probs], [ious] if ious is not None else None, [anchors]
        deltas = [deltas] if deltas is not None else None
    if deltas is None:
        deltas = [torch.zeros(len(a), 4) for a in anchors]
    return postprocess_image(probs, deltas, ious, anchors, BoxCoder(), (1000, 1000), InferenceConfig(**config))


def test_threshold_on_fused_vs_cls_keeps_different_sets():
    """Anchor 0: p 0.9, IoU 0.01 -> S = sqrt(0.009) = 0.095. Anchor 1: p 0.04,
    IoU 0.9 -> S = sqrt(0.036) = 0.190. Threshold 0.1: on S only anchor 1
    passes, on p only anchor 0 (then reported with its S)."""
    probs, ious = torch.tensor([[0.9], [0.04]]), torch.tensor([0.01, 0.9])
    fused = detect(probs, ious, boxes_in_a_row(2), score_thresh=0.1, threshold_on="fused")
    assert fused.boxes.tolist() == [[20.0, 0.0, 30.0, 10.0]]
    assert fused.scores.tolist() == pytest.approx([math.sqrt(0.036)])
    cls = detect(probs, ious, boxes_in_a_row(2), score_thresh=0.1, threshold_on="cls")
    assert cls.boxes.tolist() == [[0.0, 0.0, 10.0, 10.0]]
    assert cls.scores.tolist() == pytest.approx([math.sqrt(0.009)])
    assert cls.cls_scores.tolist() == pytest.approx([0.9])
    assert cls.ious.tolist() == pytest.approx([0.01])


def test_per_level_topk_ranks_by_fused_score():
    """Level 0: p 0.9..0.5 with IoU 0.1, 0.2, 0.9, 0.9, 0.05 -> S 0.30, 0.40,
    0.79, 0.73, 0.16: top-2 are anchors 2, 3, although p ranks 0, 1 first.
    Level 1: S 0.97, 0.55, 0.45 -> anchors 0, 1 (0.55 beats level 0's dropped 0.40:
    the limit is per level)."""
    probs = [torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5]]), torch.tensor([[0.95], [0.3], [0.2]])]
    ious = [torch.tensor([0.1, 0.2, 0.9, 0.9, 0.05]), torch.tensor([1.0, 1.0, 1.0])]
    anchors = [boxes_in_a_row(5), boxes_in_a_row(3) + torch.tensor([0.0, 100, 0, 100])]
    out = detect(probs, ious, anchors, topk_candidates=2, score_thresh=0.05)
    expected = [anchors[1][0], anchors[0][2], anchors[0][3], anchors[1][1]]
    assert out.boxes.tolist() == torch.stack(expected).tolist()
    torch.testing.assert_close(out.scores, torch.tensor([0.95, 0.63, 0.54, 0.3]).sqrt())


def test_nms_keeps_the_box_with_the_higher_fused_score():
    """A [0,0,10,10] and B [1,0,11,10] overlap (IoU 0.82), same class. p ranks A
    first (0.9 vs 0.6), S ranks B first (sqrt(0.09) = 0.3 vs sqrt(0.54) = 0.73):
    B survives. Scored by p alone (alpha 1), A survives."""
    anchors = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10]])
    probs, ious = torch.tensor([[0.9], [0.6]]), torch.tensor([0.1, 0.9])
    out = detect(probs, ious, anchors, alpha=0.5)
    assert out.boxes.tolist() == [[1.0, 0.0, 11.0, 10.0]]
    assert out.scores.tolist() == pytest.approx([math.sqrt(0.54)])
    out = detect(probs, ious, anchors, alpha=1.0)
    assert out.boxes.tolist() == [[0.0, 0.0, 10.0, 10.0]]


def test_nms_is_per_class():
    anchors = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10]])
    probs = torch.tensor([[0.9, 0.0], [0.0, 0.6]])
    out = detect(probs, torch.tensor([0.5, 0.5]), anchors)
    assert sorted(out.classes.tolist()) == [0, 1]


def test_max_detections_keeps_the_best_ranked():
    probs = torch.linspace(0.2, 0.9, 8)[:, None]
    out = detect(probs, torch.ones(8), boxes_in_a_row(8), max_detections=3)
    assert len(out) == 3
    torch.testing.assert_close(out.scores, probs[[7, 6, 5], 0].sqrt())


def test_without_iou_branch_scores_are_p():
    probs = torch.tensor([[0.3], [0.7]])
    out = detect(probs, None, boxes_in_a_row(2))
    assert out.ious is None
    assert out.scores.tolist() == pytest.approx([0.7, 0.3])


def test_deltas_are_decoded():
    deltas = torch.tensor([[0.1, -0.2, math.log(2.0), 0.0]])
    out = detect(torch.tensor([[0.9]]), torch.tensor([0.9]), torch.tensor([[0.0, 0, 10, 10]]), deltas)
    # centre (5 + 1, 5 - 2), width 20, height 10
    assert out.boxes.tolist() == [pytest.approx([-4.0, -2.0, 16.0, 8.0], abs=1e-5)]


@pytest.mark.parametrize("threshold_on", ["fused", "cls"])
def test_non_finite_inputs_are_dropped_without_crashing(threshold_on):
    """Anchor 0 normal; 1 has +-inf logits (p = 1 and 0: fine); 2 NaN logits;
    3 an inf delta; 4 a NaN delta; 5 a huge (clamped) size delta, class 1;
    6 a NaN predicted IoU; 7 an inf predicted IoU. Kept: 0, 1, 5 (each for its
    one likely class: S of the other class is about sqrt(4.5e-5) < 0.05)."""
    logits = torch.tensor([[10.0, -10], [math.inf, -math.inf], [math.nan, math.nan], [10, -10],
                           [10, -10], [-10, 10], [10, -10], [10, -10]])
    deltas = torch.zeros(8, 4)
    deltas[3, 0] = math.inf
    deltas[4, 1] = math.nan
    deltas[5, 2:] = 100.0
    ious = torch.full((8,), 0.8)
    ious[6], ious[7] = math.nan, math.inf
    anchors = boxes_in_a_row(8)
    out = detect(logits.sigmoid(), ious, anchors, deltas, threshold_on=threshold_on)
    assert sorted(out.boxes[:, 0].tolist()) == [pytest.approx(100 + 5 - 5 * 1000 / 16), 0.0, 20.0]
    for values in (out.boxes, out.scores, out.cls_scores, out.ious):
        assert bool(torch.isfinite(values).all())


def test_clip_to_image():
    deltas = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    out = detect(torch.tensor([[0.9]]), torch.tensor([0.9]), torch.tensor([[990.0, 990, 1000, 1000]]), deltas,
                 clip_to_image=True)
    assert float(out.boxes.max()) <= 1000.0 and float(out.boxes.min()) >= 0.0


@pytest.mark.parametrize("threshold_on", ["cls", "fused"])
@pytest.mark.parametrize("alpha", [None, 0.5, 1.0])
def test_level_candidates_equal_the_dense_rule(threshold_on, alpha):
    """Gating p before fusing (the "cls" path) keeps exactly the pairs, scores and order of the
    dense rule: fuse every (anchor, class), keep gate > thresh with a finite S, top-k of S."""
    from iou_aware_retinanet.core.inference import select_level_candidates

    gen = torch.Generator().manual_seed(4)
    probs = torch.rand(300, 5, generator=gen)
    ious = torch.rand(300, generator=gen)
    ious[[3, 7]] = float("nan")
    config = InferenceConfig(alpha=alpha, score_thresh=0.3, threshold_on=threshold_on, topk_candidates=50)
    fused = fuse_scores(probs, ious[:, None], alpha)
    gate = fused if threshold_on == "fused" else probs
    keep = (gate > 0.3) & torch.isfinite(fused)
    expected_scores, order = fused[keep].topk(min(50, int(keep.sum())))
    expected_pairs = torch.nonzero(keep)[order]
    anchor_idx, class_idx, scores, cls_scores = select_level_candidates(probs, ious, config)
    assert torch.equal(scores, expected_scores)
    assert torch.equal(torch.stack([anchor_idx, class_idx], 1), expected_pairs)
    assert torch.equal(cls_scores, probs[anchor_idx, class_idx])


def _dense_reference(probs, deltas, ious, anchors, config):
    """The rule written out densely: per level fuse every (anchor, class), gate, drop
    non-finite S, keep the top-k of S; then decode, drop non-finite boxes, NMS by S."""
    from torchvision.ops import batched_nms

    kept = []
    for level, (p, d, a) in enumerate(zip(probs, deltas, anchors)):
        iou = None if ious is None else ious[level]
        fused = p if iou is None else fuse_scores(p, iou[:, None], config.alpha)
        gate = fused if config.threshold_on == "fused" else p
        keep = (gate > config.score_thresh) & torch.isfinite(fused)
        scores, order = fused[keep].topk(min(config.topk_candidates, int(keep.sum())))
        anchor_idx, class_idx = torch.nonzero(keep)[order].unbind(1)
        boxes = BoxCoder().apply_deltas(d[anchor_idx], a[anchor_idx])
        level_iou = torch.full_like(scores, -1.0) if iou is None else iou[anchor_idx]
        kept.append((boxes, scores, class_idx, p[anchor_idx, class_idx], level_iou))
    boxes, scores, classes, cls_scores, level_ious = (torch.cat(x) for x in zip(*kept))
    finite = torch.isfinite(boxes).all(1)
    boxes, scores, classes, cls_scores, level_ious = (x[finite] for x in (boxes, scores, classes, cls_scores, level_ious))
    keep = batched_nms(boxes, scores, classes, config.nms_thresh)[: config.max_detections]
    return boxes[keep], scores[keep], classes[keep], cls_scores[keep], level_ious[keep]


@pytest.mark.parametrize("threshold_on", ["cls", "fused"])
@pytest.mark.parametrize("alpha", [None, 0.5, 0.3, 1.0])
@pytest.mark.parametrize("with_iou", [True, False])
def test_postprocess_equals_the_dense_rule_on_random_levels(threshold_on, alpha, with_iou):
    """Three levels, one with more candidates than top-k allows (the per-level top-k
    then drops pairs), NaN and inf IoUs, an inf delta: the same detections, scores
    and order as the dense rule, whichever path computes S."""
    gen = torch.Generator().manual_seed(11)
    sizes = (400, 60, 30)
    probs = [torch.rand(n, 3, generator=gen) ** 2 for n in sizes]
    ious = [torch.rand(n, generator=gen) for n in sizes]
    ious[0][[5, 9]] = float("nan")
    ious[1][4] = float("inf")
    deltas = [0.2 * torch.randn(n, 4, generator=gen) for n in sizes]
    deltas[2][0, 0] = float("inf")
    anchors = []
    for n in sizes:
        xy = 200 * torch.rand(n, 2, generator=gen)
        anchors.append(torch.cat([xy, xy + 10 + 40 * torch.rand(n, 2, generator=gen)], 1))
    config = InferenceConfig(alpha=alpha, score_thresh=0.2, threshold_on=threshold_on, topk_candidates=150,
                             nms_thresh=0.7, max_detections=1000)
    assert int((probs[0] > 0.2).sum()) > 150 >= int((probs[1] > 0.2).sum())  # level 0's top-k drops pairs
    out = postprocess_image(probs, deltas, ious if with_iou else None, anchors, BoxCoder(), (1000, 1000), config)
    boxes, scores, classes, cls_scores, level_ious = _dense_reference(
        probs, deltas, ious if with_iou else None, anchors, config
    )
    assert len(out) == len(boxes) > 20
    assert torch.equal(out.boxes, boxes) and torch.equal(out.classes, classes)
    assert torch.equal(out.cls_scores, cls_scores)
    # pow's last bit depends on the tensor's layout (vectorized or not): S to 1e-6 relative.
    torch.testing.assert_close(out.scores, scores, rtol=1e-6, atol=0)
    if with_iou:
        assert torch.equal(out.ious, level_ious)
    else:
        assert out.ious is None
