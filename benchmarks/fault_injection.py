"""Fault injection into the activation cache's own writes: kill a writer at random points, check what is left,
resume, and compare the result bit for bit with what an uninterrupted writer stores.

A writer (a forked child of this script) records a fixed workload into one cache in three sessions: three
layers and their rows in batches (each batch written, then marked complete); then one more layer, then two
more, each added to the *existing* cache (the case where HDF5 metadata of a file holding finished rows
changes), and their rows. After every ``add_layer`` and
``mark_complete`` that returned it appends a line to a progress file (what is finished at that moment).

Each trial:

1. starts a writer and kills it (SIGKILL) after a random delay (``--mode kill``); or makes it call ``os._exit``
   at a random call into h5py's ``Dataset.__setitem__``, ``File.flush``, ``Group.create_dataset`` or attribute
   writes, before or after the call (``--mode exit``); or at a random one of HDF5's own low-level writes, in the
   middle of a flush of its metadata (``--mode write``: files opened through a counting Python file object);
2. checks the file left behind: it opens, every layer whose ``add_layer`` returned is there, every row whose
   ``mark_complete`` returned is complete, and every complete row holds the expected values, bit for bit;
3. resumes with an uninterrupted writer on the same file and checks that the whole cache equals the expected
   values bit for bit.

A trial fails if any check fails. Run::

    python benchmarks/fault_injection.py --trials 200 --mode kill
    python benchmarks/fault_injection.py --trials 200 --mode write --json result.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_ROWS = 600
BATCH = 50
FIRST = [("conv1", 64), ("conv2", 128), ("fc", 32)]
LATER = [("block.0", 96), ("block.1", 48), ("head", 10)]


def expected(layer: str, n_channels: int, source: str) -> np.ndarray:
    """The values an uninterrupted writer stores for a layer (deterministic, any bit pattern of float32)."""
    seed = sum(map(ord, layer + source)) + n_channels
    return np.random.default_rng(seed).standard_normal((N_ROWS, n_channels)).astype(np.float32)


def _log(progress, line: str) -> None:
    progress.write(line + "\n")
    progress.flush()  # in the page cache at once: a kill of the process cannot lose it


def write_workload(path: Path, progress_path: Path | None) -> None:
    """Record the workload into ``path``, skipping what is complete (so it both writes anew and resumes): three
    sessions (open, add layers, write rows, close), the later two adding layers to the cache in place."""
    progress = open(progress_path, "a", encoding="utf-8") if progress_path else open(os.devnull, "w")
    with progress:
        for session in (FIRST, FIRST + LATER[:1], FIRST + LATER):
            _write_session(path, session, progress)


def _write_session(path: Path, layers: list[tuple[str, int]], progress) -> None:
    from crp_invert.storage.cache import ActivationCache

    with ActivationCache(path, "a") as cache:
        cache.initialize((0, N_ROWS))
        for layer, channels in layers:
            cache.add_layer(layer, channels, relevances=True, chunks=(BATCH, min(channels, 32)), pooling="mean")
            _log(progress, f"layer {layer}")
        for start in range(0, N_ROWS, BATCH):
            rows = (start, start + BATCH)
            todo = [(layer, c) for layer, c in layers if not cache.complete(layer)[start:start + BATCH].all()]
            for layer, channels in todo:
                cache.write(layer, rows, expected(layer, channels, "a")[start:start + BATCH],
                            expected(layer, channels, "r")[start:start + BATCH])
            if todo:
                cache.mark_complete(rows, [layer for layer, _ in todo])
                _log(progress, "rows " + " ".join(f"{layer}:{start}" for layer, _ in todo))


def _exit_at_random_h5py_call(seed: int) -> None:
    """Make the process exit (as if killed) at a random call into h5py's writing functions."""
    import h5py

    rng = random.Random(seed)
    target, before = rng.randint(1, 400), rng.random() < 0.5
    calls = {"n": 0}

    def wrap(owner, name):
        function = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == target and before:
                os._exit(137)
            result = function(*args, **kwargs)
            if calls["n"] == target:
                os._exit(137)
            return result

        setattr(owner, name, wrapper)

    for owner, name in ((h5py.Dataset, "__setitem__"), (h5py.File, "flush"), (h5py.Group, "create_dataset"),
                        (h5py.AttributeManager, "__setitem__"), (h5py.Group, "create_group")):
        wrap(owner, name)


def _exit_at_random_hdf5_write(seed: int) -> None:
    """Make the process exit at a random one of HDF5's own low-level writes: files are opened through a Python
    file object (h5py's ``fileobj`` driver) whose ``write`` counts, so the exit can fall between any two writes
    of HDF5's metadata while a layer is added or the file flushed."""
    import io

    import h5py

    rng = random.Random(seed)
    target = rng.randint(1, 900)  # an uninterrupted writer makes about 820 writes
    calls = {"n": 0}

    class CountingFile(io.FileIO):
        def write(self, data):
            calls["n"] += 1
            if calls["n"] == target:
                os._exit(137)
            return super().write(data)

    class FileThroughPython(h5py.File):
        def __init__(self, name, mode="r", **kwargs):
            if isinstance(name, (str, os.PathLike)):  # unbuffered: one write of HDF5 is one counted write
                name = CountingFile(name, {"r": "r", "r+": "r+", "w": "w+"}[mode])
            super().__init__(name, mode, **kwargs)

    h5py.File = FileThroughPython


