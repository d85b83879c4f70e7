"""ConceptLabeler and LayerLabels: the user-facing objects over :func:`crp_invert.search.beam_search`.

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

import csv
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from os import PathLike
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .concepts import ConceptLabels
from .formula import Formula
from .metrics import auc_from_rank_sums, benjamini_hochberg, mann_whitney_pvalue, rank_scores
from .search import MODES, BeamState, PreparedLabels, beam_search, prepare_labels

__all__ = ["Explanation", "LayerLabels", "ConceptLabeler", "default_feature_batch_size", "available_memory"]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Explanation:
    """One formula explaining one feature, with its statistics.

    Attributes
    ----------
    formula : Formula
        The explanation.
    auc : float
        AUROC of the feature's activations against the formula's sample mask (search samples).
    fraction : float
        Share of the (search) samples for which the formula holds.
    length : int
        Number of atoms in the formula.
    p_value : float
        One-sided Mann-Whitney U p-value (``greater`` in positive mode, ``less`` in negative
        mode); it ignores that the formula was selected among many.
    n_candidates : int
        Number of candidate formulas the search scored for this feature (those that satisfied the
        fraction constraints), the size of the family the formula was picked from.
    p_value_bonferroni : float
        ``min(1, p_value * n_candidates)``: corrected for the selection within the feature.
    p_value_bh : float
        Benjamini-Hochberg adjustment of ``p_value_bonferroni`` over the features of the layer
        (for explanations at the same beam position).
    validation_auc, validation_p_value, validation_fraction : float or None
        The same statistics on held-out samples that the search did not see (``validation=``).
    """

    formula: Formula
    auc: float
    fraction: float
    length: int
    p_value: float
    n_candidates: int = 0
    p_value_bonferroni: float = math.nan
    p_value_bh: float = math.nan
    validation_auc: Optional[float] = None
    validation_p_value: Optional[float] = None
    validation_fraction: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        data = asdict(self)
        data["formula"] = self.formula.to_json()
        data["text"] = str(self.formula)
        return {key: _json_float(value) for key, value in data.items()}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Explanation":
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["formula"] = Formula.from_json(data["formula"])
        for key, value in list(values.items()):
            if value is None and key in ("p_value", "p_value_bonferroni", "p_value_bh"):
                values[key] = math.nan
        return cls(**values)


def _json_float(value: Any) -> Any:
    # JSON has no NaN; store it as null (restored by from_json)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class LayerLabels:
    """The explanations of every feature of one layer, best first.

    Index by feature to get its list of :class:`Explanation` (at most B, possibly empty when no
    formula satisfied the constraints).

    Attributes
    ----------
    concept_names : list of str
        The concepts the search could use.
    layer : str or None
        The layer name, if known.
    parameters : dict
        The search parameters (L, B, mode, fractions, ...), stored with the results.
    states : list of list of list of Explanation, or None
        With ``memorize_states=True``: ``states[l - 1][f]`` is the beam of feature f after
        length l (p-values uncorrected).
    """

    def __init__(
        self,
        explanations: Sequence[Sequence[Explanation]],
        concept_names: Sequence[str],
        layer: Optional[str] = None,
        parameters: Optional[Dict[str, Any]] = None,
        states: Optional[List[List[List[Explanation]]]] = None,
    ) -> None:
        self._explanations = [list(beam) for beam in explanations]
        self.concept_names = list(concept_names)
        self.layer = layer
        self.parameters = dict(parameters or {})
        self.states = states

    # sequence protocol --------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return len(self._explanations)

    def __len__(self) -> int:
        return len(self._explanations)

    def __getitem__(self, feature: int) -> List[Explanation]:
        if not isinstance(feature, (int, np.integer)):
            raise TypeError(f"features are indexed by int, got {type(feature).__name__}")
        if not -self.n_features <= feature < self.n_features:
            raise IndexError(f"feature {feature} out of range for a layer of {self.n_features} features")
        return list(self._explanations[feature])

    def __iter__(self) -> Iterator[List[Explanation]]:
        return (list(beam) for beam in self._explanations)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerLabels):
            return NotImplemented
        return (
            self._explanations == other._explanations
            and self.concept_names == other.concept_names
            and self.layer == other.layer
        )

    def __repr__(self) -> str:
        layer = f"{self.layer!r}, " if self.layer else ""
        return f"LayerLabels({layer}n_features={self.n_features}, {self.parameters})"

    def best(self, feature: int) -> Optional[Explanation]:
        """The best explanation of ``feature``, or None if it has none."""
        beam = self[feature]
        return beam[0] if beam else None

    @staticmethod
    def concatenate(parts: Sequence["LayerLabels"]) -> "LayerLabels":
        """Join the labels of consecutive feature ranges (e.g. of several processes).

        The Benjamini-Hochberg q-values are recomputed over the joined features, so the result equals
        labeling all features at once.
        """
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        explanations = [beam for part in parts for beam in part._explanations]
        states = None
        if all(part.states is not None for part in parts):
            states = [
                [beam for part in parts for beam in part.states[step]] for step in range(len(first.states))
            ]
        return LayerLabels(_correct(explanations), first.concept_names, first.layer, first.parameters, states)

    # views and files ----------------------------------------------------------------------------
    def rows(self) -> List[Dict[str, Any]]:
        """One dict per feature with its best explanation (empty fields where it has none)."""
        rows = []
        for feature, beam in enumerate(self._explanations):
            row: Dict[str, Any] = {"feature": feature}
            if beam:
                best = beam[0]
                row.update(
                    formula=str(best.formula), auc=best.auc, fraction=best.fraction, length=best.length,
                    p_value=best.p_value, p_value_bonferroni=best.p_value_bonferroni,
                    p_value_bh=best.p_value_bh, n_candidates=best.n_candidates,
                    validation_auc=best.validation_auc, validation_p_value=best.validation_p_value,
                )
            rows.append(row)
        return rows

    def table(self, max_rows: Optional[int] = None, max_width: int = 60) -> str:
        """A plain-text table of the best explanation of every feature."""
        has_validation = any(beam and beam[0].validation_auc is not None for beam in self._explanations)
        header = ["feature", "formula", "AUC", "fraction", "p (Bonf.)", "q (BH)"]
        if has_validation:
            header.append("held-out AUC")
        lines = []
        for row in self.rows()[:max_rows]:
            if "formula" not in row:
                lines.append([str(row["feature"]), "(no formula)"] + [""] * (len(header) - 2))
                continue
            formula = row["formula"]
            if len(formula) > max_width:
                formula = formula[: max_width - 3] + "..."
            line = [
                str(row["feature"]), formula, f"{row['auc']:.4f}", f"{row['fraction']:.3f}",
                f"{row['p_value_bonferroni']:.2e}", f"{row['p_value_bh']:.2e}",
            ]
            if has_validation:
                auc = row["validation_auc"]
                line.append("" if auc is None else f"{auc:.4f}")
            lines.append(line)
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
        render = [
            "  ".join(cell.ljust(width) for cell, width in zip(header, widths)),
            "  ".join("-" * width for width in widths),
        ]
        render += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines]
        if max_rows is not None and self.n_features > max_rows:
            render.append(f"... {self.n_features - max_rows} more features")
        return "\n".join(line.rstrip() for line in render)

    def to_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {
            "format": "crp-invert.LayerLabels",
            "version": _FORMAT_VERSION,
            "layer": self.layer,
            "parameters": self.parameters,
            "concept_names": self.concept_names,
            "features": [[e.to_json() for e in beam] for beam in self._explanations],
        }
        if self.states is not None:
            data["states"] = [[[e.to_json() for e in beam] for beam in step] for step in self.states]
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LayerLabels":
        if not isinstance(data, dict) or data.get("format") != "crp-invert.LayerLabels":
            raise ValueError("not a crp-invert LayerLabels JSON document (missing format tag)")
        if data.get("version", 0) > _FORMAT_VERSION:
            raise ValueError(f"LayerLabels format version {data['version']} is newer than this crp-invert")
        explanations = [[Explanation.from_json(e) for e in beam] for beam in data["features"]]
        states = None
        if data.get("states") is not None:
            states = [[[Explanation.from_json(e) for e in beam] for beam in step] for step in data["states"]]
        return cls(explanations, data["concept_names"], data.get("layer"), data.get("parameters"), states)

    def to_json(self, path: Union[str, PathLike]) -> None:
        """Write all explanations losslessly (floats round-trip exactly) as JSON."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle)

    @classmethod
    def from_json(cls, path: Union[str, PathLike]) -> "LayerLabels":
        """Read labels written by :meth:`to_json`."""
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls.from_dict(data)

    def to_csv(self, path: Union[str, PathLike], style: str = "full") -> None:
        """Write one row per feature with its best explanation.

        Parameters
        ----------
        path : path
            The CSV file.
        style : {"full", "benchmark"}
            ``"full"``: feature, formula, auc, fraction, length, p_value, p_value_bonferroni,
            p_value_bh, n_candidates (and validation_auc, validation_p_value).
            ``"benchmark"``: the ``neuron,concept,concept_id,metric`` layout that neuron-description
            benchmarks read INVERT labels in; ``concept_id`` is the concept's column for a single
            concept and the formula over column indices for a compound formula; ``metric`` is the AUC.
        """
        if style == "full":
            columns = ["feature", "formula", "auc", "fraction", "length", "p_value", "p_value_bonferroni",
                       "p_value_bh", "n_candidates", "validation_auc", "validation_p_value"]
            rows = self.rows()
        elif style == "benchmark":
            columns = ["neuron", "concept", "concept_id", "metric"]
            index = {name: i for i, name in enumerate(self.concept_names)}
            rows = []
            for feature, beam in enumerate(self._explanations):
                if not beam:
                    continue
                formula = beam[0].formula
                rows.append({
                    "neuron": feature, "concept": str(formula),
                    "concept_id": _formula_ids(formula, index), "metric": beam[0].auc,
                })
        else:
            raise ValueError(f"style must be 'full' or 'benchmark', got {style!r}")
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: ("" if row.get(key) is None else row.get(key, "")) for key in columns})


