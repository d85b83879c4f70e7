# %% [markdown]
# # 5. Vision transformers: label ViT units, decompose a prediction, Gödel circuits (paper section 5.3)
#
# The INVERT paper labels the feature-extractor units of ViT B/16 and L/16 (the class-token representation that
# the classification head reads) and builds fuzzy-logic circuits from labeled units (section 5.3): `unit_a AND
# unit_b` with the Gödel t-norm (`min`) detects a composite concept that no single unit was labeled with.
#
# This notebook does all of it on a *tiny* torchvision `VisionTransformer` (32 x 32 images, patches of 8,
# 2 layers, 32 hidden units) on the demo shapes:
#
# 1. declare where a layer's units are (`[B, T, D]`: tokens, units last) and how the tokens are reduced;
# 2. record activations and relevances with CRP's `FeatureVisualization` (gradient x input: zennit's
#    composites do not run on torchvision's ViT) and label the units;
# 3. measure how much of the logit the relevances conserve, and decompose a prediction into unit heatmaps;
# 4. build a Gödel circuit over the units of two concepts and score it on their composite.
#
# **Random weights.** Training this ViT on the demo shapes did not reach 5 epochs in 10 minutes on the 2
# shared CPU cores this notebook is built on (the target was under a minute), so the ViT keeps its random
# initialization (with a random head: torchvision initializes the head to zero). Random ViT features still
# respond to colours and textures, which is enough to show every step; with a trained ViT the labels become
# meaningful and the circuits sharper, as in the paper.

# %%
# %matplotlib inline
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision

torch.manual_seed(0)
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
work = Path(tempfile.mkdtemp(prefix="crp-invert-tutorial-"))

from crp_invert.demo import ShapesDataset

dataset = ShapesDataset(240, seed=2)
concepts = dataset.concepts
vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                           mlp_dim=64, num_classes=len(dataset.class_names))
torch.nn.init.normal_(vit.heads.head.weight, std=0.3)
vit.eval()
print(len(dataset), "images;", concepts.n_concepts, "concepts")

# %% [markdown]
# ## Unit layouts: which axis holds the units
#
# A ViT block returns `[B, T, D]`: 17 tokens (16 patches and the class token) of 32 hidden units. The units
# that get labels are on the *last* axis. crp-invert refuses to guess: a 3-D output without a declared layout
# is refused with the choices, so the tokens are never recorded as "channels" by accident.

# %%
from crp_invert.integration.hooks import record_activations

loader = torch.utils.data.DataLoader(dataset, batch_size=48)
try:
    record_activations(vit, loader, ["encoder.layers.encoder_layer_1"], work / "refused.h5", progress=False)
except ValueError as error:
    print(error)

# %% [markdown]
# `vit_layouts` names the blocks (units reduced over the tokens by their mean here) and the feature
# extractor `encoder` reduced to its class token: exactly the vector `heads` classifies, what the paper labels.
# `TokenConcept` is CRP's `Concept` for units on the last axis (CRP's reference sampling and conditional
# masks then act on the units, not on the tokens).

# %%
from crp_invert.integration.vit import GradientTimesInput, vit_layer_map, vit_layouts

layouts = vit_layouts(vit, blocks="tokens:mean", features="tokens:cls")
print(layouts)

# %% [markdown]
# ## Record activations and relevances, label the units
#
# `GradientTimesInput` is CRP's `CondAttribution` with relevance = activation x gradient (the backward pass
# starts from 1 at the target logit); it needs no composite (`None`). zennit 0.4.6's LRP composites fail on
# torchvision's `MultiheadAttention`, so this is what runs; it is *not* LRP: attention, GELU, LayerNorm and the
# biases are differentiated, not given conservative rules.

# %%
from crp_invert import ActivationCache, ConceptLabeler
from crp_invert.integration.feature_visualization import InvertFeatureVisualization

fv = InvertFeatureVisualization(GradientTimesInput(vit), dataset, vit_layer_map(layouts), path=str(work / "crp"),
                                layouts=layouts, progress=False)
fv.run(None, 0, len(dataset), batch_size=48, checkpoint=240)
cache = ActivationCache(work / "crp" / "activations.h5")
for layer in cache.layers:
    info = cache.info(layer)
    print(f"{layer:32s} {cache.n_channels(layer)} units, layout {info['layout']}, reduced by {info['pooling']}")

