"""The ``crp-invert`` command (also ``python -m crp_invert``).

A click group :func:`main` with subcommands. ``label`` lives here; other subcommands are defined in their own
modules and registered in :data:`LAZY_COMMANDS` (one line each), so that ``crp-invert --help`` stays fast and
imports nothing heavy.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Callable
from dataclasses import Field, asdict, fields
from pathlib import Path
from typing import Any, NamedTuple

import click

from . import __version__
from .core.params import MODES, SearchParams

#: Subcommands defined in other modules, imported only when used: ``name -> "module:attribute"``
#: (the attribute is a ``click.Command``). Register new subcommands here, one line each, e.g.
#: ``"demo": "crp_invert.demo.cli:demo"`` or ``"report": "crp_invert.report:report_command"``.
LAZY_COMMANDS: dict[str, str] = {
    "demo": "crp_invert.demo.cli:demo",
    "report": "crp_invert.commands:report_command",
    "find": "crp_invert.commands:find_command",
    "audit": "crp_invert.commands:audit_command",
    "record": "crp_invert.model_commands:record_command",
    "decompose": "crp_invert.model_commands:decompose_command",
}


class LazyGroup(click.Group):
    """A click group whose commands from :data:`LAZY_COMMANDS` are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None or name not in LAZY_COMMANDS:
            return command
        module_name, _, attribute = LAZY_COMMANDS[name].partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{LAZY_COMMANDS[name]} is not a click command")
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="crp-invert", message="%(prog)s %(version)s")
def main() -> None:
    """INVERT concept labels for the channels of a network (zennit / zennit-crp plugin)."""


def _load_concepts(paths: tuple[str, ...]):
    from .core.concepts import ConceptLabels

    if len(paths) == 1:
        path = Path(paths[0])
        if path.suffix.lower() != ".npz":
            raise ValueError(
                f"CONCEPTS {str(path)!r} is not an .npz; give an .npz with 'labels' (or CSR 'indices', 'indptr', "
                "'shape') and 'names', or the reference implementation's pair: ONEHOT.pt DESCRIPTION.json"
            )
        return ConceptLabels.load(path)
    if len(paths) == 2:
        tensor, description = (Path(p) for p in paths)
        if tensor.suffix.lower() == ".json" and description.suffix.lower() != ".json":
            tensor, description = description, tensor
        return ConceptLabels.from_reference(tensor, description)
    raise ValueError(f"CONCEPTS: expected one .npz or a pair ONEHOT.pt DESCRIPTION.json, got {len(paths)} files")


def _check_device(device: str) -> str:
    """The device, if this machine has it (ValueError naming the problem otherwise)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; expected cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: no CUDA GPU is available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device!r}: MPS is not available on this machine; use --device cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"--device {device!r}: only cpu, cuda[:N] and mps are supported")
    return device


class _OutFile(NamedTuple):
    """One file ``--out`` will be: a layer's LayerLabels JSON, or the folder's ``index.json`` (layer None)."""

    layer: str | None
    path: Path


def _out_files(out: Path | None, names: list[str], overwrite: bool) -> list[_OutFile]:
    """The files ``--out`` will be, each checked now, before the labeling: existing files are kept unless
    ``--overwrite``."""
    from .core.checks import check_output

    if out is None:
        return []
    if len(names) == 1 and out.suffix.lower() == ".json":
        check_output(out, overwrite=overwrite)
        return [_OutFile(names[0], out)]
    check_output(out, folder=True)
    planned: list[_OutFile] = []
    used: set[str] = set()
    for name in names:
        stem = _safe_filename(name)
        while stem in used or stem == "index":
            stem += "_"
        used.add(stem)
        planned.append(_OutFile(name, out / f"{stem}.json"))
    planned.append(_OutFile(None, out / "index.json"))
    for _, path in planned:
        check_output(path, overwrite=overwrite)
    return planned


def _one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split())


def _printable(name: str) -> str:
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in name)


def search_options(command: Callable) -> Callable:
    """Add one option per :class:`SearchParams` field to a click command and pass them as ``params=``."""

    def option_for(spec: Field) -> Callable:
        flag = f"-{spec.name}" if len(spec.name) == 1 else "--" + spec.name.replace("_", "-")
        kwargs: dict[str, Any] = dict(default=spec.default, help=spec.metadata.get("help"), show_default=True)
        if spec.name == "mode":
            kwargs["type"] = click.Choice(MODES)
        elif isinstance(spec.default, bool):
            kwargs["is_flag"] = True
        elif isinstance(spec.default, float):
            kwargs["type"] = click.FloatRange(0, 1)
        elif spec.name == "min_support":
            kwargs["type"] = click.IntRange(min=0)
        else:
            kwargs["type"] = click.IntRange(min=1)
        return click.option(flag, spec.name, **kwargs)

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        values = {spec.name: kwargs.pop(spec.name) for spec in fields(SearchParams)}
        try:
            params = SearchParams(**values)
        except (TypeError, ValueError) as err:
            raise click.UsageError(str(err)) from err
        return command(params=params, **kwargs)

    for spec in reversed(fields(SearchParams)):
        wrapper = option_for(spec)(wrapper)
    return wrapper


def _layout_text(info: dict[str, Any]) -> str:
    """``", tokens:cls"`` for a layer whose units are on the last axis (its layout and reduction), else ``""``."""
    if info.get("layout", "channels") == "channels":
        return ""
    return f", {info['layout']}:{info.get('pooling', '?')}"


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "layer"


class _Labeled(NamedTuple):
    """The labels of every layer, the files ``--out`` will be, and each layer's layout text (``_layout_text``)."""

    results: dict[str, Any]
    planned: list[_OutFile]
    layouts: dict[str, str]


