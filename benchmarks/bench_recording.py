"""Benchmark of recording during CRP's FeatureVisualization.run (issue 3) on the shared FashionMNIST model.

    python benchmarks/bench_recording.py [--samples 5000] [--batch-size 64] [--repeats 3]

Measures, on ``../shared/data/fashion-mnist-crp`` (layers conv1, conv2, linear1, linear2; EpsilonPlus with
SequentialMergeBatchNorm):

- the wall time of a plain CRP ``FeatureVisualization.run`` and of ``InvertFeatureVisualization.run`` (which
  also records pooled activations and relevances of every sample), best of ``--repeats`` interleaved runs with
  the same batch size, and the overhead of recording;
- the size of the activation cache;
- the time to label all four layers from the cache with L = 3, B = 3 (activations and relevances);
- for reference, ``record_activations`` (forward hooks only, no relevances).

On a shared machine wall times vary a lot between runs; the table therefore also reports the time spent
inside the recording code (timed by wrapping its methods) and, per recording run, its share of that run.

Prints a markdown table. Exits 0 with a message when the shared data are missing.
"""

from __future__ import annotations

import argparse
import gc
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from fashion_mnist import CLASSES, LAYERS, FashionNet, ImageDataset, data_dir  # noqa: E402

DATA = data_dir() or HERE.parent.parent / "shared" / "data" / "fashion-mnist-crp"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-label", action="store_true")
    args = parser.parse_args()

    if not (DATA / "val.npz").exists() or not (DATA / "model_state.pt").exists():
        print(f"shared FashionMNIST data not found at {DATA}; nothing to benchmark (skipped).")
        return 0

    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from crp.visualization import FeatureVisualization
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlus

    from crp_invert.integration.recording import InvertFeatureVisualization, record_activations
    from crp_invert.storage.cache import ActivationCache

    archive = np.load(DATA / "val.npz")
    n = min(args.samples, len(archive["targets"]))
    images = torch.from_numpy(archive["images"][:n]).float().div(255).unsqueeze(1)
    targets = archive["targets"][:n]
    model = FashionNet()
    model.load_state_dict(torch.load(DATA / "model_state.pt", weights_only=True))
    model.eval().to(args.device)
    with torch.no_grad():
        accuracy = (model(images.to(args.device)).argmax(1).cpu().numpy() == targets).mean()
    dataset = ImageDataset(images, targets)
    layer_map = {name: ChannelConcept() for name in LAYERS}

    def composite():
        return EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])

    # time spent inside the recording code itself (robust to the load of a shared machine)
    import crp_invert.integration.recording as recording

    spent = {"seconds": 0.0}

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - start

        return wrapper

    for name in ("begin", "activation", "relevance", "end", "close"):
        setattr(recording._Recorder, name, timed(getattr(recording._Recorder, name)))
    for name in ("_start_recording", "_stop_recording"):
        setattr(InvertFeatureVisualization, name, timed(getattr(InvertFeatureVisualization, name)))

    work = Path(tempfile.mkdtemp(prefix="bench-recording-"))
    times = {"plain": [], "record": []}
    cpu_times = {"plain": [], "record": []}
    recorder_times = []
    try:
        for repeat in range(args.repeats):
            for kind in ("plain", "record"):  # interleaved, so drifts in machine load hit both
                folder = work / f"{kind}-{repeat}"
                attribution = CondAttribution(model, device=args.device)
                if kind == "plain":
                    fv = FeatureVisualization(attribution, dataset, layer_map, path=str(folder))
                else:
                    fv = InvertFeatureVisualization(
                        attribution,
                        dataset,
                        layer_map,
                        path=str(folder),
                        activation_cache=work / f"acts-{repeat}.h5",
                        pooling="mean",
                        record_relevance=True,
                    )
                gc.collect()
                spent["seconds"] = 0.0
                start, cpu_start = time.perf_counter(), time.process_time()
                fv.run(composite(), 0, n, batch_size=args.batch_size)
                times[kind].append(time.perf_counter() - start)
                cpu_times[kind].append(time.process_time() - cpu_start)
                if kind == "record":
                    recorder_times.append(spent["seconds"])
                print(
                    f"# {kind} run {repeat}: {times[kind][-1]:.2f} s wall, {cpu_times[kind][-1]:.2f} s CPU"
                    + (f", {recorder_times[-1]:.3f} s in recording code" if kind == "record" else ""),
                    file=sys.stderr,
                )
        cache_path = work / "acts-0.h5"
        cache_bytes = cache_path.stat().st_size
        raw_bytes = 0
        with ActivationCache(cache_path) as cache:
            assert cache.is_complete()
            channels = {name: cache.n_channels(name) for name in LAYERS}
            raw_bytes = sum(2 * 4 * n * c for c in channels.values())
            chunks = {name: cache.info(name)["chunks"] for name in LAYERS}

        start = time.perf_counter()
        record_activations(
            model,
            torch.utils.data.DataLoader(dataset, batch_size=args.batch_size),
            LAYERS,
            work / "hooks.h5",
            composite=composite(),
            progress=False,
        ).close()
        hooks_time = time.perf_counter() - start

        label_times = {}
        if not args.skip_label:
            from crp_invert import ConceptLabeler
            from crp_invert.core.concepts import ConceptLabels

            concepts = ConceptLabels.from_targets(targets, CLASSES)
            labeler = ConceptLabeler(concepts, device=args.device)
            for source in ("activation", "relevance"):
                start = time.perf_counter()
                results = labeler.label_cache(cache_path, source=source, L=3, B=3, progress=False)
                label_times[source] = time.perf_counter() - start
                best = results["linear2"].best(0)
                print(
                    f"# {source}: linear2 channel 0 -> {best.formula} (AUC {best.auc:.3f})", file=sys.stderr
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    plain, record = min(times["plain"]), min(times["record"])
    overhead = (record - plain) / plain
    cpu_plain, cpu_record = min(cpu_times["plain"]), min(cpu_times["record"])
    in_recorder = recorder_times[int(np.argmin(times["record"]))]  # in the fastest recording run
    # robust to the load of a shared machine: the recording code's share of each recording run itself
    shares = [spent / total for spent, total in zip(recorder_times, times["record"], strict=True)]
    estimated = float(np.median([share / (1 - share) for share in shares]))
    print(
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, device {args.device}; "
        f"torch {torch.__version__}; FashionMNIST model (accuracy {accuracy:.1%} on these {n} images); "
        f"layers {', '.join(f'{k} ({v})' for k, v in channels.items())}; batch size {args.batch_size}; "
        f"best of {args.repeats} interleaved runs."
    )
    print()
    print("| measurement | value |")
    print("| --- | --- |")
    print(
        f"| plain CRP `FeatureVisualization.run`, {n} images | {plain:.2f} s "
        f"(all: {', '.join(f'{t:.2f}' for t in times['plain'])}) |"
    )
    print(
        f"| `InvertFeatureVisualization.run` (+ activations and relevances) | {record:.2f} s "
        f"(all: {', '.join(f'{t:.2f}' for t in times['record'])}) |"
    )
    print(f"| recording overhead, wall time, best of each (goal <= 15 %) | {overhead:+.1%} |")
    print(
        f"| CPU time (process), best of each: plain / recording | {cpu_plain:.2f} s / {cpu_record:.2f} s "
        f"({(cpu_record - cpu_plain) / cpu_plain:+.1%}) |"
    )
    print(
        f"| time inside the recording code, fastest recording run | {in_recorder:.3f} s "
        f"({in_recorder / record:.1%} of that run) |"
    )
    print(
        "| overhead estimated within each recording run: recording code / rest of that run (median) | "
        f"{estimated:+.1%} (runs: {', '.join(f'{x / (1 - x):.1%}' for x in shares)}) |"
    )
    print(
        f"| cache size (4 layers, activations + relevances) | {cache_bytes / 2**20:.2f} MiB "
        f"(raw float32 data {raw_bytes / 2**20:.2f} MiB) |"
    )
    print(f"| chunk shapes | {', '.join(f'{k} {v}' for k, v in chunks.items())} |")
    print(f"| `record_activations` (forward hooks only, no relevance) | {hooks_time:.2f} s |")
    for source, seconds in label_times.items():
        print(
            f"| label all 4 layers ({sum(channels.values())} channels) from the cache, {source}s, "
            f"L = 3, B = 3, K = {len(CLASSES)} | {seconds:.2f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
