"""train_net.py: train, evaluate with COCOEvaluator, resume and --eval-only, on the CPU."""
import json
import os
import runpy

import pytest
import torch

from .helpers import D2_MISSING_REASON, REPO

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

from detectron2.engine import default_argument_parser  # noqa: E402


def _train_net():
    return runpy.run_path(os.path.join(REPO, "train_net.py"), run_name="train_net")


def _opts(tmp_path, *extra):
    return [
        "--config-file", os.path.join(REPO, "configs", "Shapes", "iou_aware_retinanet.yaml"),
        *extra,
        "DATASETS.TRAIN", "('shapes_mini_train',)",
        "DATASETS.TEST", "('shapes_mini_val',)",
        "SOLVER.MAX_ITER", "3",
        "SOLVER.CHECKPOINT_PERIOD", "2",
        "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(128,)",
        "INPUT.MIN_SIZE_TEST", "128",
        "OUTPUT_DIR", str(tmp_path / "out"),
        # 3 iterations leave p near the focal prior 0.01: let some through the threshold on p.
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.005",
    ]


@pytest.fixture
def datasets_root(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    monkeypatch.setenv("IOU_AWARE_RETINANET_DATASETS", str(root))
    # The catalog was registered at import with the default root; point the
    # mini datasets at this test's root.
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from iou_aware_retinanet.data import builtin

    for name in ("shapes_mini_train", "shapes_mini_val"):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        builtin._REGISTERED_ROOTS.pop(name, None)
    builtin.register_builtin_datasets(str(root))
    return root


def test_train_evaluate_resume_eval_only(tmp_path, datasets_root):
    train_net = _train_net()
    train_net["main"](default_argument_parser().parse_args(_opts(tmp_path)))
    out = tmp_path / "out"
    assert (out / "model_final.pth").exists() and (out / "model_0000001.pth").exists()
    assert (out / "inference" / "coco_instances_results.json").exists()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_iou" in m for m in metrics)
    final = [m for m in metrics if "bbox/AP" in m][-1]  # the evaluation after training
    assert {f"bbox/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")} <= set(final)

    # --eval-only on the final weights reproduces the end-of-training evaluation.
    eval_args = default_argument_parser().parse_args(
        _opts(tmp_path, "--eval-only") + ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    )
    evaluated = train_net["main"](eval_args)
    assert evaluated["bbox"]["AP50"] == pytest.approx(final["bbox/AP50"])

    # --resume picks up model_final (iteration 3 of 3): no training step, no crash.
    (out / "metrics.json").unlink()
    train_net["main"](default_argument_parser().parse_args(_opts(tmp_path, "--resume")))
    resumed = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert not any("loss_iou" in m for m in resumed)


def test_config_datasets_are_registered(tmp_path, datasets_root):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog

    from iou_aware_retinanet import add_iou_aware_retinanet_config
    from iou_aware_retinanet.d2 import register_config_datasets
    from iou_aware_retinanet.data.builtin import builtin_dataset_paths

    json_file, image_root = builtin_dataset_paths("shapes_mini_val", str(datasets_root))
    cfg = get_cfg()
    add_iou_aware_retinanet_config(cfg)
    cfg.DATASETS.COCO_INSTANCES = [["my_shapes", json_file, image_root]]
    cfg.DATASETS.TEST = ("my_shapes",)
    register_config_datasets(cfg)
    register_config_datasets(cfg)  # idempotent
    assert len(DatasetCatalog.get("my_shapes")) == 16
    cfg.DATASETS.COCO_INSTANCES = [["my_shapes", json_file, "/elsewhere"]]
    with pytest.raises(ValueError, match="already registered"):
        register_config_datasets(cfg)
    cfg.DATASETS.COCO_INSTANCES = [["only_a_name"]]
    with pytest.raises(ValueError, match="name, json_file, image_root"):
        register_config_datasets(cfg)


# ------------------------------------------------------------------ checkpoints from finite weights only


