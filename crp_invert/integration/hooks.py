"""Record pooled activations of a model's layers with plain forward hooks over a DataLoader, for users who only
want labels (no CRP run, no relevances).

Rows are assigned in the order the loader yields samples, so the loader must yield the dataset in order:
loaders with a random or non-sequential sampler are refused, and a continued recording must see the same first
sample as the one that started the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..storage.cache import ActivationCache
from ..storage.fingerprint import model_hash
from .guard import model_guard
from .layouts import layer_layouts
from .recorder import (
    DATA_KEYS,
    Pooling,
    Recorder,
    check_layers,
    check_recorded_layers,
    input_hash,
    layer_poolings,
    open_cache,
    recording_meta,
)

__all__ = ["record_activations", "check_sequential"]

logger = logging.getLogger(__name__)


def _indices_in_order(index_source: Iterable, what: str) -> None:
    """ValueError unless ``index_source`` yields 0, 1, 2, ... (flattening batches of indices)."""
    expected = 0
    for item in index_source:
        for index in np.atleast_1d(np.asarray(item)).reshape(-1):
            if int(index) != expected:
                raise ValueError(
                    f"the data_loader's {what} yields dataset index {int(index)} at position {expected}: rows of "
                    "the cache are assigned in the order the loader yields samples, so it must yield the dataset "
                    "in order, each sample once (use shuffle=False and no sampler, or record in dataset order)"
                )
            expected += 1


def _plain_sequential(data_loader: torch.utils.data.DataLoader) -> bool:
    """Whether the loader uses torch's ``SequentialSampler`` over its own dataset, batched (if at all) by torch's
    ``BatchSampler``: exactly these classes yield 0, 1, 2, ... (``shuffle=False``, no sampler given)."""
    sampler, batch_sampler = data_loader.sampler, data_loader.batch_sampler
    if type(sampler) is not torch.utils.data.SequentialSampler or sampler.data_source is not data_loader.dataset:
        return False
    return batch_sampler is None or (type(batch_sampler) is torch.utils.data.BatchSampler
                                     and batch_sampler.sampler is sampler)


def check_sequential(data_loader: Any) -> None:
    """Refuse a torch DataLoader whose samples do not come in dataset order (shuffled, a sampler that skips or
    repeats samples, ``in_order=False``). Other iterables are trusted to yield the dataset in order.

    The loader's (batch) sampler is iterated twice without loading data: both passes must yield 0, 1, 2, ...
    (a shorter sequence, e.g. ``drop_last``, is fine: the rows it does not reach stay incomplete).
    """
    if not isinstance(data_loader, torch.utils.data.DataLoader):
        return
    if isinstance(data_loader.dataset, torch.utils.data.IterableDataset):
        return  # no indices: the dataset's own order
    if not getattr(data_loader, "in_order", True):
        raise ValueError("the data_loader was built with in_order=False: batches may come out of dataset order")
    random = (torch.utils.data.RandomSampler, torch.utils.data.SubsetRandomSampler,
              torch.utils.data.WeightedRandomSampler)
    if isinstance(data_loader.sampler, random):
        raise ValueError(
            f"the data_loader samples in random order ({type(data_loader.sampler).__name__}, e.g. shuffle=True): "
            "rows of the cache are assigned in the order the loader yields samples; use shuffle=False"
        )
    if _plain_sequential(data_loader):
        return  # torch's own classes, not subclasses: range(len(dataset)) in order, nothing to iterate
    source, what = ((data_loader.batch_sampler, "batch sampler") if data_loader.batch_sampler is not None
                    else (data_loader.sampler, "sampler"))
    for _ in range(2):  # twice: a sampler with its own randomness would differ
        _indices_in_order(source, what)


def record_activations(
    model: torch.nn.Module,
    data_loader: Iterable,
    layers: Sequence[str] | Mapping[str, Any],
    cache: ActivationCache | str | os.PathLike,
    pooling: Pooling | Mapping[str, Pooling] = "mean",
    composite=None,
    device: torch.device | str | None = None,
    n_samples: int | None = None,
    overwrite: bool = False,
    flush_interval: float = 2.0,
    progress: bool = True,
    *,
    layouts: str | Mapping[str, str] | None = None,
) -> ActivationCache:
    """Record pooled activations of ``layers`` for every sample of a DataLoader with plain forward hooks.

    Parameters
    ----------
    model : torch.nn.Module
        In the mode you want (usually ``model.eval()``); not changed (also not when a call fails).
    data_loader : iterable
        Yields input tensors [B, ...] or ``(input, target, ...)`` tuples, in dataset order: the k-th sample
        yielded fills row k. A torch DataLoader that shuffles, or whose sampler skips or repeats samples, is
        refused (ValueError).
    layers : sequence of str, or dict of layer name to CRP Concept
        Module names (as in ``model.named_modules()``). A module called several times per forward pass is
        recorded with the output of its last call.
    cache : str, os.PathLike or ActivationCache
        Where to write. An existing cache is continued: batches whose rows are all complete are skipped
        (no forward pass), so a rerun after an interruption finishes the file. It is refused if it was
        recorded with another model, pooling, composite or number of samples, or from other data (the first
        sample's input differs).
    pooling : {"mean", "max", "sum"}, callable, or dict of layer name to those
        See :func:`~crp_invert.integration.recorder.pool`.
    composite : zennit Composite, optional
        Registered during the forward passes so that its canonizers apply (e.g. merged BatchNorms), giving the
        activations CRP records. Without it the plain model's outputs are recorded.
    device : torch.device or str, optional
        Where inputs go (default: the device of the model's first parameter, else CPU).
    n_samples : int, optional
        Number of samples (default ``len(data_loader.dataset)``).
    overwrite : bool
        Discard an existing cache file.
    flush_interval : float
        Seconds between flushes (rows become complete at a flush).
    progress : bool
        Show a tqdm bar.
    layouts : str or dict of layer name to str, optional
        Unit layout per layer (:mod:`~crp_invert.integration.layouts`): ``"channels"`` (default) or
        ``"tokens"`` for [B, T, D] outputs (units last), optionally with the reduction over the tokens,
        ``"tokens:cls"`` (class token), ``"tokens:mean"``, ``"tokens:max"``. A 3-D output of a layer without a
        layout is refused (ValueError) unless its module is channels first by type (``Conv1d``, ...).

    Returns
    -------
    ActivationCache
        The cache: ``cache`` itself if an ActivationCache was given, otherwise the file reopened read-only.
    """
    layer_map = dict(layers) if isinstance(layers, Mapping) else {name: None for name in layers}
    if not layer_map:
        raise ValueError("layers must name at least one module")
    poolings = layer_poolings(layer_map, pooling)
    check_layers(model, layer_map)
    kinds, poolings, declared = layer_layouts(model, layer_map, poolings, layouts)
    n_samples = _dataset_length(data_loader, n_samples)
    check_sequential(data_loader)
    device = _input_device(model, device)
    store, own = open_cache(cache, overwrite)
    try:
        store.initialize((0, int(n_samples)))
        digest = model_hash(model)
        meta = {name: recording_meta(digest, name, concept, poolings[name], composite, n_samples,
                                       layout=kinds[name])
                for name, concept in layer_map.items()}
        check_recorded_layers(store, meta, relevances=False)  # all but the data: refused before any work
        done = store.complete() if all(name in store for name in layer_map) else np.zeros(n_samples, dtype=bool)
        recorder = Recorder(store, layer_map, poolings, False, meta, flush_interval, kinds, declared)
        run = _HookedRun(model, composite, recorder, list(layer_map))
        try:
            row = run.record(_batches(data_loader, progress), store, meta, done, n_samples, device)
        finally:
            recorder.close()
        if row != n_samples:
            logger.warning("data_loader yielded %d samples, the cache has %d rows; the rest stay incomplete",
                           row, n_samples)
    finally:
        if own:
            store.close()
    return ActivationCache(store.path) if own else store


def _dataset_length(data_loader: Iterable, n_samples: int | None) -> int:
    """``n_samples``, or the length of the loader's dataset (TypeError where it has none)."""
    if n_samples is not None:
        return n_samples
    dataset = getattr(data_loader, "dataset", None)
    if dataset is None:
        raise TypeError("data_loader has no .dataset; pass n_samples=")
    return len(dataset)


def _input_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device | str:
    """Where inputs go: ``device``, else the device of the model's first parameter, else the CPU."""
    if device is not None:
        return device
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _batches(data_loader: Iterable, progress: bool) -> Iterator[torch.Tensor]:
    """The input tensor of every batch (the first item of tuples), with a progress bar."""
    from tqdm.auto import tqdm

    for batch in tqdm(data_loader, desc="recording activations", disable=not progress):
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"batches must be tensors or (input, ...) tuples, got {type(inputs).__name__}")
        yield inputs


class _HookedRun:
    """Forward passes with a hook on every recorded layer that hands its output to the recorder; the hooks,
    the composite and the model are restored when the run ends, also after an error."""

    def __init__(self, model: torch.nn.Module, composite: Any, recorder: Recorder, layers: list[str]) -> None:
        self.model, self.composite, self.recorder, self.layers = model, composite, recorder, layers
        self.indices: np.ndarray | None = None

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.recorder.activation(name, output[0] if isinstance(output, tuple) else output, self.indices)

        return hook

    def record(self, batches: Iterator[torch.Tensor], store: ActivationCache, meta: dict[str, dict],
               done: np.ndarray, n_samples: int, device: Any) -> int:
        """Record every batch whose rows are not all complete; returns the number of samples yielded."""
        modules = dict(self.model.named_modules())
        handles = []
        try:
            with model_guard(self.model, self.composite, only_on_error=True), torch.no_grad():
                handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]
                with _composite_context(self.composite, self.model):  # after our hooks, as before
                    return self._passes(batches, store, meta, done, n_samples, device)
        finally:
            for handle in handles:
                handle.remove()

    def _passes(self, batches, store, meta, done, n_samples, device) -> int:
        row = 0
        for inputs in batches:
            if row == 0:
                _check_data(store, meta, inputs[:1])
            size = inputs.shape[0]
            if row + size > n_samples:
                raise ValueError(f"data_loader yielded more than n_samples={n_samples} samples")
            self.indices, row = np.arange(row, row + size), row + size
            if done[self.indices].all():
                continue
            self.recorder.begin(self.indices)
            self.model(inputs.to(device))
            self.recorder.end()
        return row


@contextmanager
def _composite_context(composite: Any, model: torch.nn.Module) -> Iterator[None]:
    """The composite registered on the model for the block (nothing without a composite)."""
    if composite is None:
        yield
        return
    with composite.context(model):
        yield


def _check_data(store: ActivationCache, meta: dict[str, dict], first: torch.Tensor) -> None:
    """Add the first sample's hash to the layers' attributes; refuse a cache recorded from other data."""
    data = input_hash(first)
    for layer_meta in meta.values():
        layer_meta[DATA_KEYS[0]] = data
    check_recorded_layers(store, meta, relevances=False)
