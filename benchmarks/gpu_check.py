"""Issue 19: one command that checks the GPU path on a machine with a GPU and writes every figure to one JSON.

    PYTHONPATH=. python benchmarks/gpu_check.py --device cuda --out gpu.json --fashion-mnist shared/fashion-mnist-crp
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --out dry.json      # the short dry run CI executes

Sections, each in its own process with its own time limit (a crash, a hang or an error in one is recorded as
text and the next one runs; the JSON is rewritten after every section, and a section's figures are kept up to
its failure):

- ``environment``: device name, memory, torch / CUDA / numpy / scipy versions, zennit and crp if installed.
- ``imagenet_labeling``: an ImageNet-like layer generated on the device (N = 1,280,000, F = 2,048, K = 1,481
  synthetic concepts as in ``bench_imagenet.py``; goal <= 30 s for the whole layer), first F = 256, then all,
  then all with a larger memory budget; the batch plan of the memory model against the peak GPU memory.
- ``synthetic_equality``: the same layer (fewer features) labeled on the device and on the CPU: formulas and
  AUCs must be identical, p-values equal to the last bits; ``find_channels`` likewise.
- ``pytest_cuda``: ``pytest -m cuda`` on the tests that compare the device with the CPU kernels.
- ``fashion_mnist``: the shared FashionMNIST model's four layers (``--fashion-mnist PATH``; skipped with a
  note where absent) labeled on the device and on the CPU: identical labels, and times per layer.
- ``glocal``: a glocal decomposition batch (``decompose_batch``, linear1, top_k = 8) on the device and on the
  CPU, time per sample and the largest difference (needs zennit and zennit-crp; the FashionMNIST model, or the
  same architecture with random weights where the folder is absent).

With ``--device cpu`` the sizes are small and "device" means the torch backend on the CPU (``backend="torch"``),
compared with the numpy / scipy kernels. Timings are wall-clock seconds of one run after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

# (name, time limit in seconds on a GPU); the dry run on the CPU uses a quarter of each
SECTIONS = [
    ("environment", 60),
    ("imagenet_labeling", 210),
    ("synthetic_equality", 120),
    ("pytest_cuda", 120),
    ("fashion_mnist", 90),
    ("glocal", 90),
]
GPU_SIZES = dict(n=1_280_000, features=2048, first_features=256, equal_features=32, glocal_samples=64)
DRY_SIZES = dict(n=5_000, features=12, first_features=4, equal_features=4, glocal_samples=2)
CUDA_TEST_FILES = ["tests/test_backends.py", "tests/test_labeler.py", "tests/test_metrics.py"]


# the section processes ----------------------------------------------------------------------------
class Part:
    """The figures of one section, written to its part file after every change (kept if the process dies)."""

    def __init__(self, path: Path) -> None:
        self.path, self.values = path, {}

    def __setitem__(self, key: str, value) -> None:
        self.values[key] = value
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.values, indent=1, default=str))
        os.replace(temporary, self.path)

    def update(self, **values) -> None:
        for key, value in values.items():
            self[key] = value


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """``(seconds, result)`` of one call, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def target_of(device: str) -> tuple[str, str]:
    """What is compared with the CPU kernels: the GPU (backend auto), or the torch kernels on the CPU."""
    import torch

    return (device, "torch") if torch.device(device).type == "cpu" else (device, "auto")


def compare_labels(result, reference) -> dict:
    """Formulas and AUCs identical? The largest relative difference of the p-values."""
    formulas = [[str(e.formula) for e in beam] for beam in result] == [[str(e.formula) for e in beam]
                                                                        for beam in reference]
    aucs = [[e.auc for e in beam] for beam in result] == [[e.auc for e in beam] for beam in reference]
    worst = 0.0
    for beam, beam_ref in zip(result, reference):
        for e, r in zip(beam, beam_ref):
            if e.p_value != r.p_value:
                worst = max(worst, abs(e.p_value - r.p_value) / max(abs(r.p_value), 1e-300))
    return {"formulas_identical": formulas, "aucs_identical": aucs, "p_value_max_rel_diff": worst,
            "identical": formulas and aucs and worst <= 1e-12}


