"""ImageNet-scale synthetic labels and activations for the benchmarks (deterministic, numpy only).

1,000 mutually exclusive classes plus 481 parent concepts from a random nested hierarchy (as
WordNet hypernyms of the ImageNet classes), about 8 positive concepts per sample; features respond
to a random class or parent with ReLU zeros (heavy ties), as conv channels do.
"""
from __future__ import annotations

import numpy as np

N_CLASSES = 1000
N_PARENTS = 481


def hierarchy(rng: np.random.Generator, n_classes: int = N_CLASSES, n_parents: int = N_PARENTS) -> dict:
    """A random nested hierarchy: parent name -> child names (classes or other parents)."""
    parents: dict = {}

    def split(members: list, depth: int) -> str:
        if len(members) == 1:
            return members[0]
        n_parts = int(rng.integers(2, 4))
        cuts = np.sort(rng.choice(np.arange(1, len(members)), size=min(n_parts, len(members)) - 1, replace=False))
        children = [split(part, depth + 1) for part in np.split(np.array(members, dtype=object), cuts)]
        name = f"parent{len(parents)}"
        parents[name] = [str(c) for c in children]
        return name

    classes = [f"class{i}" for i in range(n_classes)]
    order = list(rng.permutation(classes))
    split(order, 0)
    # keep the n_parents largest groups (created last); children that were dropped are replaced by their leaves
    names = list(parents)[-n_parents:]
    kept = set(names)

    def leaves(name: str) -> list:
        if name not in parents:
            return [name]
        return [leaf for child in parents[name] for leaf in leaves(child)]

    return {name: [c for c in parents[name] if c in kept or c not in parents] or leaves(name) for name in names}


def concept_labels(n_samples: int, seed: int = 0):
    """``(ConceptLabels, targets)`` with 1,481 concepts for ``n_samples`` samples."""
    from crp_invert import ConceptLabels

    rng = np.random.default_rng(seed)
    targets = rng.integers(0, N_CLASSES, size=n_samples)
    tree = hierarchy(rng)
    labels = ConceptLabels.from_targets(targets, [f"class{i}" for i in range(N_CLASSES)], hierarchy=tree)
    return labels, targets


def activations(concepts, n_features: int, seed: int = 1) -> np.ndarray:
    """``[N, F]`` float32 ReLU activations, each feature driven by one random concept plus noise."""
    rng = np.random.default_rng(seed)
    n_samples = concepts.n_samples
    dense_columns = concepts.sparse().tocsc()
    out = np.empty((n_samples, n_features), dtype=np.float32)
    for f in range(n_features):
        k = int(rng.integers(0, concepts.n_concepts))
        column = dense_columns[:, k].toarray().ravel()
        signal = 1.5 * column + rng.normal(0.0, 1.0, size=n_samples)
        out[:, f] = np.maximum(signal - 0.5, 0.0).round(2)
    return out


def activation_blocks(concepts, n_features: int, rows: int = 16384, seed: int = 1):
    """``(start, stop, [stop - start, F] float32)`` row blocks of a large layer of ReLU activations, each
    feature driven by one random concept plus noise (as :func:`activations`, generated block by block in
    float32 so that layers larger than memory can be written)."""
    rng = np.random.default_rng(seed)
    drivers = rng.integers(0, concepts.n_concepts, size=n_features)
    driven = concepts.sparse().tocsc()[:, drivers].tocsr()  # [N, F] labels of each feature's concept
    for start in range(0, concepts.n_samples, rows):
        stop = min(start + rows, concepts.n_samples)
        block = rng.standard_normal((stop - start, n_features), dtype=np.float32)
        block += 1.5 * driven[start:stop].toarray().astype(np.float32) - 0.5
        yield start, stop, np.maximum(block, 0.0).round(2)
