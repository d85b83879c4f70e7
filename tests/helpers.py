"""Shared tiny models, datasets, caches and references of the tests (one definition each; import with
``from helpers import ...``; ``conftest.py`` wraps :func:`write_cache` as the ``make_cache`` fixture).

Children of the models are registered in forward order: zennit's SequentialMergeBatchNorm merges a
BatchNorm into the preceding leaf module in registration order.
"""
from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn
from zennit.layer import Sum


class BranchNet(nn.Module):
    """conv1-bn1-relu-conv2-bn2 and a parallel conv-bn, merged with zennit's Sum, then pool, flatten and two
    linear layers. ``flat`` is the width after pooling (it depends on the input size)."""

    def __init__(self, c1: int = 4, c2: int = 5, hidden: int = 6, classes: int = 3, flat: int = 20) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(c2)
        self.parallel = nn.Sequential(nn.Conv2d(1, c2, 5, stride=2, bias=False), nn.BatchNorm2d(c2))
        self.sum = Sum()
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(flat, hidden)
        self.relu3 = nn.ReLU()
        self.linear2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        merged = self.sum(torch.stack([self.parallel(x), main], dim=-1))
        return self.linear2(self.relu3(self.linear1(self.flatten(self.pool(self.relu2(merged))))))


def randomize_batch_norm(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (so merging them matters); eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def branch_net(seed: int = 0, **sizes: int) -> nn.Module:
    """A seeded :class:`BranchNet` with random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_batch_norm(BranchNet(**sizes), seed)


class ListDataset:
    """(image, int target) pairs as CRP's FeatureVisualization reads them; calls ``on_get(index)`` before
    returning an item (to interrupt runs at a chosen sample)."""

    def __init__(self, x: torch.Tensor, targets: torch.Tensor, on_get: Optional[Callable[[int], None]] = None):
        self.x, self.targets, self.on_get = x, targets, on_get

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index):
        if self.on_get is not None:
            self.on_get(int(index))
        target = self.targets[index]
        return self.x[index], (int(target) if np.ndim(target) == 0 else np.asarray(target))


def assert_same_crp_files(folder_a, folder_b) -> None:
    """The two folders hold the same files (CRP's results), byte for byte, and at least one."""
    files = [sorted(str(p.relative_to(f)) for p in Path(f).rglob("*") if p.is_file()) for f in (folder_a, folder_b)]
    assert files[0] == files[1]
    assert files[0], "CRP wrote no files"
    for name in files[0]:
        assert filecmp.cmp(Path(folder_a) / name, Path(folder_b) / name, shallow=False), name


def hooks_left(model: nn.Module) -> int:
    """Number of forward, forward-pre and backward hooks on the modules of a model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


LayerData = Union[np.ndarray, tuple[np.ndarray, Optional[np.ndarray]]]


def write_cache(
    path,
    layers: Mapping[str, LayerData],
    rows: Optional[tuple[int, int]] = None,
    dataset_length: Optional[int] = None,
    meta: Union[Mapping[str, Any], Callable[[str], Mapping[str, Any]]] = (("pooling", "mean"),),
    overwrite: bool = True,
) -> Path:
    """Write a complete activation cache: ``layers`` maps a layer name to its activations or to
    ``(activations, relevances)`` (relevances stored when not None); all layers have the same rows.

    ``rows`` is the ``[start, end)`` of the dataset that the file holds (default: all of its rows from 0),
    ``dataset_length`` the whole dataset's length (shards), ``meta`` the layer metadata (a mapping for every
    layer, or a function of the layer name). The cache-writing set-up of the tests in one place.
    """
    from crp_invert.storage.cache import ActivationCache

    arrays = {name: data if isinstance(data, tuple) else (data, None) for name, data in layers.items()}
    n_rows = {len(acts) for acts, _ in arrays.values()}
    if len(n_rows) != 1:
        raise ValueError(f"every layer needs the same number of rows, got {sorted(n_rows)}")
    (n,) = n_rows
    with ActivationCache(path, mode="a", overwrite=overwrite) as cache:
        cache.initialize(rows or (0, n), dataset_length=dataset_length)
        for name, (acts, rels) in arrays.items():
            layer_meta = meta(name) if callable(meta) else dict(meta)
            cache.add_layer(name, acts.shape[1], relevances=rels is not None, **layer_meta)
            cache.write(name, (0, n), acts, rels)
        cache.mark_complete((0, n))
    return Path(path)


def random_case(seed: int, n: Optional[int] = None, k: Optional[int] = None, f: int = 4):
    """Random concepts and feature scores: ``(labels (n, k) bool, scores (n, f), names)``; many ties and zeros
    in the scores, and feature 0 driven by ``c0 AND NOT c1`` so that long formulas matter."""
    rng = np.random.default_rng(seed)
    n = n or int(rng.integers(20, 90))
    k = k or int(rng.integers(2, 6))
    labels = rng.random((n, k)) < rng.uniform(0.1, 0.6, size=k)
    scores = np.maximum(rng.normal(size=(n, f)), 0.0).round(1)
    scores[:, 0] += 1.5 * (labels[:, 0] & ~labels[:, 1 % k])
    return labels, scores, [f"c{i}" for i in range(k)]


def random_concepts(n: int, k: int, share: float = 0.35, seed: int = 1, names: Optional[list[str]] = None):
    """ConceptLabels of ``n`` samples and ``k`` concepts, each sample having each concept with chance ``share``;
    named ``concept 0 ...`` unless ``names`` is given."""
    from crp_invert.core.concepts import ConceptLabels

    rng = np.random.default_rng(seed)
    return ConceptLabels(rng.random((n, k)) < share, names or [f"concept {i}" for i in range(k)])


def slow_benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg q-values from the definition, in O(m^2): the q-value of p_i is the smallest
    ``m * p_(j) / j`` over the sorted p-values ``p_(j) >= p_i`` (j counted from 1), at most 1."""
    p = [float(v) for v in np.asarray(p_values, dtype=np.float64).reshape(-1)]
    ordered = sorted(p)
    m = len(p)
    return np.array([min([1.0] + [m * ordered[j] / (j + 1) for j in range(m) if ordered[j] >= value])
                     for value in p])


def bh_reference(p_values) -> np.ndarray:
    """Benjamini-Hochberg q-values: scipy's ``false_discovery_control`` (scipy >= 1.11), else the slow
    definition (the declared floor is scipy 1.9)."""
    try:
        from scipy.stats import false_discovery_control
    except ImportError:
        return slow_benjamini_hochberg(p_values)
    return false_discovery_control(np.asarray(p_values, dtype=np.float64), method="bh")
