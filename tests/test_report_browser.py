"""Open a two-run report in headless Chromium: every figure renders, the console stays clean, a legend click hides a trace.

Chromium is driven directly (no webdriver): a copy of the page gets a small probe script that
collects console errors, JS errors and CSP violations from the start; after ``load`` it counts
the rendered plotly figures, clicks the first legend entry of the first figure the way a mouse
does (mousedown and mouseup on whatever is drawn at the entry's centre) and, after plotly's double-click window,
clicks the figure's "log" button and writes what it saw into the DOM, which ``--dump-dom`` prints.
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
    "function __report(extra){const out=document.createElement('pre');out.id='probe';"
    "const plots=[...document.querySelectorAll('.js-plotly-plot')];"
    "out.textContent=JSON.stringify(Object.assign({figures:plots.length,"
    "rendered:plots.filter(p=>p.querySelector('.main-svg')&&p._fullLayout).length,errors:window.__errors},extra));"
    "document.body.appendChild(out);}"
    "window.addEventListener('load',()=>setTimeout(()=>{"
    "const gd=document.querySelector('.js-plotly-plot');"
    "const entry=gd&&gd.querySelector('.legend g.traces .legendtoggle');"
    "if(!entry){__report({clicked:null});return;}"
    "const before=gd.data.map(t=>t.visible===undefined?true:t.visible);"
    "const box=entry.getBoundingClientRect();const at={bubbles:true,cancelable:true,view:window,button:0,buttons:1,"
    "clientX:box.left+box.width/2,clientY:box.top+box.height/2};"
    "const target=document.elementFromPoint(at.clientX,at.clientY);"
    "target.dispatchEvent(new MouseEvent('mousedown',at));target.dispatchEvent(new MouseEvent('mouseup',at));"
    "setTimeout(()=>{const after=gd.data.map(t=>t.visible===undefined?true:t.visible);"
    "const log=[...gd.querySelectorAll('.updatemenu-button')].find(b=>b.textContent==='log');"
    "if(log)log.dispatchEvent(new MouseEvent('click',{bubbles:true}));"
    "setTimeout(()=>__report({clicked:gd.id,before:before,after:after,yaxis:gd.layout.yaxis.type||null}),500);},1000);"
    "},500));"
    "</script>"
)


def open_in_chromium(page: Path, workdir: Path) -> tuple[dict[str, object], list[str], Path]:
    """Load a probed copy of ``page``; return (probe result, console lines from stderr, screenshot path)."""
    text = page.read_text(encoding="utf-8")
    assert "default-src 'none';" in text
    probed_path = workdir / "probed.html"
    probed_path.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    screenshot = workdir / "screenshot.png"
    result = subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={workdir / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=10000", f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--screenshot={screenshot}", "--dump-dom", probed_path.as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, flags=re.S)
    assert found is not None, f"no probe output (exit {result.returncode}): {result.stderr[-2000:]}"
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")), console, screenshot


def test_two_run_report_renders_and_a_legend_click_hides_a_trace(tmp_path: Path) -> None:
    import matplotlib.image

    write_crashed_run(tmp_path / "a" / "kat")
    write_crashed_run(tmp_path / "b" / "kat")
    page = build_report([tmp_path / "a" / "kat", tmp_path / "b" / "kat"], tmp_path / "report.html")
    text = page.read_text()
    expected_figures = text.count("Plotly.newPlot(")
    assert expected_figures >= 6

    status, console, screenshot = open_in_chromium(page, tmp_path)
    assert status["errors"] == [] and console == []
    assert status["figures"] == status["rendered"] == expected_figures
    before, after = status["before"], status["after"]
    assert isinstance(before, list) and isinstance(after, list)
    # the first training figure: a/kat train/loss is the first legend entry; a click hides only it
    assert before[0] is True and after[0] == "legendonly"
    assert after[1:] == before[1:]
    assert status["yaxis"] == "log"  # the "log" button switched the y axis

    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    not_white = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert 0.02 < not_white < 0.9


def test_probe_sees_console_errors_and_blocked_requests(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; script-src 'unsafe-inline'; img-src data:\"></head><body>"
        "<img alt='remote' src='http://127.0.0.1:9/x.png'>"
        "<script>console.error('boom')</script></body></html>"
    )
    status, console, _ = open_in_chromium(page, tmp_path)
    errors = status["errors"]
    assert isinstance(errors, list)
    assert "console: boom" in errors and "csp: http://127.0.0.1:9/x.png" in errors
    assert status["figures"] == 0 and status["clicked"] is None
    assert any("boom" in line for line in console)
