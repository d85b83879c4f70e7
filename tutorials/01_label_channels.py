# %% [markdown]
# # 1. Label the channels of a model through CRP's FeatureVisualization
#
# [INVERT](https://arxiv.org/abs/2311.13594) labels every channel of a layer with a *compositional
# concept*: a formula over boolean concepts of the samples (`red AND circle`, `striped OR NOT large`)
# whose samples the channel separates best from the rest, measured by the exact AUROC, with a
# Mann-Whitney p-value.
#
# If you already use [zennit-crp](https://github.com/rachtibat/zennit-crp), the labels come almost for free:
# `InvertFeatureVisualization` is CRP's `FeatureVisualization` that, during the same `run` that finds the
# ActMax / RelMax reference samples, also records the pooled activation (and the relevance) of every channel for
# every sample into an HDF5 cache. `ConceptLabeler` then labels every channel from the cache.
#
# This notebook runs on the embedded demo: generated images of colored shapes with their attributes as
# concepts, and a small CNN trained to classify (shape, color) pairs. It takes well under a minute on a CPU.

# %%
# %matplotlib inline
import tempfile
import warnings
from pathlib import Path

import torch

torch.manual_seed(0)
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
# everything this notebook writes goes into a temporary folder
work = Path(tempfile.mkdtemp(prefix="crp-invert-tutorial-"))
device = "cuda" if torch.cuda.is_available() else "cpu"
print("device:", device)

# %%
N_SAMPLES = 600  # use a few thousand for real statistics
from crp_invert.demo import ShapesDataset, load_demo_model

dataset = ShapesDataset(N_SAMPLES, seed=2)     # generated images, nothing is downloaded
concepts = dataset.concepts                     # ConceptLabels: one boolean column per attribute
model = load_demo_model(device)                 # the demo CNN with its committed weights
print(len(dataset), "images,", concepts.n_concepts, "concepts:", concepts.names)
print("layers:", model.layer_names)
print("classes:", dataset.class_names[:4], "...")

# %% [markdown]
# ## Run CRP's FeatureVisualization with recording
#
# Same arguments as CRP's `FeatureVisualization`, plus `activation_cache=`: where the pooled activations go. CRP writes its
# own ActMax / RelMax files under `path=`.

# %%
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat

composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
attribution = CondAttribution(model, device=device)
layer_map = {name: ChannelConcept() for name in model.layer_names}

from crp_invert import InvertFeatureVisualization

fv = InvertFeatureVisualization(attribution, dataset, layer_map, path=str(work / "crp"),
                                activation_cache=str(work / "activations.h5"), device=device, progress=False)
files = fv.run(composite, 0, len(dataset), batch_size=100)
print("CRP wrote", {kind: len(paths) for kind, paths in files.items()}, "result files")

# %% [markdown]
# ## Label every channel
#
# `label_cache` streams each layer from the HDF5 file. `L` is the maximal formula length, `B` the beam width
# (explanations kept per channel).

# %%
from crp_invert import ConceptLabeler

labeler = ConceptLabeler(concepts, device=device)
labels = labeler.label_cache(str(work / "activations.h5"), L=3, B=3, progress=False)
labels["conv3"]  # a table in Jupyter; print(labels["conv3"].table()) gives the same as text

# %% [markdown]
# One row per channel: its best formula, the AUC with which the channel's activation separates the samples where
# the formula holds from the others (1 is perfect, 0.5 is chance), the fraction of samples where it holds, and
# its p-values.

# %% [markdown]
# ## Inspect an explanation and its p-values
#
# Each channel has up to `B` explanations, best first. `p_value` is the one-sided Mann-Whitney p-value of the
# formula; it ignores that the formula was *selected* among `n_candidates` formulas, so use
# `p_value_bonferroni` (corrected within the channel) or `p_value_bh` (Benjamini-Hochberg over the channels of the
# layer) to decide whether a label is significant.

# %%
channel = 0
for explanation in labels["conv3"][channel]:
    print(f"{str(explanation.formula):35s} AUC {explanation.auc:.3f}  fraction {explanation.fraction:.3f}  "
          f"p {explanation.p_value:.1e}  p_bonf {explanation.p_value_bonferroni:.1e}  q {explanation.p_value_bh:.1e}")
significant = sum(labels["conv3"].best(c).p_value_bh < 0.05 for c in range(len(labels["conv3"])))
print(f"{significant} of {len(labels['conv3'])} conv3 channels have q < 0.05")

