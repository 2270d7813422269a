"""Losses of the IoU-aware detector against direct computations, hand values and autograd."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

from iou_aware_retinanet.core import (
    BoxCoder,
    LossConfig,
    aligned_box_iou,
    build_assigner,
    dense_detection_losses,
    soft_target_focal_loss,
)
from iou_aware_retinanet.core.losses import classification_loss

from .assigner_inputs import anchor_set

K = 3


def test_soft_target_focal_loss_equals_sigmoid_focal_loss_for_hard_targets():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, K, generator=gen) * 4
    logits[0] = torch.tensor([30.0, -30.0, 0.0])  # saturated sigmoids stay finite
    targets = (torch.rand(200, K, generator=gen) < 0.3).float()
    for alpha, gamma in [(0.25, 2.0), (0.5, 0.0), (-1, 1.5)]:
        expected = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
        torch.testing.assert_close(soft_target_focal_loss(logits, targets, alpha, gamma), expected)


def test_soft_target_focal_loss_hand_value():
    """logit ln 3 -> p = 0.75; target t = 0.6, alpha 0.25, gamma 2:
    0.25 * 0.6 * 0.25^2 * -ln 0.75 + 0.75 * 0.4 * 0.75^2 * -ln 0.25
    = 0.0026970 + 0.2339365 = 0.2366335."""
    expected = 0.25 * 0.6 * 0.25**2 * -math.log(0.75) + 0.75 * 0.4 * 0.75**2 * -math.log(0.25)
    assert expected == pytest.approx(0.2366335, abs=1e-6)
    value = soft_target_focal_loss(torch.tensor([math.log(3.0)]), torch.tensor([0.6]), 0.25, 2.0)
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_classification_loss_ignores_label_minus_one_and_background_targets_are_zero():
    """Anchors: 0 class 1, 1 ignored (-1), 2 background (K), 3 class 0. The
    ignored anchor contributes nothing, whatever its logits; background anchors
    are trained towards all-zero targets."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, K, generator=gen)
    labels = torch.tensor([[1, -1, K, 0]])
    loss = classification_loss(logits, labels, None, None, alpha=0.25, gamma=2.0)
    targets = torch.tensor([[0.0, 1, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]])
    per_anchor = sigmoid_focal_loss(logits[0], targets, alpha=0.25, gamma=2.0, reduction="none").sum(dim=1)
    torch.testing.assert_close(loss, (per_anchor[0] + per_anchor[2] + per_anchor[3]).reshape(1))

    wild = logits.clone()
    wild[0, 1] = torch.tensor([50.0, -50.0, 50.0])
    torch.testing.assert_close(classification_loss(wild, labels, None, None, 0.25, 2.0), loss)


def test_classification_loss_soft_targets_and_weights():
    """A soft target 0.6 on the foreground class, weights scale every term."""
    logits = torch.zeros(1, 2, K)
    labels = torch.tensor([[2, K]])
    loss = classification_loss(logits, labels, torch.tensor([[0.6, 0.9]]), torch.tensor([[2.0, 0.5]]), 0.25, 2.0)
    t = torch.tensor([[0.0, 0.0, 0.6], [0.0, 0.0, 0.0]])  # background ignores its soft target
    per_anchor = soft_target_focal_loss(logits[0], t, 0.25, 2.0).sum(dim=1)
    torch.testing.assert_close(loss, (2.0 * per_anchor[0] + 0.5 * per_anchor[1]).reshape(1))


# ---------------------------------------------------------- a batch of two
ANCHORS = anchor_set([[0, 0, 10, 10], [0, 0, 10, 8], [20, 20, 40, 40], [22, 20, 42, 40], [60, 60, 70, 70]])
GT_IMAGE_0 = torch.tensor([[0.0, 0, 10, 9], [21, 20, 41, 40]])
GT_IMAGE_1 = torch.zeros((0, 4))  # no object


def batch(seed=0, requires_grad=False):
    assigner = build_assigner("max_iou", K)
    assignments = [assigner(ANCHORS, GT_IMAGE_0, torch.tensor([1, 2])),
                   assigner(ANCHORS, GT_IMAGE_1, torch.zeros(0, dtype=torch.long))]
    gen = torch.Generator().manual_seed(seed)
    cls_logits = torch.randn(2, 5, K, generator=gen)
    box_deltas = (0.1 * torch.randn(2, 5, 4, generator=gen)).requires_grad_(requires_grad)
    iou_logits = torch.randn(2, 5, generator=gen).requires_grad_(requires_grad)
    return assignments, cls_logits, box_deltas, iou_logits


