"""ConceptLabels: construction from every input kind, hierarchy, merge, files, bad input."""
import json

import numpy as np
import pytest
import scipy.sparse
import torch

from crp_invert import ConceptLabels


def dense_example():
    return np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)


@pytest.mark.parametrize("convert", [
    lambda x: x,
    lambda x: x.astype(np.float32),
    lambda x: torch.from_numpy(x),
    lambda x: torch.from_numpy(x).to(torch.int64).to_sparse(),
    lambda x: scipy.sparse.csr_matrix(x.astype(np.int8)),
    lambda x: scipy.sparse.coo_matrix(x),
    lambda x: x.tolist(),
])
def test_every_input_kind_gives_the_same_labels(convert):
    """Dense, sparse and torch inputs give the same ConceptLabels (dense view, masks, counts, sparse transpose)."""
    labels = ConceptLabels(convert(dense_example()), ["a", "b", "c"])
    assert labels.n_samples == 4 and labels.n_concepts == 3
    np.testing.assert_array_equal(labels.dense().numpy(), dense_example())
    assert labels.mask("b").tolist() == [False, True, True, False]
    assert labels.counts().tolist() == [2, 2, 1]
    assert labels.torch_sparse_t().to_dense().numpy().tolist() == dense_example().T.astype(float).tolist()


def test_bad_input_is_named():
    """Bad names, non-0/1 values, K = 0 and wrong shapes raise errors that name the bad value."""
    with pytest.raises(ValueError, match="unique.*'a'"):
        ConceptLabels(dense_example(), ["a", "a", "c"])
    with pytest.raises(ValueError, match="empty"):
        ConceptLabels(dense_example(), ["a", "", "c"])
    with pytest.raises(ValueError, match="0/1.*2"):
        ConceptLabels(np.array([[0, 2], [1, 0]]), ["a", "b"])
    with pytest.raises(ValueError, match="0/1"):
        ConceptLabels(np.array([[0.5, 1.0]]), ["a", "b"])
    with pytest.raises(ValueError, match="0/1"):
        ConceptLabels(scipy.sparse.csr_matrix(np.array([[0, 3]])), ["a", "b"])
    with pytest.raises(ValueError, match="K = 0"):
        ConceptLabels(np.zeros((4, 0), dtype=bool), [])
    with pytest.raises(ValueError, match="3 label columns"):
        ConceptLabels(dense_example(), ["a", "b"])
    with pytest.raises(TypeError):
        ConceptLabels(dense_example(), "abc")
    with pytest.raises(KeyError, match="zebra"):
        ConceptLabels(dense_example(), ["a", "b", "c"]).mask("zebra")


def test_from_targets_with_nested_hierarchy():
    """from_targets adds hierarchy concepts that hold on the samples of every descendant class."""
    targets = [0, 1, 2, 3, 1]
    hierarchy = {"footwear": ["sandal", "sneaker"], "wearable": ["footwear", "shirt"], "empty": []}
    labels = ConceptLabels.from_targets(targets, ["sandal", "sneaker", "shirt", "bag"], hierarchy=hierarchy)
    assert labels.names == ["sandal", "sneaker", "shirt", "bag", "footwear", "wearable", "empty"]
    assert labels.mask("footwear").tolist() == [True, True, False, False, True]
    assert labels.mask("wearable").tolist() == [True, True, True, False, True]
    assert not labels.mask("empty").any()
    # one-hot rows: the class and its ancestors
    assert labels.dense()[0].nonzero().flatten().tolist() == [0, 4, 5]


def test_hierarchy_errors():
    """Unknown hierarchy members, cycles, name clashes and out-of-range targets raise named errors."""
    with pytest.raises(KeyError, match="unicorn"):
        ConceptLabels.from_targets([0, 1], ["a", "b"], hierarchy={"p": ["a", "unicorn"]})
    with pytest.raises(ValueError, match="cycle"):
        ConceptLabels.from_targets([0, 1], ["a", "b"], hierarchy={"p": ["q"], "q": ["p"]})
    with pytest.raises(ValueError, match="clash"):
        ConceptLabels.from_targets([0, 1], ["a", "b"], hierarchy={"a": ["b"]})
    with pytest.raises(ValueError, match="out of range"):
        ConceptLabels.from_targets([0, 5], ["a", "b"])


