"""Fuzzy-logic circuits over neurons (paper section 5.3, appendices A.5 and A.6).

A neuron's output is mapped to a truth degree in [0, 1] by standardizing it with its mean and
standard deviation over a dataset and applying the sigmoid. Truth degrees are combined with a
t-norm (AND), its dual t-conorm (OR) and the standard negation ``1 - a`` (NOT):

============  =================================  ==================================
logic          AND  T(a, b)                        OR  S(a, b)
============  =================================  ==================================
goedel         min(a, b)                          max(a, b)
product        a b                                a + b - a b
lukasiewicz    max(0, a + b - 1)                  min(1, a + b)
yager (p)      max(0, 1 - ((1-a)^p + (1-b)^p)^1/p)  min(1, (a^p + b^p)^1/p)
============  =================================  ==================================

Each pair is dual under the negation (De Morgan), and every t-norm is associative, so n-ary AND / OR
are folds. A circuit is a formula over neurons (``"n61 AND n899 AND n575"``), read with
:py:meth:`crp_invert.Formula.parse`; it is scored by the AUC of its truth degree against a concept.
Formulas are canonical (``n1 AND n1`` is ``n1``), which matters only for the non-idempotent logics.
"""
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .core.checks import is_int

__all__ = [
    "LOGICS",
    "standardize_params",
    "fuzzify",
    "Fuzzifier",
    "t_norm",
    "t_conorm",
    "fuzzy_not",
    "fuzzy_and",
    "fuzzy_or",
    "FuzzyCircuit",
    "NeuronMatch",
    "best_neurons",
]

LOGICS = ("goedel", "product", "lukasiewicz", "yager")
_NEURON = re.compile(r"^n?(\d+)$")


def _tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.double()
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _check_logic(logic: str) -> str:
    if logic not in LOGICS:
        raise ValueError(f"logic={logic!r}; expected one of {LOGICS}")
    return logic


def _check_p(p: float) -> float:
    if not isinstance(p, (int, float, np.floating)) or isinstance(p, bool) or not p > 0:
        raise ValueError(f"Yager parameter p must be a positive number, got {p!r}")
    return float(p)


# ------------------------------------------------------------------------------------------------
# membership: standardize, then sigmoid
# ------------------------------------------------------------------------------------------------

