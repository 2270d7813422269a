"""Named datasets: roots from the environment, lazy generation, COCO names, user datasets."""
import json
import os

import pytest

from iou_aware_retinanet.data import builtin, synthetic
from iou_aware_retinanet.data.builtin import (
    BUILTIN_SHAPES,
    DATASETS_ENV,
    DETECTRON2_DATASETS_ENV,
    builtin_dataset_names,
    builtin_dataset_paths,
    datasets_root,
    ensure_generated,
    register_coco_dataset,
    shapes_class_names,
)
from iou_aware_retinanet.data.coco import load_coco_detection
from iou_aware_retinanet.data.synthetic import SHAPES_PRESETS, ShapesSpec


@pytest.fixture
def shapes_root(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    monkeypatch.setenv(DATASETS_ENV, str(root))
    # Forget roots of a Detectron2 registration made at import (when Detectron2 is installed).
    monkeypatch.setattr(builtin, "_REGISTERED_ROOTS", {})
    return root


@pytest.fixture
def no_user_datasets(monkeypatch):
    monkeypatch.setattr(builtin, "_USER_DATASETS", {})


def test_root_defaults_to_datasets_in_the_working_directory(monkeypatch):
    monkeypatch.delenv(DATASETS_ENV, raising=False)
    assert datasets_root() == "datasets"


def test_documented_names_exist():
    names = builtin_dataset_names()
    shapes = ("shapes_train", "shapes_val", "shapes_mini_train", "shapes_mini_val", "shapes_hard_train", "shapes_hard_val")
    for name in shapes + ("coco_2017_train", "coco_2017_val"):
        assert name in names
    assert BUILTIN_SHAPES["shapes_train"].num_images == 2000
    assert BUILTIN_SHAPES["shapes_val"].num_images == 300
    assert BUILTIN_SHAPES["shapes_train"].spec == SHAPES_PRESETS["standard"]
    # The hard data is ShapesSpec's defaults, by name.
    assert BUILTIN_SHAPES["shapes_hard_train"].spec == SHAPES_PRESETS["hard"] == ShapesSpec()
    assert BUILTIN_SHAPES["shapes_hard_train"].num_images == 1000
    assert BUILTIN_SHAPES["shapes_hard_val"].num_images == 200
    assert BUILTIN_SHAPES["shapes_train"].seed != BUILTIN_SHAPES["shapes_val"].seed


def test_shapes_dataset_is_generated_on_first_use(shapes_root, monkeypatch):
    json_file, image_root = builtin_dataset_paths("shapes_mini_train")
    assert json_file == str(shapes_root / "shapes" / "annotations" / "instances_mini_train.json")
    assert image_root == str(shapes_root / "shapes" / "mini_train")
    data = load_coco_detection(json_file, image_root)
    assert len(data) == BUILTIN_SHAPES["shapes_mini_train"].num_images
    assert data.class_names == shapes_class_names("shapes_mini_train")

    def fail(task):
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic, "_write_one", fail)
    assert builtin_dataset_paths("shapes_mini_train") == (json_file, image_root)


def test_environment_read_at_call_time_even_after_registration(shapes_root, monkeypatch):
    monkeypatch.setattr(builtin, "_REGISTERED_ROOTS", {"shapes_mini_val": "/somewhere/else"})
    json_file, _ = builtin_dataset_paths("shapes_mini_val")
    assert json_file.startswith(str(shapes_root))


def test_ensure_generated_follows_the_registered_root(shapes_root, tmp_path, monkeypatch):
    registered = str(tmp_path / "registered")
    monkeypatch.setattr(builtin, "_REGISTERED_ROOTS", {"shapes_mini_val": registered})
    assert ensure_generated(["shapes_mini_val"])[0].startswith(registered)


def test_explicit_root_overrides_the_environment(shapes_root, tmp_path):
    json_file, _ = builtin_dataset_paths("shapes_mini_val", root=str(tmp_path / "elsewhere"))
    assert json_file.startswith(str(tmp_path / "elsewhere"))
    assert not shapes_root.exists()


def test_ensure_generated_skips_names_it_cannot_generate(shapes_root, tmp_path, monkeypatch):
    monkeypatch.setenv(DETECTRON2_DATASETS_ENV, str(tmp_path / "no_coco_here"))
    json_files = ensure_generated(["coco_2017_train", "shapes_mini_val", "my_own_dataset"])
    assert json_files == [str(shapes_root / "shapes" / "annotations" / "instances_mini_val.json")]
    assert json.load(open(json_files[0]))["info"]["params"]["split"] == "mini_val"


def test_missing_coco_names_the_missing_path(tmp_path, monkeypatch):
    monkeypatch.setenv(DETECTRON2_DATASETS_ENV, str(tmp_path))
    expected = os.path.join(str(tmp_path), "coco", "annotations", "instances_val2017.json")
    with pytest.raises(FileNotFoundError, match=expected):
        builtin_dataset_paths("coco_2017_val")
    os.makedirs(os.path.dirname(expected))
    open(expected, "w").close()
    with pytest.raises(FileNotFoundError, match=os.path.join(str(tmp_path), "coco", "val2017")):
        builtin_dataset_paths("coco_2017_val")


def test_coco_found_under_detectron2_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv(DETECTRON2_DATASETS_ENV, str(tmp_path))
    os.makedirs(tmp_path / "coco" / "annotations")
    os.makedirs(tmp_path / "coco" / "train2017")
    (tmp_path / "coco" / "annotations" / "instances_train2017.json").write_text("{}")
    assert builtin_dataset_paths("coco_2017_train") == (
        str(tmp_path / "coco" / "annotations" / "instances_train2017.json"),
        str(tmp_path / "coco" / "train2017"),
    )


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="shapes_train"):
        builtin_dataset_paths("shapes_tain")


def test_user_coco_dataset(no_user_datasets):
    register_coco_dataset("mine", "/data/mine.json", "/data/mine")
    register_coco_dataset("mine", "/data/mine.json", "/data/mine")  # same paths again: fine
    assert builtin_dataset_paths("mine") == ("/data/mine.json", "/data/mine")
    assert "mine" in builtin_dataset_names()
    with pytest.raises(ValueError, match="already registered"):
        register_coco_dataset("mine", "/data/other.json", "/data/mine")
    with pytest.raises(ValueError, match="built-in"):
        register_coco_dataset("shapes_train", "/data/mine.json", "/data/mine")
