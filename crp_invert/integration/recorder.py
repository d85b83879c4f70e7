"""From hook to disk: pool a layer's output per concept, buffer a batch of rows, write completed batches into an
:class:`~crp_invert.storage.cache.ActivationCache`, and describe what was recorded (the layer metadata that a
resumed recording must match).

Used by both ways of recording (:mod:`.hooks` with plain forward hooks, :mod:`.feature_visualization` inside
CRP's ``FeatureVisualization``); of CRP it needs only the light ``crp.concepts``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import numpy as np
import torch
from crp.concepts import ChannelConcept

from ..storage.cache import ActivationCache
from ..storage.fingerprint import fingerprint
from .layouts import TokenConcept, check_output_layout, units_first

__all__ = ["pool", "pool_units", "POOLINGS", "Pooling", "Recorder", "layer_poolings", "check_layers", "recording_meta",
           "input_hash", "callable_name", "open_cache", "check_recorded_layers"]

logger = logging.getLogger(__name__)

Pooling = Union[str, Callable[[torch.Tensor], torch.Tensor]]
POOLINGS = ("mean", "max", "sum")

# layer attributes that describe the data (not the model or the setup); caches written before they existed
# lack them and are continued without the check
DATA_KEYS = ("data_hash", "preprocess")


def pool(output: torch.Tensor, pooling: Pooling = "mean") -> torch.Tensor:
    """Pool a layer output [B, C, ...] to one value per channel [B, C].

    Parameters
    ----------
    output : torch.Tensor
        [B, C] (returned as is) or [B, C, *spatial].
    pooling : {"mean", "max", "sum"} or callable
        Reduction over the spatial dimensions, or a function ``output -> [B, C]``.

    Returns
    -------
    torch.Tensor
        [B, C], same dtype and device.
    """
    if callable(pooling):
        pooled = pooling(output)
        if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or pooled.shape[0] != output.shape[0]:
            raise ValueError(
                f"pooling callable must return a [B, C] tensor for an output of shape "
                f"{tuple(output.shape)}, got {getattr(pooled, 'shape', type(pooled))}"
            )
        return pooled
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS} or a callable, got {pooling!r}")
    if output.dim() < 2:
        raise ValueError(f"layer output must have shape [B, C, ...], got {tuple(output.shape)}")
    if output.dim() == 2:
        return output
    flat = output.reshape(*output.shape[:2], -1)
    if pooling == "mean":
        return flat.mean(-1)
    if pooling == "max":
        return flat.amax(-1)
    return flat.sum(-1)


def pool_units(output: torch.Tensor, layout: str, pooling: Pooling) -> torch.Tensor:
    """One value per unit [B, units] for a layer of the given layout (:mod:`.layouts`): tokens [B, T, D]
    reduced over the tokens (``"cls"``: token 0; a callable sees the output units first, [B, D, T]), or
    channels pooled over space (:func:`pool`)."""
    if layout == "tokens" and pooling == "cls":
        return output[:, 0, :]
    return pool(units_first(output, layout), pooling)


def callable_name(function: Any) -> str:
    """``module.qualname`` of a function (what identifies a pooling or a ``preprocess_fn``), or ``"none"``."""
    if function is None:
        return "none"
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{getattr(function, '__module__', None) or type(function).__module__}.{name}"


def _pooling_name(pooling: Pooling) -> str:
    return f"callable:{callable_name(pooling)}" if callable(pooling) else str(pooling)


def layer_poolings(layer_map: Mapping[str, Any], pooling: Pooling | Mapping[str, Pooling]) -> dict[str, Pooling]:
    """Per-layer pooling, checked against the layer's concept (a named pooling needs ``None``, a CRP
    ``ChannelConcept`` or a :class:`~crp_invert.integration.layouts.TokenConcept`; other concept classes need a
    callable)."""
    result = {}
    for name, concept in layer_map.items():
        chosen = pooling.get(name, "mean") if isinstance(pooling, Mapping) else pooling
        if not callable(chosen):
            if chosen not in POOLINGS:
                raise ValueError(
                    f"pooling of layer {name!r} must be one of {POOLINGS} or a callable, got {chosen!r}"
                )
            if concept is not None and not isinstance(concept, (ChannelConcept, TokenConcept)):
                raise TypeError(
                    f"layer {name!r} uses concept class {type(concept).__name__}; pooling {chosen!r} is defined for "
                    "ChannelConcept only, pass a callable pooling(output) -> [B, C] for this layer"
                )
        result[name] = chosen
    if isinstance(pooling, Mapping):
        unknown = sorted(set(pooling) - set(layer_map))
        if unknown:
            raise KeyError(f"pooling given for layers not in the layer map: {unknown}; layers: {list(layer_map)}")
    return result


def check_layers(model: torch.nn.Module, names: Iterable[str]) -> None:
    """KeyError listing the model's modules when a name is not one of them."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        available = [name for name in modules if name]
        shown = available[:50] + (["..."] if len(available) > 50 else [])
        raise KeyError(f"layers {missing} are not modules of the model; available: {shown}")


