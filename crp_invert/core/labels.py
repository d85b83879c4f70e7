"""The result of labeling: :class:`Explanation` (one formula with its statistics) and :class:`LayerLabels`
(the explanations of every feature of a layer, JSON/CSV files)."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from os import PathLike
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from .formula import Formula
from .metrics import benjamini_hochberg

__all__ = ["Explanation", "LayerLabels", "correct_p_values"]




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
        return LayerLabels(correct_p_values(explanations), first.concept_names, first.layer, first.parameters, states)

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



def correct_p_values(explanations: List[List[Explanation]]) -> List[List[Explanation]]:
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
