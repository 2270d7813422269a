"""The torchvision engine on the test device, float32 and with ``SOLVER.AMP.ENABLED``
(float16 + GradScaler on CUDA, bfloat16 on the CPU): training and evaluation run,
a killed mixed-precision run resumes to the same weights and loss scale, and a step
the loss scaler skips (overflowing gradients) is not a non-finite loss."""
import os

import pytest
import torch

from iou_aware_retinanet.tv import amp, train
from iou_aware_retinanet.tv.model import IoUAwareRetinaNet

from ..tv.engine_helpers import fresh_datasets_root, tiny_cfg  # noqa: F401  (a fixture)


# 96 px, not the engine tests' 64: with a 1x1 P6, bfloat16 autocast on the CPU meets a PyTorch
# bug (garbage weight gradients of P7's stride-2 conv on a 1x1 input).
SIZE = 96


def _cfg(tmp_path, device, use_amp, max_iter=4, **overrides):
    overrides = {
        "MODEL.DEVICE": str(device), "SOLVER.AMP.ENABLED": str(use_amp),
        "INPUT.MIN_SIZE_TRAIN": f"({SIZE},)", "INPUT.MAX_SIZE_TRAIN": SIZE,
        "INPUT.MIN_SIZE_TEST": SIZE, "INPUT.MAX_SIZE_TEST": SIZE, **overrides,
    }  # fmt: skip
    return tiny_cfg(tmp_path, max_iter=max_iter, **overrides)


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("use_amp", [False, True])
def test_train_and_evaluate_on_device(device, tmp_path, use_amp):
    cfg = _cfg(tmp_path, device, use_amp)
    results = train(cfg)
    assert 0.0 <= results["shapes_mini_val"]["bbox"]["AP"] <= 100.0
    final = _checkpoint(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    assert all(bool(torch.isfinite(v).all()) for v in final["model"].values() if v.is_floating_point())
    # The loss scaler (float16 on CUDA only) is part of the state a resume needs.
    assert ("grad_scaler" in final) == (use_amp and device.type == "cuda")


def test_mixed_precision_run_resumes_exactly(device, tmp_path, monkeypatch):
    straight = _cfg(tmp_path / "straight", device, True, max_iter=6, **{"DATASETS.TEST": "()"})
    train(straight)
    cfg = _cfg(tmp_path / "killed", device, True, max_iter=6, **{"DATASETS.TEST": "()"})
    real_forward = IoUAwareRetinaNet.forward
    calls = []

    def killed_at_iteration_4(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(IoUAwareRetinaNet, "forward", killed_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(IoUAwareRetinaNet, "forward", real_forward)
    train(cfg, resume=True)

    expected = _checkpoint(os.path.join(straight.OUTPUT_DIR, "model_final.pth"))
    resumed = _checkpoint(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    for key, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert expected.get("grad_scaler") == resumed.get("grad_scaler")


def test_skipped_scaler_steps_are_not_a_non_finite_loss(device, tmp_path, monkeypatch):
    """A loss scale at which every scaled gradient overflows: the scaler skips every step
    (the weights never move: SGD never ran, so it has no momentum), and the run finishes
    instead of stopping on a non-finite loss (the loss itself is finite)."""

    def overflowing_scale(device_, enabled):
        return torch.amp.GradScaler(torch.device(device_).type, init_scale=float("inf")) if enabled else None

    monkeypatch.setattr(amp, "build_grad_scaler", overflowing_scale)
    cfg = _cfg(tmp_path, device, True, max_iter=4, **{"DATASETS.TEST": "()", "SOLVER.CHECKPOINT_PERIOD": 100})
    train(cfg)
    final = _checkpoint(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    assert final["iteration"] == 3 and final["optimizer"]["state"] == {}
    assert all(bool(torch.isfinite(v).all()) for v in final["model"].values() if v.is_floating_point())
