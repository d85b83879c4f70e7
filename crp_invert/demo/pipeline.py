"""The main job on the embedded default, end to end: :func:`run_demo` (``crp-invert demo``).

1. generate the shapes dataset (:class:`~crp_invert.demo.data.ShapesDataset`) and load the demo
   CNN with its committed weights;
2. run CRP's ``FeatureVisualization`` (:class:`crp_invert.InvertFeatureVisualization`) over all conv
   and linear layers with the composite ``EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])``:
   CRP writes its ActMax / RelMax files into ``out_dir/crp``, the pooled activations and relevances
   of every sample go into ``out_dir/activations.h5``;
3. label every channel of every layer from the cache (``ConceptLabeler.label_cache``, L = 3, B = 3),
   written to ``out_dir/labels/<layer>.json`` (+ ``index.json``, the layout of ``crp-invert label --out``);
4. score the output layer against the planted truth: with L = 2 (a separate labeling of the logits)
   the share of output neurons whose best explanation is exactly ``shape AND color``, and the
   table-1 style accuracy of explanations (IoU match to the class) for both L = 2 and L = 3 (with
   L = 3, subsets such as ``circle AND large AND red`` can beat the exact truth, see
   :mod:`crp_invert.demo.truth`);
5. decompose a few predictions into labeled channel heatmaps of ``conv3``
   (:func:`crp_invert.decompose`) and draw the glocal figures, a weight circuit of the logits;
6. label every channel from its recorded relevances too (``source="relevance"``): the report shows both
   labels side by side; at L = 3 the relevance labels of the output layer lose the "large" confound of the
   activations (planted truth 1.0 with relevance, 0.5 with activation);
7. the Clever-Hans audit (:func:`crp_invert.audit.audit`) of :data:`AUDIT_LAYER`: the data are the shapes
   images followed by an artifact concept set (:class:`~crp_invert.demo.data.AuditDataset`: the planted mark
   overlaid on random images, concept ``"artifact"``, merged with ``ConceptLabels.merge``), so the labels above
   already use the artifact concept; per class the channels with the largest share of its relevance, flagged
   (``audit.json``);
8. write the HTML report (:func:`crp_invert.report.write_report`), the figures (PNG) and
   ``summary.json`` into ``out_dir``.

Nothing is written outside ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["run_demo", "DemoSummary", "LayerSummary", "layer_summary", "DEFAULT_SAMPLES", "AUDIT_LAYER",
           "AUDIT_MIN_SHARE", "AUDIT_FALSE_FLAGS"]

logger = logging.getLogger(__name__)

#: default number of images of the demo (fits the 3-minute budget on 2 CPU cores)
DEFAULT_SAMPLES = 2000
#: layer whose channels decompose the demo predictions
GLOCAL_LAYER = "conv3"
#: layer of the demo's Clever-Hans audit
AUDIT_LAYER = "conv3"
#: share of a class's relevance from which a flagged channel counts in the demo's audit
AUDIT_MIN_SHARE = 0.1
#: flagged channels with a share >= AUDIT_MIN_SHARE in the 15 classes without the artifact, in the default run
#: (2,000 images, seed 2, committed weights; ``tests/test_demo_audit.py``): 4 flagged "artifact" (conv3:11, 5 and
#: 24, cool-color ring channels that the magenta mark also drives, labeled e.g. ``artifact AND blue AND ring``,
#: for green ring, blue ring, green square, blue triangle) and 4 "unrelated" (conv3:19 ``large AND red AND ring``
#: for green circle and green triangle, conv3:16 for red triangle, conv3:14 for green triangle). The artifact
#: class's first channel is conv3:23 ``artifact AND blue AND ring`` (share 0.113).
AUDIT_FALSE_FLAGS = 8


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
    alpha : float
        Level of the significance share.
    correction : str
        How p-values were corrected for the significance share.
    files : dict of str to str
        ``report``, ``cache``, ``labels``, ``summary`` and figure paths.
    timings : dict of str to float
        Seconds per step.
    planted_truth_score_l3_relevance : float
        The planted-truth score of the L = 3 labels of the output layer's *relevances* (``source="relevance"``).
    labels_differ : dict of str to int
        Per layer, the channels whose activation and relevance labels differ.
    n_artifact : int
        Images of the artifact concept set after the ``n_samples`` shapes images.
    audit_layer, artifact_class : str
        The audited layer and the class with the planted artifact.
    artifact_rank : int or None
        Rank (1 = largest share of the class's relevance) of the first channel flagged ``artifact`` in the
        audit of ``artifact_class``; None if none is flagged.
    artifact_channel : str or None
        That channel, ``layer:channel``, with its label.
    false_flags : int
        Flagged channels with a share >= ``audit_min_share`` in the classes without the artifact.
    audit_min_share : float
    """

    out_dir: Path
    n_samples: int
    layers: list[LayerSummary]
    planted_truth_score: float
    planted_truth_score_l3: float
    explanation_accuracy_l2: float
    explanation_accuracy_l3: float
    model_accuracy: float
    alpha: float = 0.05
    correction: str = "Benjamini-Hochberg q of the Bonferroni-corrected p-values"
    files: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    planted_truth_score_l3_relevance: float = math.nan
    labels_differ: dict[str, int] = field(default_factory=dict)
    n_artifact: int = 0
    audit_layer: str = ""
    artifact_class: str = ""
    artifact_rank: int | None = None
    artifact_channel: str | None = None
    false_flags: int = 0
    audit_min_share: float = AUDIT_MIN_SHARE

    def rows(self) -> list[dict[str, Any]]:
        """One dict per layer (the columns of :meth:`table`)."""
        rows = []
        for item in self.layers:
            rows.append(
                {
                    "layer": item.layer,
                    "channels": item.channels,
                    "median AUC": item.median_auc,
                    f"share q<{self.alpha:g}": item.share_significant,
                    "planted truth (L=2)": "" if item.planted_truth is None else item.planted_truth,
                    "expl. accuracy (L=3)": ""
                    if item.explanation_accuracy is None
                    else item.explanation_accuracy,
                }
            )
        return rows

    def table(self) -> str:
        """A plain-text summary table (per layer: channels, median AUC, significant share, planted truth)."""
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
            f"L = 3 {self.explanation_accuracy_l3:.3f}"
        )
        out.append(
            f"relevance labels (source=\"relevance\"): planted truth of the output neurons at L = 3: "
            f"{self.planted_truth_score_l3_relevance:.3f} (activations: {self.planted_truth_score_l3:.3f}); "
            f"channels whose activation and relevance labels differ: "
            + ", ".join(f"{layer} {count}" for layer, count in self.labels_differ.items())
        )
        if self.audit_layer:
            found = (f"rank {self.artifact_rank}: {self.artifact_channel}" if self.artifact_rank is not None
                     else "no channel flagged")
            out.append(
                f"Clever-Hans audit of {self.audit_layer} ({self.n_artifact} artifact images added as the concept "
                f"'artifact'): {self.artifact_class}: first channel flagged [artifact] at {found}; false flags "
                f"(share >= {self.audit_min_share:g}) in the other classes: {self.false_flags}"
            )
        out.append(f"model accuracy on the {self.n_samples} demo images: {self.model_accuracy:.4f}")
        return "\n".join(line.rstrip() for line in out)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return _json_safe(data)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
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


