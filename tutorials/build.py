"""Build the tutorial notebooks from their percent-format sources, executed, with their outputs stored.

    python tutorials/build.py                 # every tutorials/[0-9][0-9]_*.py -> .ipynb, executed
    python tutorials/build.py 02 04           # only the tutorials whose file names start with 02 or 04
    python tutorials/build.py --check         # no execution: exit 1 where a notebook differs from its source
    python tutorials/build.py --to-script X.ipynb   # X.py from a notebook edited in Jupyter

The sources ``tutorials/NN_name.py`` are the *percent* format of jupytext (a subset of it; jupytext is not
needed): a line ``# %% [markdown]`` starts a markdown cell whose lines are written as ``# `` comments (an empty
line as ``#``), a line ``# %%`` starts a code cell, and one blank line separates cells. IPython magics are
commented in code cells (``# %matplotlib inline``) and uncommented when read, as jupytext does; other IPython
syntax (``!ls``, ``x?``) is not supported. A jupytext header (``# ---`` ... ``# ---``) at the top is skipped.
The scripts are plain Python and run as they are.

The build executes each notebook in a fresh kernel in the tutorials folder against this checkout's
``crp_invert`` (the repository root goes first on the kernel's ``PYTHONPATH``). Figures are stored as PNGs at
``FIGURE_DPI`` (whatever the notebook's figure dpi), progress bars are switched off (``TQDM_DISABLE``), and
everything that changes between runs without a change of the source is left out (execution timestamps, the
Python version, random cell ids), so that rebuilding an unchanged tutorial gives a small diff.
tests/test_tutorials.py checks that every stored notebook matches its source and executes them all.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import re
import struct
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCE_GLOB = "[0-9][0-9]_*.py"
FIGURE_DPI = 72  # dots per inch of the stored PNGs: a 8 x 3 inch figure is 576 x 216 pixels
TIMEOUT = 300  # seconds a cell may run
MAX_NOTEBOOK_BYTES = 1_000_000  # a stored notebook larger than this fails the build and the test
MAX_PNG_WIDTH = 1200  # pixels: about 16 inches at FIGURE_DPI
KERNEL_NAME = "python3"
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": KERNEL_NAME},
    "language_info": {"name": "python"},
}

MARKDOWN = "markdown"
CODE = "code"
_MARKERS = {"# %%": CODE, "# %% [markdown]": MARKDOWN}
_HEADER = "# ---"
_ANY_MARKER = re.compile(r"#\s*%%(\s|$)")  # what jupytext could read as a cell marker
_MAGIC = re.compile(r"\s*(# |#)*%{1,3}[a-zA-Z]")  # a magic, commented any number of times

Cell = Tuple[str, str]  # (cell type, source)

log = logging.getLogger("tutorials.build")


# --------------------------------------------------------------------------------------------------- format
def read_percent(text: str) -> List[Cell]:
    """Read the cells of a percent-format script.

    Parameters
    ----------
    text : str
        The script.

    Returns
    -------
    list of (str, str)
        ``("markdown" | "code", source)`` per cell, in order; sources carry no trailing newline.

    Raises
    ------
    ValueError
        Text before the first cell marker, a cell marker other than ``# %%`` and ``# %% [markdown]``, or a
        markdown line that is not a ``#`` comment (with its line number).
    """
    lines = text.split("\n")
    start = 0
    if lines and lines[0] == _HEADER:  # a jupytext header: skip it
        try:
            start = lines.index(_HEADER, 1) + 1
        except ValueError:
            raise ValueError(f"the header that starts at line 1 with {_HEADER!r} has no closing {_HEADER!r}") from None
    cells: List[Cell] = []
    kind: Optional[str] = None
    body: List[Tuple[int, str]] = []  # (line number, line) of the open cell

    def close() -> None:
        while body and body[-1][1].strip() == "":  # the blank lines between cells
            body.pop()
        cells.append((kind, "\n".join(_cell_line(kind, number, line) for number, line in body)))
        body.clear()

    for number, line in enumerate(lines[start:], start=start + 1):
        if line in _MARKERS:
            if kind is not None:
                close()
            kind = _MARKERS[line]
        elif _ANY_MARKER.match(line):
            raise ValueError(f"line {number}: {line!r}: the cell markers are '# %%' and '# %% [markdown]' alone")
        elif kind is None:
            if line.strip():
                raise ValueError(f"line {number}: {line!r} comes before the first cell marker '# %%'")
        else:
            body.append((number, line))
    if kind is not None:
        close()
    return cells


def _cell_line(kind: str, number: int, line: str) -> str:
    """The cell source line of script line ``number``: markdown without its ``# ``, magics uncommented."""
    if kind == MARKDOWN:
        if line == "#" or line.strip() == "":  # a blank line inside a markdown cell reads as an empty line
            return ""
        if line.startswith("# "):
            return line[2:]
        raise ValueError(f"line {number}: markdown lines must start with '# ' (or be '#'), got {line!r}")
    return _uncomment(line) if _MAGIC.match(line) else line


