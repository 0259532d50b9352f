"""The book builds offline, keeps its outputs on a rebuild, and renders in a real browser.

Slow (one full book build and one incremental rebuild): the book is built with scripts/build_book.sh into
a temporary folder, then rebuilt there after touching book/padim.py; every chapter page must still hold
its executed outputs (the MyST-NB cache bug with jupytext .py pages drops them silently), MathJax must be
served from the built site, and headless Chromium must show the PaDiM chapter with typeset math and
loaded figures.
If the pipeline's results are absent (no `dvc repro` yet) the book is built with
VADLAB_BOOK_ALLOW_MISSING_RESULTS=1, so the test checks the book machinery on a fresh clone too.
Needs the Debian packages chromium and chromium-driver (see scripts/browser_check.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import browser_check  # noqa: E402

#: the PaDiM chapter draws 2 figures itself and shows the pipeline's figures when `dvc repro` has run
HAVE_RESULTS = (ROOT / "results" / "tables" / "per_category.csv").is_file()
PADIM_MIN_IMAGES = 3 if HAVE_RESULTS else 2
_TOC = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
#: every executed chapter of the book (the .py notebooks in the table of contents)
CHAPTERS = tuple(c["file"] for part in _TOC["parts"] for c in part["chapters"]
                 if (ROOT / "book" / f"{c['file']}.py").is_file())


def _build(out: Path, everything: bool = True) -> Path:
    env = dict(os.environ, BOOK_OUT=str(out), BOOK_ALL="1" if everything else "0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not HAVE_RESULTS:
        env["VADLAB_BOOK_ALLOW_MISSING_RESULTS"] = "1"
    proc = subprocess.run(["bash", "scripts/build_book.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"book build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out / "_build" / "html"


def _outputs(page: Path) -> dict[str, int]:
    html = page.read_text()
    return {"cell_outputs": html.count('class="cell_output'), "images": len(re.findall(r"<img ", html)),
            "errors": html.count("ansi-red-fg") + html.count("Traceback (most recent call last)")}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> tuple[dict[str, dict[str, int]], Path]:
    """(outputs per chapter after the first build, html folder after the second build)."""
    out = tmp_path_factory.mktemp("book")
    first = _build(out)
    snapshot = {c: _outputs(first / f"{c}.html") for c in CHAPTERS}
    # Incremental rebuild in the same folder after touching one chapter: the touched page is executed
    # again, the others are kept from the first build (the case where MyST-NB's cache lost outputs).
    padim = ROOT / "book" / "padim.py"
    os.utime(padim, None)
    second = _build(out, everything=False)
    return snapshot, second


@pytest.mark.slow
def test_rebuild_keeps_executed_outputs(builds) -> None:
    first, html = builds
    for chapter in CHAPTERS:
        again = _outputs(html / f"{chapter}.html")
        assert first[chapter]["cell_outputs"] > 0, f"{chapter}: no cell outputs after the first build"
        assert again == first[chapter], f"{chapter}: outputs changed on rebuild {first[chapter]} -> {again}"
        assert again["errors"] == 0, f"{chapter}: an error output was rendered"
    assert _outputs(html / "padim.html")["images"] >= PADIM_MIN_IMAGES
    assert _outputs(html / "data_and_metrics.html")["images"] >= 2


@pytest.mark.slow
def test_mathjax_is_served_locally(builds) -> None:
    html = builds[1]
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert list((html / "_static" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff")), "MathJax fonts"
    page = (html / "padim.html").read_text()
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', page)
    assert any(s.split("?")[0].endswith("_static/mathjax/tex-chtml.js") for s in scripts), scripts
    remote = [s for s in scripts if s.startswith(("http:", "https:", "//"))]
    assert not remote, f"scripts loaded from the network: {remote}"


@pytest.mark.slow
def test_padim_chapter_renders_in_headless_chromium(builds) -> None:
    report = browser_check.probe(builds[1] / "padim.html")
    bad = browser_check.failures(report, min_images=PADIM_MIN_IMAGES)
    assert not bad, bad
    assert report["mjx_containers"] >= report["math_elements"] >= 20


@pytest.mark.slow
def test_every_page_renders_with_working_links_and_citations(builds) -> None:
    html = builds[1]
    pages = browser_check.pages_in(html)
    assert {f"{c}.html" for c in CHAPTERS} | {"intro.html", "bibliography.html"} <= {p.name for p in pages}
    reports = browser_check.probe_many(pages)
    cache: dict = {}
    bad = {Path(r["page"]).name: b for r in reports
           if (b := browser_check.failures(r, min_images=0, require_math=False, cache=cache))}
    assert not bad, bad
    by_name = {Path(r["page"]).name: r for r in reports}
    for chapter in CHAPTERS:  # every chapter cites its sources, and the links reach the references page
        if chapter != "bibliography":
            assert by_name[f"{chapter}.html"]["citations"], f"{chapter}: no resolved citation"
    assert all(by_name[f"{c}.html"]["mjx_containers"] > 0 for c in ("padim", "normalizing_flows", "dmad"))


@pytest.mark.slow
def test_both_lab_editions_build_and_every_lab_page_renders(tmp_path) -> None:
    """The course labs as a student and an instructor open them: built, executed, and clean in Chromium."""
    env = dict(os.environ, LABS_OUT=str(tmp_path), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", "scripts/build_labs.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"lab build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    labs = sorted(p.stem for p in (ROOT / "book" / "labs").glob("lab_*.py"))
    for edition in ("student", "instructor"):
        html = tmp_path / edition / "_build" / "html"
        pages = browser_check.pages_in(html)
        assert {f"{lab}.html" for lab in labs} <= {p.name for p in pages}, edition
        cache: dict = {}
        bad = {Path(r["page"]).name: b for r in browser_check.probe_many(pages)
               if (b := browser_check.failures(r, min_images=0, require_math=False, cache=cache))}
        assert not bad, (edition, bad)
        for lab in labs:
            assert _outputs(html / f"{lab}.html")["errors"] == 0, f"{edition}/{lab}: an error output was rendered"


def test_browser_check_catches_broken_links_and_citations(tmp_path) -> None:
    (tmp_path / "bibliography.html").write_text('<html><body><div id="defard2021padim">ref</div></body></html>')
    (tmp_path / "other.html").write_text('<html><body><h2 id="here">here</h2></body></html>')
    page = tmp_path / "page.html"
    page.write_text('<html><body><p><a href="other.html#here">fine</a> <a href="other.html#gone">anchor</a> '
                    '<a href="missing.html">file</a> (<a href="bibliography.html#defard2021padim">Defard</a>) '
                    '(<a href="bibliography.html#nobody2020">Nobody</a>) [?]</p></body></html>')
    report = browser_check.probe(page)
    bad = browser_check.failures(report, min_images=0, require_math=False)
    assert any("3 broken internal links" in b for b in bad), bad  # the unresolved citation is a broken link too
    assert any("missing.html" in b for b in bad) and any("'gone'" in b for b in bad), bad
    assert any("1 citations do not reach" in b and "nobody2020" in b for b in bad), bad
    assert any("unresolved citation markers" in b for b in bad), bad
    good = tmp_path / "good.html"
    good.write_text('<html><body><a href="other.html#here">x</a> <a href="bibliography.html#defard2021padim">y</a>'
                    '</body></html>')
    assert browser_check.failures(browser_check.probe(good), min_images=0, require_math=False) == []


def test_browser_check_catches_a_broken_page(tmp_path) -> None:
    page = tmp_path / "bad.html"
    page.write_text('<html><body><p>$$x^2$$</p><span class="math">\\(a\\)</span>'
                    '<img src="missing.png"></body></html>')
    bad = browser_check.failures(browser_check.probe(page), min_images=1)
    assert any("not typeset" in b for b in bad), bad
    assert any("raw TeX" in b for b in bad), bad
    assert any("did not load" in b for b in bad), bad


def test_browser_check_catches_a_tex_error(tmp_path) -> None:
    import importlib.util

    spec = importlib.util.find_spec("sphinx-mathjax-offline")  # the book's MathJax, as installed
    assert spec is not None, "install sphinx-mathjax-offline (the book's offline MathJax)"
    mathjax = Path(spec.origin).parent / "static" / "mathjax" / "tex-chtml.js"
    page = tmp_path / "tex_error.html"
    page.write_text("<html><head><script>window.MathJax={tex:{packages:{'[-]':['noundefined']}}};</script>"
                    f'<script src="{mathjax.as_uri()}"></script></head><body>'
                    '<span class="math">\\(\\nosuchmacro x\\)</span></body></html>')
    report = browser_check.probe(page)
    assert report["mathjax"] == "ok" and report["mjx_containers"] == 1, report
    assert any("TeX errors" in b for b in browser_check.failures(report, min_images=0)), report


def test_pipeline_notebooks_and_params_agree_with_the_package() -> None:
    from vadlab.data import SYNTH_CATEGORIES
    from vadlab.methods import available_methods

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["synth"]["categories"] == list(SYNTH_CATEGORIES)
    if params["data"]["name"] == "synthetic":
        assert params["data"]["root"] == params["synth"]["root"]
        assert set(params["data"]["categories"]) <= set(SYNTH_CATEGORIES)
    for method in params["run_methods"]:
        assert method in params["methods"], f"params.yaml has no settings for {method!r}"
        implementation = params["methods"][method].get("method", method)
        assert implementation in available_methods(), f"params.yaml runs {implementation!r}, which vadlab lacks"
    for name in ("synth", "evaluate", "tables", "figures", "elpv_evaluate", "elpv_report"):
        nb = jupytext.read(ROOT / "pipeline" / f"{name}.py")
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"pipeline/{name}.py needs exactly one cell tagged 'parameters'"
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    for f in files:
        assert any((ROOT / "book" / f"{f}{ext}").is_file() for ext in (".py", ".md", ".ipynb")), f
