"""Statistics over a handful of seeds: a bootstrap interval of the mean, its verdict, rank correlation.

Written here rather than taken from SciPy (not a dependency of the project):
each function is a few lines of NumPy, checked by hand in the tests.
"""
import itertools
import math
import statistics
from typing import Optional, Sequence, Tuple

import numpy as np

CONFIDENCE = 0.95


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rank(x), rank(y))


EXACT_BOOTSTRAP_MAX = 6**6  # up to 6 seeds every resampling is enumerated: the interval is exact and reproducible
BOOTSTRAP_RESAMPLES = 10000


def bootstrap_means(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of the resamplings with replacement of ``values``: all n^n of them for
    n <= 6 (each equally likely), else ``resamples`` drawn with ``seed``."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("bootstrap of no values")
    if n**n <= EXACT_BOOTSTRAP_MAX:
        index = np.array(list(itertools.product(range(n), repeat=n)))
    else:
        index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    return x[index].mean(axis=1)


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean (numpy's linear quantiles); NaN below 2 values."""
    if len(values) < 2:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(bootstrap_means(values), [tail, 1.0 - tail])
    return float(low), float(high)


def summarize(values: Sequence[float]) -> Optional[dict]:
    """Mean, sample std, SE and the bootstrap interval of the finite ``values`` (None if there are none)."""
    values = [float(v) for v in values if not math.isnan(v)]
    if not values:
        return None
    n = len(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    low, high = bootstrap_interval(values)
    return {"values": values, "n": n, "mean": statistics.mean(values), "std": std,
            "se": std / math.sqrt(n) if n > 1 else float("nan"), "low": low, "high": high}  # fmt: skip


def interval_verdict(summary: dict, above: str = "wins", below: str = "loses") -> str:
    """``above`` where the interval lies above zero, ``below`` where below, else no significant difference."""
    if summary["n"] < 2:
        return "n/a (1 seed)"
    if summary["low"] > 0.0:
        return above
    if summary["high"] < 0.0:
        return below
    return "no significant difference"
