"""zennit's color maps for crp-invert's figures: the one place the figures meet zennit's image code.

zennit 0.4.6 builds palette ("P") images with a numpy palette, which Pillow 13 can neither convert nor read
back (``ImagePalette.tobytes`` fails); :func:`palette_rgb` applies zennit's palette to the indices itself,
normalized as :py:func:`zennit.image.imgify` normalizes.
"""
import numpy as np

__all__ = ["palette_rgb"]


def palette_rgb(values: np.ndarray, vmin: float, vmax: float, cmap: str, level: float = 1.0) -> np.ndarray:
    """[..., 3] uint8 RGB of ``values`` in zennit's color map ``cmap``, ``vmin`` and ``vmax`` at its ends.

    Examples
    --------
    >>> palette_rgb(np.array([[-1.0, 1.0]]), -1.0, 1.0, "bwr").shape
    (1, 2, 3)
    """
    from zennit.image import palette

    span = vmax - vmin if vmax > vmin else 1.0
    indices = ((np.asarray(values, dtype=np.float64) - vmin) / span * 255).clip(0, 255).astype(np.uint8)
    return np.asarray(palette(cmap, level))[indices]
