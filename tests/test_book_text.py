"""The book's text as a textbook: structure of the method chapters, citations, and no hedged numbers.

Fast (reads the chapter sources, builds nothing): every method chapter ends with a summary and 3-6
exercises (at least one numerical, one conceptual and one that changes a parameter with
`dvc exp run -S` and reads `dvc exp show`) and links its course lab where one exists; every citation
resolves to an entry of book/references.bib and every entry is cited; no hedged recollection of a
published number ("as recalled", "from memory", ...) is left in the prose.
"""

from __future__ import annotations

import re
from pathlib import Path

import jupytext
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
_TOC = yaml.safe_load((BOOK / "_toc.yml").read_text())
#: the chapters of the "Methods" part of the table of contents
METHOD_CHAPTERS = [c["file"] for part in _TOC["parts"] if part.get("caption") == "Methods" for c in part["chapters"]]
#: chapter -> its course labs in book/labs/ (a name, a tuple of names, or None: the chapter has no lab yet)
LABS = {"padim": "lab_padim", "memory_banks": ("lab_patchcore", "lab_semi_orthogonal"),
        "normalizing_flows": "lab_flows", "reconstruction": "lab_reconstruction", "distillation": "lab_distillation",
        "dmad": "lab_dmad", "diffusion": "lab_diad", "data_and_metrics": "lab_metrics"}
#: chapter -> the methods whose block diagram (`vadlab.visualize.schematic`, title=...) it draws "At a glance"
SCHEMATICS = {"padim": ["PaDiM"], "memory_banks": ["PatchCore", "Semi-orthogonal embedding"],
              "normalizing_flows": ["CFLOW-AD", "PyramidFlow"], "reconstruction": ["AE-SSIM", "RIAD"],
              "distillation": ["FAVAE", "MKD"], "dmad": ["DMAD (PDM+)", "DMAD (PPDM)"], "diffusion": ["DiAD"]}


def _labs_of(chapter: str) -> tuple[str, ...]:
    lab = LABS[chapter]
    return () if lab is None else (lab,) if isinstance(lab, str) else tuple(lab)


#: phrases that mark a number as remembered or unchecked; none may stay in the book
HEDGES = ("as recalled", "as i recall", "unverified", "from memory", "likely, not certain",
          "attribution likely", "not 100% verified")
CITE = re.compile(r"\{cite(?::[pt])?\}`([^`]+)`")


def _pages() -> dict[str, Path]:
    """Every page of the main book's table of contents (.py notebooks and .md pages)."""
    files = [_TOC["root"]] + [c["file"] for part in _TOC["parts"] for c in part["chapters"]]
    pages = {}
    for f in files:
        for ext in (".py", ".md"):
            if (BOOK / f"{f}{ext}").is_file():
                pages[f] = BOOK / f"{f}{ext}"
    assert len(pages) == len(files), set(files) - set(pages)
    return pages


def _markdown(page: Path) -> str:
    """The prose of a page: the markdown cells of a notebook, or the whole .md file."""
    if page.suffix == ".md":
        return page.read_text()
    return "\n\n".join(c.source for c in jupytext.read(page).cells if c.cell_type == "markdown")


