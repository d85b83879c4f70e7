"""Write the tutorial notebooks (without outputs) from the cell sources below.

    python tutorials/make_notebooks.py

Edit the cells here, not in the .ipynb files, and rerun this script. tests/test_tutorials.py executes
the notebooks with nbclient.
"""
# ruff: noqa: E501 (long lines are notebook cell sources)
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
%matplotlib inline
import tempfile
import warnings
# ruff: noqa: E501 (long lines are notebook cell sources)
from pathlib import Path

import torch

torch.manual_seed(0)
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
# everything this notebook writes goes into a temporary folder
work = Path(tempfile.mkdtemp(prefix="crp-invert-tutorial-"))
device = "cuda" if torch.cuda.is_available() else "cpu"
print(work, device)'''

DEMO = '''\
from crp_invert.demo import ShapesDataset, load_demo_model

dataset = ShapesDataset(N_SAMPLES, seed=2)     # generated images, nothing is downloaded
concepts = dataset.concepts                     # ConceptLabels: one boolean column per attribute
model = load_demo_model(device)                 # the demo CNN with its committed weights
print(len(dataset), "images,", concepts.n_concepts, "concepts:", concepts.names)
print("layers:", model.layer_names)
print("classes:", dataset.class_names[:4], "...")'''

CRP_SETUP = '''\
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat

composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
attribution = CondAttribution(model, device=device)
layer_map = {name: ChannelConcept() for name in model.layer_names}'''


def tutorial_1():
    cells = [
        new_markdown_cell('''\
# 1. Label the channels of a model through CRP's FeatureVisualization