def _formula_ids(formula: Formula, index: Dict[str, int]) -> str:
    if formula.kind == "concept":
        return str(index[formula.name])
    renamed = _rename(formula, {name: str(index[name]) for name in formula.concepts})
    return str(renamed)


def _rename(formula: Formula, mapping: Dict[str, str]) -> Formula:
    if formula.kind == "concept":
        return Formula.concept(mapping[formula.name])
    children = [_rename(child, mapping) for child in formula.children]
    if formula.kind == "not":
        return Formula.not_(children[0])
    return Formula.and_(*children) if formula.kind == "and" else Formula.or_(*children)


def available_memory(device: Union[str, torch.device, None] = None) -> Optional[int]:
    """Free memory in bytes: of the GPU for a CUDA device, else the host's available RAM (None if
    unknown)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def default_feature_batch_size(n_samples: int, B: int, memory_bytes: Optional[int] = None,
                               device: Union[str, torch.device, None] = None) -> int:
    """A feature batch size that keeps the search's working memory within ``memory_bytes``.

    A beam step holds, per feature and sample, about ``8 (5 B + 3)`` bytes (ranks, masks, the packed
    product operand, the gathered masks; measured: 82 bytes at B = 3 and N = 1 M, see
    BENCHMARKS.md), plus the ``[F, 4 K B]`` candidate statistics. By default the budget is a quarter
    of the free memory of ``device`` (host RAM or GPU), at most 512 MiB on a CPU (larger batches
    are no faster there: they leave the caches) and 4 GiB on a GPU, and at least 128 MiB.
    """
    if memory_bytes is None:
        free = available_memory(device)
        if free is not None:
            # processes that torchrun started on one node share its memory
            free //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        on_gpu = device is not None and torch.device(device).type == "cuda"
        cap = (4 << 30) if on_gpu else (512 << 20)
        memory_bytes = cap if free is None else min(cap, max(128 << 20, free // 4))
    per_feature = 8 * n_samples * (5 * B + 3)
    return int(max(1, min(4096, memory_bytes // max(per_feature, 1))))


class ConceptLabeler:
    """Label features (channels, neurons) with INVERT explanations over a set of concepts.

    Parameters
    ----------
    concepts : ConceptLabels
        The labels of the N samples the activations were recorded on.
    device : str or torch.device
        Where the search runs ("cpu", "cuda", ...).

    Examples
    --------
    >>> labeler = ConceptLabeler(concepts, device="cpu")          # doctest: +SKIP
    >>> result = labeler.label(activations, L=3, B=3)             # doctest: +SKIP
    >>> result[5][0].formula, result[5][0].auc                    # doctest: +SKIP
    """

    def __init__(self, concepts: ConceptLabels, device: Union[str, torch.device] = "cpu") -> None:
        if not isinstance(concepts, ConceptLabels):
            raise TypeError(f"concepts must be a ConceptLabels, got {type(concepts).__name__}")
        self.concepts = concepts
        self.device = torch.device(device)
        self._cached_labels: Optional[PreparedLabels] = None

    def __repr__(self) -> str:
        return f"ConceptLabeler({self.concepts!r}, device={str(self.device)!r})"

    def _prepared_labels(self) -> PreparedLabels:
        # built once: preparing a large label matrix costs more than a small search
        if self._cached_labels is None:
            self._cached_labels = prepare_labels(self.concepts.torch_sparse_t(self.device))
        return self._cached_labels

    def label(
        self,
        activations: Any,
        L: int = 3,
        B: int = 3,
        limit_search: Optional[int] = None,
        min_fraction: float = 0.0,
        max_fraction: float = 0.5,
        mode: str = "positive",
        memorize_states: bool = False,
        feature_batch_size: Optional[int] = None,
        validation: Union[None, float, np.ndarray, torch.Tensor] = None,
        layer: Optional[str] = None,
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
        memorize_states : bool
            Also keep the beam after every length in ``LayerLabels.states``.
        feature_batch_size : int, optional
            Features searched together; bounds memory. By default chosen from the free memory
            of the device (see :func:`default_feature_batch_size`): about ``8 (5 B + 3) N`` bytes
            per feature.
        validation : float or boolean mask, optional
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
        """
        L, B = _check_positive_int(L, "L"), _check_positive_int(B, "B")
        if limit_search is not None:
            limit_search = _check_positive_int(limit_search, "limit_search")
        min_fraction = _check_fraction(min_fraction, "min_fraction")
        max_fraction = _check_fraction(max_fraction, "max_fraction")
        if min_fraction > max_fraction:
            raise ValueError(f"min_fraction ({min_fraction}) must not exceed max_fraction ({max_fraction})")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if feature_batch_size is not None:
            feature_batch_size = _check_positive_int(feature_batch_size, "feature_batch_size")

        shape = _shape_of(activations)
        n_samples, n_features = shape
        if n_samples != self.concepts.n_samples:
            raise ValueError(
                f"activations have N = {n_samples} samples but the concept labels have "
                f"N = {self.concepts.n_samples}; they must describe the same samples in the same order"
            )
        held_out = _validation_mask(validation, n_samples, seed)
        search_rows = None if held_out is None else torch.from_numpy(np.flatnonzero(~held_out))
        search_concepts = self.concepts if held_out is None else self.concepts.subset(~held_out)
        held_concepts = None if held_out is None else self.concepts.subset(held_out)
        if search_concepts.n_samples < 2:
            raise ValueError("fewer than 2 samples are left for the search after the validation split")

        if held_out is None:
            labels_t = self._prepared_labels()
        else:
            labels_t = prepare_labels(search_concepts.torch_sparse_t(self.device))
        held_labels = None if held_concepts is None else held_concepts.dense(self.device)
        if feature_batch_size is None:
            feature_batch_size = default_feature_batch_size(search_concepts.n_samples, B, device=self.device)

        parameters = dict(
            L=L, B=B, limit_search=limit_search, min_fraction=min_fraction, max_fraction=max_fraction,
            mode=mode, n_samples=n_samples, n_search_samples=search_concepts.n_samples,
            validation=None if held_out is None else int(held_out.sum()),
        )
        names = self.concepts.names
        decoder = _Decoder(names)
        explanations: List[List[Explanation]] = []
        states: Optional[List[List[List[Explanation]]]] = [[] for _ in range(L)] if memorize_states else None
        starts = range(0, n_features, feature_batch_size)
        bar = tqdm(starts, desc=f"labeling {layer}" if layer else "labeling", unit="batch",
                   disable=not progress or len(starts) <= 1, leave=False)
        n_search = search_concepts.n_samples
        for start in bar:
            stop = min(start + feature_batch_size, n_features)
            block = _read_columns(activations, start, stop, self.device)
            _check_finite(block, start)
            search_block = block if search_rows is None else block[search_rows.to(block.device)]
            result = beam_search(
                search_block, labels_t, L=L, B=B, limit_search=limit_search, min_fraction=min_fraction,
                max_fraction=max_fraction, mode=mode, memorize_states=memorize_states,
            )
            held = None
            if held_out is not None:
                held = _held_out_statistics(
                    block[torch.from_numpy(held_out).to(block.device)], held_labels, result.beam,
                    len(names), mode,
                )
            explanations += decoder.explanations(result.beam, result.p_value, result.n_candidates, n_search, held)
            if states is not None:
                for step, state in enumerate(result.states):
                    alternative = "greater" if mode == "positive" else "less"
                    p_value = mann_whitney_pvalue(
                        state.auc.nan_to_num(0.5), state.n_positive, n_search, result.tie_term[:, None], alternative
                    )
                    states[step] += decoder.explanations(state, p_value, result.n_candidates, n_search, None)
        explanations = _correct(explanations)
        return LayerLabels(explanations, names, layer, parameters, states)

    def label_cache(self, cache: Any, layers: Optional[Sequence[str]] = None, source: str = "activation",
                    **label_kwargs: Any) -> Dict[str, LayerLabels]:
        """Label every channel of the layers of an :class:`~crp_invert.ActivationCache`.

        ``source`` is ``"activation"`` or ``"relevance"``; other keyword arguments go to
        :meth:`label`. Channels are read from HDF5 in column batches.
        """
        from .cache import label_cache

        return label_cache(self, cache, layers=layers, source=source, **label_kwargs)

    def label_h5(self, path: Union[str, PathLike], dataset: str = "Y", **label_kwargs: Any) -> LayerLabels:
        """Label every column of the INVERT release's single-file HDF5 format (dataset ``Y``)."""
        from .cache import label_h5

        return label_h5(self, path, dataset=dataset, **label_kwargs)


