"""Issue 17: how often the label a glocal part shows holds on the sample it explains.

A glocal decomposition shows, for each of a sample's ``top_k`` most relevant channels, a label. Without evidence
that is the channel's best reliable label (:meth:`LayerLabels.best`), a statement about the whole dataset; with
evidence (the default wherever a cache is at hand) it is the best reliable label of the channel *that holds on
this sample*, or "no reliable label holds here". This script counts, per layer, over every sample of a cache:

- the parts whose channel has a reliable label at all,
- the parts whose best reliable label holds on the sample (what a view without evidence would claim),
- the parts where some reliable label of the channel's beam holds (what the evidence-based title shows).

The parts are the ``top_k`` channels by the sample's recorded relevance (``rank_by="signed"``, as
:func:`crp_invert.decompose_batch` ranks them: a channel's conditional heatmap sums to its relevance), so no
attribution is needed here.

    python benchmarks/bench_glocal_holds.py --demo-out demo-out       # after `crp-invert demo --out demo-out`
    python benchmarks/bench_glocal_holds.py --fashion                 # records the shared FashionMNIST model
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HEADER = ("| layer | parts (samples x top_k) | channel has a reliable label | its best reliable label holds "
          "(no evidence) | a reliable label of its beam holds (shown with evidence) |\n| --- | --- | --- | --- | --- |")


def holds_table(cache_path, labels_by_layer, concepts, top_k: int = 8) -> list[str]:
    """One markdown row per layer of the cache that has labels."""
    from crp_invert import ActivationCache

    rows = []
    with ActivationCache(cache_path) as cache:
        for layer, labels in labels_by_layer.items():
            relevance = np.asarray(cache.dataset(layer, "relevance")[:], dtype=np.float64)
            k = min(top_k, relevance.shape[1])
            top = np.argsort(-relevance, axis=1, kind="stable")[:, :k]
            best_holds, any_holds, has_reliable = _holding(labels, concepts, relevance.shape[1])
            samples = np.arange(len(top))[:, None]
            n_parts = top.size
            reliable = has_reliable[top].sum()
            rows.append(f"| {layer} | {n_parts} | {reliable} ({reliable / n_parts:.0%}) | "
                        f"{best_holds[top, samples].sum()} ({best_holds[top, samples].sum() / n_parts:.0%}) | "
                        f"{any_holds[top, samples].sum()} ({any_holds[top, samples].sum() / n_parts:.0%}) |")
    return rows


def _holding(labels, concepts, n_channels: int):
    """Per channel and sample: does its best reliable label hold, does any reliable label of its beam hold;
    and per channel whether it has a reliable label."""
    n = concepts.n_samples
    best_holds = np.zeros((n_channels, n), dtype=bool)
    any_holds = np.zeros((n_channels, n), dtype=bool)
    has_reliable = np.zeros(n_channels, dtype=bool)
    for channel in range(n_channels):
        reliable = [e for e in labels.explanations(channel) if e.reliable]
        masks = [e.formula.evaluate(concepts).cpu().numpy().astype(bool).reshape(-1) for e in reliable]
        if masks:
            has_reliable[channel] = True
            best_holds[channel] = masks[0]
            any_holds[channel] = np.logical_or.reduce(masks)
    return best_holds, any_holds, has_reliable


def demo(out: Path, top_k: int) -> list[str]:
    from crp_invert import ConceptLabels
    from crp_invert.storage.label_files import load_labels

    concepts = ConceptLabels.load(out / "concepts.npz")
    labels = load_labels([out / "labels" / "index.json"])
    return [f"demo ({out}), activation labels, top_k = {top_k}:", "", HEADER,
            *holds_table(out / "activations.h5", labels, concepts, top_k)]


def fashion(top_k: int) -> list[str]:
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from fashion_mnist import CLASSES, HIERARCHY, LAYERS, ImageDataset, data_dir, load
    from zennit.composites import EpsilonPlus
    from zennit.torchvision import SequentialMergeBatchNorm

    from crp_invert import ConceptLabeler, ConceptLabels, InvertFeatureVisualization

    folder = data_dir()
    if folder is None:
        return ["FashionMNIST: the shared folder is missing; skipped"]
    model, images, targets = load(folder)
    concepts = ConceptLabels.from_targets(targets, CLASSES, hierarchy=HIERARCHY)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "acts.h5"
        tick = time.perf_counter()
        fv = InvertFeatureVisualization(CondAttribution(model), ImageDataset(images, targets),
                                        {name: ChannelConcept() for name in LAYERS}, path=str(Path(tmp) / "crp"),
                                        activation_cache=str(cache), progress=False)
        fv.run(EpsilonPlus(canonizers=[SequentialMergeBatchNorm()]), 0, len(images), batch_size=250,
               checkpoint=10**9)
        recorded = time.perf_counter() - tick
        labels = ConceptLabeler(concepts).label_cache(str(cache), progress=False)
        rows = holds_table(cache, labels, concepts, top_k)
    return [f"FashionMNIST (N = {len(images)}, recorded in {recorded:.0f} s), activation labels, top_k = {top_k}:",
            "", HEADER, *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-out", type=Path, default=None, help="the --out folder of `crp-invert demo`")
    parser.add_argument("--fashion", action="store_true", help="record and label the shared FashionMNIST model")
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args()
    lines = []
    if args.demo_out is not None:
        lines += demo(args.demo_out, args.top_k) + [""]
    if args.fashion:
        lines += fashion(args.top_k)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