def _uncomment(line: str) -> str:
    """Remove one level of ``#`` from a commented magic, keeping its indentation."""
    stripped = line.lstrip()
    indent = line[: len(line) - len(stripped)]
    if stripped.startswith("# "):
        return indent + stripped[2:]
    if stripped.startswith("#"):
        return indent + stripped[1:]
    return line


def _comment(line: str) -> str:
    """Comment a magic (commented or not) once more, keeping its indentation."""
    stripped = line.lstrip()
    return line[: len(line) - len(stripped)] + "# " + stripped


def write_percent(cells: Iterable[Cell]) -> str:
    """Write cells as a percent-format script; ``read_percent`` reads them back.

    Trailing blank lines of a code cell are dropped (they would read as the gap to the next cell). Magics in code
    cells are commented once more (``%matplotlib inline`` -> ``# %matplotlib inline``).

    Parameters
    ----------
    cells : iterable of (str, str)
        ``("markdown" | "code", source)`` per cell.

    Returns
    -------
    str
        The script, ending with a newline.

    Raises
    ------
    ValueError
        An unknown cell type, or a line that would read as a cell marker.
    """
    chunks = []
    for index, (kind, source) in enumerate(cells):
        lines = source.split("\n")
        if kind == MARKDOWN:
            for line in lines:
                if _ANY_MARKER.match("# " + line):
                    raise ValueError(f"markdown cell {index}: the line {line!r} would read as a cell marker")
            chunks.append("\n".join(["# %% [markdown]"] + ["# " + line if line else "#" for line in lines]))
        elif kind == CODE:
            for line in lines:
                if _ANY_MARKER.match(line):
                    raise ValueError(f"code cell {index}: the line {line!r} would read as a cell marker")
            while lines and lines[-1].strip() == "":
                lines.pop()
            chunks.append("\n".join(["# %%"] + [_comment(line) if _MAGIC.match(line) else line for line in lines]))
        else:
            raise ValueError(f"cell {index}: cell type must be {MARKDOWN!r} or {CODE!r}, got {kind!r}")
    return "\n\n".join(chunks) + "\n"


def cells_of(notebook) -> List[Cell]:
    """The ``(type, source)`` of every markdown and code cell of a notebook (raw cells are not supported)."""
    return [(cell.cell_type, cell.source) for cell in notebook.cells if cell.cell_type in (MARKDOWN, CODE)]


# -------------------------------------------------------------------------------------------------- notebook
def _cell_id(kind: str, source: str, seen: set) -> str:
    """A cell id made from the cell's content, so that rebuilding keeps it (nbformat makes random ones)."""
    base = hashlib.sha1(f"{kind}\n{source}".encode()).hexdigest()[:12]
    cell_id, n = base, 1
    while cell_id in seen:
        n += 1
        cell_id = f"{base}-{n}"
    seen.add(cell_id)
    return cell_id


