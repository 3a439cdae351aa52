"""The report as a reader sees it: report.html rendered in headless Chromium (driven over chromedriver's W3C
WebDriver HTTP API with the standard library), every figure loaded, a screenshot taken."""
import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

import capscale
from capscale.analysis.runs import load_runs
from capscale.analysis.simulate import simulate_runs

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(base, method, path, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["value"]


@pytest.fixture
def browser(tmp_path):
    port = _free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            _call(base, "GET", "/status")
            break
        except OSError:
            time.sleep(0.1)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
            "--disable-quic", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}",
            "--window-size=1280,1000"]
    session = _call(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
        "browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}})["sessionId"]
    yield lambda method, path, payload=None: _call(base, method, f"/session/{session}{path}", payload)
    _call(base, "DELETE", f"/session/{session}")
    driver.terminate()
    driver.wait(timeout=10)


def test_report_reads_verdict_first_with_every_figure_loaded_and_no_overflow(tmp_path, browser):
    specs = {"int4": ("int4", None), "int2": ("int2", None), "2:4": ("2:4", None), "2:4+int4": ("2:4+int4", None),
             "int4/int4": ("int4", "int4"), "bf16/int4": ("bf16", "int4"), "bf16": ("bf16", None)}
    eff = {"bf16": 1.0, "int4": 0.82, "int2": 0.45, "2:4": 0.6, "2:4+int4": 0.49, "int4/int4": 0.67, "bf16/int4": 0.82}
    report_dir = tmp_path / "report"
    capscale.fit(load_runs(simulate_runs(eff, specs=specs, noise=0.003)), bootstrap=12, progress=False).report(
        report_dir, progress=False)
    browser("POST", "/window/rect", {"width": 1280, "height": 1000})
    browser("POST", "/url", {"url": (report_dir / "report.html").resolve().as_uri()})
    run = lambda script: browser("POST", "/execute/sync", {"script": script, "args": []})  # noqa: E731
    assert run("return document.querySelector('section').id") == "summary"  # the first section
    assert run("return document.querySelector('#summary dt').textContent") == "Does capacity predict efficiency?"
    images = run("return Array.from(document.images).map(i => ({id: i.id, alt: i.alt, ok: i.complete && "
                 "i.naturalWidth > 0, width: i.naturalWidth}))")
    assert len(images) >= 9
    assert all(img["ok"] and img["width"] > 300 and len(img["alt"]) > 20 for img in images), images
    # every section pairs its figures with its tables: a figure's section also holds a table
    assert run("return Array.from(document.querySelectorAll('main section')).filter(s => s.querySelector('img') && "
               "!s.querySelector('table')).map(s => s.id)") == []
    assert run("return Array.from(document.querySelectorAll('table')).every(t => t.querySelector('thead th') && "
               "t.querySelector('caption'))")
    overflow = run("return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert overflow[0] <= overflow[1], f"page scrolls sideways at 1280 px: {overflow}"
    assert "capscale" in run("return document.getElementById('provenance-json').textContent")
    png = base64.b64decode(browser("GET", "/screenshot"))
    (tmp_path / "report.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
