"""The result of labeling: :class:`Explanation` (one formula with its statistics) and :class:`LayerLabels`
(the explanations of every feature of a layer, JSON/CSV files)."""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from os import PathLike
from typing import Any

import numpy as np
import torch

from .checks import read_json
from .files import write_text_atomically  # re-exported: its home is core.files
from .formula import Formula
from .metrics import benjamini_hochberg

__all__ = ["Explanation", "LayerLabels", "correct_p_values", "format_p_value", "write_text_atomically"]

_FORMAT_VERSION = 1

#: p-values below this are shown as "< 1e-300" (they may have underflowed to 0)
P_VALUE_FLOOR = 1e-300


def format_p_value(value: float | None) -> str:
    """A p-value for tables: ``"1.23e-05"``; ``"< 1e-300"`` below :data:`P_VALUE_FLOOR` (an underflowed 0
    included: never ``0``); ``""`` for None or NaN."""
    if value is None or math.isnan(value):
        return ""
    if value < P_VALUE_FLOOR:
        return "< 1e-300"
    return f"{value:.2e}"


# checks of labels read from files ------------------------------------------------------------------------
def _number(value: Any, key: str, optional: bool) -> float | None:
    if value is None:
        return None if optional else math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key!r} must be a number, got {type(value).__name__}: {value!r:.80}")
    return float(value)


def _count(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key!r} must be an int >= {minimum}, got {value!r:.80}")
    return value


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
    validation_auc: float | None = None
    validation_p_value: float | None = None
    validation_fraction: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["formula"] = self.formula.to_json()
        data["text"] = str(self.formula)
        return {key: _json_float(value) for key, value in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Explanation:
        """Rebuild from :meth:`to_json` output, checking every field (ValueError / TypeError / KeyError
        naming it)."""
        if not isinstance(data, dict):
            raise TypeError(f"an explanation must be a JSON object, got {type(data).__name__}")
        for key in ("formula", "auc", "fraction", "length", "p_value"):
            if key not in data:
                raise KeyError(f"an explanation has no {key!r} (it has {sorted(data)[:12]})")
        formula = Formula.from_json(data["formula"])
        values: dict[str, Any] = {"formula": formula}
        for key in ("auc", "fraction", "p_value", "p_value_bonferroni", "p_value_bh"):
            values[key] = _number(data.get(key), key, optional=False)
        for key in ("validation_auc", "validation_p_value", "validation_fraction"):
            values[key] = _number(data.get(key), key, optional=True)
        values["length"] = _count(data["length"], "length", 1)
        values["n_candidates"] = _count(data.get("n_candidates", 0), "n_candidates", 0)
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
        layer: str | None = None,
        parameters: dict[str, Any] | None = None,
        states: list[list[list[Explanation]]] | None = None,
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

    def __getitem__(self, feature: int) -> list[Explanation]:
        if not isinstance(feature, (int, np.integer)):
            raise TypeError(f"features are indexed by int, got {type(feature).__name__}")
        if not -self.n_features <= feature < self.n_features:
            raise IndexError(f"feature {feature} out of range for a layer of {self.n_features} features")
        return list(self._explanations[feature])

    def __iter__(self) -> Iterator[list[Explanation]]:
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

    def best(self, feature: int) -> Explanation | None:
        """The best explanation of ``feature``, or None if it has none."""
        beam = self[feature]
        return beam[0] if beam else None

    @staticmethod
    def concatenate(parts: Sequence[LayerLabels]) -> LayerLabels:
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
    def rows(self) -> list[dict[str, Any]]:
        """One dict per feature with its best explanation (empty fields where it has none)."""
        rows = []
        for feature, beam in enumerate(self._explanations):
            row: dict[str, Any] = {"feature": feature}
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

    def table(self, max_rows: int | None = None, max_width: int = 60) -> str:
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
                format_p_value(row["p_value_bonferroni"]), format_p_value(row["p_value_bh"]),
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

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
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
    def from_dict(cls, data: dict[str, Any]) -> LayerLabels:
        """Rebuild from :meth:`to_dict` output, checking the structure and every explanation: formulas over
        the stored concept names only, lengths that match the formulas, numbers where numbers belong.

        Raises
        ------
        ValueError, TypeError, KeyError
            Naming the part of the document that is wrong (e.g. ``feature 3, explanation 0: ...``).
        """
        if not isinstance(data, dict) or data.get("format") != "crp-invert.LayerLabels":
            raise ValueError("not a crp-invert LayerLabels JSON document (missing format tag)")
        version = data.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"LayerLabels 'version' must be an int, got {version!r:.80}")
        if version > _FORMAT_VERSION:
            raise ValueError(f"LayerLabels format version {version} is newer than this crp-invert")
        if "features" not in data:
            raise ValueError("the LayerLabels document has no 'features' (the explanations of every feature)")
        names = data.get("concept_names")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ValueError("the LayerLabels document needs 'concept_names', a list of strings")
        layer = data.get("layer")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"'layer' must be a string or null, got {type(layer).__name__}")
        parameters = data.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise TypeError(f"'parameters' must be an object or null, got {type(parameters).__name__}")
        known = set(names)
        explanations = _read_beams(data["features"], known, "'features'")
        states = None
        if data.get("states") is not None:
            steps = data["states"]
            if not isinstance(steps, list):
                raise TypeError(f"'states' must be a list, got {type(steps).__name__}")
            states = [_read_beams(step, known, f"'states' step {i + 1}") for i, step in enumerate(steps)]
            for i, step in enumerate(states):
                if len(step) != len(explanations):
                    raise ValueError(
                        f"'states' step {i + 1} has {len(step)} features, 'features' {len(explanations)}"
                    )
        return cls(explanations, names, layer, parameters, states)

    def to_json(self, path: str | PathLike) -> None:
        """Write all explanations losslessly (floats round-trip exactly) as JSON (atomically: a killed
        process leaves the old file or the new one)."""
        write_text_atomically(path, json.dumps(self.to_dict()))

    @classmethod
    def from_json(cls, path: str | PathLike) -> LayerLabels:
        """Read labels written by :meth:`to_json`; errors name the file."""
        data = read_json(path, "labels file")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError, KeyError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            raise type(error)(f"labels file {str(path)!r}: {message}") from None

    def to_csv(self, path: str | PathLike, style: str = "full") -> None:
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
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row.get(key) is None else row.get(key, "")) for key in columns})
        write_text_atomically(path, buffer.getvalue())