def _section(text: str, title: str) -> str:
    """The body of the level-2 section `## <title>` (up to the next level-1 or level-2 heading)."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^#{{1,2}} |\Z)", text, flags=re.M | re.S)
    return match.group(1) if match else ""


def _bib_keys() -> set[str]:
    return set(re.findall(r"^@\w+\{([^,\s]+),", (BOOK / "references.bib").read_text(), flags=re.M))


def test_the_methods_part_is_what_the_checks_expect() -> None:
    assert set(METHOD_CHAPTERS) == set(LABS) - {"data_and_metrics"}, METHOD_CHAPTERS
    for chapter in LABS:
        for lab in _labs_of(chapter):
            assert (BOOK / "labs" / f"{lab}.py").is_file(), lab
    lab_toc = yaml.safe_load((BOOK / "labs" / "_toc.yml").read_text())
    listed = {c["file"] for c in lab_toc["chapters"]}
    assert {lab for chapter in LABS for lab in _labs_of(chapter)} == listed, \
        "a lab exists that no chapter links (or vice versa)"


@pytest.mark.parametrize("chapter", METHOD_CHAPTERS)
def test_method_chapter_draws_a_schematic_of_each_method_at_a_glance(chapter: str) -> None:
    assert set(SCHEMATICS) == set(METHOD_CHAPTERS)
    cells = jupytext.read(BOOK / f"{chapter}.py").cells
    heading = next((i for i, c in enumerate(cells) if c.cell_type == "markdown"
                    and re.search(r"^## At a glance\s*$", c.source, flags=re.M)), None)
    assert heading is not None, f"{chapter}: no '## At a glance' section"
    code = cells[heading + 1].source
    for method in SCHEMATICS[chapter]:
        assert re.search(rf"schematic\((.|\n)*title=\"{re.escape(method)}\"", code), \
            f"{chapter}: the cell after 'At a glance' draws no schematic titled {method!r}"


@pytest.mark.parametrize("chapter", METHOD_CHAPTERS)
def test_method_chapter_ends_with_summary_exercises_and_lab(chapter: str) -> None:
    text = _markdown(BOOK / f"{chapter}.py")
    summary = _section(text, "Summary")
    assert len(summary.split()) >= 40, f"{chapter}: no '## Summary' section (or an empty one)"
    exercises = _section(text, "Exercises")
    items = re.findall(r"^\d+\. (.*?)(?=^\d+\. |\Z)", exercises, flags=re.M | re.S)
    assert 3 <= len(items) <= 6, f"{chapter}: {len(items)} exercises, want 3-6"
    assert any("*(numerical)*" in i for i in items), f"{chapter}: no numerical exercise"
    assert any("*(conceptual)*" in i for i in items), f"{chapter}: no conceptual exercise"
    assert any("dvc exp run -S" in i and "dvc exp show" in i for i in items), \
        f"{chapter}: no exercise that changes a parameter with `dvc exp run -S` and reads `dvc exp show`"
    assert text.rfind("## Summary") < text.rfind("## Exercises"), f"{chapter}: the summary comes before the exercises"
    tail = text[text.rfind("## Summary"):]
    assert not re.search(r"^## (?!Summary|Exercises)", tail, flags=re.M), f"{chapter}: sections after the exercises"
    for lab in _labs_of(chapter):
        assert f"{{download}}`labs/{lab}.py`" in exercises, f"{chapter}: no link to its lab book/labs/{lab}.py"
    assert "{doc}`course_labs`" in exercises, f"{chapter}: no link to the course-labs page"


def test_the_metrics_chapter_links_its_lab_too() -> None:
    text = _markdown(BOOK / "data_and_metrics.py")
    assert "{download}`labs/lab_metrics.py`" in text and "## Exercises" in text


@pytest.mark.parametrize("page", sorted(_pages()))
def test_no_hedged_recollections_in_the_prose(page: str) -> None:
    path = _pages()[page]
    text = path.read_text().lower()  # code too: tables of published numbers live in code cells
    found = [h for h in HEDGES if h in text]
    assert not found, f"book/{path.name}: hedged wording {found}; check the number against the paper or drop it"


def test_every_citation_resolves_and_every_entry_is_cited() -> None:
    keys = _bib_keys()
    cited: dict[str, set[str]] = {}
    for name, path in _pages().items():
        for group in CITE.findall(path.read_text()):
            for key in group.split(","):
                cited.setdefault(key.strip(), set()).add(name)
    unknown = {k: sorted(v) for k, v in cited.items() if k not in keys}
    assert not unknown, f"citations without an entry in book/references.bib: {unknown}"
    assert keys <= set(cited), f"entries of references.bib cited nowhere: {sorted(keys - set(cited))}"


def test_bibliography_entries_are_complete() -> None:
    text = (BOOK / "references.bib").read_text()
    entries = re.split(r"^@", text, flags=re.M)[1:]
    assert len(entries) == len(_bib_keys()), "duplicate keys in references.bib"
    for entry in entries:
        key = entry.split("{", 1)[1].split(",", 1)[0]
        for field in ("author", "title", "year"):
            assert re.search(rf"^\s*{field}\s*=", entry, flags=re.M), f"{key}: no {field}"
        assert re.search(r"^\s*(booktitle|journal|eprint|doi)\s*=", entry, flags=re.M), f"{key}: no venue or identifier"
        for eprint in re.findall(r"eprint\s*=\s*\{([^}]*)\}", entry):
            assert re.fullmatch(r"\d{4}\.\d{4,5}", eprint), f"{key}: malformed arXiv id {eprint!r}"


@pytest.mark.parametrize("chapter", METHOD_CHAPTERS + ["overview", "data_and_metrics", "paper_scale", "peers"])
def test_chapter_cites_its_sources(chapter: str) -> None:
    assert CITE.search((BOOK / f"{chapter}.py").read_text()), f"{chapter}: no {{cite:p}} citation"


def test_results_chapter_mentions_are_links() -> None:
    for name, path in _pages().items():
        for sentence in re.split(r"(?<=[.;:])\s", _markdown(path)):
            if re.search(r"the results chapter", sentence, flags=re.I) and name != "results":
                assert "{doc}`results`" in sentence or "{doc}`" in sentence, \
                    f"{name}: 'the Results chapter' without a {{doc}} link: {sentence.strip()[:120]!r}"


def test_references_page_and_bibtex_are_configured() -> None:
    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    assert config["bibtex_bibfiles"] == ["references.bib"]
    assert "{bibliography}" in (BOOK / "bibliography.md").read_text()
    assert "bibliography" in _pages() and "notation" in _pages() and "overview" in _pages()


#: symbols the notation page gives one meaning, and the pages whose prose may use them (with that meaning):
#: the covariance ridge and Gaussian noise.  A new use of either for something else gets another symbol.
RESERVED = {r"\epsilon": {"padim", "notation"}, r"\varepsilon": {"diffusion", "notation"}}


def test_reserved_symbols_keep_their_one_meaning() -> None:
    for name, page in _pages().items():
        text = _markdown(page)
        for symbol, allowed in RESERVED.items():
            if re.search(re.escape(symbol) + r"(?![A-Za-z])", text):
                assert name in allowed, f"{page.name} uses {symbol}, which book/notation.md reserves"
        for math in re.findall(r"\$+[^$]+\$+", text):  # a Gaussian is \mathcal N in every formula
            plain = re.sub(r"\\mathcal\s*\{?N\}?", "", math)
            assert not re.search(r"(?<![\\A-Za-z_^])N(\\!)?(\(|\\left\(|\\big\()", plain), f"{page.name}: plain N in {math}"