def run_losses(config, seed=0, requires_grad=False):
    assignments, cls_logits, box_deltas, iou_logits = batch(seed, requires_grad)
    losses = dense_detection_losses(cls_logits, box_deltas, iou_logits, ANCHORS.boxes, assignments,
                                    [GT_IMAGE_0, GT_IMAGE_1], BoxCoder(), config)
    return losses, assignments, cls_logits, box_deltas, iou_logits


def foreground_of(assignment):
    anchor_idx = torch.nonzero(assignment.matched_gt >= 0).squeeze(1)
    return anchor_idx, GT_IMAGE_0[assignment.matched_gt[anchor_idx]]


def test_batch_has_the_expected_assignment():
    """Anchors 0, 1 overlap GT 0 (IoU 0.9, 0.89), anchors 2, 3 GT 1 (380/420 = 0.905 each)."""
    assignments, *_ = batch()
    assert assignments[0].matched_gt.tolist() == [0, 0, 1, 1, -1]
    assert assignments[1].num_foreground == 0


@pytest.mark.parametrize("beta", [0.0, 0.11])
def test_smooth_l1_box_loss_and_per_image_sums(beta):
    losses, assignments, cls_logits, box_deltas, iou_logits = run_losses(LossConfig(smooth_l1_beta=beta))
    anchor_idx, matched_boxes = foreground_of(assignments[0])
    targets = BoxCoder().get_deltas(ANCHORS.boxes[anchor_idx], matched_boxes)
    expected = F.smooth_l1_loss(box_deltas[0, anchor_idx], targets, beta=beta, reduction="sum")
    torch.testing.assert_close(losses["loss_box_reg"], torch.stack([expected, torch.tensor(0.0)]))
    assert losses["num_foreground"].tolist() == [4, 0]

    # IoU loss: BCE against IoU(decoded box, GT) on image 0's positives only.
    decoded = BoxCoder().apply_deltas(box_deltas[0, anchor_idx], ANCHORS.boxes[anchor_idx])
    iou = torch.diag(box_iou(decoded, matched_boxes))
    expected_iou = F.binary_cross_entropy_with_logits(iou_logits[0, anchor_idx], iou, reduction="sum")
    torch.testing.assert_close(losses["loss_iou"], torch.stack([expected_iou, torch.tensor(0.0)]))

    # Classification: image 1 (no GT) is all background and still has a loss.
    for i in range(2):
        onehot = F.one_hot(assignments[i].labels, K + 1)[:, :K].float()
        expected_cls = sigmoid_focal_loss(cls_logits[i], onehot, reduction="sum")
        torch.testing.assert_close(losses["loss_cls"][i], expected_cls)
    assert float(losses["loss_cls"][1]) > 0


def test_giou_box_loss_equals_one_minus_giou():
    losses, assignments, _, box_deltas, _ = run_losses(LossConfig(box_loss_type="giou"))
    anchor_idx, matched_boxes = foreground_of(assignments[0])
    decoded = BoxCoder().apply_deltas(box_deltas[0, anchor_idx], ANCHORS.boxes[anchor_idx])
    expected = (1 - torch.diag(generalized_box_iou(decoded, matched_boxes))).sum()
    torch.testing.assert_close(losses["loss_box_reg"], torch.stack([expected, torch.tensor(0.0)]))


def test_iou_loss_weight_and_no_iou_branch():
    base, *_ = run_losses(LossConfig())
    doubled, *_ = run_losses(LossConfig(iou_loss_weight=2.0))
    torch.testing.assert_close(doubled["loss_iou"], 2 * base["loss_iou"])
    assignments, cls_logits, box_deltas, _ = batch()
    without = dense_detection_losses(cls_logits, box_deltas, None, ANCHORS.boxes, assignments,
                                     [GT_IMAGE_0, GT_IMAGE_1], BoxCoder(), LossConfig())
    assert "loss_iou" not in without
    torch.testing.assert_close(without["loss_box_reg"], base["loss_box_reg"])


def test_unknown_box_loss_type():
    with pytest.raises(ValueError, match="smooth_l1"):
        LossConfig(box_loss_type="l2")


