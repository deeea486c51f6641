"""The release gate: policies, verdicts and exit codes, baselines, and the reports people read."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from quantkit.api import convert, gate, profile
from quantkit.cli import main
from quantkit.errors import InputError
from quantkit.report.gate_render import pareto_front

PASS = """\
rules:
  kld_mean: {max: 5.0}
  top1_agreement: {min: 0.01}
  en.ppl_delta_pct: {max: 1000}
  file_bytes: {max: 300000000}
  decode_tokens_per_s: {min: 1}
fits: [raspberry-pi-5-8gb]
"""
FAIL = """\
rules:
  kld_mean: {max: 0.000001}
  file_bytes: {max: 300000000}
compatible: [raspberry-pi-5-8gb]
"""


@pytest.fixture(scope="module")
def reports(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate")
    arts = convert(tiny_model("llama"), ["gguf:q8_0", "gguf:q2_k"], out, verify=False).artifacts
    paths = {}
    for art in arts:
        report = profile(art.path, eval_data=["en"], ctx=128, chunks=2, profiles=["raspberry-pi-5-8gb", "host"])
        paths[art.recipe] = out / f"{art.path.name}.json"
        paths[art.recipe].write_text(json.dumps(report))
    return paths


def _policy(tmp_path, text, name="policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_pass_and_fail_exit_codes(reports, tmp_path, capsys):
    files = [str(p) for p in reports.values()]
    assert main(["gate", *files, "--policy", str(_policy(tmp_path, PASS))]) == 0
    capsys.readouterr()
    assert main(["gate", *files, "--policy", str(_policy(tmp_path, FAIL)), "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["passed"] is False and verdict["failed"] == ["kld_mean", "kld_mean"]
    result = gate(files, _policy(tmp_path, FAIL))
    assert not result.passed
    assert {r.rule for r in result.failed} == {"kld_mean"}  # both artifacts, the same rule
    assert {r.artifact for r in result.failed} == {"gguf:q8_0", "gguf:q2_k"}
    fits = [r for r in result.results if r.rule == "compatible:raspberry-pi-5-8gb"]
    assert fits and all(r.passed and r.kind == "estimated" for r in fits)


def test_bad_input_exits_2(reports, tmp_path, capsys):
    files = [str(p) for p in reports.values()]
    cases = {
        "unknown metric": "rules:\n  kld_avg: {max: 1}\n",
        "no limit": "rules:\n  kld_mean: {}\n",
        "unknown key": "rules: {}\nfit: [host]\n",
        "missing domain": "rules:\n  zh.kld_mean: {max: 1}\n",
        "no estimate": "fits: [rtx-4090-24gb]\n",
    }
    for name, text in cases.items():
        assert main(["gate", *files, "--policy", str(_policy(tmp_path, text))]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, (name, err)
    assert main(["gate", str(tmp_path / "missing.json"), "--policy", str(_policy(tmp_path, PASS))]) == 2
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(InputError, match="breaks its schema"):
        gate([broken], _policy(tmp_path, PASS))


def test_baseline_regression(reports, tmp_path):
    policy = _policy(tmp_path, "baseline: {tolerance_pct: 2}\n")
    report = json.loads(reports["gguf:q8_0"].read_text())
    assert gate([report], policy, baseline=[report]).passed  # a report against itself
    worse = copy.deepcopy(report)
    worse["quality"]["kld_mean"] *= 1.10
    worse["latency"]["decode_tokens_per_s"]["median"] *= 0.99  # within the 2% tolerance
    result = gate([worse], policy, baseline=[report])
    assert [r.rule for r in result.failed] == ["baseline.kld_mean"]
    with pytest.raises(InputError, match="--baseline"):
        gate([report], policy)


def test_pareto_front():
    points = [("a", 100, 0.5), ("b", 200, 0.1), ("c", 150, 0.6), ("d", 300, 0.1), ("e", 90, 0.9)]
    assert sorted(pareto_front(points)) == ["a", "b", "e"]


class _Svgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.shapes, self.stack = {}, {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg":
            self.stack.append(attrs.get("id"))
            self.ids[attrs.get("id")] = True
        elif self.stack and tag in ("circle", "rect", "polyline"):
            self.shapes.setdefault(self.stack[-1], []).append((tag, attrs.get("class")))

    def handle_endtag(self, tag):
        if tag == "svg" and self.stack:
            self.stack.pop()


def _check_plots(html: str) -> None:
    parser = _Svgs()
    parser.feed(html)
    assert {"plot-pareto", "plot-domains", "plot-speed"} <= set(parser.ids)
    assert sum(1 for t, c in parser.shapes["plot-pareto"] if c == "point") == 2
    assert any(c == "bar" for _, c in parser.shapes["plot-domains"])
    assert sum(1 for _, c in parser.shapes["plot-speed"] if c == "bar") >= 4  # measured + 2 estimates, 2 artifacts


def test_markdown_and_html_reports(reports, tmp_path):
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    result = gate(list(reports.values()), _policy(tmp_path, FAIL), html=html, markdown=md)
    text = md.read_text()
    assert text.startswith("## quantkit gate: ❌ **FAIL**") and "| `gguf:q2_k` | `kld_mean` |" in text
    page = html.read_text()
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained
    _check_plots(page)
    assert not result.passed


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="Chromium is installed by .ci/run")
def test_html_renders_in_headless_chromium(reports, tmp_path):
    html = tmp_path / "report.html"
    gate(list(reports.values()), _policy(tmp_path, PASS), html=html)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=2000"]
    dom = subprocess.run([*args, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    _check_plots(dom)  # the plots survive a real browser's parse
    shot = tmp_path / "report.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1100,1800", html.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a rendered page with charts, not a blank one
