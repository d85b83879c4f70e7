"""Boolean concept labels of a dataset: which of K named concepts are present in each of N samples.

Labels are kept sparse (scipy CSR, one row per sample): ImageNet-style labels with 1,000 classes
and their hypernyms have a handful of positives per sample.

Examples
--------
>>> concepts = ConceptLabels.from_targets(
...     [0, 1, 2, 1], ["sandal", "sneaker", "bag"], hierarchy={"footwear": ["sandal", "sneaker"]})
>>> concepts.names
['sandal', 'sneaker', 'bag', 'footwear']
>>> concepts.mask("footwear").tolist()
[True, True, False, True]
"""
from __future__ import annotations

import difflib
import logging
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Union

import numpy as np
import scipy.sparse
import torch

from .checks import check_name, fits_in_memory, is_int, read_json

__all__ = ["ConceptLabels", "closest_names", "unknown_names_message"]

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor, "scipy.sparse.spmatrix", Sequence]


def _check_csr(indptr: np.ndarray, indices: np.ndarray, shape: tuple, where: str) -> tuple:
    """Validate CSR arrays before any kernel sees them: integer 1-d arrays, ``indptr`` of ``n_rows + 1``
    entries from 0 to ``len(indices)`` without decreasing, every index in ``[0, n_cols)``.

    Returns ``(indptr, indices)`` as int64. ``where`` names the source in errors.
    """
    n_rows, n_cols = shape
    for name, array in (("indptr", indptr), ("indices", indices)):
        if array.ndim != 1:
            raise ValueError(f"{where}: CSR {name!r} must be 1-d, got shape {array.shape}")
        if array.dtype.kind not in "iu":
            raise TypeError(f"{where}: CSR {name!r} must hold integers, got dtype {array.dtype}")
    if len(indptr) != n_rows + 1:
        raise ValueError(
            f"{where}: CSR 'indptr' has {len(indptr)} entries, expected n_rows + 1 = {n_rows + 1} for shape "
            f"{shape}"
        )
    if int(indptr[0]) != 0:
        raise ValueError(f"{where}: CSR 'indptr' must start at 0, got {int(indptr[0])}")
    if int(indptr[-1]) != len(indices):
        raise ValueError(
            f"{where}: CSR 'indptr' ends at {int(indptr[-1])} but there are {len(indices)} column indices"
        )
    if len(indptr) > 1:
        falling = np.flatnonzero(indptr[1:] < indptr[:-1])
        if falling.size:
            row = int(falling[0])
            raise ValueError(
                f"{where}: CSR 'indptr' decreases at row {row} ({int(indptr[row])} -> {int(indptr[row + 1])})"
            )
    if len(indices):
        low, high = indices.min(), indices.max()
        if int(low) < 0 or int(high) >= n_cols:
            bad = int(low) if int(low) < 0 else int(high)
            raise ValueError(f"{where}: CSR column index {bad} is out of range for {n_cols} columns")
    return indptr.astype(np.int64), indices.astype(np.int64)


def _check_shape(shape: Any, where: str) -> tuple:
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"{where} must be a 2-d [N, K] matrix, got shape {shape}")
    for size in shape:
        if not is_int(size):  # np.bool_ is no np.integer, so is_int refuses it too
            raise TypeError(f"{where}: the shape must hold integers, got {shape}")
        if not 0 <= int(size) < 2**62:
            raise ValueError(f"{where}: shape {shape} has an entry out of range [0, 2**62)")
    return int(shape[0]), int(shape[1])


def _checked_values(data: np.ndarray, where: str) -> np.ndarray:
    """Boolean values from bool or real 0/1 ``data`` (ValueError naming the first other value)."""
    if data.dtype == np.bool_:
        return data
    if data.dtype.kind not in "iuf":
        raise TypeError(f"{where} must be boolean or real 0/1, got dtype {data.dtype}")
    bad = (data != 0) & (data != 1)
    if np.any(bad):
        raise ValueError(f"{where} must be boolean or 0/1, found value {data[bad][0]!r}")
    return data != 0


