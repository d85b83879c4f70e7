"""The ``crp-invert find``, ``crp-invert audit`` and ``crp-invert report`` commands: concept search, the
Clever-Hans audit and the HTML report from files.

Registered in :data:`crp_invert.cli.LAZY_COMMANDS`; the work is done by :func:`crp_invert.find.find_channels`,
:func:`crp_invert.audit.audit` and :func:`crp_invert.report.write_report`.
"""

from __future__ import annotations

from pathlib import Path

import click

from .core.checks import check_output

__all__ = ["find_command", "audit_command", "report_command"]

_SOURCE = click.Choice(["activation", "relevance"])


def _errors_as_click(function):
    """Run ``function``; turn the library's KeyError / ValueError / TypeError into a clean ClickException."""
    try:
        return function()
    except (KeyError, ValueError, TypeError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise click.ClickException(str(message)) from error


def _channel_labels(paths: tuple) -> dict | None:
    from .storage.label_files import load_labels

    return load_labels(paths) if paths else None


@click.command("find")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.argument("concepts", type=click.Path(exists=True, dir_okay=False))
@click.argument("formula")
@click.option("--layer", "layers", multiple=True, help="Layer to search (repeatable; default: all layers).")
@click.option("--source", type=_SOURCE, default="activation", show_default=True,
              help="Rank the channels' activations or their relevances.")
@click.option("--mode", type=click.Choice(["positive", "negative"]), default="positive", show_default=True,
              help="Highest AUC first, or lowest first (channels that are off where the formula holds).")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True,
              help="Channels to show and write (0: all).")
# --channel-labels / --no-channel-labels: the spellings before LABELS meant LayerLabels JSON everywhere
@click.option("--labels", "--channel-labels", "channel_labels", multiple=True, metavar="LABELS",
              type=click.Path(exists=True, dir_okay=False),
              help="LayerLabels JSON files or an index.json (crp-invert label --out) to show each channel's own "
                   "label (repeatable) [default: labels/index.json next to CACHE, labels_relevance/ for --source "
                   "relevance].")
@click.option("--no-labels", "--no-channel-labels", "no_channel_labels", is_flag=True,
              help="Show no channel labels.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the result as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="Do not print the table.")
def find_command(cache: str, concepts: str, formula: str, layers: tuple, source: str, mode: str, top: int,
                 channel_labels: tuple, no_channel_labels: bool, out: str | None, overwrite: bool, device: str,
                 quiet: bool) -> None:
    """Rank the channels of CACHE by the exact AUC of FORMULA over the concepts in CONCEPTS (.npz).

    FORMULA is any formula over the concept names, e.g. "dog AND NOT cat" (quote names with spaces:
    '"big square" OR red'). P-values are one-sided Mann-Whitney U; q-values Benjamini-Hochberg over all
    channels searched.
    """
    from .core.concepts import ConceptLabels
    from .find import find_channels, labels_next_to

    label_files = () if no_channel_labels else channel_labels
    if not label_files and not no_channel_labels:
        found = labels_next_to(cache, source)
        label_files = () if found is None else (str(found),)
        if found is not None and not quiet:
            click.echo(f"channel labels: {found} (--no-labels to leave them out)", err=True)

    def run():
        if out is not None:
            check_output(out, overwrite=overwrite)
        return find_channels(formula, cache, ConceptLabels.load(concepts), layers=list(layers) or None,
                             source=source, mode=mode,
                             labels=_channel_labels(label_files), device=device)

    result = _errors_as_click(run).top(top or None)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        result.to_json(out)
        click.echo(f"wrote {out}", err=True)
    if not quiet:
        click.echo(result.table())


def _read_targets(path: str):
    """Class indices from .npy, .npz (array 'targets') or text (one int per line or comma separated)."""
    import numpy as np

    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "targets" not in data:
                raise KeyError(f"{path} has no array 'targets' (it has {sorted(data.files)})")
            return data["targets"]
    text = Path(path).read_text(encoding="utf-8").replace(",", " ").split()
    try:
        return np.array([int(value) for value in text], dtype=np.int64)
    except ValueError as error:
        raise ValueError(f"{path}: expected class indices (ints), {error}") from error


def _read_classes(path: str):
    """(class names, class concepts or None) from a JSON list of names or an object name -> concepts."""
    import json

    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
    if isinstance(data, list) and all(isinstance(name, str) for name in data):
        return data, None
    if isinstance(data, dict) and all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                      for v in data.values()):
        return list(data), {name: tuple(concepts) for name, concepts in data.items()}
    raise ValueError(f"{path} must hold a JSON list of class names (index = class) or an object class name -> "
                     "list of its concepts")


