"""Box arithmetic against torchvision, block slicing, and the IoU branch's conv."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import box_iou

from iou_aware_retinanet.core import BoxCoder, aligned_box_iou, build_iou_predictor
from iou_aware_retinanet.core.boxes import (
    DEFAULT_SCALE_CLAMP,
    centers_inside,
    gt_chunks,
    pairwise_box_iou,
    valid_box_mask,
)


def random_boxes(n, seed, min_size=1.0, max_size=200.0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 500
    wh = min_size + torch.rand(n, 2, generator=gen) * (max_size - min_size)
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_torchvision(weights):
    anchors, boxes = random_boxes(300, 0), random_boxes(300, 1)
    ours, theirs = BoxCoder(weights), TorchvisionBoxCoder(weights)
    deltas = ours.get_deltas(anchors, boxes)
    torch.testing.assert_close(deltas, theirs.encode_single(boxes, anchors))
    wild = deltas * 3  # includes sizes beyond the clamp
    torch.testing.assert_close(ours.apply_deltas(wild, anchors), theirs.decode_single(wild, anchors))


def test_box_coder_round_trip():
    # Size ratios up to 10, within the clamp (62.5).
    anchors, boxes = random_boxes(300, 2, min_size=20.0), random_boxes(300, 3, min_size=20.0)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.apply_deltas(coder.get_deltas(anchors, boxes), anchors), boxes,
                               rtol=1e-5, atol=1e-3)


def test_box_coder_clamps_sizes():
    anchors = torch.tensor([[0.0, 0, 10, 10]])
    out = BoxCoder().apply_deltas(torch.tensor([[0.0, 0, 50, 50]]), anchors)
    size = 10 * math.exp(DEFAULT_SCALE_CLAMP)  # 625
    torch.testing.assert_close(out, torch.tensor([[5 - size / 2, 5 - size / 2, 5 + size / 2, 5 + size / 2]]))


def test_aligned_box_iou_is_the_diagonal_of_box_iou():
    a, b = random_boxes(200, 4), random_boxes(200, 5)
    size = a[:50, 2:] - a[:50, :2]
    b[:50] = a[:50] + 0.3 * size.repeat(1, 2)  # overlapping pairs, and disjoint ones elsewhere
    expected = torch.diag(box_iou(a, b))
    assert bool((expected[:50] > 0).all()) and bool((expected == 0).any())
    torch.testing.assert_close(aligned_box_iou(a, b), expected)


@pytest.mark.parametrize("seed", range(5))
def test_pairwise_box_iou_gives_torchvisions_bits(seed):
    g = torch.Generator().manual_seed(seed)
    n, m = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 3000, (1,), generator=g))
    xy = torch.rand(n + m, 2, generator=g) * 500
    boxes = torch.cat((xy, xy + torch.rand(n + m, 2, generator=g) * 200), dim=1)
    boxes[::7, 2:] = boxes[::7, :2]  # zero-area boxes: 0 / 0 in both
    boxes[12::11] = boxes[1]  # exact duplicates of a box with an area: IoU exactly 1
    a, b = boxes[:n], boxes[n:]
    ours, theirs = pairwise_box_iou(a, b), box_iou(a, b)
    assert ours.shape == (n, m)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    if n > 1:
        assert (ours[1, boxes[n:].eq(boxes[1]).all(dim=1)] == 1).all()
    # a transposed (non-contiguous) input gives the same bits
    torch.testing.assert_close(pairwise_box_iou(a, b.t().contiguous().t()), theirs, rtol=0, atol=0, equal_nan=True)


def test_pairwise_box_iou_other_dtypes_match_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 300
    boxes = torch.cat((xy, xy + 1 + torch.rand(60, 2, generator=g) * 300), dim=1)  # areas up to 90,000 px^2
    a, b = boxes[:10], boxes[10:]
    half = pairwise_box_iou(a.half(), b.half())  # areas beyond float16's range: computed in float32
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, box_iou(a.half(), b.half()).float(), rtol=1e-3, atol=1e-3)
    ints = pairwise_box_iou(a.long(), b.long())
    torch.testing.assert_close(ints, box_iou(a.long(), b.long()), rtol=1e-6, atol=1e-7)


def test_pairwise_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 1.0, 2.0]])
    assert pairwise_box_iou(a, b)[0].tolist() == pytest.approx([1 / 7, 1.0, 0.0, 0.5])


def test_aligned_box_iou_has_gradients():
    a = torch.tensor([[0.0, 0, 10, 10]], requires_grad=True)
    iou = aligned_box_iou(a, torch.tensor([[5.0, 0, 15, 10]]))  # 50 / 150
    assert float(iou.detach()) == pytest.approx(1 / 3)
    iou.sum().backward()
    assert float(a.grad[0, 2]) > 0  # widening to the right increases the overlap


def test_valid_box_mask():
    boxes = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, -1], [math.nan, 0, 1, 1],
                          [0, 0, math.inf, 1], [0, 0, 1e-3, 1e-3]])
    assert valid_box_mask(boxes).tolist() == [True, False, False, False, False, True]


@pytest.mark.parametrize("num_gt, num_anchors, max_elements",
                         [(10, 100, 350), (7, 1000, 1), (5, 3, 1 << 24), (0, 5, 10)])
def test_gt_chunks_cover_every_gt_once_within_the_bound(num_gt, num_anchors, max_elements):
    chunks = list(gt_chunks(num_gt, num_anchors, max_elements))
    covered = [i for c in chunks for i in range(c.start, c.stop)]
    assert covered == list(range(num_gt))
    for c in chunks:
        # One GT per block at least, otherwise within the bound.
        assert c.stop - c.start == 1 or (c.stop - c.start) * num_anchors <= max_elements


def test_iou_predictor_shape_and_init():
    torch.manual_seed(0)
    conv = build_iou_predictor(in_channels=64, num_anchors=9)
    assert conv.kernel_size == (3, 3)
    out = conv(torch.randn(2, 64, 7, 11))
    assert out.shape == (2, 9, 7, 11)
    weight, bias = conv.weight.detach(), conv.bias.detach()
    assert 0.009 < float(weight.std()) < 0.011  # normal(0, 0.01) over 5,184 weights
    assert abs(float(weight.mean())) < 1e-3
    assert bool((bias == 0).all())
    # Starts by predicting IoU 0.5 on a blank feature map.
    with torch.no_grad():
        torch.testing.assert_close(conv(torch.zeros(1, 64, 3, 3)).sigmoid(), torch.full((1, 9, 3, 3), 0.5))


def test_centers_inside_by_hand():
    """Box [0, 0, 10, 20]. (5, 10): 5 px from the left / right, 10 from top /
    bottom -> inside. (0.005, 10): 0.005 px from the left edge -> inside for
    eps 0, not for eps 0.01. (10, 10) on the right edge, (5, 25) below,
    (-1, 10) left of it -> never inside."""
    box = torch.tensor([[0.0, 0, 10, 20]])
    centers = torch.tensor([[5.0, 10], [0.005, 10], [10, 10], [5, 25], [-1, 10]])
    assert centers_inside(centers, box).tolist() == [True, True, False, False, False]
    assert centers_inside(centers, box, eps=0.01).tolist() == [True, False, False, False, False]


def test_centers_inside_broadcasts_candidates_against_their_gt():
    """(G, C, 2) candidate centres against (G, 1, 4) GTs: each row is tested
    against its own GT only."""
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    centers = torch.tensor([[[5.0, 5], [25, 25]], [[5, 5], [25, 25]]])
    assert centers_inside(centers, gt[:, None, :], 0.01).tolist() == [[True, False], [False, True]]
