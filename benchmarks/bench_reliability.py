"""How many channels get a reliable label (issue 17: "a label is a claim"), per layer of the demo model and of the
shared FashionMNIST model, with the default search (L = 3, B = 3, min_support = 10) and, for comparison, the
paper's unconstrained search (min_support = 0) judged by the same rule.

    python benchmarks/bench_reliability.py                      # demo (2,000 images) and FashionMNIST (5,000)
    python benchmarks/bench_reliability.py --demo-samples 400   # a quicker demo run

Also checks the two facts the rule must not break: the FashionMNIST output neurons get their class (10/10) and
the demo's planted truth (``shape AND color`` for every output neuron) from relevances at L = 3. Prints markdown
tables for BENCHMARKS.md. The demo is recorded as ``crp-invert demo`` records it (CRP's FeatureVisualization with
``EpsilonPlusFlat`` and ``SequentialMergeBatchNorm``, the shapes images then the artifact set, seed 2).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def record_demo(folder: Path, n_samples: int, seed: int = 2):
    """``(cache path, concepts, dataset)`` of the demo, recorded as :func:`crp_invert.demo.pipeline.run_demo` does."""
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    from crp_invert.demo.data import N_ARTIFACT_IMAGES, AuditDataset
    from crp_invert.demo.model import load_demo_model
    from crp_invert.integration.recording import InvertFeatureVisualization

    dataset = AuditDataset(n_samples, seed=seed, n_artifact=N_ARTIFACT_IMAGES)
    model = load_demo_model("cpu")
    cache = folder / "activations.h5"
    fv = InvertFeatureVisualization(CondAttribution(model, device="cpu"), dataset,
                                    {name: ChannelConcept() for name in model.layer_names}, path=str(folder / "crp"),
                                    device="cpu", activation_cache=str(cache), overwrite=True, progress=False)
    fv.collect_results(fv.run_distributed(EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]), 0,
                                          len(dataset), batch_size=100, checkpoint=10**9))
    return cache, dataset.concepts, dataset


HEADER = ("| channels | reliable label (default search) | reliable label (paper's search, min_support=0) | "
          "top of the paper's beam reliable (what views showed before) |\n| --- | --- | --- | --- | --- |")


def share_row(name: str, default, paper) -> str:
    """One markdown row: channels, reliable with the default search, reliable with the paper's search, and how
    many tops of the paper's beams are reliable."""
    n = default.n_features
    tops = sum(paper.best_any(f) is not None and paper.best_any(f).reliable for f in range(n))
    return (f"| {name} | {n} | {default.n_reliable()} ({default.n_reliable() / n:.0%}) | "
            f"{paper.n_reliable()} ({paper.n_reliable() / n:.0%}) | {tops} ({tops / n:.0%}) |")


def shown_formulas(layer_labels) -> list:
    """The formula every view shows (best reliable, None for "no reliable label")."""
    return [None if layer_labels.best(f) is None else layer_labels.best(f).formula for f in range(len(layer_labels))]


def demo(n_samples: int) -> list[str]:
    from crp_invert import ConceptLabeler

    lines = []
    with tempfile.TemporaryDirectory() as folder:
        tick = time.perf_counter()
        cache, concepts, dataset = record_demo(Path(folder), n_samples)
        lines.append(f"demo: {n_samples} shapes images + the artifact set recorded in "
                     f"{time.perf_counter() - tick:.0f} s")
        labeler = ConceptLabeler(concepts)
        for source in ("activation", "relevance"):
            default = labeler.label_cache(str(cache), source=source, progress=False)
            paper = labeler.label_cache(str(cache), source=source, min_support=0, progress=False)
            lines += ["", f"| demo layer ({source}) " + HEADER]
            lines += [share_row(name, default[name], paper[name]) for name in default]
            output = list(default)[-1]
            truth = dataset.class_formulas
            names = dataset.class_names
            for label, result in (("default", default), ("paper", paper)):
                shown = shown_formulas(result[output])
                hits = sum(formula == truth[names[c]] if isinstance(truth, dict) else formula == truth[c]
                           for c, formula in enumerate(shown))
                lines.append(f"\nplanted truth from {source}s at L = 3 ({label} search, shown labels): "
                             f"{hits}/{len(shown)}")
    return lines


def fashion() -> list[str]:
    from fashion_mnist import CLASSES, HIERARCHY, LAYERS, data_dir, load, pooled_activations

    from crp_invert import ConceptLabeler, ConceptLabels, Formula

    folder = data_dir()
    if folder is None:
        return ["FashionMNIST: the shared folder is missing; skipped"]
    model, images, targets = load(folder)
    acts = pooled_activations(model, images)
    concepts = ConceptLabels.from_targets(targets, CLASSES, hierarchy=HIERARCHY)
    labeler = ConceptLabeler(concepts)
    lines = ["| FashionMNIST layer (activation) " + HEADER]
    results = {}
    for name in LAYERS:
        results[name] = labeler.label(acts[name], layer=name, progress=False)
        paper = labeler.label(acts[name], layer=name, min_support=0, progress=False)
        lines.append(share_row(name, results[name], paper))
    shown = shown_formulas(results["linear2"])
    own = sum(formula == Formula.concept(CLASSES[c]) for c, formula in enumerate(shown))
    lines.append(f"\nFashionMNIST linear2 output neurons whose shown label is their class: {own}/10")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-samples", type=int, default=2000)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-fashion", action="store_true")
    args = parser.parse_args()
    import torch

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"python {platform.python_version()}, torch {torch.__version__}; {when}")
    if not args.skip_fashion:
        print("\n".join(fashion()), flush=True)
    if not args.skip_demo:
        print("\n".join(demo(args.demo_samples)), flush=True)


if __name__ == "__main__":
    main()
