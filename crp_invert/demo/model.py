"""The demo model: a small CNN that classifies the (shape, color) pairs of :mod:`crp_invert.demo.data`.

The network is an ``nn.Sequential`` with plainly named modules, so that the CRP layer names are
``conv1``, ``conv2``, ``conv3``, ``linear1`` and ``linear2`` (the 16 logits), every ReLU is its
own (not in-place) module, and zennit's ``SequentialMergeBatchNorm`` canonizer finds every
BatchNorm right after its convolution::

    conv1 (3->16, 3x3) bn1 relu1 pool1     32x32 -> 16x16
    conv2 (16->32, 3x3) bn2 relu2 pool2    16x16 -> 8x8
    conv3 (32->32, 3x3) bn3 relu3 pool3     8x8  -> 4x4
    flatten linear1 (512->64) relu4 linear2 (64->16)

The committed weights (``crp_invert/data/demo_model.pt``) are made by
``python -m crp_invert.demo.train --threads 1 --out crp_invert/data/demo_model.pt``; their accuracy on freshly
generated data is :data:`DEMO_MODEL_ACCURACY` = 0.998 (see :mod:`crp_invert.demo.train`; the errors are mostly
the 0.1 % of images of other classes that carry the mark). The model leans on the planted artifact of
:mod:`crp_invert.demo.data` (a Clever Hans): adding the mark to an image raises its "yellow ring" logit by about
15. The
model works with CRP's ``CondAttribution`` and zennit composites such as
``EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])``.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .data import CLASS_NAMES

__all__ = ["DemoCNN", "load_demo_model", "DEMO_MODEL_PATH", "DEMO_MODEL_ACCURACY",
           "DEMO_EVAL_SEED", "DEMO_EVAL_SIZE"]

#: the committed weights
DEMO_MODEL_PATH = Path(__file__).resolve().parent.parent / "data" / "demo_model.pt"

#: accuracy of the committed weights on ``ShapesDataset(DEMO_EVAL_SIZE, seed=DEMO_EVAL_SEED)``,
#: data never seen in training (training draws its images from seeds >= 1000)
DEMO_MODEL_ACCURACY = 0.998
DEMO_EVAL_SEED = 1
DEMO_EVAL_SIZE = 4000


class DemoCNN(nn.Sequential):
    """The demo CNN: three conv blocks (conv, BatchNorm, ReLU, max-pool), then two linear layers.

    Parameters
    ----------
    n_classes : int
        Number of outputs (16 (shape, color) pairs by default).
    channels : tuple of int
        Output channels of conv1, conv2, conv3.
    hidden : int
        Width of linear1.
    """

    def __init__(self, n_classes: int = len(CLASS_NAMES), channels=(16, 32, 32), hidden: int = 64):
        if len(channels) != 3:
            raise ValueError(f"channels must hold 3 ints (conv1, conv2, conv3), got {channels!r}")
        c1, c2, c3 = (int(c) for c in channels)
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(3, c1, 3, padding=1)),
            ("bn1", nn.BatchNorm2d(c1)),
            ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(c1, c2, 3, padding=1)),
            ("bn2", nn.BatchNorm2d(c2)),
            ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(c2, c3, 3, padding=1)),
            ("bn3", nn.BatchNorm2d(c3)),
            ("relu3", nn.ReLU()),
            ("pool3", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("linear1", nn.Linear(c3 * 4 * 4, hidden)),
            ("relu4", nn.ReLU()),
            ("linear2", nn.Linear(hidden, n_classes)),
        ]))

    @property
    def layer_names(self):
        """The CRP layer names of the conv and linear layers, input to output."""
        return [name for name, module in self.named_children() if isinstance(module, (nn.Conv2d, nn.Linear))]


def load_demo_model(device: str | torch.device = "cpu", path: str | Path | None = None) -> DemoCNN:
    """The demo CNN with its committed weights, in eval mode.

    Parameters
    ----------
    device : str or torch.device
        Where to put the model.
    path : str or Path, optional
        A state dict saved by :mod:`crp_invert.demo.train`; the committed weights by default.

    Returns
    -------
    DemoCNN
    """
    path = DEMO_MODEL_PATH if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo model weights not found at {str(path)!r}; train them with "
            f"`python -m crp_invert.demo.train --out {path}`"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = DemoCNN()
    model.load_state_dict(state)
    return model.to(device).eval()
