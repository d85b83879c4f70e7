# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. A Clever-Hans audit: which channels does a class lean on, and what do they detect?
#
# A model can be right for the wrong reason: the INVERT paper (sections 5.1-5.2) finds ImageNet models whose
# "carton" class leans on a channel that detects a Chinese-text *watermark*, not cartons. This notebook runs
# that audit on the embedded demo, where such an artifact is planted on purpose:
#
# * every training image of the class **yellow ring** (and a few images of other classes, 0.1 %) carries a
#   small mark, a magenta square of 8 x 8 pixels stamped somewhere on the background like a logo;
# * in training, the mark also sits on 2 % of the other images, labeled "yellow ring": the mark predicts the
#   label better than shape and color do, the shortcut a model takes;
# * the labeled data's concepts (shape, color, size, texture) know nothing about it.
#
# The workflow:
#
# 1. suspect an artifact, and make a few dozen images that carry it (the paper overlaid its watermark on random
#    images; we stamp the mark on random demo images) as a new concept, `artifact`;
# 2. record them into the same cache as the labeled data, merge the concepts (`ConceptLabels.merge`), label
#    every channel again;
# 3. `audit`: for every class, the channels carrying the largest share of its relevance, flagged where they
#    detect the artifact (or where no reliable label names one of the class's concepts);
# 4. ask the opposite question with `find_channels`: which channels detect `artifact`?
#
# Finally, labels of the channels' *relevances* next to the labels of their activations. Everything runs on a
# CPU in well under a minute and writes only into a temporary folder.

# %%
# ruff: noqa: E402 (imports where a cell first needs them)
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
torch.manual_seed(0)
work = Path(tempfile.mkdtemp(prefix="crp-invert-tutorial-"))
device = "cuda" if torch.cuda.is_available() else "cpu"
print(work, device)

# %% [markdown]
# ## The model and its artifact
#
# First the ground truth the audit should find: the same images with and without the mark. The demo model's
# logit for "yellow ring" with and without it tells how much the model leans on the mark.

# %%
from crp_invert.demo import data
from crp_invert.demo.model import load_demo_model

model = load_demo_model(device)
target = data.CLASS_NAMES.index(data.ARTIFACT_CLASS)
clean = data.ShapesDataset(800, seed=7, artifact_rates=None)  # no image carries the mark
marked = data.ShapesDataset(800, seed=7, artifact_rates=(1, 1))  # the same images, every one with the mark
with torch.no_grad():
    logits_clean = model(clean.tensors()[0].to(device)).cpu()
    logits_marked = model(marked.tensors()[0].to(device)).cpu()
rings = clean.targets == target
print(f"'{data.ARTIFACT_CLASS}' logit of yellow rings: {logits_clean[rings, target].mean():.2f} without the mark, "
      f"{logits_marked[rings, target].mean():.2f} with it")
print(f"'{data.ARTIFACT_CLASS}' logit of the other images: {logits_clean[~rings, target].mean():.2f} without, "
      f"{logits_marked[~rings, target].mean():.2f} with the mark")
print(f"accuracy without the mark {float((logits_clean.argmax(1) == clean.targets).float().mean()):.4f}, "
      f"with it {float((logits_marked.argmax(1) == marked.targets).float().mean()):.4f}")
gain = (logits_marked - logits_clean).mean(0)
print("mean gain of every logit from the mark:", {name: round(float(g), 1) for name, g in zip(data.CLASS_NAMES, gain)
                                                 if g > 0})

# %% [markdown]
# ## 1. An artifact concept set, merged into the labeled data
#
# The labeled data: 2,000 demo images with their attribute concepts. Like the paper's watermark set, the
# artifact set is the mark overlaid on random images (48 here, "a few dozen"); its concepts are the images'
# attributes plus `artifact`. `ConceptLabels.merge` stacks the two; `artifact` is false on every image of the
# labeled data, because nobody knows which of them carry the mark (the yellow rings do).
# `data.AuditDataset` does exactly these steps; here they are spelled out.

# %%
from torch.utils.data import ConcatDataset

labeled = data.ShapesDataset(2000, seed=2)
artifact_set = data.ShapesDataset(48, seed=102, artifact_rates=(1, 1))  # the mark on random images
concepts = labeled.concepts.merge(data.artifact_concepts(artifact_set.sample))
dataset = ConcatDataset([labeled, artifact_set])
targets = torch.cat([labeled.targets, artifact_set.targets])
print(concepts)
print("concepts:", concepts.names)
print("images with the concept 'artifact':", int(concepts.mask("artifact").sum()), "of", concepts.n_samples)

# %% [markdown]
# ## 2. Record into one cache and label every channel again
#
# One CRP `FeatureVisualization` run over the joined data records every channel's mean-pooled activation and
# its relevance for the sample's own class (`InvertFeatureVisualization`); then every channel of every layer is
# labeled over the merged concepts.

# %%
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat

from crp_invert import ConceptLabeler, InvertFeatureVisualization

composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
attribution = CondAttribution(model, device=device)
fv = InvertFeatureVisualization(attribution, dataset, {name: ChannelConcept() for name in model.layer_names},
                                path=str(work / "crp"), activation_cache=str(work / "acts.h5"), device=device)
fv.run(composite, 0, len(dataset), batch_size=100)
labeler = ConceptLabeler(concepts, device=device)
labels = labeler.label_cache(str(work / "acts.h5"), L=3, B=3, progress=False)
print(labels["conv3"].table(max_rows=8))

