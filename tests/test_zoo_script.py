"""benchmarks/zoo.py's checks on outputs other than one tensor: a segmentation model's dict, a detector's boxes per
image (their count may change with the SE), a Hugging Face ModelOutput."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("zoo", ROOT / "benchmarks" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)
    del sys.modules["zoo"]


def test_outputs_compare_through_dicts_and_ignore_a_detectors_box_count(zoo):
    boxes = [{"boxes": torch.zeros(4, 4), "labels": torch.zeros(4)}]
    fewer = [{"boxes": torch.zeros(3, 4), "labels": torch.zeros(3)}]
    assert zoo._shapes(boxes, ragged=True) == zoo._shapes(fewer, ragged=True) == [{"boxes": (4,), "labels": ()}]
    assert zoo._shapes(boxes) != zoo._shapes(fewer)
    assert zoo._equal({"out": torch.ones(2)}, {"out": torch.ones(2)})
    assert not zoo._equal({"out": torch.ones(2)}, {"aux": torch.ones(2)})
    assert not zoo._equal({"out": torch.ones(2)}, {"out": torch.zeros(2)})


@pytest.mark.parametrize("name,source,family,blocks", [
    ("lraspp_mobilenet_v3_large", "torchvision", "segmentation.lraspp", 5),  # {"out": ...}
    ("ssdlite320_mobilenet_v3_large", "torchvision", "detection.ssdlite", 5),  # boxes per image, at its 320 px
    ("MobileNetV2ForImageClassification", "transformers", "mobilenet_v2", 10),  # a ModelOutput
])
def test_a_model_with_structured_outputs_gets_its_row(zoo, name, source, family, blocks):
    if source == "transformers":
        pytest.importorskip("transformers")
    row = zoo.run_one(name, source, family, 64, limit=120)
    assert (row.outcome, row.se_blocks) == ("ok", blocks), row.reason
    assert row.size == ("320" if "ssdlite" in name else "64")


def test_the_zoo_lists_video_detection_segmentation_and_timm_architectures(zoo):
    rows = {name: family for name, _, family in zoo.torchvision_models()}
    assert rows["r3d_18"] == "video.resnet" and rows["fasterrcnn_resnet50_fpn"] == "detection.faster_rcnn"
    assert rows["fcn_resnet50"] == "segmentation.fcn" and rows["resnet50"] == "resnet"
    timm_rows = {family: name for name, _, family in zoo.timm_models()}
    assert timm_rows["efficientnet/mobilenetv1"] == "mobilenetv1_100" and timm_rows["vgg"] == "vgg11"
    model, shapes = zoo.build("mvit_v2_s", "torchvision", "video.mvit", 64)
    assert shapes[0] == (2, 3, zoo.FRAMES, 64, 64)
    with torch.no_grad():
        assert model.eval()(torch.randn(*shapes[0])).shape == (2, 400)  # runs at the clip's size, not 16 x 224
