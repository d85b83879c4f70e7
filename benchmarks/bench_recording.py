"""Benchmark of recording during CRP's FeatureVisualization.run: overhead of ``InvertFeatureVisualization.run``
over a plain CRP ``FeatureVisualization.run`` on the same model, data and layer map.

    python benchmarks/bench_recording.py --torchvision [--models resnet18,vgg11_bn] [--samples 256]
                                         [--size 64] [--batch-size 32] [--repeats 3]
    python benchmarks/bench_recording.py [--samples 5000] [--batch-size 64] [--repeats 3]
    python benchmarks/bench_recording.py --hooks [--repeats 7] [--loader-repeats 4]

``--torchvision``: torchvision ResNet18 (``ResNetCanonizer``) and VGG11_bn (``VGGCanonizer``) with random
weights (``weights=None``, random BatchNorm statistics) on random images, every Conv2d layer in the layer map,
``EpsilonPlusFlat``. Without it: the shared FashionMNIST model on ``../shared/data/fashion-mnist-crp`` (layers
conv1, conv2, linear1, linear2), plus the cache size, ``record_activations`` and labeling from the cache
(exits 0 with a message when the shared data are missing). ``--hooks``: ``record_activations`` against a bare
forward pass over the same DataLoader, at 5,000 and ``--loader-repeats`` x 5,000 samples, with the overhead split
into a part paid once per run and a part per batch.

Measured per model: the wall and CPU time of both runs, best of ``--repeats`` interleaved runs (so that drifts
in machine load hit both), and the time spent inside the recording code itself (timed by wrapping its
functions), whose share of each recording run estimates the overhead robustly on a loaded machine. Conditions
(machine, threads, load average before and after) are printed with the table.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


class ImageList:
    """(image, int target) pairs, as CRP's FeatureVisualization reads a dataset."""

    def __init__(self, images: torch.Tensor, targets) -> None:
        self.images, self.targets = images, np.asarray(targets)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.targets[index])


def recording_timer() -> tuple[dict[str, float], Callable[[], None]]:
    """Wrap the functions of the recording code so that the time spent in them adds up in ``spent["seconds"]``
    (of which ``spent["fixed"]`` once per run or per CRP checkpoint: model hash, first sample, cache and log
    set-up, committing checkpoints, the collect's bookkeeping); returns the counters and a function that unwraps
    them."""
    import crp_invert.integration.checkpoints as checkpoints
    import crp_invert.integration.feature_visualization as feature_visualization
    from crp_invert.integration.recorder import Recorder

    spent = {"seconds": 0.0, "fixed": 0.0}
    wrapped: list[tuple[Any, str, Any]] = []

    def timed(owner: Any, name: str, fixed: bool = False) -> None:
        function = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                spent["seconds"] += seconds
                spent["fixed"] += seconds if fixed else 0.0

        wrapped.append((owner, name, function))
        setattr(owner, name, wrapper)

    for name in ("begin", "activation", "relevance", "end", "flush"):
        timed(Recorder, name)
    timed(Recorder, "close", fixed=True)
    timed(feature_visualization, "after_collect", fixed=True)
    timed(checkpoints._Stage, "commit", fixed=True)
    timed(feature_visualization.InvertFeatureVisualization, "_meta", fixed=True)
    timed(feature_visualization, "open_cache", fixed=True)
    timed(checkpoints.CheckpointLog, "start", fixed=True)

    def restore() -> None:
        for owner, name, function in reversed(wrapped):
            setattr(owner, name, function)

    return spent, restore


def compare(model, dataset, layer_map, make_composite, n: int, batch_size: int, repeats: int, device: str,
            work: Path) -> dict[str, Any]:
    """Interleaved plain CRP and recording runs; wall and CPU times, time inside the recording code."""
    from crp.attribution import CondAttribution
    from crp.visualization import FeatureVisualization

    from crp_invert.integration.feature_visualization import InvertFeatureVisualization

    spent, restore = recording_timer()
    result: dict[str, Any] = {"plain": [], "record": [], "cpu_plain": [], "cpu_record": [], "in_recorder": [],
                              "fixed": []}
    try:
        for repeat in range(repeats):
            for kind in ("plain", "record"):
                folder = work / f"{kind}-{repeat}"
                attribution = CondAttribution(model, device=device)
                if kind == "plain":
                    fv = FeatureVisualization(attribution, dataset, layer_map, path=str(folder), device=device)
                else:
                    fv = InvertFeatureVisualization(attribution, dataset, layer_map, path=str(folder), device=device,
                                                    activation_cache=work / f"acts-{repeat}.h5", progress=False)
                gc.collect()
                spent["seconds"] = spent["fixed"] = 0.0
                start, cpu_start = time.perf_counter(), time.process_time()
                fv.run(make_composite(), 0, n, batch_size=batch_size)
                result[kind].append(time.perf_counter() - start)
                result[f"cpu_{kind}"].append(time.process_time() - cpu_start)
                if kind == "record":
                    result["in_recorder"].append(spent["seconds"])
                    result["fixed"].append(spent["fixed"])
                print(f"# {kind} run {repeat}: {result[kind][-1]:.2f} s wall, {result['cpu_' + kind][-1]:.2f} s CPU"
                      + (f", {spent['seconds']:.3f} s in recording code" if kind == "record" else ""),
                      file=sys.stderr)
    finally:
        restore()
    return result


