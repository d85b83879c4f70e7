"""Benchmark of the embedded demo (issue 5): data generation, the committed model, planted truth.

    python benchmarks/bench_demo.py [--samples 4000] [--train] [--threads 2] [--skip-demo] [--demo-samples N]

Prints a markdown table: time to generate N demo images (and that the same seed gives the same
bytes), the committed model's accuracy on fresh data, the time to label its output neurons (L = 2,
B = 3), the planted-truth score (share of output neurons labeled exactly ``shape AND color``), the
table-1 style accuracy of explanations, the median AUC of the best explanations, and how much the
model leans on the planted artifact (the yellow-ring logit with and without the mark). With
``--train`` it also times a full training run (``crp_invert.demo.train`` defaults) and checks that
the result equals the committed weights. Unless ``--skip-demo``, it also times the main job
``run_demo`` (what ``crp-invert demo`` runs) with its default settings in a temporary folder, per
step (goal: under a minute on 2 CPU cores), the size of its report, the planted truth of the relevance
labels and the Clever-Hans audit (rank of the artifact channel, false flags).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crp_invert import ConceptLabeler
from crp_invert.demo import data, truth
from crp_invert.demo.model import DEMO_EVAL_SEED, DEMO_EVAL_SIZE, DEMO_MODEL_PATH, load_demo_model
from crp_invert.demo.train import evaluate, train_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--skip-demo", action="store_true", help="do not time run_demo")
    parser.add_argument("--demo-samples", type=int, default=None, help="run_demo n_samples")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []

    start = time.perf_counter()
    sample = data.generate_shapes(args.samples, seed=args.seed)
    rows.append((f"generate {args.samples} images (32x32 RGB)", f"{time.perf_counter() - start:.2f} s"))
    same = data.generate_shapes(args.samples, seed=args.seed).images.tobytes() == sample.images.tobytes()
    rows.append(("same seed, same bytes", str(same)))

    model = load_demo_model()
    rows.append(("weights file", f"{DEMO_MODEL_PATH.stat().st_size / 1024:.0f} KiB"))
    start = time.perf_counter()
    accuracy = evaluate(model, n=DEMO_EVAL_SIZE, seed=DEMO_EVAL_SEED)
    rows.append((f"accuracy, ShapesDataset({DEMO_EVAL_SIZE}, seed={DEMO_EVAL_SEED})",
                 f"{accuracy:.4f} ({time.perf_counter() - start:.2f} s incl. generation)"))

    dataset = data.ShapesDataset(args.samples, seed=args.seed)
    images, targets = dataset.tensors()
    with torch.no_grad():
        logits = model(images)
    rows.append((f"accuracy, ShapesDataset({args.samples}, seed={args.seed})",
                 f"{float((logits.argmax(1) == targets).double().mean()):.4f}"))
    concepts = dataset.concepts
    start = time.perf_counter()
    layer = ConceptLabeler(concepts).label(logits, L=2, B=3, progress=False, layer="linear2")
    elapsed = time.perf_counter() - start
    rows.append((f"label 16 logits, L=2, B=3, K={concepts.n_concepts}", f"{elapsed:.2f} s"))
    formulas = data.class_formulas()
    score = truth.planted_truth_score(layer, formulas)
    rows.append(("planted-truth score (best == shape AND color)", f"{score:.4f}"))
    rows.append(("accuracy of explanations (IoU match to class)",
                 f"{truth.explanation_accuracy(layer, concepts, targets):.4f}"))
    median_auc = np.median([layer.best(f).auc for f in range(len(layer))])
    rows.append(("median AUC of best explanations", f"{median_auc:.4f}"))
    layer3 = ConceptLabeler(concepts).label(logits, L=3, B=3, progress=False, layer="linear2")
    rows.append(("planted-truth score with L=3", f"{truth.planted_truth_score(layer3, formulas):.4f}"))
    clean = data.ShapesDataset(args.samples, seed=7, artifact_rates=None)
    marked = data.ShapesDataset(args.samples, seed=7, artifact_rates=(1, 1))
    target = data.CLASS_NAMES.index(data.ARTIFACT_CLASS)
    with torch.no_grad():
        gain = model(marked.tensors()[0]) - model(clean.tensors()[0])
    rings = clean.targets == target
    rows.append((f"'{data.ARTIFACT_CLASS}' logit gain from the mark: yellow rings / other images",
                 f"{float(gain[rings, target].mean()):.2f} / {float(gain[~rings, target].mean()):.2f}"))

    if args.train:
        start = time.perf_counter()
        trained = train_demo_model(threads=args.threads)
        elapsed = time.perf_counter() - start
        committed = torch.load(DEMO_MODEL_PATH, map_location="cpu", weights_only=True)
        equal = all(torch.equal(v, committed[k]) for k, v in trained.state_dict().items())
        rows.append((f"train (defaults, {args.threads} threads)", f"{elapsed:.1f} s"))
        rows.append(("retrained == committed weights", str(equal)))

    if not args.skip_demo:
        from crp_invert.demo.pipeline import DEFAULT_SAMPLES, run_demo

        n_demo = DEFAULT_SAMPLES if args.demo_samples is None else args.demo_samples
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            summary = run_demo(folder, n_samples=n_demo, progress=False)
            total = time.perf_counter() - start
            report_mb = Path(summary.files["report"]).stat().st_size / 2 ** 20
        for step, seconds in summary.timings.items():
            rows.append((f"run_demo ({n_demo} images): {step}", f"{seconds:.1f} s"))
        rows.append((f"run_demo ({n_demo} images) total, incl. imports of CRP", f"{total:.1f} s"))
        rows.append(("run_demo report.html size", f"{report_mb:.1f} MiB"))
        rows.append(("run_demo planted-truth score (L=2) / L=3",
                     f"{summary.planted_truth_score:.3f} / {summary.planted_truth_score_l3:.3f}"))
        rows.append(("run_demo planted truth L=3 from relevances (source='relevance')",
                     f"{summary.planted_truth_score_l3_relevance:.3f}"))
        rows.append((f"run_demo audit of {summary.audit_layer}: rank of the artifact channel of "
                     f"'{summary.artifact_class}' / false flags (share >= {summary.audit_min_share:g})",
                     f"{summary.artifact_rank} ({summary.artifact_channel}) / {summary.false_flags}"))

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
