"""The ``crp-invert`` command line: ``label`` on small caches, in-process (CliRunner) and as ``python -m``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import random_concepts, write_cache

from crp_invert import FlatActivationWriter
from crp_invert.cli import LAZY_COMMANDS, main

N = 48


def random_cache(path, n=N, seed=0):
    """A cache of two layers ("features.4" with 5 channels, "head.fc" with 3) of random activations and
    relevances; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, c in [("features.4", 5), ("head.fc", 3)]:
        arrays[name] = (rng.normal(size=(n, c)).astype(np.float32), rng.normal(size=(n, c)).astype(np.float32))
    write_cache(path, arrays)
    return arrays


def concepts(n=N, k=4, seed=1):
    """Random concepts of the CLI tests: k concepts, each on about 35 % of the samples."""
    return random_concepts(n, k, share=0.35, seed=seed)


@pytest.fixture
def files(tmp_path):
    arrays = random_cache(tmp_path / "acts.h5")
    labels = concepts()
    np.savez(tmp_path / "dense.npz", labels=labels.dense().numpy(), names=np.array(labels.names))
    labels.save(tmp_path / "sparse.npz")
    return tmp_path, arrays, labels


def expected_labels(labels, array, layer, **kwargs):
    from crp_invert import ConceptLabeler

    return ConceptLabeler(labels).label(torch.from_numpy(array), layer=layer, progress=False, **kwargs)


def test_help_lists_label():
    """crp-invert --help succeeds and lists the label command."""
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "label" in result.output
    assert isinstance(LAZY_COMMANDS, dict)


@pytest.mark.parametrize("command", ["record", "decompose", "find", "audit", "report", "demo"])
def test_every_documented_command_is_registered(command):
    """Every subcommand the docs use (record and decompose were once lost in a merge) answers --help."""
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f" {command} [OPTIONS]" in result.output


