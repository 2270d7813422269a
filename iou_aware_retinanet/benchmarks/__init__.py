"""Micro-benchmarks of the framework-free core (run as ``python -m``, not tests)."""
