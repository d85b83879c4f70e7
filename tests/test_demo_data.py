"""The demo shapes dataset: deterministic, and its labels match the pixels it draws."""
import itertools

import numpy as np
import pytest
import torch

from crp_invert.demo import data
from crp_invert.demo.data import (
    CLASS_NAMES,
    COLORS,
    PARENTS,
    SHAPES,
    SIZES,
    TEXTURES,
    ShapesDataset,
    attribute_matrix,
    class_attributes,
    concept_names,
    generate_shapes,
)

N = 480


@pytest.fixture(scope="module")
def sample():
    return generate_shapes(N, seed=3)


def _saturated(images, sample=None):
    """Pixels of a colored shape: far from gray (the backgrounds are gray), without the planted artifact."""
    x = images.astype(np.float64) / 255.0
    saturated = (x.max(-1) - x.min(-1)) > 0.3
    return saturated if sample is None else saturated & ~sample.artifact_masks


def test_same_seed_same_bytes():
    """The same seed draws byte-identical uint8 images and attributes; another seed draws none of the same images."""
    a, b = generate_shapes(200, seed=11), generate_shapes(200, seed=11)
    assert a.images.dtype == np.uint8 and a.images.shape == (200, 32, 32, 3)
    assert a.images.tobytes() == b.images.tobytes()
    for field in ("shape", "color", "size", "texture", "center", "masks"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    c = generate_shapes(200, seed=12)
    assert a.images.tobytes() != c.images.tobytes()
    assert not np.array_equal(a.targets, c.targets)
    # no image of one seed appears among the images of the other
    assert not {image.tobytes() for image in a.images} & {image.tobytes() for image in c.images}


def test_dataset_same_seed_same_tensors():
    """ShapesDataset of the same seed gives equal tensors, of another seed different images."""
    a, b = ShapesDataset(64, seed=5), ShapesDataset(64, seed=5)
    xa, ya = a.tensors()
    xb, yb = b.tensors()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, ShapesDataset(64, seed=6).tensors()[0])


