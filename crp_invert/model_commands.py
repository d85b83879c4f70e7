"""The commands that need the model: ``crp-invert record`` (a model's layers into an activation cache) and
``crp-invert decompose`` (a prediction split into the labeled heatmaps of a layer's units).

The model and the dataset come from Python: ``--model FILE.py:function`` (or ``package.module:function``)
returns a ``torch.nn.Module``, ``--data`` a dataset of ``(input, target)`` pairs (a torch ``Dataset``).
Without ``--relevances`` the activations are recorded with plain forward hooks
(:func:`~crp_invert.integration.hooks.record_activations`); with ``--relevances gradient-x-input`` CRP's
``FeatureVisualization`` runs with :class:`~crp_invert.integration.vit.GradientTimesInput` and records
activations and relevances (the attribution that runs on torchvision's ViT; CRP's reference files go to
``--crp-dir``).

Each layer's unit layout is ``--layout NAME=LAYOUT`` (``tokens:cls``, ``tokens:mean``, ``tokens:max``,
``channels``, ...): a layer with a 3-D output and no layout is refused.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import click

__all__ = ["record_command", "decompose_command", "load_callable", "parse_layout_options", "part_lines"]


def load_callable(spec: str) -> Callable:
    """The function named by ``"FILE.py:name"`` or ``"package.module:name"``."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ValueError(f"expected FILE.py:function or module:function, got {spec!r}")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{spec!r}: no file {source!r}")
        module_name = f"_crp_invert_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # pickling and dataclasses look the module up
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{spec!r}: {source!r} has no callable {name!r}")
    return function


def parse_layout_options(options: tuple[str, ...], layers: list[str]) -> dict[str, str]:
    """``("encoder=tokens:cls", ...)`` -> ``{"encoder": "tokens:cls"}``; every name must be a recorded layer."""
    from .integration.layouts import parse_layout

    result = {}
    for option in options:
        name, sep, layout = option.rpartition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=LAYOUT (e.g. encoder=tokens:cls), got {option!r}",
                                     param_hint="--layout")
        if name not in layers:
            raise click.BadParameter(f"layer {name!r} is not recorded (--layer): {layers}", param_hint="--layout")
        try:
            parse_layout(layout)
        except (TypeError, ValueError) as err:
            raise click.BadParameter(str(err), param_hint="--layout") from None
        result[name] = layout
    return result


def _record(model, dataset, layers: list[str], layouts: dict[str, str], cache: str, relevances: str | None,
            crp_dir: str | None, batch_size: int, pooling: str, overwrite: bool, progress: bool) -> None:
    import torch

    if relevances is None:
        from .integration.hooks import record_activations

        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        record_activations(model, loader, layers, cache, pooling=pooling, layouts=layouts, overwrite=overwrite,
                           progress=progress).close()
        return
    from .integration.feature_visualization import InvertFeatureVisualization
    from .integration.layouts import layout_concepts
    from .integration.vit import GradientTimesInput

    layer_map = layout_concepts(layers, layouts)
    folder = crp_dir if crp_dir is not None else str(Path(cache).with_suffix("")) + "-crp"
    fv = InvertFeatureVisualization(GradientTimesInput(model), dataset, layer_map, path=folder,
                                    activation_cache=cache, pooling=pooling, layouts=layouts,
                                    overwrite=overwrite, progress=progress)
    fv.run(None, 0, len(dataset), batch_size=batch_size, checkpoint=max(batch_size, 500))


def part_lines(part, labeled: bool) -> list[str]:
    """One line per unit of a glocal explanation: its share and what its title shows ("no reliable label", or
    with evidence "no reliable label holds here", where no label is shown); ``-`` without labels."""
    texts = part.shown_texts() if labeled else ["-"] * len(part.channels)
    return [f"unit {unit:5d}  share {share:+.3f}  {text}"
            for unit, share, text in zip(part.channels.tolist(), part.share.tolist(), texts, strict=True)]


@click.command("record")
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--model", "model_spec", required=True,
              help="FILE.py:function or module:function returning the model (put in eval mode).")
@click.option("--data", "data_spec", required=True,
              help="FILE.py:function or module:function returning the dataset of (input, target) pairs.")
@click.option("--layer", "layers", multiple=True, required=True, help="Module name to record (repeatable).")
@click.option("--layout", "layout_options", multiple=True,
              help="NAME=LAYOUT: unit layout of a layer, e.g. encoder=tokens:cls, "
                   "encoder.layers.encoder_layer_1=tokens:mean, features.3=channels (repeatable).")
@click.option("--pooling", type=click.Choice(["mean", "max", "sum"]), default="mean", show_default=True,
              help="Reduction over space (channels) or tokens (tokens layouts without their own).")
