"""The main job on the embedded default, end to end: :func:`run_demo` (``crp-invert demo``), a pipeline of stages.

Each stage is one function with its own timing (``DemoSummary.timings``); every file a stage writes is listed as
it is written (``DemoSummary.written``, and in ``summary.json``):

1. ``data``: generate the shapes dataset followed by the artifact concept set
   (:class:`~crp_invert.demo.data.AuditDataset`) and load the demo CNN with its committed weights;
2. ``crp``: run CRP's ``FeatureVisualization`` (:class:`crp_invert.InvertFeatureVisualization`) over all conv
   and linear layers with the composite ``EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])``
   (:mod:`crp_invert.integration.attribution`): CRP writes its ActMax / RelMax files into ``out_dir/crp``, the
   pooled activations and relevances of every sample go into ``out_dir/activations.h5``;
3. ``labels``: label every channel of every layer from the cache (L = 3, B = 3), written once to
   ``out_dir/labels/<layer>.json`` + ``index.json`` with the file names of ``crp-invert label --out``; the inputs
   of ``crp-invert label / find / audit`` on this cache (``concepts.npz``, ``targets.npy``, ``classes.json``);
4. ``planted truth``: score the output layer against the planted truth: with L = 2 (a separate labeling of the
   logits, ``linear2_L2.json``) the share of output neurons whose best explanation is exactly
   ``shape AND color``, and the table-1 style accuracy of explanations for L = 2 and L = 3;
5. ``glocal``: decompose a few predictions into labeled channel heatmaps of ``conv3``
   (:func:`crp_invert.decompose_batch`) with the per-sample evidence of the cache (:class:`crp_invert.Evidence`:
   activation percentile, whether the shown label holds on the image), draw the glocal figures and a weight
   circuit of the logits;
6. ``relevance labels``: label every channel from its recorded relevances too (``source="relevance"``): the
   report shows both labels side by side; at L = 3 the relevance labels of the output layer lose the "large"
   confound of the activations (planted truth 1.0 with relevance);
7. ``audit``: the Clever-Hans audit (:func:`crp_invert.audit.audit`) of :data:`AUDIT_LAYER`: a channel is an
   artifact suspect where it detects the concept ``"artifact"`` (the planted mark overlaid on random images,
   merged with ``ConceptLabels.merge``) and carries a share of a class's relevance (``audit.json``);
8. ``report``: the HTML report (:func:`crp_invert.report.write_report`); then ``summary.json``.

Nothing is written outside ``out_dir``; an existing non-empty ``out_dir`` is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["run_demo", "DemoSummary", "LayerSummary", "layer_summary", "label_file_names", "DEFAULT_SAMPLES",
           "AUDIT_LAYER", "AUDIT_MIN_SHARE"]

logger = logging.getLogger(__name__)

#: default number of images of the demo (fits the 3-minute budget on 2 CPU cores)
DEFAULT_SAMPLES = 2000
#: layer whose channels decompose the demo predictions
GLOCAL_LAYER = "conv3"
#: layer of the demo's Clever-Hans audit
AUDIT_LAYER = "conv3"
#: share of a class's relevance from which a flagged channel counts in the demo's audit
AUDIT_MIN_SHARE = 0.1
#: panels per row of the demo's glocal figures (input, class heatmap, the top channels, the rest) and the longest
#: label shown in a panel title: titles of neighbouring panels do not run into each other
GLOCAL_COLUMNS = 4
GLOCAL_LABEL_CHARS = 30


@dataclass
class LayerSummary:
    """Summary of the labels of one layer.

    Attributes
    ----------
    layer : str
    channels : int
    median_auc : float
        Median over channels of the AUC of the best explanation (NaN if none has one).
    share_significant : float
        Share of channels whose best explanation has a Benjamini-Hochberg q-value below ``alpha`` (the
        q-values adjust the Bonferroni-corrected p-values, see :class:`crp_invert.Explanation`).
    planted_truth : float or None
        Output layer only: share of output neurons whose best explanation is exactly their class's
        ``shape AND color`` (from the L = 2 labeling).
    explanation_accuracy : float or None
        Output layer only: table-1 style accuracy of explanations of the L = 3 labels.
    """

    layer: str
    channels: int
    median_auc: float
    share_significant: float
    planted_truth: float | None = None
    explanation_accuracy: float | None = None


@dataclass
class DemoSummary:
    """What :func:`run_demo` did and found.

    Attributes
    ----------
    out_dir : Path
    n_samples : int
    layers : list of LayerSummary
    planted_truth_score : float
        Output layer, L = 2: share of logits labeled exactly ``shape AND color``.
    planted_truth_score_l3 : float
        The same for the L = 3 labels of the report (lower: subsets can win).
    explanation_accuracy_l2, explanation_accuracy_l3 : float
        Table-1 style accuracy of explanations (IoU match to the class) for L = 2 and L = 3.
    model_accuracy : float
        Accuracy of the demo model on the generated images.
    n_correct : int
        Shapes images the model classifies correctly.
    alpha : float
        Level of the significance share.
    correction : str
        How p-values were corrected for the significance share.
    files : dict of str to str
        The main outputs by name: ``report``, ``cache``, ``labels`` (folder), ``summary``, figures, ...
    written : list of str
        Every file the demo wrote, relative to ``out_dir`` (``summary.json`` last).
    timings : dict of str to float
        Seconds per stage.
    planted_truth_score_l3_relevance : float
        The planted-truth score of L = 3 labels of the output layer's *relevances* on the shapes images (where the
        truth is planted).
    planted_truth_score_l3_relevance_all : float
        The same for the report's relevance labels (``source="relevance"``), over every row: on the artifact images
        the model's shortcut lowers the logit of the image's own class, so a few logits get ``shape AND color AND
        NOT artifact``, a true statement about the model.
    labels_differ : dict of str to int
        Per layer, the channels whose activation and relevance labels differ.
    n_artifact : int
        Images of the artifact concept set after the ``n_samples`` shapes images.
    audit_layer, artifact_class : str
        The audited layer and the class with the planted artifact.
    artifact_rank : int or None
        Rank (1 = largest share of the class's relevance) of the first channel flagged ``artifact`` in the
        audit of ``artifact_class``; None if none is listed.
    artifact_channel : str or None
        The artifact suspect of ``artifact_class``: ``layer:channel``, its artifact AUC and its label.
    artifact_share : float
        That suspect's share of the class's relevance (0 without one).
    other_suspect_share : float
        The largest share of an artifact suspect in any other class (0 without one); ``other_suspect_class``
        names the class.
    suspect_classes : list of str
        The other classes with an artifact suspect of share >= ``audit_min_share`` (:meth:`Audit.suspects`).
    false_flags : int
        Flagged channels of any kind (artifact, unrelated, unlabeled) with a share >= ``audit_min_share`` in the
        classes without the artifact; the unrelated and unlabeled ones depend on the labels.
    audit_min_share : float
    verdict : str
        The audit's verdict line of ``artifact_class``.
    """

    out_dir: Path
    n_samples: int
    layers: list[LayerSummary]
    planted_truth_score: float
    planted_truth_score_l3: float
    explanation_accuracy_l2: float
    explanation_accuracy_l3: float
    model_accuracy: float
    n_correct: int = 0
    alpha: float = 0.05
    correction: str = "Benjamini-Hochberg q of the Bonferroni-corrected p-values"
    files: dict[str, str] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    planted_truth_score_l3_relevance: float = math.nan
    planted_truth_score_l3_relevance_all: float = math.nan
    labels_differ: dict[str, int] = field(default_factory=dict)
    n_artifact: int = 0
    audit_layer: str = ""
    artifact_class: str = ""
    artifact_rank: int | None = None
    artifact_channel: str | None = None
    artifact_share: float = 0.0
    other_suspect_share: float = 0.0
    other_suspect_class: str | None = None
    suspect_classes: list[str] = field(default_factory=list)
    false_flags: int = 0
    audit_min_share: float = AUDIT_MIN_SHARE
    verdict: str = ""

    @property
    def audit_margin(self) -> float:
        """``artifact_share / other_suspect_share`` (inf without another suspect, NaN without the planted one)."""
        if self.artifact_share <= 0:
            return math.nan
        return self.artifact_share / self.other_suspect_share if self.other_suspect_share > 0 else math.inf

    def rows(self) -> list[dict[str, Any]]:
        """One dict per layer (the columns of :meth:`table`)."""
        return [{"layer": item.layer, "channels": item.channels, "median AUC": item.median_auc,
                 f"share q<{self.alpha:g}": item.share_significant,
                 "planted truth (L=2)": "" if item.planted_truth is None else item.planted_truth,
                 "expl. accuracy (L=3)": "" if item.explanation_accuracy is None else item.explanation_accuracy}
                for item in self.layers]

    def table(self) -> str:
        """A plain-text summary: per layer channels, median AUC, significant share, planted truth; then the planted
        truth, the relevance labels, the audit and the model's accuracy (every share and AUC with 3 decimals)."""
        rows = self.rows()
        header = list(rows[0]) if rows else ["layer"]
        lines = [[_cell(row[column]) for column in header] for row in rows]
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
               "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
        out.append(f"significance: {self.correction}, q < {self.alpha:g}")
        out.append(
            f"planted truth: share of the {self.layers[-1].channels if self.layers else 0} output neurons "
            f"whose best explanation is exactly `shape AND color`, from an L = 2 labeling: "
            f"{self.planted_truth_score:.3f} (L = 3: {self.planted_truth_score_l3:.3f}); accuracy of "
            f"explanations (IoU match to the class): L = 2 {self.explanation_accuracy_l2:.3f}, "
            f"L = 3 {self.explanation_accuracy_l3:.3f}")
        out.append(
            f"relevance labels (source=\"relevance\"): planted truth of the output neurons at L = 3: "
            f"{self.planted_truth_score_l3_relevance:.3f} on the shapes images, "
            f"{self.planted_truth_score_l3_relevance_all:.3f} with the artifact images (activations: "
            f"{self.planted_truth_score_l3:.3f}); "
            f"channels whose activation and relevance labels differ: "
            + ", ".join(f"{layer} {count}" for layer, count in self.labels_differ.items()))
        if self.audit_layer:
            out.append(self._audit_line())
        out.append(f"model accuracy on the {self.n_samples} demo images: {self.n_correct} of {self.n_samples} "
                   f"correct ({self.model_accuracy:.2%})")
        return "\n".join(line.rstrip() for line in out)

    def _audit_line(self) -> str:
        others = (f"largest artifact-suspect share in another class {self.other_suspect_share:.3f} "
                  f"({self.other_suspect_class}), margin {self.audit_margin:.1f}x" if self.other_suspect_class
                  else "no artifact suspect in any other class")
        suspects = ", ".join(self.suspect_classes) or "none"
        return (f"Clever-Hans audit of {self.audit_layer} ({self.n_artifact} artifact images added as the concept "
                f"'artifact'): {self.verdict}; {others}; other classes with an artifact suspect (share >= "
                f"{self.audit_min_share:g}): {suspects}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (NaN and inf as null)."""
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["audit_margin"] = self.audit_margin
        return _json_safe(data)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def layer_summary(layer: str, layer_labels: Any, alpha: float = 0.05) -> LayerSummary:
    """Channels, median AUC and share of q (Benjamini-Hochberg) < ``alpha`` of a layer's best explanations."""
    best = [layer_labels.best(f) for f in range(len(layer_labels))]
    aucs = [b.auc for b in best if b is not None]
    significant = [b is not None and b.p_value_bh < alpha for b in best]
    return LayerSummary(
        layer=layer,
        channels=len(layer_labels),
        median_auc=float(np.median(aucs)) if aucs else float("nan"),
        share_significant=float(np.mean(significant)) if significant else float("nan"),
    )


def label_file_names(layers: list[str]) -> dict[str, str]:
    """Layer -> its file name in a labels folder, as ``crp-invert label --out DIR`` names them: unsafe characters
    replaced by ``_``, ``_`` appended until the name is unique and not ``index`` (``index.json`` lists them)."""
    names: dict[str, str] = {}
    for layer in layers:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", layer).strip(".") or "layer"
        while stem in names.values() or stem == "index":
            stem += "_"
        names[layer] = stem
    return {layer: f"{stem}.json" for layer, stem in names.items()}


@dataclass(frozen=True)
class _Settings:
    """The arguments of :func:`run_demo`, checked."""

    device: str | torch.device
    n_samples: int
    seed: int
    L: int
    B: int
    batch_size: int
    n_glocal: int
    top_k: int
    max_channels: int
    n_reference: int
    alpha: float
    reference_heatmaps: bool
    progress: bool
    n_artifact: int

    def check(self) -> None:
        n = self.n_samples
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 16:
            raise ValueError(f"n_samples must be an int >= 16 (one image per class at least), got {n!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")


@dataclass
class _Outputs:
    """The output folder, the files the stages wrote into it (as they write them) and each stage's seconds."""

    out: Path
    files: dict[str, str] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, path: Path, key: str | None = None) -> Path:
        """Record a written file (``key``: also one of the main outputs of ``DemoSummary.files``)."""
        self.written.append(path.relative_to(self.out).as_posix())
        if key is not None:
            self.files[key] = str(path)
        return path

    def add_folder(self, folder: Path, key: str) -> None:
        """Record every file a library call wrote into ``folder`` (CRP's files)."""
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.add(path)
        self.files[key] = str(folder)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start
        logger.info("%s: %.1f s", name, self.timings[name])


def _prepare_out(out_dir: str | Path, overwrite: bool) -> Path:
    """The output folder, created; an existing non-empty one only with ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {str(out)!r} exists and is not empty; pass --overwrite to write into it")
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class _Data:
    dataset: Any  # AuditDataset: the shapes images, then the artifact concept set
    model: torch.nn.Module
    images: torch.Tensor
    logits: torch.Tensor | None = None


def _load_data(settings: _Settings) -> _Data:
    from .data import AuditDataset
    from .model import load_demo_model

    dataset = AuditDataset(int(settings.n_samples), seed=settings.seed, n_artifact=settings.n_artifact)
    return _Data(dataset=dataset, model=load_demo_model(settings.device), images=dataset.tensors()[0])


def _record(data: _Data, settings: _Settings, outputs: _Outputs) -> tuple[Any, Any, Path]:
    """CRP's FeatureVisualization over every layer, recording the cache: ``(attribution setup, fv, cache path)``."""
    from ..integration.attribution import channel_attribution
    from ..integration.recording import InvertFeatureVisualization

    setup = channel_attribution(data.model, data.model.layer_names, settings.device)
    cache_path = outputs.out / "activations.h5"
    fv = InvertFeatureVisualization(setup.attribution, data.dataset, setup.layer_map, path=str(outputs.out / "crp"),
                                    device=settings.device, activation_cache=str(cache_path), overwrite=True,
                                    progress=settings.progress)
    checkpoints = fv.run_distributed(setup.composite, 0, len(data.dataset), batch_size=settings.batch_size,
                                     checkpoint=10**9)
    fv.collect_results(checkpoints)
    outputs.add(cache_path, "cache")
    outputs.add_folder(outputs.out / "crp", "crp")
    return setup, fv, cache_path


def _write_labels(labels: dict[str, Any], folder: Path, outputs: _Outputs, key: str) -> None:
    """One JSON file per layer (the file names of ``crp-invert label --out``) and their ``index.json``."""
    from ..core.labels import write_text_atomically

    folder.mkdir(exist_ok=True)
    names = label_file_names(list(labels))
    for layer, name in names.items():
        labels[layer].to_json(outputs.add(folder / name))
    write_text_atomically(outputs.add(folder / "index.json"), json.dumps(names, indent=2))
    outputs.files[key] = str(folder)


def _label(data: _Data, cache_path: Path, settings: _Settings, outputs: _Outputs, source: str) -> dict[str, Any]:
    """Label every channel of every layer from its activations or relevances, written to a labels folder."""
    from ..labeler import ConceptLabeler

    labeler = ConceptLabeler(data.dataset.concepts, device=settings.device)
    labels = labeler.label_cache(str(cache_path), L=settings.L, B=settings.B, source=source,
                                 progress=settings.progress and source == "activation")
    suffix = "" if source == "activation" else f"_{source}"
    _write_labels(labels, outputs.out / f"labels{suffix}", outputs, f"labels{suffix}")
    return labels


def _write_inputs(data: _Data, outputs: _Outputs) -> None:
    """The inputs of ``crp-invert label / find / audit`` on the demo's cache, one row per cache row."""
    from .data import class_concepts

    dataset, out = data.dataset, outputs.out
    dataset.concepts.save(outputs.add(out / "concepts.npz", "concepts"))
    np.save(outputs.add(out / "targets.npy", "targets"), dataset.targets.numpy())
    classes = class_concepts()
    outputs.add(out / "classes.json", "classes").write_text(
        json.dumps({name: list(classes[name]) for name in dataset.class_names}, indent=1), encoding="utf-8")


def _planted_truth(data: _Data, labels: dict[str, Any], cache_path: Path, settings: _Settings,
                   outputs: _Outputs) -> dict[str, Any]:
    """Planted-truth scores of the output layer (L = 2 and L = 3), the accuracy of explanations and of the model."""
    from ..labeler import ConceptLabeler
    from ..storage.cache import ActivationCache
    from .truth import explanation_accuracy, planted_truth_score

    dataset, output_layer = data.dataset, data.model.layer_names[-1]
    labeler = ConceptLabeler(dataset.concepts, device=settings.device)
    labels_l2 = labeler.label_cache(str(cache_path), layers=[output_layer], L=2, B=settings.B,
                                    progress=False)[output_layer]
    labels_l2.to_json(outputs.add(outputs.out / f"{label_file_names([output_layer])[output_layer][:-5]}_L2.json"))
    with ActivationCache(cache_path) as cache:
        data.logits = cache.activations(output_layer)
    base = slice(0, dataset.n_base)
    n_correct = int((data.logits[base].argmax(1) == dataset.targets[base]).sum())
    truth, targets = dataset.class_formulas, dataset.targets
    return dict(planted_truth_score=planted_truth_score(labels_l2, truth, dataset.class_names),
                planted_truth_score_l3=planted_truth_score(labels[output_layer], truth, dataset.class_names),
                explanation_accuracy_l2=explanation_accuracy(labels_l2, dataset.concepts, targets),
                explanation_accuracy_l3=explanation_accuracy(labels[output_layer], dataset.concepts, targets),
                model_accuracy=n_correct / dataset.n_base, n_correct=n_correct)


def _first_marked(dataset: Any, logits: torch.Tensor) -> int | None:
    """The first correctly classified shapes image of the artifact class that carries the artifact."""
    from .data import ARTIFACT_CLASS

    target = dataset.class_names.index(ARTIFACT_CLASS)
    for i in np.flatnonzero(dataset.carries_artifact[:dataset.n_base]):
        if int(dataset.targets[i]) == target and int(logits[i].argmax()) == target:
            return int(i)
    return None


def _pick_samples(targets: torch.Tensor, predictions: torch.Tensor, n: int, first: int | None = None) -> list[int]:
    """``first`` (if given), then the first correctly classified sample of other classes, ``n`` in all."""
    chosen, seen = ([], set()) if first is None or n < 1 else ([first], {int(targets[first])})
    if len(chosen) == n:
        return chosen
    for i, (t, p) in enumerate(zip(targets.tolist(), predictions.tolist(), strict=True)):
        if t == p and t not in seen:
            chosen.append(i)
            seen.add(t)
        if len(chosen) == n:
            break
    return chosen


def _save_figure(figure: Any, path: Path, outputs: _Outputs, key: str, dpi: int = 100) -> None:
    import matplotlib.pyplot as plt

    figure.savefig(outputs.add(path, key), dpi=dpi, bbox_inches="tight")
    plt.close(figure)


def _glocal(data: _Data, setup: Any, labels: dict[str, Any], cache_path: Path, settings: _Settings,
            outputs: _Outputs) -> tuple[list[int], list[Any]]:
    """Decompose a few predictions into labeled channel heatmaps with their evidence; draw them:
    ``(chosen samples, glocal explanations)``."""
    from ..integration.glocal import Evidence, decompose_batch
    from ..plot import plot_glocal
    from ..storage.cache import ActivationCache

    dataset, targets = data.dataset, data.dataset.targets
    chosen = _pick_samples(targets, data.logits.argmax(1), settings.n_glocal, first=_first_marked(dataset, data.logits))
    if not chosen:
        return chosen, []
    with ActivationCache(cache_path) as cache:  # the evidence: percentiles in the labeled data, labels that hold
        evidence = Evidence(cache, concepts=dataset.concepts, sample_index=chosen)
        glocals = decompose_batch(setup.attribution, data.images[chosen].to(settings.device),
                                  [int(targets[i]) for i in chosen], GLOCAL_LAYER, setup.composite,
                                  labels=labels[GLOCAL_LAYER], top_k=settings.top_k, progress=settings.progress,
                                  evidence=evidence)
    glocals = [g.to("cpu") for g in glocals]
    (outputs.out / "figures").mkdir(exist_ok=True)
    for k, (i, glocal) in enumerate(zip(chosen, glocals, strict=True)):
        figure = plot_glocal(glocal, image=data.images[i], class_name=dataset.class_names[glocal.target],
                             ncols=GLOCAL_COLUMNS, max_label_chars=GLOCAL_LABEL_CHARS)
        _save_figure(figure, outputs.out / "figures" / f"glocal_{k}.png", outputs, f"glocal_{k}")
    return chosen, glocals


def _circuit(data: _Data, labels: dict[str, Any], target: int, outputs: _Outputs) -> Any:
    """The weight circuit of the logit ``target`` from the last hidden layer, drawn."""
    from ..integration.circuits import circuit_by_weight
    from ..plot import plot_circuit

    layers = data.model.layer_names
    circuit = circuit_by_weight(layers[-1], target, k=min(6, data.model.linear2.in_features), labels=labels[layers[-2]],
                                model=data.model, source_layer=layers[-2],
                                target_name=data.dataset.class_names[target])
    _save_figure(plot_circuit(circuit), outputs.out / "figures" / "circuit.png", outputs, "circuit")
    return circuit


def _audit(data: _Data, labels: dict[str, Any], cache_path: Path, outputs: _Outputs) -> Any:
    """The Clever-Hans audit of :data:`AUDIT_LAYER` over the shapes images, the artifact detected over all rows."""
    from ..audit import audit
    from .data import ARTIFACT, class_concepts

    dataset = data.dataset
    result = audit(str(cache_path), labels, AUDIT_LAYER, dataset.class_names, targets=dataset.targets,
                   artifacts=[ARTIFACT], class_concepts=class_concepts(), concepts=dataset.concepts,
                   min_share=AUDIT_MIN_SHARE, samples=np.arange(dataset.n_base))
    result.to_json(outputs.add(outputs.out / "audit.json", "audit"))
    return result


def _audit_facts(result: Any) -> dict[str, Any]:
    """The summary's audit fields: the planted class's suspect, the largest suspect share elsewhere, flags."""
    from .data import ARTIFACT_CLASS

    planted = result[ARTIFACT_CLASS]
    rank = next((i for i, c in enumerate(planted.channels, start=1) if c.flag == "artifact"), None)
    suspect = planted.suspect
    others = [item for item in result.classes if item.name != ARTIFACT_CLASS]
    strongest = max(others, key=lambda item: item.suspect_share, default=None)
    flagged = {name: channels for name, channels in result.flagged().items() if name != ARTIFACT_CLASS}
    suspects = [name for name in result.suspects() if name != ARTIFACT_CLASS]
    return dict(
        audit_layer=result.layer, artifact_class=ARTIFACT_CLASS, artifact_rank=rank,
        artifact_channel=None if suspect is None else
        f"{suspect.layer}:{suspect.channel} (artifact AUC {suspect.artifact_auc:.3f}; {suspect.shown_label})",
        artifact_share=planted.suspect_share,
        other_suspect_share=0.0 if strongest is None else strongest.suspect_share,
        other_suspect_class=None if strongest is None or strongest.suspect is None else strongest.name,
        suspect_classes=suspects, false_flags=sum(len(channels) for channels in flagged.values()),
        audit_min_share=result.min_share, verdict=planted.verdict(result.min_share, result.quantity))


def _notes(summary: DemoSummary, settings: _Settings, data: _Data) -> list[str]:
    """The report's prose about this run."""
    dataset = data.dataset
    layers = data.model.layer_names
    notes = [
        f"Embedded demo: {dataset.n_base} generated shapes images (seed {settings.seed}) followed by "
        f"{len(dataset) - dataset.n_base} images of the artifact concept set (the planted mark overlaid on random "
        f"images), the demo CNN ({summary.n_correct} of {dataset.n_base} shapes images correct), CRP "
        f"FeatureVisualization with EpsilonPlusFlat + SequentialMergeBatchNorm over {', '.join(layers)}; labels "
        f"L={settings.L}, B={settings.B} over {dataset.concepts.n_concepts} concepts: the attributes and 'artifact' "
        "(never the (shape, color) classes).",
        f"Planted truth of the output layer {layers[-1]}: from an L = 2 labeling, {summary.planted_truth_score:.3f} "
        f"of the output neurons get exactly `shape AND color` (L = 3: {summary.planted_truth_score_l3:.3f}, where "
        f"subsets such as `circle AND large AND red` can rank higher); accuracy of explanations (IoU match to the "
        f"class) L = 2: {summary.explanation_accuracy_l2:.3f}, L = 3: {summary.explanation_accuracy_l3:.3f}.",
        f"Significance: share of channels whose best explanation has q < {settings.alpha:g} ({summary.correction}).",
        "Sources: the channel tables, cards and the numbers above label the channels' mean-pooled activations "
        "(source=\"activation\"); each layer's second table puts the labels of their relevances "
        "(source=\"relevance\") next to them. At L = 3 the relevance labels of the output neurons lose the "
        f"'large' confound of the activations: planted truth {summary.planted_truth_score_l3_relevance:.3f} with "
        f"relevance against {summary.planted_truth_score_l3:.3f} with activation (both L = 3, B = {settings.B}; "
        f"the relevance score on the shapes images; with the artifact images "
        f"{summary.planted_truth_score_l3_relevance_all:.3f}: the model's shortcut lowers the logit of an artifact "
        "image's own class, so a few relevance labels read `shape AND color AND NOT artifact`).",
        "Glocal figures: every channel part shows its evidence on the image from the activation cache (the "
        "channel's activation percentile among the labeled images, and whether its label holds on the image).",
    ]
    if summary.audit_layer:
        notes.append(f"Clever-Hans audit (section at the end): the mark planted on the '{summary.artifact_class}' "
                     "training images was added as the concept 'artifact'; a channel is an artifact suspect where "
                     "its activations detect that concept (AUC and q) and it carries a share of a class's "
                     f"relevance. {summary._audit_line()}.")
    return notes


def _report(data: _Data, setup: Any, fv: Any, cache_path: Path, labels: dict[str, Any], relevance_labels: Any,
            glocal: tuple[list[int], list[Any]], circuits: list[Any], audits: list[Any], summary: DemoSummary,
            settings: _Settings, outputs: _Outputs) -> None:
    from ..report import write_report

    chosen, glocals = glocal
    write_report(outputs.add(outputs.out / "report.html", "report"), labels, cache=str(cache_path),
                 concepts=data.dataset.concepts, images=data.dataset, feature_visualization=fv,
                 composite=setup.composite if settings.reference_heatmaps else None, glocals=glocals,
                 glocal_images=[data.images[i] for i in chosen], class_names=data.dataset.class_names,
                 circuits=circuits, summary=summary.rows(), notes=_notes(summary, settings, data),
                 title="crp-invert demo report", max_channels=settings.max_channels,
                 n_reference=settings.n_reference, progress=settings.progress, relevance_labels=relevance_labels,
                 audits=audits)


def _relevance_facts(data: _Data, labels: dict[str, Any], relevance_labels: dict[str, Any], cache_path: Path,
                     settings: _Settings) -> dict[str, Any]:
    """Planted truth of the output layer's relevance labels (L = 3) on the shapes images, where the truth is
    planted, and on every row (the artifact images too); the channels whose two labels differ."""
    from ..labeler import ConceptLabeler
    from ..report import differing_channels
    from ..storage.cache import ActivationCache
    from .truth import planted_truth_score

    output_layer, dataset = data.model.layer_names[-1], data.dataset
    with ActivationCache(cache_path) as cache:
        relevances = cache.relevances(output_layer)[:dataset.n_base]
    shapes = ConceptLabeler(dataset.base.concepts, device=settings.device).label(
        relevances, L=settings.L, B=settings.B, layer=output_layer, progress=False)
    return dict(planted_truth_score_l3_relevance=planted_truth_score(shapes, dataset.class_formulas,
                                                                     dataset.class_names),
                planted_truth_score_l3_relevance_all=planted_truth_score(
                    relevance_labels[output_layer], dataset.class_formulas, dataset.class_names),
                labels_differ={name: len(differing_channels(labels[name], relevance_labels[name])) for name in labels})


def _summary(data: _Data, labels: dict[str, Any], facts: dict[str, Any], settings: _Settings,
             outputs: _Outputs) -> DemoSummary:
    summaries = [layer_summary(name, labels[name], settings.alpha) for name in labels]
    summaries[-1].planted_truth = facts["planted_truth_score"]
    summaries[-1].explanation_accuracy = facts["explanation_accuracy_l3"]
    return DemoSummary(out_dir=outputs.out, n_samples=data.dataset.n_base, layers=summaries, alpha=settings.alpha,
                       files=outputs.files, written=outputs.written, timings=outputs.timings,
                       n_artifact=len(data.dataset) - data.dataset.n_base, **facts)


def run_demo(
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    n_samples: int = DEFAULT_SAMPLES,
    seed: int = 2,
    L: int = 3,
    B: int = 3,
    batch_size: int = 100,
    n_glocal: int = 3,
    top_k: int = 6,
    max_channels: int = 12,
    n_reference: int = 6,
    alpha: float = 0.05,
    reference_heatmaps: bool = False,
    progress: bool = True,
    n_artifact: int | None = None,
    overwrite: bool = False,
) -> DemoSummary:
    """Run the whole product on the embedded demo and write everything into ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created; the only place anything is written). An existing non-empty folder is refused
        unless ``overwrite``.
    device : str or torch.device
        Where the model runs and the labels are searched (``"cuda"`` works).
    n_samples : int
        Number of demo images (:data:`DEFAULT_SAMPLES`; use e.g. 200 for a quick check).
    seed : int
        Seed of the images (the model was evaluated on seed 1 and trained on seeds >= 1000).
    L, B : int
        Maximal formula length and beam width of the labels of every layer.
    batch_size : int
        Samples per CRP pass.
    n_glocal : int
        Predictions decomposed into labeled channel heatmaps of ``conv3``.
    top_k : int
        Channels per decomposition.
    max_channels : int
        Channels per layer with figures in the report (the tables list every channel).
    n_reference : int
        CRP reference samples per channel in the report.
    alpha : float
        Level for the share of significant channels (Benjamini-Hochberg q < alpha).
    reference_heatmaps : bool
        Also compute CRP's conditional heatmaps of the reference samples (slower).
    progress : bool
        Show tqdm progress bars.
    n_artifact : int, optional
        Images of the artifact concept set added after the shapes images (default
        :data:`crp_invert.demo.data.N_ARTIFACT_IMAGES`); 0 skips the audit.
    overwrite : bool
        Write into an existing non-empty ``out_dir`` (files of the same name are replaced).

    Returns
    -------
    DemoSummary

    Examples
    --------
    >>> summary = run_demo("demo-out", n_samples=160, progress=False)      # doctest: +SKIP
    >>> summary.planted_truth_score_l3_relevance, summary.written[-1]     # doctest: +SKIP
    (1.0, 'summary.json')
    """
    from .data import N_ARTIFACT_IMAGES

    settings = _Settings(device, n_samples, seed, L, B, batch_size, n_glocal, top_k, max_channels, n_reference, alpha,
                         reference_heatmaps, progress, N_ARTIFACT_IMAGES if n_artifact is None else int(n_artifact))
    settings.check()
    outputs = _Outputs(_prepare_out(out_dir, overwrite))
    with outputs.stage("data"):
        data = _load_data(settings)
    with outputs.stage("crp"):
        setup, fv, cache_path = _record(data, settings, outputs)
    with outputs.stage("labels"):
        labels = _label(data, cache_path, settings, outputs, "activation")
        _write_inputs(data, outputs)
    with outputs.stage("planted truth"):
        facts = _planted_truth(data, labels, cache_path, settings, outputs)
    with outputs.stage("glocal"):
        glocal = _glocal(data, setup, labels, cache_path, settings, outputs)
        circuits = [_circuit(data, labels, int(data.dataset.targets[glocal[0][0]]), outputs)] if glocal[0] else []
    with outputs.stage("relevance labels"):
        relevance_labels = _label(data, cache_path, settings, outputs, "relevance")
        facts.update(_relevance_facts(data, labels, relevance_labels, cache_path, settings))
    audits = []
    if settings.n_artifact:
        with outputs.stage("audit"):
            audits.append(_audit(data, labels, cache_path, outputs))
            facts.update(_audit_facts(audits[0]))
    summary = _summary(data, labels, facts, settings, outputs)
    with outputs.stage("report"):
        _report(data, setup, fv, cache_path, labels, relevance_labels, glocal, circuits, audits, summary, settings,
                outputs)
    summary_path = outputs.add(outputs.out / "summary.json", "summary")
    summary_path.write_text(json.dumps(summary.to_json(), indent=2), encoding="utf-8")
    return summary
