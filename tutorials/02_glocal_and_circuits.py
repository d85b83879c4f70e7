# %% [markdown]
# # 2. Glocal explanations and circuits
#
# A CRP heatmap says *where* the model looked; the INVERT labels of a layer's channels say *what* each channel
# detects. `decompose` splits the heatmap of one prediction into the conditional heatmaps of the most relevant
# channels of a layer, each with its label: a *glocal* explanation (global labels, local heatmaps). Circuits
# connect labeled channels across layers.

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
N_SAMPLES = 480
from crp_invert.demo import ShapesDataset, load_demo_model

dataset = ShapesDataset(N_SAMPLES, seed=2)     # generated images, nothing is downloaded
concepts = dataset.concepts                     # ConceptLabels: one boolean column per attribute
model = load_demo_model(device)                 # the demo CNN with its committed weights
print(len(dataset), "images,", concepts.n_concepts, "concepts:", concepts.names)
print("layers:", model.layer_names)
print("classes:", dataset.class_names[:4], "...")

# %% [markdown]
# ## Labels without CRP's reference samples
#
# When you only need labels, `record_activations` records the pooled activations with plain forward hooks (pass
# the composite so that the BatchNorms are merged as CRP sees them).

# %%
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat

composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
attribution = CondAttribution(model, device=device)
layer_map = {name: ChannelConcept() for name in model.layer_names}

from torch.utils.data import DataLoader

from crp_invert import ConceptLabeler, record_activations

record_activations(model, DataLoader(dataset, batch_size=120), layer_map, work / "activations.h5",
                   composite=composite, device=device, progress=False).close()
labels = ConceptLabeler(concepts, device=device).label_cache(str(work / "activations.h5"), L=3, B=3, progress=False)
{layer: str(labels[layer].best(0).formula) for layer in labels}

# %% [markdown]
# ## Decompose one prediction
#
# The conditional heatmaps of the `top_k` channels plus the rest add up to the class heatmap
# (`completeness_error` is ~0). In the figure: the input, the heatmap of the class, then one heatmap per channel,
# most relevant first, titled with the channel, its label, the label's AUC and the channel's share `R` of the
# class relevance; the last panel is the rest (all other channels). Red is positive relevance, blue negative.

# %%
from crp_invert import decompose
from crp_invert.plot import plot_glocal

image, target = dataset[0]
sample = image.unsqueeze(0).to(device)
glocal = decompose(attribution, sample, target, "conv3", composite, labels=labels, top_k=5)
print(dataset.class_names[target], "| channels", glocal.channels.tolist(), "| labels", glocal.label_strings())
print("completeness error:", glocal.completeness_error())
plot_glocal(glocal.to("cpu"), image=image, class_name=dataset.class_names[target])

# %% [markdown]
# In Jupyter a decomposition shows as a table of its parts: channel, share of the class relevance, relevance and
# label.

# %%
glocal

# %% [markdown]
# `decompose_batch` does the same for several samples with batched passes.

# %%
from crp_invert import decompose_batch

images, targets = dataset.tensors(range(4))
for g in decompose_batch(attribution, images.to(device), targets.tolist(), "conv3", composite, labels=labels, top_k=3):
    print(f"{dataset.class_names[g.target]:16s}", [f"{c}:{s}" for c, s in zip(g.channels.tolist(), g.label_strings())])

# %% [markdown]
# ## Circuits
#
# * `circuit_by_weight`: the channels of the layer feeding a linear layer with the largest weights to a class
#   (the paper's ResNet fc circuit);
# * `circuit_by_relevance`: the channels with the largest mean relevance for a class over many samples;
# * `concept_circuit`: CRP's `AttributionGraph` from one labeled channel down to the labeled sub-concepts of
#   earlier layers.
#
# Each figure draws the labeled channels as boxes (layer:channel, label, AUC) and the connections as lines whose
# width grows with the absolute weight or relevance (red positive, blue negative).

# %%
from crp_invert import circuit_by_weight
from crp_invert.plot import plot_circuit

circuit = circuit_by_weight("linear2", target, k=5, labels=labels["linear1"], model=model,
                            source_layer="linear1", target_name=dataset.class_names[target])
plot_circuit(circuit)

# %%
from crp_invert import channel_relevances, circuit_by_relevance

subset = (dataset.targets == target).nonzero().flatten()[:20]
relevance = channel_relevances(attribution, dataset.tensors(subset)[0].to(device), target, "conv3", composite)
circuit = circuit_by_relevance(relevance, target, k=5, labels=labels["conv3"], layer="conv3",
                               target_name=dataset.class_names[target])
plot_circuit(circuit)

# %%
from crp_invert import concept_circuit

top = int(glocal.channels[0])
circuit = concept_circuit(attribution, sample, composite, "conv3", top, layers=["conv1", "conv2", "conv3"],
                          labels=labels, width=(3, 2))
print(circuit.to_json()[:300], "...")
plot_circuit(circuit)

# %% [markdown]
# Delete the temporary folder (skip this cell to keep the files).

# %%
import shutil

shutil.rmtree(work)
