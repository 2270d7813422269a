# The paper's detector, IoU-aware RetinaNet R-50-FPN 1x: the LazyConfig of
# iou_aware_retinanet_R_50_FPN_1x.yaml (the same model, data and schedule).
#   python tools/lazyconfig_train_net.py --config-file configs/COCO-Detection/iou_aware_retinanet_R_50_FPN_1x.py
from ..common.data.coco import dataloader
from ..common.models.iou_aware_retinanet import model
from ..common.solver import lr_multiplier as _schedule
from ..common.solver import optimizer
from ..common.train import train

optimizer.lr = 0.01  # RetinaNet's learning rate
lr_multiplier = _schedule(steps=(60000, 80000), max_iter=90000)

train.max_iter = 90000
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