def compare_search(result, reference) -> dict:
    aucs = [m.auc for m in result.matches] == [m.auc for m in reference.matches]
    order = [(m.layer, m.channel) for m in result.matches] == [(m.layer, m.channel) for m in reference.matches]
    worst = max((abs(a.p_value - b.p_value) / max(abs(b.p_value), 1e-300)
                 for a, b in zip(result.matches, reference.matches)), default=0.0)
    return {"aucs_identical": aucs, "order_identical": order, "p_value_max_rel_diff": worst,
            "identical": aucs and order and worst <= 1e-12}


def device_layer(concepts, n_features: int, device: str, seed: int = 1):
    """``[N, F]`` float32 ReLU activations generated on ``device``: each feature one random concept (x 1.5) plus
    unit noise, shifted by -0.5, clamped at 0 and rounded to 2 decimals (ties), as ``synthetic.activations``."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    drivers = rng.integers(0, concepts.n_concepts, size=n_features)
    driven = concepts.sparse().tocsc()[:, drivers].tocsc()  # [N, F]: the samples of each feature's concept
    generator = torch.Generator(device=device).manual_seed(seed)
    out = torch.randn(concepts.n_samples, n_features, generator=generator, device=device)
    out -= 0.5
    rows = torch.from_numpy(driven.indices.astype(np.int64)).to(device)
    columns = torch.repeat_interleave(torch.arange(n_features, device=device),
                                      torch.from_numpy(np.diff(driven.indptr).astype(np.int64)).to(device))
    out.index_put_((rows, columns), torch.tensor(1.5, device=device), accumulate=True)
    return out.clamp_(min=0.0).round_(decimals=2)


def reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return None


def section_environment(args, part: Part) -> None:
    import numpy
    import scipy
    import torch

    part.update(python=sys.version.split()[0], platform=platform.platform(), cpu_count=os.cpu_count(),
                torch=torch.__version__, cuda=torch.version.cuda, numpy=numpy.__version__, scipy=scipy.__version__,
                cuda_available=torch.cuda.is_available())
    for module in ("h5py", "sklearn", "zennit", "crp"):
        try:
            imported = __import__(module)
            part[module] = getattr(imported, "__version__", "installed")
        except Exception as error:  # noqa: BLE001 - any import failure is a figure here
            part[module] = f"not importable: {type(error).__name__}: {error}"
    try:
        part["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        part["git_commit"] = f"unknown: {error}"
    from crp_invert.core.search import default_memory_budget, memory_limit

    device = torch.device(args.device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        part.update(device_name=torch.cuda.get_device_name(device), capability=[properties.major, properties.minor],
                    gpu_memory_total_gb=total / 1e9, gpu_memory_free_gb=free / 1e9,
                    cudnn=torch.backends.cudnn.version())
    else:
        part["device_name"] = f"cpu ({platform.processor() or platform.machine()}), torch backend"
    part.update(default_memory_budget_gb=default_memory_budget(device) / 1e9,
                memory_limit_gb=memory_limit(device) / 1e9)


def section_imagenet_labeling(args, part: Part) -> None:
    import synthetic
    import torch

    from crp_invert import ConceptLabeler
    from crp_invert.core.labeling import _itemsize, batch_plan
    from crp_invert.core.search import SearchMemory, default_memory_budget

    sizes, device = args.sizes, args.device
    _, backend = target_of(device)
    tick = time.perf_counter()
    concepts, _ = synthetic.concept_labels(sizes["n"])
    part.update(n=sizes["n"], k=concepts.n_concepts, features=sizes["features"], L=3, B=3, backend=backend,
                concepts_seconds=time.perf_counter() - tick)
    seconds, layer = timed(lambda: device_layer(concepts, sizes["features"], device), device)
    part["generate_layer_seconds"] = seconds
    labeler = ConceptLabeler(concepts, device=device, backend=backend)
    seconds, _ = timed(lambda: labeler.label(layer[:, :2], L=3, B=3, progress=False), device)
    part["warm_up_seconds_2_features"] = seconds  # includes preparing the labels on the device
    budget = default_memory_budget(device)
    plan = SearchMemory(concepts.n_samples, concepts.n_concepts, 3, 3)
    batch, prefetch, part_budget = batch_plan(plan, sizes["features"], budget, _itemsize(layer),
                                              overlap=layer.device.type == "cpu")
    part.update(memory_budget_gb=budget / 1e9, feature_batch=batch, prefetch=prefetch,
                plan_batches_gb=(2 if prefetch else 1) * (min(batch, sizes["features"]) * plan.feature_bytes(4)
                                                         + plan.working_memory(part_budget)) / 1e9,
                layer_gb=layer.numel() * layer.element_size() / 1e9)
    first = sizes["first_features"]
    reset_peak(device)
    seconds, _ = timed(lambda: labeler.label(layer[:, :first], L=3, B=3, progress=False), device)
    part.update(first_seconds=seconds, first_features=first, first_peak_gb=peak_gb(device))
    reset_peak(device)
    seconds, result = timed(lambda: labeler.label(layer, L=3, B=3, progress=False), device)
    part.update(all_seconds=seconds, all_features_per_second=sizes["features"] / seconds,
                all_peak_gb=peak_gb(device), goal_30_s_met=seconds <= 30.0,
                median_best_auc=float(torch.tensor([b[0].auc for b in result if b]).median()))
    if seconds < 90:
        # a larger budget: batches of more features (the GPU default is capped at 4 GiB)
        from crp_invert import SearchParams
        from crp_invert.core.labeling import label_array

        big = 16 << 30
        reset_peak(device)
        seconds, other = timed(lambda: label_array(layer, concepts, SearchParams(L=3, B=3), device=device,
                                                   backend=backend, memory_bytes=big, progress=False), device)
        part.update(budget_16gib_seconds=seconds, budget_16gib_peak_gb=peak_gb(device),
                    budget_16gib_feature_batch=batch_plan(plan, sizes["features"], big, 4,
                                                          overlap=layer.device.type == "cpu")[0],
                    budget_16gib_identical=compare_labels(other, result)["identical"])


def section_synthetic_equality(args, part: Part) -> None:
    import synthetic

    from crp_invert import ConceptLabeler, find_channels

    sizes, device = args.sizes, args.device
    _, backend = target_of(device)
    concepts, _ = synthetic.concept_labels(sizes["n"], seed=3)
    layer = device_layer(concepts, sizes["equal_features"], device, seed=4)
    on_cpu = layer.cpu()
    part.update(n=sizes["n"], k=concepts.n_concepts, features=sizes["equal_features"], backend=backend)
    for name, kwargs in (("default", dict(L=3, B=3)), ("negative_validation",
                                                       dict(L=2, B=4, mode="negative", validation=0.2))):
        ConceptLabeler(concepts, device=device, backend=backend).label(layer[:, :1], L=1, B=1, progress=False)
        seconds, result = timed(lambda kw=kwargs: ConceptLabeler(concepts, device=device, backend=backend).label(
            layer, progress=False, **kw), device)
        cpu_seconds, reference = timed(lambda kw=kwargs: ConceptLabeler(concepts).label(on_cpu, progress=False,
                                                                                        **kw), "cpu")
        part[name] = dict(compare_labels(result, reference), device_seconds=seconds, cpu_seconds=cpu_seconds)
    formula = concepts.names[0] + " OR " + concepts.names[-1]
    seconds, found = timed(lambda: find_channels(formula, {"layer": layer}, concepts, device=device,
                                                 backend=backend), device)
    cpu_seconds, reference = timed(lambda: find_channels(formula, {"layer": on_cpu}, concepts), "cpu")
    part["find_channels"] = dict(compare_search(found, reference), device_seconds=seconds, cpu_seconds=cpu_seconds)


def section_fashion_mnist(args, part: Part) -> None:
    from fashion_mnist import CLASSES, HIERARCHY, LAYERS, load, pooled_activations

    from crp_invert import ConceptLabeler, ConceptLabels, find_channels

    path = Path(args.fashion_mnist) if args.fashion_mnist else None
    if path is None or not (path / "model_state.pt").is_file():
        part["skipped"] = f"no FashionMNIST folder (--fashion-mnist {args.fashion_mnist}); nothing compared"
        return
    device = args.device
    _, backend = target_of(device)
    model, images, targets = load(path)
    acts = pooled_activations(model, images)
    concepts = ConceptLabels.from_targets(targets, CLASSES, hierarchy=HIERARCHY)
    on_device = ConceptLabeler(concepts, device=device, backend=backend)
    on_cpu = ConceptLabeler(concepts)
    on_device.label(acts["conv1"][:, :2].to(device), L=3, B=3, progress=False)  # warm-up
    on_cpu.label(acts["conv1"][:, :2], L=3, B=3, progress=False)
    part["backend"] = backend
    all_identical = True
    for name in LAYERS:
        seconds, result = timed(lambda n=name: on_device.label(acts[n].to(device), L=3, B=3, layer=n,
                                                               progress=False), device)
        cpu_seconds, reference = timed(lambda n=name: on_cpu.label(acts[n], L=3, B=3, layer=n, progress=False), "cpu")
        figures = dict(compare_labels(result, reference), channels=int(acts[name].shape[1]), device_seconds=seconds,
                       cpu_seconds=cpu_seconds)
        all_identical &= figures["identical"]
        part[name] = figures
    part["all_layers_identical"] = all_identical
    layers = {name: acts[name].to(device) for name in LAYERS}
    seconds, found = timed(lambda: find_channels("footwear AND NOT Sandal", layers, concepts, device=device,
                                                 backend=backend), device)
    reference = find_channels("footwear AND NOT Sandal", {n: a for n, a in acts.items()}, concepts)
    part["find_channels"] = dict(compare_search(found, reference), device_seconds=seconds)


def section_glocal(args, part: Part) -> None:
    import numpy as np
    import torch

    try:
        from crp.attribution import CondAttribution
    except ImportError as error:
        part["skipped"] = f"zennit-crp is not installed ({error}); install the zennit and zennit-crp wheels"
        return
    from fashion_mnist import FashionNet, load
    from zennit.composites import EpsilonPlus
    from zennit.torchvision import SequentialMergeBatchNorm

    from crp_invert.integration.glocal import decompose_batch

    device, n = args.device, args.sizes["glocal_samples"]
    path = Path(args.fashion_mnist) if args.fashion_mnist else None
    if path is not None and (path / "model_state.pt").is_file():
        model, images, targets = load(path, n)
        part["model"] = "FashionMNIST (shared weights)"
    else:
        torch.manual_seed(0)
        model, images = FashionNet().eval(), torch.rand(n, 1, 28, 28)
        targets = np.arange(n) % 10
        part["model"] = "FashionNet with random weights (no --fashion-mnist folder)"
    target = [int(t) for t in targets]

    def run(where):
        moved = model.to(where)
        attribution = CondAttribution(moved)
        composite = EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])
        return decompose_batch(attribution, images.to(where), target, "linear1", composite, top_k=8, batch_size=64,
                               device=where)

    run(device)  # warm-up
    seconds, result = timed(lambda: run(device), device)
    cpu_seconds, reference = timed(lambda: run("cpu"), "cpu")
    worst = max(float((a.heatmap.cpu() - b.heatmap).abs().max() / b.heatmap.abs().max().clamp(min=1e-30))
                for a, b in zip(result, reference))
    same_channels = all(torch.equal(a.channels.cpu(), b.channels) for a, b in zip(result, reference))
    part.update(samples=n, top_k=8, device_seconds_per_sample=seconds / n, cpu_seconds_per_sample=cpu_seconds / n,
                heatmap_max_rel_diff=worst, same_channels=same_channels,
                completeness_error_max=max(g.completeness_error() for g in result))


def section_pytest_cuda(args, part: Part) -> None:
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *CUDA_TEST_FILES]
    part["command"] = " ".join(command[1:])
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                               timeout=max(10, args.section_timeout - 15))
    output = completed.stdout + completed.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    counts = {f"tests_{word}": int(number)
              for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", summary)}
    part.update(returncode=completed.returncode, summary=summary, **counts, output_tail=output[-3000:])
    if completed.returncode != 0:
        raise RuntimeError(f"pytest -m cuda failed: {summary}")


def run_section(args) -> int:
    """In the section's own process: run it, write its figures, record an error as text."""
    import torch

    torch.manual_seed(0)
    part = Part(Path(args.part))
    try:
        globals()[f"section_{args.section}"](args, part)
    except Exception as error:  # noqa: BLE001 - recorded in the JSON; the other sections still run
        part["error"] = f"{type(error).__name__}: {error}"
        part["traceback"] = traceback.format_exc()[-4000:]
        return 1
    return 0


