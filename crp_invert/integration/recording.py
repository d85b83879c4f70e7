"""Record every sample's pooled concept activations (and relevances) into an activation cache.

The cache is a :class:`~crp_invert.cache.ActivationCache`.

Two ways:

:class:`InvertFeatureVisualization`
    A drop-in subclass of CRP's ``FeatureVisualization``: the same ``run`` that computes CRP's ActMax/RelMax
    reference samples also writes, for every sample and every layer of ``layer_map``, the pooled activation
    and the concept relevance of each concept. No extra forward or backward pass; CRP's own results are
    unchanged.
:func:`record_activations`
    Plain forward hooks over a DataLoader, for users who only want labels.

What is recorded
----------------
Activation
    The output of the layer as CRP sees it (after the composite's canonizers, e.g. a BatchNorm merged into the
    preceding convolution by ``SequentialMergeBatchNorm``), pooled per concept: for ``ChannelConcept`` the
    spatial ``"mean"`` (default, as in the INVERT paper), ``"max"`` or ``"sum"`` of each channel; outputs
    that are already [B, C] (linear layers) are stored as they are. A callable ``pooling(output) -> [B, C]``
    is used for other concept classes.
Relevance
    The relevance arriving at the layer output in CRP's backward pass, w.r.t. the target CRP uses for the
    sample (relevance initialised with the target logit, ``{"y": [target]}``), reduced per concept by the
    concept itself: ``concept.attribute(relevance, abs_norm=False)``, which for ``ChannelConcept`` is the sum
    over the spatial dimensions. If ``multitarget_to_single`` yields several targets for a sample, the row
    holds the *sum* over its targets (for the linear rules of LRP composites this is the relevance of the sum
    of the target logits). The activation of such a sample is stored once.

Samples for which ``multitarget_to_single`` yields no target are never passed through the model by CRP, so
their rows stay incomplete (a warning says how many).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Sequence, Union

import numpy as np
import torch

from ..storage.cache import ActivationCache
from ..storage.fingerprint import fingerprint, model_hash

__all__ = ["InvertFeatureVisualization", "record_activations", "pool", "load_stat_targets"]  # noqa: F822

logger = logging.getLogger(__name__)

Pooling = Union[str, Callable[[torch.Tensor], torch.Tensor]]
POOLINGS = ("mean", "max", "sum")


# ------------------------------------------------------------------------------------------------------------
# functional core
# ------------------------------------------------------------------------------------------------------------


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


def _pooling_name(pooling: Pooling) -> str:
    if callable(pooling):
        name = getattr(pooling, "__qualname__", repr(pooling))
        return f"callable:{getattr(pooling, '__module__', '?')}.{name}"
    return str(pooling)


def _layer_poolings(
    layer_map: Mapping[str, Any], pooling: Pooling | Mapping[str, Pooling]
) -> dict[str, Pooling]:
    """Per-layer pooling, checked against the layer's CRP concept class."""
    from crp.concepts import ChannelConcept

    result = {}
    for name, concept in layer_map.items():
        chosen = pooling.get(name, "mean") if isinstance(pooling, Mapping) else pooling
        if not callable(chosen):
            if chosen not in POOLINGS:
                raise ValueError(
                    f"pooling of layer {name!r} must be one of {POOLINGS} or a callable, got {chosen!r}"
                )
            if concept is not None and not isinstance(concept, ChannelConcept):
                raise TypeError(
                    f"layer {name!r} uses concept class {type(concept).__name__}; pooling {chosen!r} is "
                    "defined for "
                    "ChannelConcept only, pass a callable pooling(output) -> [B, C] for this layer"
                )
        result[name] = chosen
    if isinstance(pooling, Mapping):
        unknown = sorted(set(pooling) - set(layer_map))
        if unknown:
            raise KeyError(
                f"pooling given for layers not in the layer map: {unknown}; layers: {list(layer_map)}"
            )
    return result


def _check_layers(model: torch.nn.Module, names: Iterable[str]) -> None:
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        available = [name for name in modules if name]
        shown = available[:50] + (["..."] if len(available) > 50 else [])
        raise KeyError(f"layers {missing} are not modules of the model; available: {shown}")


def _concept_name(concept: Any) -> str:
    return type(concept).__name__ if concept is not None else "ChannelConcept"