@click.option("--relevances", type=click.Choice(["gradient-x-input"]), default=None,
              help="Also record relevances (CRP FeatureVisualization with gradient x input).")
@click.option("--crp-dir", default=None, help="Folder of CRP's files with --relevances (default CACHE-crp).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing CACHE.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def record_command(cache: str, model_spec: str, data_spec: str, layers: tuple[str, ...],
                   layout_options: tuple[str, ...], pooling: str, relevances: str | None, crp_dir: str | None,
                   batch_size: int, overwrite: bool, quiet: bool) -> None:
    """Record the LAYERs of a model over a dataset into the activation cache CACHE.

    An existing CACHE is continued (rows already recorded are skipped) unless --overwrite is given; one
    recorded with another model, layout or pooling is refused.
    """
    names = list(dict.fromkeys(layers))
    layouts = parse_layout_options(layout_options, names)
    if Path(cache).exists() and not overwrite:
        click.echo(f"continuing {cache} (use --overwrite to start afresh)", err=True)
    try:
        model = load_callable(model_spec)()
        dataset = load_callable(data_spec)()
        _record(model, dataset, names, layouts, cache, relevances, crp_dir, batch_size, pooling, overwrite,
                not quiet)
    except (KeyError, ValueError, TypeError, OSError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        raise click.ClickException(" ".join(message.split())) from None
    if not quiet:
        click.echo(f"wrote {cache}", err=True)


def _decompose(model, dataset, layer: str, cache: str, labels_paths: tuple[str, ...], concepts_path: str | None,
               samples: list[int], top_k: int) -> list:
    """Decompose the samples' heatmaps over ``layer``'s units (gradient x input), labeled, with evidence."""
    import torch

    from .core.concepts import ConceptLabels
    from .integration.glocal import Evidence, decompose_batch
    from .integration.vit import GradientTimesInput, decompose_units
    from .report import load_labels
    from .storage.cache import ActivationCache

    layer_labels = load_labels(labels_paths).get(layer) if labels_paths else None
    concepts = ConceptLabels.load(concepts_path) if concepts_path else None
    for index in samples:
        if not 0 <= index < len(dataset):
            raise ValueError(f"--sample {index} is out of range: the dataset has {len(dataset)} samples")
    images = torch.stack([dataset[index][0] for index in samples])
    with ActivationCache(cache) as opened:
        if layer not in opened:
            raise KeyError(f"layer {layer!r} is not in {cache}; layers: {opened.layers}")
        evidence = Evidence(opened, concepts=concepts, sample_index=samples)
        tokens = opened.info(layer).get("layout", "channels") == "tokens"
        decompose = decompose_units if tokens else decompose_batch
        return decompose(GradientTimesInput(model), images, None, layer, None, labels=layer_labels, top_k=top_k,
                         evidence=evidence)


@click.command("decompose")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_spec", required=True, help="FILE.py:function or module:function (the model).")
@click.option("--data", "data_spec", required=True, help="FILE.py:function or module:function (the dataset).")
@click.option("--layer", required=True, help="The layer whose units decompose the heatmap (recorded in CACHE).")
@click.option("--labels", "labels_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="LayerLabels JSON files or an index.json (crp-invert label --out): label each unit.")
@click.option("--concepts", "concepts_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Concepts (.npz) of CACHE's samples: does each unit's label hold for the sample?")
@click.option("--sample", "samples", multiple=True, type=click.IntRange(min=0), required=True,
              help="Dataset index of a sample to explain (repeatable).")
@click.option("--top-k", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="JSON file: a list of glocal explanations, one per sample.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def decompose_command(cache: str, model_spec: str, data_spec: str, layer: str, labels_paths: tuple[str, ...],
                      concepts_path: str | None, samples: tuple[int, ...], top_k: int, out: str | None,
                      overwrite: bool) -> None:
    """Split the heatmaps of the predicted classes of SAMPLEs into the conditional heatmaps of a layer's top
    units (gradient x input; the unit layout is read from CACHE), with their labels and evidence."""
    import json

    from .core.checks import check_output

    try:
        if out is not None:
            check_output(out, overwrite=overwrite)
        parts = _decompose(load_callable(model_spec)(), load_callable(data_spec)(), layer, cache, labels_paths,
                           concepts_path, list(samples), top_k)
    except (KeyError, ValueError, TypeError, OSError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        raise click.ClickException(" ".join(message.split())) from None
    for index, part in zip(samples, parts, strict=True):
        click.echo(f"## sample {index}, class {part.target}, layer {part.layer} "
                   f"(completeness error {part.completeness_error():.1e})")
        for line in part_lines(part, labeled=bool(labels_paths)):
            click.echo(line)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps([part.to_dict() for part in parts]), encoding="utf-8")
        click.echo(f"wrote {out}", err=True)
