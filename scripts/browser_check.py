"""Open a built book page in headless Chromium and check that it renders offline.

Checks, on the page as the browser shows it:

1. MathJax typeset every formula: each Sphinx math element (``span.math``/``div.math``) holds an
   ``mjx-container``, none is a TeX error (e.g. an undefined macro), and no raw TeX delimiters
   (``$$``, ``\\[``, ``\\(``) are left in the visible text;
2. every image loaded (``complete`` and ``naturalWidth > 0``), and there are at least ``--min-images``;
3. nothing was fetched from the network: all resources the page loaded are local files (the browser is
   also started with DNS resolution disabled, so a CDN reference cannot load and fails check 1 or 2).

Usage: ``python scripts/browser_check.py book/_build/html/padim.html [--min-images 3]``.
Needs the Debian packages ``chromium`` and ``chromium-driver`` and the PyPI package ``selenium``.
Exit status 0 when every check passes; the report is printed as JSON either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

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


def probe(page: Path, timeout_s: float = 60.0) -> dict[str, Any]:
    """Load ``page`` in a fresh headless Chromium profile and return what the page reports."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    page = Path(page).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"{page} does not exist: build the book first (scripts/build_book.sh)")
    browser, driver = find_chromium()
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
            web.get(page.as_uri())
            return web.execute_async_script(_PROBE)
        finally:
            web.quit()


def failures(report: dict[str, Any], min_images: int = 1, require_math: bool = True) -> list[str]:
    """Human-readable reasons why the page does not render properly (empty list: all good)."""
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
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, nargs="?", default=Path("book/_build/html/padim.html"))
    parser.add_argument("--min-images", type=int, default=1)
    parser.add_argument("--no-math", action="store_true", help="do not require math on the page")
    args = parser.parse_args(argv)
    report = probe(args.page)
    bad = failures(report, args.min_images, require_math=not args.no_math)
    print(json.dumps({"page": str(args.page), "ok": not bad, "failures": bad, **report}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
