"""Open built book pages in headless Chromium and check that they render offline.

Checks, on the page as the browser shows it:

1. MathJax typeset every formula: each Sphinx math element (``span.math``/``div.math``) holds an
   ``mjx-container``, none is a TeX error (e.g. an undefined macro), and no raw TeX delimiters
   (``$$``, ``\\[``, ``\\(``) are left in the visible text;
2. every image loaded (``complete`` and ``naturalWidth > 0``), and there are at least ``--min-images``;
3. nothing was fetched from the network: all resources the page loaded are local files (the browser is
   also started with DNS resolution disabled, so a CDN reference cannot load and fails check 1 or 2);
4. no broken internal link: every link to a page of the site points to a file that exists and, if it has
   a ``#fragment``, to an element with that id there;
5. every citation resolved: each bibliography citation (a link into the references page) reaches an entry
   of that page, and no unresolved-citation marker (``[?]``, a bare ``{cite:p}`` role) is left in the text.

Usage: ``python scripts/browser_check.py PAGE_OR_FOLDER ... [--min-images 3] [--require-math]``; a folder means every
``.html`` page in it (Sphinx's ``genindex``, ``search`` and ``py-modindex`` pages excepted), checked in one
browser session.
Needs the Debian packages ``chromium`` and ``chromium-driver`` and the PyPI package ``selenium``.
Exit status 0 when every check passes; the report is printed as JSON either way.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--allow-file-access-from-files",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no DNS: any CDN request fails
    "--window-size=1280,2000",
)

# Runs in the page: wait for MathJax (if it loaded at all) and for every image, then report.
_PROBE = r"""
const done = arguments[arguments.length - 1];
(async () => {
  const mj = window.MathJax;
  let mathjax = "absent";
  if (mj && mj.startup && mj.startup.promise) {
    try { await mj.startup.promise; if (mj.typesetPromise) { await mj.typesetPromise(); } mathjax = "ok"; }
    catch (e) { mathjax = "error: " + e; }
  }
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(img => img.complete ? null :
      new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r); })));
  const math = Array.from(document.querySelectorAll(".math"));
  const text = document.body.innerText;
  done({
    title: document.title,
    mathjax: mathjax,
    mathjax_src: Array.from(document.scripts).map(s => s.src).filter(s => /mathjax/i.test(s)),
    math_elements: math.length,
    math_untypeset: math.filter(m => !m.querySelector("mjx-container")).map(m => m.textContent.slice(0, 80)),
    mjx_containers: document.querySelectorAll("mjx-container").length,
    math_errors: Array.from(document.querySelectorAll("mjx-merror")).map(e => e.getAttribute("data-mjx-error")),
    raw_tex: ["$$", "\\[", "\\("].filter(d => text.includes(d)),
    images: imgs.length,
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src")),
    remote_resources: performance.getEntriesByType("resource").map(e => e.name)
        .filter(n => !n.startsWith("file:") && !n.startsWith("data:")),
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href).filter(h => h.startsWith("file:")),
    citations: Array.from(document.querySelectorAll("a[href]"))
        .filter(a => /bibliography\.html#/.test(a.getAttribute("href")) && !a.closest(".bibliography, .citation"))
        .map(a => a.href),
    unresolved_citations: (text.match(/\[\?\]|\{cite:[pt]\}/g) || []).length,
  });
})();
"""


def find_chromium() -> tuple[str, str]:
    """Paths of the Chromium binary and of chromedriver (Debian: chromium, chromium-driver)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise FileNotFoundError("headless Chromium not found: install it with "
                                "`apt-get update && apt-get install -y chromium chromium-driver`")
    return browser, driver


def probe(page: Path, timeout_s: float = 180.0) -> dict[str, Any]:
    """Load ``page`` in a fresh headless Chromium profile and return what the page reports."""
    return probe_many([page], timeout_s)[0]


