"""The exported ONNX model (onnxruntime) against PyTorch inference, on the same images.

    python -m iou_aware_retinanet.benchmarks.export_speed --weights W [--config-file FILE]
        [--images 100] [--repeats 3] [--threads N] [KEY VALUE ...]

Exports the model (``tv.export``), then runs both on ``DATASETS.TEST``'s
first ``--images`` images, batch 1, alternated image by image, with the same
number of threads (torch's intra-op threads = onnxruntime's). Prints ms per
image of each, the ratio, and the largest box / score difference between
their detections (the export test's tolerances: 1e-3 px, 1e-4).
"""
import argparse
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import torch

from ..studies.recipe import MAIN_CONFIG
from ..tv.cli import setup_cfg
from ..tv.data import build_test_loader
from ..tv.engine import load_model
from ..tv.export import ExportableDetector, example_image, export_model


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m iou_aware_retinanet.benchmarks.export_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=MAIN_CONFIG)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config_file, args.opts)
    model = load_model(cfg, args.weights)
    wrapper = ExportableDetector(model)
    images = []
    for batch, _ in build_test_loader(cfg, cfg.DATASETS.TEST[0]):
        images += list(batch)
        if len(images) >= args.images:
            break
    images = images[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, example_image(cfg), f"{tmp}/model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        # Its idle threads would otherwise spin after each run, slowing the PyTorch run that follows.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    box_diff = score_diff = 0.0
    mismatched = 0
    totals = {"torch": 0.0, "onnxruntime": 0.0}
    with torch.no_grad():
        for image in images[:3]:  # warm-up
            wrapper(image), session.run(None, {"image": image.numpy()})
        for _ in range(args.repeats):
            for image in images:
                start = time.perf_counter()
                expected = wrapper(image)
                totals["torch"] += time.perf_counter() - start
                start = time.perf_counter()
                got = session.run(None, {"image": image.numpy()})
                totals["onnxruntime"] += time.perf_counter() - start
                if got[0].shape != tuple(expected[0].shape) or not np.array_equal(got[2], expected[2].numpy()):
                    mismatched += 1
                    continue
                box_diff = max(box_diff, float(np.abs(got[0] - expected[0].numpy()).max(initial=0.0)))
                score_diff = max(score_diff, float(np.abs(got[1] - expected[1].numpy()).max(initial=0.0)))
    n = args.repeats * len(images)
    result = {
        "torch_ms": 1000 * totals["torch"] / n, "onnxruntime_ms": 1000 * totals["onnxruntime"] / n,
        "max_box_diff_px": box_diff, "max_score_diff": score_diff, "images_with_other_detections": mismatched // args.repeats,
    }  # fmt: skip
    result["ratio"] = result["onnxruntime_ms"] / result["torch_ms"]
    print(f"{len(images)} images of {cfg.DATASETS.TEST[0]} x {args.repeats}, batch 1, {args.threads} thread(s)")
    print("| runtime | ms / image |\n|---|---:|")
    print(f"| PyTorch (eager) | {result['torch_ms']:.2f} |\n| onnxruntime | {result['onnxruntime_ms']:.2f} |")
    print(f"ratio onnxruntime / PyTorch: {result['ratio']:.3f}; largest difference: boxes {box_diff:.2e} px, "
          f"scores {score_diff:.2e}; images whose detections differ in number or class: {result['images_with_other_detections']}")
    return result


if __name__ == "__main__":
    main()