def input_hash(inputs: torch.Tensor, target: Any = None) -> str:
    """SHA-256 of one sample's model input (dtype, shape, bytes) and, if given, its target.

    Stored with every recorded layer as ``data_hash``: a recording continued with another dataset, another
    order or other preprocessing has another first sample and is refused.
    """
    digest = hashlib.sha256()
    for value in (inputs, target):
        if value is None:
            continue
        array = value.detach().to("cpu").contiguous() if isinstance(value, torch.Tensor) else np.asarray(value)
        if isinstance(array, torch.Tensor):
            digest.update(f"{array.dtype}|{tuple(array.shape)}|".encode())
            digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes() if array.numel() else b"")
        else:
            digest.update(f"{array.dtype}|{array.shape}|".encode())
            digest.update(np.ascontiguousarray(array).tobytes() if array.dtype != object else repr(array).encode())
    return digest.hexdigest()


def recording_meta(
    digest: str,
    layer: str,
    concept: Any,
    pooling: Pooling,
    composite: Any,
    dataset_length: int,
    relevance: str = "",
    data_hash: str | None = None,
    preprocess: str | None = None,
    layout: str = "channels",
) -> dict[str, Any]:
    """The attributes that describe how one layer was recorded (what a resumed recording must match).

    Parameters
    ----------
    digest : str
        :func:`~crp_invert.storage.fingerprint.model_hash` of the model.
    layer : str
    concept : CRP Concept or None
    pooling : str or callable
    composite : zennit Composite or None
        Its class and canonizers are recorded (canonizers change activations, e.g. merged BatchNorms).
    dataset_length : int
    relevance : str
        How relevances were computed ("" for none).
    data_hash, preprocess : str, optional
        :func:`input_hash` of the first sample and the name of the preprocessing function.
    layout : {"channels", "tokens"}
        Where the layer's units are (:mod:`.layouts`); stored as ``layout``. A tokens layer's fingerprint
        covers it; a channels layer's fingerprint is the one of caches written before layouts existed.
    """
    pooling_name = _pooling_name(pooling)
    concept_name = type(concept).__name__ if concept is not None else "ChannelConcept"
    if composite is None:
        composite_name = "none"
    else:
        canonizers = [type(c).__name__ for c in getattr(composite, "canonizers", None) or []]
        composite_name = f"{type(composite).__name__}(canonizers=[{', '.join(canonizers)}])"
    meta = {
        "layout": layout,
        "pooling": pooling_name,
        "concept": concept_name,
        "model_hash": digest,
        "relevance": relevance,
        "composite": composite_name,
        "fingerprint": fingerprint(
            digest, layer, dataset_length, pooling_name if layout == "channels" else f"{layout}:{pooling_name}",
            concept_name, composite_name, relevance
        ),
    }
    for key, value in zip(DATA_KEYS, (data_hash, preprocess), strict=True):
        if value is not None:
            meta[key] = value
    return meta


