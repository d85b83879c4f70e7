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

import json
import logging
import warnings
from os import PathLike
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import scipy.sparse
import torch

__all__ = ["ConceptLabels"]

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor, "scipy.sparse.spmatrix", Sequence]


def _to_csr(labels: Any) -> scipy.sparse.csr_matrix:
    """Boolean CSR matrix from dense or sparse numpy / torch / scipy input; checks the values."""
    if isinstance(labels, torch.Tensor):
        if labels.layout != torch.strided:
            labels = labels.to_sparse_coo().coalesce()
            indices = labels.indices().cpu().numpy()
            values = labels.values().cpu().numpy()
            if labels.ndim != 2:
                raise ValueError(f"labels must be a 2-d [N, K] matrix, got shape {tuple(labels.shape)}")
            matrix = scipy.sparse.coo_matrix((values, (indices[0], indices[1])), shape=tuple(labels.shape))
            return _to_csr(matrix.tocsr())
        labels = labels.detach().cpu().numpy()
    if scipy.sparse.issparse(labels):
        matrix = scipy.sparse.csr_matrix(labels)
        if matrix.ndim != 2:
            raise ValueError(f"labels must be a 2-d [N, K] matrix, got shape {matrix.shape}")
        matrix.sum_duplicates()
        data = matrix.data
        if data.dtype != np.bool_:
            bad = (data != 0) & (data != 1)
            if np.any(bad):
                raise ValueError(
                    f"labels must be boolean or 0/1, found value {data[bad][0]!r} in sparse labels"
                )
        matrix = scipy.sparse.csr_matrix(
            (data != 0, matrix.indices, matrix.indptr), shape=matrix.shape, dtype=np.bool_
        )
        matrix.eliminate_zeros()
        matrix.sort_indices()
        return matrix
    array = np.asarray(labels)
    if array.ndim != 2:
        raise ValueError(f"labels must be a 2-d [N, K] matrix, got shape {array.shape}")
    if array.dtype != np.bool_:
        if not (np.issubdtype(array.dtype, np.number)):
            raise TypeError(f"labels must be boolean or numeric 0/1, got dtype {array.dtype}")
        bad = (array != 0) & (array != 1)
        if np.any(bad):
            raise ValueError(f"labels must be boolean or 0/1, found value {array[bad][0]!r}")
    matrix = scipy.sparse.csr_matrix(array != 0, dtype=np.bool_)
    matrix.sort_indices()
    return matrix


