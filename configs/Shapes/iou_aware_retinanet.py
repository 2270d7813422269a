# The main job on the built-in shapes dataset: the LazyConfig of
# configs/Shapes/iou_aware_retinanet.yaml (the same model, data and schedule).
#   python tools/lazyconfig_train_net.py --config-file configs/Shapes/iou_aware_retinanet.py
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from iou_aware_retinanet.d2.backbone import tiny_fpn_backbone

from ..common.data.coco import dataloader
from ..common.models.iou_aware_retinanet import model
from ..common.solver import lr_multiplier as _schedule
from ..common.solver import optimizer
from ..common.train import train

# A narrow ResNet-18 + FPN (MODEL.BACKBONE.NAME "build_tiny_fpn_backbone").
model.backbone = L(tiny_fpn_backbone)(
    depth=18, stem_channels=16, res2_channels=16, norm="BN", freeze_at=0, out_channels=64
)
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.conv_dims = [64, 64]
model.head.norm = "GN"
# Objects are 16 to ~100 px.
model.anchor_generator.sizes = [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [16, 32, 64, 128, 256]]
model.num_classes = 4
model.pixel_std = [57.375, 57.120, 58.395]

dataloader.train.dataset.names = "shapes_train"
dataloader.test.dataset.names = "shapes_val"
dataloader.train.mapper.augmentations[0].short_edge_length = (128,)
dataloader.train.mapper.augmentations[0].max_size = 128
dataloader.test.mapper.augmentations[0].short_edge_length = 128
dataloader.test.mapper.augmentations[0].max_size = 128
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 0

optimizer.lr = 0.04
lr_multiplier = _schedule(steps=(3150, 4050), max_iter=4500, warmup_iters=300)

train.max_iter = 4500
train.checkpointer.period = 1000
train.eval_period = 1000
train.device = "cpu"
train.seed = 0
train.output_dir = "./output/shapes/iou_aware_retinanet"