def _trainer(train_net, tmp_path, *extra, resume=False):
    flags = ["--resume"] if resume else []
    args = default_argument_parser().parse_args(_opts(tmp_path, *flags) + ["DATASETS.TEST", "()", *extra])
    return train_net["Trainer"](train_net["setup"](args))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_periodic_checkpoint_holds_the_state_after_its_iteration(tmp_path, datasets_root):
    """Written one iteration late (once the next loss is finite), the checkpoint of iteration 0
    is still iteration 0's state: the final weights of a 1-iteration run, bit for bit."""
    train_net = _train_net()
    two = _trainer(train_net, tmp_path / "two", "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1", "SEED", "3")
    two.train()
    one = _trainer(train_net, tmp_path / "one", "SOLVER.MAX_ITER", "1", "SEED", "3")
    one.train()
    periodic = _load(tmp_path / "two" / "out" / "model_0000000.pth")
    final_of_one = _load(tmp_path / "one" / "out" / "model_final.pth")
    assert periodic["iteration"] == 0 and periodic["trainer"]["iteration"] == 0
    assert periodic["model"].keys() == final_of_one["model"].keys()
    for key, value in periodic["model"].items():
        assert torch.equal(value, final_of_one["model"][key]), key
    final_of_two = _load(tmp_path / "two" / "out" / "model_final.pth")
    assert not all(torch.equal(v, final_of_two["model"][k]) for k, v in periodic["model"].items())
    assert (tmp_path / "two" / "out" / "last_checkpoint").read_text() == "model_final.pth"


def test_exploded_weights_are_never_checkpointed(tmp_path, datasets_root):
    """Weights blown up to 1e30 (finite) after iteration 2: the checkpoint due after iteration 3
    is refused (a non-finite loss or weight, whichever shows first); the error names the last
    good checkpoint, which holds sane weights and is what --resume would load."""
    from detectron2.engine import HookBase

    from iou_aware_retinanet.faults import NonFiniteLossError, NonFiniteWeightsError

    class ExplodeAfter2(HookBase):
        def after_step(self):
            if self.trainer.iter == 2:
                with torch.no_grad():
                    next(self.trainer.model.parameters()).mul_(1e30)

    train_net = _train_net()
    trainer = _trainer(train_net, tmp_path, "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2")
    trainer.register_hooks([ExplodeAfter2()])  # after the checkpointer: it runs on the blown-up weights
    with pytest.raises(FloatingPointError, match=r"iteration=?\s*[34]") as info:
        trainer.train()
    assert isinstance(info.value, (NonFiniteLossError, NonFiniteWeightsError))
    out = tmp_path / "out"
    assert str(out / "model_0000001.pth") in str(info.value) and "--resume" in str(info.value)
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_0000003.pth").exists() and not (out / "model_final.pth").exists()
    weights = _load(out / "model_0000001.pth")["model"]
    assert max(float(v.abs().max()) for v in weights.values() if v.is_floating_point()) < 1e6


def test_nan_weights_are_not_written_as_model_final(tmp_path, datasets_root):
    from detectron2.engine import HookBase

    from iou_aware_retinanet.faults import NonFiniteWeightsError

    class NanAtTheEnd(HookBase):
        def before_step(self):
            if self.trainer.iter == self.trainer.max_iter - 1:
                self.trainer.model.register_buffer("poisoned", torch.tensor([float("nan")]))

    train_net = _train_net()
    trainer = _trainer(train_net, tmp_path, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1")
    trainer.register_hooks([NanAtTheEnd()])
    with pytest.raises(NonFiniteWeightsError, match=r"poisoned.*model_final.pth not written") as info:
        trainer.train()
    assert str(tmp_path / "out" / "model_0000001.pth") in str(info.value)
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_truncated_last_checkpoint_resumes_from_the_previous_one(tmp_path, datasets_root, caplog):
    train_net = _train_net()
    _trainer(train_net, tmp_path, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1").train()
    out = tmp_path / "out"
    final = out / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])  # a copy cut short
    resumed = _trainer(train_net, tmp_path, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1", resume=True)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2  # model_0000001 holds iteration 1: the newest file that loads
    assert str(final) in caplog.text and "older checkpoint" in caplog.text
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    for f in out.glob("model_0*.pth"):
        f.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="no readable checkpoint") as info:
        _trainer(train_net, tmp_path, "SOLVER.MAX_ITER", "4", resume=True).resume_or_load(resume=True)
    assert str(out / "model_0000000.pth") in str(info.value)