def _check_names(names: Any) -> List[str]:
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"names must be a sequence of str, got {type(names).__name__}")
    names = [name.item() if isinstance(name, np.generic) else name for name in names]
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"concept names must be str, got {type(name).__name__}: {name!r}")
        if not name.strip():
            raise ValueError(f"concept names must not be empty, got {name!r}")
    seen, duplicates = set(), []
    for name in names:
        if name in seen and name not in duplicates:
            duplicates.append(name)
        seen.add(name)
    if duplicates:
        raise ValueError(f"concept names must be unique, duplicated: {duplicates}")
    return names


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
        descriptions: Optional[Union[Sequence[str], Mapping[str, str]]] = None,
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
        self._columns: Optional[scipy.sparse.csc_matrix] = None

    def _check_descriptions(self, descriptions: Any) -> Dict[str, str]:
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
    def names(self) -> List[str]:
        """The K concept names, in column order."""
        return list(self._names)

    @property
    def descriptions(self) -> Dict[str, str]:
        """Descriptions by concept name (only the concepts that have one)."""
        return dict(self._descriptions)

    @property
    def n_samples(self) -> int:
        return self._matrix.shape[0]

    @property
    def n_concepts(self) -> int:
        return self._matrix.shape[1]

    @property
    def shape(self) -> tuple:
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
        """The column of concept ``name``; ``KeyError`` naming it if unknown."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown concept {name!r}; known concepts: {self._preview()}") from None

    def _preview(self) -> str:
        shown = ", ".join(repr(n) for n in self._names[:8])
        return f"[{shown}{', ...' if self.n_concepts > 8 else ''}] ({self.n_concepts} in all)"

    # access -------------------------------------------------------------------------------------
    def sparse(self) -> scipy.sparse.csr_matrix:
        """The labels as a boolean scipy CSR matrix ``[N, K]`` (a copy)."""
        return self._matrix.copy()

    def counts(self) -> np.ndarray:
        """Number of positive samples of every concept, ``[K]`` int64."""
        return np.asarray(self._matrix.sum(axis=0), dtype=np.int64).ravel()

    def dense(self, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """The labels as a dense boolean tensor ``[N, K]``."""
        return torch.from_numpy(self._matrix.toarray()).to(device)

    def mask(self, name: str, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """The boolean ``[N]`` mask of the samples that have concept ``name``."""
        column = self.index(name)
        if self._columns is None:
            self._columns = self._matrix.tocsc()
        rows = self._columns.indices[self._columns.indptr[column]:self._columns.indptr[column + 1]]
        mask = torch.zeros(self.n_samples, dtype=torch.bool)
        mask[torch.from_numpy(rows.astype(np.int64))] = True
        return mask.to(device)

    def torch_sparse_t(self, device: Union[str, torch.device, None] = None,
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
    def subset(self, samples: Union[np.ndarray, torch.Tensor, Sequence[int], slice]) -> "ConceptLabels":
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

    def with_hierarchy(self, hierarchy: Mapping[str, Iterable[str]]) -> "ConceptLabels":
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

        leaves: Dict[str, set] = {}

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
        hierarchy: Optional[Mapping[str, Iterable[str]]] = None,
        descriptions: Optional[Union[Sequence[str], Mapping[str, str]]] = None,
    ) -> "ConceptLabels":
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

    def merge(self, other: "ConceptLabels") -> "ConceptLabels":
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
    def save(self, path: Union[str, PathLike]) -> None:
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
    def load(cls, path: Union[str, PathLike]) -> "ConceptLabels":
        """Load an ``.npz`` with ``names`` and either a dense ``labels`` [N, K] or CSR arrays
        ``indices``, ``indptr``, ``shape`` (as written by :meth:`save`)."""
        path = Path(path)
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable .npz file: {error}") from error
        with archive:
            keys = set(archive.files)
            if "names" not in keys:
                raise KeyError(f"{path} has no 'names' array; it has {sorted(keys)}")
            names = [str(name) for name in archive["names"]]
            descriptions = None
            if "descriptions" in keys:
                descriptions = [str(text) for text in archive["descriptions"]]
            if "labels" in keys:
                labels: Any = archive["labels"]
            elif {"indices", "indptr", "shape"} <= keys:
                shape = tuple(int(s) for s in archive["shape"])
                if len(shape) != 2:
                    raise ValueError(f"{path}: 'shape' must have two entries, got {shape}")
                indices, indptr = archive["indices"], archive["indptr"]
                if len(indptr) != shape[0] + 1 or (len(indices) and indices.max() >= shape[1]):
                    raise ValueError(f"{path}: CSR arrays do not match shape {shape}")
                labels = scipy.sparse.csr_matrix(
                    (np.ones(len(indices), dtype=np.bool_), indices, indptr), shape=shape
                )
            else:
                raise KeyError(
                    f"{path} needs a dense 'labels' array or CSR arrays 'indices', 'indptr', 'shape'; "
                    f"it has {sorted(keys)}"
                )
        return cls(labels, names, descriptions)

    @classmethod
    def from_reference(
        cls, labels_path: Union[str, PathLike], description_path: Union[str, PathLike]
    ) -> "ConceptLabels":
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
        labels = torch.load(labels_path, map_location="cpu", weights_only=True)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{labels_path} must hold a tensor, got {type(labels).__name__}")
        with open(description_path, encoding="utf-8") as handle:
            description = json.load(handle)
        entries = list(description.items()) if isinstance(description, Mapping) else list(enumerate(description))
        names, texts = [], []
        for key, entry in entries:
            if isinstance(entry, Mapping):
                names.append(str(entry.get("name", key)))
                texts.append(str(entry.get("description", "")))
            else:
                names.append(str(entry))
                texts.append("")
        counts: Dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        for i, (key, entry) in enumerate(entries):
            if counts[names[i]] > 1:
                suffix = entry.get("offset", key) if isinstance(entry, Mapping) else key
                logger.warning("concept name %r occurs more than once; using %r", names[i], f"{names[i]} ({suffix})")
                names[i] = f"{names[i]} ({suffix})"
        return cls(labels, names, texts)