def probe_many(pages: list[Path], timeout_s: float = 180.0) -> list[dict[str, Any]]:
    """Load each page in turn in one headless Chromium session; one report per page, in order."""
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service

    pages = [Path(p).resolve() for p in pages]
    for page in pages:
        if not page.is_file():
            raise FileNotFoundError(f"{page} does not exist: build the book first (scripts/build_book.sh)")
    browser, driver = find_chromium()
    reports = []
    with tempfile.TemporaryDirectory(prefix="vadlab-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        web = webdriver.Chrome(service=Service(executable_path=driver), options=options)
        try:
            web.set_page_load_timeout(timeout_s)
            web.set_script_timeout(timeout_s)
            for page in pages:
                try:
                    web.get(page.as_uri())
                    reports.append({"page": str(page), **web.execute_async_script(_PROBE)})
                except TimeoutException:
                    reports.append({"page": str(page), "timeout": f"did not finish loading and typesetting in "
                                                                  f"{timeout_s:.0f} s"})
        finally:
            web.quit()
    return reports


def pages_in(folder: Path) -> list[Path]:
    """The site's content pages: every ``.html`` under ``folder`` except Sphinx's generated index pages."""
    skip = {"genindex.html", "search.html", "py-modindex.html"}
    return sorted(p for p in Path(folder).rglob("*.html")
                  if p.name not in skip and "_static" not in p.parts and "_sources" not in p.parts)


def _ids(page: Path, cache: dict[Path, set[str]]) -> set[str]:
    if page not in cache:
        html = page.read_text(errors="replace")
        cache[page] = set(re.findall(r'\bid="([^"]+)"', html)) | set(re.findall(r'\bname="([^"]+)"', html))
    return cache[page]


def broken_links(links: list[str], cache: dict[Path, set[str]] | None = None) -> list[str]:
    """The ``file:`` links among ``links`` whose file is missing, or whose ``#fragment`` names no element."""
    cache = {} if cache is None else cache
    bad = []
    for link in links:
        parsed = urlparse(link)
        target = Path(unquote(parsed.path))
        if not target.exists():
            bad.append(f"{link} (no such file)")
        elif parsed.fragment and target.suffix == ".html" and unquote(parsed.fragment) not in _ids(target, cache):
            bad.append(f"{link} (no element with id {parsed.fragment!r})")
    return sorted(set(bad))


def failures(report: dict[str, Any], min_images: int = 1, require_math: bool = True,
             cache: dict[Path, set[str]] | None = None) -> list[str]:
    """Human-readable reasons why the page does not render properly (empty list: all good)."""
    if "timeout" in report:
        return [report["timeout"]]
    bad = []
    if require_math and report["math_elements"] == 0:
        bad.append("the page has no math elements")
    if report["math_elements"] and report["mathjax"] != "ok":
        bad.append(f"MathJax did not run: {report['mathjax']}")
    if report["math_untypeset"]:
        bad.append(f"{len(report['math_untypeset'])} math elements not typeset, e.g. {report['math_untypeset'][:2]}")
    if report["math_elements"] and report["mjx_containers"] == 0:
        bad.append("no mjx-container elements: MathJax produced no output")
    if report["math_errors"]:
        bad.append(f"MathJax reported TeX errors: {report['math_errors'][:3]}")
    if report["raw_tex"]:
        bad.append(f"raw TeX delimiters left in the text: {report['raw_tex']}")
    if any(not s.startswith("file:") for s in report["mathjax_src"]):
        bad.append(f"MathJax is not served locally: {report['mathjax_src']}")
    if report["images"] < min_images:
        bad.append(f"only {report['images']} images, expected at least {min_images}")
    if report["broken_images"]:
        bad.append(f"{len(report['broken_images'])} images did not load: {report['broken_images'][:3]}")
    if report["remote_resources"]:
        bad.append(f"the page requested network resources: {report['remote_resources'][:3]}")
    links = broken_links(report.get("links", []), cache)
    if links:
        bad.append(f"{len(links)} broken internal links, e.g. {links[:3]}")
    citations = broken_links(report.get("citations", []), cache)
    if citations:
        bad.append(f"{len(citations)} citations do not reach a bibliography entry, e.g. {citations[:3]}")
    if report.get("unresolved_citations"):
        bad.append(f"{report['unresolved_citations']} unresolved citation markers ([?] or a raw cite role) in the text")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", type=Path, nargs="*", default=[Path("book/_build/html/padim.html")],
                        help="pages, or folders whose pages are all checked")
    parser.add_argument("--min-images", type=int, default=0, help="images each page must show")
    parser.add_argument("--require-math", action="store_true", help="fail a page that has no math")
    args = parser.parse_args(argv)
    pages = [p for arg in args.pages for p in (pages_in(arg) if arg.is_dir() else [arg])]
    if not pages:
        parser.error(f"no .html pages in {[str(p) for p in args.pages]}: build the book first")
    cache: dict[Path, set[str]] = {}
    results = []
    for report in probe_many(pages):
        bad = failures(report, args.min_images, require_math=args.require_math, cache=cache)
        short = {k: v for k, v in report.items() if k not in ("links", "citations")}
        results.append({"ok": not bad, "failures": bad, **short})
    print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    failed = [r["page"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} of {len(results)} pages pass" + (f"; failing: {failed}" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
