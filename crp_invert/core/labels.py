"""The result of labeling: :class:`Explanation` (one formula with its statistics) and :class:`LayerLabels`
(the explanations of every feature of a layer, JSON/CSV files)."""
from __future__ import annotations

import csv
import functools
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from os import PathLike
from typing import Any

import torch

from .checks import check_int, is_int, read_json
from .files import write_text_atomically  # re-exported: its home is core.files
from .formula import Formula
from .metrics import benjamini_hochberg

__all__ = ["Explanation", "LayerLabels", "LabelsByLayer", "ReliabilityRule", "DEFAULT_RULE", "RELIABILITY_RULE",
           "NO_RELIABLE_LABEL", "correct_p_values", "format_p_value", "write_text_atomically"]

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
    if not is_int(value) or value < minimum:
        raise ValueError(f"{key!r} must be an int >= {minimum}, got {value!r:.80}")
    return value


#: the text every view shows for a feature without a reliable explanation (:meth:`LayerLabels.best` is None)
NO_RELIABLE_LABEL = "no reliable label"

#: why an old file's explanation cannot be judged
SUPPORT_UNKNOWN = "support unknown (labels from an older version)"

RELIABILITY_RULE = """\
An explanation (a formula found for a feature) is reliable when all of these hold:

1. significant: its q-value p_value_bh < alpha, the Benjamini-Hochberg adjustment over the features
   of the layer of the Bonferroni p-value over the feature's candidate formulas (the search picked the
   formula among n_candidates, and the layer's labels are read together);
2. supported: the formula holds on at least `floor` of the searched samples and fails on at least
   `floor`, where floor = max(min_support, the smallest support at which the Bonferroni p-value can be
   below alpha at all); below it an AUC is decided by a handful of samples;
3. confirmed: when held-out samples were given (validation=), the formula's one-sided Mann-Whitney
   p-value on them is below alpha.

Defaults: alpha = 0.05, min_support = 10. Every view shows a feature's best reliable explanation, or
"no reliable label"; the whole beam stays available (LayerLabels.explanations)."""


@dataclass(frozen=True)
class ReliabilityRule:
    """When an :class:`Explanation` is a claim a user can believe (see :data:`RELIABILITY_RULE`).

    Parameters
    ----------
    alpha : float
        Level of the significance test (on ``p_value_bh``) and of the held-out confirmation.
    min_support : int
        Samples on which a formula must hold, and samples on which it must fail, at least; raised by
        :meth:`support_floor` where the number of candidates demands more.

    Examples
    --------
    >>> rule = ReliabilityRule()
    >>> rule.support_floor(n_samples=2048, n_candidates=500)
    10
    >>> rule.support_floor(n_samples=2048, n_candidates=10**9)
    15
    """

    alpha: float = 0.05
    min_support: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be a number in (0, 1), got {self.alpha!r}")
        check_int(self.min_support, "min_support", minimum=0)

    def support_floor(self, n_samples: int, n_candidates: int) -> int:
        """``max(min_support, smallest support at which a Bonferroni p-value below alpha is possible)``.

        The most extreme Mann-Whitney statistic a formula holding on ``n`` of ``N`` samples can reach puts
        all ``n`` above the others: ``z = (n (N - n) / 2 - 1/2) / sqrt(n (N - n) (N + 1) / 12)`` (no ties,
        continuity corrected, as the p-values are computed). Its p-value ``Phi(-z)`` times the
        ``n_candidates`` must be below alpha; ``z`` grows with ``min(n, N - n)``, so the floor is the
        smallest ``n`` where it is (``N // 2 + 1`` when no ``n`` can be).
        """
        return _support_floor(int(n_samples), max(1, int(n_candidates)), float(self.alpha), self.min_support)

    def reason(self, explanation: Explanation) -> str:
        """``""`` when ``explanation`` is reliable by this rule, else the first reason it is not."""
        e = explanation
        if e.support is None or e.n_samples is None:
            return SUPPORT_UNKNOWN
        floor = self.support_floor(e.n_samples, e.n_candidates)
        if e.support < floor:
            return f"holds on {e.support} samples (< {floor})"
        if e.n_samples - e.support < floor:
            return f"fails on {e.n_samples - e.support} samples (< {floor})"
        if not e.p_value_bh < self.alpha:  # NaN included: never corrected
            return f"q = {_short(e.p_value_bh)} (>= {self.alpha:g})"
        if e.validation_auc is not None or e.validation_p_value is not None:
            p = math.nan if e.validation_p_value is None else e.validation_p_value
            if not p < self.alpha:
                return (f"not confirmed on held-out data (AUC {_short(e.validation_auc, '.2f')}, "
                        f"p = {_short(p)})")
        return ""

    def is_reliable(self, explanation: Explanation) -> bool:
        """True when :meth:`reason` finds nothing against ``explanation``."""
        return not self.reason(explanation)