# %% [markdown]
# The explanation figure: the distribution of the channel's activations on the samples where the formula holds
# (inside) against the rest (outside). The AUC is the probability that a random sample inside activates the
# channel more than a random sample outside; the less the two densities overlap, the closer it is to 1.

# %%
from crp_invert import ActivationCache
from crp_invert.plot import plot_explanation

with ActivationCache(work / "activations.h5") as cache:
    activations = cache.activations("conv3")
plot_explanation(activations, concepts, labels["conv3"].best(channel), feature=channel)

# %% [markdown]
# CRP's reference samples of the same channel (the most activating samples, top row), next to samples where its
# label holds (bottom row): the label names what the reference samples have in common.

# %%
import matplotlib.pyplot as plt
import numpy as np

label = labels["conv3"].best(channel).formula
reference = fv.get_max_reference([channel], "conv3", mode="activation", r_range=(0, 6), plot_fn=None)[channel]
inside = np.flatnonzero(label.evaluate(concepts).numpy())[:6]
figure, axes = plt.subplots(2, 6, figsize=(8, 3))
for ax, image in zip(axes[0], reference):
    ax.imshow(image.permute(1, 2, 0).numpy())
for ax, index in zip(axes[1], inside):
    ax.imshow(dataset[int(index)][0].permute(1, 2, 0).numpy())
for ax in axes.flat:
    ax.axis("off")
axes[0, 0].set_title("CRP ActMax", loc="left")
axes[1, 0].set_title(str(label), loc="left")
plt.show()

# %% [markdown]
# ## Simplicity against precision: `min_fraction`
#
# By default INVERT considers formulas that hold for at most `max_fraction = 0.5` of the samples and any number
# above zero. A rare formula can be very precise (`dots AND large AND yellow`) but says little about the
# channel in general. `min_fraction` removes formulas that hold for fewer samples: the labels get broader and
# usually shorter, and their AUC drops a little. Pick it by looking at this trade-off.

# %%
rows = []
for min_fraction in (0.0, 0.05, 0.1, 0.2):
    result = labeler.label_cache(str(work / "activations.h5"), layers=["conv3"], L=3, B=1,
                                 min_fraction=min_fraction, progress=False)["conv3"]
    best = [result.best(c) for c in range(len(result)) if result.best(c) is not None]
    rows.append((min_fraction, np.mean([b.length for b in best]), np.median([b.auc for b in best]),
                 np.mean([b.fraction for b in best])))
print("min_fraction  mean length  median AUC  mean fraction")
for row in rows:
    print("{:12.2f}  {:11.2f}  {:10.3f}  {:13.3f}".format(*row))

# %% [markdown]
# ## The planted truth
#
# The demo's output neuron of class "red circle" should be explained by `circle AND red`: the classes are never
# concepts, only their attributes are. With L = 2 the labels recover this exactly (with L = 3, subsets such as
# `circle AND large AND red` may win, because the logits are largest for large shapes).

# %%
from crp_invert.demo import class_formulas, explanation_accuracy, planted_truth_score

logits = labeler.label_cache(str(work / "activations.h5"), layers=["linear2"], L=2, B=3, progress=False)["linear2"]
print("planted-truth score:", planted_truth_score(logits, class_formulas(), dataset.class_names))
print("accuracy of explanations:", explanation_accuracy(logits, concepts, dataset.targets))
for c in range(3):
    print(dataset.class_names[c], "->", logits.best(c).formula)

# %% [markdown]
# ## Save the labels
#
# JSON keeps everything (all `B` explanations with their statistics); CSV has one row per channel.

# %%
from crp_invert import LayerLabels

labels["conv3"].to_json(work / "conv3.json")
labels["conv3"].to_csv(work / "conv3.csv")
assert LayerLabels.from_json(work / "conv3.json") == labels["conv3"]
print("\n".join((work / "conv3.csv").read_text().splitlines()[:3]))

# %% [markdown]
# The same from the command line: `crp-invert label activations.h5 concepts.npz --out labels/` and
# `crp-invert report activations.h5 labels/index.json --concepts concepts.npz --out report.html`; or everything
# at once on the demo: `crp-invert demo --out demo/`.

# %% [markdown]
# Delete the temporary folder (skip this cell to keep the files).

# %%
import shutil

shutil.rmtree(work)
