"""The how-to "Label a torchvision model on your own ImageFolder with torchrun" runs as written."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
HOWTO = ROOT / "docs" / "howto" / "torchrun-imagefolder.md"
SCRIPT = ROOT / "docs" / "examples" / "record_imagefolder.py"
CLASSES = ["cat", "dog", "sandal", "sneaker"]


def _image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "images" / name).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
    (root / "parents.json").write_text(json.dumps({"animal": ["cat", "dog"], "footwear": ["sandal", "sneaker"]}))


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _python_block(after: str) -> str:
    text = HOWTO.read_text()
    start = text.index(after)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    return match.group(1)


@pytest.mark.slow
def test_record_label_and_read_under_torchrun(tmp_path):
    """The guide's record script and label command under torchrun (2 CPU processes), then its Python block."""
    _image_folder(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    log = _run(torchrun + [str(SCRIPT), "images", "--hierarchy", "parents.json", "--out", "run", "--model",
                           "resnet18", "--weights", "none", "--resize", "32", "--crop", "32", "--batch-size", "4",
                           "--device", "cpu"], tmp_path)
    assert "wrote index run/acts.h5 over 2 shards" in log
    log = _run(torchrun + ["-m", "crp_invert", "label", "run/acts.h5", "run/concepts.npz", "-L", "2", "-B", "3",
                           "--out", "run/labels/"], tmp_path)
    assert "## layer4 (activation)" in log and "wrote run/labels/index.json" in log
    assert json.loads((tmp_path / "run/labels/index.json").read_text()) == {"layer3": "layer3.json",
                                                                          "layer4": "layer4.json"}
    out = _run([sys.executable, "-c", _python_block("**In Python**")], tmp_path)
    assert "['layer3', 'layer4'] 20 torch.Size([20, 512])" in out

    from crp_invert import ActivationCache, ConceptLabeler, ConceptLabels

    # the sharded cache and the torchrun labels equal one process labeling the same rows
    concepts = ConceptLabels.load(tmp_path / "run/concepts.npz")
    assert concepts.names == CLASSES + ["animal", "footwear"]
    with ActivationCache(tmp_path / "run/acts.h5") as cache:
        single = ConceptLabeler(concepts).label(cache.activations("layer4"), L=2, B=3, progress=False)
    from crp_invert import LayerLabels

    shared = LayerLabels.from_json(tmp_path / "run/labels/layer4.json")
    assert [[str(e.formula) for e in beam] for beam in shared] == [[str(e.formula) for e in beam] for beam in single]
    assert [[e.auc for e in beam] for beam in shared] == [[e.auc for e in beam] for beam in single]
