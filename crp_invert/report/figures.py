"""The report's pictures as embedded PNGs: matplotlib figures, mosaics of samples, CRP reference samples.

Every function returns a :class:`Picture` (a ``data:`` URI and its alt text) or None, never HTML.
"""
from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..images import to_uint8_image

__all__ = ["Picture", "figure_picture", "array_picture", "mosaic", "reference_picture", "concept_samples",
           "plain_text", "READABLE_DPI"]

logger = logging.getLogger(__name__)

#: resolution of the wide figures (glocal, circuits): their 8-point titles are 12 pixels high, shown unscaled
READABLE_DPI = 110


@dataclass(frozen=True)
class Picture:
    """One embedded image.

    Attributes
    ----------
    src : str
        ``data:image/png;base64,...``.
    alt : str
        The alt text.
    width : int or None
        Width in CSS pixels to show it at (small pixel images are enlarged by the browser); None: its own.
    """

    src: str
    alt: str
    width: int | None = None


def _png_picture(png: bytes, alt: str, zoom: int = 1) -> Picture:
    width = None
    if zoom != 1:
        from PIL import Image

        width = Image.open(io.BytesIO(png)).width * zoom
    return Picture("data:image/png;base64," + base64.b64encode(png).decode("ascii"), alt, width)


def plain_text():
    """matplotlib settings under which text is drawn as it is: names with ``$``, ``_`` or ``^`` are not
    parsed as mathtext (which fails on unbalanced ``$``)."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False, "text.usetex": False})


def figure_picture(figure: Any, alt: str, dpi: int) -> Picture:
    """A matplotlib figure as a PNG picture (at ``dpi``)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return _png_picture(buffer.getvalue(), alt)


def array_picture(array: np.ndarray, alt: str, zoom: int = 1) -> Picture:
    """A uint8 ``[H, W, 3]`` array as a PNG picture, shown ``zoom`` times its size."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return _png_picture(buffer.getvalue(), alt, zoom)


def mosaic(tiles: Sequence[np.ndarray], scale: int = 1, gap: int = 2) -> np.ndarray:
    """Tiles side by side (uint8 [H, W, 3], upscaled ``scale`` times by nearest neighbour) on white."""
    tiles = [np.kron(tile, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else tile for tile in tiles]
    height = max(tile.shape[0] for tile in tiles)
    width = sum(tile.shape[1] for tile in tiles) + gap * (len(tiles) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for tile in tiles:
        canvas[: tile.shape[0], x: x + tile.shape[1]] = tile
        x += tile.shape[1] + gap
    return canvas


def _image_at(images: Any, index: int) -> Any:
    item = images[int(index)]
    return item[0] if isinstance(item, (tuple, list)) else item


def reference_picture(feature_visualization: Any, layer: str, channel: int, mode: str, n_reference: int,
                      composite: Any, alt: str) -> Picture | None:
    """CRP's reference samples of one channel (``FeatureVisualization.get_max_reference``), with their conditional
    heatmaps below them when a composite is given; None (and a warning) when CRP has none."""
    from ..plot import heatmap_image

    try:
        reference = feature_visualization.get_max_reference(
            [channel], layer, mode=mode, r_range=(0, n_reference), composite=composite, plot_fn=None
        )[channel]
    except (FileNotFoundError, OSError, KeyError, IndexError) as error:
        logger.warning("no %s reference samples for %s:%d: %s", mode, layer, channel, error)
        return None
    if isinstance(reference, tuple):
        data, heatmaps = reference
        top = mosaic([to_uint8_image(image) for image in data])
        bottom = mosaic([heatmap_image(h if h.dim() == 2 else h.sum(0)) for h in heatmaps])
        gap = np.full((2, top.shape[1], 3), 255, np.uint8)
        return array_picture(np.concatenate([top, gap, bottom], axis=0), alt, zoom=2)
    return array_picture(mosaic([to_uint8_image(image) for image in reference]), alt, zoom=2)


def concept_samples(images: Any, mask: np.ndarray, n: int, seed: int, alt: str) -> Picture | None:
    """``n`` random samples (fixed ``seed``) among those where ``mask`` holds, side by side; None if none."""
    indices = np.flatnonzero(mask)
    if indices.size == 0:
        return None
    chosen = np.sort(np.random.default_rng(seed).choice(indices, size=min(n, indices.size), replace=False))
    return array_picture(mosaic([to_uint8_image(_image_at(images, i)) for i in chosen]), alt, zoom=2)
