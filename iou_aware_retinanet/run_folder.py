"""A training run's folder (``OUTPUT_DIR``), the same rules on both front-ends: nothing the user
owns is overwritten, one run at a time, a resume continues the same run.

* :func:`refuse_to_overwrite_a_run`: a new run (no ``--resume``) in a folder that holds a
  run's checkpoints or metrics would mix the two and erase the first one's history;
* :class:`RunLock`: a second training started into the same folder while the first runs
  (even before it wrote anything) is refused; the lock is an ``flock`` on
  ``OUTPUT_DIR/run.lock``, released by the system when the process ends, however it ends
  (POSIX; on other systems there is no lock);
* :func:`remove_orphaned_temporaries`: the temporary file a kill left in the middle of an
  atomic write (a checkpoint, say) is removed when the next run starts in the folder, and a
  ``metrics.json`` line cut short by a kill is dropped when the run resumes;
* :func:`save_config`: the run's full config replaces a ``config.yaml`` only when that
  file is an earlier full config dump of the same front-end (the project's own save),
  never a user's file; on ``--resume``, only when the keys that define the training
  agree (:func:`check_resume_config`): a resume with another assigner, batch size or
  ``NUM_CLASSES`` would silently train a mixture of two runs.
"""
import logging
import os
import re
from typing import Dict, List, Optional

import yaml

from .atomic import atomic_write

__all__ = [
    "RunLock", "RUN_LOCK", "run_files", "refuse_to_overwrite_a_run", "save_config", "check_resume_config",
    "RESUME_MAY_CHANGE", "check_config_replaceable", "remove_orphaned_temporaries", "claim_output_dir",
    "drop_partial_last_line",
]  # fmt: skip

logger = logging.getLogger(__name__)

RUN_LOCK = "run.lock"
_CHECKPOINT = re.compile(r"^model_(\d+|final)\.pth$")
# atomic_write's temporary files: "<name>.<pid>-<8 hex digits>.tmp".
_TEMPORARY = re.compile(r"^.+\.(\d+)-[0-9a-f]{8}\.tmp$")

# Keys a resumed run may change: where it runs and writes, how long it trains, how it is
# evaluated (a prefix ending in "." covers a whole node). Any other difference is refused.
RESUME_MAY_CHANGE = (
    "OUTPUT_DIR", "MODEL.WEIGHTS", "MODEL.DEVICE", "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.CHECKPOINT_PERIOD",
    "TEST.", "DATASETS.TEST", "DATASETS.COCO_INSTANCES", "DATALOADER.NUM_WORKERS", "DATALOADER.CACHE_IMAGES",
    "CUDNN_BENCHMARK", "VIS_PERIOD", "SEED", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST",
    "MODEL.RETINANET.SCORE_THRESH_TEST", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "MODEL.RETINANET.NMS_THRESH_TEST",
    "MODEL.IOU_AWARE.ALPHA", "MODEL.IOU_AWARE.THRESHOLD_ON", "MODEL.IOU_AWARE.CANDIDATES",
)  # fmt: skip


def run_files(output_dir: str) -> List[str]:
    """The files of ``output_dir`` that make it a training run's folder (checkpoints, their index, metrics)."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    return [n for n in names if n in ("last_checkpoint", "metrics.json") or _CHECKPOINT.match(n)]


def refuse_to_overwrite_a_run(output_dir: str) -> None:
    """A new run in the folder of another would mix their checkpoints and erase its history."""
    left = run_files(output_dir)
    if left:
        shown = ", ".join(left[:4]) + (", ..." if len(left) > 4 else "")
        raise FileExistsError(
            f"OUTPUT_DIR {output_dir} already holds a training run ({shown}). Continue it with "
            "--resume, or start the new run in another OUTPUT_DIR (or delete the old one yourself)."
        )


def drop_partial_last_line(path: str) -> bool:
    """Cut a last line that has no newline (a kill during its append) off the json-lines file
    ``path``, with a warning; the next record would otherwise be glued to it. Returns whether it did."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        data = f.read()
    if not data or data.endswith(b"\n"):
        return False
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    logger.warning("%s: dropped its last line, cut short by an interrupted write: %r", path, data[keep:keep + 80])
    return True


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def remove_orphaned_temporaries(output_dir: str) -> List[str]:
    """Remove the temporary files of atomic writes that a kill interrupted (their process is
    gone); returns their names. Call it holding the folder's :class:`RunLock`. POSIX only
    (elsewhere ``os.kill(pid, 0)`` would end the process instead of probing it)."""
    if os.name != "posix" or not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        match = _TEMPORARY.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(path) and (int(match.group(1)) != os.getpid()) and not _process_alive(int(match.group(1))):
            os.remove(path)
            removed.append(name)
    return removed


