"""CRP's ``FeatureVisualization``, extended to record every sample's pooled activation and relevance of every
layer of ``layer_map`` into an activation cache during the same ``run``, and to resume an interrupted run.

Nothing of CRP's loop is copied: :class:`InvertFeatureVisualization` calls CRP's own ``run_distributed`` and
``collect_results`` and records in the methods CRP's loop calls:

``get_data_concurrently(indices, preprocessing=True)``
    a new batch begins (the previous one is complete);
``analyze_activation`` / ``analyze_relevance``
    called by CRP's forward and backward hooks with a layer's output and the relevance at it;
``_save_results(d_index)``
    a CRP checkpoint: the recorded rows are flushed, CRP's files are committed one checkpoint at a time
    (see :mod:`.checkpoints`).

What is recorded
----------------
Activation
    The output of the layer as CRP sees it (after the composite's canonizers, e.g. a BatchNorm merged into the
    preceding convolution by ``SequentialMergeBatchNorm``), pooled per concept: for ``ChannelConcept`` the
    spatial ``"mean"`` (default, as in the INVERT paper), ``"max"`` or ``"sum"`` of each channel; outputs that
    are already [B, C] (linear layers) are stored as they are. A callable ``pooling(output) -> [B, C]`` is used
    for other concept classes.
Relevance
    The relevance arriving at the layer output in CRP's backward pass, w.r.t. the target CRP uses for the
    sample (relevance initialised with the target logit, ``{"y": [target]}``), reduced per concept by the
    concept itself: ``concept.attribute(relevance, abs_norm=False)``, which for ``ChannelConcept`` is the sum
    over the spatial dimensions. If ``multitarget_to_single`` yields several targets for a sample, the row
    holds the *sum* over its targets. The activation of such a sample is stored once. With an attribution
    whose relevance is activation times gradient (:class:`~crp_invert.integration.vit.GradientTimesInput`,
    for transformers) the cache holds ``a * df/da`` reduced by the concept; CRP's own results keep the
    gradient its hooks see, as in plain CRP.
Modules called several times per forward pass
    (torchvision's BasicBlock applies one ``relu`` twice): CRP's hooks see every call and CRP's ActMax/RelMax
    use them all; the cache holds the output of the **last** call and the relevance at that output, as CRP's
    ``CondAttribution(record_layer=[name])`` returns them.

Samples for which ``multitarget_to_single`` yields no target are never passed through the model by CRP, so
their rows stay incomplete (a warning says how many).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import crp.maximization
import crp.statistics
import crp.visualization
import numpy as np
import torch
from crp.visualization import FeatureVisualization

from ..storage.cache import ActivationCache
from ..storage.fingerprint import model_hash
from .checkpoints import KINDS, CheckpointLog, after_collect, deferred_removal, finish_collect
from .guard import model_guard
from .layouts import layer_layouts
from .recorder import (
    Pooling,
    Recorder,
    callable_name,
    check_layers,
    check_recorded_layers,
    input_hash,
    layer_poolings,
    open_cache,
    recording_meta,
)

__all__ = ["InvertFeatureVisualization", "load_stat_targets", "check_layer_names"]

logger = logging.getLogger(__name__)

RELEVANCE = "concept.attribute(abs_norm=False), sum over targets"


def load_stat_targets(path_folder: str | os.PathLike) -> np.ndarray:
    """Targets of a CRP statistics folder, as ``crp.helper.load_stat_targets`` but without ``np.int`` (numpy 2)."""
    return np.load(Path(path_folder) / "targets.npy").astype(int)


def check_layer_names(names: Iterable[str]) -> None:
    """ValueError for a layer name that would make CRP write outside its folder.

    CRP writes a layer's results to ``<path>/RelStats_.../<layer name>/`` and ``<path>/RelMax_.../<layer
    name>_...``: an absolute name, a drive, a ``..`` component or a NUL byte would leave ``path``.
    """
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be str, got {type(name).__name__}: {name!r}")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if "\x00" in name or name.startswith(("/", "\\")) or ".." in parts or PureWindowsPath(name).drive:
            raise ValueError(
                f"layer name {name!r} would make CRP write its results outside its folder (CRP uses layer names "
                "as file names): an absolute path, a drive, '..' or a NUL byte is refused; rename the module"
            )


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``module.name`` to ``value`` for the duration of the block (not thread-safe)."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _named_bars(desc: str, enabled: bool) -> Iterator[None]:
    """Give CRP's progress bars (its loop's and its collect's) a name, or hide them."""
    with contextlib.ExitStack() as stack:
        for module in (crp.visualization, crp.maximization, crp.statistics):
            bar = functools.partial(module.tqdm, desc=desc, disable=not enabled)
            stack.enter_context(_patched(module, "tqdm", bar))
        yield


