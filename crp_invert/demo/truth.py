"""Scores of explanations against a planted truth (known formulas of output neurons).

Two scores of the labels of a layer whose neurons have a known meaning, such as the logits of the
demo model (neuron ``f`` = class ``f`` = ``shape & color``):

* :func:`planted_truth_score`: the share of neurons whose best explanation *is* their defining
  formula (same canonical :class:`~crp_invert.Formula`).
* :func:`explanation_accuracy`: the "accuracy of explanations" of the INVERT paper's table 1: the
  best explanation of every output neuron is evaluated on the data and matched to the class
  whose samples it overlaps best (intersection over union); the score is the share of neurons
  matched to their own class. It also counts formulas that are equivalent on the data (e.g.
  ``circle & ~yellow & ~cool`` for ``circle & red``), so it is >= the planted-truth score
  whenever the true formulas select exactly their classes.

With the committed demo model and L = 2, both scores are 1.0. With L = 3 the exact score drops
(to about 0.5): for several logits a *subset* of the class, e.g. ``circle AND large AND red``,
ranks higher, because the logits are largest for large shapes. Such an explanation still selects
only samples of its class, so the IoU-matched accuracy stays 1.0.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["best_formulas", "planted_truth_matches", "planted_truth_score",
           "match_explanations_to_classes", "explanation_accuracy"]


def best_formulas(layer_labels: Any) -> list[Any]:
    """The best explanation's formula of every feature (``None`` where a feature has none).

    Parameters
    ----------
    layer_labels : LayerLabels or sequence of lists of Explanation
        ``layer_labels[f]`` is the list of explanations of feature ``f``, best first.
    """
    formulas = []
    for f in range(len(layer_labels)):
        explanations = layer_labels[f]
        formulas.append(explanations[0].formula if len(explanations) else None)
    return formulas


def _truth_list(truth: Sequence[Any] | Mapping[Any, Any], n_features: int,
                class_names: Sequence[str] | None) -> list[Any]:
    if isinstance(truth, Mapping):
        if class_names is not None:
            missing = [name for name in class_names if name not in truth]
            if missing:
                raise KeyError(f"no true formula for the classes {missing[:5]}")
            truth = [truth[name] for name in class_names]
        elif all(isinstance(key, (int, np.integer)) for key in truth):
            missing = [f for f in range(n_features) if f not in truth]
            if missing:
                raise KeyError(f"no true formula for the features {missing[:5]}")
            truth = [truth[f] for f in range(n_features)]
        else:
            truth = list(truth.values())
    truth = list(truth)
    if len(truth) != n_features:
        raise ValueError(f"got {len(truth)} true formulas for a layer of {n_features} features; "
                         "expected one per feature (feature f = class f)")
    return truth


def planted_truth_matches(layer_labels: Any, class_to_formula: Sequence[Any] | Mapping[Any, Any],
                          class_names: Sequence[str] | None = None) -> np.ndarray:
    """Per feature: is its best explanation exactly its true formula?

    Parameters
    ----------
    layer_labels : LayerLabels
        Labels of the layer (e.g. the logits); feature ``f`` belongs to class ``f``.
    class_to_formula : sequence of Formula or mapping
        The true formula of every feature: a sequence (index = feature), a mapping from feature
        index, or a mapping from class name (in feature order, or ordered by ``class_names``),
        e.g. :func:`crp_invert.demo.class_formulas`.
    class_names : sequence of str, optional
        Class name of every feature, to order a mapping by class name.

    Returns
    -------
    numpy.ndarray
        bool ``[F]``.
    """
    found = best_formulas(layer_labels)
    truth = _truth_list(class_to_formula, len(found), class_names)
    return np.array([formula is not None and formula == true for formula, true in zip(found, truth)],
                    dtype=bool)


def planted_truth_score(layer_labels: Any, class_to_formula: Sequence[Any] | Mapping[Any, Any],
                        class_names: Sequence[str] | None = None) -> float:
    """Share of features whose best explanation is exactly their true formula.

    See :func:`planted_truth_matches` for the parameters. With the demo model's logits and
    :func:`crp_invert.demo.class_formulas` this is the share of output neurons labeled with their
    defining conjunction ``shape & color``.
    """
    matches = planted_truth_matches(layer_labels, class_to_formula, class_names)
    return float(matches.mean()) if len(matches) else float("nan")


def match_explanations_to_classes(layer_labels: Any, concepts: Any, targets: Any,
                                  n_classes: int | None = None) -> np.ndarray:
    """Match every feature's best explanation to the class whose samples it covers best.

    The best formula of each feature is evaluated on ``concepts`` and compared with every class
    (the samples with ``targets == c``) by intersection over union; the class with the highest
    IoU wins (the lowest index among ties).

    Parameters
    ----------
    layer_labels : LayerLabels
        Labels of the layer.
    concepts : ConceptLabels
        The concepts the formulas are written in, for the same samples as ``targets``.
    targets : array-like of int
        ``[N]`` class of every sample.
    n_classes : int, optional
        Number of classes; ``max(targets) + 1`` by default.

    Returns
    -------
    numpy.ndarray
        int64 ``[F]``: the matched class of every feature, -1 where a feature has no
        explanation or its formula covers no sample.
    """
    targets = torch.as_tensor(np.asarray(targets)).long().reshape(-1)
    if concepts.n_samples != len(targets):
        raise ValueError(f"concepts have {concepts.n_samples} samples but targets {len(targets)}")
    if len(targets) and targets.min() < 0:
        raise ValueError(f"targets must be class indices >= 0, got {int(targets.min())}")
    n_classes = int(targets.max()) + 1 if n_classes is None else int(n_classes)
    classes = targets[:, None] == torch.arange(n_classes)[None, :]  # [N, C]
    class_counts = classes.sum(0).double()
    matched = np.full(len(layer_labels), -1, dtype=np.int64)
    for f, formula in enumerate(best_formulas(layer_labels)):
        if formula is None:
            continue
        mask = formula.evaluate(concepts).cpu().reshape(-1)
        if not mask.any():
            continue
        intersection = (classes & mask[:, None]).sum(0).double()
        union = class_counts + mask.sum().double() - intersection
        matched[f] = int(torch.argmax(intersection / union))
    return matched


def explanation_accuracy(layer_labels: Any, concepts: Any, targets: Any,
                         feature_classes: Sequence[int] | None = None,
                         n_classes: int | None = None) -> float:
    """The "accuracy of explanations" of output neurons (INVERT paper, table 1 style).

    Share of features whose best explanation, evaluated on the data, is matched (highest IoU, see
    :func:`match_explanations_to_classes`) to the feature's own class.

    Parameters
    ----------
    layer_labels : LayerLabels
        Labels of the output layer.
    concepts : ConceptLabels
        The concepts of the samples.
    targets : array-like of int
        ``[N]`` ground-truth class of every sample.
    feature_classes : sequence of int, optional
        The class of every feature; ``range(F)`` by default (output neuron f = class f).
    n_classes : int, optional
        Number of classes.

    Returns
    -------
    float
    """
    matched = match_explanations_to_classes(layer_labels, concepts, targets, n_classes)
    expected = np.arange(len(matched)) if feature_classes is None else np.asarray(feature_classes)
    if expected.shape != matched.shape:
        raise ValueError(f"feature_classes must hold one class per feature ({len(matched)}), "
                         f"got shape {expected.shape}")
    return float((matched == expected).mean()) if len(matched) else float("nan")
