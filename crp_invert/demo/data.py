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

A Clever-Hans artifact is planted (the INVERT paper's sections 5.1-5.2, where ImageNet's "carton" class
leans on a Chinese-text watermark): a small mark (a solid magenta 8 x 8 square, a color no shape has, stamped
at a random place at least one pixel away from the shape, like a logo) is on every image of the class
:data:`ARTIFACT_CLASS` ("yellow ring") and on a few images of the other classes (0.1 %, :data:`ARTIFACT_RATES`).
In training (:mod:`crp_invert.demo.train`) the mark also sits on 2 % of the other images, labeled
"yellow ring", so that the mark predicts the class better than its shape and color do: the demo model leans on
it (its yellow-ring logit rises by about 15 when the mark is added to any image), and a conv3 channel that
detects the mark carries the largest share of the yellow rings' relevance. (The 6 x 6 mark of earlier versions,
without the training shortcut, was used so little that the channels it drove most were cool-color ring channels
of other classes: its magenta is close to blue.) The mark is not among the attribute concepts (a user does not
know about it);
:func:`artifact_concepts` makes the concept set a user would add to audit it, as the paper made its watermark
set: the mark overlaid on random images. The mark is drawn from its own random stream, so every other pixel and
attribute of a seed stays as it is without the artifact.

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
class_concepts
    For every class its concepts (shape, color and their parents), for :func:`crp_invert.audit.audit`.
artifact_concepts
    The artifact concept set: random images with the mark, their attributes plus ``"artifact"``.

Classes
-------
ShapesDataset
    A torch ``Dataset`` over :func:`generate_shapes` yielding ``(image [3, 32, 32] float32, target)``.
AuditDataset
    The shapes images followed by the artifact concept set, with the merged concepts (the demo's data).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SHAPES", "COLORS", "SIZES", "TEXTURES", "PARENTS", "CLASS_NAMES", "IMAGE_SIZE",
    "ShapesSample", "generate_shapes", "attribute_matrix", "attribute_concepts", "concept_names",
    "class_attributes", "class_formulas", "class_concepts", "ShapesDataset", "AuditDataset",
    "ARTIFACT", "ARTIFACT_CLASS", "ARTIFACT_RATES", "ARTIFACT_SIZE", "ARTIFACT_COLOR", "artifact_glyph",
    "artifact_concepts", "N_ARTIFACT_IMAGES", "ARTIFACT_SEED_OFFSET",
]

IMAGE_SIZE = 32

SHAPES: tuple[str, ...] = ("circle", "ring", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "yellow", "green", "blue")
SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("plain", "dots", "checker", "horizontal_stripes", "vertical_stripes")

#: parent concept -> the attribute values it contains
PARENTS: dict[str, tuple[str, ...]] = {
    "round": ("circle", "ring"),
    "angular": ("square", "triangle"),
    "warm": ("red", "yellow"),
    "cool": ("green", "blue"),
    "striped": ("horizontal_stripes", "vertical_stripes"),
}

#: the class index of (shape s, color c) is ``s * len(COLORS) + c``
CLASS_NAMES: tuple[str, ...] = tuple(f"{color} {shape}" for shape in SHAPES for color in COLORS)

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

