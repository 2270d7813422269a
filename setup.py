#!/usr/bin/env python
"""Install the iou_aware_retinanet project.

Detectron2 is not a pip requirement: it is not installable from PyPI (the
republished copies there are broken). Install it from source as its INSTALL.md
says; the Detectron2 front-end is enabled when `import detectron2` works.
"""
from setuptools import find_packages, setup

setup(
    name="iou_aware_retinanet",
    version="0.1.0",
    description="IoU-aware RetinaNet with pluggable label assignment, on Detectron2 and torchvision",
    license="Apache-2.0",
    packages=find_packages(exclude=("tests", "tests.*")),
    python_requires=">=3.9",
    install_requires=[
        # 2.6: torch.load defaults to weights_only=True, so a checkpoint loaded by code outside the
        # project (Detectron2's DefaultPredictor, say) cannot run code either; the project passes it itself.
        "torch>=2.6",
        "torchvision>=0.21",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.2",
        "opencv-python",
        "numpy",
        "PyYAML",
        "tqdm",
    ],
    extras_require={
        # matplotlib: the accuracy study's correlation plot, which a test draws.
        # tensorboard: the engine's event files, which a test reads back.
        "test": ["pytest>=7", "hypothesis>=6", "matplotlib", "tensorboard", "onnx", "onnxruntime"],
        "analysis": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        # ONNX export (onnxruntime runs and checks the exported graph).
        "export": ["onnx", "onnxruntime"],
    },
    entry_points={
        "console_scripts": ["iou-aware-retinanet=iou_aware_retinanet.tv.cli:main"],
    },
)