def notebook_from_cells(cells: Sequence[Cell]):
    """A notebook (nbformat 4) without outputs from ``(type, source)`` cells, with ids made from the content."""
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    seen: set = set()
    made = []
    for kind, source in cells:
        cell = new_markdown_cell(source) if kind == MARKDOWN else new_code_cell(source)
        cell.id = _cell_id(kind, source, seen)
        made.append(cell)
    notebook = new_notebook(cells=made, metadata=METADATA)
    nbformat.validate(notebook)
    return notebook


def kernel_environment() -> dict:
    """The kernel's environment: this checkout first on ``PYTHONPATH``, inline figures, no progress bars."""
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # e.g. Agg from a test run would keep the figures out of the notebook
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["TQDM_DISABLE"] = "1"  # progress bars (CRP's among them) print timings that change every run
    env.setdefault("OMP_NUM_THREADS", "1")  # the tutorials are small; threads only make sums vary
    return env


def execute(notebook, cwd: os.PathLike, timeout: int = TIMEOUT):
    """Execute a notebook in place in a fresh kernel whose working directory is ``cwd``, and clean it.

    Parameters
    ----------
    notebook : nbformat.NotebookNode
        The notebook; its outputs are replaced.
    cwd : path-like
        The kernel's working directory.
    timeout : int
        Seconds a cell may run.

    Returns
    -------
    nbformat.NotebookNode
        The same notebook, executed and cleaned (see ``clean``).

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        A cell raised; the message names the cell and the error.
    """
    import nbclient

    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name=KERNEL_NAME,
        record_timing=False,
        resources={"metadata": {"path": str(cwd)}},
        extra_arguments=[
            f"--InlineBackend.print_figure_kwargs={{'bbox_inches': 'tight', 'dpi': {FIGURE_DPI}}}",
            "--InlineBackend.figure_formats={'png'}",
        ],
    )
    client.execute(env=kernel_environment())
    return clean(notebook)


def clean(notebook):
    """Drop what changes between runs of an unchanged notebook; merge consecutive stream outputs."""
    notebook.metadata = nbformat.from_dict(METADATA)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != CODE:
            continue
        merged = []
        for output in cell.outputs:
            previous = merged[-1] if merged else None
            if (output.output_type == "stream" and previous is not None and previous.output_type == "stream"
                    and previous.name == output.name):
                previous.text += output.text
            else:
                merged.append(output)
        cell.outputs = merged
    return notebook


def png_sizes(notebook) -> List[Tuple[int, int, int]]:
    """``(cell index, width, height)`` of every PNG output, in pixels."""
    sizes = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                header = base64.b64decode(png[:48])  # signature (8 bytes), IHDR length and type (8), width, height
                width, height = struct.unpack(">II", header[16:24])
                sizes.append((index, width, height))
    return sizes


def output_kinds(notebook) -> List[List[Tuple[str, ...]]]:
    """Per code cell, what its outputs are (``("stream", "stdout")``, ``("display_data", "image/png", ...)``)."""
    kinds = []
    for cell in notebook.cells:
        if cell.cell_type == CODE:
            kinds.append([
                (output.output_type, output.name) if output.output_type == "stream"
                else (output.output_type, *sorted(output.get("data", {})))
                for output in cell.outputs
            ])
    return kinds


# ---------------------------------------------------------------------------------------------------- build
def sources(names: Sequence[str] = ()) -> List[Path]:
    """The tutorial scripts ``tutorials/NN_name.py``, all or those whose names start with one of ``names``."""
    found = sorted(HERE.glob(SOURCE_GLOB))
    if names:
        chosen = [path for path in found if any(path.name.startswith(name) for name in names)]
        unknown = [name for name in names if not any(path.name.startswith(name) for path in found)]
        if unknown:
            raise ValueError(f"no tutorial in {HERE} starts with {unknown}; there are {[p.name for p in found]}")
        found = chosen
    return found


def notebook_path(source: Path) -> Path:
    """Where the notebook of a tutorial script is stored: the same name with ``.ipynb``."""
    return source.with_suffix(".ipynb")


def read_source(source: Path):
    """The notebook (without outputs) of a tutorial script."""
    return notebook_from_cells(read_percent(source.read_text(encoding="utf-8")))


