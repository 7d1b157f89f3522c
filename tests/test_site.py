"""The built site, as a reader's browser sees it (headless Chromium driven by Playwright).

Runs only when asked for and after the site was built:

    make book                                   # builds _build/html
    .venv/bin/python -m pytest -m browser tests/test_site.py

Asked for but with no site, every test fails (it never silently passes). Not asked for (a
plain ``pytest``), every test is skipped. ``GEN3D_BOOK_ROOT`` points at another book folder;
``GEN3D_CHROMIUM`` at another Chromium binary. Screenshots go to ``_build/screenshots/``.

The site is served by a local http.server on 127.0.0.1; any request to another machine is
blocked and counts as an error (the book must work without a CDN).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from gen3d_lessons.book import BookPaths, chapters, toc_docnames

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("GEN3D_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PATHS = BookPaths.at(os.environ.get("GEN3D_BOOK_ROOT"))


def _pages() -> list[str]:
    try:
        return toc_docnames(PATHS.toc)
    except OSError:
        return []


def _chapter_pages() -> list[str]:
    try:
        return [c.docname for c in chapters(PATHS, missing_ok=True)]
    except OSError:
        return []


def _asked_for(config: pytest.Config) -> bool:
    markexpr = config.getoption("markexpr") or ""
    selected = re.search(r"\bbrowser\b", markexpr) and not re.search(r"\bnot\s+browser\b",
                                                                      markexpr)
    return bool(selected) or os.environ.get("GEN3D_BROWSER") == "1"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output readable
        pass


@pytest.fixture(scope="module")
def site(request: pytest.FixtureRequest):
    """The base URL of the built site served from 127.0.0.1."""
    if not _asked_for(request.config):
        pytest.skip("browser check: build the site (make book), then run pytest -m browser")
    index = PATHS.html / "index.html"
    if not index.is_file():
        pytest.fail(f"the site is missing ({index}): run `make book` first")
    handler = functools.partial(_QuietHandler, directory=str(PATHS.html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                      headless=True)
        yield chromium
        chromium.close()


class Visit:
    """One page opened in a fresh tab, with everything that went wrong on the way."""

    def __init__(self, browser, site: str, docname: str):
        self.url = f"{site}/{docname}.html"
        self.errors: list[str] = []
        self.offsite: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.route("**/*", self._route)
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(
            f"console: {m.text} ({m.location.get('url', '')})"))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(
            f"request failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.errors.append(
            f"HTTP {r.status}: {r.url}"))
        response = self.page.goto(self.url, wait_until="load")
        assert response is not None and response.ok, f"{self.url} answered {response}"
        self.page.wait_for_load_state("networkidle")

    def _route(self, route) -> None:
        host = urlparse(route.request.url).hostname
        if host in ("127.0.0.1", "localhost", None):
            route.continue_()
        else:
            self.offsite.append(route.request.url)
            route.abort()

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def visit(browser, site):
    opened: list[Visit] = []

    def open_page(docname: str) -> Visit:
        if not (PATHS.html / f"{docname}.html").is_file():
            pytest.fail(f"{docname} is in the toc but {docname}.html was not built")
        opened.append(Visit(browser, site, docname))
        return opened[-1]

    yield open_page
    for v in opened:
        v.close()


def _screenshot(page, name: str) -> Path:
    PATHS.screenshots.mkdir(parents=True, exist_ok=True)
    path = PATHS.screenshots / f"{name.replace('/', '__')}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


WAIT_IMAGES = """() => Promise.all([...document.images].map(img => {
    img.loading = 'eager';
    return img.complete ? null : new Promise(done => { img.onload = img.onerror = done; });
}))"""

BROKEN_IMAGES = """() => [...document.images]
    .filter(img => !(img.complete && img.naturalWidth > 0))
    .map(img => (img.getAttribute('src') || '(no src)').slice(0, 120))"""

TYPESET = """async () => {
    if (!window.MathJax || !MathJax.startup || !MathJax.startup.promise) return null;
    await MathJax.startup.promise;
    return {
        math: document.querySelectorAll('.math').length,
        typeset: document.querySelectorAll('mjx-container').length,
        errors: document.querySelectorAll('mjx-merror').length,
        script: (document.querySelector('script[src*="mathjax"]') || {}).src || null,
    };
}"""


@pytest.mark.parametrize("docname", _pages())
def test_page_loads_cleanly(visit, docname):
    """No console or page errors, nothing fetched from another machine, every image loaded,
    and the maths typeset by the site's own MathJax."""
    v = visit(docname)
    page = v.page
    page.evaluate(WAIT_IMAGES)
    has_math = page.locator(".math").count() > 0
    math = page.evaluate(TYPESET)
    _screenshot(page, docname)

    assert not v.offsite, f"{docname} requests other machines: {v.offsite}"
    assert not v.errors, f"{docname}: " + "\n".join(v.errors)
    broken = page.evaluate(BROKEN_IMAGES)
    assert not broken, f"{docname}: images that did not load: {broken}"
    if has_math:
        assert math is not None, f"{docname} has maths but MathJax did not load"
        assert math["script"] and math["script"].startswith(v.url.split(f"/{docname}")[0]), \
            f"MathJax is not served by the site: {math['script']}"
        assert math["typeset"] >= math["math"] > 0, f"{docname}: maths not typeset: {math}"
        assert math["errors"] == 0, f"{docname}: {math['errors']} MathJax errors"


