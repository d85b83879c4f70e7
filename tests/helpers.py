"""Shared tiny models and datasets of the tests (one definition each; import with ``from helpers import ...``).

Children of the models are registered in forward order: zennit's SequentialMergeBatchNorm merges a
BatchNorm into the preceding leaf module in registration order.
"""
from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Callable, Optional

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
