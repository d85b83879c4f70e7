"""Benchmark: glocal decomposition on the shared FashionMNIST model (layer linear1, top_k = 8).

Reports the time per sample of ``decompose_batch`` (several batch sizes) and of ``decompose`` one
sample at a time, against the naive way (one CondAttribution call per channel), and the largest
completeness errors:

- ``top_k + rest``: ``|sum(top-k channel heatmaps) + rest - class heatmap| / |class heatmap|``
- ``all channels``: the same with all 120 channel heatmaps of linear1 and no rest (linear1 is a
  bottleneck: all relevance passes it).

It also times ``decompose_batch`` with evidence (``Evidence``: the percentile of each part's activation
among the 5,000 validation activations of linear1 and whether its label holds), against the same call
without it.

``--torchvision`` times, on torchvision models with random weights (no download) at ``--size`` pixels:
decomposition of a container layer (top_k = 8, with its completeness error), ``concept_circuit`` on
container names, and how long reading the model's graph takes, ours (one pass over the traced graph) and,
with ``--crp-trace``, CRP's ``trace_model_graph`` (about a minute on DenseNet121).

Usage::

    python benchmarks/bench_glocal.py [--samples 100] [--top-k 8] [--device cpu] [--figure out.png]
    python benchmarks/bench_glocal.py --torchvision [--size 64] [--crp-trace]

The model and data come from ``benchmarks/fashion_mnist.py`` (the nn.Module re-created from the shared
folder's README). Exits 0 with a message when the shared data folder is missing.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from fashion_mnist import CLASSES, HIERARCHY, data_dir, load


def label_layer(model, images, targets, layer, device):
    """Label ``layer`` with the classes (and their parent groups) as concepts, on the activations of all val
    images: (activations [N, C], concepts, LayerLabels)."""
    from crp_invert import ConceptLabeler, ConceptLabels

    acts = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda mod, inp, out: acts.__setitem__("a", out.detach()))
    try:
        with torch.no_grad():
            model(images.to(device))
    finally:
        handle.remove()
    concepts = ConceptLabels.from_targets(targets.numpy(), CLASSES, hierarchy=HIERARCHY)
    labels = ConceptLabeler(concepts).label(acts["a"].cpu(), L=2, B=1, layer=layer, progress=False)
    return acts["a"].cpu(), concepts, labels


def timed(fn, repeat=1):
    best = float("inf")
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


TORCHVISION = {
    # model: (container layer decomposed, circuit layers: lower first, the last one decomposed)
    "vgg11_bn": ("features", ("features.18", "features")),
    "resnet18": ("layer4", ("layer2", "layer3", "layer4")),
    "mobilenet_v2": ("features.16", ("features.15", "features.16")),
    "densenet121": ("features.denseblock4", ("features.transition3", "features.denseblock4")),
}


def torchvision_composite(name, model):
    from zennit.canonizers import NamedMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer, SequentialMergeBatchNorm, VGGCanonizer

    if name == "densenet121":  # SequentialMergeBatchNorm fails on DenseNets: merge the sequential pairs only
        pairs = [(("features.conv0",), "features.norm0")] + [
            ((f"{n}.conv1",), f"{n}.norm2") for n, m in model.named_modules() if type(m).__name__ == "_DenseLayer"]
        return EpsilonPlusFlat(canonizers=[NamedMergeBatchNorm(pairs)])
    canonizer = {"vgg11_bn": VGGCanonizer, "resnet18": ResNetCanonizer}.get(name, SequentialMergeBatchNorm)
    return EpsilonPlusFlat(canonizers=[canonizer()])


def bench_model(name, container, circuit_layers, args):
    """One row of the torchvision table."""
    import warnings

    import torchvision
    from crp.attribution import CondAttribution
    from crp.graph import trace_model_graph

    from crp_invert import concept_circuit, decompose
    from crp_invert.integration.circuits import _trace_operations

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    attribution = CondAttribution(model)
    composite = torchvision_composite(name, model)
    sample = torch.randn(1, 3, args.size, args.size, generator=generator)
    seconds, g = timed(lambda: decompose(attribution, sample, 3, container, composite, top_k=8), args.repeat)
    width = (3,) * (len(circuit_layers) - 1)
    circuit_seconds, _ = timed(lambda: concept_circuit(attribution, sample, composite, circuit_layers[-1],
                                                       int(g.channels[0]), circuit_layers, width=width, target=3),
                               args.repeat)
    ours, _ = timed(lambda: _trace_operations(model, sample), args.repeat)
    crp_text = "-"
    if args.crp_trace:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            crp, _ = timed(lambda: trace_model_graph(model, sample, []), 1)
        crp_text = f"{crp:.2f}"
    return (f"| {name} | {container} | {seconds:.2f} | {g.completeness_error():.1e} | {', '.join(circuit_layers)} "
            f"| {circuit_seconds:.2f} | {ours:.2f} | {crp_text} |")


def bench_torchvision(args):
    print(f"torchvision models, random weights (weights=None, 10 classes, random batch norm statistics), "
          f"one {args.size}x{args.size} sample, target 3, EpsilonPlusFlat + the model's canonizer")
    print("| model | layer | decompose top_k=8 (s) | completeness | circuit layers | concept_circuit (s) "
          "| graph: ours (s) | graph: CRP trace_model_graph (s) |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for name, (container, circuit_layers) in TORCHVISION.items():
        print(bench_model(name, container, circuit_layers, args), flush=True)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} at the end, best of {args.repeat}")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--all-channel-samples", type=int, default=20,
                        help="samples for the all-channels completeness check (120 heatmaps each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 threads under load "
                             "made the small passes up to 40x slower); 0 keeps torch's default")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs per timing")
    parser.add_argument("--figure", default=None, help="save a labeled glocal figure of one sample here")
    parser.add_argument("--torchvision", action="store_true", help="time torchvision models instead")
    parser.add_argument("--size", type=int, default=64, help="input size of the torchvision models")
    parser.add_argument("--crp-trace", action="store_true", help="also time CRP's trace_model_graph")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.torchvision:
        return bench_torchvision(args)
    path = Path(os.environ["CRP_INVERT_FMNIST"]) if "CRP_INVERT_FMNIST" in os.environ else data_dir()
    if path is None or not (path / "model_state.pt").is_file():
        print(f"shared FashionMNIST data folder is missing ({path or 'shared/data/fashion-mnist-crp'}): "
              f"nothing to benchmark")
        return 0

    from crp.attribution import CondAttribution
    from zennit.composites import EpsilonPlus
    from zennit.torchvision import SequentialMergeBatchNorm

    from crp_invert import decompose
    from crp_invert.integration.glocal import decompose_batch

    device = torch.device(args.device)
    model, images, targets = load(path)
    model.to(device)
    targets = torch.from_numpy(targets)
    with torch.no_grad():
        accuracy = (model(images.to(device)).argmax(1).cpu() == targets).float().mean().item()
    x = images[:args.samples].to(device)
    y = targets[:args.samples].tolist()

    attribution = CondAttribution(model)
    composite = EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])
    layer, top_k, n = "linear1", args.top_k, len(x)

    rows = []
    for batch_size in (32, 64, 128):
        def run(batch_size=batch_size):
            return decompose_batch(attribution, x, y, layer, composite, top_k=top_k, batch_size=batch_size)

        seconds, results = timed(run, args.repeat)
        errors = [g.completeness_error() for g in results]
        rows.append((f"decompose_batch, batch_size={batch_size}", seconds / n, max(errors)))
    seconds, results = timed(lambda: [decompose(attribution, x[i:i + 1], y[i], layer, composite, top_k=top_k)
                                      for i in range(n)], args.repeat)
    rows.append(("decompose, one sample per call", seconds / n, max(g.completeness_error() for g in results)))

    # evidence: percentile among the val activations of linear1 and the class labels' formulas
    from crp_invert import Evidence

    reference, concepts, class_labels = label_layer(model, images, targets, layer, device)
    evidence = Evidence(reference, concepts=concepts, sample_index=list(range(n)))
    plain, _ = timed(lambda: decompose_batch(attribution, x, y, layer, composite, labels=class_labels, top_k=top_k,
                                             batch_size=64), args.repeat)
    seconds, with_evidence = timed(lambda: decompose_batch(attribution, x, y, layer, composite, labels=class_labels,
                                                           top_k=top_k, batch_size=64, evidence=evidence),
                                   args.repeat)
    unexplained = sum(len(g.unexplained()) for g in with_evidence)
    rows.append(("decompose_batch, batch_size=64, labels, without evidence", plain / n, float("nan")))
    rows.append((f"the same with evidence (percentile among {len(images)} val activations, label check; "
                 f"{unexplained} of {n * top_k} parts unexplained)", seconds / n, float("nan")))

    # naive: one CondAttribution call per top channel (what a user would write without batching)
    n_naive = min(n, 25)

    def naive():
        for i, g in enumerate(results[:n_naive]):
            for c in g.channels.tolist():
                attribution(x[i:i + 1].clone().requires_grad_(True), [{"y": [y[i]], layer: [c]}], composite)
    seconds, _ = timed(naive, args.repeat)
    rows.append((f"naive: {top_k} CondAttribution calls per sample (channel heatmaps only, "
                 f"{n_naive} samples)", seconds / n_naive, float("nan")))

    # all channels of linear1 sum to the class heatmap
    m = min(args.all_channel_samples, n)
    seconds, full = timed(lambda: decompose_batch(attribution, x[:m], y[:m], layer, composite, top_k=120,
                                                  batch_size=128), args.repeat)
    all_errors = []
    for g in full:
        heatmap = g.heatmap.double()
        all_errors.append(float((g.channel_heatmaps.double().sum(0) - heatmap).norm() / heatmap.norm()))
    rows.append((f"decompose_batch, top_k=120 (all channels), {m} samples", seconds / m, max(all_errors)))

    print(f"FashionMNIST model (accuracy {accuracy:.1%} on {len(images)} val images), layer {layer}, "
          f"{n} samples, top_k={top_k}, EpsilonPlus + SequentialMergeBatchNorm")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, device {device}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at the end, "
          f"best of {args.repeat}")
    print()
    print("| method | ms / sample | max completeness error (rel.) |")
    print("| --- | ---: | ---: |")
    for name, per_sample, error in rows:
        error_text = "-" if error != error else f"{error:.1e}"
        print(f"| {name} | {per_sample * 1e3:.1f} | {error_text} |")
    print()
    print(f"largest all-channels error over {m} samples: {max(all_errors):.2e}; "
          f"largest top-{top_k} + rest error over {n} samples: {max(r[2] for r in rows[:4]):.2e}")
    print("completeness with relevance through the whole layer; evidence rows: no completeness column")

    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        from crp_invert.plot import plot_glocal

        g = decompose(attribution, x[:1], y[0], layer, composite, labels=class_labels, top_k=top_k,
                      evidence=Evidence(reference, concepts=concepts, sample_index=0))
        figure = plot_glocal(g, image=x[:1], class_name=CLASSES[y[0]], ncols=5, shared_scale=True)
        figure.savefig(args.figure, dpi=110)
        print(f"figure written to {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
