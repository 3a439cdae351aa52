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

from capscale.analysis.report import build_report
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
            "--window-size=1280,4000"]
    session = _call(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
        "browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}})["sessionId"]
    yield lambda method, path, payload=None: _call(base, method, f"/session/{session}{path}", payload)
    _call(base, "DELETE", f"/session/{session}")
    driver.terminate()
    driver.wait(timeout=10)


def test_report_renders_with_every_figure_loaded(tmp_path, browser):
    specs = {"int4": ("int4", None), "int2": ("int2", None), "int4/int4": ("int4", "int4"),
             "bf16/int4": ("bf16", "int4"), "bf16": ("bf16", None)}
    eff = {"bf16": 1.0, "int4": 0.82, "int2": 0.45, "int4/int4": 0.67, "bf16/int4": 0.82}
    report_dir = tmp_path / "report"
    build_report(load_runs(simulate_runs(eff, specs=specs, noise=0.003)), report_dir, n_boot=8, progress=False)
    browser("POST", "/url", {"url": (report_dir / "report.html").resolve().as_uri()})
    images = browser("POST", "/execute/sync", {"script": (
        "return Array.from(document.images).map(i => ({id: i.id, alt: i.alt, ok: i.complete && i.naturalWidth > 0,"
        " width: i.naturalWidth}))"), "args": []})
    assert len(images) >= 6
    assert all(img["ok"] and img["width"] > 300 and img["alt"] for img in images), images
    tables = browser("POST", "/execute/sync", {"script": "return document.querySelectorAll('table').length", "args": []})
    assert tables >= 4
    png = base64.b64decode(browser("GET", "/screenshot"))
    (tmp_path / "report.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
