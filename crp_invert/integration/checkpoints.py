"""CRP's checkpoints of a recording, committed one at a time, so that a process killed at any point loses no
work and leaves no stray file.

CRP's ``run_distributed`` saves its intermediate results ("checkpoints") every ``checkpoint`` batches, and
``collect_results`` reads them, deletes them and writes the final results. Neither is safe against a kill: a
half-written checkpoint looks like a finished one, and a kill inside ``collect_results`` after the deletions
loses everything. crp-invert keeps, inside CRP's folder::

    <path>/.crp-invert/
        checkpoints-<start>-<end>.jsonl   the log of the recording of samples [start, end): one JSON line per
                                          committed checkpoint (its sample span and CRP's file prefixes)
        stage-<a>-<b>/                    a checkpoint while CRP writes it; moved into place once committed
        collected.json                    checkpoint files already collected, being deleted

A checkpoint is committed by appending its line to the log after CRP wrote all its files into the stage
folder, then moved into CRP's folders (a kill during the move is finished by the next run). The log is what
``resume`` trusts: the checkpoints it lists, chained from the start of the range, are kept; everything after
them is computed again. ``collect_results`` is made repeatable by deferring CRP's deletions
(:func:`deferred_removal`): the checkpoint files stay until CRP has written its results and the log has dropped
them, so a kill anywhere inside the collect is followed by a ``resume`` that collects again. A finished run
leaves exactly CRP's files (the folder is removed when empty).

The only facts about CRP used here: its result objects have ``PATH`` (where they write) and return the
prefixes of what they wrote, its collect deletes files with ``os.remove`` of its modules, and a checkpoint
prefix ``p`` stands for the files ``p + suffix`` for the suffixes in :data:`SUFFIXES`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

__all__ = ["Checkpoint", "CheckpointLog", "KINDS", "SUFFIXES", "FOLDER", "deferred_removal", "after_collect",
           "finish_collect"]

logger = logging.getLogger(__name__)

KINDS = ("r_max", "a_max", "r_stats", "a_stats")
SUFFIXES = ("data.npy", "rf.npy", "rel.npy")
FOLDER = ".crp-invert"


@dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint: the samples ``[span[0], span[1])`` and CRP's file prefixes per kind, relative to
    CRP's folder (posix)."""

    span: tuple[int, int]
    files: dict[str, list[str]]

    def prefixes(self) -> list[str]:
        return [prefix for kind in KINDS for prefix in self.files.get(kind, [])]


def _relative(prefix: str | os.PathLike, root: Path) -> str:
    """``prefix`` relative to ``root``, posix (a string operation for what CRP writes under ``root``)."""
    prefix, base = os.fspath(prefix), os.fspath(root) + os.sep
    if prefix.startswith(base) and os.sep + ".." + os.sep not in prefix:
        relative = prefix[len(base):]
    else:
        relative = os.path.relpath(prefix, root)
    return relative.replace(os.sep, "/") if os.sep != "/" else relative


def _inside(relative: str) -> bool:
    """Whether a relative path from a log stays inside CRP's folder (a damaged or hostile log must not make us
    delete files elsewhere)."""
    return (bool(relative) and not relative.startswith(("/", "\\")) and "\x00" not in relative
            and ".." not in relative.replace("\\", "/").split("/") and not PureWindowsPath(relative).drive)


def _fsync_append(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _span(value: Any, what: str, sample_range: tuple[int, int]) -> tuple[int, int]:
    """A ``[a, b)`` pair of ints with ``range[0] <= a <= b <= range[1]`` from a log line, or ValueError."""
    if not isinstance(value, list) or len(value) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"its {what} is not a pair of integers: {value!r:.80}")
    a, b = value
    if not sample_range[0] <= a <= b <= sample_range[1]:
        raise ValueError(f"its {what} [{a}, {b}) is not an ordered part of the log's range {list(sample_range)}")
    return a, b


