"""Micro-benchmarks of the framework-free core (run as ``python -m``, not tests).

``iou_aware_retinanet.benchmarks.assigners`` also holds the reference
implementations that the tests compare the core against.
"""
