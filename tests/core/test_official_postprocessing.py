"""The official code's post-processing (MODEL.IOU_AWARE.CANDIDATES "anchors" with the threshold on S):
a hand case where it keeps other detections than Detectron2's top-k of pairs, and equality with a
direct transcription of the official rule on random inputs."""
import os

import pytest
import torch
from torchvision.ops import clip_boxes_to_image, nms

from iou_aware_retinanet.core import BoxCoder, InferenceConfig, postprocess_image

OFFICIAL = {"threshold_on": "fused", "candidates": "anchors"}
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def official_rule(cls_probs, box_deltas, ious, anchors, box_coder, image_size, alpha, nms_pre, score_thr, iou_thr,
                  max_per_img, clip):  # fmt: skip
    """The authors' get_bboxes_single and mmdetection's multiclass_nms, transcribed: per level S for
    every (anchor, class), the nms_pre anchors of highest best-class S (when the level has more),
    their boxes; then per class the pairs with S > score_thr, NMS, and the max_per_img best overall."""
    level_boxes, level_scores = [], []
    for level, (probs, deltas, level_anchors) in enumerate(zip(cls_probs, box_deltas, anchors)):
        scores = probs
        if ious is not None:
            iou = ious[level][:, None].expand_as(probs)
            scores = probs * iou if alpha is None else probs.pow(alpha) * iou.pow(1 - alpha)
        if nms_pre > 0 and scores.shape[0] > nms_pre:
            _, top = scores.max(dim=1).values.topk(nms_pre)
            level_anchors, deltas, scores = level_anchors[top], deltas[top], scores[top]
        boxes = box_coder.apply_deltas(deltas, level_anchors)
        level_boxes.append(clip_boxes_to_image(boxes, image_size) if clip else boxes)
        level_scores.append(scores)
    boxes, scores = torch.cat(level_boxes), torch.cat(level_scores)
    kept_boxes, kept_scores, kept_classes = [], [], []
    for k in range(scores.shape[1]):
        passing = scores[:, k] > score_thr
        if not passing.any():
            continue
        class_boxes, class_scores = boxes[passing], scores[passing, k]
        keep = nms(class_boxes, class_scores, iou_thr)
        kept_boxes.append(class_boxes[keep])
        kept_scores.append(class_scores[keep])
        kept_classes.append(torch.full((len(keep),), k, dtype=torch.long))
    if not kept_boxes:
        return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    boxes, scores, classes = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_classes)
    order = scores.argsort(descending=True)[:max_per_img]
    return boxes[order], scores[order], classes[order]


def test_official_keeps_every_class_of_the_best_anchors():
    """Two classes, top-2 per level, three apart anchors with S = p (no IoU branch):
    anchor 0 [0.9, 0.8], anchor 1 [0.7, 0.0], anchor 2 [0.6, 0.0]. Detectron2's top-k of
    pairs keeps (0, 0) and (0, 1); the official rule keeps anchors 0 and 1, i.e. three pairs."""
    probs = [torch.tensor([[0.9, 0.8], [0.7, 0.0], [0.6, 0.0]])]
    anchors = [torch.tensor([[0.0, 0, 10, 10], [20.0, 0, 30, 10], [40.0, 0, 50, 10]])]
    deltas = [torch.zeros(3, 4)]

    def run(**options):
        config = InferenceConfig(topk_candidates=2, **options)
        return postprocess_image(probs, deltas, None, anchors, BoxCoder(), (100, 100), config)

    pairs, official = run(threshold_on="fused"), run(**OFFICIAL)
    assert pairs.scores.tolist() == pytest.approx([0.9, 0.8])
    assert official.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert official.classes.tolist() == [0, 1, 0]
    assert official.boxes[2].tolist() == [20.0, 0.0, 30.0, 10.0]


def test_official_with_fewer_anchors_than_the_top_k_is_the_threshold_on_s():
    """A level with no more anchors than the top-k: both rules keep every pair with S > 0.05."""
    probs = [torch.tensor([[0.9, 0.04], [0.3, 0.2]])]
    ious = [torch.tensor([0.25, 0.01])]  # S = sqrt(p * IoU): [0.474, 0.1], [0.0548, 0.0447]
    anchors = [torch.tensor([[0.0, 0, 10, 10], [20.0, 0, 30, 10]])]
    det = postprocess_image(probs, [torch.zeros(2, 4)], ious, anchors, BoxCoder(), (100, 100), InferenceConfig(**OFFICIAL))
    assert det.scores.tolist() == pytest.approx([0.225 ** 0.5, 0.1, 0.003 ** 0.5])
    assert det.cls_scores.tolist() == pytest.approx([0.9, 0.04, 0.3])