def differences(source: Path) -> List[str]:
    """Why the stored notebook of ``source`` is not its executed build; empty when it is.

    Checks that the notebook exists and is valid, that its cells are the script's cells, that every code cell
    was executed in order without an error output, that the file is at most ``MAX_NOTEBOOK_BYTES`` and its PNGs
    at most ``MAX_PNG_WIDTH`` wide.
    Outputs themselves are not compared (they differ between machines).
    """
    stored = notebook_path(source)
    if not stored.is_file():
        return [f"{stored.name} is missing"]
    notebook = nbformat.read(stored, as_version=4)
    try:
        nbformat.validate(notebook)
    except nbformat.ValidationError as error:
        return [f"{stored.name} is not a valid notebook: {error.message}"]
    problems = []
    expected, found = read_percent(source.read_text(encoding="utf-8")), cells_of(notebook)
    if len(expected) != len(found):
        problems.append(f"{stored.name} has {len(found)} cells, {source.name} has {len(expected)}")
    for index, (want, have) in enumerate(zip(expected, found)):
        if want != have:
            problems.append(f"{stored.name} cell {index} differs from {source.name}")
    code = [cell for cell in notebook.cells if cell.cell_type == CODE]
    counts = [cell.execution_count for cell in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"{stored.name} was not executed in order from a fresh kernel (execution counts {counts})")
    errors = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == CODE
              and any(output.output_type == "error" for output in cell.outputs)]
    if errors:
        problems.append(f"{stored.name} has error outputs in cells {errors}")
    size = stored.stat().st_size
    if size > MAX_NOTEBOOK_BYTES:
        problems.append(f"{stored.name} has {size} bytes, more than {MAX_NOTEBOOK_BYTES}")
    wide = [(index, width) for index, width, _ in png_sizes(notebook) if width > MAX_PNG_WIDTH]
    if wide:
        problems.append(f"{stored.name} has PNGs wider than {MAX_PNG_WIDTH} pixels (cell, width): {wide}")
    return problems


def orphans() -> List[Path]:
    """Stored notebooks ``tutorials/NN_name.ipynb`` without a script."""
    return [path for path in sorted(HERE.glob("[0-9][0-9]_*.ipynb")) if not path.with_suffix(".py").is_file()]


def build(source: Path) -> Path:
    """Execute the notebook of one tutorial script in the tutorials folder and store it next to the script."""
    notebook = execute(read_source(source), cwd=HERE)
    path = notebook_path(source)
    nbformat.write(notebook, path)
    size = path.stat().st_size
    if size > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"{path.name} has {size} bytes, more than {MAX_NOTEBOOK_BYTES}: make its figures smaller")
    return path


def to_script(notebook: Path) -> Path:
    """Write the percent-format script of a notebook next to it (``X.ipynb`` -> ``X.py``)."""
    path = Path(notebook).with_suffix(".py")
    path.write_text(write_percent(cells_of(nbformat.read(notebook, as_version=4))), encoding="utf-8")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="build only the tutorials whose file names start with these")
    parser.add_argument("--check", action="store_true", help="check the stored notebooks, execute nothing")
    parser.add_argument("--to-script", type=Path, metavar="NOTEBOOK", help="write NOTEBOOK's percent script")
    args = parser.parse_args(argv)
    if args.to_script:
        log.info("wrote %s", to_script(args.to_script))
        return 0
    try:
        chosen = sources(args.names)
    except ValueError as error:
        parser.error(str(error))
    if args.check:
        problems = [problem for source in chosen for problem in differences(source)]
        problems += [f"{path.name} has no script {path.with_suffix('.py').name}" for path in orphans()]
        for problem in problems:
            log.error("%s", problem)
        if problems:
            log.error("rebuild with: python tutorials/build.py")
        return 1 if problems else 0
    for source in chosen:
        path = build(source)
        log.info("built %s (%d kB)", path.relative_to(ROOT), (path.stat().st_size + 512) // 1024)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