@main.command("label")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.argument("concepts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--layer", "layers", multiple=True, help="Layer to label (repeatable; default: all layers of the cache)."
)
@click.option(
    "--dataset",
    default="Y",
    show_default=True,
    help="Dataset name for a plain [N, D] HDF5 file (the INVERT release format) instead of a cache.",
)
@click.option(
    "--source",
    type=click.Choice(["activation", "relevance"]),
    default="activation",
    show_default=True,
    help="Label what the activations or what the relevances of the channels detect.",
)
@search_options
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch"]),
    default="auto",
    show_default=True,
    help="Kernels: auto = numpy/scipy on the CPU, torch elsewhere; torch = the GPU kernels on any device.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=True),
    default=None,
    metavar="LABELS",
    help="LayerLabels JSON file (one layer) or folder (several layers: one LAYER.json each, and index.json).",
)
@click.option("--overwrite", is_flag=True, help="Replace existing --out files.")
@click.option("--quiet", "-q", is_flag=True, help="Do not print the table of labels or progress bars.")
def label_command(
    cache: str,
    concepts: tuple[str, ...],
    layers: tuple[str, ...],
    dataset: str,
    source: str,
    params: SearchParams,
    device: str,
    backend: str,
    out: str | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Label the channels of CACHE with formulas over the concepts in CONCEPTS.

    CACHE is an activation cache recorded by crp-invert (InvertFeatureVisualization, record_activations), or
    an HDF5 file with one [N, D] dataset (--dataset, the INVERT release format). CONCEPTS is an .npz with
    'names' and 'labels' (bool [N, K]) or CSR 'indices', 'indptr', 'shape'; or the reference implementation's
    pair of files ONEHOT.pt DESCRIPTION.json.

    Everything is checked before the labeling starts (device, --out, the concepts, the cache and its values);
    existing --out files are kept unless --overwrite is given.
    """
    from .parallel.group import distributed_session, get_rank

    out_path = Path(out) if out is not None else None
    # under torchrun (WORLD_SIZE set) the channels are split across the processes; rank 0 writes the output
    with distributed_session():
        rank = get_rank()
        try:
            labeled = _label_files(cache, concepts, layers, dataset, source, params, device, backend, out_path,
                                   overwrite, progress=not quiet and rank == 0, writes=rank == 0)
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise click.ClickException(_one_line(err)) from None
    if rank != 0:
        return
    try:
        _write_labels(labeled)
    except OSError as err:
        raise click.ClickException(f"cannot write --out {out!r}: {_one_line(err)}") from None
    if not quiet:
        _show_labels(labeled, source)


def _label_files(cache: str, concepts: tuple[str, ...], layers: tuple[str, ...], dataset: str, source: str,
                 params: SearchParams, device: str, backend: str, out: Path | None, overwrite: bool,
                 progress: bool, writes: bool) -> _Labeled:
    """Check everything (device, ``--out``, the concepts, the cache), then label; ``writes`` plans the files."""
    from .core.checks import check_output
    from .labeler import ConceptLabeler, label_cache, label_h5
    from .parallel.group import local_device
    from .storage.cache import is_activation_cache, open_for_labeling

    kwargs: dict[str, Any] = dict(asdict(params), progress=progress)
    _check_device(device)
    if out is not None:  # the quick checks first; the files once the layers are known
        check_output(out, overwrite=overwrite, folder=out.is_dir() or out.suffix.lower() != ".json")
    loaded = _load_concepts(concepts)
    labeler = ConceptLabeler(loaded, device=local_device(device), backend=backend)
    if is_activation_cache(cache):
        with open_for_labeling(cache, list(layers) or None, source, loaded.n_samples) as (opened, names):
            layouts = {name: _layout_text(opened.info(name)) for name in names}
            planned = _out_files(out, names, overwrite) if writes else []
            return _Labeled(label_cache(labeler, opened, layers=names, source=source, **kwargs), planned, layouts)
    if layers or source != "activation":
        raise click.UsageError(
            f"--layer and --source apply to activation caches; {cache} is a plain HDF5 file (use --dataset)"
        )
    planned = _out_files(out, [dataset], overwrite) if writes else []
    # label_h5 checks the dataset (N, dtype, finite values) before the labeling starts
    return _Labeled({dataset: label_h5(labeler, cache, dataset=dataset, **kwargs)}, planned, {})


def _write_labels(labeled: _Labeled) -> None:
    """Write one LayerLabels JSON per planned layer and the ``index.json`` of a folder."""
    from .core.labels import write_text_atomically

    for name, path in labeled.planned:
        path.parent.mkdir(parents=True, exist_ok=True)
        if name is not None:
            labeled.results[name].to_json(path)
    index = labeled.planned[-1] if labeled.planned else None
    if index is not None and index.layer is None:
        layers = {name: path.name for name, path in labeled.planned if name is not None}
        write_text_atomically(index.path, json.dumps(layers, indent=2))


def _show_labels(labeled: _Labeled, source: str) -> None:
    """Print each layer's table of labels, and the files written (to stderr)."""
    for name, result in labeled.results.items():
        layout = _printable(labeled.layouts.get(name, ""))
        click.echo(f"## {_printable(name)} ({source}{layout}): {result.n_reliable()} of {result.n_features} channels "
                   "have a reliable label")
        click.echo(result.table())
    for _, path in labeled.planned:
        click.echo(f"wrote {path}", err=True)
