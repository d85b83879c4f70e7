"""ConceptLabeler: the user-facing object that labels arrays, cache files and INVERT-format files.

It is thin: the search is :func:`crp_invert.core.labeling.label_array`; files are opened and checked by
:mod:`crp_invert.storage`; under torchrun the channels are split across ranks by
:mod:`crp_invert.parallel.labeling`. The choice between one process and several is made here, above both.

Examples
--------
>>> import torch
>>> from crp_invert import ConceptLabels, ConceptLabeler
>>> generator = torch.Generator().manual_seed(0)
>>> labels = torch.rand(200, 3, generator=generator) < 0.3
>>> activations = labels[:, :1].float() + 0.1 * torch.rand(200, 2, generator=generator)
>>> labeler = ConceptLabeler(ConceptLabels(labels, ["red", "round", "big"]))
>>> result = labeler.label(activations, L=2, B=3, progress=False)
>>> str(result[0][0].formula), round(result[0][0].auc, 3)
('red', 1.0)
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .core.backend import check_backend
from .core.concepts import ConceptLabels
from .core.labeling import available_memory, default_feature_batch_size, label_array
from .core.labels import Explanation, LabelsByLayer, LayerLabels
from .core.params import SearchParams
from .core.search import PreparedLabels, prepare_labels
from .parallel.group import is_distributed
from .parallel.labeling import label_columns_shared
from .storage.cache import ActivationCache, open_for_labeling
from .storage.flat import open_flat_dataset

__all__ = ["ConceptLabeler", "label_cache", "label_h5", "Explanation", "LayerLabels", "SearchParams",
           "default_feature_batch_size", "available_memory"]

logger = logging.getLogger(__name__)


class ConceptLabeler:
    """Label features (channels, neurons) with INVERT explanations over a set of concepts.

    Parameters
    ----------
    concepts : ConceptLabels
        The labels of the N samples the activations were recorded on.
    device : str or torch.device
        Where the search runs ("cpu", "cuda", ...).
    backend : {"auto", "torch"}
        The kernels: ``"auto"`` runs numpy / scipy on the CPU and torch elsewhere, ``"torch"`` the torch
        (GPU) kernels on any device, the CPU included; the labels are the same (see
        :mod:`crp_invert.core.backend`).

    Examples
    --------
    >>> labeler = ConceptLabeler(concepts, device="cpu")          # doctest: +SKIP
    >>> result = labeler.label(activations, L=3, B=3)             # doctest: +SKIP
    >>> result[5][0].formula, result[5][0].auc                    # doctest: +SKIP
    """

    def __init__(self, concepts: ConceptLabels, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        if not isinstance(concepts, ConceptLabels):
            raise TypeError(f"concepts must be a ConceptLabels, got {type(concepts).__name__}")
        self.concepts = concepts
        self.device = torch.device(device)
        self.backend = check_backend(backend)
        self._cached_labels: PreparedLabels | None = None

    def __repr__(self) -> str:
        backend = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"ConceptLabeler({self.concepts!r}, device={str(self.device)!r}{backend})"

    @property
    def prepared_nbytes(self) -> int:
        """Bytes the labeler keeps of its concepts prepared for the search (prepared on first use), the part of
        a labeling process's memory besides the concepts and the batches in flight (see
        :func:`~crp_invert.core.labeling.planned_memory`).
        """
        return self._prepared_labels().nbytes

    def _prepared_labels(self) -> PreparedLabels:
        # built once: preparing a large label matrix costs more than a small search
        if self._cached_labels is None:
            self._cached_labels = prepare_labels(self.concepts.torch_sparse_t(self.device), self.backend)
        return self._cached_labels

    def label(
        self,
        activations: Any,
        L: int = 3,
        B: int = 3,
        limit_search: int | None = None,
        min_fraction: float = 0.0,
        max_fraction: float = 0.5,
        mode: str = "positive",
        min_support: int = 10,
        memorize_states: bool = False,
        feature_batch_size: int | None = None,
        validation: None | float | np.ndarray | torch.Tensor = None,
        layer: str | None = None,
        progress: bool = True,
        seed: int = 0,
    ) -> LayerLabels:
        """Find the B best formulas of length at most L for every feature.

        Parameters
        ----------
        activations : array-like
            ``[N, F]`` activations (torch, numpy, or anything with ``.shape`` and ``x[:, a:b]``
            column slicing such as an ``h5py.Dataset``, read one feature batch at a time).
        L : int
            Maximal formula length (number of atoms).
        B : int
            Beam width; also the number of explanations kept per feature.
        limit_search : int, optional
            Use only the ``limit_search`` primitives (concepts or negations) with the largest
            ``|AUC - 0.5|`` for each feature.
        min_fraction, max_fraction : float
            Keep formulas that hold for a share ``T`` of the samples with
            ``min_fraction <= T <= max_fraction`` (and ``0 < T < 1``).
        mode : {"positive", "negative"}
            Maximize the AUC, or minimize it (what a feature is *not* activated by).
        min_support : int
            Keep formulas that hold on at least ``min_support`` samples and fail on at least as many
            (inside the search, like the fractions); 0 is the paper's unconstrained search. See
            :class:`~crp_invert.core.labels.ReliabilityRule`.
        memorize_states : bool
            Also keep the beam after every length in ``LayerLabels.states``.
        feature_batch_size : int, optional
            Features searched together; bounds memory. By default chosen from the free memory
            of the device (see :func:`~crp_invert.core.labeling.default_feature_batch_size`).
        validation : float or bool mask, optional
            Held-out samples: a share in (0, 1) drawn at random with ``seed``, or a boolean ``[N]``
            mask (True = held out). The search sees only the other samples; every explanation also
            reports AUC and p-value on the held-out ones.
        layer : str, optional
            Stored in the result.
        progress : bool
            Show a progress bar over feature batches.
        seed : int
            Seed of the random validation split.

        Returns
        -------
        LayerLabels
            Per feature the B best explanations, best first.
        """
        params = SearchParams(L=L, B=B, limit_search=limit_search, min_fraction=min_fraction,
                              max_fraction=max_fraction, mode=mode, min_support=min_support,
                              memorize_states=memorize_states,
                              feature_batch_size=feature_batch_size)
        return self.label_with(activations, params, validation=validation, layer=layer, progress=progress,
                               seed=seed)

    def label_with(self, activations: Any, params: SearchParams, *, validation: Any = None,
                   layer: str | None = None, progress: bool = True, seed: int = 0) -> LayerLabels:
        """:meth:`label` with the search parameters given as one :class:`SearchParams`.

        Parameters
        ----------
        activations : array-like
            ``[N, F]`` activations, as for :meth:`label`.
        params : SearchParams
            The search's parameters.
        validation : float or bool mask, optional
            Held-out samples, as for :meth:`label`.
        layer : str, optional
            Stored in the result.
        progress : bool
            Show a progress bar over feature batches.
        seed : int
            Seed of the random validation split.

        Returns
        -------
        LayerLabels
            Per feature the B best explanations, best first.
        """
        # prepared by label_array while it ranks the first batch, then kept for the next call
        prepared = self._prepared_labels if validation is None else None
        return label_array(activations, self.concepts, params, device=self.device, validation=validation,
                           layer=layer, progress=progress, seed=seed, prepared=prepared, backend=self.backend)

    def label_cache(self, cache: Any, layers: Sequence[str] | None = None, source: str = "activation",
                    progress: bool = True, **label_kwargs: Any) -> LabelsByLayer:
        """Label every channel of the layers of an :class:`~crp_invert.ActivationCache` (see :func:`label_cache`).

        Parameters
        ----------
        cache : ActivationCache, str or os.PathLike
            The cache (a path is opened read-only and closed afterwards).
        layers : sequence of str, optional
            Layers to label (default: all, in cache order).
        source : {"activation", "relevance"}
            Label what a channel's activation detects, or what its relevance detects.
        progress : bool
            Show progress bars.
        **label_kwargs
            Passed to :meth:`label` (``L``, ``B``, ``feature_batch_size``, ...).

        Returns
        -------
        LabelsByLayer
            A dict of layer name to LayerLabels, in the order of ``layers``; a wrong key names the layers.
        """
        return label_cache(self, cache, layers=layers, source=source, progress=progress, **label_kwargs)

    def label_h5(self, path: str | os.PathLike, dataset: str = "Y", progress: bool = True,
                 **label_kwargs: Any) -> LayerLabels:
        """Label every column of the INVERT release's single-file HDF5 format (see :func:`label_h5`).

        Parameters
        ----------
        path : str or os.PathLike
            The HDF5 file.
        dataset : str
            The name of its ``[N, D]`` dataset.
        progress : bool
            Show a progress bar over feature batches.
        **label_kwargs
            Passed to :meth:`label`.

        Returns
        -------
        LayerLabels
            Per column the B best explanations, best first.
        """
        return label_h5(self, path, dataset=dataset, progress=progress, **label_kwargs)


def _label_columns(labeler: ConceptLabeler, data: Any, layer: str | None, progress: bool,
                   label_kwargs: dict[str, Any]) -> LayerLabels:
    """All columns of ``data`` in this process, or this rank's share gathered on every rank under torchrun."""
    if is_distributed():
        label = partial(labeler.label, **label_kwargs)
        return label_columns_shared(label, data, labeler.concepts.names, layer, progress)
    return labeler.label(data, layer=layer, progress=progress, **label_kwargs)


