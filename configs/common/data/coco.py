# COCO detection loaders as the YAML configs' INPUT / DATALOADER keys set them
# (Detectron2's defaults, plus the RetinaNet multi-scale training sizes).
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),  # DATASETS.TRAIN
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(  # INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN
                short_edge_length=(640, 672, 704, 736, 768, 800), max_size=1333, sample_style="choice"
            ),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",  # INPUT.FORMAT
    ),
    total_batch_size=16,  # SOLVER.IMS_PER_BATCH
    num_workers=4,  # DATALOADER.NUM_WORKERS
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),  # DATASETS.TEST
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],  # INPUT.*_TEST
        image_format="${...train.mapper.image_format}",
    ),
    num_workers="${..train.num_workers}",
)

dataloader.evaluator = L(COCOEvaluator)(dataset_name="${..test.dataset.names}")
