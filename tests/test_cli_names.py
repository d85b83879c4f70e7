"""The CLI's arguments say what they are: CONCEPTS is a concepts .npz (``label``, ``find``, ``--concepts``),
LABELS is LayerLabels JSON (``report``, ``audit``, ``find --labels``, ``label --out``); the old spellings
still work."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import random_concepts, write_cache

from crp_invert.cli import main

N, CHANNELS = 120, 4
NAMES = ["red", "round", "big"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A cache of one layer whose channels follow the concepts, the concepts .npz and the layer's labels."""
    concepts = random_concepts(N, len(NAMES), share=0.4, seed=0, names=NAMES)
    labels = concepts.dense().numpy()
    noise = np.random.default_rng(1).normal(size=(N, CHANNELS)) * 0.3
    acts = (labels[:, np.arange(CHANNELS) % len(NAMES)] + noise).astype(np.float32)
    folder = tmp_path_factory.mktemp("names")
    write_cache(folder / "cache.h5", {"conv": acts})
    concepts.save(folder / "concepts.npz")
    labeled = CliRunner().invoke(main, ["label", str(folder / "cache.h5"), str(folder / "concepts.npz"), "-L", "1",
                                        "-B", "1", "--min-support", "0", "--out", str(folder / "labels"), "-q"])
    assert labeled.exit_code == 0, labeled.output
    return folder


def _usage(command: str) -> str:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command, usage", [
    ("label", "label [OPTIONS] CACHE CONCEPTS..."),
    ("find", "find [OPTIONS] CACHE CONCEPTS FORMULA"),
    ("report", "report [OPTIONS] CACHE LABELS..."),
    ("audit", "audit [OPTIONS] CACHE LABELS..."),
])
def test_positional_arguments_are_named_by_what_they_hold(command, usage):
    """Each command's usage line calls a concepts file CONCEPTS and LayerLabels JSON LABELS."""
    assert usage in _usage(command)


@pytest.mark.parametrize("command, option", [
    ("label", "--out LABELS"), ("find", "--labels, --channel-labels LABELS"),
    ("report", "--concepts CONCEPTS"), ("audit", "--concepts CONCEPTS"),
])
def test_options_show_the_same_names(command, option):
    """Options that take a concepts file or label files show CONCEPTS / LABELS as their value."""
    assert option in _usage(command)


def test_a_wrong_concepts_file_is_called_concepts(files):
    """label's error for a concepts file that is no .npz names CONCEPTS, not LABELS."""
    wrong = files / "concepts.txt"
    wrong.write_text("x")
    result = CliRunner().invoke(main, ["label", str(files / "cache.h5"), str(wrong), "-q"])
    assert result.exit_code != 0 and "CONCEPTS" in result.output and "LABELS" not in result.output


def _find(files, tmp_path, name: str, *options: str) -> list[dict]:
    out = tmp_path / f"{name}.json"
    result = CliRunner().invoke(main, ["find", str(files / "cache.h5"), str(files / "concepts.npz"), "red",
                                       "--out", str(out), "-q", *options])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())["matches"]


def test_find_labels_and_the_old_channel_labels_read_the_same_files(files, tmp_path):
    """find --labels and the old --channel-labels show the same channel labels, and show some."""
    index = str(files / "labels" / "index.json")
    new = _find(files, tmp_path, "new", "--labels", index)
    old = _find(files, tmp_path, "old", "--channel-labels", index)
    assert new == old
    assert any(match["label"] for match in new)


def test_find_no_labels_and_the_old_no_channel_labels_both_leave_labels_out(files, tmp_path):
    """find --no-labels and the old --no-channel-labels both skip the labels found next to the cache."""
    shown = _find(files, tmp_path, "shown")
    new = _find(files, tmp_path, "new", "--no-labels")
    old = _find(files, tmp_path, "old", "--no-channel-labels")
    assert any(match["label"] for match in shown)
    assert new == old and all(match["label"] is None for match in new)
    assert [m["channel"] for m in new] == [m["channel"] for m in shown]
