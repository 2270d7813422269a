"""Reading a YAML config and its ``KEY VALUE`` overrides, for both front-ends.

    cfg = load_config(get_cfg(), "configs/Shapes/iou_aware_retinanet.yaml", ["SOLVER.MAX_ITER", "100"])

``cfg`` is the front-end's config with its defaults (the torchvision
front-end's ``get_cfg()``, or Detectron2's with the project's keys); the file
and the overrides are merged into it with fvcore's ``merge_from_file`` /
``merge_from_list`` (``_BASE_`` inheritance as in Detectron2), after checks
that make every mistake an error naming the file and the key:

* the file and each ``_BASE_`` it names are read with ``yaml.safe_load``
  (Python tags such as ``!!python/object/apply`` are refused: they run code);
  an empty file, one that is not a mapping of keys, a ``_BASE_`` that is
  missing or that includes itself again (a cycle) name the file;
* an unknown key names the file (or "command-line override");
* a NaN or infinite number anywhere (``.nan`` in YAML, ``1e999`` on the
  command line) names its key: it would only fail at the first iteration;
* the training schedule's counts and rates are checked (:func:`check_solver`).

An integer written for a float key (``SOLVER.BASE_LR 1``) is accepted.
"""
import math
import os
from typing import List, Sequence

import yaml

from .config import ints_as_floats

__all__ = ["load_config", "check_config_file", "check_finite", "check_solver"]

BASE_KEY = "_BASE_"
# Keys for which infinity is a meaningful value (the max-norm of gradient clipping).
INFINITY_ALLOWED = ("SOLVER.CLIP_GRADIENTS.NORM_TYPE",)


def _read_yaml(path: str, included_by: str = ""):
    source = f" (the {BASE_KEY} of {included_by})" if included_by else ""
    if not os.path.isfile(path):
        what = "--config-file" if not included_by else "config file"
        raise FileNotFoundError(f"{what} {path}{source}: file not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        raise ValueError(
            f"{path}{source}: refused: the YAML holds a tag the safe loader does not read "
            f"(Python tags such as !!python/object run code): {e.problem}"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}{source} is not valid YAML: {e}") from None
    if content is None:
        raise ValueError(f"{path}{source} is empty: a config file is a mapping of keys (e.g. SOLVER: ...)")
    if not isinstance(content, dict):
        raise ValueError(
            f"{path}{source} holds {type(content).__name__} data, not a mapping of config keys (e.g. SOLVER: ...)"
        )
    return content


def _base_path(base: str, config_file: str) -> str:
    # Resolved as fvcore's load_yaml_with_base does: relative to the including file.
    base = os.path.expanduser(base)
    if not base.startswith(("/", "https://", "http://")):
        base = os.path.join(os.path.dirname(config_file), base)
    return base


def check_config_file(config_file: str) -> List[str]:
    """The chain ``config_file``, its ``_BASE_``, that one's ``_BASE_``, ...; raises on an
    unreadable, empty or non-mapping file, a missing base, or a cycle, naming the files."""
    chain, path, included_by = [], config_file, ""
    while True:
        real = os.path.realpath(path)
        if real in [os.path.realpath(p) for p in chain]:
            raise ValueError(f"{BASE_KEY} cycle: {' -> '.join(chain + [path])}")
        content = _read_yaml(path, included_by)
        chain.append(path)
        base = content.get(BASE_KEY)
        if base is None:
            return chain
        if not isinstance(base, str) or not base:
            raise ValueError(f"{path}: {BASE_KEY} must be a file name, got {base!r}")
        if base.startswith(("https://", "http://")):
            return chain  # fvcore downloads it; not followed here
        path, included_by = _base_path(base, path), path


def _walk(node, prefix: str = ""):
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _walk(value, name + ".")
        else:
            yield name, value


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, float):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)


def check_finite(cfg, source: str = "") -> None:
    """A ValueError naming the first key holding NaN (or infinity, where it means nothing)."""
    for key, value in _walk(cfg):
        for number in _numbers(value):
            if math.isnan(number) or (math.isinf(number) and key not in INFINITY_ALLOWED):
                raise ValueError(f"{key}={value!r}{f' ({source})' if source else ''}: must be a finite number")


def check_solver(cfg) -> None:
    """The training schedule's counts and rates (both front-ends), each error naming its key."""
    solver = cfg.SOLVER
    for key in ("MAX_ITER", "CHECKPOINT_PERIOD", "IMS_PER_BATCH"):
        if not isinstance(solver[key], int) or isinstance(solver[key], bool) or solver[key] < 1:
            raise ValueError(f"SOLVER.{key} must be >= 1 (an integer), got {solver[key]!r}")
    if not solver.BASE_LR > 0:
        raise ValueError(f"SOLVER.BASE_LR must be positive, got {solver.BASE_LR}")
    steps = list(solver.STEPS)
    if steps != sorted(steps) or any(s < 0 for s in steps):
        raise ValueError(f"SOLVER.STEPS must be increasing iteration numbers >= 0, got {steps}")
    if cfg.TEST.EVAL_PERIOD < 0:
        raise ValueError(f"TEST.EVAL_PERIOD must be >= 0 (0: evaluate only at the end), got {cfg.TEST.EVAL_PERIOD}")


def load_config(cfg, config_file: str, opts: Sequence[str] = (), freeze: bool = True):
    """``cfg`` + ``config_file`` (safe YAML, ``_BASE_`` checked) + ``opts`` (``KEY VALUE`` pairs), checked."""
    config_file = os.fspath(config_file)
    check_config_file(config_file)
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"config overrides come in KEY VALUE pairs, got an odd number: {opts}")
    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except (KeyError, AssertionError, ValueError, TypeError) as e:  # yacs asserts on unknown keys / types
        raise type(e)(f"{config_file}: {_message(e)}") from None
    try:
        cfg.merge_from_list(ints_as_floats(cfg, opts))
    except AssertionError as e:  # yacs asserts on unknown keys
        raise KeyError(f"command-line override: {_message(e)}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise type(e)(f"command-line override: {_message(e)}") from None
    check_finite(cfg, f"{config_file} or the command line")
    check_solver(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def _message(error: Exception) -> str:
    # KeyError's str() quotes its message.
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