def check_recorded_layers(cache: ActivationCache, meta: Mapping[str, dict], relevances: bool) -> None:
    """Refuse, before any work, to continue layers of ``cache`` that were recorded differently.

    Layers of ``meta`` that are already in the cache must have the same attributes. The data attributes
    (``data_hash``, ``preprocess``) get their own message; a layer recorded before they existed lacks them and is
    continued without that check (a warning says so, and ``meta`` loses them for that layer, so that they are
    not compared later either).
    """
    legacy = []
    for name, layer_meta in meta.items():
        if name not in cache:
            continue
        info = cache.info(name)
        _check_layout(cache, name, info, layer_meta)
        for key in DATA_KEYS:
            if key not in layer_meta:
                continue
            if key not in info:
                legacy.append(name)
                del layer_meta[key]
            elif info[key] != layer_meta[key]:
                what = ("the first sample's input (another dataset, order or preprocessing)" if key == "data_hash"
                        else "the preprocessing function")
                raise ValueError(
                    f"cache {str(cache.path)!r} layer {name!r} was recorded from other data: {what} differs "
                    f"({key}: stored {info[key]!r}, now {layer_meta[key]!r}); refusing to mix them (use another "
                    "file or overwrite=True)"
                )
        cache.add_layer(name, cache.n_channels(name), relevances=relevances, **layer_meta)
    if legacy:
        logger.warning(
            "cache %s: layers %s were recorded without a fingerprint of the data; continuing them without "
            "checking that the data are the same", cache.path, sorted(set(legacy)),
        )


def _check_layout(cache: ActivationCache, name: str, info: Mapping[str, Any], layer_meta: dict) -> None:
    """A layer recorded before layouts existed is a channels layer: continue it as one (``layer_meta`` loses
    ``layout``, so that it is not compared), refuse to continue it as another layout."""
    if "layout" in info or "layout" not in layer_meta:
        return
    if layer_meta["layout"] != "channels":
        raise ValueError(
            f"cache {str(cache.path)!r} layer {name!r} was recorded with the channels layout (a cache written "
            f"before unit layouts existed), now with layout {layer_meta['layout']!r}: refusing to mix them "
            "(use another file or overwrite=True)"
        )
    del layer_meta["layout"]


def open_cache(cache: ActivationCache | str | os.PathLike, overwrite: bool) -> tuple[ActivationCache, bool]:
    """The cache to write into and whether we opened it (and so must close it)."""
    if isinstance(cache, ActivationCache):
        if cache.mode != "a":
            raise ValueError(
                f"cache {str(cache.path)!r} is open read-only; pass a path or ActivationCache(..., mode='a')"
            )
        return cache, False
    if not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache must be a path or an ActivationCache, got {type(cache).__name__}")
    return ActivationCache(cache, mode="a", overwrite=overwrite), True


def _contiguous(rows: np.ndarray) -> bool:
    return bool(rows.size) and int(rows[-1]) - int(rows[0]) + 1 == rows.size


def _rows_index(rows: np.ndarray) -> slice | np.ndarray:
    """Row selection for sorted unique rows: a slice if contiguous, else the index array."""
    rows = np.asarray(rows, dtype=np.int64)
    return slice(int(rows[0]), int(rows[-1]) + 1) if _contiguous(rows) else rows