def _check_labeler(labeler: Any) -> ConceptLabeler:
    if not isinstance(labeler, ConceptLabeler):
        raise TypeError(f"labeler must be a ConceptLabeler, got {type(labeler).__name__}")
    return labeler


def label_cache(
    labeler: ConceptLabeler,
    cache: ActivationCache | str | os.PathLike,
    layers: str | Sequence[str] | None = None,
    source: str = "activation",
    progress: bool = True,
    **label_kwargs: Any,
) -> LabelsByLayer:
    """Label the channels of cached layers, streaming column batches from HDF5.

    Parameters
    ----------
    labeler : ConceptLabeler
        Holds the concept labels; their N must equal the cache's.
    cache : ActivationCache, str or os.PathLike
        The cache (a path is opened read-only and closed afterwards).
    layers : str or sequence of str, optional
        Layers to label (default: all, in cache order).
    source : {"activation", "relevance"}
        Label what a channel's activation detects, or what its relevance detects.
    progress : bool
        Show a tqdm bar over layers (and let the labeler show one over feature batches).
    **label_kwargs
        Passed to :meth:`ConceptLabeler.label` (``L``, ``B``, ``feature_batch_size``, ...); ``layer`` is set.

    Returns
    -------
    LabelsByLayer
        A dict of layer name to LayerLabels in the order of ``layers``; a missing layer's KeyError lists
        the labeled ones.

    Raises
    ------
    KeyError
        A requested layer is not in the cache (the message lists the layers).
    ValueError
        The cache's N differs from the labeler's, or rows are incomplete.

    Notes
    -----
    When a ``torch.distributed`` process group with several ranks is initialized (``torchrun``), the
    channels of every layer are split across the ranks; every rank must then call this function and gets
    the same result, equal to the single-process one.
    """
    labeler = _check_labeler(labeler)
    if "layer" in label_kwargs:
        raise TypeError("label_cache sets layer= itself; choose layers with layers=")
    with open_for_labeling(cache, layers, source, labeler.concepts.n_samples) as (opened, names):
        results = LabelsByLayer()
        for name in tqdm(names, desc="layers", disable=not progress or len(names) < 2):
            logger.info("labeling %s of layer %r (%d channels)", source, name, opened.n_channels(name))
            results[name] = _label_columns(labeler, opened.dataset(name, source), name, progress, label_kwargs)
        return results


def label_h5(
    labeler: ConceptLabeler,
    path: str | os.PathLike,
    dataset: str = "Y",
    progress: bool = True,
    **label_kwargs: Any,
) -> LayerLabels:
    """Label all D columns of an [N, D] dataset in an HDF5 file (the INVERT release format) in column batches.

    ``layer`` defaults to ``dataset``; other keyword arguments go to :meth:`ConceptLabeler.label`. Under
    torchrun the columns are split across the ranks (see :func:`label_cache`).

    Parameters
    ----------
    labeler : ConceptLabeler
        Holds the concept labels; their N must equal the dataset's.
    path : str or os.PathLike
        The HDF5 file.
    dataset : str
        The name of its ``[N, D]`` dataset.
    progress : bool
        Show a progress bar over feature batches.
    **label_kwargs
        Passed to :meth:`ConceptLabeler.label`.

    Returns
    -------
    LayerLabels
        Per column the B best explanations, best first.
    """
    labeler = _check_labeler(labeler)
    layer = label_kwargs.pop("layer", dataset)
    with open_flat_dataset(path, dataset, labeler.concepts.n_samples) as data:
        return _label_columns(labeler, data, layer, progress, label_kwargs)