def _csr(data: Any, indptr: np.ndarray, indices: np.ndarray, shape: tuple, where: str) -> scipy.sparse.csr_matrix:
    """A canonical boolean CSR matrix (sorted, no duplicates, no explicit zeros) from arrays that are checked
    first: nothing unchecked reaches scipy's kernels."""
    shape = _check_shape(shape, where)
    indptr, indices = _check_csr(np.asarray(indptr), np.asarray(indices), shape, where)
    if data is None:
        data = np.ones(len(indices), dtype=np.bool_)
        matrix = scipy.sparse.csr_matrix((data, indices, indptr), shape=shape, dtype=np.bool_)
        if matrix.has_canonical_format:  # sorted without duplicates (as saved): nothing to sum (a fifth of the time)
            return matrix
    else:
        data = np.asarray(data)
        if data.shape != indices.shape:
            raise ValueError(f"{where}: CSR 'data' has shape {data.shape} but 'indices' {indices.shape}")
        data = _checked_values(data, where)
    matrix = scipy.sparse.csr_matrix((data.astype(np.int64), indices, indptr), shape=shape)
    matrix.sum_duplicates()  # sorts the indices; duplicates of 1 add up to > 0, still True
    matrix = scipy.sparse.csr_matrix(
        (matrix.data != 0, matrix.indices, matrix.indptr), shape=shape, dtype=np.bool_
    )
    matrix.eliminate_zeros()
    return matrix


def _transposed(matrix: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """The transpose of a checked CSR matrix, again as canonical CSR."""
    transposed = matrix.T.tocsr()
    transposed.sort_indices()
    return transposed


def _coo(data: Any, rows: np.ndarray, cols: np.ndarray, shape: tuple, where: str) -> scipy.sparse.csr_matrix:
    """As :func:`_csr` from coordinates (checked, then sorted into CSR in numpy)."""
    shape = _check_shape(shape, where)
    rows, cols = np.asarray(rows).reshape(-1), np.asarray(cols).reshape(-1)
    for name, array, size in (("row", rows, shape[0]), ("column", cols, shape[1])):
        if array.dtype.kind not in "iu":
            raise TypeError(f"{where}: {name} indices must be integers, got dtype {array.dtype}")
        if array.size and (int(array.min()) < 0 or int(array.max()) >= size):
            raise ValueError(f"{where}: a {name} index is out of range for shape {shape}")
    if rows.shape != cols.shape:
        raise ValueError(f"{where}: {rows.size} row indices but {cols.size} column indices")
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    order = np.lexsort((cols, rows))
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    values = None if data is None else np.asarray(data).reshape(-1)[order]
    return _csr(values, indptr, cols[order], shape, where)


def _to_csr(labels: Any) -> scipy.sparse.csr_matrix:
    """Boolean CSR matrix from dense or sparse numpy / torch / scipy input; checks the values and, for sparse
    input, every index before a kernel sees it (invalid sparse arrays crash torch and scipy)."""
    where = "labels"
    if isinstance(labels, torch.Tensor):
        layout = labels.layout
        if layout == torch.sparse_coo:
            if labels.ndim != 2 or labels.dense_dim() != 0:
                raise ValueError(f"labels must be a 2-d [N, K] matrix, got shape {tuple(labels.shape)}")
            indices = labels._indices().detach().cpu().numpy()
            return _coo(labels._values().detach().cpu().numpy(), indices[0], indices[1], tuple(labels.shape), where)
        if layout in (torch.sparse_csr, torch.sparse_csc):
            if labels.ndim != 2:
                raise ValueError(f"labels must be a 2-d [N, K] matrix, got shape {tuple(labels.shape)}")
            values = labels.values().detach().cpu().numpy()
            if layout == torch.sparse_csr:
                crow = labels.crow_indices().detach().cpu().numpy()
                return _csr(values, crow, labels.col_indices().detach().cpu().numpy(), tuple(labels.shape), where)
            ccol = labels.ccol_indices().detach().cpu().numpy()
            n_rows, n_cols = labels.shape
            return _transposed(_csr(values, ccol, labels.row_indices().detach().cpu().numpy(), (n_cols, n_rows), where))
        if layout != torch.strided:
            raise TypeError(f"labels with torch layout {layout} are not supported; use a dense, COO or CSR tensor")
        labels = labels.detach().cpu().numpy()
    if scipy.sparse.issparse(labels):
        if labels.ndim != 2:
            raise ValueError(f"labels must be a 2-d [N, K] matrix, got shape {labels.shape}")
        form = labels.format
        if form == "csr":
            return _csr(labels.data, labels.indptr, labels.indices, labels.shape, where)
        if form == "csc":
            n_rows, n_cols = labels.shape
            return _transposed(_csr(labels.data, labels.indptr, labels.indices, (n_cols, n_rows), where))
        if form == "bsr":
            labels.check_format(full_check=True)
        if form != "coo":
            labels = labels.tocoo()  # lil, dok and dia keep indices in Python structures or compute them
        return _coo(labels.data, labels.row, labels.col, labels.shape, where)
    array = np.asarray(labels)
    if array.ndim != 2:
        raise ValueError(f"labels must be a 2-d [N, K] matrix, got shape {array.shape}")
    if array.dtype != np.bool_ and array.dtype.kind not in "iuf":
        raise TypeError(f"labels must be boolean or real numeric 0/1, got dtype {array.dtype}")
    matrix = scipy.sparse.csr_matrix(_checked_values(array, where), dtype=np.bool_)
    matrix.sort_indices()
    return matrix


def _check_names(names: Any) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"names must be a sequence of str, got {type(names).__name__}")
    names = [check_name(name, "a concept name") for name in names]
    seen, duplicates = set(), []
    for name in names:
        if name in seen and name not in duplicates:
            duplicates.append(name)
        seen.add(name)
    if duplicates:
        raise ValueError(f"concept names must be unique, duplicated: {duplicates}")
    return names


