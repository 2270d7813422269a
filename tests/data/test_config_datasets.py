"""The one parser of ``DATASETS.COCO_INSTANCES``, used by both front-ends."""
import pytest
from fvcore.common.config import CfgNode

from iou_aware_retinanet.data.config_datasets import coco_instances_from_cfg


def _cfg(entries):
    cfg = CfgNode()
    cfg.DATASETS = CfgNode()
    cfg.DATASETS.COCO_INSTANCES = entries
    return cfg


def test_entries_in_config_order():
    cfg = _cfg([["b", "b.json", "b_images"], ("a", "a.json", "a_images"), ["b", "b.json", "b_images"]])
    assert coco_instances_from_cfg(cfg) == {"b": ("b.json", "b_images"), "a": ("a.json", "a_images")}
    assert list(coco_instances_from_cfg(cfg)) == ["b", "a"]  # a repeated identical entry counts once
    assert coco_instances_from_cfg(_cfg([])) == {}


@pytest.mark.parametrize("entry", [
    ["only_a_name"],
    ["name", "file.json"],
    ["name", "file.json", "images", "extra"],
    ["name", "", "images"],
    ["name", "file.json", 3],
    "name,file.json,images",
])  # fmt: skip
def test_malformed_entry_is_an_error_naming_the_key(entry):
    with pytest.raises(ValueError, match=r"DATASETS.COCO_INSTANCES entries are \[name, json_file, image_root\]"):
        coco_instances_from_cfg(_cfg([entry]))


def test_one_name_with_two_sets_of_files_is_an_error():
    cfg = _cfg([["mine", "a.json", "images"], ["mine", "b.json", "images"]])
    with pytest.raises(ValueError, match="DATASETS.COCO_INSTANCES names 'mine' twice"):
        coco_instances_from_cfg(cfg)


def test_both_front_ends_use_the_parser():
    """The torchvision resolver and the Detectron2 registration read the entries
    through this function (no second parser to drift)."""
    import iou_aware_retinanet.tv.data as tv_data

    assert tv_data.coco_instances_from_cfg is coco_instances_from_cfg
    pytest.importorskip("detectron2")
    import iou_aware_retinanet.d2.datasets as d2_datasets

    assert d2_datasets.coco_instances_from_cfg is coco_instances_from_cfg
