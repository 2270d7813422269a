"""The LazyConfigs (configs/**/*.py) describe what their YAML twins describe: the same
model (parameters, options, losses on one batch), optimizer, schedule and data."""
import os

import pytest

from .helpers import CONFIGS, D2_MISSING_REASON, project_cfg, random_inputs

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

import torch  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_lr_scheduler, build_optimizer  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from .test_train_net import datasets_root  # noqa: E402,F401  (fixture: the mini shapes datasets in a temporary root)

TWINS = [
    ("COCO-Detection/iou_aware_retinanet_R_50_FPN_1x.py", "COCO-Detection/iou_aware_retinanet_R_50_FPN_1x.yaml"),
    ("Shapes/iou_aware_retinanet.py", "Shapes/iou_aware_retinanet.yaml"),
]


def _load(lazy_file):
    cfg = LazyConfig.load(os.path.join(CONFIGS, lazy_file))
    cfg.train.device = "cpu"
    return cfg


def _yaml(yaml_file):
    cfg = project_cfg(yaml_file, tiny=False, opts=["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return cfg


@pytest.mark.parametrize("lazy_file, yaml_file", TWINS)
def test_lazy_config_builds_the_yaml_model(lazy_file, yaml_file):
    torch.manual_seed(0)
    yaml_model = build_model(_yaml(yaml_file))
    lazy_model = instantiate(_load(lazy_file).model)
    assert type(lazy_model) is type(yaml_model)
    assert {k: v.shape for k, v in lazy_model.state_dict().items()} == {k: v.shape for k, v in yaml_model.state_dict().items()}
    # What is not a parameter: assignment, losses, inference, anchors, box coding, input.
    assert type(lazy_model.assigner) is type(yaml_model.assigner)
    assert vars(lazy_model.assigner) == vars(yaml_model.assigner)
    assert lazy_model.loss_config == yaml_model.loss_config
    assert lazy_model.inference_config == yaml_model.inference_config
    for name in ("num_classes", "head_in_features", "num_anchors_per_location", "input_format", "test_score_thresh",
                 "test_topk_candidates", "test_nms_thresh", "max_detections_per_image", "focal_loss_alpha",
                 "focal_loss_gamma", "smooth_l1_beta", "box_reg_loss_type"):  # fmt: skip
        assert getattr(lazy_model, name) == getattr(yaml_model, name), name
    assert lazy_model.box2box_transform.weights == tuple(yaml_model.box2box_transform.weights)
    assert torch.equal(lazy_model.pixel_mean, yaml_model.pixel_mean) and torch.equal(lazy_model.pixel_std, yaml_model.pixel_std)
    for ours, theirs in zip(lazy_model.anchor_generator.cell_anchors, yaml_model.anchor_generator.cell_anchors):
        assert torch.equal(ours, theirs)
    assert lazy_model.anchor_generator.strides == yaml_model.anchor_generator.strides
    # Frozen stages: the same parameters train.
    assert [n for n, p in lazy_model.named_parameters() if p.requires_grad] == [
        n for n, p in yaml_model.named_parameters() if p.requires_grad
    ]

    # The same losses on one batch, from the same weights.
    lazy_model.load_state_dict(yaml_model.state_dict())
    losses = []
    for model in (yaml_model, lazy_model):
        model.train()
        torch.manual_seed(0)
        with EventStorage():
            losses.append({k: v.item() for k, v in model(random_inputs(num_images=2, size=(96, 128), num_classes=3)).items()})
    assert set(losses[0]) == {"loss_cls", "loss_box_reg", "loss_iou"}
    assert losses[0] == losses[1]


@pytest.mark.parametrize("lazy_file, yaml_file", TWINS)
def test_lazy_config_optimizer_schedule_and_run_options(lazy_file, yaml_file):
    lazy, yaml_cfg = _load(lazy_file), _yaml(yaml_file)
    model = build_model(yaml_cfg)
    lazy.optimizer.params.model = model
    ours, theirs = instantiate(lazy.optimizer), build_optimizer(yaml_cfg, model)
    assert type(ours) is type(theirs)
    assert len(ours.param_groups) == len(theirs.param_groups)
    for a, b in zip(ours.param_groups, theirs.param_groups):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        for key in ("lr", "momentum", "weight_decay", "nesterov", "dampening"):
            assert a[key] == b[key], key

    solver = yaml_cfg.SOLVER
    multiplier = instantiate(lazy.lr_multiplier)
    reference = build_lr_scheduler(yaml_cfg, theirs)._multiplier
    checkpoints = sorted({0, 1, solver.WARMUP_ITERS - 1, solver.WARMUP_ITERS, solver.MAX_ITER - 1}
                         | {s + d for s in solver.STEPS for d in (-1, 0)})  # fmt: skip
    for it in checkpoints:
        assert multiplier(it / solver.MAX_ITER) == pytest.approx(reference(it / solver.MAX_ITER)), it

    train = lazy.train
    assert train.max_iter == solver.MAX_ITER
    assert train.checkpointer.period == solver.CHECKPOINT_PERIOD
    assert train.eval_period == yaml_cfg.TEST.EVAL_PERIOD
    assert train.init_checkpoint == _yaml_weights(yaml_file)
    assert lazy.dataloader.train.total_batch_size == solver.IMS_PER_BATCH
    assert lazy.dataloader.train.num_workers == yaml_cfg.DATALOADER.NUM_WORKERS
    assert lazy.dataloader.train.dataset.names == yaml_cfg.DATASETS.TRAIN[0]
    assert lazy.dataloader.test.dataset.names == yaml_cfg.DATASETS.TEST[0]
    resize = lazy.dataloader.train.mapper.augmentations[0]
    assert tuple(resize.short_edge_length) == tuple(yaml_cfg.INPUT.MIN_SIZE_TRAIN)
    assert resize.max_size == yaml_cfg.INPUT.MAX_SIZE_TRAIN
    test_resize = lazy.dataloader.test.mapper.augmentations[0]
    assert (test_resize.short_edge_length, test_resize.max_size) == (yaml_cfg.INPUT.MIN_SIZE_TEST, yaml_cfg.INPUT.MAX_SIZE_TEST)
    assert lazy.dataloader.train.mapper.image_format == yaml_cfg.INPUT.FORMAT


def _yaml_weights(yaml_file):
    """MODEL.WEIGHTS as the YAML file gives it (the tests blank it to build without downloading)."""
    return project_cfg(yaml_file, tiny=False).MODEL.WEIGHTS


def test_shapes_lazy_config_data_loaders_build(datasets_root):  # noqa: F811
    lazy = _load("Shapes/iou_aware_retinanet.py")
    lazy.dataloader.train.dataset.names = "shapes_mini_train"
    lazy.dataloader.train.total_batch_size = 2
    lazy.dataloader.test.dataset.names = "shapes_mini_val"
    batch = next(iter(instantiate(lazy.dataloader.train)))
    assert len(batch) == 2
    for sample in batch:
        assert sample["image"].shape[0] == 3 and min(sample["image"].shape[1:]) == 128
        assert len(sample["instances"]) > 0
    test_sample = next(iter(instantiate(lazy.dataloader.test)))[0]
    assert min(test_sample["image"].shape[1:]) == 128
    evaluator = instantiate(lazy.dataloader.evaluator)
    assert evaluator._metadata.name == "shapes_mini_val"
