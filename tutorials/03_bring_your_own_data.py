# %% [markdown]
# # 3. Bring your own data: class targets and a hierarchy, the INVERT HDF5 format, a GPU
#
# INVERT needs two things: activations `[N, F]` (one row per sample, one column per channel) and boolean
# concepts `[N, K]` of the same samples. This notebook shows the usual ways to get both for your own model and
# data. It runs on the embedded demo; the cells in *italics* below say what changes for ImageNet.

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
# ## Concepts from class targets and a class hierarchy
#
# With ImageNet the concepts are usually the 1000 classes plus their WordNet parents ("dog", "vehicle", ...):
# a parent holds for a sample when any of its descendants does. `ConceptLabels.from_targets` builds exactly
# this from integer targets, the class names and a `{parent: [children]}` mapping (children may be classes or
# other parents). The labels are stored sparsely, so 1000 classes and a few thousand parents are cheap.
#
# Here the demo's 16 (shape, color) classes play the role of the ImageNet classes, with a small hand-made
# hierarchy.

# %%
from crp_invert import ConceptLabels
from crp_invert.demo import COLORS, SHAPES

hierarchy = {f"{color} thing": [f"{color} {shape}" for shape in SHAPES] for color in COLORS}
hierarchy.update({"round thing": [f"{c} {s}" for c in COLORS for s in ("circle", "ring")],
                  "warm thing": ["red thing", "yellow thing"]})     # parents of parents are fine
class_concepts = ConceptLabels.from_targets(dataset.targets, dataset.class_names, hierarchy=hierarchy)
print(class_concepts.n_concepts, "concepts:", class_concepts.names[-6:])
print("'warm thing' holds for", int(class_concepts.mask("warm thing").sum()), "of", class_concepts.n_samples)

# %% [markdown]
# *For ImageNet*, build the hierarchy from WordNet, e.g. with `nltk` (not needed by crp-invert):
#
# ```python
# from nltk.corpus import wordnet as wn
# synsets = [wn.synset_from_pos_and_offset("n", int(wnid[1:])) for wnid in wnids]   # the 1000 class wnids
# hierarchy = {}
# for wnid, synset in zip(class_names, synsets):
#     for path in synset.hypernym_paths():
#         for parent, child in zip(path[:-1], path[1:]):
#             hierarchy.setdefault(parent.name(), set()).add(child.name() if child != synset else wnid)
# concepts = ConceptLabels.from_targets(targets, class_names, hierarchy=hierarchy)
# ```

# %% [markdown]
# ## Activations in the INVERT HDF5 format
#
# The INVERT release stores the activations of a layer as one HDF5 dataset `Y` of shape `[N, D]` (float32). Write
# it batch by batch with `FlatActivationWriter` (or any tool that writes HDF5), then label it with
# `label_h5`, which reads it in column batches, so `N x D` need not fit in memory.

# %%
from torch.utils.data import DataLoader

from crp_invert import ConceptLabeler, FlatActivationWriter

features = {}
hook = model.linear1.register_forward_hook(lambda module, inputs, output: features.__setitem__("x", output))
try:
    with FlatActivationWriter(work / "linear1.h5", dataset="Y") as writer, torch.no_grad():
        for images, _ in DataLoader(dataset, batch_size=120):
            model(images.to(device))
            writer.append(features["x"].cpu())
finally:
    hook.remove()

labeler = ConceptLabeler(class_concepts, device=device)
labels = labeler.label_h5(work / "linear1.h5", dataset="Y", L=2, B=2, progress=False)
labels  # a table in Jupyter (the first 20 channels); labels.table() for text

# %% [markdown]
# The same from the shell: `crp-invert label linear1.h5 concepts.npz --dataset Y --out linear1.json`
# (`concepts.npz` from `class_concepts.save(...)`).
#
# ## On a GPU
#
# Pass `device="cuda"` to the model, to CRP's `CondAttribution` and to `ConceptLabeler`: the AUROCs and the beam
# search run on the GPU. `feature_batch_size` bounds the GPU memory (channels searched together).

# %%
labeler = ConceptLabeler(class_concepts, device=device)   # "cuda" when available
labels = labeler.label_h5(work / "linear1.h5", L=3, B=3, feature_batch_size=16, progress=False)
print(device, "->", labels.best(0).formula, round(labels.best(0).auc, 3))

# %% [markdown]
# *For VGG16 / ResNet50 on ImageNet* (torchvision weights; nothing here downloads them):
#
# ```python
# from torchvision.models import vgg16_bn, VGG16_BN_Weights
# from zennit.torchvision import VGGCanonizer      # ResNetCanonizer for ResNets
# model = vgg16_bn(weights=VGG16_BN_Weights.IMAGENET1K_V1).eval().to("cuda")
# composite = EpsilonPlusFlat(canonizers=[VGGCanonizer()])
# attribution = CondAttribution(model, device="cuda")
# layer_map = {name: ChannelConcept() for name in ["features.40", "classifier.0"]}   # or all conv layers
# fv = InvertFeatureVisualization(attribution, imagenet_val, layer_map, path="crp", activation_cache="imagenet.h5",
#                                 preprocess_fn=normalize, device="cuda")
# fv.run(composite, 0, len(imagenet_val), batch_size=64)        # resumable: fv.resume(...)
# labels = ConceptLabeler(concepts, device="cuda").label_cache("imagenet.h5", L=3, B=3)
# ```

# %% [markdown]
# ## Scaling out: several GPUs, several nodes (torchrun)
#
# For a large dataset or layer, run the same code under `torchrun`: recording splits the *samples* across
# processes (each writes its own HDF5 shard; rank 0 combines CRP's ActMax/RelMax results and writes an index
# `acts.h5` of virtual datasets over the shards), labeling splits the *channels* (each process reads only its
# columns). Results equal one process: the cache bitwise, the labels to the last bit of every AUC.
#
# ```python
# # record.py
# from crp_invert.parallel.group import distributed_session, local_device
# from crp_invert.parallel.recording import run_sharded
#
# with distributed_session():                       # reads torchrun's environment; no-op without torchrun
#     device = local_device("cuda")                 # cuda:LOCAL_RANK, one GPU per process
#     model = model.to(device).eval()
#     fv = InvertFeatureVisualization(CondAttribution(model), dataset, layer_map,
#                                     path="fv", activation_cache="acts.h5", device=device)
#     run_sharded(fv, composite, 0, len(dataset), batch_size=64)
# ```
#
# ```bash
# # one node with 8 GPUs
# torchrun --standalone --nproc_per_node=8 record.py
# torchrun --standalone --nproc_per_node=8 -m crp_invert label acts.h5 concepts.npz --device cuda --out labels/
#
# # 4 nodes with 8 GPUs each: the same command on every node (a shared filesystem for acts.h5 and fv/)
# torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 \
#          --rdzv-id=invert record.py
# ```
#
# A killed rank loses only the unfinished rows of its shard: launch the same command again to resume. Peak
# memory per process is about 0.5 GB + the concept labels + `feature_batch_size` x N x 8 bytes (float32) + a working memory.

# %% [markdown]
# Delete the temporary folder (skip this cell to keep the files).

# %%
import shutil

shutil.rmtree(work)
