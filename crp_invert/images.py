"""Input images as uint8 RGB arrays: the one place that reads the many layouts a dataset may yield.

Used by the figures (:mod:`crp_invert.plot`, the glocal figure's input panel) and by the HTML report (reference
samples, samples of a concept). Plain numpy; no matplotlib, crp or zennit.

Examples
--------
>>> import numpy as np
>>> to_uint8_image(np.array([[0.0, 1.0]])).tolist()
[[[0, 0, 0], [255, 255, 255]]]
>>> to_uint8_image(np.array([[-1.0, 3.0]]))[0, :, 0].tolist()  # outside [0, 1]: min-max scaled
[0, 255]
>>> to_uint8_image(np.array([[0.2, 0.6]]), scale="minmax")[0, :, 0].tolist()
[0, 255]
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["to_uint8_image", "SCALES"]

#: how float images become 0..255: "unit" keeps images in [0, 1] as they are and min-max scales others;
#: "minmax" always min-max scales (as zennit's and CRP's ``imgify`` do)
SCALES = ("unit", "minmax")


def _channels_last(values: np.ndarray) -> np.ndarray:
    """[1, C, H, W] / [C, H, W] / [H, W, C] / [H, W] -> [H, W, 3] (gray repeated)."""
    if values.ndim == 4:
        if values.shape[0] != 1:
            raise ValueError(f"an image must be one sample, got a batch of {values.shape[0]}")
        values = values[0]
    if values.ndim == 3 and values.shape[0] in (1, 3) and values.shape[-1] not in (1, 3):
        values = values.transpose(1, 2, 0)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim == 2:
        values = np.repeat(values[..., None], 3, axis=-1)
    if values.ndim != 3 or values.shape[-1] != 3:
        raise ValueError(
            f"an image must be [H, W], [C, H, W], [H, W, C] or [1, C, H, W] with 1 or 3 colors, got {values.shape}"
        )
    return values


def to_uint8_image(image: Any, scale: str = "unit") -> np.ndarray:
    """An image tensor or array as uint8 RGB ``[H, W, 3]``.

    Parameters
    ----------
    image : torch.Tensor or numpy.ndarray
        ``[H, W]``, ``[C, H, W]``, ``[H, W, C]`` or ``[1, C, H, W]`` with 1 or 3 colors; uint8 is kept as it is.
    scale : {"unit", "minmax"}
        Floats in ``[0, 1]`` are kept (``"unit"``, e.g. a dataset's ``ToTensor`` images) or always stretched to
        the full range (``"minmax"``, e.g. a normalized model input); see :data:`SCALES`.

    Returns
    -------
    numpy.ndarray
        ``[H, W, 3]`` uint8.

    Raises
    ------
    ValueError
        For another shape, a batch of more than one image, or an unknown ``scale``.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    values = _channels_last(np.asarray(image))
    if values.dtype == np.uint8:
        return np.ascontiguousarray(values)
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if scale == "minmax" or low < 0 or high > 1:
        values = (values - low) / (high - low if high > low else 1.0)
    return (values.clip(0, 1) * 255).round().astype(np.uint8)