[INVERT](https://arxiv.org/abs/2311.13594) labels every channel of a layer with a *compositional
concept*: a formula over boolean concepts of the samples (`red AND circle`, `striped OR NOT large`)
whose samples the channel separates best from the rest, measured by the exact AUROC, with a
Mann-Whitney p-value.

If you already use [zennit-crp](https://github.com/rachtibat/zennit-crp), the labels come almost for free:
`InvertFeatureVisualization` is CRP's `FeatureVisualization` that, during the same `run` that finds the
ActMax / RelMax reference samples, also records the pooled activation (and the relevance) of every channel for
every sample into an HDF5 cache. `ConceptLabeler` then labels every channel from the cache.

This notebook runs on the embedded demo: generated images of colored shapes with their attributes as
concepts, and a small CNN trained to classify (shape, color) pairs. It takes well under a minute on a CPU.'''),
        new_code_cell(SETUP),
        new_code_cell("N_SAMPLES = 600  # use a few thousand for real statistics\n" + DEMO),
        new_markdown_cell('''\
## Run CRP's FeatureVisualization with recording

Same arguments as CRP's `FeatureVisualization`, plus `cache=`: where the pooled activations go. CRP writes its
own ActMax / RelMax files under `path=`.'''),
        new_code_cell(CRP_SETUP + '''

from crp_invert import InvertFeatureVisualization

fv = InvertFeatureVisualization(attribution, dataset, layer_map, path=str(work / "crp"),
                                cache=str(work / "activations.h5"), device=device)
files = fv.run(composite, 0, len(dataset), batch_size=100)
print("CRP wrote", {kind: len(paths) for kind, paths in files.items()}, "result files")'''),
        new_markdown_cell('''\
## Label every channel

`label_cache` streams each layer from the HDF5 file. `L` is the maximal formula length, `B` the beam width
(explanations kept per channel).'''),
        new_code_cell('''\
from crp_invert import ConceptLabeler

labeler = ConceptLabeler(concepts, device=device)
labels = labeler.label_cache(str(work / "activations.h5"), L=3, B=3, progress=False)
print(labels["conv3"].table(max_rows=8))'''),
        new_markdown_cell('''\
## Inspect an explanation and its p-values

Each channel has up to `B` explanations, best first. `p_value` is the one-sided Mann-Whitney p-value of the
formula; it ignores that the formula was *selected* among `n_candidates` formulas, so use
`p_value_bonferroni` (corrected within the channel) or `p_value_bh` (Benjamini-Hochberg over the channels of the
layer) to decide whether a label is significant.'''),
        new_code_cell('''\
channel = 0
for explanation in labels["conv3"][channel]:
    print(f"{str(explanation.formula):35s} AUC {explanation.auc:.3f}  fraction {explanation.fraction:.3f}  "
          f"p {explanation.p_value:.1e}  p_bonf {explanation.p_value_bonferroni:.1e}  q {explanation.p_value_bh:.1e}")
significant = sum(labels["conv3"].best(c).p_value_bh < 0.05 for c in range(len(labels["conv3"])))
print(f"{significant} of {len(labels['conv3'])} conv3 channels have q < 0.05")'''),
        new_markdown_cell('''\
The explanation figure: the channel's activations on the samples where the formula holds against the rest.'''),
        new_code_cell('''\
from crp_invert import ActivationCache
from crp_invert.plot import plot_explanation

with ActivationCache(work / "activations.h5") as cache:
    activations = cache.activations("conv3")
plot_explanation(activations, concepts, labels["conv3"].best(channel), feature=channel)'''),
        new_markdown_cell('''\
CRP's reference samples of the same channel (the most activating samples), next to samples of its label:'''),
        new_code_cell('''\
import matplotlib.pyplot as plt
import numpy as np

reference = fv.get_max_reference([channel], "conv3", mode="activation", r_range=(0, 6), plot_fn=None)[channel]
inside = np.flatnonzero(labels["conv3"].best(channel).formula.evaluate(concepts).numpy())[:6]
figure, axes = plt.subplots(2, 6, figsize=(8, 3))
for ax, image in zip(axes[0], reference):
    ax.imshow(image.permute(1, 2, 0).numpy()); ax.axis("off")
for ax, index in zip(axes[1], inside):
    ax.imshow(dataset[int(index)][0].permute(1, 2, 0).numpy()); ax.axis("off")
axes[0, 0].set_title("CRP ActMax", loc="left"); axes[1, 0].set_title(str(labels["conv3"].best(channel).formula), loc="left")
plt.show()'''),
        new_markdown_cell('''\
## Simplicity against precision: `min_fraction`

By default INVERT considers formulas that hold for at most `max_fraction = 0.5` of the samples and any number
above zero. A rare formula can be very precise (`dots AND large AND yellow`) but says little about the
channel in general. `min_fraction` removes formulas that hold for fewer samples: the labels get broader and
usually shorter, and their AUC drops a little. Pick it by looking at this trade-off.'''),
        new_code_cell('''\
rows = []
for min_fraction in (0.0, 0.05, 0.1, 0.2):
    result = labeler.label_cache(str(work / "activations.h5"), layers=["conv3"], L=3, B=1,
                                 min_fraction=min_fraction, progress=False)["conv3"]
    best = [result.best(c) for c in range(len(result)) if result.best(c) is not None]
    rows.append((min_fraction, np.mean([b.length for b in best]), np.median([b.auc for b in best]),
                 np.mean([b.fraction for b in best])))
print("min_fraction  mean length  median AUC  mean fraction")
for row in rows:
    print("{:12.2f}  {:11.2f}  {:10.3f}  {:13.3f}".format(*row))'''),
        new_markdown_cell('''\
## The planted truth

The demo's output neuron of class "red circle" should be explained by `circle AND red`: the classes are never
concepts, only their attributes are. With L = 2 the labels recover this exactly (with L = 3, subsets such as
`circle AND large AND red` may win, because the logits are largest for large shapes).'''),
        new_code_cell('''\
from crp_invert.demo import class_formulas, planted_truth_score, explanation_accuracy

logits = labeler.label_cache(str(work / "activations.h5"), layers=["linear2"], L=2, B=3, progress=False)["linear2"]
print("planted-truth score:", planted_truth_score(logits, class_formulas(), dataset.class_names))
print("accuracy of explanations:", explanation_accuracy(logits, concepts, dataset.targets))
for c in range(3):
    print(dataset.class_names[c], "->", logits.best(c).formula)'''),
        new_markdown_cell('''\
## Save the labels

JSON keeps everything (all `B` explanations with their statistics); CSV has one row per channel.'''),
        new_code_cell('''\
from crp_invert import LayerLabels

labels["conv3"].to_json(work / "conv3.json")
labels["conv3"].to_csv(work / "conv3.csv")
assert LayerLabels.from_json(work / "conv3.json") == labels["conv3"]
print((work / "conv3.csv").read_text().splitlines()[:3])'''),
        new_markdown_cell('''\
The same from the command line: `crp-invert label activations.h5 concepts.npz --out labels/` and
`crp-invert report activations.h5 labels/index.json --concepts concepts.npz --out report.html`; or everything
at once on the demo: `crp-invert demo --out demo/`.'''),
    ]
    return cells