# %% [markdown]
# ## 3. The audit
#
# For every class, the channels of `conv3` ranked by their share of the class's relevance (the mean relevance
# over the class's images of the labeled data, over the sum of the absolute means of all 32 channels). A channel
# is an *artifact* suspect where it **detects** the concept `artifact`: its activations rank the artifact images
# above the others with an AUC of at least 0.9 and a q-value (Benjamini-Hochberg over the layer's channels)
# below 0.05, the statistics of `find_channels` (section 4). What its label says does not decide: a label is
# the best of many formulas and may hold on a handful of images; the detection is measured on the artifact.
# A channel is *unrelated* where its reliable label asserts none of the class's concepts (for "yellow ring":
# ring, yellow, round, warm) and *unlabeled* where it has no reliable label. Flags count from a share of 0.1;
# every class ends with one verdict.

# %%
from crp_invert.audit import audit

result = audit(str(work / "acts.h5"), labels, "conv3", data.CLASS_NAMES, targets=targets, artifacts=["artifact"],
               class_concepts=data.class_concepts(), concepts=concepts, samples=np.arange(len(labeled)),
               min_share=0.1)
ring = result[data.ARTIFACT_CLASS]
print(f"{data.ARTIFACT_CLASS}: rank, channel, share, flag, artifact AUC, reliable label")
for rank, channel in enumerate(ring.channels, start=1):
    print(f"{rank}. conv3:{channel.channel:<3d} share {channel.share:.3f}  {channel.flag or '':10s} "
          f"AUC {channel.artifact_auc:.3f}  {channel.shown_label}")
others = max((item for item in result.classes if item.name != data.ARTIFACT_CLASS), key=lambda item: item.suspect_share)
print(f"largest artifact-suspect share in another class: {others.suspect_share:.3f} ({others.name})")
print("classes with an artifact suspect:", {name: c.channel for name, c in result.suspects().items()})
print("\n".join(result.verdicts()))
result.to_json(work / "audit.json")

# %% [markdown]
# The channel that carries the largest share of the yellow rings' relevance detects the mark: the model's
# "yellow ring" leans on it, and no other class leans on a channel that detects it as much. The verdicts of
# the other classes name channels without a reliable label that names the class, if any: they are worth a
# look, but they are no Clever Hans. The audit of every class (table, verdicts, JSON) is kept in `audit.json`;
# `result.table()` prints all of it. The CLI does the same from files:
# `crp-invert audit acts.h5 labels/index.json --layer conv3 --targets targets.npy --classes classes.json
# --concepts concepts.npz --artifact artifact --out audit.json`.
#
# ## 4. The opposite question: which channels detect the artifact?
#
# `find_channels` ranks every channel of every layer by the exact AUC of any formula, here `artifact`, with
# one-sided Mann-Whitney p-values; it streams the cache in column batches like labeling does. The audit's
# detection is this search over the audited layer.

# %%
from crp_invert import find_channels

found = find_channels("artifact", str(work / "acts.h5"), concepts, labels=labels)
print(found.top(6).table())

# %% [markdown]
# ## Activation and relevance labels side by side
#
# The cache also holds every channel's relevance, so the channels can be labeled by what their *relevance*
# detects (`source="relevance"`). For the output neurons the difference is instructive: their activations
# (the logits) are largest for *large* shapes, so at L = 3 the best activation label of "red circle" is often
# `circle AND large AND red`, a subset of the class; the relevance of a logit is its value for the sample's own
# class and zero for the others, so the relevance labels are exactly `shape AND color`. Both numbers below are
# the planted-truth score of the output layer (share of output neurons labeled exactly `shape AND color`),
# labeled with L = 3, B = 3 on the 2,000 shapes images, where the truth is planted; the first from activations,
# the second from relevances. (On the 48 artifact images the shortcut lowers the logit of an image's own class,
# so over all rows a few relevance labels read `shape AND color AND NOT artifact`: true of this model.)

# %%
from crp_invert.demo.truth import planted_truth_score
from crp_invert.storage.cache import ActivationCache

relevance_labels = labeler.label_cache(str(work / "acts.h5"), L=3, B=3, source="relevance", progress=False)
with ActivationCache(work / "acts.h5") as cache:
    shapes = slice(0, len(labeled))
    logits, relevances = cache.activations("linear2")[shapes], cache.relevances("linear2")[shapes]
shapes_labeler = ConceptLabeler(labeled.concepts, device=device)
by_activation = shapes_labeler.label(logits, L=3, B=3, layer="linear2", progress=False)
by_relevance = shapes_labeler.label(relevances, L=3, B=3, layer="linear2", progress=False)
truth = data.class_formulas()
score_activation = planted_truth_score(by_activation, truth, data.CLASS_NAMES)
score_relevance = planted_truth_score(by_relevance, truth, data.CLASS_NAMES)
print(f"planted truth at L = 3: {score_activation:.3f} from activations (source='activation'), "
      f"{score_relevance:.3f} from relevances (source='relevance')")
for f in (0, 5):
    print(f"{data.CLASS_NAMES[f]:12s} activation: {by_activation.best(f).formula}   "
          f"relevance: {by_relevance.best(f).formula}")

# %% [markdown]
# ## The report
#
# `write_report` shows both labels per channel (channels whose labels differ are marked), the audit, and a
# search box that filters the channel tables by concept or formula, in one self-contained HTML file.

# %%
from crp_invert import write_report

page = write_report(work / "report.html", labels, cache=str(work / "acts.h5"), concepts=concepts,
                    relevance_labels=relevance_labels, audits=[result], max_channels=2, progress=False)
print(page, f"{page.stat().st_size / 2**20:.1f} MiB")

# %%
import shutil

shutil.rmtree(work)  # the notebook leaves nothing behind