@pytest.mark.parametrize("with_iou", [True, False])
@pytest.mark.parametrize("alpha", [0.5, None, 0.3])
@pytest.mark.parametrize("clip", [False, True])
def test_official_equals_the_transcribed_rule_on_random_levels(with_iou, alpha, clip):
    generator = torch.Generator().manual_seed(17)
    image_size = (96, 128)
    coder = BoxCoder()
    for trial in range(5):
        sizes = [300, 120, 40]  # with top-k 100: the two large levels are cut, the small one is not
        num_classes = 3
        # Scores spread over [0, 1] so that many pairs pass 0.05 and the top-k matters.
        probs = [torch.rand(n, num_classes, generator=generator) ** 3 for n in sizes]
        ious = [torch.rand(n, generator=generator) for n in sizes] if with_iou else None
        centres = [torch.rand(n, 2, generator=generator) * torch.tensor([128.0, 96.0]) for n in sizes]
        # Small boxes, so that NMS leaves many and the per-level selection shows in the result.
        anchors = [torch.cat([c - 3.0, c + 3.0], dim=1) for c in centres]
        deltas = [torch.randn(n, 4, generator=generator) * 0.3 for n in sizes]
        config = InferenceConfig(alpha=alpha, topk_candidates=100, max_detections=400, clip_to_image=clip, **OFFICIAL)
        det = postprocess_image(probs, deltas, ious, anchors, coder, image_size, config)
        boxes, scores, classes = official_rule(probs, deltas, ious, anchors, coder, image_size, alpha, nms_pre=100,
                                               score_thr=0.05, iou_thr=0.5, max_per_img=400, clip=clip)  # fmt: skip
        assert len(det) == len(scores) > 150, trial
        mine, theirs = _in_order(det.scores, det.classes, det.boxes), _in_order(scores, classes, boxes)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b)


def _in_order(scores, classes, boxes):
    """Detections by descending score, equal scores (float32 ties happen) by class, then box."""
    keys = [boxes[:, 0], classes.double(), -scores.double()]
    order = torch.arange(len(scores))
    for key in keys:  # stable sorts, least significant key first
        order = order[key[order].argsort(stable=True)]
    return scores[order], classes[order], boxes[order]


# ------------------------------------------------------------------ the config entry

OFFICIAL_CONFIG = "COCO-Detection/iou_aware_retinanet_R_50_FPN_1x_official_postprocessing.yaml"


def test_the_official_config_sets_the_official_post_processing():
    from iou_aware_retinanet.config import inference_config_from_cfg
    from iou_aware_retinanet.tv.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, OFFICIAL_CONFIG))
    config = inference_config_from_cfg(cfg)
    assert (config.candidates, config.threshold_on, config.score_thresh, config.topk_candidates, config.nms_thresh,
            config.max_detections, config.alpha) == ("anchors", "fused", 0.05, 1000, 0.5, 100, 0.5)  # fmt: skip
    cfg.merge_from_list(["MODEL.IOU_AWARE.CANDIDATES", "boxes"])
    with pytest.raises(ValueError, match="MODEL.IOU_AWARE.CANDIDATES.*pairs, anchors"):
        inference_config_from_cfg(cfg)


def test_the_detectron2_model_hands_the_option_to_the_core(monkeypatch):
    pytest.importorskip("detectron2", reason="Detectron2 is not installed: the Detectron2 front-end is not tested")
    from detectron2.modeling import build_model

    from iou_aware_retinanet.d2 import meta_arch

    from ..d2.helpers import project_cfg, random_inputs

    seen = []

    def spy(*args):
        seen.append(args[-1])
        return detect_image(*args)

    detect_image = meta_arch.detect_image
    monkeypatch.setattr(meta_arch, "detect_image", spy)
    model = build_model(project_cfg(OFFICIAL_CONFIG)).eval()
    with torch.no_grad():
        outputs = model(random_inputs(num_images=2))
    assert seen == ["anchors", "anchors"] and len(outputs) == 2