def table_rows(label: str, n: int, result: dict[str, Any]) -> list[str]:
    plain, record = min(result["plain"]), min(result["record"])
    cpu_plain, cpu_record = min(result["cpu_plain"]), min(result["cpu_record"])
    shares = [s / t for s, t in zip(result["in_recorder"], result["record"], strict=True)]
    estimated = float(np.median([share / (1 - share) for share in shares]))
    fastest = result["in_recorder"][int(np.argmin(result["record"]))]
    fixed = float(np.median(result["fixed"]))
    per_batch = [(s - f) / (t - f) for s, f, t in zip(result["in_recorder"], result["fixed"], result["record"],
                                                      strict=True)]
    per_batch_estimate = float(np.median([x / (1 - x) for x in per_batch]))
    return [
        f"| {label}: plain CRP `FeatureVisualization.run`, {n} images | {plain:.2f} s "
        f"(all: {', '.join(f'{t:.2f}' for t in result['plain'])}) |",
        f"| {label}: `InvertFeatureVisualization.run` (+ activations and relevances) | {record:.2f} s "
        f"(all: {', '.join(f'{t:.2f}' for t in result['record'])}) |",
        f"| {label}: recording overhead, wall time, best of each (goal <= 5 %) | {(record - plain) / plain:+.1%} |",
        f"| {label}: CPU time (process), best of each: plain / recording | {cpu_plain:.2f} s / {cpu_record:.2f} s "
        f"({(cpu_record - cpu_plain) / cpu_plain:+.1%}) |",
        f"| {label}: time inside the recording code, fastest recording run | {fastest:.3f} s "
        f"({fastest / record:.1%} of that run) |",
        f"| {label}: overhead estimated within each recording run: recording code / rest of the run (median) | "
        f"{estimated:+.1%} (runs: {', '.join(f'{x / (1 - x):.1%}' for x in shares)}) |",
        f"| {label}: of which once per run or per checkpoint (model hash, set-up, commits, collect), median | "
        f"{fixed:.3f} s |",
        f"| {label}: overhead of the per-batch part alone (what a long run approaches), median | "
        f"{per_batch_estimate:+.1%} (runs: {', '.join(f'{x / (1 - x):.1%}' for x in per_batch)}) |",
    ]


def conditions(device: str) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{datetime.date.today().isoformat()}; {platform.machine()} {platform.processor() or ''}, "
            f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, device {device}; torch "
            f"{torch.__version__}; load average (1, 5, 15 min) {load}")


def torchvision_main(args) -> int:
    import torchvision
    from crp.concepts import ChannelConcept
    from crp.helper import get_layer_names
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    models = {"resnet18": (torchvision.models.resnet18, ResNetCanonizer),
              "vgg11_bn": (torchvision.models.vgg11_bn, VGGCanonizer)}
    chosen = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(models))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {sorted(models)}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.samples, 3, args.size, args.size, generator=generator)
    targets = torch.randint(0, 10, (args.samples,), generator=generator).numpy()
    dataset = ImageList(images, targets)
    before = conditions(args.device)
    rows, notes = [], []
    work = Path(tempfile.mkdtemp(prefix="bench-recording-"))
    try:
        for name in chosen:
            make, canonizer = models[name]
            torch.manual_seed(0)
            model = make(weights=None, num_classes=10)
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():  # random BatchNorm statistics, so that merging them matters
                for module in model.modules():
                    if isinstance(module, torch.nn.BatchNorm2d):
                        module.running_mean.normal_(0, 0.1, generator=generator)
                        module.running_var.uniform_(0.5, 1.5, generator=generator)
            model.eval().to(args.device)
            layers = get_layer_names(model, [torch.nn.Conv2d])
            layer_map = {layer: ChannelConcept() for layer in layers}
            result = compare(model, dataset, layer_map, lambda c=canonizer: EpsilonPlusFlat(canonizers=[c()]),
                             args.samples, args.batch_size, args.repeats, args.device, work / name)
            rows += table_rows(name, args.samples, result)
            notes.append(f"{name}: {len(layers)} Conv2d layers")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"Conditions: {before}; after: load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    print(f"Random {args.size}x{args.size} images, {args.samples} samples, batch size {args.batch_size}, checkpoint "
          f"500, EpsilonPlusFlat with the model's canonizer, {'; '.join(notes)}; best of {args.repeats} "
          "interleaved runs.")
    print()
    print("| measurement | value |")
    print("| --- | --- |")
    print("\n".join(rows))
    return 0