# %%
labeler = ConceptLabeler(concepts, device="cpu")
labels = labeler.label_cache(cache, layers=["encoder"], L=1, B=1, progress=False)["encoder"]
print(labels.table(max_rows=12))

# %%
relevance_labels = labeler.label_cache(cache, layers=["encoder"], source="relevance", L=1, B=1,
                                       progress=False)["encoder"]
print(relevance_labels.table(max_rows=6))

# %% [markdown]
# ## Conservation, and a prediction decomposed into unit heatmaps
#
# How much of the target logit do the relevances keep? For the feature extractor all of it minus the head's
# bias (the head is linear); at the input, gradient x input of a ViT does not add up to the logit.

# %%
from crp_invert.integration.vit import conservation

images, targets = dataset.tensors(range(16))
sums = conservation(GradientTimesInput(vit), images, targets.tolist(), ["encoder"])
print("logit              ", sums["output"][:6].numpy().round(3))
print("relevance (encoder)", sums["layer:encoder"][:6].numpy().round(3))
print("heatmap sum (input)", sums["input"][:6].numpy().round(3))
ratio = (sums["input"] / sums["output"]).abs()
print(f"|input / logit| over 16 images: median {ratio.median():.3f}, min {ratio.min():.3f}, max {ratio.max():.3f}")

# %%
from crp_invert.integration.glocal import Evidence
from crp_invert.integration.vit import decompose_units
from crp_invert.plot import plot_glocal

parts = decompose_units(GradientTimesInput(vit), images[:1], None, "encoder", None, labels=labels, top_k=4,
                        evidence=Evidence(cache, concepts=concepts, sample_index=0))
part = parts[0]
print("class:", dataset.class_names[part.target], "| completeness error:", f"{part.completeness_error():.2e}")
figure = plot_glocal(part, images[0], class_name=dataset.class_names[part.target])

# %% [markdown]
# ## Gödel circuits over labeled units (section 5.3)
#
# Take the unit with the best atomic label for each of two concepts, combine their truth degrees (standardized
# activation through a sigmoid) with the Gödel AND (`min`), and score the circuit by its AUC on the composite
# concept `a AND b`, which no unit was labeled with (the labels above have length 1).

# %%
from crp_invert.fuzzy import Fuzzifier, FuzzyCircuit, best_neurons

activations = cache.activations("encoder").double()
best_unit = {}
for unit in range(len(labels)):
    beam = labels[unit]  # the unit's explanations, best first (here one: B=1)
    if beam and beam[0].formula.kind == "concept" and beam[0].auc > best_unit.get(beam[0].formula.name, (0, 0.0))[1]:
        best_unit[beam[0].formula.name] = (unit, beam[0].auc)
masks = {name: concepts.mask(name) for name in best_unit}
pairs = sorted(((a, b) for a in best_unit for b in best_unit
                if a < b and 10 <= int((masks[a] & masks[b]).sum()) <= len(dataset) - 10),
               key=lambda pair: -(best_unit[pair[0]][1] + best_unit[pair[1]][1]))
memberships = Fuzzifier().fit(activations)(activations)
for a, b in pairs[:3]:
    composite = masks[a] & masks[b]
    circuit = FuzzyCircuit(f"n{best_unit[a][0]} AND n{best_unit[b][0]}", logic="goedel")
    single = best_neurons(activations, composite[:, None], names=[f"{a} AND {b}"])[0]
    print(f"{a} AND {b}: circuit {circuit} AUC {circuit.score(memberships, composite):.3f}; "
          f"best single unit n{single.neuron} AUC {single.auc:.3f}; "
          f"unit a alone {best_unit[a][1]:.3f} on {a}, unit b alone {best_unit[b][1]:.3f} on {b}")

# %% [markdown]
# The same works from the command line (a Python file gives the model and the dataset):
#
# ```bash
# crp-invert record vit.h5 --model vit_spec.py:model --data vit_spec.py:data \
#     --layer encoder --layout encoder=tokens:cls --relevances gradient-x-input
# crp-invert label vit.h5 concepts.npz --source relevance --out labels/
# crp-invert find vit.h5 concepts.npz "red AND circle" --layer encoder
# ```

# %%
cache.close()
