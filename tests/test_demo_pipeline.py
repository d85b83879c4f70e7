"""``crp-invert demo`` end to end on a small setting: files, labels, report, planted truth, escaping."""

import html
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from report_page import parse

from crp_invert.cli import main

N = 160
SEED = 2
EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the demo once in an empty working folder; returns (working folder, out folder, CLI output)."""
    work = tmp_path_factory.mktemp("demo")
    old = os.getcwd()
    os.chdir(work)
    try:
        result = CliRunner().invoke(
            main,
            ["demo", "--out", "out", "--samples", str(N), "--seed", str(SEED), "--max-channels", "1", "-q"],
        )
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return work, work / "out", result.output


def channel_tables(text):
    """layer -> rows (lists of cell texts) of the report's channel tables."""
    return parse(text).tables


def test_writes_only_into_out(demo):
    """The demo writes nothing outside --out, and there its report, cache, summary, labels, figures, CRP files."""
    work, out, _ = demo
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    for name in (
        "report.html",
        "activations.h5",
        "summary.json",
        "audit.json",
        "labels/index.json",
        "labels_relevance/index.json",
        "figures/circuit.png",
        "figures/glocal_0.png",
        "crp/ActMax_sum_normed",
        "crp/RelMax_sum_normed",
    ):
        assert (out / name).exists(), name


def test_summary_lists_every_file_written(demo):
    """summary.json's `written` is exactly the files in --out (summary.json last); `files` point into it."""
    work, out, _ = demo
    summary = json.loads((out / "summary.json").read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(summary["written"]) == on_disk and len(set(summary["written"])) == len(on_disk)
    assert summary["written"][-1] == "summary.json"
    for key, path in summary["files"].items():  # relative to the working folder, like --out
        assert (work / path).exists() and (work / out) in (work / path).parents, key
    assert list(summary["timings"]) == ["data", "crp", "labels", "planted truth", "glocal", "relevance labels",
                                        "audit", "report"]


def test_out_is_refused_when_not_empty(demo, tmp_path):
    """An existing non-empty --out: one line, exit 1, nothing touched; an empty one is fine."""
    from crp_invert.demo.pipeline import run_demo

    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "report.html").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "--out", str(folder), "--samples", "16", "-q"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [f"Error: --out {str(folder)!r} exists and is not empty; pass "
                                                  "--overwrite to write into it"]
    assert sorted(p.name for p in folder.iterdir()) == ["report.html"]
    assert (folder / "report.html").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_demo(tmp_path / "file", n_samples=16)


def test_label_file_names_are_those_of_the_label_command(tmp_path):
    """Layer names become the file names `crp-invert label --out DIR` gives them (unsafe characters, clashes)."""
    from crp_invert.cli import _out_files
    from crp_invert.demo.pipeline import label_file_names

    layers = ["conv1", "features.0", "a/b", "a:b", "index", "..", "x y"]
    expected = {layer: path.name for layer, path in _out_files(tmp_path / "out", layers, overwrite=False) if layer}
    assert label_file_names(layers) == expected


def test_labels_equal_direct_labeling_of_the_cache(demo):
    """The label files equal ConceptLabeler's labels of the cached activations; the logits are the model's."""
    from crp_invert import ConceptLabeler, LayerLabels
    from crp_invert.demo.data import AuditDataset
    from crp_invert.demo.model import load_demo_model
    from crp_invert.storage.cache import ActivationCache

    _, out, _ = demo
    dataset = AuditDataset(N, seed=SEED)  # the shapes images, then the artifact concept set
    index = json.loads((out / "labels" / "index.json").read_text())
    model = load_demo_model()
    assert list(index) == model.layer_names
    labeler = ConceptLabeler(dataset.concepts)
    with ActivationCache(out / "activations.h5") as cache:
        # the recorded logits are the model's outputs (BatchNorm merging does not change them)
        images, _ = dataset.tensors()
        with torch.no_grad():
            logits = model(images)
        torch.testing.assert_close(cache.activations("linear2"), logits, atol=1e-4, rtol=1e-4)
        for layer, file_name in index.items():
            stored = LayerLabels.from_json(out / "labels" / file_name)
            direct = labeler.label(cache.activations(layer), L=3, B=3, layer=layer, progress=False)
            assert len(stored) == cache.n_channels(layer)
            assert [str(e.formula) for beam in stored for e in beam] == [
                str(e.formula) for beam in direct for e in beam
            ]
            assert [e.auc for beam in stored for e in beam] == pytest.approx(
                [e.auc for beam in direct for e in beam]
            )


