"""The tutorials: their percent-script sources, the executed notebooks stored next to them, and their execution.

``tutorials/build.py`` turns every ``tutorials/NN_name.py`` into ``tutorials/NN_name.ipynb`` and executes it.
Here: the percent-format reader and writer (a hand-written example of the format, errors, a round trip); every
stored notebook has the cells of its script and was executed without errors (what ``build.py --check`` says);
and every notebook executes from a fresh kernel in an empty folder, writes nothing there, and shows the same
kinds of outputs per cell as the stored one.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

nbformat = pytest.importorskip("nbformat", reason="test extra: pip install -e .[test]")
pytest.importorskip("nbclient", reason="test extra: pip install -e .[test]")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


def load_build():
    spec = importlib.util.spec_from_file_location("tutorials_build", TUTORIALS / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = load_build()
SOURCES = build.sources()
REBUILD = "rebuild with: python tutorials/build.py"

# ------------------------------------------------------------------------------------------------ format
EXAMPLE = """\
# ---
# jupyter:
#   kernelspec:
#     name: python3
# ---

# %% [markdown]
# # Title
#
# Some *text*; a `# %%` inside markdown is text.
#   indented

# %%
# %matplotlib inline
import numpy as np


x = np.arange(3)  # %% is not a marker here
# # %time is a comment about a magic

# %% [markdown]
# more


# %%
print(x)
    # %%time
"""
EXAMPLE_CELLS = [
    ("markdown", "# Title\n\nSome *text*; a `# %%` inside markdown is text.\n  indented"),
    ("code", "%matplotlib inline\nimport numpy as np\n\n\nx = np.arange(3)  # %% is not a marker here\n"
             "# %time is a comment about a magic"),
    ("markdown", "more"),
    ("code", "print(x)\n    %%time"),
]


def test_read_percent_example():
    """read_percent splits the example script into its cells; a header alone or empty text gives no cells."""
    assert build.read_percent(EXAMPLE) == EXAMPLE_CELLS
    assert build.read_percent(EXAMPLE.split("\n# %% [markdown]\n# # Title")[0]) == []  # a header alone: no cells
    assert build.read_percent("") == []


def test_write_percent_example():
    """write_percent writes the example cells as a percent script that reads back to the same cells."""
    text = build.write_percent(EXAMPLE_CELLS)
    assert text.startswith("# %% [markdown]\n# # Title\n#\n# Some")
    assert "\n\n# %%\n# %matplotlib inline\nimport numpy" in text
    assert "\n# # %time is a comment" in text and "    # %%time" in text
    assert build.read_percent(text) == EXAMPLE_CELLS
    assert build.write_percent([("code", "x = 1\n\n  \n")]) == "# %%\nx = 1\n"  # trailing blank lines go


@pytest.mark.parametrize("text, line", [
    ("import os\n# %%\nx = 1\n", 1),                      # code before the first marker
    ("# %% [markdown]\n# fine\nnot a comment\n", 3),      # markdown that is not a comment
    ("# %%\nx = 1\n\n# %% Title\ny = 2\n", 4),            # a marker with a title
    ("# %%\nx = 1\n#%%\n", 3),                             # a marker without the space
    ("# ---\n# jupyter: {}\n\n# %%\nx = 1\n", 1),         # a header that does not close
])
def test_read_percent_rejects(text, line):
    """read_percent refuses malformed percent scripts, naming the line."""
    with pytest.raises(ValueError, match=f"line {line}"):
        build.read_percent(text)


@pytest.mark.parametrize("cells, message", [
    ([("code", "x = 1\n# %%\ny = 2")], "cell marker"),
    ([("code", "x = 1\n#%% [markdown]")], "cell marker"),
    ([("markdown", "%% not text")], "cell marker"),
    ([("raw", "x")], "cell type"),
])
def test_write_percent_rejects(cells, message):
    """write_percent refuses cells it cannot write, saying why."""
    with pytest.raises(ValueError, match=message):
        build.write_percent(cells)


TRICKY_LINES = ["", " ", "#", "# ", "# x", "#x", "%time", "%%time", "  %matplotlib inline", "# %time", "#%time",
                "# # %time", "%%", "%% x", "# %%", "# %% [markdown]", "#%%", "x = 1  # %%", "# ---", "---", "\t",
                "'''", "\\", "%", "%1", "é ✓"]
LINES = st.one_of(st.sampled_from(TRICKY_LINES), st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12))
SOURCES_TEXT = st.lists(LINES, min_size=1, max_size=6).map("\n".join)
CELLS = st.lists(st.tuples(st.sampled_from(["markdown", "code"]), SOURCES_TEXT), max_size=6)


def without_trailing_blank_lines(source):
    lines = source.split("\n")
    while lines and lines[-1].strip() == "":
        lines.pop()
    return "\n".join(lines)


@given(CELLS)
def test_percent_round_trip(cells):
    """Random cells round-trip through write_percent and read_percent, and the written form is canonical."""
    try:
        text = build.write_percent(cells)
    except ValueError as error:
        assert "cell marker" in str(error) and any("%%" in source for _, source in cells)
        return
    expected = [(kind, without_trailing_blank_lines(source) if kind == "code" else source) for kind, source in cells]
    assert build.read_percent(text) == expected
    assert build.write_percent(build.read_percent(text)) == text  # the written form is canonical
    if all(kind == "markdown" for kind, _ in cells):  # markdown cells are comments: valid Python
        compile(text, "<percent>", "exec")


# ----------------------------------------------------------------------------------------------- notebooks
def executed(cells, error_in=None):
    """A notebook of ``cells`` that looks executed (execution counts 1.. and an output per code cell)."""
    from nbformat.v4 import new_output

    notebook = build.notebook_from_cells(cells)
    count = 0
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            cell.outputs = [new_output("error", ename="E", evalue="", traceback=[]) if index == error_in
                            else new_output("stream", name="stdout", text="1\n")]
    return notebook


def test_differences_name_what_is_stale(tmp_path):
    """differences names a missing, differing, longer or unexecuted notebook next to its script."""
    cells = [("markdown", "# T"), ("code", "print(1)"), ("code", "x = 2")]
    source = tmp_path / "01_t.py"
    source.write_text(build.write_percent(cells))
    assert build.differences(source) == ["01_t.ipynb is missing"]
    nbformat.write(executed(cells), tmp_path / "01_t.ipynb")
    assert build.differences(source) == []
    source.write_text(build.write_percent(cells[:2] + [("code", "x = 3")]))
    assert build.differences(source) == ["01_t.ipynb cell 2 differs from 01_t.py"]
    source.write_text(build.write_percent(cells + [("code", "y = 4")]))
    assert build.differences(source) == ["01_t.ipynb has 3 cells, 01_t.py has 4"]
    source.write_text(build.write_percent(cells))
    nbformat.write(build.notebook_from_cells(cells), tmp_path / "01_t.ipynb")  # not executed
    assert build.differences(source) == [
        "01_t.ipynb was not executed in order from a fresh kernel (execution counts [None, None])"]
    nbformat.write(executed(cells, error_in=2), tmp_path / "01_t.ipynb")
    assert build.differences(source) == ["01_t.ipynb has error outputs in cells [2]"]


def test_cell_ids_come_from_the_content():
    """Notebook cell ids are the same on every build, unique, and follow the cell's content."""
    cells = [("code", "x = 1"), ("code", "x = 1"), ("markdown", "x = 1")]
    first, second = build.notebook_from_cells(cells), build.notebook_from_cells(cells)
    ids = [cell.id for cell in first.cells]
    assert ids == [cell.id for cell in second.cells] and len(set(ids)) == 3
    assert build.notebook_from_cells(cells[1:]).cells[0].id == ids[0]


