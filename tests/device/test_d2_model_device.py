"""The Detectron2 meta-architecture on the test device: a training step for every
assigner on a batch of images of different sizes (one without GT), inference with
THRESHOLD_ON cls and fused, and autocast as Detectron2's ``AMPTrainer`` and its
RetinaNet autocast test use it (boxes float32, scores in the type autocast gives them)."""
import pytest

from ..d2.helpers import D2_MISSING_REASON, project_cfg, scramble_head
from .helpers import ASSIGNERS, NUM_CLASSES, amp_dtype, assert_on, fused_score_dtype

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

SIZES = [(128, 160), (100, 140), (96, 96)]


def d2_model(device, opts=()):
    torch.manual_seed(0)
    return build_model(project_cfg(opts=["MODEL.DEVICE", str(device)] + list(opts)))


def d2_inputs(device, seed=0, num_gt=(3, 0, 5)):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for (h, w), n in zip(SIZES, num_gt):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = 10 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        inst = Instances((h, w), gt_boxes=Boxes(torch.cat([xy, xy + wh], 1).to(device)),
                         gt_classes=torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device))  # fmt: skip
        inputs.append({"image": (torch.rand(3, h, w, generator=g) * 255).to(device), "instances": inst,
                       "height": h, "width": w})  # fmt: skip
    return inputs


CASES = [(name, True) for name in ASSIGNERS] + [("max_iou", False)]


@pytest.mark.parametrize("name,iou_branch", CASES)
@pytest.mark.parametrize("amp", [False, True])
def test_d2_training_step_on_device(device, name, iou_branch, amp):
    """What Detectron2's trainers run (``AMPTrainer``: the forward under autocast)."""
    model = d2_model(device, ["MODEL.ASSIGNER.NAME", name, "MODEL.IOU_AWARE.ENABLED", iou_branch])
    model.train()
    with EventStorage(), torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
        losses = model(d2_inputs(device))
    assert_on(device, losses)
    assert ("loss_iou" in losses) == iou_branch
    for key, value in losses.items():
        assert value.dtype == torch.float32 and bool(torch.isfinite(value)), key
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == device.type and bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("threshold_on", ["cls", "fused"])
@pytest.mark.parametrize("iou_branch", [True, False])
def test_d2_inference_on_device(device, threshold_on, iou_branch):
    opts = ["MODEL.IOU_AWARE.ENABLED", iou_branch, "MODEL.IOU_AWARE.THRESHOLD_ON", threshold_on,
            "MODEL.RETINANET.SCORE_THRESH_TEST", 0.2]  # fmt: skip
    model = d2_model(device, opts).eval()
    scramble_head(model)
    inputs = d2_inputs(device)
    with torch.no_grad():
        outputs = model(inputs)
    reference = d2_model("cpu", opts).eval()
    reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    cpu_inputs = [{"image": x["image"].cpu(), "height": x["height"], "width": x["width"]} for x in inputs]
    with torch.no_grad():
        expected = reference(cpu_inputs)
    for out, exp in zip(outputs, expected):
        inst, ref = out["instances"], exp["instances"]
        assert len(inst) > 0 and len(inst) == len(ref)
        assert_on(device, [inst.pred_boxes.tensor, inst.scores, inst.pred_classes])
        assert inst.has("pred_ious") == iou_branch
        torch.testing.assert_close(inst.pred_boxes.tensor.cpu(), ref.pred_boxes.tensor, rtol=0, atol=2e-2)
        torch.testing.assert_close(inst.scores.cpu(), ref.scores, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("iou_branch", [True, False])
def test_d2_inference_under_autocast(device, iou_branch):
    """Detectron2's RetinaNet autocast test, on this meta-architecture: boxes float32,
    scores in the autocast type (the fused score: the type autocast gives p^a * IoU^(1-a))."""
    model = d2_model(device, ["MODEL.IOU_AWARE.ENABLED", iou_branch, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.2]).eval()
    scramble_head(model)
    dtype = amp_dtype(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        outputs = model(d2_inputs(device, seed=1))
    assert sum(len(o["instances"]) for o in outputs) > 0
    expected = fused_score_dtype(device, model.inference_config.alpha) if iou_branch else dtype
    for out in outputs:
        inst = out["instances"]
        assert inst.pred_boxes.tensor.dtype == torch.float32
        assert inst.scores.dtype == expected
        assert_on(device, [inst.pred_boxes.tensor, inst.scores])