class Recorder:
    """Buffers one batch of pooled values per layer and writes completed batches to the cache.

    Per batch: :meth:`begin` with the batch's dataset indices, then :meth:`activation` / :meth:`relevance` from
    the hooks, then :meth:`end`, which keeps the batch in memory. :meth:`flush` (every ``flush_interval``
    seconds, when 64 MiB are buffered, and at :meth:`close`) writes the buffered rows in large blocks, flushes
    the file and only then marks the rows complete.

    A module called several times per forward pass (torchvision's BasicBlock applies one ``relu`` twice)
    reports several outputs per batch: the row holds the output of its **last** call, and the relevance that
    reaches that output, which is the **first** relevance its backward hook sees (the last call's output is the
    one closest to the model output). Both equal what CRP's ``CondAttribution(record_layer=...)`` returns for
    the module. CRP's own ActMax/RelMax see every call.
    """

    def __init__(
        self,
        cache: ActivationCache,
        layer_map: Mapping[str, Any],
        poolings: Mapping[str, Pooling],
        record_relevance: bool,
        meta: Mapping[str, Mapping[str, Any]],
        flush_interval: float,
        layouts: Mapping[str, str] | None = None,
        declared: Mapping[str, bool] | None = None,
    ) -> None:
        self.cache = cache
        # undeclared layers are channels; their 3-D outputs are refused (never pooled over a guessed axis)
        self.layouts = {name: "channels" for name in layer_map} | dict(layouts or {})
        self.declared = {name: False for name in layer_map} | dict(declared or {})
        self.layer_map = dict(layer_map)
        self.poolings = dict(poolings)
        self.record_relevance = record_relevance
        self.meta = meta
        self.flush_interval = float(flush_interval)
        self.start = cache.sample_range[0]
        self._buffer: list[tuple[np.ndarray, dict, dict]] = []
        self._buffered_bytes = 0
        self.max_buffer_bytes = 64 << 20
        self._last_flush = time.monotonic()
        self._batch: dict[str, Any] | None = None
        self.n_skipped = 0
        self._layers_added = False

    # -- per batch -----------------------------------------------------------------------------------------

    def begin(self, samples: np.ndarray) -> None:
        """Start a batch of the given dataset indices (an unfinished previous batch is dropped)."""
        self._batch = {"samples": np.asarray(samples), "act": {}, "rel": {}, "indices": None, "seen": None}

    def _unique_rows(self, data_indices: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """The sorted unique dataset indices of a hook call and, unless they are ``data_indices`` itself (sorted,
        each once), the position of each one's first occurrence. Every layer of a batch reports the same
        indices: the same object, or equal to the previous call's, is not sorted again."""
        seen = self._batch["seen"]
        if seen is not None and seen[0] is data_indices:  # the same object: the hooks pass one array per batch
            return seen[2], seen[3]
        given, data_indices = data_indices, np.asarray(data_indices)
        if seen is not None and np.array_equal(seen[1], data_indices):
            return seen[2], seen[3]
        if data_indices.ndim == 1 and (data_indices.size < 2 or bool((np.diff(data_indices) > 0).all())):
            unique, first = data_indices.copy(), None
        else:
            unique, first = np.unique(data_indices, return_index=True)
        self._batch["seen"] = (given, data_indices.copy(), unique, first)
        return unique, first

    def activation(self, layer: str, output: torch.Tensor, data_indices: np.ndarray) -> None:
        """A layer's output for the samples ``data_indices`` (repeated for samples with several targets)."""
        if self._batch is None:
            return
        if torch.is_grad_enabled():  # inside CRP's pass; the hooks of record_activations run without gradients
            with torch.no_grad():
                self._activation(layer, output, data_indices)
        else:
            self._activation(layer, output, data_indices)

    def _activation(self, layer: str, output: torch.Tensor, data_indices: np.ndarray) -> None:
        unique, first = self._unique_rows(data_indices)
        if first is not None:
            # several targets per sample: CRP repeats the sample, its activation is stored once
            output = output[torch.from_numpy(first).to(output.device)]
        check_output_layout(layer, output, self.layouts[layer], self.declared[layer])
        self._store("act", layer, unique, pool_units(output, self.layouts[layer], self.poolings[layer]),
                    keep="last")

    @torch.no_grad()
    def relevance(self, layer: str, relevance: torch.Tensor, data_indices: np.ndarray) -> None:
        """The relevance at a layer's output, per concept summed over the sample's targets."""
        if self._batch is None or not self.record_relevance or layer in self._batch["rel"]:
            return  # a module called several times: its first relevance belongs to its last output
        per_row = self.layer_map[layer].attribute(relevance, layer_name=layer, abs_norm=False)
        unique, first = self._unique_rows(data_indices)
        if first is not None or unique.size != per_row.shape[0]:
            data_indices = np.asarray(data_indices)
            unique, inverse = np.unique(data_indices, return_inverse=True)
            # several targets per sample (or rows out of order): sum the rows of each sample
            summed = torch.zeros((unique.size, per_row.shape[1]), dtype=per_row.dtype, device=per_row.device)
            per_row = summed.index_add_(0, torch.from_numpy(inverse.reshape(-1)).to(per_row.device), per_row)
        self._store("rel", layer, unique, per_row, keep="first")

    def _store(self, kind: str, layer: str, unique: np.ndarray, values: torch.Tensor, keep: str) -> None:
        batch = self._batch
        if batch["indices"] is None:
            batch["indices"] = unique
        elif batch["indices"] is not unique and not np.array_equal(batch["indices"], unique):
            raise RuntimeError(f"layer {layer!r} saw other samples than the other layers in this batch")
        if keep == "last" or layer not in batch[kind]:
            # a copy: an output that is already [B, C] is the module's own tensor, which an in-place operation
            # after the hook (VGG's ReLU(inplace=True) after a Linear) would change
            batch[kind][layer] = values.detach().to("cpu", torch.float32, copy=True)

    def end(self) -> None:
        """Keep the current batch for writing (all layers must have reported); no-op without a batch."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        if batch["indices"] is None:  # no sample of the batch had a target: CRP skipped it
            self.n_skipped += int(batch["samples"].size)
            return
        missing = [name for name in self.layer_map if name not in batch["act"]]
        if self.record_relevance:
            missing += [f"{name} (relevance)" for name in self.layer_map if name not in batch["rel"]]
        if missing:
            raise RuntimeError(
                f"no data from layers {missing} in this batch: are they on the path from the input to the output? "
                "(for a layer without relevance use record_relevance=False)"
            )
        indices = batch["indices"]
        if not np.array_equal(batch["samples"], indices):
            self.n_skipped += int(np.setdiff1d(batch["samples"], indices).size)
        if not self._layers_added:  # once: the layers stay in the cache
            for name in self.layer_map:
                if name not in self.cache:
                    channels = batch["act"][name].shape[1]
                    self.cache.add_layer(name, channels, relevances=self.record_relevance, **self.meta[name])
            self._layers_added = True
        rows = np.asarray(indices, dtype=np.int64) - self.start
        self._buffer.append((rows, batch["act"], batch["rel"]))
        self._buffered_bytes += sum(t.numel() * 4 for part in (batch["act"], batch["rel"]) for t in part.values())
        if time.monotonic() - self._last_flush >= self.flush_interval or self._buffered_bytes >= self.max_buffer_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered batches (runs of adjacent rows as one block), flush, and mark them complete."""
        buffer, self._buffer, self._buffered_bytes = self._buffer, [], 0
        if buffer:
            # merge batches whose rows continue each other into blocks (few, large HDF5 writes)
            blocks: list[list[tuple[np.ndarray, dict, dict]]] = []
            for entry in buffer:
                previous = blocks[-1][-1][0] if blocks else None
                if previous is not None and _contiguous(previous) and _contiguous(entry[0]) \
                        and previous[-1] + 1 == entry[0][0]:
                    blocks[-1].append(entry)
                else:
                    blocks.append([entry])
            for block in blocks:
                selection = _rows_index(np.concatenate([entry[0] for entry in block]))
                for name in self.layer_map:
                    act = torch.cat([entry[1][name] for entry in block])
                    rel = torch.cat([entry[2][name] for entry in block]) if self.record_relevance else None
                    self.cache.write(name, selection, act, rel)
            done = np.unique(np.concatenate([entry[0] for entry in buffer]))
            self.cache.mark_complete(_rows_index(done), list(self.layer_map))
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Mark everything kept so far complete (the current unfinished batch is dropped)."""
        self._batch = None
        self.flush()
        if self.n_skipped:
            logger.warning(
                "%d samples had no target after multitarget_to_single; CRP never passed them through the model, "
                "so their rows of %s stay incomplete", self.n_skipped, self.cache.path,
            )