@click.command("audit")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.argument("labels", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--targets", "targets_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Class of every sample of CACHE: .npy, .npz ('targets') or text with one int per line.")
@click.option("--classes", "classes_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON: a list of class names (index = class), or an object class name -> its concepts.")
@click.option("--artifact", "artifacts", multiple=True, help="A concept marked as an artifact (repeatable).")
@click.option("--concepts", "concepts_path", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="CONCEPTS",
              help="The concepts (.npz) of CACHE's samples, the artifact among them: which channels detect the "
                   "artifact (AUC, q), and class concepts from the data when --classes is a list (those of >= 90% "
                   "of a class's samples). Without it, channels whose reliable label asserts the artifact are flagged.")
@click.option("--layer", "layers", multiple=True, help="Layer to audit (repeatable; default: every labeled layer).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Channels per class.")
@click.option("--min-share", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Flags count from this share of a class's relevance.")
@click.option("--min-artifact-auc", type=click.FloatRange(0.5, 1), default=0.9, show_default=True,
              help="A channel detects an --artifact with at least this AUC (and q < 0.05); needs --concepts.")
@click.option("--out", type=click.Path(dir_okay=False), default="audit.json", show_default=True,
              help="JSON file: a list with one audit per layer.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--quiet", "-q", is_flag=True, help="Do not print the audit.")
def audit_command(cache: str, labels: tuple, targets_path: str, classes_path: str, artifacts: tuple,
                  concepts_path: str | None, layers: tuple, top: int, min_share: float, min_artifact_auc: float,
                  out: str, overwrite: bool, quiet: bool) -> None:
    """Clever-Hans audit: for every class, the channels of a layer with the largest share of its relevance
    (recorded in CACHE), flagged where they detect an --artifact concept (AUC and q of their activations, with
    --concepts) or where no reliable label (LABELS: LayerLabels JSON or index.json) names one of the class's
    concepts. Ends with one verdict line per class; an --artifact name that no concept or label knows is an error.
    """
    import json

    from .audit import audit
    from .core.concepts import ConceptLabels

    def run():
        check_output(out, overwrite=overwrite)
        channel_labels = _channel_labels(labels)
        targets = _read_targets(targets_path)
        class_names, class_concepts = _read_classes(classes_path)
        concepts = ConceptLabels.load(concepts_path) if concepts_path else None
        chosen = list(layers) or list(channel_labels)
        return [audit(cache, channel_labels, layer, class_names, targets=targets, artifacts=artifacts,
                      class_concepts=class_concepts, concepts=concepts, k=top, min_share=min_share,
                      min_artifact_auc=min_artifact_auc)
                for layer in chosen]

    audits = _errors_as_click(run)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps([item.to_dict() for item in audits], indent=2), encoding="utf-8")
    click.echo(f"wrote {out}", err=True)
    if not quiet:
        for item in audits:
            click.echo(item.table())


@click.command("report")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.argument("labels", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--concepts", "concepts_path", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="CONCEPTS",
              help="The concepts (.npz, as for `crp-invert label`) of the cache's samples: adds the density figures.")
@click.option("--out", type=click.Path(dir_okay=False), default="report.html", show_default=True,
              help="The HTML file to write.")
@click.option("--max-channels", type=click.IntRange(min=0), default=12, show_default=True,  # MAX_CHANNEL_FIGURES
              help="Channels per layer with figures (the highest AUC among reliable labels); the tables list all.")
@click.option("--source", type=_SOURCE, default="activation", show_default=True)
@click.option("--title", default="crp-invert report", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def report_command(cache: str, labels: tuple, concepts_path: str | None, out: str, max_channels: int, source: str,
                   title: str, overwrite: bool, quiet: bool) -> None:
    """Write an HTML report of the labels in LABELS (LayerLabels JSON files or an index.json) for CACHE.

    Made from files alone, without a model: CRP's reference samples are not shown. An existing --out file
    is kept unless --overwrite is given.
    """
    from .core.concepts import ConceptLabels
    from .report import write_report

    def run():
        check_output(out, overwrite=overwrite)
        concepts = ConceptLabels.load(concepts_path) if concepts_path else None
        return write_report(out, _channel_labels(labels), cache=cache, concepts=concepts, source=source, title=title,
                            max_channels=max_channels, progress=not quiet)

    try:
        written = _errors_as_click(run)
    except OSError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {written}", err=True)
