"""The tutorial notebooks execute on the embedded demo (nbclient), are committed without outputs, and match
tutorials/make_notebooks.py."""

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="test extra: pip install -e .[test]")
nbclient = pytest.importorskip("nbclient", reason="test extra: pip install -e .[test]")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = ["01_label_channels.ipynb", "02_glocal_and_circuits.ipynb", "03_bring_your_own_data.ipynb"]


def load_maker():
    spec = importlib.util.spec_from_file_location("make_notebooks", TUTORIALS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_committed_without_outputs_and_match_the_maker():
    maker = load_maker()
    expected = {
        "01_label_channels.ipynb": maker.tutorial_1() + maker.CLEANUP,
        "02_glocal_and_circuits.ipynb": maker.tutorial_2() + maker.CLEANUP,
        "03_bring_your_own_data.ipynb": maker.tutorial_3() + maker.CLEANUP,
    }
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == NOTEBOOKS
    for name in NOTEBOOKS:
        notebook = nbformat.read(TUTORIALS / name, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), name
        assert [cell.source for cell in notebook.cells] == [cell.source for cell in expected[name]], (
            f"{name} differs from tutorials/make_notebooks.py; run python tutorials/make_notebooks.py"
        )
    assert (TUTORIALS / "README.md").is_file()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("output_type") == "error"
    ]
    assert not errors
    assert list(tmp_path.iterdir()) == []  # the notebooks write into their own temporary folder only