def fashion_main(args) -> int:
    from fashion_mnist import CLASSES, LAYERS, FashionNet, data_dir

    data = data_dir() or HERE.parent.parent / "shared" / "data" / "fashion-mnist-crp"
    if not (data / "val.npz").exists() or not (data / "model_state.pt").exists():
        print(f"shared FashionMNIST data not found at {data}; nothing to benchmark (skipped).")
        return 0

    from crp.concepts import ChannelConcept
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlus

    from crp_invert.integration.hooks import record_activations
    from crp_invert.storage.cache import ActivationCache

    archive = np.load(data / "val.npz")
    n = min(args.samples, len(archive["targets"]))
    images = torch.from_numpy(archive["images"][:n]).float().div(255).unsqueeze(1)
    targets = archive["targets"][:n]
    model = FashionNet()
    model.load_state_dict(torch.load(data / "model_state.pt", weights_only=True))
    model.eval().to(args.device)
    with torch.no_grad():
        accuracy = (model(images.to(args.device)).argmax(1).cpu().numpy() == targets).mean()
    dataset = ImageList(images, targets)
    layer_map = {name: ChannelConcept() for name in LAYERS}

    def composite():
        return EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])

    before = conditions(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-recording-"))
    try:
        result = compare(model, dataset, layer_map, composite, n, args.batch_size, args.repeats, args.device, work)
        cache_path = work / "acts-0.h5"
        cache_bytes = cache_path.stat().st_size
        with ActivationCache(cache_path) as cache:
            assert cache.is_complete()
            channels = {name: cache.n_channels(name) for name in LAYERS}
            chunks = {name: cache.info(name)["chunks"] for name in LAYERS}
        raw_bytes = sum(2 * 4 * n * c for c in channels.values())
        start = time.perf_counter()
        record_activations(model, torch.utils.data.DataLoader(dataset, batch_size=args.batch_size), LAYERS,
                           work / "hooks.h5", composite=composite(), progress=False).close()
        hooks_time = time.perf_counter() - start
        label_times = {}
        if not args.skip_label:
            from crp_invert import ConceptLabeler
            from crp_invert.core.concepts import ConceptLabels

            labeler = ConceptLabeler(ConceptLabels.from_targets(targets, CLASSES), device=args.device)
            for source in ("activation", "relevance"):
                start = time.perf_counter()
                labeler.label_cache(cache_path, source=source, L=3, B=3, progress=False)
                label_times[source] = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"Conditions: {before}; after: load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    print(f"FashionMNIST model (accuracy {accuracy:.1%} on these {n} images); layers "
          f"{', '.join(f'{k} ({v})' for k, v in channels.items())}; batch size {args.batch_size}; best of "
          f"{args.repeats} interleaved runs.")
    print()
    print("| measurement | value |")
    print("| --- | --- |")
    print("\n".join(table_rows("FashionMNIST", n, result)))
    print(f"| cache size (4 layers, activations + relevances) | {cache_bytes / 2**20:.2f} MiB "
          f"(raw float32 data {raw_bytes / 2**20:.2f} MiB) |")
    print(f"| chunk shapes | {', '.join(f'{k} {v}' for k, v in chunks.items())} |")
    print(f"| `record_activations` (forward hooks only, no relevance) | {hooks_time:.2f} s |")
    for source, seconds in label_times.items():
        print(f"| label all 4 layers ({sum(channels.values())} channels) from the cache, {source}s, L = 3, B = 3, "
              f"K = {len(CLASSES)} | {seconds:.2f} s |")
    return 0


def hooks_timer() -> tuple[dict[str, float], Callable[[], None]]:
    """Wrap the functions ``record_activations`` calls once per run (set-up, file creation, the final write,
    flush and commit) and once per batch; returns the counters ``{"fixed": s, "per_batch": s}`` and a function
    that unwraps them. Hook dispatch inside the forward pass is not counted (the wall-time fit counts it)."""
    import crp_invert.integration.hooks as hooks
    from crp_invert.integration.recorder import Recorder

    spent = {"fixed": 0.0, "per_batch": 0.0}
    wrapped: list[tuple[Any, str, Any]] = []

    def timed(owner: Any, name: str, kind: str) -> None:
        function = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[kind] += time.perf_counter() - start

        wrapped.append((owner, name, function))
        setattr(owner, name, wrapper)

    for name in ("begin", "activation", "end"):
        timed(Recorder, name, "per_batch")
    timed(Recorder, "close", "fixed")  # writes the rows buffered since the last flush (one flush at this size)
    for name in ("check_sequential", "open_cache", "model_hash", "check_recorded_layers", "_check_data",
                 "ActivationCache"):
        timed(hooks, name, "fixed")

    def restore() -> None:
        for owner, name, function in reversed(wrapped):
            setattr(owner, name, function)

    return spent, restore


