"""The documentation site: it builds offline with warnings as errors, lists every public name, and its
navigation and search work in headless Chromium.

CI builds the site once (``.ci/run``) and points ``CRP_INVERT_DOCS_HTML`` at it; without that variable the
tests build it into a temporary folder (needs ``pip install -e ".[docs]"``).
"""

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import crp_invert

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PUBLIC = [name for name in crp_invert.__all__ if name != "__version__"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The built HTML site: CI's build, or a fresh offline build with -W."""
    built = os.environ.get("CRP_INVERT_DOCS_HTML")
    if built:
        return Path(built)
    pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("myst_nb", reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           "-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out / "html"


def test_every_public_name_has_a_summary_line():
    """Every name of crp_invert.__all__ has a docstring whose first line is a sentence (the reference's summary)."""
    missing = []
    for name in PUBLIC:
        doc = (getattr(crp_invert, name).__doc__ or "").strip()
        first = doc.splitlines()[0] if doc else ""
        if len(first) < 10:
            missing.append(name)
    assert missing == []


def test_reference_lists_every_public_name(site):
    """The API page links every public name to its generated page, with a non-empty summary beside it."""
    page = (site / "reference" / "api.html").read_text()
    for name in PUBLIC:
        module = crp_invert._EXPORTS[name]
        target = site / "reference" / "generated" / f"crp_invert.{module}.{name}.html"
        assert target.exists(), name
        row = re.search(rf'<tr[^>]*>\s*<td><p><a [^>]*href="generated/crp_invert\.{re.escape(module)}\.{name}\.html'
                        rf'#[^"]*"[^>]*>.*?</td>\s*<td><p>(.*?)</p></td>', page, re.S)
        assert row is not None, name
        assert len(re.sub("<[^>]+>", "", row.group(1)).strip()) >= 10, name


def test_cli_reference_documents_every_command(site):
    """The CLI page is generated from click: every subcommand and an option of each appear."""
    page = html.unescape(re.sub("<[^>]+>", "", (site / "reference" / "cli.html").read_text()))
    for command, option in [("demo", "--samples"), ("label", "--feature-batch-size"), ("report", "--concepts"),
                            ("find", "--top"), ("audit", "--artifact")]:
        assert f"crp-invert {command}" in page, command
        assert option in page, option


def test_tutorials_are_rendered_with_their_stored_outputs(site):
    """Every stored tutorial notebook has a page showing each stored output (not executed at build time)."""
    import json

    for notebook in sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.ipynb")):
        page = site / "tutorials" / "notebooks" / f"{notebook.stem}.html"
        assert page.exists(), notebook.name
        text = page.read_text()
        cells = [cell for cell in json.loads(notebook.read_text())["cells"] if cell["cell_type"] == "code"]
        with_outputs = [cell for cell in cells if cell["outputs"]]
        assert text.count('class="cell_output') == len(with_outputs), notebook.name
        figures = sum("image/png" in output.get("data", {}) for cell in cells for output in cell["outputs"])
        assert text.count("<img") >= figures, notebook.name


def _dump_dom(url: str, tmp_path: Path) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", "--allow-file-access-from-files",
               "--virtual-time-budget=10000", "--dump-dom", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _links(dom: str, css_class: str) -> list[str]:
    """The hrefs of the <a> elements with the given class in a dumped DOM."""
    return [html.unescape(href) for href in re.findall(rf'<a class="[^"]*\b{css_class}\b[^"]*" href="([^"]+)"', dom)]


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (CI installs it: apt-get install -y chromium)"
)


@needs_chromium
def test_navigation_in_chromium(site, tmp_path):
    """The sidebar of the start page reaches every section and how-to, and every internal link resolves."""
    dom = _dump_dom((site / "index.html").as_uri(), tmp_path)
    targets = _links(dom, "reference internal")
    for section in ["getting-started.html", "howto/index.html", "explanation/index.html", "tutorials/index.html",
                    "reference/index.html", "benchmarks.html", "howto/torchrun-imagefolder.html",
                    "reference/cli.html", "explanation/statistics.html"]:
        assert section in targets, section
    for target in targets:
        path = unquote(urlsplit(target).path)
        assert not path or (site / path).exists(), target
    dom = _dump_dom((site / "howto" / "torchrun-imagefolder.html").as_uri(), tmp_path)
    assert re.search(r'<li class="[^"]*current-page[^"]*"><a class="current reference internal" '
                     r'href="#">Label a torchvision model', dom)
    assert "Next" in dom and "Previous" in dom


@needs_chromium
@pytest.mark.parametrize("query, page", [
    ("ConceptLabeler", "reference/generated/crp_invert.labeler.ConceptLabeler.html"),
    ("torchrun", "howto/torchrun-imagefolder.html"),
    ("Mann-Whitney", "explanation/statistics.html"),
])
def test_search_in_chromium(site, tmp_path, query, page):
    """The search page, run by its JavaScript in Chromium, finds a query's page."""
    dom = _dump_dom((site / "search.html").as_uri() + f"?q={query}", tmp_path)
    results = re.search(r"<ul[^>]*class=\"search\"[^>]*>(.*?)</ul>", dom, re.S)
    assert results is not None, dom[-3000:]
    assert f'href="{page}' in results.group(1) or f'href="./{page}' in results.group(1), results.group(1)[:2000]


def test_every_tutorial_is_listed():
    """tutorials/README.md names every tutorial notebook (the docs list them by glob)."""
    listing = (ROOT / "tutorials" / "README.md").read_text()
    for script in sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py")):
        assert f"{script.stem}.ipynb" in listing, script.name


# pages whose Python blocks run on their own (the others need a recording or the demo's files; the torchrun
# guide is run by tests/test_howto_torchrun.py)
SELF_CONTAINED = ["explanation/statistics.md", "explanation/beam-search.md", "howto/label-existing-file.md",
                  "howto/concepts-from-targets.md"]


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / page).read_text(), re.S | re.M)


@pytest.mark.parametrize("page", SELF_CONTAINED)
def test_page_examples_run(page, tmp_path, monkeypatch, capsys):
    """The page's first Python block runs as written (in an empty folder) and prints something."""
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(page)
    assert blocks, page
    exec(compile(blocks[0], page, "exec"), {})
    assert capsys.readouterr().out.strip()


def test_held_out_example_says_what_the_page_says(tmp_path, monkeypatch, capsys):
    """statistics.md: the real channel keeps its held-out AUC, the noise channel falls back and is no finding."""
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_blocks("explanation/statistics.md")[0], "statistics.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    values = [dict(re.findall(r"(held-out AUC|AUC|q) ([0-9.e+-]+)", line)) for line in lines]
    assert float(values[0]["held-out AUC"]) > 0.7 and float(values[0]["q"]) < 0.05
    assert abs(float(values[1]["held-out AUC"]) - 0.5) < 0.05 and float(values[1]["q"]) > 0.05
