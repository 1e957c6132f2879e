"""The leaderboard in a real browser: ``harness board`` started exactly as a user starts it (the console
script, headless Streamlit on 127.0.0.1) + Debian's Chromium via playwright.

Needs the ``chromium`` Debian package (``apt-get install -y chromium``) and the ``playwright``
Python package (a dev dependency); no ``playwright install`` browser download is used. The browser is
``$HARNESS_CHROMIUM`` or ``chromium`` on PATH, the same lookup ``.ci/run`` makes. Skipped, with the reason
printed, when either is missing, unless ``HARNESS_REQUIRE_BROWSER=1`` (CI sets it): then a missing
browser fails the test. Run alone with ``pytest -m browser``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storeq import default_sigint

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("HARNESS_CHROMIUM") or shutil.which("chromium") or "chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def _skip(reason: str) -> None:
    if os.environ.get("HARNESS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"HARNESS_REQUIRE_BROWSER=1 and {reason}")
    print(f"SKIP test_leaderboard_browser: {reason}", file=sys.stderr, flush=True)
    pytest.skip(reason)


def _harness_script() -> str:
    """The installed ``harness`` console script: next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "harness"
    found = str(here) if here.exists() else shutil.which("harness")
    if not found:
        pytest.fail("the `harness` console script is not installed (make install puts it next to python)")
    return found


@pytest.fixture(scope="module")
def browser_store(tmp_path_factory) -> Path:
    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        _skip(f"no Chromium ({CHROMIUM!r} not found): install Debian's chromium (apt-get install -y chromium) "
              f"or point HARNESS_CHROMIUM at a Chromium binary")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _skip("the playwright Python package is not installed (pip install playwright; it is a dev dependency)")
    from harness.cli import main

    from test_leaderboard import add_extra_rows

    d = tmp_path_factory.mktemp("board_browser")
    path = d / "h.duckdb"
    rc = main(["run", "--suite", "lm", "--preset", "tiny", "--routers", "dense,smoe", "--seeds", "0,1",
               "--no-eval", "--quiet", "--store", str(path), "--runs-dir", str(d / "runs")])
    assert rc == 0
    # the vision suite's view: two routers x two seeds, so its significance column has a test to show
    rc = main(["run", "--suite", "vision", "--preset", "tiny", "--routers", "dense,smoe", "--seeds", "0,1",
               "--quiet", "--store", str(path), "--runs-dir", str(d / "runs")])
    assert rc == 0
    add_extra_rows(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(browser_store, tmp_path):
    """``harness board --store S --port N`` in its own session; stopped with Ctrl-C (SIGINT to the group, as a
    terminal sends it), which the board turns into exit 0."""
    port = _free_port()
    log = open(tmp_path / "board.log", "w")
    proc = subprocess.Popen([_harness_script(), "board", "--store", str(browser_store), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                            preexec_fn=default_sigint)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"harness board exited with {proc.returncode}:\n{(tmp_path / 'board.log').read_text()}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("harness board did not answer /_stcore/health within 120 s")
            time.sleep(0.3)
        yield url
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, (tmp_path / "board.log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_leaderboard_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = [tmp_path / "leaderboard.png"]
    results = ROOT / "results"
    if results.is_dir() or os.environ.get("HARNESS_SCREENSHOT_TO_RESULTS"):
        results.mkdir(exist_ok=True)
        shots.append(results / "leaderboard.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1300})
            page.goto(server, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_selector("text=MoE router leaderboard", timeout=90_000)
            # a rendered Vega chart: a canvas or svg inside the vega-embed element
            page.wait_for_selector(".vega-embed canvas, .vega-embed svg", state="visible", timeout=90_000)
            page.wait_for_selector('[data-testid="stDataFrame"]', timeout=30_000)
            page.wait_for_timeout(1500)  # let the remaining charts finish drawing
            assert page.locator('[data-testid="stException"]').count() == 0, \
                page.locator('[data-testid="stException"]').first.inner_text()
            body = page.inner_text("body")
            assert "Quality vs throughput" in body or page.locator(".vega-embed").count() >= 2
            for shot in shots:
                page.screenshot(path=str(shot), full_page=True)
            # the other tabs render without exceptions too
            for tab in ("Training curves", "Routing", "lm-eval", "Benchmarks", "Claims", "Along an axis", "Run detail"):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(700)
                assert page.locator('[data-testid="stException"]').count() == 0, tab
            # the vision view: top-1 / top-5 with the significance column, routing health, the claims
            page.get_by_role("tab", name="Leaderboard").click()
            page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.click()
            page.get_by_role("option", name="vision · image classification").click()
            page.wait_for_selector("text=suite vision", timeout=60_000)
            page.wait_for_selector('[data-testid="stDataFrame"]', timeout=30_000)
            page.wait_for_timeout(1500)
            assert page.locator('[data-testid="stException"]').count() == 0, \
                page.locator('[data-testid="stException"]').first.inner_text()
            body = page.inner_text("body")
            # the table itself is drawn on a canvas (its top-5 column: test_leaderboard.py); the page text says
            # which suite is shown and what the significance column tests
            assert "suite vision" in body and "val top-1 by router" in body and "vs SMoE: val_top1" in body, body[:2000]
            for shot in shots:
                page.screenshot(path=str(shot.with_name("leaderboard_vision.png")), full_page=True)
            for tab in ("Training curves", "Routing", "Claims", "Run detail"):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(700)
                assert page.locator('[data-testid="stException"]').count() == 0, f"vision {tab}"
        finally:
            browser.close()
    print(f"leaderboard screenshot: {shots[-1]}")
    assert shots[0].stat().st_size > 20_000