def _save_figure(figure, path: Path, dpi: int = 100) -> str:
    figure.savefig(path, dpi=dpi)
    return str(path)


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
) -> DemoSummary:
    """Run the whole product on the embedded demo and write everything into ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created; the only place anything is written).
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

    Returns
    -------
    DemoSummary
    """
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    from ..audit import audit
    from ..integration.circuits import circuit_by_weight
    from ..integration.glocal import decompose_batch
    from ..integration.recording import InvertFeatureVisualization
    from ..labeler import ConceptLabeler
    from ..plot import plot_circuit, plot_glocal
    from ..report import differing_channels, write_report
    from ..storage.cache import ActivationCache
    from .data import ARTIFACT, ARTIFACT_CLASS, N_ARTIFACT_IMAGES, AuditDataset, class_concepts
    from .model import load_demo_model
    from .truth import explanation_accuracy, planted_truth_score

    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 16:
        raise ValueError(f"n_samples must be an int >= 16 (one image per class at least), got {n_samples!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    files: dict[str, str] = {}

    def tick(name: str, start: float) -> float:
        timings[name] = time.perf_counter() - start
        logger.info("%s: %.1f s", name, timings[name])
        return time.perf_counter()

    start = time.perf_counter()
    n_artifact = N_ARTIFACT_IMAGES if n_artifact is None else n_artifact
    dataset = AuditDataset(int(n_samples), seed=seed, n_artifact=n_artifact)  # shapes, then the artifact set
    concepts = dataset.concepts  # the attribute concepts and "artifact" (ConceptLabels.merge)
    model = load_demo_model(device)
    layers = model.layer_names
    start = tick("generate data, load model", start)

    # -- CRP FeatureVisualization with recording ------------------------------------------------------
    composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
    attribution = CondAttribution(model, device=device)
    layer_map = {name: ChannelConcept() for name in layers}
    cache_path = out / "activations.h5"
    fv = InvertFeatureVisualization(
        attribution,
        dataset,
        layer_map,
        path=str(out / "crp"),
        device=device,
        activation_cache=str(cache_path),
        overwrite=True,
        progress=progress,
    )
    checkpoints = fv.run_distributed(composite, 0, len(dataset), batch_size=batch_size, checkpoint=10**9)
    fv.collect_results(checkpoints)
    files["cache"] = str(cache_path)
    files["crp"] = str(out / "crp")
    start = tick("CRP FeatureVisualization + recording", start)

    # -- labels ---------------------------------------------------------------------------------------
    labeler = ConceptLabeler(concepts, device=device)
    labels = labeler.label_cache(str(cache_path), L=L, B=B, progress=progress)
    labels_dir = out / "labels"
    labels_dir.mkdir(exist_ok=True)
    for name, layer_labels in labels.items():
        layer_labels.to_json(labels_dir / f"{name}.json")
    (labels_dir / "index.json").write_text(json.dumps({name: f"{name}.json" for name in labels}, indent=2))
    files["labels"] = str(labels_dir)
    start = tick(f"label {sum(len(v) for v in labels.values())} channels (L={L}, B={B})", start)

    # -- planted truth of the output layer -------------------------------------------------------------
    output_layer = layers[-1]
    truth = dataset.class_formulas
    labels_l2 = labeler.label_cache(str(cache_path), layers=[output_layer], L=2, B=B, progress=False)[
        output_layer
    ]
    labels_l2.to_json(out / f"{output_layer}_L2.json")
    targets = dataset.targets
    # the inputs of `crp-invert label / find / audit` on this cache, one row per cache row
    concepts.save(out / "concepts.npz")
    np.save(out / "targets.npy", targets.numpy())
    audit_classes = class_concepts()
    (out / "classes.json").write_text(
        json.dumps({name: list(audit_classes[name]) for name in dataset.class_names}, indent=1), encoding="utf-8")
    files.update(concepts=str(out / "concepts.npz"), targets=str(out / "targets.npy"),
                 classes=str(out / "classes.json"))
    score_l2 = planted_truth_score(labels_l2, truth, dataset.class_names)
    score_l3 = planted_truth_score(labels[output_layer], truth, dataset.class_names)
    accuracy_l2 = explanation_accuracy(labels_l2, concepts, targets)
    accuracy_l3 = explanation_accuracy(labels[output_layer], concepts, targets)
    with ActivationCache(cache_path) as cache:
        logits = cache.activations(output_layer)
    base = slice(0, dataset.n_base)
    model_accuracy = float((logits[base].argmax(1) == targets[base]).double().mean())
    start = tick("planted truth (L=2 labeling of the output layer)", start)

    # -- glocal decompositions and a circuit -------------------------------------------------------------
    images, _ = dataset.tensors()
    chosen = _pick_samples(targets, logits.argmax(1), n_glocal, first=_first_marked(dataset, logits))
    glocals = []
    if chosen:
        glocals = decompose_batch(
            attribution,
            images[chosen].to(device),
            [int(targets[i]) for i in chosen],
            GLOCAL_LAYER,
            composite,
            labels=labels[GLOCAL_LAYER],
            top_k=top_k,
            progress=progress,
        )
        glocals = [g.to("cpu") for g in glocals]
    figures_dir = out / "figures"
    figures_dir.mkdir(exist_ok=True)
    for k, (i, glocal) in enumerate(zip(chosen, glocals, strict=True)):
        figure = plot_glocal(
            glocal, image=images[i], class_name=dataset.class_names[glocal.target], ncols=glocal.top_k + 3
        )  # one row: input, class heatmap, channels, rest
        files[f"glocal_{k}"] = _save_figure(figure, figures_dir / f"glocal_{k}.png")
    circuits = []
    if chosen:
        target = int(targets[chosen[0]])
        circuit = circuit_by_weight(
            output_layer,
            target,
            k=min(6, model.linear2.in_features),
            labels=labels[layers[-2]],
            model=model,
            source_layer=layers[-2],
            target_name=dataset.class_names[target],
        )
        circuits.append(circuit)
        files["circuit"] = _save_figure(plot_circuit(circuit), figures_dir / "circuit.png")
    start = tick(f"glocal decomposition of {len(glocals)} predictions ({GLOCAL_LAYER}, top {top_k})", start)

    # -- relevance labels, side by side with the activation labels -------------------------------------------
    relevance_labels = labeler.label_cache(str(cache_path), L=L, B=B, source="relevance", progress=False)
    relevance_dir = out / "labels_relevance"
    relevance_dir.mkdir(exist_ok=True)
    for name, layer_labels in relevance_labels.items():
        layer_labels.to_json(relevance_dir / f"{name}.json")
    (relevance_dir / "index.json").write_text(json.dumps({name: f"{name}.json" for name in relevance_labels},
                                                         indent=2))
    files["labels_relevance"] = str(relevance_dir)
    score_l3_relevance = planted_truth_score(relevance_labels[output_layer], truth, dataset.class_names)
    labels_differ = {name: len(differing_channels(labels[name], relevance_labels[name])) for name in labels}
    start = tick(f"label {sum(len(v) for v in relevance_labels.values())} channels from relevances", start)

    # -- Clever-Hans audit -------------------------------------------------------------------------------------
    audits, audit_facts = [], {}
    if n_artifact:
        result = audit(str(cache_path), labels, AUDIT_LAYER, dataset.class_names, targets=targets,
                       artifacts=[ARTIFACT], class_concepts=class_concepts(), concepts=concepts,
                       min_share=AUDIT_MIN_SHARE, samples=np.arange(dataset.n_base))
        audits.append(result)
        files["audit"] = str(out / "audit.json")
        result.to_json(out / "audit.json")
        channels = result[ARTIFACT_CLASS].channels
        rank = next((i for i, c in enumerate(channels, start=1) if c.flag == "artifact"), None)
        audit_facts = dict(
            audit_layer=AUDIT_LAYER, artifact_class=ARTIFACT_CLASS, artifact_rank=rank,
            artifact_channel=None if rank is None else
            f"{AUDIT_LAYER}:{channels[rank - 1].channel} `{channels[rank - 1].label}`",
            false_flags=sum(len(v) for name, v in result.flagged().items() if name != ARTIFACT_CLASS),
        )
        start = tick(f"Clever-Hans audit of {AUDIT_LAYER}", start)

    summaries = [layer_summary(name, labels[name], alpha) for name in labels]
    summaries[-1].planted_truth = score_l2
    summaries[-1].explanation_accuracy = accuracy_l3
    summary = DemoSummary(
        out_dir=out, n_samples=dataset.n_base, layers=summaries, model_accuracy=model_accuracy, alpha=alpha,
        planted_truth_score=score_l2, planted_truth_score_l3=score_l3,
        planted_truth_score_l3_relevance=score_l3_relevance,
        explanation_accuracy_l2=accuracy_l2, explanation_accuracy_l3=accuracy_l3,
        files=files, timings=timings, labels_differ=labels_differ, n_artifact=len(dataset) - dataset.n_base,
        audit_min_share=AUDIT_MIN_SHARE, **audit_facts,
    )

    # -- report -------------------------------------------------------------------------------------------
    notes = [
        f"Embedded demo: {dataset.n_base} generated shapes images (seed {seed}) followed by "
        f"{len(dataset) - dataset.n_base} images of the artifact concept set (the planted mark overlaid on random "
        f"images), the demo CNN (accuracy {model_accuracy:.4f} on the shapes images), CRP FeatureVisualization "
        f"with EpsilonPlusFlat + SequentialMergeBatchNorm over {', '.join(layers)}; labels L={L}, B={B} over "
        f"{concepts.n_concepts} concepts: the attributes and 'artifact' (never the (shape, color) classes).",
        f"Planted truth of the output layer {output_layer}: from an L = 2 labeling, "
        f"{score_l2:.3f} of the output neurons get exactly `shape AND color` (L = 3: {score_l3:.3f}, where "
        f"subsets such as `circle AND large AND red` can rank higher); accuracy of explanations "
        f"(IoU match to the class) L = 2: {accuracy_l2:.3f}, L = 3: {accuracy_l3:.3f}.",
        f"Significance: share of channels whose best explanation has q < {alpha:g} ({summary.correction}).",
        f"Sources: the channel tables, cards and the numbers above label the channels' mean-pooled activations "
        f"(source=\"activation\"); each layer's second table puts the labels of their relevances "
        f"(source=\"relevance\") next to them. At L = 3 the relevance labels of the output neurons lose the "
        f"'large' confound of the activations: planted truth {score_l3_relevance:.3f} with relevance against "
        f"{score_l3:.3f} with activation (both L = 3, B = {B}).",
    ]
    if audit_facts:
        notes.append(
            f"Clever-Hans audit (section at the end): the mark planted on most '{ARTIFACT_CLASS}' training images "
            f"was added as the concept 'artifact'; in {AUDIT_LAYER}, the channel with the largest share of the "
            f"class's relevance that is flagged [artifact] has rank {audit_facts['artifact_rank']}; "
            f"false flags (share >= {AUDIT_MIN_SHARE:g}) in the other classes: {audit_facts['false_flags']}."
        )
    report_path = out / "report.html"
    write_report(
        report_path,
        labels,
        cache=str(cache_path),
        concepts=concepts,
        images=dataset,
        feature_visualization=fv,
        composite=composite if reference_heatmaps else None,
        glocals=glocals,
        glocal_images=[images[i] for i in chosen],
        class_names=dataset.class_names,
        circuits=circuits,
        summary=summary.rows(),
        notes=notes,
        title="crp-invert demo report",
        max_channels=max_channels,
        n_reference=n_reference,
        progress=progress,
        relevance_labels=relevance_labels,
        audits=audits,
    )
    files["report"] = str(report_path)
    tick("report", start)
    summary_path = out / "summary.json"
    files["summary"] = str(summary_path)
    summary_path.write_text(json.dumps(summary.to_json(), indent=2))
    return summary
