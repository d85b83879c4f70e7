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
from dataclasses import Field, asdict, fields
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .core.params import MODES, SearchParams

#: Subcommands defined in other modules, imported only when used: ``name -> "module:attribute"``
#: (the attribute is a ``click.Command``). Register new subcommands here, one line each, e.g.
#: ``"demo": "crp_invert.demo.cli:demo"`` or ``"report": "crp_invert.report:report_command"``.
LAZY_COMMANDS: dict[str, str] = {
    "demo": "crp_invert.demo.cli:demo",
    "report": "crp_invert.report:report_command",
    "find": "crp_invert.commands:find_command",
    "audit": "crp_invert.commands:audit_command",
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
            raise click.BadParameter(
                f"{path} is not an .npz; give an .npz with 'labels' (or CSR 'indices', 'indptr', 'shape') "
                "and "
                "'names', or the reference implementation's pair: ONEHOT.pt DESCRIPTION.json",
                param_hint="LABELS",
            )
        return ConceptLabels.load(path)
    if len(paths) == 2:
        tensor, description = (Path(p) for p in paths)
        if tensor.suffix.lower() == ".json" and description.suffix.lower() != ".json":
            tensor, description = description, tensor
        return ConceptLabels.from_reference(tensor, description)
    raise click.BadParameter(
        f"expected one .npz or a pair ONEHOT.pt DESCRIPTION.json, got {len(paths)} files", param_hint="LABELS"
    )


def _is_activation_cache(path: str) -> bool:
    from .storage.cache import FORMAT
    from .storage.h5 import open_h5

    with open_h5(path, "r") as file:
        return file.attrs.get("format") == FORMAT


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


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "layer"


@main.command("label")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.argument("labels", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
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
    "--out",
    "out",
    type=click.Path(dir_okay=True),
    default=None,
    help="JSON file (one layer) or folder (several layers: one LAYER.json each).",
)
@click.option("--quiet", "-q", is_flag=True, help="Do not print the table of labels or progress bars.")
def label_command(
    cache: str,
    labels: tuple[str, ...],
    layers: tuple[str, ...],
    dataset: str,
    source: str,
    params: SearchParams,
    device: str,
    out: str | None,
    quiet: bool,
) -> None:
    """Label the channels of CACHE with formulas over the concepts in LABELS.

    CACHE is an activation cache recorded by crp-invert (InvertFeatureVisualization, record_activations), or
    an HDF5 file with one [N, D] dataset (--dataset, the INVERT release format). LABELS is an .npz with
    'names' and 'labels' (bool [N, K]) or CSR 'indices', 'indptr', 'shape'; or the reference implementation's
    pair of files ONEHOT.pt DESCRIPTION.json.
    """
    from .labeler import ConceptLabeler, label_cache, label_h5
    from .parallel.group import distributed_session, get_rank, local_device

    # under torchrun (WORLD_SIZE set) the channels are split across the processes; rank 0 writes the output
    with distributed_session():
        rank = get_rank()
        kwargs: dict[str, Any] = dict(asdict(params), progress=not quiet and rank == 0)
        try:
            concepts = _load_concepts(labels)
            labeler = ConceptLabeler(concepts, device=local_device(device))
            if _is_activation_cache(cache):
                results = label_cache(labeler, cache, layers=list(layers) or None, source=source, **kwargs)
            else:
                if layers or source != "activation":
                    raise click.UsageError(
                        "--layer and --source apply to activation caches; "
                        f"{cache} is a plain HDF5 file (use --dataset)"
                    )
                results = {dataset: label_h5(labeler, cache, dataset=dataset, **kwargs)}
        except (KeyError, ValueError, TypeError, FileNotFoundError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise click.ClickException(str(message)) from err
    if rank != 0:
        return

    written = []
    if out is not None:
        out_path = Path(out)
        if len(results) == 1 and out_path.suffix.lower() == ".json":
            out_path.parent.mkdir(parents=True, exist_ok=True)
            next(iter(results.values())).to_json(out_path)
            written.append(out_path)
        else:
            out_path.mkdir(parents=True, exist_ok=True)
            used: set[str] = set()
            for name, result in results.items():
                stem = _safe_filename(name)
                while stem in used:
                    stem += "_"
                used.add(stem)
                result.to_json(out_path / f"{stem}.json")
                written.append(out_path / f"{stem}.json")
            (out_path / "index.json").write_text(
                json.dumps({name: path.name for name, path in zip(results, written, strict=True)}, indent=2)
            )
    if not quiet:
        for name, result in results.items():
            click.echo(f"## {name} ({source})")
            click.echo(result.table())
        for path in written:
            click.echo(f"wrote {path}", err=True)
