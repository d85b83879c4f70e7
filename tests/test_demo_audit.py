"""The demo's planted Clever-Hans artifact, found by the audit of a full demo run (issue 14).

The run uses the demo's defaults (2,000 images, seed 2, 48 artifact images), without channel cards, so that
the numbers are those documented in crp_invert/demo/pipeline.py and the README.
"""

import json

import numpy as np
import pytest
import torch
from test_report import parse

from crp_invert.audit import Audit, audit
from crp_invert.demo.data import ARTIFACT, ARTIFACT_CLASS, CLASS_NAMES, AuditDataset, ShapesDataset, class_concepts
from crp_invert.demo.model import load_demo_model
from crp_invert.demo.pipeline import (
    AUDIT_FALSE_FLAGS,
    AUDIT_LAYER,
    AUDIT_MIN_SHARE,
    DEFAULT_SAMPLES,
    run_demo,
)
from crp_invert.report import load_labels

SEED = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-audit")
    summary = run_demo(out, n_samples=DEFAULT_SAMPLES, seed=SEED, max_channels=0, n_glocal=1, progress=False)
    return out, summary


def test_the_artifact_channel_is_ranked_first_for_its_class(demo):
    out, summary = demo
    result = Audit.from_json(out / "audit.json")
    assert result.layer == AUDIT_LAYER and result.artifacts == (ARTIFACT,)
    first = result[ARTIFACT_CLASS].channels[0]
    assert first.flag == "artifact" and ARTIFACT in first.label
    assert summary.artifact_rank == 1 and summary.artifact_channel.startswith(f"{AUDIT_LAYER}:{first.channel} ")


def test_false_flags_in_the_other_classes_are_the_documented_count(demo):
    out, summary = demo
    result = Audit.from_json(out / "audit.json")
    false = {name: channels for name, channels in result.flagged(AUDIT_MIN_SHARE).items() if name != ARTIFACT_CLASS}
    count = sum(len(channels) for channels in false.values())
    assert count == summary.false_flags == AUDIT_FALSE_FLAGS, {
        name: [(c.channel, round(c.share, 3), c.flag, c.label) for c in channels] for name, channels in false.items()}


def test_the_flagged_channel_detects_the_mark(demo):
    """Ground truth without labels: stamping the mark on the same images raises the flagged channel's pooled
    activation on (almost) every image, by more than half a standard deviation, more than for all but at most one
    other channel of the layer (conv3:11, another channel the magenta mark drives)."""
    out, _ = demo
    channel = Audit.from_json(out / "audit.json")[ARTIFACT_CLASS].channels[0].channel
    model = load_demo_model()
    clean = ShapesDataset(400, seed=11, artifact_rates=None).tensors()[0]
    marked = ShapesDataset(400, seed=11, artifact_rates=(1, 1)).tensors()[0]
    pooled = []
    batch_norm = dict(model.named_children())["bn" + AUDIT_LAYER[-1]]  # conv + BatchNorm: what CRP records
    handle = batch_norm.register_forward_hook(lambda module, inputs, output: pooled.append(output.mean((2, 3))))
    try:
        with torch.no_grad():
            model(clean)
            model(marked)
    finally:
        handle.remove()
    without, with_mark = (values.numpy() for values in pooled)
    increase = with_mark - without
    effect = increase.mean(0) / without.std(0)
    assert (increase[:, channel] > 0).mean() >= 0.99
    assert effect[channel] > 0.5
    assert (effect > effect[channel]).sum() <= 1, (channel, np.argsort(-effect)[:4], np.sort(effect)[::-1][:4])


def test_audit_json_equals_the_audit_of_the_cache(demo):
    out, _ = demo
    dataset = AuditDataset(DEFAULT_SAMPLES, seed=SEED)
    labels = load_labels([out / "labels" / "index.json"])
    again = audit(str(out / "activations.h5"), labels, AUDIT_LAYER, CLASS_NAMES, targets=dataset.targets,
                  artifacts=[ARTIFACT], class_concepts=class_concepts(), concepts=dataset.concepts,
                  min_share=AUDIT_MIN_SHARE, samples=np.arange(dataset.n_base))
    assert again == Audit.from_json(out / "audit.json")


def test_relevance_labels_lose_the_large_confound(demo):
    """At L = 3 the activation labels of some logits are subsets such as `circle AND large AND red`; the labels
    of the logits' relevances (source="relevance") are exactly `shape AND color`."""
    out, summary = demo
    assert summary.planted_truth_score_l3_relevance == 1.0
    assert summary.planted_truth_score_l3 < 1.0
    text = (out / "report.html").read_text()
    assert 'source=&quot;relevance&quot;' in text and 'source=&quot;activation&quot;' in text
    assert "planted truth 1.000 with relevance" in text


def test_report_shows_the_audit_and_both_labels(demo):
    out, summary = demo
    text = (out / "report.html").read_text()
    assert text.count('<table class="sortable sources searchable"') == 5
    first_row = text.split('<table class="audit"', 1)[1].split(f"<td>{ARTIFACT_CLASS}</td>", 1)[1].split("</tr>")[0]
    assert '<td class="flag">artifact</td>' in first_row
    assert '<input type="search" id="channel-search"' in text
    assert list(parse(text).tables) == ["conv1", "conv2", "conv3", "linear1", "linear2"]
    written = json.loads((out / "summary.json").read_text())
    assert written["artifact_rank"] == 1 and written["false_flags"] == AUDIT_FALSE_FLAGS
    assert sum(written["labels_differ"].values()) == sum(summary.labels_differ.values()) > 0