def _composite_name(composite: Any) -> str:
    if composite is None:
        return "none"
    canonizers = [type(c).__name__ for c in getattr(composite, "canonizers", None) or []]
    return f"{type(composite).__name__}(canonizers=[{', '.join(canonizers)}])"


def _contiguous(rows: np.ndarray) -> bool:
    return bool(rows.size) and int(rows[-1]) - int(rows[0]) + 1 == rows.size


def _rows_index(sample_indices: np.ndarray, start: int) -> slice | np.ndarray:
    """Row selection for sorted unique dataset indices: a slice if contiguous, else an index array."""
    rows = np.asarray(sample_indices, dtype=np.int64) - start
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


class _Recorder:
    """Buffers one batch of pooled values per layer and writes completed batches to the cache.

    Data flow per batch: ``begin(samples)``, then ``activation``/``relevance`` calls from the hooks, then
    ``end()`` which keeps the batch in memory. ``flush()`` (every ``flush_interval`` seconds, when 64 MiB are
    buffered, and at ``close``) writes the buffered rows in large blocks, flushes the file and only then marks
    the rows complete.
    """

    def __init__(
        self,
        cache: ActivationCache,
        layer_map: Mapping[str, Any],
        poolings: Mapping[str, Pooling],
        record_relevance: bool,
        meta: Mapping[str, Mapping[str, Any]],
        flush_interval: float,
    ) -> None:
        self.cache = cache
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
        self.own_cache = False

    # -- per batch -----------------------------------------------------------------------------------------

    def begin(self, samples: np.ndarray) -> None:
        self._batch = {"samples": np.asarray(samples), "act": {}, "rel": {}, "indices": None}

    @torch.no_grad()
    def activation(self, layer: str, output: torch.Tensor, data_indices: np.ndarray) -> None:
        if self._batch is None:
            return
        data_indices = np.asarray(data_indices)
        unique, first = np.unique(data_indices, return_index=True)
        if unique.size != data_indices.size or not np.array_equal(unique, data_indices):
            # several targets per sample: CRP repeats the sample, its activation is stored once
            output = output[torch.from_numpy(first).to(output.device)]
        self._store("act", layer, unique, pool(output, self.poolings[layer]))

    @torch.no_grad()
    def relevance(self, layer: str, relevance: torch.Tensor, data_indices: np.ndarray) -> None:
        if self._batch is None or not self.record_relevance:
            return
        from crp.concepts import ChannelConcept

        concept = self.layer_map[layer] if self.layer_map[layer] is not None else ChannelConcept()
        per_row = concept.attribute(relevance, layer_name=layer, abs_norm=False)
        data_indices = np.asarray(data_indices)
        unique, inverse = np.unique(data_indices, return_inverse=True)
        if unique.size != per_row.shape[0] or not np.array_equal(unique, data_indices):
            # several targets per sample (or rows out of order): sum the rows of each sample
            summed = torch.zeros((unique.size, per_row.shape[1]), dtype=per_row.dtype, device=per_row.device)
            per_row = summed.index_add_(0, torch.from_numpy(inverse.reshape(-1)).to(per_row.device), per_row)
        self._store("rel", layer, unique, per_row)

    def _store(self, kind: str, layer: str, unique: np.ndarray, values: torch.Tensor) -> None:
        batch = self._batch
        if layer in batch[kind]:
            raise RuntimeError(
                f"layer {layer!r} produced its {'output' if kind == 'act' else 'relevance'} twice in one "
                "batch (a "
                "module called more than once per forward pass cannot be recorded)"
            )
        if batch["indices"] is None:
            batch["indices"] = unique
        elif not np.array_equal(batch["indices"], unique):
            raise RuntimeError(f"layer {layer!r} saw other samples than the other layers in this batch")
        batch[kind][layer] = values.detach().to("cpu", torch.float32)

    def end(self) -> None:
        """Write the buffered batch (all layers must have reported)."""
        batch, self._batch = self._batch, None
        if batch is None or batch["indices"] is None:
            return
        missing = [name for name in self.layer_map if name not in batch["act"]]
        if self.record_relevance:
            missing += [f"{name} (relevance)" for name in self.layer_map if name not in batch["rel"]]
        if missing:
            raise RuntimeError(
                f"no data from layers {missing} in this batch: are they on the path from the input to the "
                "output? "
                "(for a layer without relevance use record_relevance=False)"
            )
        indices = batch["indices"]
        n_skipped = int(np.setdiff1d(batch["samples"], indices).size)
        if n_skipped:
            self.n_skipped += n_skipped
        for name in self.layer_map:
            if name not in self.cache:
                channels = batch["act"][name].shape[1]
                self.cache.add_layer(name, channels, relevances=self.record_relevance, **self.meta[name])
        rows = np.asarray(indices, dtype=np.int64) - self.start
        self._buffer.append((rows, batch["act"], batch["rel"]))
        self._buffered_bytes += sum(t.numel() * 4 for t in batch["act"].values())
        self._buffered_bytes += sum(t.numel() * 4 for t in batch["rel"].values())
        if (
            time.monotonic() - self._last_flush >= self.flush_interval
            or self._buffered_bytes >= self.max_buffer_bytes
        ):
            self.flush()

    def flush(self) -> None:
        """Write the buffered batches (runs of adjacent rows as one block), flush, and mark them complete."""
        buffer, self._buffer, self._buffered_bytes = self._buffer, [], 0
        if buffer:
            # merge batches whose rows continue each other into blocks (few, large HDF5 writes)
            blocks: list[list[tuple[np.ndarray, dict, dict]]] = []
            for entry in buffer:
                if (
                    blocks
                    and _contiguous(blocks[-1][-1][0])
                    and _contiguous(entry[0])
                    and blocks[-1][-1][0][-1] + 1 == entry[0][0]
                ):
                    blocks[-1].append(entry)
                else:
                    blocks.append([entry])
            for block in blocks:
                rows = np.concatenate([entry[0] for entry in block])
                selection = _rows_index(rows, 0)
                for name in self.layer_map:
                    act = torch.cat([entry[1][name] for entry in block])
                    rel = torch.cat([entry[2][name] for entry in block]) if self.record_relevance else None
                    self.cache.write(name, selection, act, rel)
            done = np.unique(np.concatenate([entry[0] for entry in buffer]))
            self.cache.mark_complete(_rows_index(done, 0), list(self.layer_map))
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Mark everything written so far complete (the current unfinished batch is dropped)."""
        self._batch = None
        self.flush()
        if self.n_skipped:
            logger.warning(
                "%d samples had no target after multitarget_to_single; CRP never passed them through the "
                "model, "
                "so their rows of %s stay incomplete",
                self.n_skipped,
                self.cache.path,
            )


def _open_cache(cache: ActivationCache | str | os.PathLike, overwrite: bool) -> tuple[ActivationCache, bool]:
    if isinstance(cache, ActivationCache):
        if cache.mode != "a":
            raise ValueError(
                f"cache {str(cache.path)!r} is open read-only; pass a path or ActivationCache(..., mode='a')"
            )
        return cache, False
    if not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache must be a path or an ActivationCache, got {type(cache).__name__}")
    return ActivationCache(cache, mode="a", overwrite=overwrite), True


# ------------------------------------------------------------------------------------------------------------
# CRP FeatureVisualization
# ------------------------------------------------------------------------------------------------------------


def load_stat_targets(path_folder: str | os.PathLike) -> np.ndarray:
    """Targets of a CRP statistics folder, as ``crp.helper.load_stat_targets`` but without ``np.int``."""
    return np.load(Path(path_folder) / "targets.npy").astype(int)


def _crp_feature_visualization():
    from crp.visualization import FeatureVisualization

    return FeatureVisualization


def _make_class():
    # CRP's visualization module imports torchvision and matplotlib (seconds): pay only when the class is used
    from crp.helper import load_statistics
    from crp.hooks import FeatVisHook
    from tqdm import tqdm
    from zennit.composites import NameMapComposite

    FeatureVisualization = _crp_feature_visualization()

    class InvertFeatureVisualization(FeatureVisualization):
        """CRP ``FeatureVisualization`` that also records every sample's pooled activations and relevances.

        Parameters
        ----------
        attribution, dataset, layer_map, preprocess_fn, max_target, abs_norm, path, device
            As for ``crp.visualization.FeatureVisualization``.
        cache : str, os.PathLike or ActivationCache
            The activation cache to write (HDF5). A path is opened at each ``run`` and closed afterwards.
        pooling : {"mean", "max", "sum"}, callable, or dict of layer name to those
            Pooling of activations (see :func:`pool`); default ``"mean"``.
        record_relevance : bool
            Also record per-concept relevances (``concept.attribute(relevance, abs_norm=False)``).
        sample_range : (int, int), optional
            Dataset samples the cache has rows for; default ``(0, len(dataset))``. Shards use a part of it.
        overwrite : bool
            Discard an existing cache file at the first ``run``; otherwise an existing cache is continued
            (and refused if it was made by another model, layer set, pooling or dataset length).
        flush_interval : float
            Seconds between flushes to disk; rows become ``complete`` at a flush. 0 flushes every batch.
        image_cache : crp.cache.Cache, optional
            CRP's cache of reference images (called ``cache`` in CRP's FeatureVisualization).

        Notes
        -----
        ``run_distributed`` follows CRP 0.6.0's loop line by line (so that ActMax/RelMax results are
        byte-identical), adds the recording and removes the composite and CRP's hooks also when the run is
        interrupted. Use :meth:`resume` to finish an interrupted run: it records only the missing rows and
        merges CRP's checkpoint files of the interrupted run, so that both the cache and CRP's results equal
        an uninterrupted run (same ``batch_size`` and ``checkpoint``).
        """

        def __init__(
            self,
            attribution,
            dataset,
            layer_map: Dict[str, Any],
            preprocess_fn: Callable = None,
            max_target: str = "sum",
            abs_norm: bool = True,
            path: str = "FeatureVisualization",
            device=None,
            cache: ActivationCache | str | os.PathLike | None = None,
            pooling: Pooling | Mapping[str, Pooling] = "mean",
            record_relevance: bool = True,
            sample_range: tuple[int, int] | None = None,
            overwrite: bool = False,
            flush_interval: float = 2.0,
            image_cache=None,
        ) -> None:
            if cache is None:
                raise TypeError(
                    "InvertFeatureVisualization needs cache= (a path of the HDF5 activation cache)"
                )
            if not isinstance(cache, (str, os.PathLike, ActivationCache)):
                raise TypeError(
                    f"cache must be a path or an ActivationCache, got {type(cache).__name__} (CRP's "
                    "image cache is passed as image_cache=)"
                )
            self.poolings = _layer_poolings(layer_map, pooling)
            _check_layers(attribution.model, layer_map)
            super().__init__(
                attribution,
                dataset,
                layer_map,
                preprocess_fn,
                max_target,
                abs_norm,
                path,
                device,
                image_cache,
            )
            self.activation_cache = cache
            self.record_relevance = bool(record_relevance)
            self.sample_range = (
                (0, len(dataset)) if sample_range is None else tuple(int(v) for v in sample_range)
            )
            self.overwrite = bool(overwrite)
            self.flush_interval = float(flush_interval)
            self._recorder: _Recorder | None = None

        # -- recording hooks called by CRP's FeatVisHook ---------------------------------------------------

        @torch.no_grad()
        def analyze_activation(self, act, layer_name, concept, data_indices, targets):
            if self._recorder is not None:
                self._recorder.activation(layer_name, act, data_indices)
            return super().analyze_activation(act, layer_name, concept, data_indices, targets)

        @torch.no_grad()
        def analyze_relevance(self, rel, layer_name, concept, data_indices, targets):
            if self._recorder is not None:
                self._recorder.relevance(layer_name, rel, data_indices)
            return super().analyze_relevance(rel, layer_name, concept, data_indices, targets)

        # -- the run -----------------------------------------------------------------------------------------

        def _start_recording(self, composite, data_start, data_end) -> _Recorder:
            start, end = self.sample_range
            if not start <= data_start < data_end <= end:
                raise ValueError(
                    f"run range [{data_start}, {data_end}) is not inside the cache's sample range "
                    f"[{start}, {end}) (set sample_range=)"
                )
            cache, own = _open_cache(self.activation_cache, self.overwrite)
            try:
                cache.initialize(self.sample_range, dataset_length=len(self.dataset))
                digest = model_hash(self.attribution.model)
                composite_name = _composite_name(composite)
                relevance = (
                    "concept.attribute(abs_norm=False), sum over targets" if self.record_relevance else ""
                )
                meta = {}
                for name, concept in self.layer_map.items():
                    pooling_name = _pooling_name(self.poolings[name])
                    meta[name] = {
                        "pooling": pooling_name,
                        "concept": _concept_name(concept),
                        "model_hash": digest,
                        "relevance": relevance,
                        "composite": composite_name,
                        "fingerprint": fingerprint(
                            digest,
                            name,
                            len(self.dataset),
                            pooling_name,
                            _concept_name(concept),
                            composite_name,
                            relevance,
                        ),
                    }
                    if name in cache:  # refuse early, before any work
                        cache.add_layer(
                            name, cache.n_channels(name), relevances=self.record_relevance, **meta[name]
                        )
            except BaseException:
                if own:
                    cache.close()
                raise
            self.overwrite = False  # overwrite only once: later runs and resume continue the file
            recorder = _Recorder(
                cache, self.layer_map, self.poolings, self.record_relevance, meta, self.flush_interval
            )
            recorder.own_cache = own
            return recorder

        def _stop_recording(self) -> None:
            recorder, self._recorder = self._recorder, None
            if recorder is None:
                return
            try:
                recorder.close()
            finally:
                if recorder.own_cache:
                    recorder.cache.close()
                else:
                    recorder.cache.flush()

        def run_distributed(
            self, composite, data_start, data_end, batch_size=16, checkpoint=500, on_device=None
        ):
            """CRP's ``run_distributed`` (zennit-crp 0.6.0) plus recording; hooks are removed on error too."""
            self._recorder = self._start_recording(composite, data_start, data_end)
            # an interrupted run leaves CRP's unsaved in-memory results behind; a fresh CRP object has none
            for result in (self.RelMax, self.ActMax, self.RelStats, self.ActStats):
                if result.d_c_sorted:
                    result.d_c_sorted, result.rel_c_sorted, result.rf_c_sorted = {}, {}, {}
            # --- from here on: crp.visualization.FeatureVisualization.run_distributed, 0.6.0 ----------------
            self.saved_checkpoints = {"r_max": [], "a_max": [], "r_stats": [], "a_stats": []}
            last_checkpoint = 0

            n_samples = data_end - data_start
            samples = np.arange(start=data_start, stop=data_end)

            if n_samples > batch_size:
                batches = math.ceil(n_samples / batch_size)
            else:
                batches = 1
                batch_size = n_samples

            name_map, dict_inputs = [], {}
            for l_name, concept in self.layer_map.items():
                hook = FeatVisHook(self, concept, l_name, dict_inputs, on_device)
                name_map.append(([l_name], hook))
            fv_composite = NameMapComposite(name_map)

            pbar = None
            try:
                if composite:
                    composite.register(self.attribution.model)
                fv_composite.register(self.attribution.model)

                pbar = tqdm(total=batches, dynamic_ncols=True)

                for b in range(batches):
                    pbar.update(1)

                    samples_batch = samples[b * batch_size : (b + 1) * batch_size]
                    data_batch, targets_samples = self.get_data_concurrently(
                        samples_batch, preprocessing=True
                    )

                    targets_samples = np.array(targets_samples)  # numpy operation needed

                    data_broadcast, targets, sample_indices = [], [], []
                    try:
                        for i_t, target in enumerate(targets_samples):
                            single_targets = self.multitarget_to_single(target)
                            for st in single_targets:
                                targets.append(st)
                                data_broadcast.append(data_batch[i_t])
                                sample_indices.append(samples_batch[i_t])
                        if len(data_broadcast) == 0:
                            self._recorder.n_skipped += len(samples_batch)
                            continue
                        data_broadcast = torch.stack(data_broadcast, dim=0)
                        sample_indices = np.array(sample_indices)
                        targets = np.array(targets)

                    except NotImplementedError:
                        data_broadcast, targets, sample_indices = data_batch, targets_samples, samples_batch

                    conditions = [{self.attribution.MODEL_OUTPUT_NAME: [t]} for t in targets]
                    dict_inputs["sample_indices"] = sample_indices
                    dict_inputs["targets"] = targets

                    self._recorder.begin(samples_batch)
                    self.attribution(data_broadcast, conditions, None, exclude_parallel=False)
                    self._recorder.end()

                    if b % checkpoint == checkpoint - 1:
                        self._save_results((last_checkpoint, sample_indices[-1] + 1))
                        last_checkpoint = sample_indices[-1] + 1

                self._save_results((last_checkpoint, sample_indices[-1] + 1))
            finally:
                if composite:
                    composite.remove()
                fv_composite.remove()
                if pbar is not None:
                    pbar.close()
                self._stop_recording()

            return self.saved_checkpoints

        # -- resuming ----------------------------------------------------------------------------------------

        def _leftover_checkpoints(
            self, data_start: int
        ) -> list[tuple[tuple[int, int], dict[str, list[str]]]]:
            """CRP checkpoint files left by an interrupted run, as a chain of ranges from ``data_start``.

            Returns a list of ``((a, b), {kind: [path prefixes]})`` in chronological order, where kind is
            one of CRP's ``r_max``, ``a_max``, ``r_stats``, ``a_stats``. CRP names the first checkpoint of a
            run ``(0, b)`` whatever the run's start, which is accepted as starting at ``data_start``.
            """
            folders = {
                "r_max": (self.RelMax.PATH, False),
                "a_max": (self.ActMax.PATH, False),
                "r_stats": (self.RelStats.PATH, True),
                "a_stats": (self.ActStats.PATH, True),
            }
            found: dict[str, dict[tuple[int, int], list[tuple[Any, str]]]] = {key: {} for key in folders}
            for key, (folder, per_target) in folders.items():
                for l_name in self.layer_map:
                    if per_target:
                        directory = Path(folder) / l_name
                        pattern = re.compile(r"^(?P<t>[^_]+)_(?P<a>[0-9]+)_(?P<b>[0-9]+)_data\.npy$")
                    else:
                        directory = Path(folder)
                        pattern = re.compile(
                            "^" + re.escape(l_name) + r"_(?P<a>[0-9]+)_(?P<b>[0-9]+)_data\.npy$"
                        )
                    if not directory.is_dir():
                        continue
                    for file in directory.iterdir():
                        match = pattern.match(file.name)
                        if not match:
                            continue
                        span = (int(match["a"]), int(match["b"]))
                        target = match.groupdict().get("t")
                        order = (
                            int(target) if target and target.lstrip("-").isdigit() else str(target),
                            l_name,
                        )
                        prefix = str(directory / file.name[: -len("data.npy")])
                        found[key].setdefault(span, []).append((order, prefix))
            self._found_checkpoints = found
            chain = []
            end = data_start
            while True:
                candidates = [
                    span
                    for span in found["a_max"]
                    if span in found["r_max"]
                    and (span[0] == end or (not chain and span[0] == 0))
                    and span[1] > end
                    and self._checkpoint_complete(found, span)
                ]
                if not candidates:
                    break
                span = min(candidates, key=lambda s: s[1])
                paths = {}
                for key in folders:
                    items = found[key].get(span, [])
                    try:
                        items = sorted(items, key=lambda item: item[0])
                    except TypeError:  # mixed target types
                        items = sorted(items, key=lambda item: str(item[0]))
                    paths[key] = [prefix for _, prefix in items]
                chain.append(((max(span[0], data_start), span[1]), paths))
                end = span[1]
            return chain

        def _checkpoint_complete(self, found, span) -> bool:
            """Whether CRP finished saving the checkpoint ``span`` (a process killed while CRP saved leaves
            missing or truncated files): every layer has its ActMax/RelMax files, every target of the
            statistics has the files of every layer (activation statistics see a subset of the targets of
            multi-target samples), and every file reads."""
            layers = set(self.layer_map)
            for key in ("r_max", "a_max"):
                if {order[1] for order, _ in found[key].get(span, [])} != layers:
                    return False
            pairs = [{order for order, _ in found[key].get(span, [])} for key in ("r_stats", "a_stats")]
            for kind in pairs:
                targets = {target for target, _ in kind}
                if not kind or kind != {(target, layer) for target in targets for layer in layers}:
                    return False
            if not pairs[1] <= pairs[0]:
                return False
            for key in found:
                for _, prefix in found[key].get(span, []):
                    for suffix in ("data.npy", "rf.npy", "rel.npy"):
                        try:
                            np.load(prefix + suffix, mmap_mode="r")
                        except (OSError, ValueError, EOFError):
                            return False
            return True

        def resume(
            self,
            composite,
            data_start: int | None = None,
            data_end: int | None = None,
            batch_size: int = 32,
            checkpoint: int = 500,
            on_device=None,
            collect: bool = True,
        ) -> Dict[str, list]:
            """Finish an interrupted ``run(composite, data_start, data_end, batch_size, checkpoint)``.

            Keeps the CRP checkpoint files the interrupted run left on disk (up to the first row the cache
            lacks), runs CRP and the recording from there to ``data_end``, and collects CRP's results from
            the old and new checkpoints. With the same ``batch_size`` and ``checkpoint`` as the interrupted
            run, the cache and CRP's files equal those of an uninterrupted run (in our tests byte for byte;
            CRP orders ``targets.npy`` by the order of its checkpoint files, which resume reproduces for
            targets that are integers).

            Parameters
            ----------
            composite, data_start, data_end, batch_size, checkpoint, on_device
                As for ``run`` (default range: the cache's ``sample_range``).
            collect : bool
                Collect CRP's results (as ``run`` does). False returns the checkpoint lists instead, as
                ``run_distributed`` does, e.g. to combine those of several shards.

            Returns
            -------
            dict
                CRP's saved files, as ``run`` returns them (or its checkpoints, with ``collect=False``).
            """
            start, end = self.sample_range
            data_start = start if data_start is None else int(data_start)
            data_end = end if data_end is None else int(data_end)
            first_missing = data_start
            cache = self.activation_cache
            if not self.overwrite and (isinstance(cache, ActivationCache) or Path(cache).exists()):
                opened = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
                try:
                    if opened.initialized and all(name in opened for name in self.layer_map):
                        missing = [
                            (max(a, data_start), min(b, data_end))
                            for a, b in opened.missing_ranges()
                            if b > data_start and a < data_end
                        ]
                        first_missing = missing[0][0] if missing else data_end
                finally:
                    if opened is not cache:
                        opened.close()
            kept = [
                (span, paths)
                for span, paths in self._leftover_checkpoints(data_start)
                if span[1] <= first_missing
            ]
            restart = kept[-1][0][1] if kept else data_start
            old = {
                key: [p for _, paths in kept for p in paths[key]]
                for key in ("r_max", "a_max", "r_stats", "a_stats")
            }
            if first_missing >= data_end and not kept:
                logger.info(
                    "nothing to resume in [%d, %d): the cache is complete and no CRP checkpoints are left",
                    data_start,
                    data_end,
                )
                return {key: [] for key in old}
            # checkpoint files of this range after `restart` (unfinished or not kept) are made again:
            # remove them
            for spans in getattr(self, "_found_checkpoints", {}).values():
                for span, items in spans.items():
                    if restart < span[1] <= data_end:
                        for _, prefix in items:
                            for suffix in ("data.npy", "rf.npy", "rel.npy"):
                                Path(prefix + suffix).unlink(missing_ok=True)
            if restart >= data_end:
                new = {key: [] for key in old}
            else:
                logger.info(
                    "resuming [%d, %d): cache complete up to %d, CRP checkpoints kept up to %d",
                    restart,
                    data_end,
                    first_missing,
                    restart,
                )
                new = self.run_distributed(composite, restart, data_end, batch_size, checkpoint, on_device)
            merged = {key: old[key] + new[key] for key in old}
            return self.collect_results(merged) if collect else merged

        # -- numpy-2 compatible statistics -------------------------------------------------------------------

        def compute_stats(
            self, concept_id, layer_name: str, mode="relevance", top_N=5, mean_N=10, norm=False
        ):
            """CRP's ``compute_stats`` with a ``load_stat_targets`` that works with numpy >= 1.24."""
            if mode == "relevance":
                path = self.RelStats.PATH
            elif mode == "activation":
                path = self.ActStats.PATH
            else:
                raise ValueError("`mode` must be `relevance` or `activation`")

            targets = load_stat_targets(path)

            rel_target = torch.zeros(len(targets))
            for i, t in enumerate(targets):
                _, rel_c_sorted, _ = load_statistics(path, layer_name, t)
                rel_target[i] = float(rel_c_sorted[:mean_N, concept_id].mean())

            args = torch.argsort(rel_target, descending=True)[:top_N]

            sorted_t = targets[args]
            sorted_val = rel_target[args]

            if norm:
                sorted_val = sorted_val / sorted_val[0]

            return sorted_t, sorted_val

    InvertFeatureVisualization.__module__ = __name__
    InvertFeatureVisualization.__qualname__ = "InvertFeatureVisualization"
    return InvertFeatureVisualization


