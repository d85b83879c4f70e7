"""The demo dataset: small RGB images of colored shapes on textured backgrounds, with planted truth.

Every image shows one shape (circle, ring, square, triangle) in one color (red, yellow, green,
blue), of one of two sizes (small, large), at a random position, on a gray background with one
texture (plain, dots, checker, horizontal stripes, vertical stripes), with mild pixel noise.
Everything is drawn with numpy from a seed, so that the same seed gives the same bytes and
nothing has to be downloaded.

The classification target is the (shape, color) pair, e.g. ``"red circle"``: 4 shapes x 4 colors
= 16 classes, balanced exactly. The *concepts* given to INVERT are the attributes only (one per
shape, color, size and texture value, plus the parents ``round``/``angular``, ``warm``/``cool``
and ``striped``), never the pair classes, so the true explanation of the output neuron
``"red circle"`` is the composition ``circle & red``. Attribute sets are chosen so that no
formula of length <= 2 other than ``shape & color`` selects exactly the samples of a pair
class: every parent has two children, and no concept (or its negation) equals another one's
children set except for the intended complements (``round == ~angular``, ``warm == ~cool``,
``small == ~large``).

Functions
---------
generate_shapes
    The functional core: ``n`` images and their attribute indices from a seed.
attribute_matrix
    The dense boolean attribute matrix [N, K] and the concept names.
attribute_concepts
    The same as :class:`crp_invert.ConceptLabels`.
class_formulas
    The planted truth: for every class the formula ``shape & color``.

Classes
-------
ShapesDataset
    A torch ``Dataset`` over :func:`generate_shapes` yielding ``(image [3, 32, 32] float32, target)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SHAPES", "COLORS", "SIZES", "TEXTURES", "PARENTS", "CLASS_NAMES", "IMAGE_SIZE",
    "ShapesSample", "generate_shapes", "attribute_matrix", "attribute_concepts", "concept_names",
    "class_attributes", "class_formulas", "ShapesDataset",
]

IMAGE_SIZE = 32

SHAPES: Tuple[str, ...] = ("circle", "ring", "square", "triangle")
COLORS: Tuple[str, ...] = ("red", "yellow", "green", "blue")
SIZES: Tuple[str, ...] = ("small", "large")
TEXTURES: Tuple[str, ...] = ("plain", "dots", "checker", "horizontal_stripes", "vertical_stripes")

#: parent concept -> the attribute values it contains
PARENTS: Dict[str, Tuple[str, ...]] = {
    "round": ("circle", "ring"),
    "angular": ("square", "triangle"),
    "warm": ("red", "yellow"),
    "cool": ("green", "blue"),
    "striped": ("horizontal_stripes", "vertical_stripes"),
}

#: the class index of (shape s, color c) is ``s * len(COLORS) + c``
CLASS_NAMES: Tuple[str, ...] = tuple(f"{color} {shape}" for shape in SHAPES for color in COLORS)

# base RGB of every color, in [0, 1]; each image jitters it by at most _COLOR_JITTER per channel
_PALETTE = np.array([
    [0.90, 0.12, 0.10],  # red
    [0.93, 0.85, 0.12],  # yellow
    [0.12, 0.75, 0.18],  # green
    [0.12, 0.28, 0.92],  # blue
])
_COLOR_JITTER = 0.06
_NOISE_STD = 0.025
# size -> range of the base radius in pixels
_RADIUS_RANGE = {0: (4.5, 5.5), 1: (7.5, 9.0)}
# shape -> (radius factor of the drawn shape, extent factor used to keep it inside the image)
_SHAPE_FACTORS = {0: (1.0, 1.0), 1: (1.1, 1.1), 2: (0.9, 0.9 * np.sqrt(2.0)), 3: (1.4, 1.4)}
_RING_INNER = 0.55
_MAX_ROTATION = np.deg2rad(15.0)


@dataclass(frozen=True)
class ShapesSample:
    """A batch of generated images with their attributes.

    Attributes
    ----------
    images : numpy.ndarray
        uint8 [N, 32, 32, 3] (height, width, RGB).
    shape, color, size, texture : numpy.ndarray
        int64 [N] indices into :data:`SHAPES`, :data:`COLORS`, :data:`SIZES`, :data:`TEXTURES`.
    center : numpy.ndarray
        float64 [N, 2] (x, y) center of the shape in pixels.
    masks : numpy.ndarray
        bool [N, 32, 32], the pixels covered by the shape.
    seed : int
        The seed the sample was drawn from.
    """
    images: np.ndarray
    shape: np.ndarray
    color: np.ndarray
    size: np.ndarray
    texture: np.ndarray
    center: np.ndarray
    masks: np.ndarray
    seed: int

    @property
    def targets(self) -> np.ndarray:
        """int64 [N] class index of the (shape, color) pair, see :data:`CLASS_NAMES`."""
        return self.shape * len(COLORS) + self.color

    def __len__(self) -> int:
        return len(self.images)


def _shape_masks(shape, center, radius, angle, image_size):
    """Boolean masks [N, H, W] of the shapes, vectorized over the batch."""
    coords = np.arange(image_size, dtype=np.float64) + 0.5
    dx = coords[None, None, :] - center[:, 0, None, None]
    # y axis pointing up, so that an unrotated triangle points up in the image
    dy = center[:, 1, None, None] - coords[None, :, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    dist2 = dx ** 2 + dy ** 2

    masks = np.zeros((len(shape), image_size, image_size), dtype=bool)
    r = radius[:, None, None]
    for index, (factor, _) in _SHAPE_FACTORS.items():
        select = shape == index
        if not select.any():
            continue
        rs = r[select] * factor
        if index == 0:  # circle
            mask = dist2[select] <= rs ** 2
        elif index == 1:  # ring
            mask = (dist2[select] <= rs ** 2) & (dist2[select] >= (_RING_INNER * rs) ** 2)
        elif index == 2:  # square
            mask = (np.abs(u[select]) <= rs) & (np.abs(v[select]) <= rs)
        else:  # equilateral triangle around its centroid, circumradius rs, inradius rs / 2
            mask = np.ones(select.sum(), dtype=bool)[:, None, None]
            for normal in np.deg2rad([-90.0, 30.0, 150.0]):
                mask = mask & (u[select] * np.cos(normal) + v[select] * np.sin(normal) <= rs / 2)
        masks[select] = mask
    return masks


def _backgrounds(texture, rng, image_size):
    """Gray textured backgrounds [N, H, W] in [0, 1]."""
    n = len(texture)
    low = rng.uniform(0.08, 0.35, size=n)
    contrast = rng.uniform(0.25, 0.4, size=n)
    period = rng.integers(2, 4, size=n)  # stripe / checker width, dot spacing is 2 * period + 1
    phase = rng.integers(0, 8, size=(n, 2))

    coords = np.arange(image_size)
    yy = coords[None, :, None] + phase[:, 1, None, None]
    xx = coords[None, None, :] + phase[:, 0, None, None]
    w = period[:, None, None]
    pattern = np.zeros((n, image_size, image_size), dtype=bool)
    stripes_h = (yy // w) % 2 == 1
    stripes_v = (xx // w) % 2 == 1
    checker = ((yy // w) + (xx // w)) % 2 == 1
    spacing = 2 * w + 1
    dots = ((yy % spacing) < 2) & ((xx % spacing) < 2)
    for index, pat in ((1, dots), (2, checker), (3, stripes_h), (4, stripes_v)):
        select = texture == index
        pattern[select] = np.broadcast_to(pat, pattern.shape)[select]
    # a plain background gets a single gray level spread over the same range
    plain = texture == 0
    low = np.where(plain, rng.uniform(0.1, 0.6, size=n), low)
    return low[:, None, None] + contrast[:, None, None] * pattern


def generate_shapes(n: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> ShapesSample:
    """Draw ``n`` demo images and their attributes, deterministically from ``seed``.

    The pair classes are balanced exactly (up to ``n mod 16``) and in random order; size and
    texture are drawn uniformly and independently of the class.

    Parameters
    ----------
    n : int
        Number of images (>= 0).
    seed : int
        Seed of the numpy generator; the same seed gives the same bytes.
    image_size : int
        Height and width in pixels (>= 24).

    Returns
    -------
    ShapesSample
        Images (uint8 [N, H, W, 3]), attribute indices, centers and shape masks.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 24:
        raise ValueError(f"image_size must be an int >= 24, got {image_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng(seed)
    n_classes = len(CLASS_NAMES)
    targets = rng.permutation(np.arange(n) % n_classes)
    shape, color = targets // len(COLORS), targets % len(COLORS)
    size = rng.integers(0, len(SIZES), size=n)
    texture = rng.integers(0, len(TEXTURES), size=n)

    scale = image_size / IMAGE_SIZE
    ranges = np.array([_RADIUS_RANGE[s] for s in range(len(SIZES))]) * scale
    radius = rng.uniform(ranges[size, 0], ranges[size, 1])
    extent_factor = np.array([_SHAPE_FACTORS[s][1] for s in range(len(SHAPES))])
    extent = radius * extent_factor[shape] + 1.0
    center = rng.uniform(extent[:, None], image_size - extent[:, None], size=(n, 2))
    angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, size=n)
    fill = np.clip(_PALETTE[color] + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, size=(n, 3)), 0.0, 1.0)

    masks = _shape_masks(shape, center, radius, angle, image_size)
    background = _backgrounds(texture, rng, image_size)
    images = np.where(masks[..., None], fill[:, None, None, :], background[..., None])
    images = images + rng.normal(0.0, _NOISE_STD, size=images.shape)
    images = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    return ShapesSample(
        images=images, shape=shape.astype(np.int64), color=color.astype(np.int64),
        size=size.astype(np.int64), texture=texture.astype(np.int64), center=center, masks=masks,
        seed=int(seed),
    )