def check_left(path: Path, progress_path: Path) -> list[str]:
    """What is wrong with the cache a killed writer left (empty list: nothing)."""
    from crp_invert.storage.cache import ActivationCache

    lines = progress_path.read_text(encoding="utf-8").splitlines() if progress_path.exists() else []
    rows = [tuple(item.split(":")) for line in lines if line.startswith("rows ") for item in line.split()[1:]]
    if not path.exists():
        return ["no file, but rows were marked complete"] if rows else []
    problems = []
    try:
        with ActivationCache(path) as cache:
            if not cache.initialized:
                return ["an empty cache, but rows were marked complete"] if rows else []
            # a layer added to a cache in place enters the file with its first rows (add_layer works on a copy
            # until then): a layer is lost only if it had complete rows
            missing = {layer for layer, _ in rows} - set(cache.layers)
            if missing:
                problems.append(f"layers lost: {sorted(missing)}")
            for layer, start in rows:
                if layer in cache and not cache.complete(layer)[int(start):int(start) + BATCH].all():
                    problems.append(f"rows lost: {layer} [{start}, {int(start) + BATCH})")
            channels = dict(FIRST + LATER)
            for layer in cache.layers:
                done = cache.complete(layer)
                for source, key in (("a", "activation"), ("r", "relevance")):
                    stored = cache.dataset(layer, key)[()][done]
                    want = expected(layer, channels[layer], source)[done]
                    if not np.array_equal(stored.view(np.uint32), want.view(np.uint32)):
                        problems.append(f"complete rows of {layer} ({key}) differ")
    except Exception as error:  # noqa: BLE001 - any failure to read is a failed trial
        problems.append(f"cannot read: {type(error).__name__}: {error}")
    return problems


def check_resumed(path: Path) -> list[str]:
    """What differs between the resumed cache and the expected values, bit for bit."""
    from crp_invert.storage.cache import ActivationCache

    problems = []
    with ActivationCache(path) as cache:
        if cache.layers != [layer for layer, _ in FIRST + LATER] or not cache.is_complete():
            problems.append(f"incomplete after resume: layers {cache.layers}, missing {cache.missing_ranges()}")
        for layer, channels in FIRST + LATER:
            if layer not in cache:
                continue
            for source, key in (("a", "activation"), ("r", "relevance")):
                stored = cache.dataset(layer, key)[()]
                if not np.array_equal(stored.view(np.uint32), expected(layer, channels, source).view(np.uint32)):
                    problems.append(f"{layer} ({key}) differs after resume")
    return problems


def _writer(path: Path, progress: Path, mode: str, seed: int) -> int:
    """Start a writer in a forked child (the imports are the parent's: a kill lands in the writes, not in
    ``import torch``); returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running the parent's clean-up
        code = 1
        try:
            if mode == "exit":
                _exit_at_random_h5py_call(seed)
            elif mode == "write":
                _exit_at_random_hdf5_write(seed)
            write_workload(path, progress)
            code = 0
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float) -> int | None:
    """The exit status of the child (negative: killed by that signal), or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.002)


def run_trial(folder: Path, mode: str, seed: int, duration: float) -> tuple[bool, list[str], bool]:
    """One trial; returns (killed before the end, problems, resumed bit for bit)."""
    path, progress = folder / "acts.h5", folder / "progress.txt"
    pid = _writer(path, progress, mode, seed)
    status = _wait(pid, random.Random(seed).uniform(0.0, duration) if mode == "kill" else 300)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        status = _wait(pid, 300)
    if status not in (0, -signal.SIGKILL, 137):
        return True, [f"the writer failed with status {status}"], False
    problems = check_left(path, progress)
    try:
        write_workload(path, None)  # the resume, uninterrupted
    except Exception as error:  # noqa: BLE001 - a failed resume is a failed trial
        return status != 0, problems + [f"resume failed: {type(error).__name__}: {error}"], False
    resumed = check_resumed(path)
    return status != 0, problems + resumed, not resumed


def machine() -> str:
    import platform

    import h5py

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, h5py {h5py.__version__}, HDF5 " \
           f"{h5py.version.hdf5_version}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--mode", choices=["kill", "exit", "write"], default="kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        write_workload(Path(scratch) / "warm.h5", None)  # imports and first-use costs out of the timing
        started = time.perf_counter()
        write_workload(Path(scratch) / "timing.h5", None)  # how long an uninterrupted writer takes
        duration = time.perf_counter() - started
        failures, killed, bitwise, examples = 0, 0, 0, []
        for trial in range(args.trials):
            folder = Path(scratch) / f"trial{trial}"
            folder.mkdir()
            was_killed, problems, same = run_trial(folder, args.mode, args.seed * 100003 + trial, duration)
            killed += was_killed
            bitwise += same
            if problems:
                failures += 1
                examples.append(f"trial {trial}: {'; '.join(problems)[:300]}")
            shutil.rmtree(folder, ignore_errors=True)
    result = {"mode": args.mode, "trials": args.trials, "killed": killed, "failures": failures,
              "resumed_bitwise": bitwise, "writer_seconds": round(duration, 2), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "examples": examples[:10]}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text, encoding="utf-8")
    sys.stdout.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
