"""Channel-parallel labeling under torchrun: each rank labels a contiguous share of a layer's columns,
reading only those columns; the parts are gathered and joined (Benjamini-Hochberg recomputed over the
layer), so every rank gets the result a single process computes. The search is deterministic per feature
(exact rank sums), so splitting the features changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.checks import check_int
from ..core.labels import LayerLabels
from .group import all_gather, get_rank, get_world_size
from .shards import split_range

__all__ = ["ColumnSlice", "all_gather_labels", "label_columns_shared"]


class ColumnSlice:
    """Columns ``[start, stop)`` of an [N, F] array-like (e.g. an h5py.Dataset), read lazily.

    Has ``.shape`` and ``x[:, a:b]`` column slicing, which is all :meth:`ConceptLabeler.label` needs; only the
    requested columns are read.
    """

    def __init__(self, data: Any, start: int, stop: int) -> None:
        n_rows, n_cols = (int(s) for s in data.shape)
        start, stop = check_int(start, "start", minimum=0), check_int(stop, "stop", minimum=0)
        if not start <= stop <= n_cols:
            raise ValueError(f"columns [{start}, {stop}) out of range for {n_cols} columns")
        self.data, self.start, self.stop = data, start, stop
        self.shape = (n_rows, self.stop - self.start)
        # the labeler sizes its batches by the stored dtype and lines them up with the chunk columns
        self.dtype = getattr(data, "dtype", None)
        self.chunks = getattr(data, "chunks", None)

    def __getitem__(self, key):
        if (
            not isinstance(key, tuple)
            or len(key) != 2
            or key[0] != slice(None)
            or not isinstance(key[1], slice)
            or key[1].step not in (None, 1)
        ):
            raise TypeError(f"ColumnSlice supports x[:, a:b] only, got {key!r}")
        a, b, _ = key[1].indices(self.shape[1])
        return self.data[:, self.start + a : self.start + max(a, b)]


def all_gather_labels(part: LayerLabels) -> LayerLabels:
    """Join the labels of consecutive feature shares of all ranks into the layer's labels, on every rank.

    The Benjamini-Hochberg q-values are recomputed over all features (each rank saw only its share).
    """
    parts = [p for p in all_gather(part) if p.n_features]
    return LayerLabels.concatenate(parts) if parts else part



def label_columns_shared(
    label: Callable[..., LayerLabels], data: Any, concept_names: list, layer: str | None, progress: bool
) -> LayerLabels:
    """Label this rank's share of the columns of ``data`` with ``label(columns, layer=, progress=)`` and
    gather the layer's labels on every rank (a collective: every rank must call it)."""
    start, stop = split_range(0, int(data.shape[1]), get_rank(), get_world_size())
    if stop > start:
        part = label(ColumnSlice(data, start, stop), layer=layer, progress=progress and get_rank() == 0)
    else:
        part = LayerLabels([], concept_names, layer)
    return all_gather_labels(part)
