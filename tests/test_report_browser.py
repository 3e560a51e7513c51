"""Open a report in headless Chromium: every image loads, the console stays clean, a screenshot is taken.

Chromium is driven directly (no webdriver): a copy of the page gets a small probe script that,
on ``load``, writes the image-load status and any console error, JS error or CSP violation into
the DOM, which ``--dump-dom`` prints; ``--enable-logging=stderr`` also prints console messages.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import write_crashed_run

from lightning_act.report import build_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (no /usr/bin/chromium); apt-get install -y chromium"
)

WINDOW = (1280, 2400)

PROBE = (
    "<script>"
    "window.__errors=[];"
    "const __consoleError=console.error;"
    "console.error=function(...a){window.__errors.push('console: '+a.join(' '));__consoleError.apply(console,a);};"
    "window.addEventListener('error',e=>window.__errors.push('error: '+(e.message||(e.target&&e.target.src)||'resource')),true);"
    "document.addEventListener('securitypolicyviolation',e=>window.__errors.push('csp: '+e.blockedURI));"
    "window.addEventListener('load',()=>{const images=[...document.images];"
    "const broken=images.filter(i=>!(i.complete&&i.naturalWidth>0)).map(i=>i.alt);"
    "const out=document.createElement('pre');out.id='probe';"
    "out.textContent=JSON.stringify({images:images.length,broken:broken,errors:window.__errors});"
    "document.body.appendChild(out);});"
    "</script>"
)


def open_in_chromium(page: Path, workdir: Path) -> tuple[dict[str, object], list[str], Path]:
    """Load a probed copy of ``page``; return (probe result, console lines from stderr, screenshot path)."""
    text = page.read_text(encoding="utf-8")
    assert "default-src 'none';" in text
    probed = text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    probed = probed.replace("<head>", "<head>" + PROBE, 1)
    probed_path = workdir / "probed.html"
    probed_path.write_text(probed, encoding="utf-8")
    screenshot = workdir / "screenshot.png"
    result = subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={workdir / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=5000", f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--screenshot={screenshot}", "--dump-dom", probed_path.as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, flags=re.S)
    assert found is not None, f"no probe output (exit {result.returncode}): {result.stderr[-2000:]}"
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")), console, screenshot


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    import matplotlib.image

    from lightning_act.plots import new_figure

    write_crashed_run(tmp_path / "kat")
    plots = tmp_path / "kat" / "csv" / "version_0" / "plots"
    plots.mkdir()
    figure = new_figure(3, 2)
    figure.add_subplot().plot([0, 1], [1, 0])
    figure.savefig(plots / "massive_ratio_heatmap.png")
    page = build_report(tmp_path / "kat", tmp_path / "report.html")
    expected_images = page.read_text().count("<img ")

    status, console, screenshot = open_in_chromium(page, tmp_path)
    assert status == {"images": expected_images, "broken": [], "errors": []}
    assert expected_images == 11
    assert console == []

    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    not_white = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert 0.02 < not_white < 0.9


def test_probe_sees_broken_images_and_console_errors(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; img-src data:\"></head><body>"
        "<img alt='truncated' src='data:image/png;base64,iVBORw0KGgo='>"
        "<img alt='remote' src='http://127.0.0.1:9/x.png'>"
        "<script>console.error('boom')</script></body></html>"
    )
    status, console, _ = open_in_chromium(page, tmp_path)
    assert status["images"] == 2 and status["broken"] == ["truncated", "remote"]
    errors = status["errors"]
    assert isinstance(errors, list)
    assert "console: boom" in errors and "csp: http://127.0.0.1:9/x.png" in errors
    assert any("boom" in line for line in console)