def concept_names() -> List[str]:
    """The attribute concept names, in the column order of :func:`attribute_matrix`."""
    return list(SHAPES) + list(COLORS) + list(SIZES) + list(TEXTURES) + list(PARENTS)


def attribute_matrix(sample: ShapesSample) -> Tuple[np.ndarray, List[str]]:
    """The boolean attribute concepts of every image.

    Parameters
    ----------
    sample : ShapesSample
        From :func:`generate_shapes`.

    Returns
    -------
    labels : numpy.ndarray
        bool [N, K]: one column per shape, color, size and texture value, then the parents of
        :data:`PARENTS` (true where any child is true).
    names : list of str
        The K concept names, see :func:`concept_names`.
    """
    names = concept_names()
    n = len(sample)
    columns = []
    for values, index in ((SHAPES, sample.shape), (COLORS, sample.color), (SIZES, sample.size),
                          (TEXTURES, sample.texture)):
        columns.append(index[:, None] == np.arange(len(values))[None, :])
    labels = np.concatenate(columns, axis=1) if n else np.zeros((0, len(names) - len(PARENTS)), bool)
    position = {name: k for k, name in enumerate(names)}
    parents = [labels[:, [position[child] for child in children]].any(axis=1)
               for children in PARENTS.values()]
    labels = np.concatenate([labels, np.stack(parents, axis=1).reshape(n, len(PARENTS))], axis=1)
    return labels, names