def closest_names(name: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``names`` closest to ``name`` (difflib's ratio, case-insensitive), best first.

    Examples
    --------
    >>> closest_names("Artefacts", ["artifact", "ring", "red"])
    ['artifact']
    """
    folded = {}
    for known in names:
        folded.setdefault(known.casefold(), known)
    matches = difflib.get_close_matches(name.casefold(), list(folded), n=n, cutoff=0.6)
    return [folded[match] for match in matches]


def unknown_names_message(unknown: Sequence[str], names: Sequence[str], where: str = "") -> str:
    """The message of a ``KeyError`` for concept names that are not in ``names``: each with its closest known
    names, and a preview of the known ones.

    Examples
    --------
    >>> print(unknown_names_message(["rde"], ["red", "ring"], "formula 'rde AND ring'"))
    unknown concept 'rde' (closest: 'red') in formula 'rde AND ring'; known concepts: ['red', 'ring'] (2 in all)
    """
    parts = []
    for name in unknown:
        close = closest_names(name, names)
        hint = f" (closest: {', '.join(repr(c) for c in close)})" if close else " (no close name)"
        parts.append(f"{name!r}{hint}")
    noun = "concept" if len(unknown) == 1 else "concepts"
    shown = ", ".join(repr(n) for n in list(names)[:10])
    preview = f"[{shown}{', ...' if len(names) > 10 else ''}] ({len(names)} in all)"
    return f"unknown {noun} {'; '.join(parts)}{f' in {where}' if where else ''}; known concepts: {preview}"


class ConceptLabels:
    """N x K boolean concept labels with K unique names and optional descriptions.

    Parameters
    ----------
    labels : array-like or sparse matrix
        ``[N, K]`` boolean or 0/1 labels: numpy, torch (dense or sparse) or scipy.sparse.
    names : sequence of str
        K unique, non-empty concept names.
    descriptions : sequence of str or mapping of name to str, optional
        Human-readable descriptions of the concepts.

    Raises
    ------
    ValueError
        If K = 0, N = 0, the names are not unique or empty, their number differs from K, or the
        labels are not boolean 0/1.
    """

    def __init__(
        self,
        labels: ArrayLike,
        names: Sequence[str],
        descriptions: Sequence[str] | Mapping[str, str] | None = None,
    ) -> None:
        matrix = _to_csr(labels)
        names = _check_names(names)
        n_samples, n_concepts = matrix.shape
        if n_concepts == 0:
            raise ValueError("labels have no concept (K = 0); at least one concept is needed")
        if n_samples == 0:
            raise ValueError("labels have no sample (N = 0)")
        if len(names) != n_concepts:
            raise ValueError(f"got {len(names)} names for {n_concepts} label columns")
        self._matrix = matrix
        self._names = names
        self._index = {name: i for i, name in enumerate(names)}
        self._descriptions = self._check_descriptions(descriptions)
        self._columns: scipy.sparse.csc_matrix | None = None

    def _check_descriptions(self, descriptions: Any) -> dict[str, str]:
        if descriptions is None:
            return {}
        if isinstance(descriptions, Mapping):
            unknown = sorted(set(descriptions) - set(self._index))
            if unknown:
                raise KeyError(f"descriptions for unknown concepts: {unknown[:5]}")
            return {str(k): str(v) for k, v in descriptions.items()}
        descriptions = list(descriptions)
        if len(descriptions) != len(self._names):
            raise ValueError(f"got {len(descriptions)} descriptions for {len(self._names)} concepts")
        return {name: str(text) for name, text in zip(self._names, descriptions) if text}

    # basic properties ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The K concept names, in column order."""
        return list(self._names)

    @property
    def descriptions(self) -> dict[str, str]:
        """Descriptions by concept name (only the concepts that have one)."""
        return dict(self._descriptions)

    @property
    def n_samples(self) -> int:
        """Number of samples N (rows)."""
        return self._matrix.shape[0]

    @property
    def n_concepts(self) -> int:
        """Number of concepts K (columns)."""
        return self._matrix.shape[1]

    @property
    def shape(self) -> tuple:
        """``(N, K)``."""
        return self._matrix.shape

    def __len__(self) -> int:
        return self.n_concepts

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return (
            f"ConceptLabels(n_samples={self.n_samples}, n_concepts={self.n_concepts}, "
            f"positives={self._matrix.nnz})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConceptLabels):
            return NotImplemented
        return (
            self._names == other._names
            and self.shape == other.shape
            and (self._matrix != other._matrix).nnz == 0
            and self._descriptions == other._descriptions
        )

    def index(self, name: str) -> int:
        """The column of concept ``name``; ``KeyError`` naming it and the closest known names if unknown."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(unknown_names_message([name], self._names)) from None

    def check_names(self, names: Iterable[str], where: str = "") -> None:
        """``KeyError`` naming every name of ``names`` that is not a concept, with the closest known ones."""
        unknown = sorted({name for name in names if name not in self._index})
        if unknown:
            raise KeyError(unknown_names_message(unknown, self._names, where))

    # access -------------------------------------------------------------------------------------
    def sparse(self) -> scipy.sparse.csr_matrix:
        """The labels as a boolean scipy CSR matrix ``[N, K]`` (a copy)."""
        return self._matrix.copy()

    def counts(self) -> np.ndarray:
        """Number of positive samples of every concept, ``[K]`` int64."""
        return np.asarray(self._matrix.sum(axis=0), dtype=np.int64).ravel()

    def dense(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The labels as a dense boolean tensor ``[N, K]``."""
        return torch.from_numpy(self._matrix.toarray()).to(device)

    def mask(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        """The boolean ``[N]`` mask of the samples that have concept ``name``."""
        column = self.index(name)
        if self._columns is None:
            self._columns = self._matrix.tocsc()
        rows = self._columns.indices[self._columns.indptr[column]:self._columns.indptr[column + 1]]
        mask = torch.zeros(self.n_samples, dtype=torch.bool)
        mask[torch.from_numpy(rows.astype(np.int64))] = True
        return mask.to(device)

    def torch_sparse_t(self, device: str | torch.device | None = None,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The transposed labels ``[K, N]`` as a torch sparse CSR tensor of ``dtype``.

        This is the left factor of every rank-sum product in the beam search.
        """
        transposed = self._matrix.T.tocsr()
        transposed.sort_indices()
        crow = torch.from_numpy(transposed.indptr.astype(np.int64))
        col = torch.from_numpy(transposed.indices.astype(np.int64))
        values = torch.ones(len(col), dtype=dtype)
        with warnings.catch_warnings():
            # torch warns that sparse CSR support is "beta"; it is what we need here
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            tensor = torch.sparse_csr_tensor(
                crow, col, values, size=(self.n_concepts, self.n_samples), check_invariants=False
            )
        return tensor.to(device)

    # derived label sets -------------------------------------------------------------------------
    def subset(self, samples: np.ndarray | torch.Tensor | Sequence[int] | slice) -> ConceptLabels:
        """The labels of a subset of the samples (an index array, a boolean mask or a slice)."""
        if isinstance(samples, torch.Tensor):
            samples = samples.detach().cpu().numpy()
        if not isinstance(samples, slice):
            samples = np.asarray(samples)
            if samples.dtype == np.bool_:
                if samples.shape != (self.n_samples,):
                    raise ValueError(
                        f"a boolean sample mask must have shape ({self.n_samples},), got {samples.shape}"
                    )
            elif not np.issubdtype(samples.dtype, np.integer):
                raise TypeError(f"samples must be integer indices or a boolean mask, got {samples.dtype}")
        return ConceptLabels(self._matrix[samples], self._names, self._descriptions)

    def with_hierarchy(self, hierarchy: Mapping[str, Iterable[str]]) -> ConceptLabels:
        """Add parent concepts: a parent is present where any of its descendants is.

        Parameters
        ----------
        hierarchy : mapping of str to iterable of str
            Parent name -> child names; a child may itself be a parent (nesting), as with WordNet
            hypernyms of the ImageNet classes. Parents are appended in the mapping's order.

        Raises
        ------
        KeyError
            If a child is neither an existing concept nor a parent in ``hierarchy``.
        ValueError
            If a parent name is already a concept, or the hierarchy has a cycle.
        """
        if not isinstance(hierarchy, Mapping):
            raise TypeError(f"hierarchy must be a mapping parent -> children, got {type(hierarchy).__name__}")
        clashes = [parent for parent in hierarchy if parent in self._index]
        if clashes:
            raise ValueError(f"parent concept names clash with existing concepts: {clashes[:5]}")
        children = {parent: list(kids) for parent, kids in hierarchy.items()}
        for parent, kids in children.items():
            if isinstance(kids, str):
                raise TypeError(f"children of {parent!r} must be a list of names, got the string {kids!r}")
            for kid in kids:
                if kid not in self._index and kid not in children:
                    raise KeyError(f"child {kid!r} of parent {parent!r} is not a known concept or parent")

        leaves: dict[str, set] = {}

        def descend(parent: str, path: tuple) -> set:
            if parent in path:
                raise ValueError(f"the hierarchy has a cycle: {' -> '.join(path + (parent,))}")
            if parent not in leaves:
                found = set()
                for kid in children[parent]:
                    found |= descend(kid, path + (parent,)) if kid in children else {self._index[kid]}
                leaves[parent] = found
            return leaves[parent]

        # membership[k, p]: concept k is a descendant of parent p; one sparse product adds all parents
        rows_, cols_ = [], []
        for p, parent in enumerate(children):
            members = sorted(descend(parent, ()))
            rows_ += members
            cols_ += [p] * len(members)
        membership = scipy.sparse.csr_matrix(
            (np.ones(len(rows_), dtype=np.int64), (rows_, cols_)), shape=(self.n_concepts, len(children))
        )
        parents = (self._matrix.astype(np.int64) @ membership) > 0
        matrix = scipy.sparse.hstack([self._matrix, parents], format="csr", dtype=np.bool_)
        return ConceptLabels(matrix, self._names + list(children), self._descriptions)

    @classmethod
    def from_targets(
        cls,
        targets: ArrayLike,
        class_names: Sequence[str],
        hierarchy: Mapping[str, Iterable[str]] | None = None,
        descriptions: Sequence[str] | Mapping[str, str] | None = None,
    ) -> ConceptLabels:
        """Concepts from class targets: one concept per class, plus optional parent concepts.

        Parameters
        ----------
        targets : array-like of int
            ``[N]`` class indices in ``[0, len(class_names))``.
        class_names : sequence of str
            The class names, one concept each.
        hierarchy : mapping, optional
            Parent -> children (class names or other parents); see :meth:`with_hierarchy`.
        descriptions : optional
            Descriptions of the classes (and parents, as a mapping).
        """
        if isinstance(targets, torch.Tensor):
            targets = targets.detach().cpu().numpy()
        targets = np.asarray(targets)
        if targets.ndim != 1:
            raise ValueError(f"targets must be 1-d [N] class indices, got shape {targets.shape}")
        if not np.issubdtype(targets.dtype, np.integer):
            raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
        n_classes = len(class_names)
        if targets.size and (targets.min() < 0 or targets.max() >= n_classes):
            bad = targets[(targets < 0) | (targets >= n_classes)][0]
            raise ValueError(f"target {bad} is out of range for {n_classes} classes")
        matrix = scipy.sparse.csr_matrix(
            (np.ones(len(targets), dtype=np.bool_), (np.arange(len(targets)), targets)),
            shape=(len(targets), n_classes), dtype=np.bool_,
        )
        class_descriptions = descriptions
        if isinstance(descriptions, Mapping):
            class_descriptions = {k: v for k, v in descriptions.items() if k in set(class_names)}
        labels = cls(matrix, class_names, class_descriptions)
        if hierarchy:
            labels = labels.with_hierarchy(hierarchy)
            if isinstance(descriptions, Mapping):
                labels._descriptions.update({k: str(v) for k, v in descriptions.items() if k in hierarchy})
        return labels

    def merge(self, other: ConceptLabels) -> ConceptLabels:
        """Stack the samples of two datasets; a concept missing from one dataset is negative there.

        This is how the INVERT paper (appendix A.4) combines datasets with different concept sets.
        The result has the samples of ``self`` followed by those of ``other`` and the concepts of
        ``self`` followed by the concepts only ``other`` has.
        """
        if not isinstance(other, ConceptLabels):
            raise TypeError(f"can only merge with ConceptLabels, got {type(other).__name__}")
        names = self._names + [name for name in other._names if name not in self._index]
        index = {name: i for i, name in enumerate(names)}
        top = scipy.sparse.csr_matrix(
            (self._matrix.data, self._matrix.indices, self._matrix.indptr),
            shape=(self.n_samples, len(names)), dtype=np.bool_,
        )
        remap = np.array([index[name] for name in other._names], dtype=np.int64)
        other_coo = other._matrix.tocoo()
        bottom = scipy.sparse.csr_matrix(
            (other_coo.data, (other_coo.row, remap[other_coo.col])),
            shape=(other.n_samples, len(names)), dtype=np.bool_,
        )
        descriptions = dict(other._descriptions)
        descriptions.update(self._descriptions)
        return ConceptLabels(scipy.sparse.vstack([top, bottom], format="csr"), names, descriptions)

    # files --------------------------------------------------------------------------------------
    def save(self, path: str | PathLike) -> None:
        """Save as ``.npz``: CSR arrays ``indices``, ``indptr``, ``shape``, plus ``names``."""
        matrix = self._matrix
        arrays = {
            "indices": matrix.indices.astype(np.int64),
            "indptr": matrix.indptr.astype(np.int64),
            "shape": np.asarray(matrix.shape, dtype=np.int64),
            "names": np.asarray(self._names, dtype=str),
        }
        if self._descriptions:
            arrays["descriptions"] = np.asarray([self._descriptions.get(n, "") for n in self._names], dtype=str)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | PathLike) -> ConceptLabels:
        """Load an ``.npz`` with ``names`` and either a dense ``labels`` [N, K] or CSR arrays
        ``indices``, ``indptr``, ``shape`` (and optionally ``data``; as written by :meth:`save`).

        Every array is checked before it is used: the file must be a zip of plain ``.npy`` arrays
        (pickles and object arrays are refused), of the expected dtype and shape, and the CSR arrays must be
        consistent (monotone ``indptr`` from 0 to ``len(indices)``, indices in range).

        Raises
        ------
        FileNotFoundError
            If there is no such file.
        ValueError, TypeError, KeyError
            For an unreadable, empty, truncated or inconsistent file; the message names the file and the array.
        """
        path = Path(path)
        arrays = _read_npz(path, ("names", "descriptions", "labels", "indices", "indptr", "shape", "data"))
        where = f"{str(path)!r}"
        if "names" not in arrays:
            raise KeyError(f"{where} has no 'names' array; it has {sorted(arrays['_all'])}")
        names = _string_array(arrays["names"], f"{where} 'names'")
        descriptions = None
        if "descriptions" in arrays:
            descriptions = _string_array(arrays["descriptions"], f"{where} 'descriptions'")
        if "labels" in arrays:
            labels: Any = arrays["labels"]
            if labels.ndim != 2:
                raise ValueError(f"{where} 'labels' must be a 2-d [N, K] matrix, got shape {labels.shape}")
            if labels.shape[1] != len(names):
                raise ValueError(f"{where} has {len(names)} names for {labels.shape[1]} label columns")
            labels = scipy.sparse.csr_matrix(_checked_values(labels, f"{where} 'labels'"), dtype=np.bool_)
        elif {"indices", "indptr", "shape"} <= set(arrays):
            shape = arrays["shape"]
            if shape.ndim != 1 or shape.dtype.kind not in "iu":
                raise ValueError(f"{where} 'shape' must be two integers, got {shape.dtype} {shape.shape}")
            shape = _check_shape([int(size) for size in shape], f"{where} labels")
            if shape[1] != len(names):
                raise ValueError(f"{where} has {len(names)} names for {shape[1]} label columns")
            labels = _csr(arrays.get("data"), arrays["indptr"], arrays["indices"], shape, f"{where} labels")
        else:
            raise KeyError(
                f"{where} needs a dense 'labels' array or CSR arrays 'indices', 'indptr', 'shape'; "
                f"it has {sorted(arrays['_all'])}"
            )
        try:
            return cls(labels, names, descriptions)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{where}: {error}") from None

    @classmethod
    def from_reference(
        cls, labels_path: str | PathLike, description_path: str | PathLike
    ) -> ConceptLabels:
        """Load the reference INVERT implementation's concept files.

        Parameters
        ----------
        labels_path : path
            A one-hot ``[N, K]`` tensor saved with ``torch.save`` (loaded with ``weights_only=True``).
        description_path : path
            Its JSON description: one entry per column, in column order, either a mapping
            ``key -> {"name": ..., "offset": ..., "description": ...}`` or a list of such objects.
            Names that occur twice (ImageNet has two "crane") get their offset or key appended.
        """
        labels_path = Path(labels_path)
        where = f"{str(labels_path)!r}"
        if not labels_path.is_file():
            raise FileNotFoundError(f"no such labels file {where}")
        try:
            labels = torch.load(labels_path, map_location="cpu", weights_only=True)
        except Exception as error:  # an untrusted file: every failure of the loader is the file's
            text = " ".join(str(error).split())[:300]
            raise ValueError(
                f"{where} is not a tensor file that torch.load can read safely ({type(error).__name__}: {text})"
            ) from None
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{where} must hold a tensor, got {type(labels).__name__}")
        if labels.layout == torch.strided:
            if labels.ndim != 2:
                raise ValueError(f"{where} must hold a 2-d [N, K] tensor, got shape {tuple(labels.shape)}")
            fits_in_memory(labels.numel(), f"the labels of {where}")
        description = read_json(description_path, "concept description")
        if isinstance(description, Mapping):
            entries = list(description.items())
        elif isinstance(description, list):
            entries = list(enumerate(description))
        else:
            raise ValueError(
                f"concept description {str(description_path)!r} must be a JSON list or object, "
                f"got {type(description).__name__}"
            )
        names, texts = [], []
        for key, entry in entries:
            if isinstance(entry, Mapping):
                name, text = entry.get("name", key), entry.get("description", "")
            else:
                name, text = entry, ""
            if isinstance(name, (dict, list)) or isinstance(text, (dict, list)):
                raise ValueError(
                    f"concept description {str(description_path)!r}: entry {key!r} must have a plain name and "
                    "description"
                )
            names.append(str(name))
            texts.append("" if text is None else str(text))
        counts: dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        for i, (key, entry) in enumerate(entries):
            if counts[names[i]] > 1:
                suffix = entry.get("offset", key) if isinstance(entry, Mapping) else key
                logger.warning("concept name %r occurs more than once; using %r", names[i], f"{names[i]} ({suffix})")
                names[i] = f"{names[i]} ({suffix})"
        try:
            return cls(labels, names, texts)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{where} with {str(description_path)!r}: {error}") from None


# reading .npz files without numpy's pickle-capable loader -------------------------------------------------
_NPY_KINDS = "biufUS"


def _read_npz(path: Path, wanted: Sequence[str]) -> dict[str, Any]:
    """The arrays ``wanted`` (those present) of the ``.npz`` at ``path``, read member by member: each header
    is checked (plain dtype, no objects, data size within the member) before its data are read.

    The result also has ``"_all"``: the names of every array in the archive.
    """
    where = f"{str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"no such concepts file {where}")
    if path.is_dir():
        raise ValueError(f"concepts file {where} is a folder")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if not head:
        raise ValueError(f"concepts file {where} is empty (0 bytes); expected an .npz archive")
    if not zipfile.is_zipfile(path):
        if head.startswith(b"\x93NUMPY"):
            kind = "a single .npy array"
        elif head[:1] == b"\x80":
            kind = "a Python pickle (refused: loading pickles runs code)"
        else:
            kind = "not a zip archive"
        raise ValueError(f"concepts file {where} is not an .npz archive: it is {kind}")
    result: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
            result["_all"] = sorted(members)
            for name in wanted:
                if name in members:
                    result[name] = _read_member(archive, members[name], f"{where} array {name!r}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error, NotImplementedError,
            RuntimeError) as error:
        raise ValueError(f"concepts file {where} is a damaged .npz archive: {error}") from None
    return result


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    with archive.open(info) as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except (ValueError, SyntaxError, TypeError, EOFError) as error:
            raise ValueError(f"{where} is not a plain .npy array: {error}") from None
        if dtype.hasobject:
            raise ValueError(f"{where} holds Python objects (loading them needs pickle, which is refused)")
        if dtype.kind not in _NPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise TypeError(f"{where} has dtype {dtype}; expected bool, integers, floats or strings")
        if dtype.itemsize == 0:
            raise TypeError(f"{where} has the empty dtype {dtype}")
        count = 1
        for size in shape:
            count *= int(size)
        n_bytes = count * dtype.itemsize
        if n_bytes > info.file_size:
            raise ValueError(
                f"{where} declares shape {shape} ({n_bytes} bytes) but the archive holds {info.file_size} bytes "
                "(truncated or forged header)"
            )
        fits_in_memory(n_bytes, where)
        data = handle.read(n_bytes)
    if len(data) != n_bytes:
        raise ValueError(f"{where} is truncated: {len(data)} of {n_bytes} bytes")
    array = np.frombuffer(data, dtype=dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C").copy()


def _string_array(array: np.ndarray, where: str) -> list[str]:
    """A 1-d array of unicode (or UTF-8 bytes) strings as a list of str."""
    if array.ndim != 1:
        raise ValueError(f"{where} must be a 1-d array of strings, got shape {array.shape}")
    if array.dtype.kind == "S":
        try:
            return [bytes(item).decode("utf-8") for item in array]
        except UnicodeDecodeError as error:
            raise ValueError(f"{where} holds bytes that are not UTF-8: {error}") from None
    if array.dtype.kind != "U":
        raise TypeError(f"{where} must hold strings, got dtype {array.dtype}")
    return [str(item) for item in array]