def _parse_record(line: str, sample_range: tuple[int, int]) -> Checkpoint | tuple[int, int]:
    """One line of a checkpoint log: a committed :class:`Checkpoint` or the range of a run started; ValueError
    for anything else (JSON of another shape, a span outside the log's range, a path outside CRP's folder, a
    span without samples that names files)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object: {line!r:.80}")
    if "run" in record:
        return _span(record["run"], "run", sample_range)
    span = _span(record.get("span"), "span", sample_range)
    files = record.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(files.get(kind, []), list) and all(isinstance(p, str) for p in files.get(kind, []))
            for kind in KINDS):
        raise ValueError("its files are not lists of paths per kind")
    files = {kind: list(files.get(kind, [])) for kind in KINDS}
    if not all(_inside(p) for kind in KINDS for p in files[kind]):
        raise ValueError("it names a path outside CRP's folder")
    if span[0] == span[1] and any(files.values()):
        raise ValueError(f"its span [{span[0]}, {span[1]}) holds no sample but names files")
    return Checkpoint(span, files)


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` and empty folders in it if it holds no file."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def _files(prefixes: Iterable[str]) -> list[str]:
    return [prefix + suffix for prefix in prefixes for suffix in SUFFIXES]


def _readable(prefix: str) -> bool:
    for file in _files([prefix]):
        try:
            np.load(file, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            return False
    return True


class CheckpointLog:
    """The committed checkpoints of the recording of samples ``sample_range`` into CRP's folder ``root``.

    Parameters
    ----------
    root : str or os.PathLike
        CRP's folder (``path=`` of the FeatureVisualization; the parent of its ``RelMax.PATH``).
    sample_range : (int, int)
        The rows of the activation cache (one log per cache, so that shards never share one).
    """

    def __init__(self, root: str | os.PathLike, sample_range: tuple[int, int]) -> None:
        self.root = Path(root)
        self.range = (int(sample_range[0]), int(sample_range[1]))
        self.folder = self.root / FOLDER
        self.path = self.folder / f"checkpoints-{self.range[0]}-{self.range[1]}.jsonl"

    def exists(self) -> bool:
        """Whether a recording of this range was started and its checkpoints are not all collected."""
        return self.path.is_file()

    def read(self) -> list[Checkpoint]:
        """The committed checkpoints in order (reading stops at a damaged line, e.g. one cut by a kill)."""
        return self._records()[1]

    def _records(self) -> tuple[tuple[int, int] | None, list[Checkpoint]]:
        """The range of the last run started (None if none is logged) and the committed checkpoints.

        Any content ends: a line that is not a record of ours (cut by a kill, edited, binary) stops the reading,
        and what follows is computed again."""
        run, entries = None, []
        if not self.path.is_file():
            return run, entries
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            try:
                record = _parse_record(line, self.range)
            except ValueError as err:
                logger.warning("%s: line %d is damaged (%s); checkpoints from there on are redone",
                               self.path, number, err)
                break
            if isinstance(record, Checkpoint):
                entries.append(record)
            else:
                run = record
        return run, entries

    def _write(self, entries: Sequence[Checkpoint], run: tuple[int, int] | None) -> None:
        lines = [json.dumps({"span": list(e.span), "files": e.files}) for e in entries]
        if run is not None:
            lines.insert(0, json.dumps({"run": list(run)}))
        self.folder.mkdir(parents=True, exist_ok=True)
        _replace_text(self.path, "".join(line + "\n" for line in lines))

    def absolute(self, entry: Checkpoint) -> dict[str, list[str]]:
        """CRP's prefixes of a checkpoint, as CRP returns them (joined to CRP's folder)."""
        return {kind: [str(self.root / p) for p in entry.files.get(kind, [])] for kind in KINDS}

    def _recover_stages(self) -> None:
        """Finish moving committed stages of this range into place; remove uncommitted ones."""
        if not self.folder.is_dir():
            return
        committed = {entry.span for entry in self.read()}
        for stage in self.folder.glob("stage-*-*"):
            try:
                span = tuple(int(v) for v in stage.name.split("-")[1:3])
            except ValueError:
                continue
            if not (self.range[0] <= span[0] and span[1] <= self.range[1]):
                continue  # another recording's (e.g. another rank's) stage
            if span in committed:
                _move_stage(stage, self.root)
            else:
                shutil.rmtree(stage, ignore_errors=True)

    def start(self, data_start: int, data_end: int) -> None:
        """A run over ``[data_start, data_end)`` begins: earlier checkpoints overlapping it are obsolete (their
        files are deleted), the rest stay; the log exists from now on until the checkpoints are collected."""
        self._recover_stages()
        keep, drop = [], []
        for entry in self.read():
            (drop if entry.span[0] < data_end and entry.span[1] > data_start else keep).append(entry)
        for entry in drop:
            for file in _files(_files_of(self, entry)):
                Path(file).unlink(missing_ok=True)
        self._write(keep, (data_start, data_end))

    @contextlib.contextmanager
    def staging(self, span: tuple[int, int], results: Sequence[Any]) -> Iterator[_Stage]:
        """Point CRP's result objects (``RelMax``, ...) into a stage folder while CRP saves the checkpoint
        ``span``; :meth:`_Stage.commit` logs it and moves it into place."""
        stage = self.folder / f"stage-{span[0]}-{span[1]}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        paths = [result.PATH for result in results]
        try:
            for result, path in zip(results, paths, strict=True):
                result.PATH = stage / Path(path).relative_to(self.root)
                result.PATH.mkdir(parents=True, exist_ok=True)  # CRP makes its folders in its constructor
            yield _Stage(self, stage, span)
        finally:
            for result, path in zip(results, paths, strict=True):
                result.PATH = path

    def chain(self, start: int, limit: int) -> list[Checkpoint]:
        """The committed checkpoints that continue each other from ``start`` up to at most ``limit`` and whose
        files are all readable.

        Ends on any log: every step moves strictly forward (spans without samples, which CRP saves with no file
        when the last batch ended on a checkpoint, are skipped); of spans logged twice from the same start, the
        one logged last is used (the earlier commit was redone)."""
        self._recover_stages()
        by_start = {entry.span[0]: entry for entry in self.read() if entry.span[1] > entry.span[0]}
        chain, position = [], start
        while position in by_start and position < by_start[position].span[1] <= limit:
            entry = by_start.pop(position)  # popped: no entry is visited twice
            if not all(_readable(prefix) for prefix in _files_of(self, entry)):
                logger.warning("checkpoint of samples [%d, %d) in %s is damaged; it is computed again",
                               entry.span[0], entry.span[1], self.root)
                break
            chain.append(entry)
            position = entry.span[1]
        return chain

    def forget(self, collected: set[str]) -> None:
        """Drop the checkpoints whose files were collected; remove the log when none is left and the collected
        ones covered the last run (a run that committed nothing yet keeps its log: it is not finished)."""
        run, entries = self._records()
        remaining = [e for e in entries if not set(e.prefixes()) <= collected]
        done = sorted(e.span for e in entries if e not in remaining)
        position = run[0] if run is not None else None
        for a, b in done:
            if position is not None and a <= position < b:
                position = b
        if not remaining and (run is None or position >= run[1]):
            self.path.unlink(missing_ok=True)
        elif len(remaining) < len(entries):
            self._write(remaining, run)


def _files_of(log: CheckpointLog, entry: Checkpoint) -> list[str]:
    return [prefix for kind in KINDS for prefix in log.absolute(entry)[kind]]


def _move_stage(stage: Path, root: Path) -> None:
    """Move every file of ``stage`` to the same place under ``root``, then remove ``stage``."""
    for folder, _, names in os.walk(stage):
        target = os.path.join(root, os.path.relpath(folder, stage))
        os.makedirs(target, exist_ok=True)
        for name in names:
            os.replace(os.path.join(folder, name), os.path.join(target, name))
    shutil.rmtree(stage, ignore_errors=True)


class _Stage:
    """A checkpoint being saved into ``stage`` (see :meth:`CheckpointLog.staging`)."""

    def __init__(self, log: CheckpointLog, stage: Path, span: tuple[int, int]) -> None:
        self.log, self.stage, self.span = log, stage, span

    def commit(self, written: dict[str, list[str]]) -> dict[str, list[str]]:
        """Log the checkpoint (CRP's prefixes ``written`` into the stage), move it into place and return the
        prefixes as CRP would have returned them without the stage."""
        files = {kind: [_relative(p, self.stage) for p in written.get(kind, [])] for kind in KINDS}
        outside = [p for kind in KINDS for p in files[kind] if not _inside(p)]
        if outside:
            raise RuntimeError(f"CRP wrote checkpoint files outside its folder: {outside[:3]}")
        entry = Checkpoint(self.span, files)
        _fsync_append(self.log.path, json.dumps({"span": list(entry.span), "files": entry.files}))
        _move_stage(self.stage, self.log.root)
        return self.log.absolute(entry)


def _logs(root: str | os.PathLike) -> list[CheckpointLog]:
    """The logs of every recording into CRP's folder ``root``."""
    logs = []
    for path in sorted((Path(root) / FOLDER).glob("checkpoints-*-*.jsonl")):
        try:
            start, end = (int(v) for v in path.stem.split("-")[1:3])
        except ValueError:
            continue
        logs.append(CheckpointLog(root, (start, end)))
    return logs


class _RemovalRecorder:
    """Stands in for the ``os`` module of CRP's result modules: ``remove`` records the path, the rest is ``os``."""

    def __init__(self, removed: list[str]) -> None:
        self._removed = removed

    def remove(self, path, *args, **kwargs) -> None:
        self._removed.append(os.fspath(path))

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@contextlib.contextmanager
def deferred_removal(modules: Sequence[Any]) -> Iterator[list[str]]:
    """Within the block, ``os.remove`` called by the given modules (CRP's ``crp.maximization`` and
    ``crp.statistics``, whose ``collect_results`` delete the checkpoints they read) only records the path; the
    list of recorded paths is yielded. Not thread-safe."""
    removed: list[str] = []
    originals = [module.os for module in modules]
    try:
        for module in modules:
            module.os = _RemovalRecorder(removed)
        yield removed
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.os = original


def _journal(root: str | os.PathLike) -> Path:
    return Path(root) / FOLDER / "collected.json"


def finish_collect(root: str | os.PathLike) -> None:
    """Delete the checkpoint files a collect killed while deleting them left behind (they were collected).

    Any journal ends: one cut by a kill, not a list, or naming files that are gone, folders or paths outside
    CRP's folder deletes only the files it names inside CRP's folder; a journal that is not a file is refused
    (ValueError naming it)."""
    journal = _journal(root)
    if not journal.exists() and not journal.is_symlink():
        return
    if not journal.is_file():
        raise ValueError(f"{str(journal)!r} (crp-invert's journal of a collect) is not a file; remove it and resume")
    try:
        files = json.loads(journal.read_bytes().decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):  # cut by a kill while written: the logs still list those checkpoints
        files = []
    for relative in files if isinstance(files, list) else []:
        if isinstance(relative, str) and _inside(relative):
            target = Path(root) / relative
            if target.is_file() or target.is_symlink():
                target.unlink(missing_ok=True)
            elif target.exists():
                logger.warning("%s names %s, which is not a file; left as it is", journal, target)
    journal.unlink(missing_ok=True)
    remove_if_empty(Path(root) / FOLDER)


def after_collect(root: str | os.PathLike, prefixes: Sequence[str], removed: Sequence[str]) -> None:
    """After CRP's ``collect_results`` wrote its results: drop the collected checkpoints from every log in CRP's
    folder, then delete the files CRP wanted to delete (``removed``), through a journal so that a kill in between
    leaves no stray file."""
    root = Path(root)
    journal = _journal(root)
    journal.parent.mkdir(parents=True, exist_ok=True)
    _replace_text(journal, json.dumps([_relative(p, root) for p in removed]))
    collected = {_relative(p, root) for p in prefixes}
    for log in _logs(root):
        log.forget(collected)
    finish_collect(root)