# helpers -----------------------------------------------------------------------------------------
def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}: {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _shape_of(activations: Any) -> tuple:
    shape = getattr(activations, "shape", None)
    if shape is None:
        raise TypeError(
            "activations must be a torch.Tensor, a numpy array or an array-like with .shape and "
            f"column slicing, got {type(activations).__name__}"
        )
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"activations must have shape [N, F], got {shape}")
    if shape[1] == 0:
        raise ValueError("activations have no feature (F = 0)")
    return shape


def _read_columns(activations: Any, start: int, stop: int, device: torch.device) -> torch.Tensor:
    block = activations[:, start:stop]
    if not isinstance(block, torch.Tensor):
        block = torch.from_numpy(np.ascontiguousarray(block))
    if block.dtype == torch.bool or block.is_complex():
        raise TypeError(f"activations must be real numbers, got dtype {block.dtype}")
    if not block.is_floating_point():
        block = block.double()
    return block.detach().to(device)


def _check_finite(block: torch.Tensor, offset: int) -> None:
    finite = torch.isfinite(block)
    if not bool(finite.all()):
        bad_features = (~finite).any(dim=0).nonzero().flatten()
        feature = offset + int(bad_features[0])
        column = block[:, int(bad_features[0])]
        kind = "NaN" if bool(torch.isnan(column).any()) else "inf"
        more = f" (and {len(bad_features) - 1} more features in this batch)" if len(bad_features) > 1 else ""
        raise ValueError(f"activations of feature {feature} contain {kind}{more}")