def _short(value: float | None, spec: str = ".2g") -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


@functools.lru_cache(maxsize=4096)
def _support_floor(n_samples: int, n_candidates: int, alpha: float, min_support: int) -> int:
    def possible(n: int) -> bool:
        pairs = n * (n_samples - n)
        if pairs <= 0:
            return False
        z = (pairs / 2.0 - 0.5) / math.sqrt(pairs * (n_samples + 1) / 12.0)
        return n_candidates * 0.5 * math.erfc(z / math.sqrt(2.0)) < alpha

    low, high = max(1, min_support), n_samples // 2
    if low > high or possible(low):
        return max(min_support, low)
    if not possible(high):
        return high + 1  # no support can be significant: the floor cannot be met
    # the smallest possible n in (low, high]: z increases with n up to N / 2
    while high - low > 1:
        middle = (low + high) // 2
        if possible(middle):
            high = middle
        else:
            low = middle
    return high


#: the rule every view uses (``Explanation.reliable``, :meth:`LayerLabels.best`)
DEFAULT_RULE = ReliabilityRule()


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
        fraction constraints and the support floor), the size of the family the formula was picked from.
    p_value_bonferroni : float
        ``min(1, p_value * n_candidates)``: corrected for the selection within the feature.
    p_value_bh : float
        Benjamini-Hochberg adjustment of ``p_value_bonferroni`` over the features of the layer
        (for explanations at the same beam position).
    validation_auc, validation_p_value, validation_fraction : float or None
        The same statistics on held-out samples that the search did not see (``validation=``).
    support : int or None
        Number of (search) samples on which the formula holds (None: unknown, labels of an older version).
    n_samples : int or None
        Number of samples searched (None: unknown).

    The properties :attr:`reliable` and :attr:`unreliable_reason` judge the explanation by
    :data:`DEFAULT_RULE` (see :data:`RELIABILITY_RULE`).
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
    support: int | None = None
    n_samples: int | None = None

    @property
    def reliable(self) -> bool:
        """Whether the explanation is a claim to believe by :data:`DEFAULT_RULE`."""
        return not self.unreliable_reason

    @property
    def unreliable_reason(self) -> str:
        """``""`` when :attr:`reliable`, else a short reason, e.g. ``"holds on 3 samples (< 10)"``."""
        return DEFAULT_RULE.reason(self)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of every field, the formula's text and (derived, not read back) ``reliable`` and
        ``unreliable_reason``.
        """
        data = asdict(self)
        data["formula"] = self.formula.to_json()
        data["text"] = str(self.formula)
        data["reliable"] = self.reliable
        data["unreliable_reason"] = self.unreliable_reason
        return {key: _json_float(value) for key, value in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any], n_samples: int | None = None) -> Explanation:
        """Rebuild from :meth:`to_json` output, checking every field (ValueError / TypeError / KeyError
        naming it).

        ``n_samples`` (the searched samples, from the layer's parameters) completes an explanation of an
        older version without ``support``: ``support = round(fraction * n_samples)``; without it such an
        explanation's support stays unknown (and the explanation unreliable).
        """
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
        values["support"], values["n_samples"] = _support(data, values["fraction"], n_samples)
        return cls(**values)


def _support(data: dict[str, Any], fraction: float, n_samples: int | None) -> tuple[int | None, int | None]:
    """``(support, n_samples)`` as stored, or derived from the fraction for labels of an older version."""
    if data.get("n_samples") is not None:
        total = _count(data["n_samples"], "n_samples", 0)
        support = _count(data.get("support"), "support", 0) if data.get("support") is not None else None
        if support is not None and support > total:
            raise ValueError(f"'support' ({support}) exceeds 'n_samples' ({total})")
        return support, total
    if n_samples is None or math.isnan(fraction):
        return None, None
    return int(round(fraction * n_samples)), int(n_samples)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


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
        if not is_int(feature):
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

    def best(self, feature: int, rule: ReliabilityRule | None = None) -> Explanation | None:
        """The best *reliable* explanation of ``feature`` (by ``rule``, default :data:`DEFAULT_RULE`), or None:
        then every view says :data:`NO_RELIABLE_LABEL`.

        Examples
        --------
        >>> from crp_invert.core.formula import Formula
        >>> weak = Explanation(Formula.concept("red"), auc=0.99, fraction=0.002, length=1, p_value=0.01,
        ...                    n_candidates=40, p_value_bonferroni=0.4, p_value_bh=0.4, support=2, n_samples=1000)
        >>> labels = LayerLabels([[weak]], ["red"])
        >>> labels.best(0) is None, labels.best_any(0).unreliable_reason
        (True, 'holds on 2 samples (< 10)')
        """
        rule = DEFAULT_RULE if rule is None else rule
        return next((e for e in self[feature] if rule.is_reliable(e)), None)

    def best_any(self, feature: int) -> Explanation | None:
        """The top of ``feature``'s beam whether reliable or not (the paper's label), or None if the beam is
        empty.
        """
        beam = self[feature]
        return beam[0] if beam else None

    def explanations(self, feature: int) -> list[Explanation]:
        """The whole beam of ``feature``, best first, reliable or not (the same as ``labels[feature]``)."""
        return self[feature]

    def n_reliable(self, rule: ReliabilityRule | None = None) -> int:
        """Number of features with a reliable explanation."""
        return sum(self.best(feature, rule) is not None for feature in range(self.n_features))

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
        """One dict per feature with its best reliable explanation.

        A feature without one gets ``formula`` = :data:`NO_RELIABLE_LABEL`, ``reliable`` False, empty
        statistics, and the top of its beam with the reason it is not reliable (``top_formula``, ``reason``).
        """
        rows = []
        for feature in range(self.n_features):
            best = self.best(feature)
            row: dict[str, Any] = {"feature": feature, "reliable": best is not None}
            if best is not None:
                row.update(
                    formula=str(best.formula), auc=best.auc, fraction=best.fraction, support=best.support,
                    n_samples=best.n_samples, length=best.length, p_value=best.p_value,
                    p_value_bonferroni=best.p_value_bonferroni, p_value_bh=best.p_value_bh,
                    n_candidates=best.n_candidates, validation_auc=best.validation_auc,
                    validation_p_value=best.validation_p_value,
                )
            else:
                top = self.best_any(feature)
                row.update(formula=NO_RELIABLE_LABEL,
                           top_formula=None if top is None else str(top.formula),
                           reason="no formula met the search's constraints" if top is None else top.unreliable_reason)
            rows.append(row)
        return rows

    def table(self, max_rows: int | None = None, max_width: int = 60) -> str:
        """A plain-text table of the best reliable explanation of every feature (support, p, q), or
        :data:`NO_RELIABLE_LABEL` with the top of the beam and why it is not reliable.
        """
        has_validation = any(beam and beam[0].validation_auc is not None for beam in self._explanations)
        header = ["feature", "formula", "AUC", "support", "p (Bonf.)", "q (BH)"]
        if has_validation:
            header.append("held-out AUC")
        lines = [self._table_line(row, len(header), max_width, has_validation) for row in self.rows()[:max_rows]]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
        render = [
            "  ".join(cell.ljust(width) for cell, width in zip(header, widths)),
            "  ".join("-" * width for width in widths),
        ]
        render += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines]
        if max_rows is not None and self.n_features > max_rows:
            render.append(f"... {self.n_features - max_rows} more features")
        return "\n".join(line.rstrip() for line in render)

    @staticmethod
    def _table_line(row: dict[str, Any], width: int, max_width: int, has_validation: bool) -> list[str]:
        if not row["reliable"]:
            top = "" if row["top_formula"] is None else f"; top: {row['top_formula']}"
            text = f"{NO_RELIABLE_LABEL} ({row['reason']}{top})"
            return [str(row["feature"]), _clip(text, max_width + 40)] + [""] * (width - 2)
        support = "" if row["support"] is None else f"{row['support']}/{row['n_samples']}"
        line = [
            str(row["feature"]), _clip(row["formula"], max_width), f"{row['auc']:.4f}", support,
            format_p_value(row["p_value_bonferroni"]), format_p_value(row["p_value_bh"]),
        ]
        if has_validation:
            auc = row["validation_auc"]
            line.append("" if auc is None else f"{auc:.4f}")
        return line

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": "crp-invert.LayerLabels",
            "version": _FORMAT_VERSION,
            "layer": self.layer,
            "parameters": self.parameters,
            "concept_names": self.concept_names,
            "reliability_rule": asdict(DEFAULT_RULE),
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
        if not is_int(version):
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
        n_search = _searched_samples(parameters)
        explanations = _read_beams(data["features"], known, "'features'", n_search)
        states = None
        if data.get("states") is not None:
            steps = data["states"]
            if not isinstance(steps, list):
                raise TypeError(f"'states' must be a list, got {type(steps).__name__}")
            states = [_read_beams(step, known, f"'states' step {i + 1}", n_search) for i, step in enumerate(steps)]
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
        """Write one row per feature with its best reliable explanation.

        Parameters
        ----------
        path : path
            The CSV file.
        style : {"full", "benchmark", "benchmark-any"}
            ``"full"``: feature, formula, reliable, auc, fraction, support, n_samples, length, p_value,
            p_value_bonferroni, p_value_bh, n_candidates, validation_auc, validation_p_value, and for a
            feature without a reliable explanation :data:`NO_RELIABLE_LABEL` with the top of its beam
            (top_formula) and the reason (reason).
            ``"benchmark"``: the ``neuron,concept,concept_id,metric`` layout that neuron-description
            benchmarks read INVERT labels in, for the features with a reliable explanation; ``concept_id`` is
            the concept's column for a single concept and the formula over column indices for a compound
            formula; ``metric`` is the AUC. ``"benchmark-any"``: the same with the top of every beam,
            reliable or not (the paper's labels, to compare with methods that label every neuron).
        """
        if style == "full":
            columns = ["feature", "formula", "reliable", "auc", "fraction", "support", "n_samples", "length",
                       "p_value", "p_value_bonferroni", "p_value_bh", "n_candidates", "validation_auc",
                       "validation_p_value", "top_formula", "reason"]
            rows = self.rows()
        elif style in ("benchmark", "benchmark-any"):
            columns = ["neuron", "concept", "concept_id", "metric"]
            rows = self._benchmark_rows(reliable_only=style == "benchmark")
        else:
            raise ValueError(f"style must be 'full', 'benchmark' or 'benchmark-any', got {style!r}")
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row.get(key) is None else row.get(key, "")) for key in columns})
        write_text_atomically(path, buffer.getvalue())

    def _benchmark_rows(self, reliable_only: bool) -> list[dict[str, Any]]:
        index = {name: i for i, name in enumerate(self.concept_names)}
        rows = []
        for feature in range(self.n_features):
            explanation = self.best(feature) if reliable_only else self.best_any(feature)
            if explanation is None:
                continue
            rows.append({
                "neuron": feature, "concept": str(explanation.formula),
                "concept_id": _formula_ids(explanation.formula, index), "metric": explanation.auc,
            })
        return rows

    def _repr_html_(self) -> str:
        from .html import html_table
        return html_table(["feature", "label", "AUC", "support", "p (Bonf.)", "q (BH)"], ([r["feature"], r.get(
            "formula"), r.get("auc"), r.get("support"), r.get("p_value_bonferroni"), r.get("p_value_bh")] for r in
            self.rows()), caption=f"{self.layer}: {self.n_features} features")


class LabelsByLayer(dict):
    """A ``dict`` of layer name to :class:`LayerLabels` whose ``KeyError`` names the layers it has.

    Examples
    --------
    >>> labels = LabelsByLayer({"conv1": None, "conv2": None})
    >>> labels["features.40"]
    Traceback (most recent call last):
    ...
    KeyError: "no labels for layer 'features.40'; labeled layers: ['conv1', 'conv2']"
    """

    def __missing__(self, key: Any) -> Any:
        raise KeyError(f"no labels for layer {key!r}; labeled layers: {list(self)}")


def _searched_samples(parameters: dict[str, Any] | None) -> int | None:
    """The number of samples the search saw, from a layer's stored parameters (None if they do not say)."""
    parameters = parameters or {}
    n_search = parameters.get("n_search_samples")
    if n_search is None and parameters.get("validation") is None:
        n_search = parameters.get("n_samples")
    if not is_int(n_search) or n_search < 1:
        return None
    return n_search


def _read_beams(beams: Any, known: set, where: str, n_search: int | None = None) -> list[list[Explanation]]:
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
                explanation = Explanation.from_json(item, n_search)
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