def _read_beams(beams: Any, known: set, where: str) -> list[list[Explanation]]:
    """The explanations of every feature from JSON, each checked (errors name the feature and position)."""
    if not isinstance(beams, list):
        raise TypeError(f"{where} must be a list (one list of explanations per feature), got {type(beams).__name__}")
    result = []
    for feature, beam in enumerate(beams):
        if not isinstance(beam, list):
            raise TypeError(f"{where}, feature {feature}: expected a list of explanations, got {type(beam).__name__}")
        explanations = []
        for position, item in enumerate(beam):
            try:
                explanation = Explanation.from_json(item)
                unknown = sorted(explanation.formula.concepts - known)
                if unknown:
                    raise ValueError(f"formula uses concepts that are not in 'concept_names': {unknown[:5]}")
            except (ValueError, TypeError, KeyError) as error:
                message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
                raise type(error)(f"{where}, feature {feature}, explanation {position}: {message}") from None
            explanations.append(explanation)
        result.append(explanations)
    return result


def _formula_ids(formula: Formula, index: dict[str, int]) -> str:
    if formula.kind == "concept":
        return str(index[formula.name])
    renamed = _rename(formula, {name: str(index[name]) for name in formula.concepts})
    return str(renamed)


def _rename(formula: Formula, mapping: dict[str, str]) -> Formula:
    if formula.kind == "concept":
        return Formula.concept(mapping[formula.name])
    children = [_rename(child, mapping) for child in formula.children]
    if formula.kind == "not":
        return Formula.not_(children[0])
    return Formula.and_(*children) if formula.kind == "and" else Formula.or_(*children)



def correct_p_values(explanations: list[list[Explanation]]) -> list[list[Explanation]]:
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
