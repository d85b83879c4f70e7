"""A catalogue of hostile inputs (issue 11): every row is one bad file or argument, the exception type it must
raise and a fragment of the message. CLI rows must end with exit code 1, one line, no traceback, and before any
labeling starts. Then the inputs that must give correct output instead of an error (names with mathtext or
control characters, deep nesting, int64 near 2**60, underflowing p-values)."""

from __future__ import annotations

import fcntl
import html
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import scipy.sparse
import scipy.stats
import torch
from click.testing import CliRunner
from helpers import write_cache

from crp_invert import (
    ActivationCache,
    ConceptLabeler,
    ConceptLabels,
    Formula,
    FuzzyCircuit,
    LayerLabels,
    label_cache,
)
from crp_invert.cli import main
from crp_invert.core.formula import MAX_DEPTH, FormulaParseError
from crp_invert.core.labels import Explanation
from crp_invert.report import load_labels, write_report
from crp_invert.storage.lock import FileInUseError, lock_path

N = 24
NAMES = ["red", "round", "big"]
LAYERS = {"a": 3, "b": 4}


# -- builders ------------------------------------------------------------------------------------------------


def concepts(n=N, names=NAMES, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.random((n, len(names))) < 0.4
    labels[0] = True  # no empty column
    labels[1] = False
    return ConceptLabels(labels, names)


def write_random_cache(path, layers=LAYERS, n=N, nan_layer=None, seed=0):
    """A complete cache of normal activations (relevances: half of them), one NaN in ``nan_layer``; returns the
    activations written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, channels in layers.items():
        acts = rng.normal(size=(n, channels)).astype(np.float32)
        if name == nan_layer:
            acts[5, channels - 1] = np.nan
        arrays[name] = acts
    write_cache(path, {name: (acts, acts * 0.5) for name, acts in arrays.items()})
    return arrays


def npz(tmp, name="c.npz", **arrays) -> Path:
    path = tmp / name
    np.savez(path, **arrays)
    return path


def csr(tmp, indices=(0, 2, 1, 0, 1), indptr=(0, 2, 3, 5, 5), shape=(4, 3), names=NAMES, **extra) -> Path:
    arrays = dict(indices=np.asarray(indices), indptr=np.asarray(indptr), shape=np.asarray(shape),
                  names=np.asarray(names))
    arrays.update(extra)
    return npz(tmp, **arrays)


def zip_members(tmp, members: dict, name="c.npz") -> Path:
    path = tmp / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def forged_header(shape=(10**7,)) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<i8", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 16


def load(path) -> Callable[[], Any]:
    return lambda: ConceptLabels.load(path)


def put(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` and return the path."""
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def labels_doc(**change) -> dict:
    """A valid LayerLabels document of two features, with top-level keys changed (None removes a key)."""
    explanation = Explanation(Formula.parse("red AND NOT big"), 0.8, 0.3, 2, 0.01, 4, 0.04, 0.04)
    data = LayerLabels([[explanation], []], NAMES, "a", {"L": 2}).to_dict()
    for key, value in change.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def with_explanation(**change) -> dict:
    data = labels_doc()
    explanation = dict(data["features"][0][0])
    for key, value in change.items():
        if value is None:
            explanation.pop(key, None)
        else:
            explanation[key] = value
    data["features"][0][0] = explanation
    return data


def json_file(tmp, data, name="labels.json") -> Path:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def from_json(tmp, data) -> Callable[[], Any]:
    path = json_file(tmp, data)
    return lambda: LayerLabels.from_json(path)


def nested(depth: int, leaf: Any, key: str = "not") -> Any:
    for _ in range(depth):
        leaf = {key: leaf} if key == "not" else {key: [leaf, {"concept": "red"}]}
    return leaf


def deep_text(levels: int) -> str:
    return "".join(f"(x{i} AND (y{i} OR " for i in range(levels)) + "z" + "))" * levels


def cache_edit(tmp, edit: Callable[[h5py.File], None]) -> Path:
    path = tmp / "cache.h5"
    write_random_cache(path)
    with h5py.File(path, "r+") as file:
        edit(file)
    return path


def replace_dataset(file, key, name, data):
    group = file["layers"][key]
    del group[name]
    group.create_dataset(name, data=data)


def open_cache(path) -> Callable[[], Any]:
    def run():
        with ActivationCache(path) as cache:
            for layer in cache.layers:
                cache.activations(layer)
                cache.complete(layer)
    return run


def reference_pair(tmp, tensor: Any = None, description: Any = None, raw_tensor: bytes | None = None,
                   raw_description: str | None = None) -> Callable[[], Any]:
    pt, js = tmp / "onehot.pt", tmp / "description.json"
    if raw_tensor is not None:
        pt.write_bytes(raw_tensor)
    else:
        torch.save(torch.eye(4)[:, :3] if tensor is None else tensor, pt)
    if raw_description is not None:
        js.write_text(raw_description)
    else:
        js.write_text(json.dumps([{"name": n} for n in NAMES] if description is None else description))
    return lambda: ConceptLabels.from_reference(pt, js)


def report_with(tmp, labels_of: Callable[[], dict], use_concepts=True) -> Callable[[], Any]:
    path = tmp / "cache.h5"
    write_random_cache(path)

    def run():
        return write_report(tmp / "r.html", labels_of(), cache=path, concepts=concepts() if use_concepts else None,
                            max_channels=0, progress=False)
    return run


def fake_labels(n_features: int, names=NAMES, n_samples=N, layer="a") -> dict:
    explanation = Explanation(Formula.concept(names[0]), 0.7, 0.4, 1, 0.01, 3, 0.03, 0.03,
                              support=round(0.4 * n_samples), n_samples=n_samples)
    return {layer: LayerLabels([[explanation]] * n_features, names, layer, {"n_samples": n_samples})}


def label_nan_cache(tmp) -> Callable[[], Any]:
    path = tmp / "cache.h5"
    write_random_cache(path, nan_layer="b")
    return lambda: label_cache(ConceptLabeler(concepts()), path, L=1, B=1, progress=False)


# -- the catalogue -------------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    build: Callable[[Path], Callable[[], Any]]
    error: type
    fragment: str


DAMAGED = r"damaged"

ROWS = [
    # 1. concepts .npz: CSR arrays
    Row("csr-negative-index", lambda t: load(csr(t, indices=(0, -1, 1, 0, 1))), ValueError, "index -1 is out of range"),
    Row("csr-index-equal-K", lambda t: load(csr(t, indices=(0, 3, 1, 0, 1))), ValueError, "index 3 is out of range"),
    Row("csr-index-huge", lambda t: load(csr(t, indices=(0, 2**40, 1, 0, 1))), ValueError, "out of range"),
    Row("csr-index-uint64-top", lambda t: load(csr(t, indices=np.array([0, 2**64 - 1, 1, 0, 1], dtype=np.uint64))),
        ValueError, "out of range"),
    Row("csr-indptr-not-monotone", lambda t: load(csr(t, indptr=(0, 3, 2, 5, 5))), ValueError, "decreases at row 1"),
    Row("csr-indptr-short", lambda t: load(csr(t, indptr=(0, 2, 3, 5))), ValueError, "expected n_rows \\+ 1 = 5"),
    Row("csr-indptr-long", lambda t: load(csr(t, indptr=(0, 2, 3, 5, 5, 5))), ValueError, "expected n_rows"),
    Row("csr-indptr-end-short", lambda t: load(csr(t, indptr=(0, 2, 3, 4, 4))), ValueError, "ends at 4"),
    Row("csr-indptr-end-long", lambda t: load(csr(t, indptr=(0, 2, 3, 5, 9))), ValueError, "ends at 9"),
    Row("csr-indptr-not-from-zero", lambda t: load(csr(t, indptr=(1, 2, 3, 5, 5))), ValueError, "start at 0"),
    Row("csr-indptr-float", lambda t: load(csr(t, indptr=np.array([0, 2, 3, 5, 5], dtype=float))), TypeError,
        "'indptr' must hold integers"),
    Row("csr-indices-float", lambda t: load(csr(t, indices=np.array([0, 2, 1, 0, 1.5]))), TypeError,
        "'indices' must hold integers"),
    Row("csr-indices-2d", lambda t: load(csr(t, indices=np.zeros((5, 1), dtype=int))), ValueError, "must be 1-d"),
    Row("csr-indptr-bool", lambda t: load(csr(t, indptr=np.array([0, 1, 1, 1, 1], dtype=bool))), TypeError,
        "integers"),
    Row("csr-shape-3", lambda t: load(csr(t, shape=(4, 3, 1))), ValueError, "2-d"),
    Row("csr-shape-negative", lambda t: load(csr(t, shape=(-4, 3))), ValueError, "out of range"),
    Row("csr-shape-float", lambda t: load(csr(t, shape=np.array([4.0, 3.0]))), ValueError, "two integers"),
    Row("csr-shape-2d", lambda t: load(csr(t, shape=np.array([[4, 3]]))), ValueError, "two integers"),
    Row("csr-data-two", lambda t: load(csr(t, data=np.array([1, 2, 1, 1, 1]))), ValueError, "0/1"),
    Row("csr-data-length", lambda t: load(csr(t, data=np.ones(4))), ValueError, "'data' has shape"),
    Row("csr-data-string", lambda t: load(csr(t, data=np.array(list("abcde")))), TypeError, "dtype"),
    Row("csr-names-count", lambda t: load(csr(t, names=NAMES[:2])), ValueError, "2 names for 3"),
    # 1. concepts .npz: names and dense labels
    Row("names-2d", lambda t: load(npz(t, labels=np.eye(3, dtype=bool), names=np.array([NAMES]))), ValueError,
        "1-d array of strings"),
    Row("names-numbers", lambda t: load(npz(t, labels=np.eye(3, dtype=bool), names=np.arange(3))), TypeError,
        "must hold strings"),
    Row("names-object-pickle", lambda t: load(npz(t, labels=np.eye(2, dtype=bool), names=np.array(["a", 1], object))),
        ValueError, "Python objects"),
    Row("labels-object-pickle",
        lambda t: load(npz(t, labels=np.array([[True, None]], dtype=object), names=np.array(["a", "b"]))),
        ValueError, "Python objects"),
    Row("labels-3d", lambda t: load(npz(t, labels=np.zeros((2, 3, 1)), names=np.array(NAMES))), ValueError, "2-d"),
    Row("labels-value-two", lambda t: load(npz(t, labels=np.array([[0, 2, 1]]), names=np.array(NAMES))), ValueError,
        "0/1"),
    Row("labels-nan", lambda t: load(npz(t, labels=np.array([[0, np.nan, 1]]), names=np.array(NAMES))), ValueError,
        "0/1"),
    Row("labels-complex", lambda t: load(npz(t, labels=np.ones((2, 3), complex), names=np.array(NAMES))), TypeError,
        "dtype complex"),
    Row("labels-structured",
        lambda t: load(npz(t, labels=np.zeros((2, 3), dtype=[("x", "i4")]), names=np.array(NAMES))), TypeError,
        "dtype"),
    Row("labels-wider-than-names", lambda t: load(npz(t, labels=np.eye(4, dtype=bool), names=np.array(NAMES))),
        ValueError, "3 names for 4 label columns"),
    Row("names-duplicate", lambda t: load(npz(t, labels=np.eye(3, dtype=bool), names=np.array(["a", "a", "b"]))),
        ValueError, "unique"),
    Row("names-empty", lambda t: load(npz(t, labels=np.eye(3, dtype=bool), names=np.array(["a", "", "b"]))),
        ValueError, "empty"),
    Row("names-nul", lambda t: load(npz(t, labels=np.eye(3, dtype=bool), names=np.array(["a", "b\0c", "d"]))),
        ValueError, "NUL"),
    Row("names-surrogate", lambda t: load(npz(t, labels=np.eye(3, dtype=bool), names=np.array(["a", "\ud800", "d"]))),
        ValueError, "surrogate"),
    Row("no-names", lambda t: load(npz(t, labels=np.eye(3, dtype=bool))), KeyError, "no 'names'"),
    Row("no-labels", lambda t: load(npz(t, names=np.array(NAMES))), KeyError, "needs a dense 'labels'"),
    # 1. concepts .npz: the file itself
    Row("npz-empty-file", lambda t: load(put(t / "e.npz", b"")), ValueError, r"empty \(0 bytes\)"),
    Row("npz-text-file", lambda t: load(put(t / "x.npz", "hello")), ValueError, "not a zip archive"),
    Row("npz-is-pickle", lambda t: load(put(t / "p.npz", pickle.dumps({"names": ["a"], "labels": [[1]]}))),
        ValueError, "pickle"),
    Row("npz-is-npy", lambda t: load(put(t / "y.npz", npy_bytes(np.eye(3)))), ValueError, "single .npy"),
    Row("npz-truncated", lambda t: load(put(t / "cut.npz", csr(t).read_bytes()[:60])), ValueError,
        "not an .npz archive"),
    Row("npz-member-not-npy", lambda t: load(zip_members(t, {"names.npy": b"hello world", "labels.npy": b"x"})),
        ValueError, "not a plain .npy"),
    Row("npz-forged-header", lambda t: load(zip_members(t, {"names.npy": npy_bytes(np.array(NAMES)),
                                                            "labels.npy": forged_header()})),
        ValueError, "declares shape"),
    Row("npz-member-corrupt", lambda t: load(corrupt_member(t)), ValueError, "damaged"),
    Row("npz-missing", lambda t: load(t / "missing.npz"), FileNotFoundError, "missing.npz"),
    Row("npz-folder", lambda t: load(t), ValueError, "folder"),
    # 1. sparse input of the Python API (checked before scipy or torch sees it)
    Row("scipy-csr-out-of-range", lambda t: lambda: ConceptLabels(scipy.sparse.csr_matrix(
        (np.ones(2), np.array([0, 5]), np.array([0, 1, 2, 2, 2])), shape=(4, 3)), NAMES), ValueError, "out of range"),
    Row("scipy-csr-not-monotone", lambda t: lambda: ConceptLabels(scipy.sparse.csr_matrix(
        (np.ones(2), np.array([0, 1]), np.array([0, 2, 1, 2, 2])), shape=(4, 3)), NAMES), ValueError, "decreases"),
    Row("torch-coo-out-of-range", lambda t: lambda: ConceptLabels(torch.sparse_coo_tensor(
        torch.tensor([[0, 1], [0, 7]]), torch.ones(2), (4, 3), check_invariants=False), NAMES), ValueError,
        "out of range"),
    Row("torch-csr-bad-crow", lambda t: lambda: ConceptLabels(torch.sparse_csr_tensor(
        torch.tensor([0, 1, 5, 2, 2]), torch.tensor([0, 7]), torch.ones(2), (4, 3), check_invariants=False), NAMES),
        ValueError, "decreases"),
    Row("torch-csc-bad-ccol", lambda t: lambda: ConceptLabels(torch.sparse_csc_tensor(
        torch.tensor([0, 1, 2, 9]), torch.tensor([0, 7]), torch.ones(2), (4, 3), check_invariants=False), NAMES),
        ValueError, "ends at 9"),
    Row("torch-bsr", lambda t: lambda: ConceptLabels(torch.eye(4)[:, :3].to_sparse_bsr((1, 1)), NAMES), TypeError,
        "layout"),
    # 1. the reference format (.pt + JSON)
    Row("ref-pt-text", lambda t: reference_pair(t, raw_tensor=b"not a torch file"), ValueError, "torch.load"),
    Row("ref-pt-empty", lambda t: reference_pair(t, raw_tensor=b""), ValueError, "torch.load"),
    Row("ref-pt-pickle-object", lambda t: reference_pair(t, raw_tensor=pickle.dumps(Path("x"))), ValueError,
        "torch.load"),
    Row("ref-pt-dict", lambda t: reference_pair(t, tensor={"x": torch.eye(3)}), TypeError, "must hold a tensor"),
    Row("ref-pt-3d", lambda t: reference_pair(t, tensor=torch.zeros(4, 3, 1)), ValueError, "2-d"),
    Row("ref-pt-half", lambda t: reference_pair(t, tensor=torch.full((4, 3), 0.5)), ValueError, "0/1"),
    Row("ref-json-invalid", lambda t: reference_pair(t, raw_description="[{"), ValueError, "not valid JSON"),
    Row("ref-json-deep", lambda t: reference_pair(t, raw_description="[" * 100000 + "]" * 100000), ValueError,
        "nested too deeply"),
    Row("ref-json-number", lambda t: reference_pair(t, description=5), ValueError, "list or object"),
    Row("ref-json-count", lambda t: reference_pair(t, description=[{"name": "x"}]), ValueError, "1 names for 3"),
    Row("ref-json-empty", lambda t: reference_pair(t, raw_description=""), ValueError, "is empty"),
    Row("ref-json-nested-name", lambda t: reference_pair(t, description=[{"name": {"a": 1}}, "b", "c"]), ValueError,
        "plain name"),
    Row("ref-json-not-utf8", lambda t: ref_latin1(t), ValueError, "not UTF-8"),
    # 1. and 8. labels JSON
    Row("labels-no-features", lambda t: from_json(t, labels_doc(features=None)), ValueError, "no 'features'"),
    Row("labels-features-dict", lambda t: from_json(t, labels_doc(features={"0": []})), TypeError, "must be a list"),
    Row("labels-beam-number", lambda t: from_json(t, labels_doc(features=[3])), TypeError, "feature 0"),
    Row("labels-no-formula", lambda t: from_json(t, with_explanation(formula=None)), KeyError, "'formula'"),
    Row("labels-auc-string", lambda t: from_json(t, with_explanation(auc="high")), TypeError, "'auc' must be a number"),
    Row("labels-auc-bool", lambda t: from_json(t, with_explanation(auc=True)), TypeError, "'auc' must be a number"),
    Row("labels-length-zero", lambda t: from_json(t, with_explanation(length=0)), ValueError, "'length'"),
    Row("labels-unknown-concept", lambda t: from_json(t, with_explanation(formula={"concept": "zebra"})), ValueError,
        "not in 'concept_names'"),
    Row("labels-formula-deep-junction", lambda t: from_json(t, with_explanation(formula=nested(200, {"concept": "red"},
                                                                                                  "and"))),
        ValueError, "MAX_DEPTH"),
    Row("labels-formula-deep-json", lambda t: from_json(t, '{"format": "crp-invert.LayerLabels", "features": '
                                                           + "[" * 50000 + "]" * 50000 + "}"),
        ValueError, "nested too deeply"),
    Row("labels-formula-node", lambda t: from_json(t, with_explanation(formula={"xor": []})), ValueError,
        "unknown formula node"),
    Row("labels-no-names", lambda t: from_json(t, labels_doc(concept_names=None)), ValueError, "concept_names"),
    Row("labels-newer", lambda t: from_json(t, labels_doc(version=99)), ValueError, "newer"),
    Row("labels-version-string", lambda t: from_json(t, labels_doc(version="1")), ValueError, "'version'"),
    Row("labels-not-json", lambda t: from_json(t, "{features: [}"), ValueError, "not valid JSON"),
    Row("labels-no-tag", lambda t: from_json(t, {"features": []}), ValueError, "format tag"),
    Row("labels-states-short", lambda t: from_json(t, labels_doc(states=[[[]]])), ValueError, "'states' step 1"),
    Row("labels-layer-number", lambda t: from_json(t, labels_doc(layer=3)), TypeError, "'layer'"),
    Row("labels-empty-file", lambda t: from_json(t, ""), ValueError, "is empty"),
    Row("labels-missing-file", lambda t: lambda: LayerLabels.from_json(t / "nope.json"), FileNotFoundError, "nope"),
    Row("labels-same-layer-twice", lambda t: lambda: load_labels([json_file(t, labels_doc(), "x.json"),
                                                                  json_file(t, labels_doc(), "y.json")]),
        ValueError, "already gave"),
    Row("labels-index-missing-file", lambda t: lambda: load_labels([json_file(t, {"a": "gone.json"}, "index.json")]),
        FileNotFoundError, "gone.json"),
    # 6. formulas: text and JSON
    Row("parse-deep-junctions", lambda t: lambda: Formula.parse(deep_text(5000)), FormulaParseError, "MAX_DEPTH"),
    Row("parse-unbalanced-open", lambda t: lambda: Formula.parse("(" * 5000 + "a"), FormulaParseError, "missing"),
    Row("parse-unbalanced-close", lambda t: lambda: Formula.parse("a" + ")" * 5000), FormulaParseError,
        "unexpected"),
    Row("parse-empty", lambda t: lambda: Formula.parse("   "), FormulaParseError, "empty formula"),
    Row("parse-dangling-and", lambda t: lambda: Formula.parse("a AND"), FormulaParseError, "ends too early"),
    Row("parse-leading-or", lambda t: lambda: Formula.parse("OR a"), FormulaParseError, "unexpected 'OR'"),
    Row("parse-backslash", lambda t: lambda: Formula.parse("a\\b"), FormulaParseError, "unexpected character"),
    Row("parse-open-quote", lambda t: lambda: Formula.parse('"abc'), FormulaParseError, "unexpected character"),
    Row("parse-not-a-str", lambda t: lambda: Formula.parse(b"a"), TypeError, "str"),
    Row("json-not-object", lambda t: lambda: Formula.from_json([1, 2]), ValueError, "not a formula JSON"),
    Row("json-empty-and", lambda t: lambda: Formula.from_json({"and": []}), ValueError, "non-empty list"),
    Row("json-concept-number", lambda t: lambda: Formula.from_json({"concept": 3}), TypeError, "str"),
    Row("json-deep-junctions", lambda t: lambda: Formula.from_json(nested(500, {"concept": "a"}, "or")), ValueError,
        "MAX_DEPTH"),
    Row("formula-built-too-deep", lambda t: build_deep_formula, ValueError, "MAX_DEPTH"),
    # 1., 2., 5., 8. caches
    Row("cache-n-samples-string", lambda t: open_cache(cache_edit(t, lambda f: f.attrs.__setitem__("n_samples", "x"))),
        ValueError, DAMAGED),
    Row("cache-range-inconsistent",
        lambda t: open_cache(cache_edit(t, lambda f: f.attrs.__setitem__("sample_end", 10**6))), ValueError,
        "inconsistent"),
    Row("cache-n-samples-array",
        lambda t: open_cache(cache_edit(t, lambda f: f.attrs.__setitem__("n_samples", np.arange(3)))), ValueError,
        DAMAGED),
    Row("cache-index-not-json",
        lambda t: open_cache(cache_edit(t, lambda f: f.attrs.__setitem__("layer_index", "{not json"))), ValueError,
        "not JSON"),
    Row("cache-index-deep", lambda t: open_cache(cache_edit(
        t, lambda f: f.attrs.__setitem__("layer_index", "[" * 100000 + "]" * 100000))), ValueError, "not JSON"),
    Row("cache-index-missing-group",
        lambda t: open_cache(cache_edit(t, lambda f: f.attrs.__setitem__("layer_index", '{"a": "7"}'))), ValueError,
        "missing"),
    Row("cache-index-escapes",
        lambda t: open_cache(cache_edit(t, lambda f: f.attrs.__setitem__("layer_index", '{"a": "../layers"}'))),
        ValueError, "missing"),
    Row("cache-layer-wrong-shape",
        lambda t: open_cache(cache_edit(t, lambda f: replace_dataset(f, "0", "activations", np.zeros((N, 9), "f4")))),
        ValueError, "damaged: layer 'a'"),
    Row("cache-layer-string-dtype",
        lambda t: open_cache(cache_edit(t, lambda f: replace_dataset(f, "1", "activations", np.full((N, 4), b"x")))),
        ValueError, "damaged: layer 'b'"),
    Row("cache-complete-missing",
        lambda t: open_cache(cache_edit(t, lambda f: f["layers"]["0"].__delitem__("complete"))), ValueError,
        "no complete dataset"),
    Row("cache-layer-renamed",
        lambda t: open_cache(cache_edit(t, lambda f: f["layers"]["0"].attrs.__setitem__("name", "zzz"))), ValueError,
        "named 'zzz'"),
    Row("cache-newer-version",
        lambda t: open_cache(cache_edit(t, lambda f: f.attrs.__setitem__("format_version", 99))), ValueError,
        "version 99"),
    Row("cache-text-file", lambda t: open_cache(put(t / "x.h5", "hello")), ValueError, "not an HDF5 file"),
    Row("cache-empty-file", lambda t: open_cache(put(t / "e.h5", b"")), ValueError, "empty"),
    Row("cache-truncated", lambda t: open_cache(truncated_cache(t)), ValueError, "truncated"),
    Row("cache-nan-in-layer-b", label_nan_cache, ValueError, "layer 'b' has NaN"),
    Row("cache-layer-name-nul", lambda t: add_layer_named(t, "conv\0one"), ValueError, "NUL"),
    Row("cache-layer-name-surrogate", lambda t: add_layer_named(t, "conv\udcff"), ValueError, "surrogate"),
    Row("cache-layer-meta-nul", lambda t: add_layer_named(t, "conv", pooling="max\0"), ValueError, "NUL"),
    Row("cache-layer-meta-list", lambda t: add_layer_named(t, "conv", pooling=[1, 2]), TypeError, "str or a number"),
    Row("cache-in-use-reader", lambda t: while_locked(t, lambda path: ActivationCache(path)), FileInUseError,
        "in use by another process"),
    Row("cache-in-use-writer", lambda t: while_locked(t, lambda path: ActivationCache(path, mode="a")), FileInUseError,
        "in use by another process"),
    Row("cache-in-use-overwrite", lambda t: while_locked(t, lambda path: ActivationCache(path, "a", overwrite=True)),
        FileInUseError, "in use by another process"),
    Row("flat-string-dataset", lambda t: label_flat(t, np.full((N, 3), b"x")), TypeError, "real numbers"),
    Row("flat-nan", lambda t: label_flat(t, np.where(np.eye(N, 3) > 0, np.nan, 1.0).astype("f4")), ValueError,
        "'Y' has NaN in column 0"),
    Row("flat-3d-dataset", lambda t: label_flat(t, np.zeros((N, 3, 1), "f4")), ValueError, "2-D"),
    # 4. labels that do not belong to the cache (report)
    Row("report-4-features-6-channels", lambda t: report_with(t, lambda: fake_labels(4, layer="a")), ValueError,
        "have 4 features but the cache's layer has 3 channels"),
    Row("report-layer-not-in-cache", lambda t: report_with(t, lambda: fake_labels(3, layer="zz")), KeyError,
        "no layer in the cache"),
    Row("report-other-samples", lambda t: report_with(t, lambda: fake_labels(3, n_samples=N + 1)), ValueError,
        "computed on 25 samples"),
    Row("report-unknown-concepts",
        lambda t: report_with(t, lambda: fake_labels(3, names=["zebra", *NAMES[1:]])), ValueError, "lack"),
    Row("fuzzy-negative-neuron", lambda t: lambda: FuzzyCircuit("a OR b", names={"a": 0, "b": -1}), ValueError,
        "column index >= 0"),
    # 6. names that no file can store faithfully
    Row("concept-name-nul", lambda t: lambda: ConceptLabels(np.eye(2, dtype=bool), ["a", "a\0"]), ValueError, "NUL"),
    Row("concept-name-blank", lambda t: lambda: ConceptLabels(np.eye(2, dtype=bool), ["a", " \n"]), ValueError,
        "blank"),
]


def corrupt_member(tmp) -> Path:
    path = tmp / "c.npz"
    np.savez_compressed(path, labels=np.random.default_rng(0).random((200, 3)) < 0.5, names=np.array(NAMES))
    raw = bytearray(path.read_bytes())
    for i in range(80, 200):  # inside the compressed data of the first member
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    return path


def truncated_cache(tmp) -> Path:
    write_random_cache(tmp / "full.h5")
    raw = (tmp / "full.h5").read_bytes()
    (tmp / "cut.h5").write_bytes(raw[: len(raw) // 2])
    return tmp / "cut.h5"


def build_deep_formula():
    formula = Formula.concept("a")
    for i in range(MAX_DEPTH + 1):
        formula = (formula | Formula.concept(f"b{i}")) if i % 2 else (formula & Formula.concept(f"c{i}"))
    return formula


def add_layer_named(tmp, name, **meta) -> Callable[[], Any]:
    def run():
        with ActivationCache(tmp / "new.h5", mode="a") as cache:
            cache.initialize((0, N))
            cache.add_layer(name, 2, **meta)
    return run


def while_locked(tmp, action: Callable[[Path], Any]) -> Callable[[], Any]:
    """``action(cache)`` while the cache's lock file is held as another process would hold it (another open
    file description); the cache must stay intact."""
    path = tmp / "cache.h5"
    write_random_cache(path)
    before = path.read_bytes()

    def run():
        handle = os.open(lock_path(path), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            action(path)
        finally:
            os.close(handle)
            assert path.read_bytes() == before
    return run


def label_flat(tmp, data) -> Callable[[], Any]:
    from crp_invert import label_h5

    path = tmp / "flat.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("Y", data=data)
    return lambda: label_h5(ConceptLabeler(concepts()), path, L=1, B=1, progress=False)


def ref_latin1(tmp) -> Callable[[], Any]:
    torch.save(torch.eye(4)[:, :3], tmp / "onehot.pt")
    put(tmp / "description.json", '["caf\u00e9", "b", "c"]'.encode("latin-1"))
    return lambda: ConceptLabels.from_reference(tmp / "onehot.pt", tmp / "description.json")


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_hostile_input(row, tmp_path):
    """Every hostile input of the catalogue raises its documented error type and message, no traceback text."""
    action = row.build(tmp_path)
    with pytest.raises(row.error, match=row.fragment) as caught:
        action()
    assert "Traceback" not in str(caught.value)


def test_catalogue_is_large_and_unique():
    """The catalogue of hostile inputs has unique ids and at least 80 rows."""
    ids = [row.id for row in ROWS] + [row[0] for row in CLI_ROWS]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 80


# -- the command line ----------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    write_random_cache(tmp_path / "cache.h5")
    concepts().save(tmp_path / "concepts.npz")
    return tmp_path


def cli_label(*extra):
    return lambda t: ["label", str(t / "cache.h5"), str(t / "concepts.npz"), "-L", "1", "-B", "1", "-q", *extra]


def cli_with(cache=None, concepts_file=None, extra=()):
    def build(t):
        cache_path = cache(t) if cache else t / "cache.h5"
        labels_path = concepts_file(t) if concepts_file else t / "concepts.npz"
        return ["label", str(cache_path), str(labels_path), "-L", "1", "-B", "1", "-q", *extra]
    return build


def existing(t, name, text="keep me"):
    (t / name).write_text(text)
    return t / name


def report_args(t, labels_path, *extra):
    return ["report", str(t / "cache.h5"), str(labels_path), "-q", "--out", str(t / "r.html"), *extra]


def write_labels_for(t, n_features, layer="a") -> Path:
    return json_file(t, fake_labels(n_features, layer=layer)[layer].to_dict(), "labels.json")


def out_folder_with(name: str) -> Callable[[Path], list]:
    """``label --out FOLDER`` (two layers) where FOLDER already holds ``name``."""
    def build(t):
        (t / "outdir").mkdir()
        put(t / "outdir" / name, "keep me")
        return cli_label("--out", str(t / "outdir"))(t)
    return build


def reference_cli(t) -> list:
    torch.save(torch.eye(N)[:, :3], t / "o.pt")
    return ["label", str(t / "cache.h5"), str(t / "o.pt"), str(put(t / "d.json", "[{")), "-q"]


def short_concepts(t) -> Path:
    concepts(n=N - 3).save(t / "s.npz")
    return t / "s.npz"


def nan_cache(t) -> Path:
    write_random_cache(t / "nan.h5", nan_layer="b")
    return t / "nan.h5"


def flat_with_nan(t) -> Path:
    values = np.ones((N, 3), dtype=np.float32)
    values[7, 2] = np.nan
    with h5py.File(t / "flat.h5", "w") as file:
        file.create_dataset("Y", data=values)
    return t / "flat.h5"


def bad_csr_cli(t) -> Path:
    return csr(t, indices=(0, 7, 1, 0, 1), indptr=(0, 2, 3, 5) + (5,) * (N - 3), shape=(N, 3))


CLI_ROWS = [
    ("cli-out-exists", lambda t: cli_label("--layer", "a", "--out", str(put(t / "out.json", "keep me")))(t),
     "exists; pass --overwrite"),
    ("cli-out-folder-layer-exists", out_folder_with("a.json"), "exists; pass --overwrite"),
    ("cli-out-folder-index-exists", out_folder_with("index.json"), "exists; pass --overwrite"),
    ("cli-out-under-a-file", lambda t: cli_label("--out", str(put(t / "plain", "x") / "x.json"))(t),
     "is a file, not a folder"),
    ("cli-out-folder-is-a-file", lambda t: cli_label("--out", str(put(t / "plain", "x")))(t), "is a file"),
    ("cli-out-read-only", cli_label("--out", "/proc/crp-invert-out.json"), "not writable"),
    ("cli-device-banana", cli_label("--device", "banana"), "not a device"),
    ("cli-device-cuda-99", cli_label("--device", "cuda:99"), "CUDA"),
    ("cli-device-meta", cli_label("--device", "meta"), "only cpu"),
    ("cli-concepts-empty", cli_with(concepts_file=lambda t: put(t / "e.npz", b"")), "empty (0 bytes)"),
    ("cli-concepts-not-zip", cli_with(concepts_file=lambda t: put(t / "x.npz", "hello")), "not a zip archive"),
    ("cli-concepts-pickle", cli_with(concepts_file=lambda t: put(t / "p.npz", pickle.dumps({"names": NAMES}))),
     "pickle"),
    ("cli-concepts-npy", cli_with(concepts_file=lambda t: put(t / "y.npz", npy_bytes(np.eye(N, 3)))), "single .npy"),
    ("cli-concepts-corrupt", cli_with(concepts_file=corrupt_member), "damaged"),
    ("cli-concepts-bad-csr", cli_with(concepts_file=bad_csr_cli), "out of range"),
    ("cli-concepts-short-indptr", cli_with(concepts_file=lambda t: csr(t, shape=(N, 3))), "expected n_rows"),
    ("cli-concepts-object-names",
     cli_with(concepts_file=lambda t: npz(t, labels=np.eye(N, 3, dtype=bool), names=np.array(["a", 1, 2], object))),
     "Python objects"),
    ("cli-concepts-not-npz", cli_with(concepts_file=lambda t: put(t / "c.txt", "x")), "is not an .npz"),
    ("cli-concepts-wrong-n", cli_with(concepts_file=short_concepts), f"N={N - 3}"),
    ("cli-cache-text", cli_with(cache=lambda t: put(t / "t.h5", "hello")), "not an HDF5 file"),
    ("cli-cache-empty", cli_with(cache=lambda t: put(t / "e.h5", b"")), "empty (0 bytes)"),
    ("cli-cache-truncated", cli_with(cache=truncated_cache), "truncated"),
    ("cli-cache-damaged-root",
     cli_with(cache=lambda t: cache_edit(t, lambda f: f.attrs.__setitem__("layer_index", "{oops"))), "damaged"),
    ("cli-cache-damaged-layer",
     cli_with(cache=lambda t: cache_edit(t, lambda f: replace_dataset(f, "1", "activations", np.zeros((3, 4))))),
     "damaged: layer 'b'"),
    ("cli-cache-nan-layer-b", cli_with(cache=nan_cache), "layer 'b' has NaN"),
    ("cli-cache-layer-unknown", cli_label("--layer", "conv9"), "conv9"),
    ("cli-flat-nan", cli_with(cache=flat_with_nan), "has NaN in column 2"),
    ("cli-reference-bad-json", reference_cli, "not valid JSON"),
    ("cli-report-no-features", lambda t: report_args(t, json_file(t, labels_doc(features=None))), "no 'features'"),
    ("cli-report-out-exists", lambda t: report_args(put(t / "r.html", "keep").parent, write_labels_for(t, 3)),
     "--overwrite"),
    ("cli-report-mismatched-channels", lambda t: report_args(t, write_labels_for(t, 4)), "have 4 features"),
    ("cli-report-deep-json", lambda t: report_args(t, json_file(t, "[" * 100000 + "]" * 100000)),
     "nested too deeply"),
]


@pytest.mark.parametrize("row", CLI_ROWS, ids=[row[0] for row in CLI_ROWS])
def test_cli_fails_cleanly_before_the_work(row, files, monkeypatch):
    """Each bad CLI input exits with code 1 and a one-line error before the labeling starts, leaving every file as it
    was."""
    import crp_invert.labeler

    def must_not_run(*args, **kwargs):
        raise AssertionError("the labeling started before the inputs were checked")

    monkeypatch.setattr(crp_invert.labeler, "label_array", must_not_run)
    _, build, fragment = row
    args = build(files)
    kept = {p: p.read_bytes() for p in files.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    for path, content in kept.items():  # nothing overwritten or deleted
        assert path.read_bytes() == content, path


def run_module(*args, cwd=None):
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "crp_invert", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def test_cli_errors_in_a_real_process(files):
    """In a real process, CLI input errors print one line to stderr and exit with code 1, no traceback."""
    (files / "empty.npz").write_bytes(b"")
    for args, fragment in [
        (["label", str(files / "cache.h5"), str(files / "empty.npz")], "empty (0 bytes)"),
        (["label", str(files / "cache.h5"), str(files / "concepts.npz"), "--device", "banana"], "not a device"),
    ]:
        proc = run_module(*args)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and fragment in proc.stderr, proc.stderr


def test_cli_overwrite_replaces_and_locked_cache_is_in_use(files):
    """--overwrite replaces an existing output, and a cache locked by another process is reported in use, not
    damaged."""
    out = existing(files, "out.json")
    args = cli_label("--layer", "a", "--out", str(out))(files)
    result = CliRunner().invoke(main, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert LayerLabels.from_json(out).layer == "a"
    # a cache another process writes (holds its lock) is "in use", not damaged
    handle = os.open(lock_path(files / "cache.h5"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = CliRunner().invoke(main, cli_label()(files))
        assert result.exit_code == 1 and "in use by another process" in result.output, result.output
        assert "damaged" not in result.output
    finally:
        os.close(handle)


# -- inputs that must give correct output ----------------------------------------------------------------------


def test_nested_parentheses_and_nots_parse_correctly():
    """Thousands of nested parentheses and NOTs, long ORs and the deepest formula allowed parse and round-trip
    correctly."""
    a = Formula.concept("a")
    assert Formula.parse("(" * 5000 + "a" + ")" * 5000) == a
    assert Formula.parse("NOT " * 5000 + "a") == a
    assert Formula.parse("NOT " * 5001 + "(a)") == ~a
    b, c = Formula.concept("b"), Formula.concept("c")
    assert Formula.parse("(" * 3000 + "a AND NOT (b OR c)" + ")" * 3000) == a & ~(b | c)
    assert Formula.from_json(nested(5000, {"concept": "a"})) == a
    assert Formula.from_json(nested(5001, {"concept": "a"})) == ~a
    long = Formula.parse(" OR ".join(f"x{i}" for i in range(20000)))
    assert long.length == 20000 and long.kind == "or"
    # the deepest formula allowed round-trips through text and JSON
    deepest = Formula.concept("a")
    for i in range(MAX_DEPTH - 1):
        deepest = (deepest | Formula.concept(f"b{i}")) if i % 2 else (deepest & Formula.concept(f"c{i}"))
    deepest = ~deepest
    assert deepest.depth == MAX_DEPTH
    assert Formula.parse(str(deepest)) == deepest and Formula.from_json(deepest.to_json()) == deepest


def test_control_characters_stay_on_one_line():
    """Concept names with newlines and control characters print as one-line formulas that parse back, and tables keep
    one line a feature."""
    names = ["a\nb", "tab\there", "line\u2028sep", 'quote"back\\slash', "\x7f\x1b[31m", "plain"]
    labels = ConceptLabels(np.eye(len(names), dtype=bool), names)
    for name in labels.names:
        formula = Formula.concept(name) & ~Formula.concept("plain")
        text = str(formula)
        assert "\n" not in text and "\u2028" not in text
        assert Formula.parse(text) == formula
    explanation = Explanation(Formula.concept("a\nb"), 0.9, 0.2, 1, 0.0, 3, 0.0, 0.0)
    table = LayerLabels([[explanation], []], labels.names).table()
    assert len(table.splitlines()) == 4  # header, rule, two features


def test_underflowing_p_values_are_never_zero(tmp_path):
    """A p-value below 1e-300 shows as '< 1e-300' in the table and the report, never as zero."""
    explanation = Explanation(Formula.concept("red"), 0.99, 0.2, 1, 0.0, 3, 0.0, 1e-320, support=12, n_samples=N)
    labels = LayerLabels([[explanation]] * 3, NAMES, "a", {"n_samples": N})
    table = labels.table()
    assert "< 1e-300" in table and "0.00e+00" not in table
    write_random_cache(tmp_path / "cache.h5")
    text = write_report(tmp_path / "r.html", {"a": labels}, cache=tmp_path / "cache.h5", max_channels=1,
                        concepts=concepts(), progress=False).read_text()
    assert html.escape("< 1e-300") in text and "0.00e+00" not in text


def test_int64_near_2_60_ranks_exactly():
    """Integer activations near 2**60 (which float64 would tie) rank exactly: labels and AUCs equal those of small
    integers and scipy's Mann-Whitney U."""
    rng = np.random.default_rng(3)
    labels = concepts(n=200, seed=3)
    order = np.stack([rng.permutation(200) for _ in range(3)], axis=1)
    order[:, 0] = np.where(labels.dense()[:, 0].numpy(), order[:, 0] + 1000, order[:, 0])  # feature 0 = "red"
    labeler = ConceptLabeler(labels)
    expected = labeler.label(torch.from_numpy(order.astype(np.float64)), L=2, B=2, progress=False)
    for big in (np.int64(2**60), np.uint64(2**63 + 2**61)):
        shifted = order.astype(type(big)) + big  # float64 would tie neighbours
        assert len(np.unique(shifted.astype(np.float64)[:, 0])) < 200
        got = labeler.label(shifted, L=2, B=2, progress=False)
        assert got == expected
        assert got[0][0].auc == expected[0][0].auc == pytest.approx(1.0)
    # every AUC against scipy's Mann-Whitney U on values of the same order (scipy itself converts to float64,
    # so it gets the small integers, not the shifted ones)
    values = order.astype(np.int64) + 2**60
    got = labeler.label(values, L=2, B=3, progress=False)
    for feature in range(3):
        for explanation in got[feature]:
            mask = explanation.formula.evaluate(labels).numpy()
            u = scipy.stats.mannwhitneyu(order[mask, feature], order[~mask, feature]).statistic
            assert explanation.auc == pytest.approx(u / (mask.sum() * (~mask).sum()), abs=1e-12)


def test_report_names_with_mathtext_and_anchors(tmp_path):
    """Layer and concept names that break matplotlib's math text or collide as anchors: every card is drawn, every
    anchor is unique and every shown label is in the page."""
    # mathtext fails on "$a^^b$", "$x_$", "${$" and "x$$y" (matplotlib raises ValueError while drawing)
    layers = {"features.0": 2, "features/0": 2, "features_0": 2, "$a^^b$": 2, "x$$y": 2}
    names = ["$x_$", "${$", "b_c^d", "new\nline"]
    labels_ = concepts(n=80, names=names)
    # each channel follows one concept (plus noise), so that every channel has a reliable label to draw
    rng = np.random.default_rng(0)
    planted = np.stack([labels_.mask(name).numpy() for name in names[:2]], 1).astype(np.float32)
    write_cache(tmp_path / "cache.h5", {
        layer: (planted + 0.1 * rng.normal(size=planted.shape)).astype(np.float32) for layer in layers})
    labeler = ConceptLabeler(labels_)
    results = labeler.label_cache(tmp_path / "cache.h5", L=2, B=2, progress=False)
    path = write_report(tmp_path / "r.html", results, cache=tmp_path / "cache.h5", concepts=labels_,
                        max_channels=2, progress=False)
    text = path.read_text()
    ids = re.findall(r'<h2 id="([^"]+)"', text)
    assert len(ids) == len(set(ids)) == len(layers)
    assert text.count('class="card"') == 2 * len(layers)  # every figure drawn
    assert text.count('<div class="figure"><img') == 2 * len(layers)
    for layer_labels in results.values():
        for channel in range(len(layer_labels)):
            best = layer_labels.best(channel)
            assert html.escape(str(best.formula)) in text and "\n" not in str(best.formula)


def test_names_differing_by_a_nul_are_refused_where_files_cannot_keep_them(tmp_path):
    """Concept and layer names that differ only by a NUL are refused, and the refused layer leaves nothing half-
    created."""
    with pytest.raises(ValueError, match="NUL"):
        ConceptLabels(np.eye(2, dtype=bool), ["a", "a\0"])
    with ActivationCache(tmp_path / "c.h5", mode="a") as cache:
        cache.initialize((0, 4))
        cache.add_layer("a", 2)
        with pytest.raises(ValueError, match="NUL"):
            cache.add_layer("a\0", 2)
        assert cache.layers == ["a"]  # nothing half-created
    with ActivationCache(tmp_path / "c.h5") as cache:
        assert cache.layers == ["a"]


def test_valid_csr_files_still_load_like_the_slow_decoding(tmp_path):
    """Valid CSR concept files (any index dtype, unsorted or duplicate entries, explicit 0/1 data) load like a slow
    element-wise decoding."""
    rng = np.random.default_rng(7)
    dense = rng.random((30, 5)) < 0.3
    indptr = np.concatenate([[0], np.cumsum(dense.sum(1))])
    indices = np.concatenate([np.flatnonzero(row)[rng.permutation(row.sum())] for row in dense])  # unsorted
    for dtype in (np.int32, np.int64, np.uint16, np.uint64):
        path = csr(tmp_path, indices=indices.astype(dtype), indptr=indptr.astype(dtype), shape=dense.shape,
                   names=[f"c{i}" for i in range(5)])
        np.testing.assert_array_equal(ConceptLabels.load(path).dense().numpy(), dense)
    # sorted, and each row's first entry twice, without data
    twice = np.concatenate([np.repeat(np.flatnonzero(row), [2] + [1] * (row.sum() - 1)) if row.any() else []
                            for row in dense]).astype(np.int64)
    path = csr(tmp_path, indices=twice, indptr=np.concatenate([[0], np.cumsum(dense.sum(1) + dense.any(1))]),
               shape=dense.shape, names=[f"c{i}" for i in range(5)])
    np.testing.assert_array_equal(ConceptLabels.load(path).dense().numpy(), dense)
    # duplicate entries and explicit data of 0/1
    data = np.ones(len(indices), dtype=np.int8)
    data[::3] = 0
    expected = np.zeros_like(dense)
    for row in range(30):
        for k in range(indptr[row], indptr[row + 1]):
            expected[row, indices[k]] |= bool(data[k])
    path = csr(tmp_path, indices=indices, indptr=indptr, shape=dense.shape, names=[f"c{i}" for i in range(5)],
               data=data)
    np.testing.assert_array_equal(ConceptLabels.load(path).dense().numpy(), expected)
    # and the reference format with a sparse tensor
    reference_pair(tmp_path, tensor=torch.from_numpy(dense[:, :3]).to_sparse())()


# -- things that do not belong together (issue 18) --------------------------------------------------------------


def test_find_channels_refuses_caches_labels_and_concepts_that_do_not_belong_together(tmp_path):
    """find_channels names the mismatch of N, channels, layer or concept set instead of showing wrong labels."""
    from crp_invert.find import find_channels

    path = tmp_path / "cache.h5"
    write_random_cache(path)
    labels_a = fake_labels(LAYERS["a"])["a"]
    with pytest.raises(ValueError, match="N=24 rows .* N=30"):
        find_channels("red", path, concepts(n=30))
    with pytest.raises(ValueError, match="have 4 channels, the data 3"):
        find_channels("red", path, concepts(), labels=fake_labels(4))
    with pytest.raises(ValueError, match="computed on N=99 samples, the data has N=24"):
        find_channels("red", path, concepts(), labels=fake_labels(LAYERS["a"], n_samples=99))
    with pytest.raises(ValueError, match=r"concepts the concepts given do not have: \['x', 'y'\]"):
        find_channels("red", path, concepts(), labels=fake_labels(LAYERS["a"], names=["x", "y"]))
    with pytest.raises(ValueError, match="labels are of layer 'a', not 'b'"):
        find_channels("red", path, concepts(), layers=["a", "b"], labels=labels_a)
    with pytest.raises(KeyError, match="unknown concept"):
        find_channels("purple", path, concepts())
    search = find_channels("red", path, concepts(), layers=["a"], labels=labels_a)  # what belongs together works
    assert {match.label for match in search} == {"red"}


@pytest.fixture(scope="module")
def evidence_setup():
    """A tiny CNN, 30 reference samples pooled at conv2 as CRP records them, their concepts and labels."""
    import torch
    from crp.attribution import CondAttribution
    from helpers import branch_net
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlus

    model = branch_net(0)
    attribution, composite = CondAttribution(model), EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])
    x = torch.randn(30, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    reference = attribution(x.clone().requires_grad_(True), [{"y": [0]}] * 30, composite,
                            record_layer=["conv2"]).activations["conv2"].flatten(2).mean(-1)
    labels = ConceptLabeler(concepts(n=30)).label(reference, L=2, B=2, layer="conv2", progress=False)
    return attribution, composite, x, reference, labels


@pytest.mark.parametrize("case,error,fragment", [
    ("concepts-longer", ValueError, "concepts hold 35 samples but the reference holds 30"),
    ("concepts-shorter", ValueError, "concepts hold 25 samples but the reference holds 30"),
    ("index-outside-reference", ValueError, "concepts hold 30 samples but the reference holds 10"),
    ("index-outside-both", ValueError, "sample_index 40 is not a sample of the reference"),
    ("other-concept-names", KeyError, "unknown concept"),
    ("row-missing-names", KeyError, "unknown concept"),
    ("reference-of-another-width", ValueError, "has 3 channels but the decomposed layer has 5"),
])
def test_evidence_refuses_references_concepts_and_indices_that_do_not_belong_together(evidence_setup, case, error,
                                                                                         fragment):
    """Evidence names the mismatch (N of concepts and reference, an index outside them, other concept names)
    instead of reporting another sample's concepts."""
    from crp_invert import Evidence
    from crp_invert.integration.glocal import decompose

    attribution, composite, x, reference, labels = evidence_setup
    evidence = {
        "concepts-longer": lambda: Evidence(reference, concepts=concepts(n=35), sample_index=32),
        "concepts-shorter": lambda: Evidence(reference, concepts=concepts(n=25), sample_index=3),
        "index-outside-reference": lambda: Evidence(reference[:10], concepts=concepts(n=30), sample_index=20),
        "index-outside-both": lambda: Evidence(reference, sample_index=40),
        "other-concept-names": lambda: Evidence(reference, concepts=concepts(n=30, names=["a", "b", "c"]),
                                                sample_index=3),
        "row-missing-names": lambda: Evidence(reference, concept_row={"a": True}),
        "reference-of-another-width": lambda: Evidence(reference[:, :3]),
    }[case]()
    with pytest.raises(error, match=fragment):
        decompose(attribution, x[:1], 0, "conv2", composite, labels=labels, top_k=5, evidence=evidence)


# -- names that try to break the report's HTML or its search script -----------------------------------------------

HOSTILE_NAMES = ["</script><script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "<!--", "]]>",
                 "a' onmouseover='alert(3)", "&lt;b&gt;", "\u2028\u2029", "${alert(4)}", "`x`"]


class _Structure(HTMLParser):
    """The start tags of a page with their attribute names, and the number of script tags."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, tuple[str, ...]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, tuple(sorted(name for name, _ in attrs))))


def _report_structure(folder: Path, layer_names: list[str], concept_names: list[str], class_names: list[str],
                      title: str) -> tuple[list, str]:
    folder.mkdir()
    write_random_cache(folder / "cache.h5", layers=dict.fromkeys(layer_names, 2))
    labels_ = concepts(names=concept_names)
    results = ConceptLabeler(labels_).label_cache(folder / "cache.h5", L=2, B=2, progress=False)
    path = write_report(folder / "r.html", results, cache=folder / "cache.h5", concepts=labels_, max_channels=1,
                        progress=False, class_names=class_names, title=title)
    text = path.read_text(encoding="utf-8")
    parser = _Structure()
    parser.feed(text)
    return parser.tags, text


def test_report_escapes_names_that_try_to_break_its_html(tmp_path):
    """Concept, layer, class names and a title made of HTML and script fragments change no element, attribute
    or script of report.html: its tags and attribute names are those of the same report with plain names."""
    hostile = _report_structure(tmp_path / "hostile", HOSTILE_NAMES[:2], HOSTILE_NAMES[2:6], HOSTILE_NAMES[6:],
                                HOSTILE_NAMES[0])
    plain = _report_structure(tmp_path / "plain", ["layer0", "layer1"], ["c0", "c1", "c2", "c3"], ["k0", "k1", "k2"],
                              "title")
    assert hostile[0] == plain[0]
    assert not any(name.startswith("on") for _, names in hostile[0] for name in names)
    assert "<script>alert(1)" not in hostile[1] and "<img src=x" not in hostile[1]


# -- permissions of output files (issue 18) ---------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_outputs_get_the_permissions_of_an_ordinary_new_file(tmp_path, umask):
    """report.html, labels JSON and CSV, JSON results, caches and checkpoint logs get 0o666 less the umask, as
    open() gives a new file, whatever the atomic-write path; an existing file keeps its own mode."""
    from crp_invert.core.files import write_text_atomically
    from crp_invert.core.jsonio import write_json

    expected = 0o666 & ~umask
    write_random_cache(tmp_path / "cache.h5")
    labels = fake_labels(LAYERS["a"])
    labels["a"].to_json(tmp_path / "labels.json")
    labels["a"].to_csv(tmp_path / "labels.csv")
    write_json({"a": 1}, tmp_path / "result.json")
    write_text_atomically(tmp_path / "plain.txt", "x")
    write_report(tmp_path / "report.html", labels, cache=tmp_path / "cache.h5", concepts=concepts(),
                 max_channels=0, progress=False)
    open(tmp_path / "reference.txt", "w").close()
    assert (os.stat(tmp_path / "reference.txt").st_mode & 0o777) == expected  # what open() gives
    for name in ("cache.h5", "labels.json", "labels.csv", "result.json", "plain.txt", "report.html"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == expected, name
    os.chmod(tmp_path / "labels.json", 0o640)
    labels["a"].to_json(tmp_path / "labels.json")
    assert (os.stat(tmp_path / "labels.json").st_mode & 0o777) == 0o640