@dataclass
class _Run:
    """The recording state during one ``run_distributed``."""

    recorder: Recorder
    log: CheckpointLog
    span_start: int  # first sample of the next checkpoint
    batch_end: int  # end of the last batch CRP fetched


class InvertFeatureVisualization(FeatureVisualization):
    """CRP ``FeatureVisualization`` that also records every sample's pooled activations and relevances.

    A drop-in for ``crp.visualization.FeatureVisualization``: the same arguments, names and positions; what is
    new is keyword-only.

    Parameters
    ----------
    attribution, dataset, layer_map, preprocess_fn, max_target, abs_norm, path, device, cache
        As for CRP's ``FeatureVisualization`` (``cache`` is CRP's image cache, e.g. ``crp.cache.ImageCache``).
        Layer names that would make CRP write outside ``path`` are refused (ValueError).
    activation_cache : str, os.PathLike or ActivationCache, optional
        The HDF5 activation cache to write; default ``<path>/activations.h5``. A path is opened at each run
        and closed afterwards.
    pooling : {"mean", "max", "sum"}, callable, or dict of layer name to those
        Pooling of activations (see :func:`~crp_invert.integration.recorder.pool`); default ``"mean"``.
    record_relevance : bool
        Also record per-concept relevances (``concept.attribute(relevance, abs_norm=False)``).
    sample_range : (int, int), optional
        Dataset samples the cache has rows for; default ``(0, len(dataset))``. Shards use a part of it.
    overwrite : bool
        Discard an existing cache file at the first run; otherwise an existing cache is continued, and refused
        if it was made by another model, layer set, pooling, composite, dataset length or other data (the first
        sample's input after ``preprocess_fn``, and the name of ``preprocess_fn``).
    flush_interval : float
        Seconds between flushes to disk; rows become ``complete`` at a flush. 0 flushes every batch.
    progress : bool
        Show CRP's progress bars (named).
    layouts : str or dict of layer name to str, optional
        Unit layout per layer (:mod:`~crp_invert.integration.layouts`): ``"channels"`` (default) or ``"tokens"``
        ([B, T, D] outputs, units last; e.g. ``"tokens:cls"``). A tokens layer needs the concept
        :class:`~crp_invert.integration.layouts.TokenConcept` in ``layer_map``. A 3-D output of a layer
        without a layout is refused at the first batch.

    Notes
    -----
    Use :meth:`resume` (or :meth:`resume_distributed`) to finish a run that was interrupted at any point, also
    inside CRP's final collect: the cache and CRP's files then equal those of an uninterrupted run (same
    ``batch_size`` and ``checkpoint``). Until CRP's results are collected, crp-invert keeps a log of CRP's
    checkpoints in ``<path>/.crp-invert/``; a finished run leaves only CRP's files there. Not thread-safe: during
    a run CRP's modules see a named ``tqdm``, and during a collect an ``os`` whose ``remove`` is deferred.
    """

    def __init__(
        self,
        attribution,
        dataset,
        layer_map: Mapping[str, Any],
        preprocess_fn: Callable | None = None,
        max_target: str = "sum",
        abs_norm: bool = True,
        path: str = "FeatureVisualization",
        device=None,
        cache=None,
        *,
        activation_cache: ActivationCache | str | os.PathLike | None = None,
        pooling: Pooling | Mapping[str, Pooling] = "mean",
        record_relevance: bool = True,
        sample_range: tuple[int, int] | None = None,
        overwrite: bool = False,
        flush_interval: float = 2.0,
        progress: bool = True,
        layouts: str | Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(cache, (str, os.PathLike, ActivationCache)):
            if activation_cache is not None:
                raise TypeError("cache= is CRP's image cache; the activation cache is passed as activation_cache=")
            warnings.warn(
                "InvertFeatureVisualization(cache=<activation cache>) is deprecated: cache= is CRP's image cache "
                "(crp.cache.Cache); pass the HDF5 activation cache as activation_cache=",
                DeprecationWarning,
                stacklevel=2,
            )
            activation_cache, cache = cache, None
        if activation_cache is None:
            activation_cache = Path(path or ".") / "activations.h5"
        elif not isinstance(activation_cache, (str, os.PathLike, ActivationCache)):
            raise TypeError(
                f"activation_cache must be a path or an ActivationCache, got {type(activation_cache).__name__}"
            )
        check_layer_names(layer_map)
        self.poolings = layer_poolings(layer_map, pooling)
        check_layers(attribution.model, layer_map)
        self.layouts, self.poolings, self._declared = layer_layouts(attribution.model, layer_map, self.poolings,
                                                                    layouts)
        super().__init__(attribution, dataset, layer_map, preprocess_fn, max_target, abs_norm, path, device, cache)
        self.activation_cache = activation_cache
        self.record_relevance = bool(record_relevance)
        self.sample_range = (0, len(dataset)) if sample_range is None else tuple(int(v) for v in sample_range)
        self.overwrite = bool(overwrite)
        self.flush_interval = float(flush_interval)
        self.progress = bool(progress)
        self._run: _Run | None = None
        self._times_activation = bool(getattr(attribution, "relevance_times_activation", False))
        self._last_activation: dict[str, torch.Tensor] = {}

    # -- the methods CRP's loop calls ----------------------------------------------------------------------------

    def get_data_concurrently(self, indices, preprocessing=False):
        run = self._run
        if run is not None and preprocessing:  # CRP's loop fetches the next batch: the previous one is complete
            run.recorder.end()
            samples = np.asarray(indices)
            run.recorder.begin(samples)
            run.batch_end = int(samples[-1]) + 1
        return super().get_data_concurrently(indices, preprocessing)

    @torch.no_grad()
    def analyze_activation(self, act, layer_name, concept, data_indices, targets):
        if self._times_activation:  # gradient x input (vit.GradientTimesInput): relevance = a * df/da
            self._last_activation[layer_name] = act
        if self._run is not None:
            self._run.recorder.activation(layer_name, act, data_indices)
        return super().analyze_activation(act, layer_name, concept, data_indices, targets)

    @torch.no_grad()
    def analyze_relevance(self, rel, layer_name, concept, data_indices, targets):
        if self._run is not None:
            # CRP's own results keep its gradient, as in plain CRP; the cache gets a * df/da
            recorded = rel * self._last_activation[layer_name] if self._times_activation else rel
            self._run.recorder.relevance(layer_name, recorded, data_indices)
        return super().analyze_relevance(rel, layer_name, concept, data_indices, targets)

    def _save_results(self, d_index=None):
        """A CRP checkpoint: flush the recorded rows, then let CRP save into a stage folder and commit it.

        The checkpoint's files are named by the samples they cover (CRP names the first checkpoint of every run
        ``0_...``, whatever the run's start).
        """
        run = self._run
        if run is None or d_index is None:
            return super()._save_results(d_index)
        run.recorder.end()
        run.recorder.flush()
        span = (run.span_start, run.batch_end)
        before = {kind: len(self.saved_checkpoints[kind]) for kind in KINDS}
        with run.log.staging(span, self._crp_results()) as stage:
            super()._save_results(span)
            written = {kind: self.saved_checkpoints[kind][before[kind]:] for kind in KINDS}
            final = stage.commit(written)
        for kind in KINDS:
            self.saved_checkpoints[kind][before[kind]:] = final[kind]
        run.span_start = span[1]

    # -- runs ----------------------------------------------------------------------------------------------------

    def run_distributed(self, composite, data_start, data_end, batch_size=16, checkpoint=500, on_device=None):
        """CRP's ``run_distributed`` with recording; the model is restored (hooks, canonizers) if it raises.

        Returns
        -------
        dict of str to list of str
            CRP's checkpoint prefixes per kind (``r_max``, ``a_max``, ``r_stats``, ``a_stats``), as CRP returns
            them; pass them to :meth:`collect_results`.
        """
        for result in self._crp_results():  # an interrupted run leaves CRP's unsaved results in memory
            if result.d_c_sorted:
                result.delete_result_arrays()
        with self._recording(composite, int(data_start), int(data_end)):
            with model_guard(self.attribution.model, composite, only_on_error=True), \
                    _named_bars("CRP FeatureVisualization + recording", self.progress):
                return super().run_distributed(composite, data_start, data_end, batch_size, checkpoint, on_device)

    def collect_results(self, checkpoints, d_index=None):
        """CRP's ``collect_results``, repeatable after a kill: the checkpoint files it reads are deleted only
        after it wrote its results and crp-invert's logs dropped them."""
        root = self._crp_root()
        finish_collect(root)
        prefixes = [prefix for kind in KINDS for prefix in checkpoints.get(kind, [])]
        with _named_bars("collecting CRP results", self.progress), \
                deferred_removal([crp.maximization, crp.statistics]) as removed:
            saved = super().collect_results(checkpoints, d_index)
        after_collect(root, prefixes, removed)
        return saved

    def resume_distributed(
        self, composite, data_start=None, data_end=None, batch_size=16, checkpoint=500, on_device=None
    ) -> dict[str, list[str]]:
        """Finish an interrupted ``run_distributed`` (or ``run``) without collecting: the counterpart of
        ``run_distributed``, e.g. for one shard of several.

        Keeps the CRP checkpoints the interrupted run committed (up to the first row the cache lacks), runs CRP
        and the recording from there to ``data_end``.

        Parameters
        ----------
        composite, batch_size, checkpoint, on_device
            As for the interrupted run (the same ``batch_size`` and ``checkpoint`` give the same results).
        data_start, data_end : int, optional
            Default: the cache's ``sample_range``.

        Returns
        -------
        dict of str to list of str
            CRP's checkpoint prefixes of the whole range (kept and new), as ``run_distributed`` returns them;
            empty lists when there is nothing to do (the cache is complete and its checkpoints were collected).
        """
        start, end = self.sample_range
        start = start if data_start is None else int(data_start)
        end = end if data_end is None else int(data_end)
        root = self._crp_root()
        finish_collect(root)
        log = CheckpointLog(root, self.sample_range)
        first_missing = self._first_missing(start, end)
        if not log.exists() and first_missing >= end:
            logger.info("nothing to resume in [%d, %d): the cache is complete and CRP's results were collected",
                        start, end)
            return {kind: [] for kind in KINDS}
        kept = log.chain(start, first_missing) if log.exists() else []
        restart = kept[-1].span[1] if kept else start
        checkpoints = {kind: [p for entry in kept for p in log.absolute(entry)[kind]] for kind in KINDS}
        if restart < end:
            logger.info("resuming [%d, %d): cache complete up to %d, CRP checkpoints kept up to %d",
                        restart, end, first_missing, restart)
            new = self.run_distributed(composite, restart, end, batch_size, checkpoint, on_device)
            checkpoints = {kind: checkpoints[kind] + list(new[kind]) for kind in KINDS}
        return checkpoints

    def resume(
        self, composite, data_start=None, data_end=None, batch_size=32, checkpoint=500, on_device=None
    ) -> dict[str, list[str]]:
        """Finish an interrupted ``run(composite, data_start, data_end, batch_size, checkpoint)``: the
        counterpart of ``run``.

        Works after a kill at any point: during the batches (only the rows the cache lacks after the last
        committed checkpoint are computed again), during a checkpoint save, and during CRP's final collect
        (which is repeated). With the same ``batch_size`` and ``checkpoint`` as the interrupted run, the cache
        and CRP's files equal those of an uninterrupted run.

        Returns
        -------
        dict of str to list of str
            CRP's saved files, as ``run`` returns them; empty lists when there was nothing to resume.
        """
        checkpoints = self.resume_distributed(composite, data_start, data_end, batch_size, checkpoint, on_device)
        if not any(checkpoints.values()):
            return checkpoints
        return self.collect_results(checkpoints)

    def precompute_ref(self, *args, **kwargs):
        """CRP's ``precompute_ref``, with its progress bars named."""
        with _named_bars("precomputing reference images", self.progress):
            return super().precompute_ref(*args, **kwargs)

    def compute_stats(self, concept_id, layer_name: str, mode="relevance", top_N=5, mean_N=10, norm=False):
        """CRP's ``compute_stats``, with its ``load_stat_targets`` call replaced by one that works on numpy 2."""
        with _patched(crp.visualization, "load_stat_targets", load_stat_targets):
            return super().compute_stats(concept_id, layer_name, mode, top_N, mean_N, norm)

    # -- helpers -------------------------------------------------------------------------------------------------

    def _crp_results(self) -> list[Any]:
        return [self.RelMax, self.ActMax, self.RelStats, self.ActStats]

    def _crp_root(self) -> Path:
        """CRP's folder: the parent of the folders its result objects write to."""
        return Path(self.RelMax.PATH).parent

    def _first_missing(self, start: int, end: int) -> int:
        """First sample of ``[start, end)`` whose row the cache lacks (``end`` if none)."""
        cache = self.activation_cache
        if self.overwrite or not (isinstance(cache, ActivationCache) or Path(cache).exists()):
            return start
        opened = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
        try:
            if not opened.initialized or not all(name in opened for name in self.layer_map):
                return start
            missing = [max(a, start) for a, b in opened.missing_ranges() if b > start and a < end]
            return missing[0] if missing else end
        finally:
            if opened is not cache:
                opened.close()

    def _meta(self, composite) -> dict[str, dict[str, Any]]:
        """The attributes of every layer (what a resumed recording must match)."""
        digest = model_hash(self.attribution.model)
        sample, target = self.get_data_sample(0, preprocessing=True)
        data = input_hash(sample, target)
        relevance = RELEVANCE if self.record_relevance else ""
        if relevance and self._times_activation:
            relevance = f"activation x gradient (gradient x input); {RELEVANCE}"
        return {
            name: recording_meta(digest, name, concept, self.poolings[name], composite, len(self.dataset),
                                 relevance, data, callable_name(self.preprocess_fn), self.layouts[name])
            for name, concept in self.layer_map.items()
        }

    @contextlib.contextmanager
    def _recording(self, composite, data_start: int, data_end: int) -> Iterator[None]:
        """Open the cache and the checkpoint log for a run over ``[data_start, data_end)``; afterwards write
        what was recorded (an unfinished batch is dropped) and close the cache."""
        start, end = self.sample_range
        if not start <= data_start < data_end <= end:
            raise ValueError(
                f"run range [{data_start}, {data_end}) is not inside the cache's sample range [{start}, {end}) "
                "(set sample_range=)"
            )
        cache, own = open_cache(self.activation_cache, self.overwrite)
        try:
            cache.initialize(self.sample_range, dataset_length=len(self.dataset))
            meta = self._meta(composite)
            check_recorded_layers(cache, meta, self.record_relevance)
            recorder = Recorder(cache, self.layer_map, self.poolings, self.record_relevance, meta,
                                self.flush_interval, self.layouts, self._declared)
            log = CheckpointLog(self._crp_root(), self.sample_range)
            log.start(data_start, data_end)
        except BaseException:
            if own:
                cache.close()
            raise
        self.overwrite = False  # overwrite only once: later runs and resume continue the file
        self._run = _Run(recorder, log, data_start, data_start)
        try:
            yield
            recorder.end()
        finally:
            self._run = None
            try:
                recorder.close()
            finally:
                if own:
                    cache.close()
                else:
                    cache.flush()
