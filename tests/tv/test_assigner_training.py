"""Every assigner's Shapes config trains on the built-in dataset: the loss goes down and stays finite.

A short run on a fixed batch of real shapes images (the model should fit it),
through the same config files users train with; the dynamic assigners see the
predictions of each step.
"""
import math
from pathlib import Path

import pytest
import torch

from iou_aware_retinanet.data.coco import CocoDetectionDataset
from iou_aware_retinanet.tv import build_model, get_cfg
from iou_aware_retinanet.tv.data import load_dataset

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "Shapes"
ASSIGNER_CONFIGS = ["iou_aware_retinanet", "topk", "atss", "noisy_anchor", "hambox", "task_aligned"]
STEPS = 40


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    mp = pytest.MonkeyPatch()
    mp.setenv("IOU_AWARE_RETINANET_DATASETS", str(root))
    try:
        cfg = get_cfg()
        cfg.merge_from_file(str(CONFIGS / "iou_aware_retinanet.yaml"))
        data = load_dataset(cfg, "shapes_mini_train", drop_empty=True)
    finally:
        mp.undo()
    dataset = CocoDetectionDataset(data.records)
    images, targets = zip(*(dataset[i] for i in range(4)))
    assert all(len(t["boxes"]) > 0 for t in targets)
    return list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]


@pytest.mark.parametrize("name", ASSIGNER_CONFIGS)
def test_loss_decreases_and_stays_finite(name, batch):
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / f"{name}.yaml"))
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", "(192,)", "INPUT.MAX_SIZE_TRAIN", 192])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = batch
    totals = []
    for _ in range(STEPS):
        losses = model(images, targets)
        total = sum(losses.values())
        assert all(math.isfinite(float(v.detach())) for v in losses.values()), (name, losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total.detach()))
    first, last = sum(totals[:5]) / 5, sum(totals[-5:]) / 5
    assert last < 0.8 * first, f"{name}: loss {first:.3f} -> {last:.3f}"
