"""Config files and overrides: every mistake is an error naming the file or the key, on both
front-ends (one loader: iou_aware_retinanet.config_files)."""
import importlib.util
import os

import pytest

from iou_aware_retinanet.tv.cli import setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "configs", "Shapes", "iou_aware_retinanet.yaml")


def _loaders():
    loaders = [pytest.param(setup_cfg, id="torchvision")]
    if importlib.util.find_spec("detectron2") is not None:
        from iou_aware_retinanet.d2.entry import setup_project_cfg

        loaders.append(pytest.param(setup_project_cfg, id="detectron2"))
    return loaders


LOADERS = _loaders()


@pytest.mark.parametrize("load", LOADERS)
def test_a_base_cycle_names_the_files(tmp_path, load):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("_BASE_: b.yaml\nSOLVER:\n  MAX_ITER: 3\n")
    b.write_text("_BASE_: a.yaml\n")
    with pytest.raises(ValueError, match=r"_BASE_ cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml") as info:
        load(str(a))
    assert len(str(info.value)) < 1000
    a.write_text("_BASE_: a.yaml\n")  # itself
    with pytest.raises(ValueError, match="_BASE_ cycle"):
        load(str(a))


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize(
    "content, message",
    [("", "is empty"), ("# only a comment\n", "is empty"), ("- SOLVER\n- MODEL\n", "holds list data, not a mapping"),
     ("42\n", "holds int data, not a mapping"), ("SOLVER: [unclosed\n", "is not valid YAML")],
    ids=["empty", "comment_only", "list", "number", "broken"],
)
def test_a_file_that_is_no_mapping_is_named(tmp_path, load, content, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load(str(bad))
    assert str(bad) in str(info.value)
    # The same file as a _BASE_ names both files.
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: bad.yaml\n")
    with pytest.raises(ValueError, match=rf"bad\.yaml \(the _BASE_ of .*child\.yaml\)"):
        load(str(child))


@pytest.mark.parametrize("load", LOADERS)
def test_a_missing_base_and_an_unknown_key_name_the_file(tmp_path, load):
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.yaml \(the _BASE_ of .*child\.yaml\)"):
        load(str(child))
    child.write_text(f'_BASE_: "{SHAPES}"\nSOLVER:\n  MAX_ITERS: 3\n')
    with pytest.raises(KeyError, match=r"child\.yaml: .*SOLVER.MAX_ITERS"):
        load(str(child))
    with pytest.raises(KeyError, match=r"command-line override: .*SOLVER.MAX_ITERS"):
        load(SHAPES, ["SOLVER.MAX_ITERS", "3"])


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize(
    "yaml_value, opts, message",
    [(".nan", [], r"SOLVER.BASE_LR=nan"), (".inf", [], r"SOLVER.BASE_LR=inf"),
     (None, ["SOLVER.BASE_LR", "1e999"], r"SOLVER.BASE_LR=inf"),
     (None, ["SOLVER.MOMENTUM", "-1e999"], r"SOLVER.MOMENTUM=-inf"),
     (None, ["SOLVER.MAX_ITER", "-5"], r"SOLVER.MAX_ITER must be >= 1 \(an integer\), got -5"),
     (None, ["SOLVER.STEPS", "(30, 10)"], r"SOLVER.STEPS must be increasing")],
    ids=["nan_yaml", "inf_yaml", "inf_command_line", "minus_inf", "negative_max_iter", "steps_backwards"],
)
def test_numbers_that_would_fail_at_iteration_one_are_refused_naming_the_key(tmp_path, load, yaml_value, opts, message):
    config = SHAPES
    if yaml_value is not None:
        config = tmp_path / "c.yaml"
        config.write_text(f'_BASE_: "{SHAPES}"\nSOLVER:\n  BASE_LR: {yaml_value}\n')
    with pytest.raises(ValueError, match=message):
        load(str(config), opts)


@pytest.mark.parametrize("load", LOADERS)
def test_infinity_is_accepted_where_it_means_something(load):
    cfg = load(SHAPES, ["SOLVER.CLIP_GRADIENTS.NORM_TYPE", "1e999"])  # the max-norm
    assert cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE == float("inf")


def test_a_config_built_in_code_gets_the_same_checks_from_the_engine(tmp_path):
    """train(cfg) with a config merged by hand, not through the loader: check_cfg refuses NaN too."""
    from iou_aware_retinanet.tv import engine, get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(SHAPES)
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.SOLVER.BASE_LR = float("nan")
    with pytest.raises(ValueError, match="SOLVER.BASE_LR=nan"):
        engine.train(cfg)
    assert not (tmp_path / "out").exists()