def _validation_mask(validation: Any, n_samples: int, seed: int) -> Optional[np.ndarray]:
    if validation is None:
        return None
    if isinstance(validation, (float, int)) and not isinstance(validation, bool):
        if not 0.0 < float(validation) < 1.0:
            raise ValueError(f"a validation share must be in (0, 1), got {validation}")
        n_held = int(round(float(validation) * n_samples))
        generator = np.random.default_rng(seed)
        mask = np.zeros(n_samples, dtype=bool)
        mask[generator.permutation(n_samples)[:n_held]] = True
    else:
        if isinstance(validation, torch.Tensor):
            validation = validation.detach().cpu().numpy()
        mask = np.asarray(validation)
        if mask.dtype != np.bool_ or mask.shape != (n_samples,):
            raise ValueError(
                f"validation must be a share in (0, 1) or a boolean mask of shape ({n_samples},), "
                f"got dtype {mask.dtype} and shape {mask.shape}"
            )
    if mask.all() or not mask.any():
        raise ValueError("validation must hold out some but not all samples")
    return mask


def _held_out_statistics(block, held_labels, beam: BeamState, n_concepts: int, mode: str) -> Dict[str, torch.Tensor]:
    """AUC, p-value and fraction of the final beam formulas on held-out samples."""
    n_held, n_features = block.shape
    width, max_length = beam.primitives.shape[1:]
    device = block.device
    prims = beam.primitives.to(device)
    ops = beam.operators.to(device)
    concept = prims.clamp(min=0) % n_concepts
    masks = held_labels.T[concept]  # [F, B, L, N_held]
    masks = masks ^ (prims >= n_concepts)[..., None]
    combined = masks[:, :, 0]
    for position in range(1, max_length):
        step = masks[:, :, position]
        active = (beam.length.to(device) > position)[..., None]
        joined = torch.where((ops[:, :, position] == 0)[..., None], combined & step, combined | step)
        combined = torch.where(active, joined, combined)
    ranked = rank_scores(block)
    flat = combined.reshape(n_features, width, n_held).to(torch.float64)
    rank_sums = torch.einsum("nf,fbn->fb", ranked.ranks, flat)
    counts = flat.sum(-1)
    auc = auc_from_rank_sums(rank_sums, counts, n_held)
    alternative = "greater" if mode == "positive" else "less"
    p_value = mann_whitney_pvalue(auc, counts, n_held, ranked.tie_term[:, None], alternative)
    return {"auc": auc.cpu(), "p_value": p_value.cpu(), "fraction": (counts / n_held).cpu()}


