"""The shared FashionMNIST CRP test model and its 5,000 validation images (../shared, not in the repo).

Shared by the benchmark scripts: the model re-created from ``shared/data/fashion-mnist-crp/README.md``,
the data loader, and the labeling check of issue 2 (all four layers, classes plus parent groups).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "fashion-mnist-crp"
LAYERS = ["conv1", "conv2", "linear1", "linear2"]
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# parent groups of the classes, as WordNet hypernyms are for ImageNet
HIERARCHY = {
    "footwear": ["Sandal", "Sneaker", "Ankle boot"],
    "upper-body garment": ["T-shirt/top", "Pullover", "Coat", "Shirt"],
    "garment": ["upper-body garment", "Trouser", "Dress"],
    "long sleeves": ["Pullover", "Coat"],
}


def data_dir() -> Optional[Path]:
    """The shared data folder, or None where it is missing."""
    for candidate in (DATA, Path("/work/shared/data/fashion-mnist-crp")):
        if (candidate / "model_state.pt").is_file():
            return candidate
    return None


class _Sum(nn.Module):
    """zennit.layer.Sum's forward (a sum over the last dimension), where zennit is not installed."""

    def forward(self, x):
        return torch.sum(x, dim=-1)


class FashionNet(nn.Module):
    """The shared model, re-created from its README.

    Children are registered in forward order (conv1, bn1, relu, conv2, bn2, ...): zennit's
    SequentialMergeBatchNorm merges a BatchNorm into the *preceding leaf module in registration order*.
    """

    def __init__(self):
        super().__init__()
        try:  # zennit's Sum (LRP rules know it); the same forward where zennit is missing (a bare GPU machine)
            from zennit.layer import Sum
        except ImportError:
            Sum = _Sum

        self.conv1 = nn.Conv2d(1, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.parallel = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2, bias=False), nn.BatchNorm2d(16))
        self.sum = Sum()
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(576, 120)
        self.relu3 = nn.ReLU()
        self.linear2 = nn.Linear(120, 10)

    def forward(self, x):
        main = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        merged = self.sum(torch.stack([self.parallel(x), main], dim=-1))
        return self.linear2(self.relu3(self.linear1(self.flatten(self.pool(self.relu2(merged))))))


class ImageDataset:
    """(image [1, 28, 28] float32 in [0, 1], target) pairs, as CRP's FeatureVisualization reads them."""

    def __init__(self, images: torch.Tensor, targets: np.ndarray):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.targets[index])


def load(path: Path, n_samples: Optional[int] = None):
    """``(model, images [N, 1, 28, 28] float32, targets [N] int64)`` from the shared folder."""
    model = FashionNet()
    model.load_state_dict(torch.load(path / "model_state.pt", weights_only=True))
    model.eval()
    archive = np.load(path / "val.npz")
    images = torch.from_numpy(archive["images"][:n_samples].astype(np.float32) / 255.0)[:, None]
    targets = archive["targets"][:n_samples].astype(np.int64)
    return model, images, targets


def pooled_activations(model: nn.Module, images: torch.Tensor, layers=LAYERS, batch_size: int = 500) -> dict:
    """Spatial mean of every channel of ``layers`` for all images (plain forward hooks)."""
    outputs = {name: [] for name in layers}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda module, inputs, output, name=name: outputs[name].append(
                output.detach().flatten(2).mean(-1) if output.ndim > 2 else output.detach()))
        for name in layers
    ]
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in outputs.items()}


def fashion_layer_check(path: Path, device: str = "cpu") -> list:
    """Issue 2's check: label all four layers (L = 3, B = 3) with the classes plus parent groups;
    every output neuron of linear2 must be labeled with its own class. Returns table rows."""
    from crp_invert import ConceptLabeler, ConceptLabels, Formula

    model, images, targets = load(path)
    acts = pooled_activations(model, images)
    concepts = ConceptLabels.from_targets(targets, CLASSES, hierarchy=HIERARCHY)
    labeler = ConceptLabeler(concepts, device=device)
    labeler.label(acts["conv1"][:, :2], L=3, B=3, progress=False)  # warm-up
    rows = []
    start = time.perf_counter()
    results = {name: labeler.label(acts[name], L=3, B=3, layer=name, progress=False) for name in LAYERS}
    elapsed = time.perf_counter() - start
    channels = sum(a.shape[1] for a in acts.values())
    rows.append((f"FashionMNIST: all 4 layers ({channels} channels), N=5,000, K={concepts.n_concepts}, L=3 B=3",
                 f"{elapsed:.2f} s", ""))
    own = [results["linear2"].best(c).formula == Formula.concept(CLASSES[c]) for c in range(10)]
    rows.append(("FashionMNIST: linear2 output neurons labeled with their own class", f"{sum(own)}/10",
                 ", ".join(f"{CLASSES[c]}: {results['linear2'].best(c).formula} "
                           f"(AUC {results['linear2'].best(c).auc:.3f})" for c in range(10))))
    for name in LAYERS[:3]:
        aucs = [beam[0].auc for beam in results[name] if beam]
        rows.append((f"FashionMNIST {name}: median best AUC", f"{np.median(aucs):.3f}",
                     f"best: {max(results[name], key=lambda b: b[0].auc)[0].formula}"))
    return rows
