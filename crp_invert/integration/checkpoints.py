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
        collect-backup/                   hard links of the checkpoint files ``collect_results`` reads

A checkpoint is committed by appending its line to the log after CRP wrote all its files into the stage
folder, then moved into CRP's folders (a kill during the move is finished by the next run). The log is what
``resume`` trusts: the checkpoints it lists, chained from the start of the range, are kept; everything after
them is computed again. The backup makes ``collect_results`` repeatable: a kill after CRP deleted some
checkpoints is followed by a ``resume`` that links them back and collects again. Once collected, the
checkpoints leave the log, and the folder is removed when empty, so that a finished run leaves exactly CRP's
files.

The only facts about CRP used here: its result objects have ``PATH`` (where they write) and return the
prefixes of what they wrote, and a checkpoint prefix ``p`` stands for the files ``p + suffix`` for the
suffixes in :data:`SUFFIXES`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["Checkpoint", "CheckpointLog", "CollectBackup", "KINDS", "SUFFIXES", "FOLDER", "before_collect",
           "after_collect", "settle_backup"]

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
    return PurePosixPath(Path(os.path.relpath(prefix, root))).as_posix()


def _inside(relative: str) -> bool:
    """Whether a relative path from a log stays inside CRP's folder (a damaged or hostile log must not make us
    delete files elsewhere)."""
    path = PurePosixPath(relative)
    return bool(relative) and not path.is_absolute() and ".." not in path.parts and "\x00" not in relative


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


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` and empty folders in it if it holds no file."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # no hard links on this filesystem
        shutil.copy2(source, target)


class CollectBackup:
    """Hard links of checkpoint files, kept while CRP's ``collect_results`` reads and deletes them."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.folder = self.root / FOLDER / "collect-backup"

    def _backup_of(self, file: str | os.PathLike) -> Path | None:
        relative = _relative(file, self.root)
        return self.folder / relative if _inside(relative) else None

    def restore(self, file: str | os.PathLike) -> None:
        """Link ``file`` back from the backup if it is missing and backed up."""
        backup = self._backup_of(file)
        if backup is not None and backup.is_file() and not os.path.exists(file):
            _link_or_copy(backup, Path(file))
            logger.info("restored %s from the backup of an interrupted collect", file)

    def save(self, files: Iterable[str]) -> None:
        """Back up the given files (those outside CRP's folder are not backed up)."""
        for file in files:
            backup = self._backup_of(file)
            if backup is None or not os.path.isfile(file):
                continue
            if backup.exists():
                backup.unlink()
            _link_or_copy(Path(file), backup)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _files(prefixes: Iterable[str]) -> list[str]:
    return [prefix + suffix for prefix in prefixes for suffix in SUFFIXES]


def _readable(prefix: str, backup: CollectBackup) -> bool:
    for file in _files([prefix]):
        backup.restore(file)
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
        if not self.path.is_file():
            return []
        entries = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
                if "run" in record:
                    continue
                span = tuple(int(v) for v in record["span"])
                files = {kind: [str(p) for p in record["files"].get(kind, [])] for kind in KINDS}
                if len(span) != 2 or not all(_inside(p) for kind in KINDS for p in files[kind]):
                    raise ValueError("bad span or a path outside CRP's folder")
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                logger.warning("%s: line %d is damaged (%s); checkpoints from there on are redone",
                               self.path, number, err)
                break
            entries.append(Checkpoint(span, files))
        return entries

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
    def staging(self, span: tuple[int, int], results: Sequence[Any]) -> Iterator["_Stage"]:
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

    def chain(self, start: int, limit: int, backup: CollectBackup) -> list[Checkpoint]:
        """The committed checkpoints that continue each other from ``start`` up to at most ``limit`` and whose
        files are all readable (missing ones are linked back from an interrupted collect's backup)."""
        self._recover_stages()
        by_start = {entry.span[0]: entry for entry in self.read()}
        chain, position = [], start
        while position in by_start and by_start[position].span[1] <= limit:
            entry = by_start[position]
            if not all(_readable(prefix, backup) for prefix in _files_of(self, entry)):
                logger.warning("checkpoint of samples [%d, %d) in %s is damaged; it is computed again",
                               entry.span[0], entry.span[1], self.root)
                break
            chain.append(entry)
            position = entry.span[1]
        return chain

    def forget(self, collected: set[str]) -> None:
        """Drop the checkpoints whose files were collected; remove the log when none is left."""
        entries = self.read()
        remaining = [e for e in entries if not set(e.prefixes()) <= collected]
        if len(remaining) == len(entries):
            return
        if remaining:
            self._write(remaining, None)
        else:
            self.path.unlink(missing_ok=True)


def _files_of(log: CheckpointLog, entry: Checkpoint) -> list[str]:
    return [prefix for kind in KINDS for prefix in log.absolute(entry)[kind]]


def _move_stage(stage: Path, root: Path) -> None:
    for file in sorted(p for p in stage.rglob("*") if p.is_file()):
        target = root / file.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
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


def logged_prefixes(root: str | os.PathLike) -> list[str]:
    """The prefixes of every checkpoint logged (and not yet collected) in CRP's folder ``root``."""
    return [p for log in _logs(root) for entry in log.read() for p in _files_of(log, entry)]


def settle_backup(root: str | os.PathLike) -> CollectBackup:
    """Link back every logged checkpoint file an interrupted collect deleted, then empty the backup."""
    backup = CollectBackup(root)
    for file in _files(logged_prefixes(root)):
        backup.restore(file)
    backup.clear()
    return backup


def before_collect(root: str | os.PathLike, prefixes: Sequence[str]) -> None:
    """Before CRP's ``collect_results`` reads and deletes the checkpoints ``prefixes``: make the files of an
    interrupted earlier collect whole again and back up these ones."""
    backup = CollectBackup(root)
    for file in _files(prefixes):
        backup.restore(file)
    settle_backup(root).save(_files(prefixes))


def after_collect(root: str | os.PathLike, prefixes: Sequence[str]) -> None:
    """After CRP's ``collect_results``: drop the collected checkpoints from every log in CRP's folder, then the
    backup, then the folder of crp-invert if nothing is left in it."""
    root = Path(root)
    collected = {_relative(p, root) for p in prefixes}
    for log in _logs(root):
        log.forget(collected)
    CollectBackup(root).clear()
    remove_if_empty(root / FOLDER)