class _Decoder:
    """Turns primitive / operator codes into (cached) Formula objects and Explanations."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.n_concepts = len(names)
        self._cache: Dict[tuple, Formula] = {}

    def formula(self, prims: Sequence[int], ops: Sequence[int]) -> Formula:
        key = (tuple(prims), tuple(ops))
        formula = self._cache.get(key)
        if formula is None:
            formula = self._primitive(prims[0])
            for op, prim in zip(ops[1:], prims[1:]):
                formula = formula & self._primitive(prim) if op == 0 else formula | self._primitive(prim)
            self._cache[key] = formula
        return formula

    def _primitive(self, code: int) -> Formula:
        atom = Formula.concept(self.names[code % self.n_concepts])
        return ~atom if code >= self.n_concepts else atom

    def explanations(self, beam: BeamState, p_value, n_candidates, n_samples, held) -> List[List[Explanation]]:
        prims, ops, lengths = beam.primitives.tolist(), beam.operators.tolist(), beam.length.tolist()
        aucs, counts, p_values = beam.auc.tolist(), beam.n_positive.tolist(), p_value.tolist()
        candidates = n_candidates.tolist()
        held_lists = {key: value.tolist() for key, value in held.items()} if held else None
        result = []
        for f, feature_lengths in enumerate(lengths):
            beam_list = []
            for b, length in enumerate(feature_lengths):
                if length == 0:
                    continue
                extra = {}
                if held_lists is not None:
                    extra = dict(
                        validation_auc=held_lists["auc"][f][b], validation_p_value=held_lists["p_value"][f][b],
                        validation_fraction=held_lists["fraction"][f][b],
                    )
                beam_list.append(Explanation(
                    formula=self.formula(prims[f][b][:length], ops[f][b][:length]),
                    auc=aucs[f][b], fraction=counts[f][b] / n_samples, length=length,
                    p_value=p_values[f][b], n_candidates=int(candidates[f]), **extra,
                ))
            result.append(beam_list)
        return result


def _correct(explanations: List[List[Explanation]]) -> List[List[Explanation]]:
    """Fill in Bonferroni (within a feature) and Benjamini-Hochberg (across features) p-values."""
    width = max((len(beam) for beam in explanations), default=0)
    corrected = [list(beam) for beam in explanations]
    for position in range(width):
        owners = [f for f, beam in enumerate(explanations) if len(beam) > position]
        bonferroni = [min(1.0, explanations[f][position].p_value * max(1, explanations[f][position].n_candidates))
                      for f in owners]
        q_values = benjamini_hochberg(torch.tensor(bonferroni, dtype=torch.float64)).tolist()
        for f, p_bonf, q_value in zip(owners, bonferroni, q_values):
            old = explanations[f][position]
            corrected[f][position] = replace(old, p_value_bonferroni=p_bonf, p_value_bh=q_value)
    return corrected