# ------------------------------------------------- gradient through the target
def test_iou_target_gradient_reaches_the_box_deltas_analytically():
    """With the switch on, d loss_iou / d deltas = sum_i log((1 - p_i) / p_i) *
    d IoU_i / d deltas (BCE's derivative in its target), p = sigmoid(iou logit)."""
    losses, assignments, _, box_deltas, iou_logits = run_losses(LossConfig(iou_target_gradient=True),
                                                                 requires_grad=True)
    losses["loss_iou"].sum().backward()
    assert box_deltas.grad is not None and float(box_deltas.grad.abs().sum()) > 0
    assert iou_logits.grad is not None and float(iou_logits.grad.abs().sum()) > 0

    anchor_idx, matched_boxes = foreground_of(assignments[0])
    deltas = box_deltas.detach()[0, anchor_idx].clone().requires_grad_(True)
    iou = aligned_box_iou(BoxCoder().apply_deltas(deltas, ANCHORS.boxes[anchor_idx]), matched_boxes)
    p = iou_logits.detach()[0, anchor_idx].sigmoid()
    (expected,) = torch.autograd.grad(iou, deltas, grad_outputs=torch.log((1 - p) / p))
    torch.testing.assert_close(box_deltas.grad[0, anchor_idx], expected)
    # Background anchors and the image without objects get no gradient.
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, anchor_idx] = False
    assert float(box_deltas.grad[mask].abs().sum()) == 0


def test_iou_target_detached_leaves_the_box_deltas_alone():
    losses, _, _, box_deltas, iou_logits = run_losses(LossConfig(iou_target_gradient=False), requires_grad=True)
    losses["loss_iou"].sum().backward()
    assert box_deltas.grad is None or float(box_deltas.grad.abs().sum()) == 0
    assert iou_logits.grad is not None and float(iou_logits.grad.abs().sum()) > 0


def test_iou_loss_value_does_not_depend_on_the_switch():
    on, *_ = run_losses(LossConfig(iou_target_gradient=True))
    off, *_ = run_losses(LossConfig(iou_target_gradient=False))
    torch.testing.assert_close(on["loss_iou"], off["loss_iou"])


def test_iou_target_entropy_is_the_floor_of_the_iou_loss():
    """BCE(p, t) = H(t) + KL(t || p) >= H(t): the entropy of the targets, per image, by hand."""
    from iou_aware_retinanet.core.losses import IOU_TARGET_ENTROPY

    for seed in range(5):
        losses, assignments, _, box_deltas, iou_logits = run_losses(LossConfig(iou_loss_weight=2.0), seed=seed)
        anchor_idx, matched_boxes = foreground_of(assignments[0])
        decoded = BoxCoder().apply_deltas(box_deltas[0, anchor_idx], ANCHORS.boxes[anchor_idx])
        t = torch.diag(box_iou(decoded, matched_boxes))
        entropy = -(t * t.log() + (1 - t) * (1 - t).log()).sum()
        torch.testing.assert_close(losses[IOU_TARGET_ENTROPY], torch.stack([2.0 * entropy, torch.tensor(0.0)]))
        assert bool((losses["loss_iou"] >= losses[IOU_TARGET_ENTROPY] - 1e-6).all())
        assert not losses[IOU_TARGET_ENTROPY].requires_grad


def test_nan_box_deltas_give_nan_losses_not_an_exception():
    """Blown-up weights give NaN deltas: the losses must come back NaN (the engines' loss check
    then names the iteration and the last good checkpoint) rather than raise inside a loss."""
    from iou_aware_retinanet.core.losses import IOU_TARGET_ENTROPY

    assignments, cls_logits, box_deltas, iou_logits = batch()
    box_deltas[0, 0] = float("nan")
    losses = dense_detection_losses(cls_logits, box_deltas, iou_logits, ANCHORS.boxes, assignments,
                                    [GT_IMAGE_0, GT_IMAGE_1], BoxCoder(), LossConfig())
    for key in ("loss_box_reg", "loss_iou", IOU_TARGET_ENTROPY):
        assert torch.isnan(losses[key][0]) and torch.isfinite(losses[key][1]), key


def test_a_batch_with_gt_but_no_positive_is_reported(caplog):
    from iou_aware_retinanet.core.losses import warn_if_no_positives

    with caplog.at_level("WARNING"):
        assert warn_if_no_positives(torch.tensor([0, 0]), [3, 0], "HAMBoxAssigner")
    assert "no positive anchor in a batch with 3 GT boxes (assigner HAMBoxAssigner)" in caplog.text
    assert not warn_if_no_positives(torch.tensor([0, 0]), [0, 0], "x")  # no GT: nothing to say
    assert not warn_if_no_positives(torch.tensor([2, 0]), [3, 1], "x")