def _descriptions() -> List[str]:
    descriptions = [f"shape: {name}" for name in SHAPES] + [f"color: {name}" for name in COLORS]
    descriptions += [f"size: {name}" for name in SIZES]
    descriptions += [f"background texture: {name.replace('_', ' ')}" for name in TEXTURES]
    descriptions += [f"parent of {', '.join(children)}" for children in PARENTS.values()]
    return descriptions


def attribute_concepts(sample: ShapesSample):
    """The attribute concepts of every image as :class:`crp_invert.ConceptLabels`.

    The pair classes are *not* among the concepts: the output neuron of ``"red circle"`` can only
    be explained by the composition ``circle & red``.
    """
    from ..core.concepts import ConceptLabels

    labels, names = attribute_matrix(sample)
    return ConceptLabels(labels, names, descriptions=_descriptions())


def class_attributes() -> Dict[str, Tuple[str, str]]:
    """Class name -> (shape, color), e.g. ``{"red circle": ("circle", "red"), ...}``."""
    return {f"{color} {shape}": (shape, color) for shape in SHAPES for color in COLORS}


def class_formulas() -> Dict[str, "object"]:
    """The planted truth: class name -> :class:`crp_invert.Formula` ``shape & color``."""
    from ..core.formula import Formula

    return {name: Formula.concept(shape) & Formula.concept(color)
            for name, (shape, color) in class_attributes().items()}


class ShapesDataset(Dataset):
    """Torch dataset of :func:`generate_shapes` images.

    Yields ``(image, target)`` with ``image`` a float32 tensor [3, H, W] in [0, 1] and ``target``
    the int index of the (shape, color) pair in :attr:`class_names`.

    Parameters
    ----------
    n : int
        Number of images.
    seed : int
        Seed of the generator.
    image_size : int
        Height and width in pixels.

    Attributes
    ----------
    sample : ShapesSample
        The generated images and attributes.
    class_names : list of str
        ``"red circle"``, ...; index = target.
    class_to_attributes : dict
        class name -> (shape, color).
    targets : torch.Tensor
        int64 [N].
    """

    def __init__(self, n: int = 2000, seed: int = 0, image_size: int = IMAGE_SIZE) -> None:
        self.sample = generate_shapes(n, seed=seed, image_size=image_size)
        self.class_names: List[str] = list(CLASS_NAMES)
        self.class_to_attributes = class_attributes()
        self.targets = torch.from_numpy(self.sample.targets)
        self._images = torch.from_numpy(self.sample.images).permute(0, 3, 1, 2)
        self._concepts = None

    def __len__(self) -> int:
        return len(self.sample)

    def __getitem__(self, index: int):
        if isinstance(index, slice) or not -len(self) <= int(index) < len(self):
            raise IndexError(f"index {index!r} out of range for a dataset of {len(self)} images")
        return self._images[index].float() / 255.0, int(self.targets[index])

    def tensors(self, indices: Optional[Sequence[int]] = None):
        """All (or the selected) images as one float32 tensor [N, 3, H, W] and targets [N]."""
        images, targets = self._images, self.targets
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long)
            images, targets = images[indices], targets[indices]
        return images.float() / 255.0, targets

    @property
    def concepts(self):
        """The attribute concepts (:class:`crp_invert.ConceptLabels`) of every image."""
        if self._concepts is None:
            self._concepts = attribute_concepts(self.sample)
        return self._concepts

    @property
    def class_formulas(self):
        """The planted truth: class name -> ``Formula`` ``shape & color``."""
        return class_formulas()
