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
6. write the HTML report (:func:`crp_invert.report.write_report`), the figures (PNG) and
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
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

__all__ = ["run_demo", "DemoSummary", "LayerSummary", "layer_summary", "DEFAULT_SAMPLES"]

logger = logging.getLogger(__name__)

#: default number of images of the demo (fits the 3-minute budget on 2 CPU cores)
DEFAULT_SAMPLES = 2000
#: layer whose channels decompose the demo predictions
GLOCAL_LAYER = "conv3"


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
    planted_truth: Optional[float] = None
    explanation_accuracy: Optional[float] = None


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
    """

    out_dir: Path
    n_samples: int
    layers: List[LayerSummary]
    planted_truth_score: float
    planted_truth_score_l3: float
    explanation_accuracy_l2: float
    explanation_accuracy_l3: float
    model_accuracy: float
    alpha: float = 0.05
    correction: str = "Benjamini-Hochberg q of the Bonferroni-corrected p-values"
    files: Dict[str, str] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)

    def rows(self) -> List[Dict[str, Any]]:
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
        out.append(f"model accuracy on the {self.n_samples} demo images: {self.model_accuracy:.4f}")
        return "\n".join(line.rstrip() for line in out)

    def to_json(self) -> Dict[str, Any]:
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


def _pick_samples(targets: torch.Tensor, predictions: torch.Tensor, n: int) -> List[int]:
    """The first correctly classified sample of ``n`` different classes."""
    chosen, seen = [], set()
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
    out_dir: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
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

    Returns
    -------
    DemoSummary
    """
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    from ..integration.circuits import circuit_by_weight
    from ..integration.glocal import decompose_batch
    from ..integration.recording import InvertFeatureVisualization
    from ..labeler import ConceptLabeler
    from ..plot import plot_circuit, plot_glocal
    from ..report import write_report
    from ..storage.cache import ActivationCache
    from .data import ShapesDataset
    from .model import load_demo_model
    from .truth import explanation_accuracy, planted_truth_score

    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 16:
        raise ValueError(f"n_samples must be an int >= 16 (one image per class at least), got {n_samples!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    files: Dict[str, str] = {}

    def tick(name: str, start: float) -> float:
        timings[name] = time.perf_counter() - start
        logger.info("%s: %.1f s", name, timings[name])
        return time.perf_counter()

    start = time.perf_counter()
    dataset = ShapesDataset(int(n_samples), seed=seed)
    concepts = dataset.concepts
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
    score_l2 = planted_truth_score(labels_l2, truth, dataset.class_names)
    score_l3 = planted_truth_score(labels[output_layer], truth, dataset.class_names)
    accuracy_l2 = explanation_accuracy(labels_l2, concepts, targets)
    accuracy_l3 = explanation_accuracy(labels[output_layer], concepts, targets)
    with ActivationCache(cache_path) as cache:
        logits = cache.activations(output_layer)
    model_accuracy = float((logits.argmax(1) == targets).double().mean())
    start = tick("planted truth (L=2 labeling of the output layer)", start)

    # -- glocal decompositions and a circuit -------------------------------------------------------------
    images, _ = dataset.tensors()
    chosen = _pick_samples(targets, logits.argmax(1), n_glocal)
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

    summaries = [layer_summary(name, labels[name], alpha) for name in labels]
    summaries[-1].planted_truth = score_l2
    summaries[-1].explanation_accuracy = accuracy_l3
    summary = DemoSummary(
        out_dir=out,
        n_samples=len(dataset),
        layers=summaries,
        planted_truth_score=score_l2,
        planted_truth_score_l3=score_l3,
        explanation_accuracy_l2=accuracy_l2,
        explanation_accuracy_l3=accuracy_l3,
        model_accuracy=model_accuracy,
        alpha=alpha,
        files=files,
        timings=timings,
    )

    # -- report -------------------------------------------------------------------------------------------
    notes = [
        f"Embedded demo: {len(dataset)} generated shapes images (seed {seed}), the demo CNN "
        f"(accuracy {model_accuracy:.4f} on these images), CRP FeatureVisualization with "
        f"EpsilonPlusFlat + SequentialMergeBatchNorm over {', '.join(layers)}; labels L={L}, B={B} over "
        f"{concepts.n_concepts} attribute concepts (never the (shape, color) classes).",
        f"Planted truth of the output layer {output_layer}: from an L = 2 labeling, "
        f"{score_l2:.3f} of the output neurons get exactly `shape AND color` (L = 3: {score_l3:.3f}, where "
        f"subsets such as `circle AND large AND red` can rank higher); accuracy of explanations "
        f"(IoU match to the class) L = 2: {accuracy_l2:.3f}, L = 3: {accuracy_l3:.3f}.",
        f"Significance: share of channels whose best explanation has q < {alpha:g} ({summary.correction}).",
    ]
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
    )
    files["report"] = str(report_path)
    tick("report", start)
    summary_path = out / "summary.json"
    files["summary"] = str(summary_path)
    summary_path.write_text(json.dumps(summary.to_json(), indent=2))
    return summary
