"""Data fingerprints: the generated data is what it was, and the fingerprint sees every change.

The committed values below are the fingerprints of the first images of each
built-in shapes split. When a dependency update (OpenCV, NumPy, libpng) makes
the generator draw other pixels or boxes, ``test_builtin_splits_match_their_committed_fingerprints``
fails: results trained on the new data are not comparable with published ones.
If the change is intended, bump ``synthetic.GENERATOR_VERSION`` and update
the values (the failure message prints them).
"""
import json
import os

import cv2
import pytest

from iou_aware_retinanet.data import builtin
from iou_aware_retinanet.data.synthetic import SHAPES_PRESETS, dataset_fingerprint, generate_shapes_dataset

FINGERPRINT_IMAGES = 3  # per split: every preset, both seeds of each, in well under a second
COMMITTED = {
    "shapes_train": "fbc5e41aa2c14c1997ac23e7197709b7585d53bec2785c8e9510d4da71b89f5c",
    "shapes_val": "acd0b2c5c39953d0ab41436f29d2078639f02263f8518a5e6cf4c632b7c25711",
    "shapes_mini_train": "3ca2c3b7b3bf21e8658905f9159047ba386da204588b7914d1c0273588d54c5c",
    "shapes_mini_val": "a8d8faa05b5d1285c683e75ad5454e761567cc9887807261fbeaf0b86fc5fef4",
    "shapes_hard_train": "331649ff2077520fffc9e204a74ff8d21417cd21d1b925738ca8c4164dbc05ae",
    "shapes_hard_val": "f7d3b95d2e73a184300a57a280501be4a84403228042dc2102cbb88793adbeea",
}


def _split(root, name, num_images=FINGERPRINT_IMAGES):
    split = builtin.BUILTIN_SHAPES[name]
    return generate_shapes_dataset(str(root), split.split, num_images, split.seed, spec=split.spec, name=split.name, num_workers=1)


def test_every_builtin_split_and_preset_has_a_committed_fingerprint():
    assert set(COMMITTED) == set(builtin.BUILTIN_SHAPES)
    covered = {builtin.BUILTIN_SHAPES[name].spec for name in COMMITTED}
    assert all(spec in covered for spec in SHAPES_PRESETS.values())


def test_builtin_splits_match_their_committed_fingerprints(tmp_path):
    found = {name: dataset_fingerprint(*_split(tmp_path, name)) for name in COMMITTED}
    changed = {name: value for name, value in found.items() if value != COMMITTED[name]}
    assert not changed, (
        f"the generated data changed (opencv {cv2.__version__}): {sorted(changed)}. Results trained on it are not "
        f"comparable with earlier ones; if intended, bump GENERATOR_VERSION and commit these values: {json.dumps(found, indent=1)}"
    )


def test_first_images_of_a_longer_split_have_the_short_split_fingerprint(tmp_path):
    """Why a few images stand for the whole split: image i depends on (seed, split, i) only."""
    short = dataset_fingerprint(*_split(tmp_path / "short", "shapes_train"))
    longer = _split(tmp_path / "long", "shapes_train", num_images=FINGERPRINT_IMAGES + 2)
    assert dataset_fingerprint(*longer, max_images=FINGERPRINT_IMAGES) == short
    assert dataset_fingerprint(*longer) != short


def test_layout_of_the_json_does_not_count(tmp_path):
    json_file, image_root = _split(tmp_path, "shapes_mini_train")
    before = dataset_fingerprint(json_file, image_root)
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    data["info"] = {"description": "rewritten"}
    data["annotations"] = list(reversed(data["annotations"]))  # sorted by id again before hashing
    data["images"] = list(reversed(data["images"]))
    with open(json_file, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=3, sort_keys=True)
    assert dataset_fingerprint(json_file, image_root) == before


def test_one_pixel_or_one_box_coordinate_changes_the_fingerprint(tmp_path):
    json_file, image_root = _split(tmp_path, "shapes_mini_train")
    before = dataset_fingerprint(json_file, image_root)
    path = os.path.join(image_root, sorted(os.listdir(image_root))[1])
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    image[5, 7, 1] ^= 1
    cv2.imwrite(path, image)
    after_pixel = dataset_fingerprint(json_file, image_root)
    assert after_pixel != before

    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    data["annotations"][0]["bbox"][2] += 1.0 / 16
    with open(json_file, "w", encoding="utf-8") as f:
        json.dump(data, f)
    assert dataset_fingerprint(json_file, image_root) not in (before, after_pixel)


def test_missing_image_is_named(tmp_path):
    json_file, image_root = _split(tmp_path, "shapes_mini_train")
    os.remove(os.path.join(image_root, "000001.png"))
    with pytest.raises(FileNotFoundError, match="000001.png"):
        dataset_fingerprint(json_file, image_root)


def test_runs_log_fingerprints_of_generated_builtin_data_only(tmp_path, caplog):
    json_file, image_root = _split(tmp_path, "shapes_mini_val", num_images=builtin.BUILTIN_SHAPES["shapes_mini_val"].num_images)
    own = tmp_path / "own"
    own.mkdir()
    datasets = {
        "shapes_mini_val": (json_file, image_root),
        # A user's own data under a built-in name, and a dataset of another name: not hashed.
        "shapes_mini_train": (str(own / "instances.json"), str(own)),
        "my_data": (json_file, image_root),
    }
    with caplog.at_level("INFO", logger="iou_aware_retinanet.data"):
        found = builtin.log_data_fingerprints(datasets)
    assert found == {"shapes_mini_val": dataset_fingerprint(json_file, image_root)}
    assert found["shapes_mini_val"] in caplog.text


def test_training_logs_the_fingerprints_of_its_data(tmp_path, monkeypatch):
    from iou_aware_retinanet.tv.engine import train

    from ..tv.engine_helpers import tiny_cfg

    monkeypatch.setenv(builtin.DATASETS_ENV, str(tmp_path / "datasets"))
    train(tiny_cfg(tmp_path / "run", max_iter=2))
    log = (tmp_path / "run" / "log.txt").read_text(encoding="utf-8")
    for name in ("shapes_mini_train", "shapes_mini_val"):
        expected = dataset_fingerprint(*builtin.builtin_dataset_paths(name))
        assert f"Data fingerprint of {name} (sha256 of decoded pixels and annotations): {expected}" in log
