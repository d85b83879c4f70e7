"""The recording setup shared by the recording tests and their killed children, and the child itself.

Run as a script, it records the standard run of :mod:`test_recording` and SIGKILLs itself at a chosen point::

    python tests/kill_child.py POINT N FV_FOLDER CACHE_FILE

``POINT`` names where (see :data:`POINTS`), ``N`` which call of that kind is killed (1 = the first). A test
starts it with :func:`run_killed_child` (under a timeout) and then resumes in its own process.

This module is a helper, not a test module: tests import it, it imports no test module.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script: make helpers and the worktree's package importable
    sys.path[:0] = [str(HERE), str(HERE.parent)]

from crp.concepts import ChannelConcept  # noqa: E402
from helpers import branch_net  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import EpsilonPlus  # noqa: E402

N_SAMPLES = 40
BATCH = 8
CHECKPOINT = 2
LAYERS = ["conv1", "conv2", "parallel.0", "linear1", "linear2"]
KINDS = ("r_max", "a_max", "r_stats", "a_stats")
# where the child can be killed; the collect points are counted per CRP result object (RelMax, ActMax,
# RelStats, ActStats), e.g. "collect-load:a_max" with N=1 kills before ActMax reads its first checkpoint file
# ("collect-targets:a_stats" kills when ActStats writes its targets file, the last file of the collect)
POINTS = ("batch", "checkpoint-save", "commit", "flush", "after-collect", "collect-deletions") + tuple(
    f"collect-{what}:{kind}" for kind in KINDS for what in ("load", "save")
) + ("collect-targets:r_stats", "collect-targets:a_stats")


def make_model(seed: int = 0) -> torch.nn.Module:
    return branch_net(seed)


def make_data(n: int = N_SAMPLES, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 14, 14, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return x, y


def composite() -> EpsilonPlus:
    return EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])


def layer_map() -> dict:
    return {name: ChannelConcept() for name in LAYERS}


def run_killed_child(point: str, n: int, fv: Path, cache: Path, timeout: float = 240,
                     n_samples: int = N_SAMPLES, checkpoint: int = CHECKPOINT) -> subprocess.CompletedProcess:
    """Run this module as a child that records ``n_samples`` samples (CRP checkpoints every ``checkpoint``
    batches) and kills itself at ``point`` (the ``n``-th call); TimeoutExpired if it runs longer than
    ``timeout`` seconds (the watchdog of a kill test)."""
    if point not in POINTS:
        raise ValueError(f"point must be one of {POINTS}, got {point!r}")
    command = [sys.executable, str(Path(__file__).resolve()), point, str(n), str(fv), str(cache), str(n_samples),
               str(checkpoint)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def watchdog(seconds: float = 120) -> Iterator[None]:
    """Fail loudly instead of hanging: if the block runs longer than ``seconds``, print every thread's stack
    and end the process (pytest then reports the test as crashed, with the stack of the loop)."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# -- the child --------------------------------------------------------------------------------------------------


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _Counter:
    """Kills the process at the ``n``-th call of :meth:`tick`."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.n:
            _kill()

    def wrap(self, function):
        def wrapper(*args, **kwargs):
            self.tick()
            return function(*args, **kwargs)

        return wrapper


def _install(point: str, counter: _Counter, state: dict) -> None:
    """Patch the function where ``point`` kills (the child's own copy of the modules, nothing shared)."""
    import crp.maximization
    import crp.statistics

    import crp_invert.integration.checkpoints as checkpoints
    from crp_invert.integration.feature_visualization import InvertFeatureVisualization as FV
    from crp_invert.storage.cache import ActivationCache

    original_save_results, original_collect = FV._save_results, FV.collect_results

    def counting_save_results(self, d_index=None):
        state["checkpoint"] += 1
        return original_save_results(self, d_index)

    def flagged_collect(self, *args, **kwargs):
        state["collecting"] = True
        for result, kind in zip((self.RelMax, self.ActMax, self.RelStats, self.ActStats), KINDS):
            _track_collector(result, kind, state)  # which of CRP's result objects collects now
        return original_collect(self, *args, **kwargs)

    FV._save_results, FV.collect_results = counting_save_results, flagged_collect

    def numpy_killing(name, when):
        function = getattr(np, name)

        def wrapper(*args, **kwargs):
            if when(str(args[0]) if args else ""):
                counter.tick()
            return function(*args, **kwargs)

        crp.maximization.np = crp.statistics.np = types.SimpleNamespace(**{**vars(np), name: wrapper})

    if point == "checkpoint-save":  # the n-th file CRP saves of the second checkpoint
        numpy_killing("save", lambda file: state["checkpoint"] == 2 and not state["collecting"])
    elif point == "commit":  # logged, not yet moved into place
        checkpoints._move_stage = counter.wrap(checkpoints._move_stage)
    elif point == "flush":  # rows written, not yet marked complete
        ActivationCache.mark_complete = counter.wrap(ActivationCache.mark_complete)
    elif point.startswith("collect-targets:"):  # a Statistics object writes its targets file
        kind = point.split(":")[1]
        numpy_killing("save", lambda file: state.get("collector") == kind and file.endswith("targets.npy"))
    elif point.startswith("collect-") and ":" in point:  # the n-th file a CRP result object reads or writes
        what, kind = point[len("collect-"):].split(":")
        numpy_killing(what, lambda file: state["collecting"] and state.get("collector") == kind)
    elif point == "after-collect":  # CRP's results are complete, the logs not yet updated
        checkpoints.CheckpointLog.forget = counter.wrap(checkpoints.CheckpointLog.forget)
    elif point == "collect-deletions":  # the logs are updated, the collected checkpoints not yet deleted
        checkpoints.finish_collect = counter.wrap(checkpoints.finish_collect)


def _track_collector(result, kind: str, state: dict) -> None:
    original = result.collect_results

    def collect_results(*args, **kwargs):
        state["collector"] = kind
        return original(*args, **kwargs)

    result.collect_results = collect_results


def main(argv: list[str]) -> None:
    import crp.maximization
    import crp.statistics
    from crp.attribution import CondAttribution
    from helpers import ListDataset

    from crp_invert.integration.feature_visualization import InvertFeatureVisualization

    point, n, fv_folder, cache = argv[0], int(argv[1]), argv[2], argv[3]
    n_samples = int(argv[4]) if len(argv) > 4 else N_SAMPLES
    checkpoint = int(argv[5]) if len(argv) > 5 else CHECKPOINT
    crp.maximization.gc.collect = crp.statistics.gc.collect = lambda *a: 0  # CRP's gc dominates tiny runs
    counter, state = _Counter(n), {"checkpoint": 0, "collecting": False}
    _install(point, counter, state)

    def on_get(index):
        if point == "batch" and index == n:
            _kill()

    x, y = make_data(n_samples)
    fv = InvertFeatureVisualization(CondAttribution(make_model()), ListDataset(x, y, on_get), layer_map(),
                                    path=fv_folder, activation_cache=cache, flush_interval=0, progress=False)
    fv.run(composite(), 0, n_samples, batch_size=BATCH, checkpoint=checkpoint)
    sys.stdout.write("not killed\n")


if __name__ == "__main__":
    main(sys.argv[1:])