@pytest.mark.parametrize("labels_file", ["dense.npz", "sparse.npz"])
@pytest.mark.parametrize("source", ["activation", "relevance"])
def test_label_one_layer(files, labels_file, source):
    """label --layer writes the library's labels for dense and sparse concept files, activations or relevances."""
    from crp_invert.core.labels import LayerLabels

    tmp_path, arrays, labels = files
    out = tmp_path / f"out-{source}.json"
    result = CliRunner().invoke(
        main,
        [
            "label",
            str(tmp_path / "acts.h5"),
            str(tmp_path / labels_file),
            "--layer",
            "features.4",
            "--source",
            source,
            "-L",
            "2",
            "-B",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "features.4" in result.output
    got = LayerLabels.from_json(out)
    array = arrays["features.4"][0 if source == "activation" else 1]
    assert got == expected_labels(labels, array, "features.4", L=2, B=2)


def test_label_all_layers_into_folder(files):
    """label without --layer writes one file per layer (the library's labels) and an index into a folder."""
    from crp_invert.core.labels import LayerLabels

    tmp_path, arrays, labels = files
    result = CliRunner().invoke(
        main,
        [
            "label",
            str(tmp_path / "acts.h5"),
            str(tmp_path / "sparse.npz"),
            "-L",
            "1",
            "-B",
            "1",
            "--out",
            str(tmp_path / "labels"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "labels" / "index.json").read_text())
    assert list(index) == ["features.4", "head.fc"]
    for name, filename in index.items():
        assert LayerLabels.from_json(tmp_path / "labels" / filename) == expected_labels(
            labels, arrays[name][0], name, L=1, B=1
        )


def test_label_reference_pair(files):
    """label reads the reference's one-hot .pt and description .json pair and writes the library's labels."""
    from crp_invert.core.labels import LayerLabels

    tmp_path, arrays, labels = files
    torch.save(labels.dense().to(torch.float32), tmp_path / "onehot.pt")
    (tmp_path / "desc.json").write_text(
        json.dumps(
            {str(i): {"name": name, "description": f"the {name}"} for i, name in enumerate(labels.names)}
        )
    )
    result = CliRunner().invoke(
        main,
        [
            "label",
            str(tmp_path / "acts.h5"),
            str(tmp_path / "onehot.pt"),
            str(tmp_path / "desc.json"),
            "--layer",
            "head.fc",
            "-L",
            "2",
            "-B",
            "2",
            "--out",
            str(tmp_path / "ref.json"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert LayerLabels.from_json(tmp_path / "ref.json") == expected_labels(
        labels, arrays["head.fc"][0], "head.fc", L=2, B=2
    )


def test_label_flat_file(files):
    """label reads a flat activation file written in two appends and writes the library's labels."""
    from crp_invert.core.labels import LayerLabels

    tmp_path, arrays, labels = files
    flat = np.random.default_rng(5).normal(size=(N, 2, 3)).astype(np.float32)
    with FlatActivationWriter(tmp_path / "y.h5") as writer:
        writer.append(flat[:20])
        writer.append(torch.from_numpy(flat[20:]))
    result = CliRunner().invoke(
        main,
        [
            "label",
            str(tmp_path / "y.h5"),
            str(tmp_path / "dense.npz"),
            "-L",
            "2",
            "-B",
            "2",
            "--out",
            str(tmp_path / "y.json"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert LayerLabels.from_json(tmp_path / "y.json") == expected_labels(
        labels, flat.reshape(N, -1), "Y", L=2, B=2
    )


def test_bad_input_gives_clear_errors(files):
    """Bad layers, concept files and caches end with a non-zero exit and a message naming the problem, no traceback."""
    tmp_path, _, labels = files
    runner = CliRunner()
    cache, npz = str(tmp_path / "acts.h5"), str(tmp_path / "dense.npz")

    result = runner.invoke(main, ["label", cache, npz, "--layer", "conv9", "-q"])
    assert result.exit_code != 0 and "conv9" in result.output and "features.4" in result.output

    np.savez(tmp_path / "short.npz", labels=labels.dense().numpy()[:-3], names=np.array(labels.names))
    result = runner.invoke(main, ["label", cache, str(tmp_path / "short.npz"), "-q"])
    assert result.exit_code != 0 and f"N={N - 3}" in result.output

    np.savez(tmp_path / "names.npz", labels=labels.dense().numpy(), names=np.array(labels.names[:-1]))
    result = runner.invoke(main, ["label", cache, str(tmp_path / "names.npz"), "-q"])
    assert result.exit_code != 0 and "Error" in result.output

    np.savez(tmp_path / "flat.npz", labels=labels.dense().numpy().reshape(-1), names=np.array(labels.names))
    result = runner.invoke(main, ["label", cache, str(tmp_path / "flat.npz"), "-q"])
    assert result.exit_code != 0 and "Error" in result.output and "Traceback" not in result.output

    (tmp_path / "text.h5").write_text("hello")
    result = runner.invoke(main, ["label", str(tmp_path / "text.h5"), npz, "-q"])
    assert result.exit_code != 0 and "not an HDF5 file" in result.output

    raw = (tmp_path / "acts.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 3])
    result = runner.invoke(main, ["label", str(tmp_path / "cut.h5"), npz, "-q"])
    assert result.exit_code != 0 and "truncated" in result.output

    result = runner.invoke(main, ["label", cache, str(tmp_path / "text.h5"), "-q"])
    assert result.exit_code != 0 and ".npz" in result.output


@pytest.mark.slow  # two fresh interpreters importing torch
def test_python_dash_m(files):
    """python -m crp_invert label writes the library's labels, and a missing file fails without a traceback."""
    from crp_invert.core.labels import LayerLabels

    tmp_path, arrays, labels = files
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "crp_invert",
            "label",
            str(tmp_path / "acts.h5"),
            str(tmp_path / "dense.npz"),
            "--layer",
            "features.4",
            "-L",
            "2",
            "-B",
            "2",
            "--out",
            str(tmp_path / "m.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "features.4" in proc.stdout
    assert LayerLabels.from_json(tmp_path / "m.json") == expected_labels(
        labels, arrays["features.4"][0], "features.4", L=2, B=2
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "crp_invert",
            "label",
            str(tmp_path / "acts.h5"),
            str(tmp_path / "dense.npz"),
            "--layer",
            "nope",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode != 0 and "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_decompose_lines_say_why_no_label_is_shown():
    """crp-invert decompose prints a part's title text ("no reliable label holds here"), not "-", where a
    labeled unit shows no label; "-" only when no labels were given."""
    from crp_invert.integration.evidence import ChannelEvidence
    from crp_invert.integration.glocal import GlocalExplanation
    from crp_invert.model_commands import part_lines

    maps = torch.zeros(2, 4, 4)
    evidence = tuple(ChannelEvidence(channel=c, activation=0.0, percentile=50.0, n_reference=80, label_holds=holds)
                     for c, holds in ((3, False), (5, None)))
    part = GlocalExplanation(layer="encoder", target=0, heatmap=maps.sum(0), channels=torch.tensor([3, 5]),
                             channel_heatmaps=maps, relevance=torch.tensor([0.6, 0.4]),
                             share=torch.tensor([0.6, 0.4]), labels=(None, None), rest_heatmap=torch.zeros(4, 4),
                             channel_relevance=torch.tensor([0.0, 0.0, 0.0, 0.6, 0.0, 0.4]),
                             prediction=torch.zeros(2), evidence=evidence)
    assert part_lines(part, labeled=True) == ["unit     3  share +0.600  no reliable label holds here",
                                              "unit     5  share +0.400  no reliable label"]
    assert part_lines(part, labeled=False) == ["unit     3  share +0.600  -", "unit     5  share +0.400  -"]