def tutorial_2():
    return [
        new_markdown_cell('''\
# 2. Glocal explanations and circuits

A CRP heatmap says *where* the model looked; the INVERT labels of a layer's channels say *what* each channel
detects. `decompose` splits the heatmap of one prediction into the conditional heatmaps of the most relevant
channels of a layer, each with its label: a *glocal* explanation (global labels, local heatmaps). Circuits
connect labeled channels across layers.'''),
        new_code_cell(SETUP),
        new_code_cell("N_SAMPLES = 480\n" + DEMO),
        new_markdown_cell('''\
## Labels without CRP's reference samples

When you only need labels, `record_activations` records the pooled activations with plain forward hooks (pass
the composite so that the BatchNorms are merged as CRP sees them).'''),
        new_code_cell(CRP_SETUP + '''

from torch.utils.data import DataLoader
from crp_invert import ConceptLabeler, record_activations

record_activations(model, DataLoader(dataset, batch_size=120), layer_map, work / "activations.h5",
                   composite=composite, device=device, progress=False).close()
labels = ConceptLabeler(concepts, device=device).label_cache(str(work / "activations.h5"), L=3, B=3, progress=False)
{layer: str(labels[layer].best(0).formula) for layer in labels}'''),
        new_markdown_cell('''\
## Decompose one prediction

The conditional heatmaps of the `top_k` channels plus the rest add up to the class heatmap
(`completeness_error` is ~0).'''),
        new_code_cell('''\
from crp_invert import decompose
from crp_invert.plot import plot_glocal

image, target = dataset[0]
sample = image.unsqueeze(0).to(device)
glocal = decompose(attribution, sample, target, "conv3", composite, labels=labels, top_k=5)
print(dataset.class_names[target], "| channels", glocal.channels.tolist(), "| labels", glocal.label_strings())
print("completeness error:", glocal.completeness_error())
plot_glocal(glocal.to("cpu"), image=image, class_name=dataset.class_names[target])'''),
        new_markdown_cell('''\
`decompose_batch` does the same for several samples with batched passes.'''),
        new_code_cell('''\
from crp_invert import decompose_batch

images, targets = dataset.tensors(range(4))
for g in decompose_batch(attribution, images.to(device), targets.tolist(), "conv3", composite, labels=labels, top_k=3):
    print(f"{dataset.class_names[g.target]:16s}", [f"{c}:{s}" for c, s in zip(g.channels.tolist(), g.label_strings())])'''),
        new_markdown_cell('''\
## Circuits

* `circuit_by_weight`: the channels of the layer feeding a linear layer with the largest weights to a class
  (the paper's ResNet fc circuit);
* `circuit_by_relevance`: the channels with the largest mean relevance for a class over many samples;
* `concept_circuit`: CRP's `AttributionGraph` from one labeled channel down to the labeled sub-concepts of
  earlier layers.'''),
        new_code_cell('''\
from crp_invert import circuit_by_weight
from crp_invert.plot import plot_circuit

circuit = circuit_by_weight("linear2", target, k=5, labels=labels["linear1"], model=model,
                            source_layer="linear1", target_name=dataset.class_names[target])
plot_circuit(circuit)'''),
        new_code_cell('''\
from crp_invert import channel_relevances, circuit_by_relevance

subset = (dataset.targets == target).nonzero().flatten()[:20]
relevance = channel_relevances(attribution, dataset.tensors(subset)[0].to(device), target, "conv3", composite)
circuit = circuit_by_relevance(relevance, target, k=5, labels=labels["conv3"], layer="conv3",
                               target_name=dataset.class_names[target])
plot_circuit(circuit)'''),
        new_code_cell('''\
from crp_invert import concept_circuit

top = int(glocal.channels[0])
circuit = concept_circuit(attribution, sample, composite, "conv3", top, layers=["conv1", "conv2", "conv3"],
                          labels=labels, width=(3, 2))
print(circuit.to_json()[:300], "...")
plot_circuit(circuit)'''),
    ]


