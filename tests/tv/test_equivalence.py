"""With the IoU branch off, the torchvision front-end is torchvision's RetinaNet.

Settings under which the two must agree: MODEL.IOU_AWARE.ENABLED False
(alpha 1: the score is p), the max_iou assigner with RetinaNet's thresholds,
an L1 box loss (smooth_l1, beta 0), focal loss alpha 0.25 / gamma 2, four
head convs without norm, prior 0.01. torchvision's RetinaNet is built on the
same backbone and anchor generator, with this model's weights copied in.
"""
import pytest
import torch
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead

from iou_aware_retinanet.tv import build_model
from iou_aware_retinanet.benchmarks.peers import build_torchvision_retinanet

from .helpers import random_inputs, scramble_head, tiny_cfg

EQUIVALENCE_OPTS = [
    "MODEL.IOU_AWARE.ENABLED", False,
    "MODEL.IOU_AWARE.ALPHA", 1.0,
    "MODEL.ASSIGNER.NAME", "max_iou",
    "MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "smooth_l1",
    "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", 0.0,
    "MODEL.RETINANET.FOCAL_LOSS_ALPHA", 0.25,
    "MODEL.RETINANET.FOCAL_LOSS_GAMMA", 2.0,
    "MODEL.RETINANET.NUM_CONVS", 4,
    "MODEL.RETINANET.NORM", "",
    "MODEL.RETINANET.PRIOR_PROB", 0.01,
]  # fmt: skip


def _torchvision_twin(model, cfg):
    """torchvision's RetinaNet with the same backbone / anchors / sizes and ``model``'s weights."""
    reference = build_torchvision_retinanet(cfg)
    assert type(reference) is RetinaNet and type(reference.head) is RetinaNetHead  # the stock classes
    # strict: the project adds no parameter or buffer when the IoU branch is off
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference


@pytest.fixture(scope="module")
def models():
    cfg = tiny_cfg(EQUIVALENCE_OPTS)
    # torchvision evaluates at min_size[-1] / max_size: make the test sizes the same.
    cfg.INPUT.MIN_SIZE_TEST = cfg.INPUT.MIN_SIZE_TRAIN[-1]
    cfg.INPUT.MAX_SIZE_TEST = cfg.INPUT.MAX_SIZE_TRAIN
    torch.manual_seed(0)
    model = build_model(cfg)
    scramble_head(model)
    return model, _torchvision_twin(model, cfg)


def test_same_parameters(models):
    model, reference = models
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert not any("iou" in k for k in model.state_dict())


@pytest.mark.parametrize("seed, num_gt", [(0, (3, 0)), (1, (5, 1)), (2, (12, 7))])
def test_training_losses_equal(models, seed, num_gt):
    model, reference = models
    model.train()
    reference.train()
    images, targets = random_inputs(num_images=2, num_gt=num_gt, seed=seed)
    ours = model(images, targets)
    theirs = reference(images, targets)
    assert set(ours) == {"loss_cls", "loss_box_reg"}
    torch.testing.assert_close(ours["loss_cls"], theirs["classification"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours["loss_box_reg"], theirs["bbox_regression"], rtol=1e-5, atol=1e-7)
    assert ours["loss_box_reg"] > 0


def test_gradients_equal(models):
    model, reference = models
    model.train()
    reference.train()
    images, targets = random_inputs(num_images=2, num_gt=(4, 2), seed=3)
    model.zero_grad()
    reference.zero_grad()
    sum(model(images, targets).values()).backward()
    sum(reference(images, targets).values()).backward()
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    model.zero_grad()
    reference.zero_grad()


@pytest.mark.parametrize("seed", [0, 1])
def test_detections_equal(models, seed):
    model, reference = models
    model.eval()
    reference.eval()
    # Different sizes in one batch: padding, per-image clipping and rescaling.
    images, _ = random_inputs(num_images=2, seed=seed)
    images.append(torch.rand(3, 80, 120, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        ours = model(images)
        theirs = reference(images)
    for a, b in zip(ours, theirs):
        assert len(a["boxes"]) > 10, "the scrambled head should produce detections"
        assert set(a) == {"boxes", "scores", "labels"}
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
        torch.testing.assert_close(a["labels"], b["labels"])