def test_merge_missing_concepts_are_negative():
    """merge stacks the samples, and a concept missing from one input is negative on its samples."""
    first = ConceptLabels(np.array([[1, 0], [0, 1]], dtype=bool), ["dog", "cat"])
    second = ConceptLabels(np.array([[1, 1], [0, 1], [1, 0]], dtype=bool), ["stripes", "dog"])
    merged = first.merge(second)
    assert merged.names == ["dog", "cat", "stripes"]
    assert merged.n_samples == 5
    assert merged.mask("dog").tolist() == [True, False, True, True, False]
    assert merged.mask("stripes").tolist() == [False, False, True, False, True]
    assert merged.mask("cat").tolist() == [False, True, False, False, False]


def test_subset():
    """subset by indices or a boolean mask keeps the chosen rows and rejects a mask of the wrong length."""
    labels = ConceptLabels(dense_example(), ["a", "b", "c"])
    assert labels.subset([2, 0]).dense().numpy().tolist() == dense_example()[[2, 0]].tolist()
    mask = np.array([True, False, True, False])
    assert labels.subset(mask).n_samples == 2
    with pytest.raises(ValueError):
        labels.subset(np.array([True, False]))


def test_save_load_round_trip(tmp_path):
    """save/load round-trips names and descriptions, reads plain npz files, and names broken files."""
    labels = ConceptLabels(dense_example(), ["a", "b c", "(d)"], descriptions=["first", "", "third"])
    labels.save(tmp_path / "labels.npz")
    assert ConceptLabels.load(tmp_path / "labels.npz") == labels
    np.savez(tmp_path / "dense.npz", labels=dense_example(), names=np.array(["a", "b", "c"]))
    assert ConceptLabels.load(tmp_path / "dense.npz").dense().numpy().tolist() == dense_example().tolist()
    np.savez(tmp_path / "broken.npz", labels=dense_example())
    with pytest.raises(KeyError, match="names"):
        ConceptLabels.load(tmp_path / "broken.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError):
        ConceptLabels.load(tmp_path / "junk.npz")


def test_reference_implementation_files(tmp_path):
    """from_reference reads the reference's one-hot .pt and description .json, making duplicate names unique."""
    onehot = torch.tensor(dense_example(), dtype=torch.float32)
    torch.save(onehot, tmp_path / "labels.pt")
    description = {
        "n01": {"name": "crane", "offset": "n01", "description": "a bird"},
        "n02": {"name": "dog", "offset": "n02", "description": "an animal"},
        "n03": {"name": "crane", "offset": "n03", "description": "a machine"},
    }
    (tmp_path / "labels.json").write_text(json.dumps(description))
    labels = ConceptLabels.from_reference(tmp_path / "labels.pt", tmp_path / "labels.json")
    assert labels.names == ["crane (n01)", "dog", "crane (n03)"]
    assert labels.descriptions["dog"] == "an animal"
    np.testing.assert_array_equal(labels.dense().numpy(), dense_example())


def test_unknown_concepts_are_listed_with_the_closest_names():
    """An unknown name's KeyError (mask, check_names, Formula.parse) names its closest known names and some known."""
    from crp_invert import Formula
    from crp_invert.core.concepts import closest_names

    names = ["artifact", "red", "green", "blue", "ring", "square", "large"]
    concepts = ConceptLabels(np.zeros((3, len(names)), dtype=bool), names)
    with pytest.raises(KeyError, match=r"'artefact' \(closest: 'artifact'\).*known concepts: \['artifact'"):
        concepts.mask("artefact")
    with pytest.raises(KeyError, match=r"'Blue' \(closest: 'blue'\); 'zebra' \(no close name\)"):
        concepts.check_names(["red", "zebra", "Blue"])
    concepts.check_names(["red", "ring"])  # known names pass
    with pytest.raises(KeyError, match=r"'sqaure' \(closest: 'square'\) in formula 'sqaure AND red'.*7 in all"):
        Formula.parse("sqaure AND red", concepts)
    many = [f"c{i:03d}" for i in range(50)]
    with pytest.raises(KeyError, match=r"\.\.\.\] \(50 in all\)"):
        ConceptLabels(np.zeros((2, 50), dtype=bool), many).index("x")
    assert closest_names("gren", names) == ["green"] and closest_names("qqq", names) == []
