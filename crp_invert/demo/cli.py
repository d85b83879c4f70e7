"""``crp-invert demo``: the main job on the embedded default.

See :func:`crp_invert.demo.pipeline.run_demo`.
"""

from __future__ import annotations

import click

from .pipeline import DEFAULT_SAMPLES

__all__ = ["demo"]


@click.command("demo")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    default="crp-invert-demo",
    show_default=True,
    help="Folder for the report, labels, activation cache, CRP files and figures.",
)
@click.option("--device", default="cpu", show_default=True, help='Torch device, e.g. "cuda".')
@click.option(
    "--samples",
    "samples",
    type=click.IntRange(min=16),
    default=DEFAULT_SAMPLES,
    show_default=True,
    help="Number of generated demo images.",
)
@click.option("--seed", type=int, default=2, show_default=True, help="Seed of the demo images.")
@click.option(
    "-L", "L", type=click.IntRange(min=1), default=3, show_default=True, help="Maximal formula length."
)
@click.option("-B", "B", type=click.IntRange(min=1), default=3, show_default=True, help="Beam width.")
@click.option(
    "--max-channels",
    type=click.IntRange(min=0),
    default=12,
    show_default=True,
    help="Channels per layer with figures in the report (the tables list all channels).",
)
@click.option("--overwrite", is_flag=True, help="Write into an existing non-empty --out folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(
    out: str, device: str, samples: int, seed: int, L: int, B: int, max_channels: int, overwrite: bool, quiet: bool
) -> None:
    """Run the whole product on the embedded demo: shapes images, the demo CNN, CRP FeatureVisualization with
    recording, INVERT labels of every channel of every layer, glocal decompositions, an HTML report.

    Nothing is downloaded; everything is written into --out (an existing non-empty folder only with
    --overwrite); summary.json lists every file written. The planted-truth score is the share of output
    neurons whose best explanation (from an L = 2 labeling of the logits) is exactly `shape AND color`.
    """
    from .pipeline import run_demo

    try:
        summary = run_demo(out, device=device, n_samples=samples, seed=seed, L=L, B=B,
                           max_channels=max_channels, progress=not quiet, overwrite=overwrite)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise click.ClickException(" ".join(str(message).split())) from None
    click.echo(summary.table())
    click.echo(f"report: {summary.files['report']}")
    click.echo(f"labels: {summary.files['labels']}")