def test_every_tutorial_has_a_script_and_a_notebook():
    """Every tutorial script has a stored notebook, there are no orphans, and the build's --check passes."""
    assert [path.name for path in SOURCES[:3]] == [
        "01_label_channels.py", "02_glocal_and_circuits.py", "03_bring_your_own_data.py"]
    assert build.orphans() == []
    assert not (TUTORIALS / "make_notebooks.py").exists()
    assert (TUTORIALS / "README.md").is_file()
    assert build.main(["--check"]) == 0, REBUILD


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.stem)
def test_stored_notebook_matches_its_script(source):
    """Each stored notebook matches its script cell for cell and holds outputs."""
    compile(source.read_text(encoding="utf-8"), str(source), "exec")  # the scripts are plain Python
    assert build.differences(source) == [], REBUILD
    assert any(build.output_kinds(nbformat.read(build.notebook_path(source), as_version=4)))


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.stem)
def test_notebook_executes_like_the_stored_one(source, tmp_path):
    """Executing a tutorial from a fresh kernel gives the stored notebook's output kinds, metadata and cell ids, writing
    nothing outside its folder."""
    notebook = build.execute(build.read_source(source), cwd=tmp_path)  # CellExecutionError names a failing cell
    assert list(tmp_path.iterdir()) == []  # the notebooks write into their own temporary folder only
    stored = nbformat.read(build.notebook_path(source), as_version=4)
    for index, (fresh, kept) in enumerate(zip(build.output_kinds(notebook), build.output_kinds(stored))):
        assert fresh == kept, f"code cell {index} of {source.name}: outputs {fresh} now, {kept} stored; {REBUILD}"
    # what the build stores besides the outputs does not change between runs (a rebuild gives a small diff)
    assert notebook.metadata == stored.metadata
    assert [(c.id, c.metadata, c.get("execution_count")) for c in notebook.cells] == [
        (c.id, c.metadata, c.get("execution_count")) for c in stored.cells]
