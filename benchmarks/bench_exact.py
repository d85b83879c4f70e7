"""Before/after check of the search's results: label fixed layers, save the labels, compare two runs.

    python benchmarks/bench_exact.py --save /tmp/labels-before      # with the old code
    python benchmarks/bench_exact.py --save /tmp/labels-after       # with the new code
    python benchmarks/bench_exact.py --compare /tmp/labels-before /tmp/labels-after

Every case runs the paper's unconstrained search (``min_support=0`` where the code has the support floor),
so that a version with the floor is compared against one without it. ``--only fashion`` (a prefix, repeatable)
runs a subset of the cases.

Cases: the shared FashionMNIST model (``../shared/data/fashion-mnist-crp``, all four layers, classes plus
parent groups; skipped where the folder is missing) with several search settings, and synthetic
ImageNet-like layers (``benchmarks/synthetic.py``) at N = 50,000, 200,000 and 1,280,000. The comparison prints one
markdown row per case: formulas equal, AUCs bit for bit, largest relative difference of the p-values.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SETTINGS = {
    "default": dict(L=3, B=3),
    "negative": dict(L=2, B=4, mode="negative"),
    "wide": dict(L=4, B=5, max_fraction=1.0, min_fraction=0.01),
    "limited": dict(L=3, B=3, limit_search=6),
    "validation": dict(L=3, B=3, validation=0.25, memorize_states=True),
}


def _wanted(name: str, only: list[str] | None) -> bool:
    """Whether a case (or a group of cases named by a prefix) is among ``only`` (all when None)."""
    return not only or any(name.startswith(prefix) or prefix.startswith(name) for prefix in only)


def cases(only: list[str] | None = None):
    """``(name, activations [N, F], ConceptLabels, label kwargs)`` of every case (of those in ``only``)."""
    import synthetic
    from fashion_mnist import CLASSES, HIERARCHY, LAYERS, data_dir, load, pooled_activations

    from crp_invert import ConceptLabels

    folder = data_dir()
    if folder is not None and _wanted("fashion-", only):
        model, images, targets = load(folder)
        acts = pooled_activations(model, images)
        concepts = ConceptLabels.from_targets(targets, CLASSES, hierarchy=HIERARCHY)
        for layer in LAYERS:
            for setting, kwargs in SETTINGS.items():
                yield f"fashion-{layer}-{setting}", acts[layer].numpy(), concepts, kwargs
    for n, f in ((50_000, 48), (200_000, 16), (1_280_000, 6)):
        if not _wanted(f"synthetic-{n}-", only):
            continue
        concepts, _ = synthetic.concept_labels(n)
        acts = synthetic.activations(concepts, f)
        yield f"synthetic-{n}-default", acts, concepts, SETTINGS["default"]
        yield f"synthetic-{n}-validation", acts[:, :8], concepts, SETTINGS["validation"]
        yield f"synthetic-{n}-float64-wide", acts[:, :4].astype(np.float64), concepts, SETTINGS["wide"]


def paper_search(kwargs: dict) -> dict:
    """``kwargs`` with the support floor off, where this version of crp_invert has one."""
    from dataclasses import fields

    from crp_invert import SearchParams

    has_floor = any(field.name == "min_support" for field in fields(SearchParams))
    return dict(kwargs, min_support=0) if has_floor else dict(kwargs)


def save(folder: Path, only: list[str] | None = None) -> None:
    from crp_invert import ConceptLabeler

    folder.mkdir(parents=True, exist_ok=True)
    for name, acts, concepts, kwargs in cases(only):
        if not _wanted(name, only) or (only and not any(name.startswith(prefix) for prefix in only)):
            continue
        tick = time.perf_counter()
        result = ConceptLabeler(concepts).label(acts, progress=False, **paper_search(kwargs))
        result.to_json(folder / f"{name}.json")
        print(f"{name}: {time.perf_counter() - tick:.2f} s", flush=True)


def _explanations(path: Path) -> list:
    data = json.loads(path.read_text())
    beams = [data["features"]] + ([] if not data.get("states") else data["states"])
    return [e for group in beams for beam in group for e in beam]


def compare(before: Path, after: Path) -> None:
    print("| case | explanations | formulas equal | AUCs bit-equal | max rel. diff p-value | other fields equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    all_same = True
    for path in sorted(before.glob("*.json")):
        old, new = _explanations(path), _explanations(after / path.name)
        formulas = len(old) == len(new) and all(a["formula"] == b["formula"] for a, b in zip(old, new))
        aucs = formulas and all(a["auc"] == b["auc"] for a, b in zip(old, new))
        p_diff = max((abs(a["p_value"] - b["p_value"]) / max(abs(a["p_value"]), 1e-300)
                      for a, b in zip(old, new)), default=0.0) if formulas else float("nan")
        keys = [k for k in old[0] if "p_value" not in k and k not in ("formula", "auc")] if old else []
        other = formulas and all(a[k] == b[k] for a, b in zip(old, new) for k in keys)
        all_same &= bool(formulas and aucs and other)
        print(f"| {path.stem} | {len(old)} | {formulas} | {aucs} | {p_diff:.1e} | {other} |")
    print(f"\nall formulas, AUCs and other fields identical: {all_same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--compare", type=Path, nargs=2)
    parser.add_argument("--only", action="append", help="run the cases whose name starts with this (repeatable)")
    args = parser.parse_args()
    if args.save:
        save(args.save, args.only)
    if args.compare:
        compare(*args.compare)
    if not args.save and not args.compare:
        parser.error("give --save DIR or --compare BEFORE AFTER")


if __name__ == "__main__":
    main()
