#!/usr/bin/env python
"""Train and evaluate IoU-aware RetinaNet with Detectron2.

    python train_net.py --config-file configs/COCO-Detection/iou_aware_retinanet_R_50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <model.pth>
    python train_net.py --config-file <cfg> --resume

Same flags as Detectron2's tools/train_net.py; multi-GPU / multi-machine runs go
through Detectron2's ``launch`` (DDP).
"""
import logging
import os

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.utils import comm

from iou_aware_retinanet.d2 import register_config_datasets
from iou_aware_retinanet.d2.checkpoint import name_last_good_checkpoint, resume_from_newest_readable, use_finite_checkpointer
from iou_aware_retinanet.d2.datasets import (
    CheckedCOCOEvaluator, FileNamingDatasetMapper, check_num_classes, check_test_images, check_train_images,
)
from iou_aware_retinanet.d2.entry import CheckedCheckpointer, check_eval_weights, check_weights_file, setup_project_cfg
from iou_aware_retinanet.run_folder import check_config_replaceable, claim_output_dir

# The OUTPUT_DIR locks this process holds (one per folder), released when main returns.
_RUN_LOCKS = {}


class Trainer(DefaultTrainer):
    def __init__(self, cfg, allow_pickle: bool = False):
        self.allow_pickle = allow_pickle  # read by build_hooks, which DefaultTrainer.__init__ calls
        super().__init__(cfg)

    # Data loaders whose errors name the image file (a truncated image, say).
    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=FileNamingDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=FileNamingDatasetMapper(cfg, False))

    def build_hooks(self):
        # Checkpoints read without unpickling code, and refused when they do not fit the model
        # (DefaultTrainer.__init__ made the checkpointer just before calling this).
        default = self.checkpointer
        self.checkpointer = CheckedCheckpointer(
            default.model, default.save_dir, allow_pickle=self.allow_pickle, **default.checkpointables
        )
        # Checkpoints only from weights that are finite and still give a finite loss.
        return use_finite_checkpointer(super().build_hooks())

    def resume_or_load(self, resume=True):  # a truncated last checkpoint falls back to an older one
        resume_from_newest_readable(self.checkpointer, super().resume_or_load, resume)

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:  # Detectron2's "Loss became infinite or NaN"
            raise name_last_good_checkpoint(e, self._hooks) from None

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # Against the same repaired ground truth as the torchvision front-end (boxes clipped, area filled).
        return CheckedCOCOEvaluator(dataset_name, output_dir=output_folder)


def setup(args):
    # Safe YAML (Detectron2's merge_from_file would allow Python tags), ints for float keys.
    cfg = setup_project_cfg(args.config_file, args.opts)
    check_weights_file(cfg.MODEL.WEIGHTS, allow_pickle=getattr(args, "allow_pickle", False))
    if args.eval_only:
        check_eval_weights(cfg, resume=args.resume)
    _claim_output_dir(cfg, args)  # before default_setup writes config.yaml and log.txt there
    # --eval-only logs and saves its config in OUTPUT_DIR/inference, beside its results:
    # the run's own config.yaml in OUTPUT_DIR stays the one it was trained with.
    default_setup(_with_output_dir(cfg, os.path.join(cfg.OUTPUT_DIR, "inference")) if args.eval_only else cfg, args)
    # DATASETS.COCO_INSTANCES, and the built-in datasets generated before
    # COCOEvaluator looks for their json file.
    register_config_datasets(cfg)
    check_num_classes(cfg)  # MODEL.RETINANET.NUM_CLASSES against the datasets, before any training
    if cfg.DATALOADER.CACHE_IMAGES:
        logging.getLogger("detectron2").info(
            "DATALOADER.CACHE_IMAGES is the torchvision engine's: here Detectron2's DatasetMapper reads every "
            "image from its file"
        )
    if not args.eval_only:
        check_train_images(cfg)  # images Detectron2's reader would saturate fail now
        check_test_images(cfg)  # a corrupt or wrongly sized test image fails now, not after training
    return cfg


def _with_output_dir(cfg, output_dir: str):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    return cfg


def _claim_output_dir(cfg, args) -> None:
    """OUTPUT_DIR's rules, the torchvision engine's (:func:`iou_aware_retinanet.run_folder.claim_output_dir`):
    the folder's lock, no new run into a finished one, ``--resume`` only under the run's config, no
    user's ``config.yaml`` replaced, temporaries of interrupted writes removed; before anything is written."""
    if args.eval_only:
        check_config_replaceable(os.path.join(cfg.OUTPUT_DIR, "inference", "config.yaml"), cfg.dump())
        return
    folder = os.path.realpath(cfg.OUTPUT_DIR)
    holds = folder in _RUN_LOCKS  # this process already holds it (setup called again)
    lock = claim_output_dir(cfg.OUTPUT_DIR, cfg.dump(), args.resume, lock=comm.is_main_process() and not holds)
    if lock is not None:
        _RUN_LOCKS[folder] = lock


def main(args):
    try:
        return _main(args)
    finally:
        for lock in _RUN_LOCKS.values():
            lock.release()
        _RUN_LOCKS.clear()


def _main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # Every weight must come from the file: no evaluation of a partly random model.
        CheckedCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, require_all=True, allow_pickle=getattr(args, "allow_pickle", False)
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg, allow_pickle=getattr(args, "allow_pickle", False))
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="allow .pkl MODEL.WEIGHTS (read with pickle, which can run code: only for files you trust)",
    )
    return parser


if __name__ == "__main__":
    args = get_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