def test_summary_and_planted_truth(demo):
    """summary.json's planted-truth scores and layer rows equal recomputation from label files and cache."""
    from crp_invert.core.labels import LayerLabels
    from crp_invert.demo.data import AuditDataset, class_formulas
    from crp_invert.demo.truth import explanation_accuracy, planted_truth_score

    _, out, output = demo
    summary = json.loads((out / "summary.json").read_text())
    l2 = LayerLabels.from_json(out / "linear2_L2.json")
    assert l2.parameters["L"] == 2
    dataset = AuditDataset(N, seed=SEED)
    assert summary["planted_truth_score"] == planted_truth_score(l2, class_formulas(), dataset.class_names)
    assert summary["explanation_accuracy_l2"] == explanation_accuracy(l2, dataset.concepts, dataset.targets)
    layers = [row["layer"] for row in summary["layers"]]
    assert layers == ["conv1", "conv2", "conv3", "linear1", "linear2"]
    for row in summary["layers"]:
        labels = LayerLabels.from_json(out / "labels" / f"{row['layer']}.json")
        aucs = [labels.best(f).auc for f in range(len(labels)) if labels.best(f) is not None]
        assert row["channels"] == len(labels)
        assert row["median_auc"] == pytest.approx(float(np.median(aucs)))
        q = [labels.best(f).p_value_bh if labels.best(f) else 1.0 for f in range(len(labels))]
        assert row["share_significant"] == pytest.approx(np.mean(np.array(q) < 0.05))
    # the printed table: one line per layer and the planted-truth line
    for layer in layers:
        assert any(line.startswith(layer + " ") for line in output.splitlines())
    assert "planted truth" in output and "L = 2" in output
    # relevance labels: the planted truth at L = 3 from the relevances, and per layer the labels that differ
    relevance = LayerLabels.from_json(out / "labels_relevance" / "linear2.json")
    assert relevance.parameters["L"] == 3
    assert summary["planted_truth_score_l3_relevance_all"] == planted_truth_score(relevance, class_formulas(),
                                                                                 dataset.class_names)
    # the planted truth itself: relevance labels of the logits over the shapes images only
    from crp_invert import ConceptLabeler
    from crp_invert.storage.cache import ActivationCache

    with ActivationCache(out / "activations.h5") as cache:
        shapes = cache.relevances("linear2")[:dataset.n_base]
    on_shapes = ConceptLabeler(dataset.base.concepts).label(shapes, L=3, B=3, layer="linear2", progress=False)
    assert summary["planted_truth_score_l3_relevance"] == planted_truth_score(on_shapes, class_formulas(),
                                                                             dataset.class_names)
    for layer in layers:
        act = LayerLabels.from_json(out / "labels" / f"{layer}.json")
        rel = LayerLabels.from_json(out / "labels_relevance" / f"{layer}.json")
        formulas = [[None if x.best(c) is None else x.best(c).formula for c in range(len(x))] for x in (act, rel)]
        assert summary["labels_differ"][layer] == sum(a != r for a, r in zip(*formulas))
    assert 'source="relevance"' in output and "Clever-Hans audit of conv3" in output


def test_report_lists_every_channel(demo):
    """The report lists every channel of every layer with its best reliable label (or 'no reliable label'), CRP
    samples, glocal and circuits."""
    from crp_invert.core.labels import NO_RELIABLE_LABEL, LayerLabels

    _, out, _ = demo
    text = (out / "report.html").read_text()
    tables = channel_tables(text)
    index = json.loads((out / "labels" / "index.json").read_text())
    assert list(tables) == list(index)
    for layer, file_name in index.items():
        labels = LayerLabels.from_json(out / "labels" / file_name)
        rows = tables[layer][1:]
        assert [int(row[0]) for row in rows] == list(range(len(labels)))
        assert [row[1] for row in rows] == [
            str(labels.best(c).formula) if labels.best(c) else NO_RELIABLE_LABEL for c in range(len(labels))
        ]
    # a model was given: CRP reference samples, glocal figures and the circuit are in the page
    assert "<figcaption>CRP ActMax" in text and "<figcaption>CRP RelMax" in text
    assert "Glocal explanations" in text and "Circuits" in text
    assert "reference samples are skipped" not in text


def test_report_from_demo_files_escapes_concept_names(demo, tmp_path):
    """Rename a concept to a script tag in the demo's labels and concepts: the report shows it as text."""
    from crp_invert.core.concepts import ConceptLabels
    from crp_invert.demo.data import AuditDataset

    _, out, _ = demo
    concepts = AuditDataset(N, seed=SEED).concepts
    names = [EVIL if name == "red" else name for name in concepts.names]
    ConceptLabels(concepts.dense(), names).save(tmp_path / "concepts.npz")
    renamed = []
    for name in json.loads((out / "labels" / "index.json").read_text()).values():
        text = (out / "labels" / name).read_text().replace('"red"', json.dumps(EVIL))
        (tmp_path / name).write_text(text)
        renamed.append(str(tmp_path / name))
    assert any(EVIL in Path(p).read_text() for p in renamed)
    result = CliRunner().invoke(
        main,
        [
            "report",
            str(out / "activations.h5"),
            *renamed,
            "--concepts",
            str(tmp_path / "concepts.npz"),
            "--out",
            str(tmp_path / "r.html"),
            "--max-channels",
            "2",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert EVIL not in page
    assert html.escape(EVIL) in page
    assert any(EVIL in row[1] for rows in channel_tables(page).values() for row in rows[1:])


def test_bad_settings(tmp_path):
    """Too few samples give usage error 2; run_demo refuses a bad n_samples or alpha with ValueError."""
    from crp_invert.demo.pipeline import run_demo

    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "x"), "--samples", "5"])
    assert result.exit_code == 2 and "samples" in result.output
    with pytest.raises(ValueError, match="n_samples"):
        run_demo(tmp_path / "y", n_samples=3)
    with pytest.raises(ValueError, match="alpha"):
        run_demo(tmp_path / "y", n_samples=32, alpha=2.0)