def _colab_url(docname: str) -> str:
    config = yaml.safe_load(PATHS.config.read_text())
    repo = config["repository"]
    slug = urlparse(repo["url"]).path.strip("/")
    colab = config["launch_buttons"]["colab_url"].rstrip("/")
    book = (repo.get("path_to_book") or "").strip("/")
    path = f"{book}/{docname}" if book else docname
    return f"{colab}/github/{slug}/blob/{repo.get('branch', 'main')}/{path}.ipynb"


@pytest.mark.parametrize("docname", _chapter_pages())
def test_colab_button_opens_this_chapter(visit, docname):
    """The Colab launch button opens this very notebook from the repository."""
    page = visit(docname).page
    hrefs = page.eval_on_selector_all(
        'a[href*="colab.research.google.com"]', "links => links.map(a => a.href)")
    assert hrefs, f"{docname} has no Colab launch button"
    assert _colab_url(docname) in hrefs, f"{docname}: Colab links {hrefs}"
    assert hrefs[0].endswith(f"/{docname}.ipynb")
    assert (PATHS.root / f"{docname}.ipynb").is_file(), "the link's notebook is not in the repo"


@pytest.mark.parametrize("docname", _chapter_pages())
def test_slice_scrubber_moves(visit, docname):
    """On a page with slice scrubbers (matplotlib to_jshtml), the slider changes the frame."""
    page = visit(docname).page
    sliders = page.locator('.animation input[type="range"]')
    if sliders.count() == 0:
        pytest.skip(f"{docname} has no slice scrubber")
    for i in range(sliders.count()):
        slider = sliders.nth(i)
        slider.scroll_into_view_if_needed()
        image = slider.locator("xpath=ancestor::div[contains(@class,'animation')][1]//img")
        before = image.first.get_attribute("src")
        lo, hi = int(slider.get_attribute("min") or 0), int(slider.get_attribute("max") or 0)
        if hi <= lo:
            continue                       # a single frame: nothing to scrub
        current = int(slider.input_value())
        slider.fill(str(hi if current != hi else lo))
        page.wait_for_function("([img, old]) => img.getAttribute('src') !== old",
                               arg=[image.first.element_handle(), before], timeout=5000)
        assert image.first.get_attribute("src") != before
        assert image.first.evaluate("img => img.naturalWidth") > 0
        container = slider.locator("xpath=ancestor::div[contains(@class,'animation')][1]")
        PATHS.screenshots.mkdir(parents=True, exist_ok=True)
        container.screenshot(path=str(
            PATHS.screenshots / f"{docname.replace('/', '__')}__scrubber{i}.png"))
