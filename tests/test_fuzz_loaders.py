"""Property-based fuzzing (hypothesis) of every loader of files and texts that other people make: concepts
``.npz``, labels JSON, cache metadata, ``Formula.parse`` and ``Formula.from_json``. Random and mutated inputs
never crash or hang: they load correctly (checked against slow, obviously right decodings) or raise our error
types."""

from __future__ import annotations

import ast
import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import tempfile
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import write_cache
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from crp_invert import ActivationCache, ConceptLabels, Formula, LayerLabels
from crp_invert.core.formula import FormulaParseError
from crp_invert.core.labels import Explanation

OUR_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError)
# CRP_INVERT_FUZZ_EXAMPLES=5000 for a long search; the suite runs 150 examples per loader
EXAMPLES = int(os.environ.get("CRP_INVERT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(deadline=timedelta(seconds=20), database=None, suppress_health_check=[HealthCheck.too_slow],
                max_examples=EXAMPLES)


@contextlib.contextmanager
def time_limit(seconds: int = 30):
    """Fail (instead of hanging the suite) if the body runs longer than ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"a loader ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def folder():
    with tempfile.TemporaryDirectory(prefix="crp-fuzz-") as name:
        yield Path(name)


def load_or_refuse(load):
    """``load()``, or None if it raised one of our error types; anything else fails the test."""
    with time_limit():
        try:
            return load()
        except OUR_ERRORS:
            return None


# -- concepts .npz ---------------------------------------------------------------------------------------------

DTYPES = st.sampled_from([np.bool_, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.float32, np.float64,
                          np.complex64, "<U3", "S3"])
ARRAYS = DTYPES.flatmap(lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)))
KEYS = st.sampled_from(["names", "labels", "indices", "indptr", "shape", "data", "descriptions"])


@FUZZ
@given(st.dictionaries(KEYS, ARRAYS, max_size=7))
def test_random_npz_arrays(arrays):
    """Random arrays in a concepts .npz either load with the names and labels written or are refused with our error
    types."""
    with folder() as tmp:
        np.savez(tmp / "c.npz", **arrays)
        labels = load_or_refuse(lambda: ConceptLabels.load(tmp / "c.npz"))
    if labels is not None:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in arrays["names"]]
        assert labels.names == names and labels.n_concepts == len(names)
        if "labels" in arrays:
            np.testing.assert_array_equal(labels.dense().numpy(), arrays["labels"] != 0)


def slow_csr(indices, indptr, shape, n_names):
    """The dense matrix of CSR arrays under the rules, decoded with Python loops, or None if they break one."""
    if shape.ndim != 1 or shape.dtype.kind not in "iu" or indices.ndim != 1 or indptr.ndim != 1:
        return None
    if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu" or len(shape) != 2:
        return None
    n_rows, n_cols = (int(v) for v in shape)
    pointers, columns = [int(v) for v in indptr], [int(v) for v in indices]
    if n_rows < 0 or n_cols < 1 or n_cols != n_names or n_rows < 1 or len(pointers) != n_rows + 1:
        return None
    if pointers[0] != 0 or pointers[-1] != len(columns) or any(b < a for a, b in zip(pointers, pointers[1:])):
        return None
    if any(not 0 <= c < n_cols for c in columns):
        return None
    dense = np.zeros((n_rows, n_cols), dtype=bool)
    for row in range(n_rows):
        for k in range(pointers[row], pointers[row + 1]):
            dense[row, columns[k]] = True
    return dense


@st.composite
def mutated_csr(draw):
    """Valid CSR arrays of a random matrix, then a few mutations of the kind found in hostile files."""
    n_rows, n_cols = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    dense = np.array(draw(st.lists(st.lists(st.booleans(), min_size=n_cols, max_size=n_cols), min_size=n_rows,
                                   max_size=n_rows)), dtype=bool)
    indptr = np.concatenate([[0], np.cumsum(dense.sum(1))]).astype(np.int64)
    indices = np.concatenate([np.flatnonzero(row) for row in dense] + [np.zeros(0, int)]).astype(np.int64)
    shape = np.array([n_rows, n_cols], dtype=np.int64)
    arrays = {"indices": indices, "indptr": indptr, "shape": shape}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(arrays)))
        array = arrays[key]
        kind = draw(st.sampled_from(["set", "drop", "append", "dtype", "negate"]))
        if kind == "set" and array.size:
            array = array.copy()
            value = draw(st.integers(-3, 2**40))
            if array.dtype.kind in "iu":
                value = int(np.clip(value, np.iinfo(array.dtype).min, np.iinfo(array.dtype).max))
            array[draw(st.integers(0, array.size - 1))] = value
        elif kind == "drop" and array.size:
            array = np.delete(array, draw(st.integers(0, array.size - 1)))
        elif kind == "append":
            array = np.append(array, draw(st.integers(-2, 8))).astype(array.dtype)
        elif kind == "dtype":
            array = array.astype(draw(st.sampled_from([np.int32, np.uint64, np.float64, np.uint8])))
        elif kind == "negate":
            array = -array
        arrays[key] = array
    return arrays, n_cols


@FUZZ
@given(mutated_csr(), st.integers(0, 2))
def test_mutated_csr_loads_exactly_the_valid_files(case, extra_names):
    """A mutated CSR concepts file loads exactly when a slow decoding finds it valid, with the same labels."""
    arrays, n_cols = case
    names = [f"c{i}" for i in range(n_cols + (extra_names if extra_names == 1 else 0))]
    with folder() as tmp:
        np.savez(tmp / "c.npz", names=np.array(names), **arrays)
        labels = load_or_refuse(lambda: ConceptLabels.load(tmp / "c.npz"))
    expected = slow_csr(arrays["indices"], arrays["indptr"], arrays["shape"], len(names))
    if expected is None:
        assert labels is None, "an invalid CSR file was loaded"
    else:
        assert labels is not None, "a valid CSR file was refused"
        np.testing.assert_array_equal(labels.dense().numpy(), expected)


def valid_npz_bytes() -> bytes:
    with folder() as tmp:
        ConceptLabels(np.eye(5, 3, dtype=bool), ["a", "b", "c"], ["x", "y", "z"]).save(tmp / "c.npz")
        return (tmp / "c.npz").read_bytes()


VALID_NPZ = valid_npz_bytes()


def flipped(flips) -> bytes:
    raw = bytearray(VALID_NPZ)
    for at, value in flips:
        raw[at] = value
    return bytes(raw)


@FUZZ
@given(st.one_of(st.binary(max_size=400),
                 st.lists(st.tuples(st.integers(0, len(VALID_NPZ) - 1), st.integers(0, 255)), min_size=1,
                          max_size=6).map(flipped),
                 st.integers(0, len(VALID_NPZ)).map(lambda cut: VALID_NPZ[:cut])))
def test_random_and_damaged_npz_bytes(raw):
    """Random and truncated .npz bytes either load consistent concepts or are refused with our error types."""
    with folder() as tmp:
        (tmp / "c.npz").write_bytes(raw)
        labels = load_or_refuse(lambda: ConceptLabels.load(tmp / "c.npz"))
    if labels is not None:
        assert labels.n_concepts == len(labels.names) and labels.dense().shape == labels.shape


# -- labels JSON -----------------------------------------------------------------------------------------------

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**20), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children,
                                                                                 max_size=4)),
    max_leaves=20,
)


def valid_labels_document() -> dict:
    formula = Formula.parse("red AND NOT (big OR round)")
    beam = [Explanation(formula, 0.8, 0.25, 3, 1e-5, 12, 1e-4, 2e-4), Explanation(Formula.concept("red"), 0.7, 0.4, 1,
                                                                                  0.01, 12, 0.1, 0.1)]
    return LayerLabels([beam, [], beam[:1]], ["red", "big", "round"], "features.3", {"L": 3}).to_dict()


def paths_of(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_of(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths_of(item, prefix + (i,))


def mutate(draw, document) -> None:
    """Change 1 to 3 random places of a JSON document in place: replace a value by random JSON or delete it."""
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_of(document) if p]
        path = draw(st.sampled_from(paths))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            parent[path[-1]] = draw(JSON)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])


@st.composite
def mutated_labels(draw):
    document = valid_labels_document()
    mutate(draw, document)
    return document


@FUZZ
@given(st.one_of(JSON, mutated_labels()))
def test_labels_json(document):
    """Random and mutated labels JSON either loads as labels that round-trip and render, or is refused with our error
    types."""
    with folder() as tmp:
        (tmp / "l.json").write_text(json.dumps(document))
        labels = load_or_refuse(lambda: LayerLabels.from_json(tmp / "l.json"))
    if labels is not None:
        assert LayerLabels.from_dict(json.loads(json.dumps(labels.to_dict()))) == labels
        for beam in labels:
            for explanation in beam:
                assert explanation.formula.concepts <= set(labels.concept_names)
                assert isinstance(explanation.auc, float) and isinstance(explanation.length, int)
        labels.table()  # renders


@FUZZ
@given(st.text(max_size=200))
def test_labels_json_text(text):
    """Random text as a labels JSON file is refused with our error types (or loads), never another exception."""
    with folder() as tmp:
        (tmp / "l.json").write_text(text)
        load_or_refuse(lambda: LayerLabels.from_json(tmp / "l.json"))


# -- cache metadata --------------------------------------------------------------------------------------------

ATTRIBUTE_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=30), st.binary(max_size=10), st.booleans(),
    st.lists(st.integers(-5, 5), min_size=1, max_size=3).map(np.array), st.just('{"a": "0", "b": "9"}'),
    st.just('{"a": "1"}'), st.just("[]"), st.just('{"a": "../.."}'),
)
ROOT_KEYS = ["format", "format_version", "n_samples", "sample_start", "sample_end", "dataset_length", "layer_index"]
LAYER_KEYS = ["name", "n_channels", "n_samples"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "cache.h5"
    return write_cache(path, {name: (np.ones((6, channels)), np.zeros((6, channels)))
                              for name, channels in (("a", 2), ("b", 3))})


@settings(parent=FUZZ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          max_examples=max(10, EXAMPLES // 3))
@given(edits=st.lists(st.tuples(st.sampled_from(["root", "0", "1"]), st.integers(0, 6), st.one_of(
    st.none(), ATTRIBUTE_VALUES)), min_size=1, max_size=3))
def test_cache_metadata(template, edits):
    """An activation cache with edited or deleted metadata either opens and reads consistently or is refused with our
    error types."""
    with folder() as tmp:
        path = tmp / "cache.h5"
        shutil.copy(template, path)
        with h5py.File(path, "r+") as file:
            for where, key_index, value in edits:
                attrs = file.attrs if where == "root" else file["layers"][where].attrs
                keys = ROOT_KEYS if where == "root" else LAYER_KEYS
                key = keys[key_index % len(keys)]
                try:
                    if value is None:
                        if key in attrs:
                            del attrs[key]
                    else:
                        attrs[key] = value
                except (TypeError, ValueError, OverflowError):
                    assume(False)  # h5py cannot store it: not a file anyone could make

        def read():
            with ActivationCache(path) as cache:
                for layer in cache.layers:
                    assert cache.activations(layer).shape == (cache.n_samples, cache.n_channels(layer))
                    cache.complete(layer)
                    cache.info(layer)
                    cache.check_values(layer)
                return cache.layers

        layers = load_or_refuse(read)
        if layers is not None:
            assert set(layers) <= {"a", "b"}


# -- formulas --------------------------------------------------------------------------------------------------

TOKENS = st.sampled_from(["(", ")", "AND", "OR", "NOT", "a", "b", "c"])
PYTHON = {"AND": "and", "OR": "or", "NOT": "not"}
ALLOWED_NODES = (ast.Expression, ast.BoolOp, ast.UnaryOp, ast.Not, ast.And, ast.Or, ast.Name, ast.Load)


@FUZZ
@given(st.lists(TOKENS, max_size=30))
def test_parse_agrees_with_python(tokens):
    """Python's grammar has the same precedence (not > and > or): it is the slow, obviously right parser."""
    text = " ".join(tokens)
    formula = load_or_refuse(lambda: Formula.parse(text))
    try:
        tree = ast.parse(" ".join(PYTHON.get(token, token) for token in tokens), mode="eval")
        valid = all(isinstance(node, ALLOWED_NODES) for node in ast.walk(tree))
    except SyntaxError:
        valid = False
    if not valid:
        assert formula is None, f"{text!r} should not parse"
        return
    assert formula is not None, f"{text!r} should parse"
    code = compile(tree, "<formula>", "eval")
    for values in itertools.product([False, True], repeat=3):
        env = dict(zip("abc", values))
        masks = {name: np.array([value]) for name, value in env.items()}
        assert bool(formula.evaluate(masks)[0]) == bool(eval(code, {}, env))  # noqa: S307 - our own tokens
    assert Formula.parse(str(formula)) == formula
    assert Formula.from_json(json.loads(json.dumps(formula.to_json()))) == formula


@FUZZ
@given(st.text(max_size=80) | st.lists(st.sampled_from(['"', "\\", "(", ")", " ", "AND", "x", "\n", "\\u00"]),
                                       max_size=20).map("".join))
def test_parse_random_text(text):
    """Random text either parses to a one-line formula that round-trips, or raises FormulaParseError within the time
    limit."""
    try:
        with time_limit():
            formula = Formula.parse(text)
    except FormulaParseError:
        return
    assert Formula.parse(str(formula)) == formula and "\n" not in str(formula)


NAMES = st.sampled_from(["a", "b", "c"])
FORMULA_JSON = st.recursive(
    st.one_of(NAMES.map(lambda name: {"concept": name}), NAMES, st.integers(), st.none()),
    lambda children: st.one_of(
        children.map(lambda child: {"not": child}),
        st.lists(children, max_size=4).map(lambda items: {"and": items}),
        st.lists(children, max_size=4).map(lambda items: {"or": items}),
        st.dictionaries(st.sampled_from(["concept", "not", "and", "xor"]), children, max_size=2),
    ),
    max_leaves=25,
)


def slow_evaluate(data, env):
    """The truth value of formula JSON, or None if it is not a formula (plain recursion: small inputs only)."""
    if isinstance(data, str):
        return env.get(data) if data in env else None
    if not isinstance(data, dict) or len(data) != 1:
        return None
    (kind, value), = data.items()
    if kind == "concept":
        return env.get(value) if isinstance(value, str) and value in env else None
    if kind == "not":
        inner = slow_evaluate(value, env)
        return None if inner is None else not inner
    if kind in ("and", "or") and isinstance(value, list) and value:
        items = [slow_evaluate(item, env) for item in value]
        if any(item is None for item in items):
            return None
        return all(items) if kind == "and" else any(items)
    return None


@FUZZ
@given(FORMULA_JSON)
def test_formula_json(data):
    """Random formula JSON loads exactly when a slow evaluator accepts it, and then evaluates like it on every
    assignment."""
    formula = load_or_refuse(lambda: Formula.from_json(data))
    for values in itertools.product([False, True], repeat=3):
        env = dict(zip("abc", values))
        expected = slow_evaluate(data, env)
        if formula is None:
            assert expected is None, f"{data!r} should load"
            return
        assert expected is not None, f"{data!r} should be refused"
        masks = {name: np.array([value]) for name, value in env.items()}
        assert bool(formula.evaluate(masks)[0]) == expected
    assert Formula.from_json(formula.to_json()) == formula


# -- checkpoint logs and collect journals (issue 18: every loop over persisted state ends) -----------------------

LOG_RANGE = (0, 12)
SPAN_VALUES = st.integers(-2, 14) | st.sampled_from([True, 1.5, "3", None])
SPANS = st.lists(SPAN_VALUES, min_size=0, max_size=3)
PREFIXES = st.sampled_from(["RelMax/a_0_4_", "ActMax/a_4_8_", "missing/b_", "../outside_", "/abs_", "ok_"])
FILES = st.dictionaries(st.sampled_from(["r_max", "a_max", "r_stats", "a_stats", "other"]),
                        st.lists(PREFIXES, max_size=2) | st.integers() | st.none(), max_size=3)
LOG_LINES = st.one_of(
    st.builds(lambda span, files: json.dumps({"span": span, "files": files}), SPANS, FILES),
    st.builds(lambda a, b: json.dumps({"span": [a, b], "files": {}}), st.integers(0, 12), st.integers(0, 12)),
    st.builds(lambda run: json.dumps({"run": run}), SPANS),
    st.sampled_from(["", "{", "[1, 2]", '"run"', "null", '{"span": [2, 2], "files": {"r_max": ["ok_"]}}']),
    st.text(max_size=20),
)


def expected_chain(lines, start, limit, readable):
    """The chain by the rules, slowly: the lines up to the first damaged one; spans with samples; at each position
    the span logged last from there; stop at the first unreadable checkpoint."""
    from crp_invert.integration.checkpoints import _parse_record

    entries = []
    for line in lines:
        try:
            record = _parse_record(line, LOG_RANGE)
        except ValueError:
            break
        if not isinstance(record, tuple):
            entries.append(record)
    chain, position = [], start
    for _ in range(len(entries) + 1):
        candidates = [e for e in entries if e.span[0] == position and e.span[1] > position and e not in chain]
        if not candidates or candidates[-1].span[1] > limit:
            break
        if not all(readable(p) for p in candidates[-1].prefixes()):
            break
        chain.append(candidates[-1])
        position = candidates[-1].span[1]
    return [e.span for e in chain]


@FUZZ
@given(st.lists(LOG_LINES, max_size=12), st.integers(0, 12), st.integers(0, 12),
       st.sets(st.sampled_from(["RelMax/a_0_4_", "ActMax/a_4_8_", "ok_"])))
def test_checkpoint_logs_of_any_content_end(lines, start, limit, present):
    """Resume's walk over a checkpoint log ends on any content (zero-length, overlapping, repeated, out-of-order
    spans, damaged lines) and follows the rules, checked against a slow walk; forget ends too."""
    from crp_invert.integration.checkpoints import SUFFIXES, CheckpointLog

    with folder() as root:
        for prefix in present:
            for suffix in SUFFIXES:
                (root / (prefix + suffix)).parent.mkdir(parents=True, exist_ok=True)
                np.save(root / (prefix + suffix), np.zeros(2))
        log = CheckpointLog(root, LOG_RANGE)
        log.folder.mkdir(parents=True)
        log.path.write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")
        text_lines = log.path.read_text(encoding="utf-8").splitlines()
        with time_limit(20):
            chain = [entry.span for entry in log.chain(start, limit)]
        assert chain == expected_chain(text_lines, start, limit, lambda p: p in present)
        position = start
        for a, b in chain:  # contiguous, strictly forward, inside the limit
            assert a == position < b <= limit
            position = b
        with time_limit(20):
            log.forget({"RelMax/a_0_4_", "ok_"})
            log.forget(set())


JOURNAL_ITEMS = st.sampled_from(["gone.npy", "kept.npy", "sub", "../escape.npy", "/etc/passwd", "", "a\x00b"])


@FUZZ
@given(st.one_of(st.lists(JOURNAL_ITEMS | st.integers() | st.none(), max_size=6).map(json.dumps),
                 st.text(max_size=30), JSON.map(json.dumps)))
def test_collect_journals_of_any_content_end(journal):
    """A collect journal naming gone files, folders, paths outside CRP's folder or anything else ends, deletes only
    the files it names inside CRP's folder, and is removed."""
    from crp_invert.integration.checkpoints import FOLDER, finish_collect

    with folder() as base:
        root = base / "fv"
        (root / "sub").mkdir(parents=True)
        (root / "kept.npy").write_bytes(b"x")
        (base / "escape.npy").write_bytes(b"x")
        (root / FOLDER).mkdir()
        (root / FOLDER / "collected.json").write_text(journal, encoding="utf-8")
        try:
            names = json.loads(journal)
        except ValueError:
            names = []
        with time_limit(20):
            finish_collect(root)
        assert not (root / FOLDER / "collected.json").exists()
        assert (root / "kept.npy").exists() == (not (isinstance(names, list) and "kept.npy" in names))
        assert (root / "sub").is_dir() and (base / "escape.npy").exists()


# -- audit, channel search and glocal JSON (issue 18) -----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def valid_result_documents() -> dict:
    """One valid JSON document each of ChannelSearch, Audit and GlocalExplanation, made by the library."""
    import torch
    from crp.attribution import CondAttribution
    from helpers import branch_net, random_concepts
    from zennit.composites import EpsilonPlus

    from crp_invert.audit import audit
    from crp_invert.find import find_channels
    from crp_invert.integration.glocal import decompose

    rng = np.random.default_rng(3)
    concepts = random_concepts(30, 3, share=0.4, seed=3, names=["red", "big", "round"])
    activations = rng.random((30, 4))
    labels = LayerLabels([[Explanation(Formula.concept("red"), 0.7, 0.4, 1, 0.01, 12, 0.1, 0.1)]] * 4,
                         concepts.names, "a", {"n_samples": 30})
    search = find_channels("red AND NOT big", {"a": activations}, concepts, labels={"a": labels})
    audited = audit(rng.normal(size=(30, 4)), labels, "a", ["cat", "dog"], targets=rng.integers(0, 2, 30),
                    artifacts=["red"], class_concepts={"cat": ["round"], "dog": ["big"]}, k=2)
    model = branch_net(0)
    glocal = decompose(CondAttribution(model), torch.randn(1, 1, 14, 14), 0, "conv2", EpsilonPlus(), top_k=2)
    return {"search": search.to_dict(), "audit": audited.to_dict(), "glocal": glocal.to_dict()}


def result_loader(kind):
    from crp_invert.audit import Audit
    from crp_invert.find import ChannelSearch
    from crp_invert.integration.glocal import GlocalExplanation

    return {"search": ChannelSearch, "audit": Audit, "glocal": GlocalExplanation}[kind]


@st.composite
def mutated_result(draw):
    kind = draw(st.sampled_from(["search", "audit", "glocal"]))
    document = json.loads(json.dumps(valid_result_documents()[kind]))
    mutate(draw, document)
    return kind, document


@FUZZ
@given(mutated_result() | st.tuples(st.sampled_from(["search", "audit", "glocal"]), JSON))
def test_result_json_of_any_content(case):
    """Audit, ChannelSearch and GlocalExplanation JSON, damaged at random: read back, or refused with our error
    types (never AttributeError, IndexError, a hang); what is read back writes the same document again."""
    kind, document = case
    loader = result_loader(kind)
    with folder() as tmp:
        (tmp / "r.json").write_text(json.dumps(document))
        result = load_or_refuse(lambda: loader.from_json(str(tmp / "r.json")))
        text_result = load_or_refuse(lambda: loader.from_json(json.dumps(document)))
    assert (result is None) == (text_result is None)
    if result is not None:
        text = json.dumps(result.to_dict())
        assert json.dumps(loader.from_dict(json.loads(text)).to_dict()) == text


def test_valid_result_documents_round_trip():
    """The fuzzed documents start valid: each reads back to the same document."""
    for kind, document in valid_result_documents().items():
        assert json.dumps(result_loader(kind).from_json(json.dumps(document)).to_dict()) == json.dumps(document)