def test_classes_balanced_and_attributes_independent(sample):
    """Every class has the same count, the target is shape * len(COLORS) + color, and every size and texture occurs."""
    counts = np.bincount(sample.targets, minlength=len(CLASS_NAMES))
    assert counts.tolist() == [N // len(CLASS_NAMES)] * len(CLASS_NAMES)
    assert np.array_equal(sample.targets, sample.shape * len(COLORS) + sample.color)
    assert set(np.unique(sample.size)) == set(range(len(SIZES)))
    assert set(np.unique(sample.texture)) == set(range(len(TEXTURES)))


def test_masks_are_the_colored_pixels(sample):
    """The shape masks match the saturated pixels (IoU > 0.95) and no colored pixel touches the border."""
    saturated = _saturated(sample.images, sample)
    intersection = (saturated & sample.masks).sum((1, 2))
    union = (saturated | sample.masks).sum((1, 2))
    assert (intersection / union).min() > 0.95
    # the shape lies inside the image: no colored pixel on the border
    assert not saturated[:, 0].any() and not saturated[:, -1].any()
    assert not saturated[:, :, 0].any() and not saturated[:, :, -1].any()


def test_fill_color_matches_color_label(sample):
    """The mean color of each shape's pixels is nearest to the prototype of its color label."""
    expected = {"red": (1, 0, 0), "yellow": (1, 1, 0), "green": (0, 1, 0), "blue": (0, 0, 1)}
    assert set(expected) == set(COLORS)
    prototypes = np.array([expected[name] for name in COLORS], dtype=np.float64)
    saturated = _saturated(sample.images, sample)
    x = sample.images.astype(np.float64) / 255.0
    for i in range(N):
        mean = x[i][saturated[i]].mean(0)
        nearest = np.argmin(((prototypes - mean) ** 2).sum(1))
        assert nearest == sample.color[i], (i, mean, COLORS[sample.color[i]])


def test_large_shapes_cover_more_pixels(sample):
    """Every large shape covers more pixels than every small one, overall and within each shape."""
    area = _saturated(sample.images, sample).sum((1, 2))
    small, large = area[sample.size == SIZES.index("small")], area[sample.size == SIZES.index("large")]
    assert small.min() > 20
    assert large.min() > small.max()
    # also within every shape
    for s in range(len(SHAPES)):
        select = sample.shape == s
        assert area[select & (sample.size == 1)].min() > area[select & (sample.size == 0)].max()


def test_shape_label_matches_geometry(sample):
    """Classify the colored blob by simple geometry, independently of the generator.

    Rings (a hole at the centroid) are recognized exactly; circles, squares and triangles by the
    ratio of the largest to the smallest support-function value (1 for a disk, sqrt(2) for a
    square, 2 for a triangle) and by how much of the enclosing disk they fill. Pixelation of the
    small shapes blurs these, so 95 % agreement is asked (shuffled labels would give 25 %).
    """
    saturated = _saturated(sample.images, sample)
    coords = np.arange(32) + 0.5
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    guesses = []
    for i in range(N):
        ys, xs = np.nonzero(saturated[i])
        points = np.stack([coords[xs] - coords[xs].mean(), coords[ys] - coords[ys].mean()], axis=1)
        hole = not saturated[i, int(coords[ys].mean()), int(coords[xs].mean())]
        assert hole == (SHAPES[sample.shape[i]] == "ring"), i
        support = (points @ directions.T).max(0) + 0.5
        elongation = support.max() / support.min()
        fill = len(ys) / (np.pi * (np.sqrt((points ** 2).sum(1)).max() + 0.5) ** 2)
        if hole:
            guesses.append("ring")
        elif elongation > 1.6:
            guesses.append("triangle")
        elif elongation + (0.85 - fill) < 1.25:
            guesses.append("circle")
        else:
            guesses.append("square")
    agreement = np.mean(np.array(guesses) == np.array(SHAPES)[sample.shape])
    assert agreement > 0.95


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # rows or columns covered by the shape
def test_texture_present_in_background(sample):
    """The background away from the shape shows the labeled texture (plain, stripes, dots or checker)."""
    saturated = _saturated(sample.images, sample)
    # background: gray pixels away from the shape (one pixel of margin)
    near = saturated.copy()
    near[:, 1:] |= saturated[:, :-1]
    near[:, :-1] |= saturated[:, 1:]
    near[:, :, 1:] |= near[:, :, :-1].copy()
    near[:, :, :-1] |= near[:, :, 1:].copy()
    near |= sample.artifact_masks  # the artifact is not background
    gray = sample.images.astype(np.float64).mean(-1) / 255.0
    for i in range(N):
        texture = TEXTURES[sample.texture[i]]
        background = np.where(near[i], np.nan, gray[i])
        values = background[~near[i]]
        if texture == "plain":
            assert values.std() < 0.03, (i, texture)
            continue
        assert values.std() > 0.05, (i, texture)
        bright = values > (values.min() + values.max()) / 2
        row_std = np.nanmean(np.nanstd(background, axis=1))  # along x, within each row
        col_std = np.nanmean(np.nanstd(background, axis=0))  # along y, within each column
        if texture == "horizontal_stripes":
            assert row_std < 0.025 and col_std > 0.1, (i, row_std, col_std)
        elif texture == "vertical_stripes":
            assert col_std < 0.025 and row_std > 0.1, (i, row_std, col_std)
        elif texture == "dots":
            assert bright.mean() < 0.25 and min(row_std, col_std) > 0.025, (i, bright.mean())
        else:
            assert texture == "checker"
            assert 0.35 < bright.mean() < 0.65 and min(row_std, col_std) > 0.1, (i, bright.mean())


def test_attribute_matrix(sample):
    """One-hot blocks equal the attribute labels, parents are the OR of their children, no class is a concept."""
    labels, names = attribute_matrix(sample)
    assert names == concept_names() and len(set(names)) == len(names)
    assert labels.dtype == bool and labels.shape == (N, len(names))
    column = {name: labels[:, k] for k, name in enumerate(names)}
    for values, index in ((SHAPES, sample.shape), (COLORS, sample.color), (SIZES, sample.size),
                          (TEXTURES, sample.texture)):
        block = np.stack([column[v] for v in values], axis=1)
        assert (block.sum(1) == 1).all()
        assert np.array_equal(block.argmax(1), index)
    for parent, children in PARENTS.items():
        assert len(children) >= 2
        assert np.array_equal(column[parent], np.any([column[c] for c in children], axis=0))
    # the pair classes are not concepts
    assert not set(CLASS_NAMES) & set(names)


def test_planted_truth_is_unique_among_short_formulas(sample):
    """For every class, `shape AND color` selects exactly its samples and no other formula of
    length <= 2 over the attribute concepts (with negations, AND / OR) does."""
    labels, names = attribute_matrix(sample)
    literals = [(f"{name}", labels[:, k]) for k, name in enumerate(names)]
    literals += [(f"~{name}", ~labels[:, k]) for k, name in enumerate(names)]
    candidates = list(literals)
    for (na, a), (nb, b) in itertools.combinations(literals, 2):
        candidates.append((f"{na} & {nb}", a & b))
        candidates.append((f"{na} | {nb}", a | b))
    for c, class_name in enumerate(CLASS_NAMES):
        shape, color = class_attributes()[class_name]
        target = sample.targets == c
        exact = {name for name, mask in candidates if np.array_equal(mask, target)}
        assert exact in ({f"{shape} & {color}"}, {f"{color} & {shape}"}), (class_name, exact)


def test_dataset_items():
    """Items are (3, 32, 32) floats in [0, 1] with int targets of their attributes, like tensors() and a DataLoader."""
    ds = ShapesDataset(40, seed=1)
    assert len(ds) == 40
    assert ds.class_names == list(CLASS_NAMES) and len(CLASS_NAMES) == len(SHAPES) * len(COLORS)
    image, target = ds[7]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(target, int)
    shape, color = ds.class_to_attributes[ds.class_names[target]]
    assert SHAPES[ds.sample.shape[7]] == shape and COLORS[ds.sample.color[7]] == color
    assert torch.equal(image, torch.from_numpy(ds.sample.images[7]).permute(2, 0, 1).float() / 255)
    images, targets = ds.tensors([7, 3])
    assert torch.equal(images[0], image) and targets.tolist() == [target, ds[3][1]]
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and y.tolist() == ds.targets[:16].tolist()
    with pytest.raises(IndexError):
        ds[40]


def test_concept_labels(sample):
    """attribute_concepts equals attribute_matrix, and every class formula evaluates to exactly its class's samples."""
    from crp_invert import ConceptLabels

    concepts = data.attribute_concepts(sample)
    labels, names = attribute_matrix(sample)
    assert isinstance(concepts, ConceptLabels)
    assert concepts.names == names and concepts.n_samples == N
    assert torch.equal(concepts.dense().cpu(), torch.from_numpy(labels))
    for class_name, formula in data.class_formulas().items():
        target = torch.from_numpy(sample.targets == CLASS_NAMES.index(class_name))
        assert torch.equal(formula.evaluate(concepts).cpu(), target)


@pytest.mark.parametrize("bad", [-1, 2.5, "10"])
def test_bad_arguments(bad):
    """generate_shapes refuses a negative, fractional or string n or seed with ValueError."""
    with pytest.raises(ValueError, match="n must be"):
        generate_shapes(bad)
    with pytest.raises(ValueError, match="seed must be"):
        generate_shapes(4, seed=bad)


def test_image_size():
    """image_size sets the image's height and width; a too small size raises ValueError."""
    sample = generate_shapes(32, seed=0, image_size=48)
    assert sample.images.shape == (32, 48, 48, 3)
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes(4, image_size=8)


def test_artifact_is_planted_at_its_rates_and_changes_nothing_else():
    """The mark: on about 90 % of the artifact class and 2 % of the others, drawn away from the shape, from its
    own random stream (every other pixel and attribute equals the artifact-free draw of the same seed)."""
    n = 3200
    with_mark = generate_shapes(n, seed=8)
    without = generate_shapes(n, seed=8, artifact_rates=None)
    everywhere = generate_shapes(n, seed=8, artifact_rates=(1, 1))
    for name in ("shape", "color", "size", "texture", "center", "masks"):
        assert np.array_equal(getattr(with_mark, name), getattr(without, name)), name
    assert not without.artifact.any() and not without.artifact_masks.any() and everywhere.artifact.all()
    changed = (with_mark.images != without.images).any(-1)
    assert not (changed & ~with_mark.artifact_masks).any()
    assert np.array_equal(changed.any((1, 2)), with_mark.artifact)
    target = with_mark.targets == CLASS_NAMES.index(data.ARTIFACT_CLASS)
    in_class, others = data.ARTIFACT_RATES
    assert abs(with_mark.artifact[target].mean() - in_class) < 0.06
    assert abs(with_mark.artifact[~target].mean() - others) < 0.01
    glyph = data.artifact_glyph()
    height, width = glyph.shape[:2]
    for i in np.flatnonzero(everywhere.artifact)[:400]:
        rows, cols = np.nonzero(everywhere.artifact_masks[i])
        assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (height, width)
        assert len(rows) == height * width
        top, left = rows.min(), cols.min()
        assert np.array_equal(everywhere.images[i, top:top + height, left:left + width], glyph)
        # one pixel of margin to the shape
        grown = np.zeros_like(everywhere.masks[i])
        grown[max(top - 1, 0):top + height + 1, max(left - 1, 0):left + width + 1] = True
        assert not (grown & everywhere.masks[i]).any(), i
    # the mark lands anywhere: all four quadrants
    quadrants = {(r // 16, c // 16) for r, c in (np.argwhere(m)[0] for m in everywhere.artifact_masks[:200])}
    assert len(quadrants) == 4


def test_audit_dataset_merges_the_artifact_concept_set():
    """AuditDataset: shapes images then the artifact set, whose concept is true only on the set."""
    dataset = data.AuditDataset(160, seed=3, n_artifact=20)
    assert len(dataset) == 180 and dataset.n_base == 160
    concepts = dataset.concepts
    assert concepts.names == concept_names() + [data.ARTIFACT]
    artifact = concepts.mask(data.ARTIFACT).numpy()
    assert not artifact[:160].any() and artifact[160:].all()  # unknown on the shapes images, true on the set
    assert np.array_equal(dataset.carries_artifact[160:], np.ones(20, bool))
    assert np.array_equal(dataset.carries_artifact[:160], dataset.base.sample.artifact)
    base_labels, _ = attribute_matrix(dataset.base.sample)
    extra_labels, _ = attribute_matrix(dataset.artifact_set.sample)
    assert np.array_equal(concepts.dense()[:, :-1].numpy(), np.concatenate([base_labels, extra_labels]))
    images, targets = dataset.tensors()
    assert torch.equal(images[170], dataset[170][0]) and int(targets[170]) == dataset[170][1]
    assert torch.equal(images[:160], dataset.base.tensors()[0])
    assert dataset.artifact_set.sample.seed == data.ARTIFACT_SEED_OFFSET + 3
    with pytest.raises(ValueError, match="n_artifact"):
        data.AuditDataset(16, n_artifact=-1)
    with pytest.raises(IndexError):
        dataset[180]


def test_class_concepts_hold_for_every_image_of_the_class(sample):
    """The documented class concepts equal those that hold for every image of the class in the data (min_fraction=1)."""
    from crp_invert.audit import class_concepts_from_data

    from_data = class_concepts_from_data(data.attribute_concepts(sample), sample.targets, CLASS_NAMES,
                                         min_fraction=1.0)
    assert {name: set(v) for name, v in data.class_concepts().items()} == {
        name: set(v) for name, v in from_data.items()}