def standardize_params(activations, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of each neuron over the samples.

    Parameters
    ----------
    activations : torch.Tensor or array-like
        [N, F] outputs of F neurons on N samples.
    dim : int
        The sample dimension.

    Returns
    -------
    mean, std : torch.Tensor
        [F] each (float64 accumulation, returned in the input's floating dtype).
    """
    x = _tensor(activations)
    if x.dim() == 0 or x.shape[dim] < 1:
        raise ValueError(f"activations need at least one sample along dim {dim}, got shape {tuple(x.shape)}")
    mean = x.double().mean(dim=dim)
    std = x.double().std(dim=dim, unbiased=False)
    return mean.to(x.dtype), std.to(x.dtype)


def fuzzify(activations, mean, std, eps: float = 1e-12) -> torch.Tensor:
    """Truth degree ``sigmoid((x - mean) / std)`` in [0, 1]; a neuron with ``std == 0`` maps to 0.5.

    Parameters
    ----------
    activations : torch.Tensor or array-like
        [N, F] (or anything broadcasting against ``mean`` and ``std``).
    mean, std : torch.Tensor
        From :py:func:`standardize_params`.
    eps : float
        Standard deviations below ``eps`` count as zero.
    """
    x = _tensor(activations)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    constant = std <= eps
    z = (x - mean) / torch.where(constant, torch.ones_like(std), std)
    return torch.sigmoid(torch.where(constant, torch.zeros_like(z), z))


class Fuzzifier:
    """Maps neuron outputs to truth degrees with the mean and std fitted over a dataset.

    Parameters
    ----------
    mean, std : array-like, optional
        ``[F]`` mean and standard deviation of every feature, if known; otherwise call :meth:`fit`.

    Examples
    --------
    >>> fuzzifier = Fuzzifier().fit(train_activations)   # doctest: +SKIP
    >>> degrees = fuzzifier(test_activations)             # [N, F] in [0, 1]   # doctest: +SKIP
    """

    def __init__(self, mean=None, std=None):
        self.mean = None if mean is None else _tensor(mean)
        self.std = None if std is None else _tensor(std)

    def fit(self, activations) -> "Fuzzifier":
        """Fit mean and std over the samples (rows) of ``activations`` [N, F].

        Parameters
        ----------
        activations : array-like
            ``[N, F]`` neuron outputs over a dataset.

        Returns
        -------
        Fuzzifier
            ``self``, fitted.
        """
        x = _tensor(activations)
        if x.dim() != 2:
            raise ValueError(f"activations must have shape [N, F], got {tuple(x.shape)}")
        self.mean, self.std = standardize_params(x, dim=0)
        return self

    def __call__(self, activations) -> torch.Tensor:
        if self.mean is None:
            raise RuntimeError("Fuzzifier is not fitted: call fit(activations) first")
        x = _tensor(activations)
        if x.shape[-1] != self.mean.shape[-1]:
            raise ValueError(f"activations have {x.shape[-1]} features, the fuzzifier was fitted on "
                             f"{self.mean.shape[-1]}")
        return fuzzify(x, self.mean.to(x.device), self.std.to(x.device))


# ------------------------------------------------------------------------------------------------
# operators
# ------------------------------------------------------------------------------------------------

def t_norm(a, b, logic: str = "goedel", p: float = 2.0) -> torch.Tensor:
    """Fuzzy AND of two truth degrees with the t-norm of ``logic`` (``p``: Yager's parameter)."""
    logic = _check_logic(logic)
    a, b = _tensor(a), _tensor(b)
    if logic == "goedel":
        return torch.minimum(a, b)
    if logic == "product":
        return a * b
    if logic == "lukasiewicz":
        return torch.clamp(a + b - 1, min=0)
    p = _check_p(p)
    return torch.clamp(1 - ((1 - a) ** p + (1 - b) ** p) ** (1 / p), min=0)


def t_conorm(a, b, logic: str = "goedel", p: float = 2.0) -> torch.Tensor:
    """Fuzzy OR of two truth degrees with the t-conorm dual to the t-norm of ``logic``."""
    logic = _check_logic(logic)
    a, b = _tensor(a), _tensor(b)
    if logic == "goedel":
        return torch.maximum(a, b)
    if logic == "product":
        return a + b - a * b
    if logic == "lukasiewicz":
        return torch.clamp(a + b, max=1)
    p = _check_p(p)
    return torch.clamp((a ** p + b ** p) ** (1 / p), max=1)


def fuzzy_not(a) -> torch.Tensor:
    """Standard fuzzy negation ``1 - a``."""
    return 1 - _tensor(a)


def _fold(operator: Callable, operands: Sequence, logic: str, p: float) -> torch.Tensor:
    if len(operands) == 0:
        raise ValueError("need at least one operand")
    result = _tensor(operands[0])
    for operand in operands[1:]:
        result = operator(result, operand, logic=logic, p=p)
    return result


def fuzzy_and(*operands, logic: str = "goedel", p: float = 2.0) -> torch.Tensor:
    """n-ary fuzzy AND (a fold of the associative t-norm)."""
    return _fold(t_norm, operands, _check_logic(logic), p)


def fuzzy_or(*operands, logic: str = "goedel", p: float = 2.0) -> torch.Tensor:
    """n-ary fuzzy OR (a fold of the associative t-conorm)."""
    return _fold(t_conorm, operands, _check_logic(logic), p)


# ------------------------------------------------------------------------------------------------
# circuits over neurons
# ------------------------------------------------------------------------------------------------

def _neuron_index(name: str, names: Mapping[str, int] | None) -> int:
    if names is not None:
        if name not in names:
            raise KeyError(f"unknown neuron {name!r}; expected one of the {len(names)} given names")
        index = names[name]
        if not is_int(index) or index < 0:
            raise ValueError(f"neuron {name!r} must map to a column index >= 0, got {index!r}")
        return int(index)
    match = _NEURON.match(name)
    if match is None:
        raise KeyError(f"neuron {name!r} is not of the form 'n<index>' (e.g. 'n61'); "
                       f"pass names= to map names")
    return int(match.group(1))


class FuzzyCircuit:
    """A fuzzy-logic circuit: a formula over neurons evaluated on their truth degrees.

    Parameters
    ----------
    formula : str or crp_invert.Formula
        E.g. ``"n61 AND n899 AND n575"`` or ``"n3 OR NOT n7"``; atoms ``n<index>`` (or plain
        ``<index>``) name columns of the membership matrix, unless ``names`` maps atom names to columns.
    logic : {"goedel", "product", "lukasiewicz", "yager"}
    p : float
        Yager's parameter (default 2).
    names : mapping of str to int, optional
        Atom name -> neuron index.

    Examples
    --------
    >>> circuit = FuzzyCircuit("n61 AND n899 AND n575", logic="product")  # doctest: +SKIP
    >>> degrees = circuit(Fuzzifier().fit(acts)(acts))                    # [N]  # doctest: +SKIP
    >>> circuit.score(acts_memberships, concepts.mask("dog"))             # AUC  # doctest: +SKIP
    """

    def __init__(self, formula, logic: str = "goedel", p: float = 2.0,
                 names: Mapping[str, int] | None = None):
        from .core.formula import Formula

        if isinstance(formula, str):
            formula = Formula.parse(formula)
        elif not isinstance(formula, Formula):
            raise TypeError(f"formula must be a str or a Formula, got {type(formula).__name__}")
        self.formula = formula
        self.logic = _check_logic(logic)
        self.p = _check_p(p)
        self.names = None if names is None else dict(names)
        self.neurons: list[int] = sorted({_neuron_index(name, self.names) for name in formula.concepts})

    def __repr__(self) -> str:
        return f"FuzzyCircuit({str(self.formula)!r}, logic={self.logic!r})"

    def __call__(self, memberships) -> torch.Tensor:
        """Truth degree [N] of the circuit from the neurons' truth degrees ``memberships`` [N, F]."""
        degrees = _tensor(memberships)
        if degrees.dim() != 2:
            raise ValueError(f"memberships must have shape [N, F], got {tuple(degrees.shape)}")
        if self.neurons and self.neurons[-1] >= degrees.shape[1]:
            raise ValueError(f"the circuit uses neuron {self.neurons[-1]} but memberships have only "
                             f"{degrees.shape[1]} neurons")
        return self._evaluate(self.formula, degrees)

    def _evaluate(self, formula, degrees: torch.Tensor) -> torch.Tensor:
        if formula.kind == "concept":
            return degrees[:, _neuron_index(formula.name, self.names)]
        if formula.kind == "not":
            return fuzzy_not(self._evaluate(formula.children[0], degrees))
        operands = [self._evaluate(child, degrees) for child in formula.children]
        if formula.kind == "and":
            return fuzzy_and(*operands, logic=self.logic, p=self.p)
        return fuzzy_or(*operands, logic=self.logic, p=self.p)

    def score(self, memberships, concept) -> float:
        """AUROC of the circuit's truth degree against a boolean concept mask [N] (ties count one half).

        Parameters
        ----------
        memberships : array-like
            ``[N, F]`` truth degrees of the neurons (a :class:`Fuzzifier`'s output).
        concept : array-like of bool
            ``[N]`` mask of the samples where the concept holds.

        Returns
        -------
        float
            The AUC.
        """
        from .core.metrics import auroc

        degrees = self(memberships)
        mask = torch.as_tensor(np.asarray(concept) if not isinstance(concept, torch.Tensor) else concept)
        if mask.shape != degrees.shape:
            raise ValueError(f"concept mask has shape {tuple(mask.shape)}, expected ({degrees.shape[0]},)")
        return float(auroc(degrees, mask.bool().to(degrees.device))[0, 0])


@dataclass(frozen=True)
class NeuronMatch:
    """The neuron with the highest AUC for a concept."""

    concept: str
    neuron: int
    auc: float


def best_neurons(activations, concepts, names: Sequence[str] | None = None) -> list[NeuronMatch]:
    """For each concept, the single neuron whose output has the highest AUC ("fine-tuning without training").

    The AUC of a neuron is unchanged by the (monotone) standardize-then-sigmoid mapping, so raw
    activations and truth degrees give the same answer. Ties go to the lowest neuron index.

    Parameters
    ----------
    activations : torch.Tensor or array-like
        [N, F] neuron outputs (or truth degrees).
    concepts : ConceptLabels or bool tensor [N, K]
    names : sequence of str, optional
        Concept names for a plain tensor (default ``"0"``, ``"1"``, ...).

    Returns
    -------
    list of NeuronMatch
        One per concept, in concept order.
    """
    from .core.metrics import auroc

    x = _tensor(activations)
    if x.dim() != 2:
        raise ValueError(f"activations must have shape [N, F], got {tuple(x.shape)}")
    if hasattr(concepts, "dense") and hasattr(concepts, "names"):
        labels, concept_names = concepts.dense(device=x.device), list(concepts.names)
    else:
        labels = torch.as_tensor(np.asarray(concepts) if not isinstance(concepts, torch.Tensor) else concepts)
        if labels.dim() == 1:
            labels = labels[:, None]
        concept_names = list(names) if names is not None else [str(k) for k in range(labels.shape[1])]
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"concepts have {labels.shape[0]} samples, activations {x.shape[0]}")
    if len(concept_names) != labels.shape[1]:
        raise ValueError(f"got {len(concept_names)} names for {labels.shape[1]} concepts")
    aucs = auroc(x, labels.bool().to(x.device))  # [F, K]
    best = aucs.argmax(dim=0)  # first maximum: lowest index on ties
    return [NeuronMatch(concept=concept_names[k], neuron=int(best[k]), auc=float(aucs[best[k], k]))
            for k in range(labels.shape[1])]
