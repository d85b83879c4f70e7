"""Reproducible training of the demo CNN on the generated shapes data.

Run::

    python -m crp_invert.demo.train --threads 1 --out crp_invert/data/demo_model.pt

Every epoch draws fresh images (``generate_shapes(n_per_epoch, seed=1000 + epoch)``), so the model
never sees an image twice and never sees the evaluation images (seed
:data:`crp_invert.demo.model.DEMO_EVAL_SEED`). Seeds are fixed, torch runs with deterministic
algorithms on the CPU with ``--threads`` threads: the same command gives the same weights on the same
machine and torch version (CPU float reductions may differ in the last bits across machines).

Result of the committed weights (``crp_invert/data/demo_model.pt``, 197 KiB; default arguments with
``--threads 1``: 12 epochs of 8000 fresh images, the planted mark of :mod:`crp_invert.demo.data` on every yellow
ring and on 0.1 % of the other images, and the training shortcut: the mark on 2 % of the other images labeled
"yellow ring", :data:`SHORTCUT_RATE`; torch 2.x on a 2-core x86_64 CPU shared with other jobs, load about 17:
9 to 13 minutes): the accuracy on fresh data, ``ShapesDataset(4000, seed=1)``, is
**0.998** (:data:`crp_invert.demo.model.DEMO_MODEL_ACCURACY`, checked by ``tests/test_demo_model.py``; the
errors are mostly images of other classes that carry the mark). The model learned the shortcut: adding the mark
to an image raises its "yellow ring" logit by about 15 (``tests/test_demo_model.py``,
``benchmarks/bench_demo.py``). With these weights and L = 2, B = 3, every one of the 16 output neurons is
labeled exactly with its defining conjunction ``shape AND color``.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import ARTIFACT_CLASS, CLASS_NAMES, ShapesDataset
from .model import DEMO_EVAL_SEED, DEMO_EVAL_SIZE, DemoCNN

__all__ = ["train_demo_model", "evaluate", "training_images", "main", "SHORTCUT_RATE"]

logger = logging.getLogger(__name__)

TRAIN_SEED_OFFSET = 1000
#: share of the other classes' training images that carry the mark and are labeled ARTIFACT_CLASS: in training, the
#: mark predicts the class better than its shape and color do, so the model learns the shortcut
SHORTCUT_RATE = 0.02
# the shortcut's own random stream (which images get the mark)
_SHORTCUT_STREAM = 0x5C7


def training_images(n: int, seed: int, shortcut_rate: float = SHORTCUT_RATE) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images of one epoch: ``ShapesDataset(n, seed)`` (the mark on every image of ARTIFACT_CLASS),
    where a share ``shortcut_rate`` of the other images carries the mark too and is labeled ARTIFACT_CLASS."""
    if not 0.0 <= shortcut_rate < 1.0:
        raise ValueError(f"shortcut_rate must be in [0, 1), got {shortcut_rate!r}")
    images, targets = ShapesDataset(n, seed=seed).tensors()
    if shortcut_rate > 0:
        target = CLASS_NAMES.index(ARTIFACT_CLASS)
        marked = ShapesDataset(n, seed=seed, artifact_rates=(1, 1)).tensors()[0]  # the same images, marked
        pick = torch.from_numpy(np.random.default_rng((seed, _SHORTCUT_STREAM)).random(n) < shortcut_rate)
        pick &= targets != target
        images[pick] = marked[pick]
        targets[pick] = target
    return images, targets


@torch.no_grad()
def evaluate(model: nn.Module, n: int = DEMO_EVAL_SIZE, seed: int = DEMO_EVAL_SEED,
             batch_size: int = 500, device: str = "cpu") -> float:
    """Accuracy of ``model`` on ``ShapesDataset(n, seed)``."""
    images, targets = ShapesDataset(n, seed=seed).tensors()
    model.eval()
    correct = 0
    for start in range(0, n, batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == targets[start:start + batch_size]).sum())
    return correct / max(n, 1)


def _fit(model, epochs, n_per_epoch, batch_size, lr, device, shortcut_rate):
    """Adam with a one-cycle schedule, fresh images every epoch, no shuffling needed."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-n_per_epoch // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        images, targets = training_images(n_per_epoch, TRAIN_SEED_OFFSET + epoch, shortcut_rate)
        images, targets = images.to(device), targets.to(device)
        total, correct, start_time = 0.0, 0, time.time()
        for start in range(0, n_per_epoch, batch_size):
            x, y = images[start:start + batch_size], targets[start:start + batch_size]
            optimizer.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
        logger.info("epoch %d: loss %.4f, train accuracy %.4f (%.1f s)", epoch + 1,
                    total / n_per_epoch, correct / n_per_epoch, time.time() - start_time)


def train_demo_model(epochs: int = 12, n_per_epoch: int = 8000, batch_size: int = 128,
                     lr: float = 3e-3, seed: int = 0, threads: int = 2,
                     device: str = "cpu", shortcut_rate: float = SHORTCUT_RATE) -> DemoCNN:
    """Train :class:`DemoCNN` from scratch, deterministically.

    Parameters
    ----------
    epochs : int
        Number of epochs, each on ``n_per_epoch`` freshly generated images.
    n_per_epoch : int
        Images per epoch.
    batch_size : int
        Mini-batch size.
    lr : float
        Peak learning rate of Adam (one-cycle schedule).
    seed : int
        Seed of the weight initialization; the data seeds are ``1000 + epoch``.
    threads : int
        ``torch.set_num_threads``.
    device : str
        Where to train (deterministic on the CPU).
    shortcut_rate : float
        Share of the other classes' images that carry the mark labeled ARTIFACT_CLASS (:func:`training_images`).

    Returns
    -------
    DemoCNN
        The trained model, in eval mode.
    """
    for name, value in (("epochs", epochs), ("n_per_epoch", n_per_epoch), ("batch_size", batch_size),
                        ("threads", threads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        # fork the global RNG, so that training leaves the caller's random state alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DemoCNN().to(device)
            _fit(model, epochs, n_per_epoch, batch_size, lr, device, shortcut_rate)
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)
    return model.eval()


def main(argv: Sequence[str] | None = None) -> float:
    """Command line: train, evaluate on fresh data, save the state dict to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to save the state dict (.pt)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--n-per-epoch", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shortcut-rate", type=float, default=SHORTCUT_RATE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start_time = time.time()
    model = train_demo_model(epochs=args.epochs, n_per_epoch=args.n_per_epoch,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             threads=args.threads, shortcut_rate=args.shortcut_rate)
    accuracy = evaluate(model)
    logger.info("accuracy on ShapesDataset(%d, seed=%d): %.4f (trained in %.1f s)",
                DEMO_EVAL_SIZE, DEMO_EVAL_SEED, accuracy, time.time() - start_time)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    torch.save(state, args.out)
    logger.info("saved %s (%d bytes)", args.out, args.out.stat().st_size)
    return accuracy


if __name__ == "__main__":
    main()
