"""Events of a torchvision-front-end run, as Detectron2's ``utils/events.py`` writers:
``OUTPUT_DIR/metrics.json`` (window medians every 20 iterations, evaluation
results), TensorBoard scalars beside it, the every-20-iterations line of
``OUTPUT_DIR/log.txt``, and the run's INFO log in that file.
"""
import contextlib
import datetime
import json
import logging
import math
import os
import statistics
from typing import Dict, List

from . import distributed as comm
from .evaluation import read_metrics_file

logger = logging.getLogger(__name__)
# Every-20-iterations lines: log.txt only (the console has the progress bar).
progress_logger = logging.getLogger(__name__ + ".progress")

__all__ = ["LOG_PERIOD", "MetricsWriter", "console_filter", "log_to_file"]

LOG_PERIOD = 20

_WARNED_NO_TENSORBOARD = False


class MetricsWriter:
    """Detectron2's ``JSONWriter`` + ``CommonMetricPrinter`` + ``TensorboardXWriter``: window
    medians every ``period`` iterations, and every record also as TensorBoard scalars in
    ``OUTPUT_DIR`` (when the ``tensorboard`` package is installed: the ``tensorboard`` extra)."""

    def __init__(self, output_dir: str, max_iter: int, period: int = LOG_PERIOD):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "metrics.json")
        self.max_iter, self.period = max_iter, period
        self.window: List[Dict[str, float]] = []
        self._events = None  # torch.utils.tensorboard.SummaryWriter, opened at the first record
        self.enabled = comm.is_main_process()  # rank 0 writes the run's metrics; the others nothing

    def _event_writer(self):
        if self._events is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package
                global _WARNED_NO_TENSORBOARD
                if not _WARNED_NO_TENSORBOARD:
                    logger.info("No TensorBoard events: the tensorboard package is not installed (pip install tensorboard)")
                    _WARNED_NO_TENSORBOARD = True
                self._events = False
            else:
                self._events = SummaryWriter(self.output_dir)
        return self._events

    def close(self) -> None:
        if self._events:
            self._events.close()
        self._events = None

    def truncate_after(self, iteration: int) -> None:
        """Drop lines past ``iteration`` (left by a run killed after its last checkpoint)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        # A last line cut short by a kill is dropped (read_metrics_file warns); another bad line names the file.
        records = [r for r in read_metrics_file(self.path) if r.get("iteration", -1) <= iteration]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, sort_keys=False) + "\n" for r in records)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        events = self._event_writer()
        if events:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    events.add_scalar(key, value, record["iteration"])
            events.flush()

    def add(self, iteration: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.window.append(values)
        if (iteration + 1) % self.period == 0 or iteration == self.max_iter - 1:
            self.flush(iteration)

    def flush(self, iteration: int) -> None:
        keys = [k for k in self.window[-1] if k not in ("lr", "time", "data_time")]
        record = {"iteration": iteration}
        record.update({k: statistics.median(v[k] for v in self.window) for k in keys})
        record["lr"] = self.window[-1]["lr"]
        record["time"] = statistics.mean(v["time"] for v in self.window)
        record["data_time"] = statistics.mean(v["data_time"] for v in self.window)
        record["eta_seconds"] = record["time"] * (self.max_iter - iteration - 1)
        self.write(record)
        eta = str(datetime.timedelta(seconds=int(record["eta_seconds"])))
        losses = "  ".join(f"{k}: {record[k]:.4g}" for k in keys)
        progress_logger.info(
            "eta: %s  iter: %d  %s  time: %.4f  data_time: %.4f  lr: %.6g",
            eta, iteration, losses, record["time"], record["data_time"], record["lr"],
        )
        self.window = []


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(progress_logger.name)


@contextlib.contextmanager
def log_to_file(output_dir: str):
    """Append the project's INFO logs to ``output_dir/log.txt`` for the duration of the block
    (rank 0 only: the other processes of a torchrun job write no file)."""
    if not comm.is_main_process():
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    project = logging.getLogger("iou_aware_retinanet")
    handler = logging.FileHandler(os.path.join(output_dir, "log.txt"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S"))
    old_level = project.level
    if project.getEffectiveLevel() > logging.INFO:
        project.setLevel(logging.INFO)
    project.addHandler(handler)
    try:
        yield
    finally:
        project.removeHandler(handler)
        project.setLevel(old_level)
        handler.close()


def console_filter() -> logging.Filter:
    """Keeps the every-20-iterations lines off a console handler (see :func:`.cli.setup_logging`)."""
    return _ConsoleFilter()