# the driver ---------------------------------------------------------------------------------------
def write_json(path: Path, report: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1, default=str))
    os.replace(temporary, path)


def launch(args, name: str, limit: float, part_path: Path) -> tuple[str, str]:
    """Run section ``name`` in a new process group; ``(status, error text)``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--part", str(part_path),
               "--device", args.device, "--section-timeout", str(int(limit))]
    if args.fashion_mnist:
        command += ["--fashion-mnist", args.fashion_mnist]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        return "timeout", f"stopped after {limit:.0f} s; output: {output[-1500:]}"
    if child.returncode == 0:
        return "ok", ""
    return "error", f"exit status {child.returncode}; output: {output[-1500:]}"


def summarize(name: str, section: dict) -> str:
    keys = ("device_name", "torch", "cuda", "first_seconds", "all_seconds", "goal_30_s_met", "budget_16gib_seconds",
            "all_peak_gb", "summary", "all_layers_identical", "device_seconds_per_sample", "cpu_seconds_per_sample",
            "heatmap_max_rel_diff", "skipped", "error")
    shown = [f"{key}={section[key]:.3g}" if isinstance(section[key], float) else f"{key}={section[key]}"
             for key in keys if key in section]
    for key, value in section.items():
        if isinstance(value, dict) and "identical" in value:
            shown.append(f"{key}.identical={value['identical']}")
    return f"[{section['status']:>7}] {name} ({section['seconds']:.1f} s): " + ", ".join(shown)


def drive(args) -> int:
    out = Path(args.out)
    gpu = args.device != "cpu"
    report = {"device": args.device, "dry_run": not gpu, "sizes": args.sizes, "started": time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "sections": {}}
    write_json(out, report)
    start = time.perf_counter()
    chosen = [(name, limit) for name, limit in SECTIONS if not args.only or name in args.only]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        for index, (name, limit) in enumerate(chosen):
            remaining = args.time_limit - (time.perf_counter() - start)
            # leave each later section at least 15 s
            limit = min(limit if gpu else limit / 4 + 30, remaining - 15 * (len(chosen) - index - 1))
            section = {}
            if limit < 5:
                section.update(status="skipped", seconds=0.0, error="no time left within --time-limit")
            else:
                part_path = Path(folder) / f"{name}.json"
                tick = time.perf_counter()
                status, error = launch(args, name, limit, part_path)
                if part_path.exists():
                    section.update(json.loads(part_path.read_text()))
                section.update(status="skipped" if "skipped" in section else status,
                               seconds=time.perf_counter() - tick)
                if error and "error" not in section:
                    section["error"] = error
                elif error:
                    section["process"] = error
            report["sections"][name] = section
            if name == "environment":  # the machine at the top of the file
                report.update({key: section[key] for key in ("device_name", "torch", "cuda") if key in section})
            report["elapsed_seconds"] = time.perf_counter() - start
            write_json(out, report)
            print(summarize(name, section), flush=True)
    failed = [name for name, s in report["sections"].items() if s["status"] not in ("ok", "skipped")]
    report["failed_sections"] = failed
    write_json(out, report)
    print(f"wrote {out} in {report['elapsed_seconds']:.0f} s; failed sections: {failed or 'none'}", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for the short dry run")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON written after every section")
    parser.add_argument("--fashion-mnist", default=None, help="the shared FashionMNIST folder (model_state.pt, "
                        "val.npz); its sections are skipped with a note where absent")
    parser.add_argument("--time-limit", type=float, default=470.0, help="seconds for all sections (default 470)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these sections")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--section-timeout", type=float, default=math.inf, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = DRY_SIZES if args.device == "cpu" else GPU_SIZES
    if args.section:
        return run_section(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
