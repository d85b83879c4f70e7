"""The README's Python code blocks run as written (stand-ins only for ImageNet, pretrained weights and image size)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
IMAGENET_LINE = 'IMAGENET_VAL = "/data/imagenet/val"'
CLASSES = ["n01440764", "n01443537", "n02085620", "n02085782"]  # tench, goldfish, chihuahua, japanese spaniel


def python_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_has_the_blocks_this_test_runs():
    """The README holds the quick start, the formula example and the real-model recipe (and nothing untested)."""
    blocks = python_blocks()
    assert len(blocks) == 3
    assert "ConceptLabeler(concepts" in blocks[0]
    assert "Formula.parse" in blocks[1]
    assert IMAGENET_LINE in blocks[2]


def test_quick_start_and_formula_blocks(tmp_path, monkeypatch, capsys):
    """The quick start and the formula block run in one namespace and write the files they promise."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = python_blocks()
    exec(compile(blocks[0], "README quick start", "exec"), namespace)
    exec(compile(blocks[1], "README formula", "exec"), namespace)
    assert (tmp_path / "labels.json").exists() and (tmp_path / "labels.csv").exists()
    f, concepts = namespace["f"], namespace["concepts"]
    expected = concepts.dense()[:, 0] & ~concepts.dense()[:, 2]
    assert f.length == 2 and torch.equal(f.evaluate(concepts).cpu(), expected.cpu())
    assert "feature" in capsys.readouterr().out


def _small_vgg16_bn(weights=None):
    """VGG16_bn's layers (so ``features.40`` exists) with random weights and a small head for 32 x 32 images."""
    from torchvision.models import vgg

    torch.manual_seed(0)
    model = vgg.vgg16_bn(weights=None, num_classes=len(CLASSES))
    model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
    model.classifier = torch.nn.Linear(512, len(CLASSES))
    return model


@pytest.mark.slow
def test_real_model_block(tmp_path, monkeypatch, capsys):
    """The VGG16 / ImageNet recipe runs as written on a 12-image ImageFolder with WordNet-style class folders."""
    import torchvision
    from PIL import Image
    from torchvision import transforms

    images = tmp_path / "val"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (images / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(images / name / f"{i}.png")
    (tmp_path / "wordnet_parents.json").write_text(json.dumps({"fish": CLASSES[:2], "dog": CLASSES[2:]}))
    monkeypatch.chdir(tmp_path)
    # stand-ins: a random VGG16_bn with a small head instead of the download, 32 x 32 crops instead of 224 x 224
    monkeypatch.setattr(torchvision.models, "vgg16_bn", _small_vgg16_bn)  # vgg.vgg16_bn stays
    resize, crop = transforms.Resize, transforms.CenterCrop
    monkeypatch.setattr(transforms, "Resize", lambda size: resize(32))
    monkeypatch.setattr(transforms, "CenterCrop", lambda size: crop(32))

    source = python_blocks()[2]
    assert IMAGENET_LINE in source
    source = source.replace(IMAGENET_LINE, f"IMAGENET_VAL = {str(images)!r}")
    namespace: dict = {}
    exec(compile(source, "README real model", "exec"), namespace)

    labels, concepts = namespace["labels"], namespace["concepts"]
    assert concepts.names == CLASSES + ["fish", "dog"]
    assert len(labels) == 13 and labels["features.40"].n_features == 512
    table = capsys.readouterr().out
    assert "formula" in table and "... 492 more features" in table
    assert (tmp_path / "crp").is_dir() and (tmp_path / "imagenet.h5").exists()