class RunLock:
    """Holds ``OUTPUT_DIR/run.lock`` for one training run; :meth:`release` (or the process's end) frees it."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, RUN_LOCK)
        self._file = None
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        os.makedirs(output_dir, exist_ok=True)
        self.created = not os.path.exists(self.path)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RuntimeError(
                f"OUTPUT_DIR {output_dir} is in use by another training run ({holder} holds {self.path}): "
                "two runs in one folder would write the same files. Wait for it, or choose another OUTPUT_DIR."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        self._file = handle

    def release(self, remove: bool = False) -> None:
        """Free the lock; ``remove``: also delete the lock file if this lock created it (a run
        refused before it started leaves the folder as it found it)."""
        if self._file is not None:
            if remove and self.created:
                os.remove(self.path)
            self._file.close()  # closing the file frees the flock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _flatten(node, prefix: str = "") -> Dict[str, object]:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _load_dump(path: str) -> Optional[Dict[str, object]]:
    """The flattened keys of a config file, or None when it is not a readable mapping."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return _flatten(content) if isinstance(content, dict) else None


def _is_full_dump(existing: Optional[Dict[str, object]], ours: Dict[str, object]) -> bool:
    # The project saves every key; a user's config names a few (or a _BASE_).
    return existing is not None and set(existing) == set(ours)


def check_resume_config(path: str, dump: str) -> None:
    """Refuse to resume the run whose config is ``path`` under the config ``dump`` (its
    ``cfg.dump()``) when a key outside :data:`RESUME_MAY_CHANGE` differs, naming the keys."""
    saved, ours = _load_dump(path), _flatten(yaml.safe_load(dump))
    if saved is None:
        raise ValueError(f"{path} is not a readable config: cannot check that --resume continues the same run")
    changed = [
        key for key in sorted(set(saved) | set(ours))
        if saved.get(key, "<absent>") != ours.get(key, "<absent>")
        and not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE)
    ]  # fmt: skip
    if changed:
        shown = "; ".join(f"{k}: {saved.get(k, '<absent>')!r} in the run, {ours.get(k, '<absent>')!r} now" for k in changed[:4])
        raise ValueError(
            f"--resume would continue the run of {path} under another configuration ({shown}"
            f"{'; ...' if len(changed) > 4 else ''}): a mixture of two runs. Resume with the run's config, "
            "or start a new OUTPUT_DIR with MODEL.WEIGHTS set to its checkpoint."
        )


def check_config_replaceable(path: str, dump: str) -> None:
    """Raise FileExistsError when ``path`` exists and is not an earlier full config dump of the
    same front-end (then it is the user's: e.g. the config they train with, kept in OUTPUT_DIR)."""
    if not os.path.exists(path):
        return
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        if f.read() == dump:
            return
    if not _is_full_dump(_load_dump(path), _flatten(yaml.safe_load(dump))):
        raise FileExistsError(
            f"{path} exists and is not a config this project saved (it names other keys than a full config): "
            "the run saves its full config there. Move your file out of OUTPUT_DIR, or choose another OUTPUT_DIR."
        )


def save_config(cfg, path: str) -> None:
    """Write ``cfg.dump()`` to ``path`` atomically, unless ``path`` is a user's file (see
    :func:`check_config_replaceable`, which the entry points call before any work)."""
    dump = cfg.dump()
    check_config_replaceable(path, dump)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        f.write(dump)


def claim_output_dir(output_dir: str, dump: str, resume: bool, lock: bool = True) -> Optional[RunLock]:
    """What a training run checks of ``output_dir`` before it writes anything there (both
    front-ends): it takes the folder's lock (``lock``: the process that writes), refuses a
    new run into a folder holding one, a ``--resume`` under another config (``dump``: the
    new run's ``cfg.dump()``) and a ``config.yaml`` the project did not save, and removes
    the temporaries of interrupted writes. Returns the lock to release when the run ends."""
    run_lock = RunLock(output_dir) if lock else None
    try:
        saved = os.path.join(output_dir, "config.yaml")
        if resume and os.path.isfile(os.path.join(output_dir, "last_checkpoint")) and os.path.isfile(saved):
            check_resume_config(saved, dump)
        else:
            if not resume:
                refuse_to_overwrite_a_run(output_dir)
            check_config_replaceable(saved, dump)
        if lock:
            for name in remove_orphaned_temporaries(output_dir):
                logger.warning("Removed %s, left in %s by an interrupted write", name, output_dir)
            if resume:
                drop_partial_last_line(os.path.join(output_dir, "metrics.json"))
    except BaseException:
        if run_lock is not None:
            run_lock.release(remove=True)
        raise
    return run_lock
