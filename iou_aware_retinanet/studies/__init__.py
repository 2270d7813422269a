"""Studies that regenerate the README's results: ``accuracy`` (AP, alpha sweep, upper bound, correlation) and ``speed`` (time and memory ratios)."""