def tutorial_3():
    return [
        new_markdown_cell('''\
# 3. Bring your own data: class targets and a hierarchy, the INVERT HDF5 format, a GPU

INVERT needs two things: activations `[N, F]` (one row per sample, one column per channel) and boolean
concepts `[N, K]` of the same samples. This notebook shows the usual ways to get both for your own model and
data. It runs on the embedded demo; the cells in *italics* below say what changes for ImageNet.'''),
        new_code_cell(SETUP),
        new_code_cell("N_SAMPLES = 480\n" + DEMO),
        new_markdown_cell('''\
## Concepts from class targets and a class hierarchy

With ImageNet the concepts are usually the 1000 classes plus their WordNet parents ("dog", "vehicle", ...):
a parent holds for a sample when any of its descendants does. `ConceptLabels.from_targets` builds exactly
this from integer targets, the class names and a `{parent: [children]}` mapping (children may be classes or
other parents). The labels are stored sparsely, so 1000 classes and a few thousand parents are cheap.

Here the demo's 16 (shape, color) classes play the role of the ImageNet classes, with a small hand-made
hierarchy.'''),
        new_code_cell('''\
from crp_invert import ConceptLabels
from crp_invert.demo import COLORS, SHAPES

hierarchy = {f"{color} thing": [f"{color} {shape}" for shape in SHAPES] for color in COLORS}
hierarchy.update({"round thing": [f"{c} {s}" for c in COLORS for s in ("circle", "ring")],
                  "warm thing": ["red thing", "yellow thing"]})     # parents of parents are fine
class_concepts = ConceptLabels.from_targets(dataset.targets, dataset.class_names, hierarchy=hierarchy)
print(class_concepts.n_concepts, "concepts:", class_concepts.names[-6:])
print("'warm thing' holds for", int(class_concepts.mask("warm thing").sum()), "of", class_concepts.n_samples)'''),
        new_markdown_cell('''\
*For ImageNet*, build the hierarchy from WordNet, e.g. with `nltk` (not needed by crp-invert):

```python
from nltk.corpus import wordnet as wn
synsets = [wn.synset_from_pos_and_offset("n", int(wnid[1:])) for wnid in wnids]   # the 1000 class wnids
hierarchy = {}
for wnid, synset in zip(class_names, synsets):
    for path in synset.hypernym_paths():
        for parent, child in zip(path[:-1], path[1:]):
            hierarchy.setdefault(parent.name(), set()).add(child.name() if child != synset else wnid)
concepts = ConceptLabels.from_targets(targets, class_names, hierarchy=hierarchy)
```'''),
        new_markdown_cell('''\
## Activations in the INVERT HDF5 format

The INVERT release stores the activations of a layer as one HDF5 dataset `Y` of shape `[N, D]` (float32). Write
it batch by batch with `FlatActivationWriter` (or any tool that writes HDF5), then label it with
`label_h5`, which reads it in column batches, so `N x D` need not fit in memory.'''),
        new_code_cell('''\
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
print(labels.table(max_rows=6))'''),
        new_markdown_cell('''\
The same from the shell: `crp-invert label linear1.h5 concepts.npz --dataset Y --out linear1.json`
(`concepts.npz` from `class_concepts.save(...)`).

## On a GPU

Pass `device="cuda"` to the model, to CRP's `CondAttribution` and to `ConceptLabeler`: the AUROCs and the beam
search run on the GPU. `feature_batch_size` bounds the GPU memory (channels searched together).'''),
        new_code_cell('''\
labeler = ConceptLabeler(class_concepts, device=device)   # "cuda" when available
labels = labeler.label_h5(work / "linear1.h5", L=3, B=3, feature_batch_size=16, progress=False)
print(device, "->", labels.best(0).formula, round(labels.best(0).auc, 3))'''),
        new_markdown_cell('''\
*For VGG16 / ResNet50 on ImageNet* (torchvision weights; nothing here downloads them):

```python
from torchvision.models import vgg16_bn, VGG16_BN_Weights
from zennit.torchvision import VGGCanonizer      # ResNetCanonizer for ResNets
model = vgg16_bn(weights=VGG16_BN_Weights.IMAGENET1K_V1).eval().to("cuda")
composite = EpsilonPlusFlat(canonizers=[VGGCanonizer()])
attribution = CondAttribution(model, device="cuda")
layer_map = {name: ChannelConcept() for name in ["features.40", "classifier.0"]}   # or all conv layers
fv = InvertFeatureVisualization(attribution, imagenet_val, layer_map, path="crp", cache="imagenet.h5",
                                preprocess_fn=normalize, device="cuda")
fv.run(composite, 0, len(imagenet_val), batch_size=64)        # resumable: fv.resume(...)
labels = ConceptLabeler(concepts, device="cuda").label_cache("imagenet.h5", L=3, B=3)
```'''),
        new_markdown_cell('''\
## Scaling out: several GPUs, several nodes (torchrun)

For a large dataset or layer, run the same code under `torchrun`: recording splits the *samples* across
processes (each writes its own HDF5 shard; rank 0 combines CRP's ActMax/RelMax results and writes an index
`acts.h5` of virtual datasets over the shards), labeling splits the *channels* (each process reads only its
columns). Results equal one process: the cache bitwise, the labels to the last bit of every AUC.

```python
# record.py
from crp_invert.parallel.group import distributed_session, local_device
from crp_invert.parallel.recording import run_sharded

with distributed_session():                       # reads torchrun's environment; no-op without torchrun
    device = local_device("cuda")                 # cuda:LOCAL_RANK, one GPU per process
    model = model.to(device).eval()
    fv = InvertFeatureVisualization(CondAttribution(model), dataset, layer_map,
                                    path="fv", cache="acts.h5", device=device)
    run_sharded(fv, composite, 0, len(dataset), batch_size=64)
```

```bash
# one node with 8 GPUs
torchrun --standalone --nproc_per_node=8 record.py
torchrun --standalone --nproc_per_node=8 -m crp_invert label acts.h5 concepts.npz --device cuda --out labels/

# 4 nodes with 8 GPUs each: the same command on every node (a shared filesystem for acts.h5 and fv/)
torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 \\
         --rdzv-id=invert record.py
```

A killed rank loses only the unfinished rows of its shard: launch the same command again to resume. Peak
memory per process is about 0.5 GB + the concept labels + `feature_batch_size` x N x 90 bytes (B = 3).'''),
    ]


CLEANUP = [
    new_markdown_cell("Delete the temporary folder (skip this cell to keep the files)."),
    new_code_cell("import shutil\n\nshutil.rmtree(work)"),
]


def write(name: str, cells) -> Path:
    notebook = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(notebook)
    path = HERE / name
    nbformat.write(notebook, path)
    return path


def main() -> None:
    for name, cells in (("01_label_channels.ipynb", tutorial_1()), ("02_glocal_and_circuits.ipynb", tutorial_2()),
                        ("03_bring_your_own_data.ipynb", tutorial_3())):
        cells = cells + CLEANUP
        print("wrote", write(name, cells))


if __name__ == "__main__":
    main()
