"""``train_net.py`` on the test device, with Detectron2's ``AMPTrainer`` under
``SOLVER.AMP.ENABLED`` (CUDA only, as Detectron2 has it): finite losses, checkpoints
holding the loss scaler's state for the resume."""
import os

import pytest

from ..d2.helpers import D2_MISSING_REASON

pytest.importorskip("detectron2", reason=D2_MISSING_REASON)

import torch  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402

from ..d2.test_train_net import _opts, _train_net, datasets_root  # noqa: E402,F401  (a fixture)


@pytest.mark.parametrize("amp", [False, True])
def test_train_net_on_device(device, tmp_path, datasets_root, amp):  # noqa: F811
    if amp and device.type != "cuda":
        pytest.skip("Detectron2's AMPTrainer runs on CUDA only")
    opts = _opts(tmp_path) + ["MODEL.DEVICE", str(device), "SOLVER.AMP.ENABLED", str(amp), "TEST.EVAL_PERIOD", "0"]
    _train_net()["main"](default_argument_parser().parse_args(opts))
    out = tmp_path / "out"
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in final["model"].values() if v.is_floating_point())
    trainer_state = final["trainer"]["_trainer"]
    assert ("grad_scaler" in trainer_state) == amp
    metrics = [line for line in open(os.path.join(out, "metrics.json")) if "total_loss" in line]
    assert metrics, "no training metrics written"