def hooks_main(args) -> int:
    """``record_activations`` of the four FashionMNIST layers against a bare forward pass over the same
    DataLoader (a TensorDataset, batch size ``--batch-size``), interleaved, at the val set and the val set
    repeated ``--loader-repeats`` times; the overhead split into a fixed and a per-batch part."""
    from fashion_mnist import LAYERS, data_dir, load

    from crp_invert import record_activations

    folder = data_dir()
    if folder is None:
        print("shared FashionMNIST data not found; nothing to benchmark (skipped).")
        return 0
    model, images, targets = load(folder)
    images, targets = images[:args.samples], torch.from_numpy(targets[:args.samples])
    before = conditions(args.device)
    rows, fits = [], []
    work = Path(tempfile.mkdtemp(prefix="bench-hooks-"))
    try:
        for times in (1, args.loader_repeats):
            dataset = torch.utils.data.TensorDataset(images.repeat(times, 1, 1, 1), targets.repeat(times))
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)

            def bare(loader=loader):
                with torch.no_grad():
                    for batch, _ in loader:
                        model(batch)

            def record(loader=loader):
                record_activations(model, loader, LAYERS, work / "cache.h5", overwrite=True, progress=False).close()

            best = {"bare": float("inf"), "record": float("inf"), "fixed": float("inf"), "per_batch": float("inf")}
            bare()
            spent, restore = hooks_timer()
            try:
                for _ in range(args.repeats):
                    for name, run in (("bare", bare), ("record", record)):
                        spent["fixed"] = spent["per_batch"] = 0.0
                        start = time.perf_counter()
                        run()
                        best[name] = min(best[name], time.perf_counter() - start)
                        if name == "record":
                            best["fixed"] = min(best["fixed"], spent["fixed"])
                            best["per_batch"] = min(best["per_batch"], spent["per_batch"])
            finally:
                restore()
            n, batches = len(dataset), len(loader)
            fits.append((batches, best["record"] - best["bare"]))
            rows.append(f"| {n:,} samples ({batches} batches) | {best['bare']:.3f} | {best['record']:.3f} | "
                        f"{best['record'] / best['bare']:.3f} | {1e3 * best['fixed']:.1f} | "
                        f"{1e3 * best['per_batch'] / batches:.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (b1, d1), (b2, d2) = fits
    per_batch = (d2 - d1) / (b2 - b1) if b2 != b1 else float("nan")
    print(f"Conditions: {before}; after: load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    print(f"FashionMNIST model, layers {', '.join(LAYERS)}, TensorDataset, batch size {args.batch_size}, best of "
          f"{args.repeats} interleaved runs (bare, record).")
    print()
    print("| data | bare forward (s) | record_activations (s) | ratio | in set-up and file writes, once (ms) "
          "| in the recorder per batch (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print()
    print(f"Fit of the wall-time overheads of the two sizes: {1e3 * per_batch:.3f} ms per batch (hooks included), "
          f"{1e3 * (d1 - per_batch * b1):.1f} ms once per run.")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torchvision", action="store_true", help="ResNet18 and VGG11_bn with random weights")
    parser.add_argument("--models", default="resnet18,vgg11_bn", help="with --torchvision: comma-separated")
    parser.add_argument("--size", type=int, default=64, help="with --torchvision: image side in pixels")
    parser.add_argument("--samples", type=int, default=None, help="default 256 (--torchvision) or 5000")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (--torchvision) or 64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-label", action="store_true")
    parser.add_argument("--hooks", action="store_true",
                        help="record_activations against a bare forward pass (FashionMNIST), fixed and per-batch part")
    parser.add_argument("--loader-repeats", type=int, default=4, help="with --hooks: the larger run's data")
    args = parser.parse_args()
    if args.samples is None:
        args.samples = 256 if args.torchvision else 5000
    if args.batch_size is None:
        args.batch_size = 32 if args.torchvision else 64
    if args.hooks:
        return hooks_main(args)
    return torchvision_main(args) if args.torchvision else fashion_main(args)


if __name__ == "__main__":
    sys.exit(main())
