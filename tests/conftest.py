"""The device the device-clean tests (``tests/device``) run on.

    python -m pytest -q tests/device                               # on the CPU (the default, as in CI)
    IOU_AWARE_TEST_DEVICE=cuda python -m pytest -q tests/device    # the same tests on the GPU

``IOU_AWARE_TEST_DEVICE`` takes any ``torch.device`` string ("cpu", "cuda",
"cuda:1"). Where that device does not exist, the tests that take the
``device`` fixture are skipped with the reason; the rest of the suite always
runs on the CPU.
"""
import os

import pytest
import torch

DEVICE_ENV = "IOU_AWARE_TEST_DEVICE"


def requested_device_name() -> str:
    return os.environ.get(DEVICE_ENV, "").strip() or "cpu"


def _unavailable_reason(device: torch.device):
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{DEVICE_ENV}={requested_device_name()}: CUDA is not available here"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{DEVICE_ENV}={requested_device_name()}: only {torch.cuda.device_count()} CUDA device(s) here"
        return None
    return f"{DEVICE_ENV}={requested_device_name()}: the device-clean tests know 'cpu' and 'cuda' devices only"


def pytest_report_header(config):
    return f"device-clean tests on: {requested_device_name()} ({DEVICE_ENV})"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device named by ``IOU_AWARE_TEST_DEVICE`` (default cpu); skips the test where it is absent."""
    try:
        dev = torch.device(requested_device_name())
    except RuntimeError as e:
        pytest.fail(f"{DEVICE_ENV}={requested_device_name()!r} is not a torch device: {e}")
    reason = _unavailable_reason(dev)
    if reason:
        pytest.skip(reason)
    if dev.type == "cuda":
        # Full float32 convolutions and matrix products (no TF32), so that results can be
        # compared with the CPU's; autocast tests choose their precision themselves.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return dev