_CLASS = None


def __getattr__(name: str):
    # InvertFeatureVisualization subclasses CRP's FeatureVisualization; it is built on first access so that
    # importing this module (e.g. for record_activations) does not import CRP's visualization stack
    global _CLASS
    if name == "InvertFeatureVisualization":
        if _CLASS is None:
            _CLASS = _make_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"InvertFeatureVisualization"})


# ------------------------------------------------------------------------------------------------------------
# plain forward hooks
# ------------------------------------------------------------------------------------------------------------


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
) -> ActivationCache:
    """Record pooled activations of ``layers`` for every sample of a DataLoader with plain forward hooks.

    Parameters
    ----------
    model : torch.nn.Module
        In the mode you want (usually ``model.eval()``); not changed.
    data_loader : iterable
        Yields input tensors [B, ...] or ``(input, target, ...)`` tuples, in dataset order (no shuffling):
        the k-th sample yielded fills row k.
    layers : sequence of str, or dict of layer name to CRP Concept
        Module names (as in ``model.named_modules()``).
    cache : str, os.PathLike or ActivationCache
        Where to write. An existing cache is continued: batches whose rows are all complete are skipped
        (no forward pass), so a rerun after an interruption finishes the file.
    pooling : {"mean", "max", "sum"}, callable, or dict of layer name to those
        See :func:`pool`.
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

    Returns
    -------
    ActivationCache
        The cache: ``cache`` itself if an ActivationCache was given, otherwise the file reopened read-only.
    """
    from tqdm.auto import tqdm

    layer_map = dict(layers) if isinstance(layers, Mapping) else {name: None for name in layers}
    if not layer_map:
        raise ValueError("layers must name at least one module")
    poolings = _layer_poolings(layer_map, pooling)
    _check_layers(model, layer_map)
    if n_samples is None:
        dataset = getattr(data_loader, "dataset", None)
        if dataset is None:
            raise TypeError("data_loader has no .dataset; pass n_samples=")
        n_samples = len(dataset)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    store, own = _open_cache(cache, overwrite)
    try:
        store.initialize((0, int(n_samples)))
        digest = model_hash(model)
        meta = {}
        for name, concept in layer_map.items():
            pooling_name = _pooling_name(poolings[name])
            meta[name] = {
                "pooling": pooling_name,
                "concept": _concept_name(concept),
                "model_hash": digest,
                "relevance": "",
                "composite": _composite_name(composite),
                "fingerprint": fingerprint(
                    digest, name, n_samples, pooling_name, _concept_name(concept), _composite_name(composite)
                ),
            }
            if name in store:
                store.add_layer(name, store.n_channels(name), **meta[name])
        done = (
            store.complete() if all(name in store for name in layer_map) else np.zeros(n_samples, dtype=bool)
        )
        recorder = _Recorder(store, layer_map, poolings, False, meta, flush_interval)
        modules = dict(model.named_modules())
        current: dict[str, np.ndarray] = {}

        def make_hook(name):
            def hook(module, inputs, output):
                recorder.activation(
                    name, output[0] if isinstance(output, tuple) else output, current["indices"]
                )

            return hook

        handles = [modules[name].register_forward_hook(make_hook(name)) for name in layer_map]
        context = composite.context(model) if composite is not None else None
        row = 0
        try:
            if context is not None:
                context.__enter__()
            with torch.no_grad():
                for batch in tqdm(data_loader, desc="recording", disable=not progress):
                    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                    if not isinstance(inputs, torch.Tensor):
                        raise TypeError(
                            f"batches must be tensors or (input, ...) tuples, got {type(inputs).__name__}"
                        )
                    size = inputs.shape[0]
                    if row + size > n_samples:
                        raise ValueError(f"data_loader yielded more than n_samples={n_samples} samples")
                    indices = np.arange(row, row + size)
                    row += size
                    if done[indices].all():
                        continue
                    current["indices"] = indices
                    recorder.begin(indices)
                    model(inputs.to(device))
                    recorder.end()
        finally:
            for handle in handles:
                handle.remove()
            if context is not None:
                context.__exit__(None, None, None)
            recorder.close()
        if row != n_samples:
            logger.warning(
                "data_loader yielded %d samples, the cache has %d rows; the rest stay incomplete",
                row,
                n_samples,
            )
    finally:
        if own:
            store.close()
    return ActivationCache(store.path) if own else store