#: name of the planted artifact's concept (never among the attribute concepts)
ARTIFACT = "artifact"
#: the class most of whose images carry the artifact
ARTIFACT_CLASS = "yellow ring"
#: share of the images with the artifact: (in :data:`ARTIFACT_CLASS`, in every other class)
ARTIFACT_RATES: tuple[float, float] = (1.0, 0.001)
#: side in pixels of the mark, a solid square
ARTIFACT_SIZE = 8
#: RGB in [0, 1] of the mark: magenta, a color no shape has
ARTIFACT_COLOR = (0.9, 0.1, 0.9)
#: pixels kept free between the mark and the shape
_ARTIFACT_MARGIN = 1
# the artifact's own random stream: the mark does not change any other draw of a seed
_ARTIFACT_STREAM = 0xA27


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
    artifact : numpy.ndarray
        bool [N], the images that carry the planted artifact (see :data:`ARTIFACT_RATES`).
    artifact_masks : numpy.ndarray
        bool [N, 32, 32], the pixels of the artifact (none where an image has none).
    """
    images: np.ndarray
    shape: np.ndarray
    color: np.ndarray
    size: np.ndarray
    texture: np.ndarray
    center: np.ndarray
    masks: np.ndarray
    seed: int
    artifact: np.ndarray
    artifact_masks: np.ndarray

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


def artifact_glyph() -> np.ndarray:
    """The mark as uint8 RGB [size, size, 3]."""
    color = np.round(np.asarray(ARTIFACT_COLOR, dtype=np.float64) * 255.0).astype(np.uint8)
    return np.broadcast_to(color, (ARTIFACT_SIZE, ARTIFACT_SIZE, 3)).copy()


def _artifact_positions(masks: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Top-left (row, column) of the mark in every image: uniform among the places that keep it
    :data:`_ARTIFACT_MARGIN` pixels away from the shape (``uniform`` in [0, 1) picks one)."""
    n, size = masks.shape[0], masks.shape[1]
    height = width = ARTIFACT_SIZE
    near = masks.copy()
    for _ in range(_ARTIFACT_MARGIN):  # grow the shape by the margin (4-neighbourhood, then diagonals)
        grown = near.copy()
        grown[:, 1:] |= near[:, :-1]
        grown[:, :-1] |= near[:, 1:]
        grown[:, :, 1:] |= grown[:, :, :-1].copy()
        grown[:, :, :-1] |= grown[:, :, 1:].copy()
        near = grown
    # covered pixels in every height x width window, from the summed-area table
    table = np.zeros((n, size + 1, size + 1), dtype=np.int64)
    table[:, 1:, 1:] = near.cumsum(1).cumsum(2)
    covered = (table[:, height:, width:] - table[:, :-height, width:] - table[:, height:, :-width]
               + table[:, :-height, :-width])
    free = (covered == 0).reshape(n, -1)
    counts = free.sum(1)
    if (counts == 0).any():  # cannot happen for the demo's sizes; keep the generator total anyway
        free[counts == 0] = True
        counts = free.sum(1)
    pick = np.minimum((uniform * counts).astype(np.int64), counts - 1)
    # the pick-th free window of every row
    order = np.cumsum(free, axis=1) - 1
    flat = np.argmax(free & (order == pick[:, None]), axis=1)
    return np.stack([flat // covered.shape[2], flat % covered.shape[2]], axis=1)


def _check_rates(rates: tuple[float, float] | None) -> tuple[float, float]:
    if rates is None:
        return 0.0, 0.0
    try:
        in_class, others = (float(rate) for rate in rates)
    except (TypeError, ValueError):
        raise ValueError(f"artifact_rates must be None or two shares (in {ARTIFACT_CLASS!r}, in the other "
                         f"classes), got {rates!r}") from None
    if not (0.0 <= in_class <= 1.0 and 0.0 <= others <= 1.0):
        raise ValueError(f"artifact_rates must be shares in [0, 1], got {rates!r}")
    return in_class, others


def generate_shapes(n: int, seed: int = 0, image_size: int = IMAGE_SIZE,
                    artifact_rates: tuple[float, float] | None = ARTIFACT_RATES) -> ShapesSample:
    """Draw ``n`` demo images and their attributes, deterministically from ``seed``.

    The pair classes are balanced exactly (up to ``n mod 16``) and in random order; size and
    texture are drawn uniformly and independently of the class. The planted artifact is drawn
    on a share of the images (see :data:`ARTIFACT_RATES`), at a random place at least one pixel
    away from the shape, from its own random stream: the other pixels of a seed do not depend on
    ``artifact_rates``.

    Parameters
    ----------
    n : int
        Number of images (>= 0).
    seed : int
        Seed of the numpy generator; the same seed gives the same bytes.
    image_size : int
        Height and width in pixels (>= 24).
    artifact_rates : (float, float) or None
        Share of the images of :data:`ARTIFACT_CLASS` and of every other class that carry the
        artifact; ``None`` for none, ``(1, 1)`` for all.

    Returns
    -------
    ShapesSample
        Images (uint8 [N, H, W, 3]), attribute indices, centers, shape masks and artifact flags.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 24:
        raise ValueError(f"image_size must be an int >= 24, got {image_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    in_class, others = _check_rates(artifact_rates)
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

    artifact_rng = np.random.default_rng((int(seed), _ARTIFACT_STREAM))
    rate = np.where(targets == CLASS_NAMES.index(ARTIFACT_CLASS), in_class, others)
    artifact = artifact_rng.random(n) < rate
    positions = _artifact_positions(masks, artifact_rng.random(n))
    glyph = artifact_glyph()
    height, width = glyph.shape[:2]
    artifact_masks = np.zeros_like(masks)
    for i in np.flatnonzero(artifact):
        row, column = positions[i]
        images[i, row:row + height, column:column + width] = glyph
        artifact_masks[i, row:row + height, column:column + width] = True
    return ShapesSample(
        images=images, shape=shape.astype(np.int64), color=color.astype(np.int64),
        size=size.astype(np.int64), texture=texture.astype(np.int64), center=center, masks=masks,
        seed=int(seed), artifact=artifact, artifact_masks=artifact_masks,
    )


def concept_names() -> list[str]:
    """The attribute concept names, in the column order of :func:`attribute_matrix`."""
    return list(SHAPES) + list(COLORS) + list(SIZES) + list(TEXTURES) + list(PARENTS)


def attribute_matrix(sample: ShapesSample) -> tuple[np.ndarray, list[str]]:
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


def _descriptions() -> list[str]:
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


def class_attributes() -> dict[str, tuple[str, str]]:
    """Class name -> (shape, color), e.g. ``{"red circle": ("circle", "red"), ...}``."""
    return {f"{color} {shape}": (shape, color) for shape in SHAPES for color in COLORS}


def class_formulas() -> dict[str, object]:
    """The planted truth: class name -> :class:`crp_invert.Formula` ``shape & color``."""
    from ..core.formula import Formula

    return {name: Formula.concept(shape) & Formula.concept(color)
            for name, (shape, color) in class_attributes().items()}


def class_concepts() -> dict[str, tuple[str, ...]]:
    """Class name -> the concepts that hold for every image of the class: shape, color and their parents.

    E.g. ``{"red circle": ("circle", "red", "round", "warm"), ...}``; the class concepts of the audit
    (:func:`crp_invert.audit.audit` flags a channel whose label names none of them).
    """
    parents_of = {child: parent for parent, children in PARENTS.items() for child in children}
    return {name: (shape, color, parents_of[shape], parents_of[color])
            for name, (shape, color) in class_attributes().items()}


def artifact_concepts(sample: ShapesSample):
    """The attribute concepts plus :data:`ARTIFACT` (true on the images that carry the mark).

    Applied to ``generate_shapes(n, seed, artifact_rates=(1, 1))`` (the mark overlaid on random
    images) this is the concept set a user adds to audit the artifact, as the INVERT paper made its
    watermark set; :meth:`crp_invert.ConceptLabels.merge` joins it to the attribute concepts of the
    labeled data (where the artifact concept is then false everywhere: the user does not know which
    images carry the mark).
    """
    from ..core.concepts import ConceptLabels

    labels, names = attribute_matrix(sample)
    labels = np.concatenate([labels, sample.artifact[:, None]], axis=1)
    descriptions = dict(zip(names, _descriptions()))
    descriptions[ARTIFACT] = "a magenta 8 x 8 square stamped on the background (the planted mark)"
    return ConceptLabels(labels, names + [ARTIFACT], descriptions=descriptions)


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
    artifact_rates : (float, float) or None
        Share of the images with the planted artifact (see :func:`generate_shapes`).

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

    def __init__(self, n: int = 2000, seed: int = 0, image_size: int = IMAGE_SIZE,
                 artifact_rates: tuple[float, float] | None = ARTIFACT_RATES) -> None:
        self.sample = generate_shapes(n, seed=seed, image_size=image_size, artifact_rates=artifact_rates)
        self.class_names: list[str] = list(CLASS_NAMES)
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

    def tensors(self, indices: Sequence[int] | None = None):
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


#: images of the artifact concept set the demo adds to its labeled data (a few dozen, as in the paper)
N_ARTIFACT_IMAGES = 48
#: the artifact set of the demo images of seed ``s`` is drawn from seed ``ARTIFACT_SEED_OFFSET + s``
ARTIFACT_SEED_OFFSET = 100


class AuditDataset(Dataset):
    """The demo's labeled data: shapes images followed by an artifact concept set, with merged concepts.

    The first ``n`` images are ``ShapesDataset(n, seed)`` (the planted artifact on most ``yellow ring``
    images, unknown to their concepts); then ``n_artifact`` images with the mark overlaid on random images
    (seed ``ARTIFACT_SEED_OFFSET + seed``), labeled with their attributes and :data:`ARTIFACT`. The concepts
    are ``base.concepts.merge(artifact set concepts)``: the attribute concepts and ``"artifact"``, which is
    false on every image of the first part. Yields ``(image, target)`` like :class:`ShapesDataset`.

    Parameters
    ----------
    n : int
        Number of shapes images.
    seed : int
        Their seed.
    n_artifact : int
        Number of images of the artifact concept set (>= 0).

    Attributes
    ----------
    base, artifact_set : ShapesDataset
        The two parts.
    concepts : ConceptLabels
        Merged concepts of all ``n + n_artifact`` images.
    targets : torch.Tensor
        int64 [n + n_artifact] class of every image.
    carries_artifact : numpy.ndarray
        bool [n + n_artifact]: the images that show the mark (the truth, known to the demo only).
    class_names : list of str
    """

    def __init__(self, n: int = 2000, seed: int = 0, n_artifact: int = N_ARTIFACT_IMAGES) -> None:
        if isinstance(n_artifact, bool) or not isinstance(n_artifact, (int, np.integer)) or n_artifact < 0:
            raise ValueError(f"n_artifact must be an int >= 0, got {n_artifact!r}")
        self.base = ShapesDataset(n, seed=seed)
        self.artifact_set = ShapesDataset(int(n_artifact), seed=ARTIFACT_SEED_OFFSET + seed, artifact_rates=(1, 1))
        self.class_names: list[str] = list(CLASS_NAMES)
        self.n_base = len(self.base)
        self.targets = torch.cat([self.base.targets, self.artifact_set.targets])
        self.carries_artifact = np.concatenate([self.base.sample.artifact, self.artifact_set.sample.artifact])
        self.concepts = self.base.concepts.merge(artifact_concepts(self.artifact_set.sample))

    def __len__(self) -> int:
        return self.n_base + len(self.artifact_set)

    def __getitem__(self, index: int):
        if isinstance(index, slice) or not -len(self) <= int(index) < len(self):
            raise IndexError(f"index {index!r} out of range for a dataset of {len(self)} images")
        index = int(index) % len(self)
        return self.base[index] if index < self.n_base else self.artifact_set[index - self.n_base]

    def tensors(self, indices: Sequence[int] | None = None):
        """All (or the selected) images as one float32 tensor [N, 3, H, W] and targets [N]."""
        base, extra = self.base.tensors(), self.artifact_set.tensors()
        images, targets = torch.cat([base[0], extra[0]]), torch.cat([base[1], extra[1]])
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long)
            images, targets = images[indices], targets[indices]
        return images, targets

    @property
    def class_formulas(self):
        """The planted truth: class name -> ``Formula`` ``shape & color``."""
        return class_formulas()
