"""The gate's outputs people read: a Markdown summary (CI step summary, pull-request comment)
and a self-contained HTML report with plots (inline SVG, no scripts or external files)."""

from __future__ import annotations

from html import escape
from typing import Any

from ..gate import GateResult, artifact_label, metric_value
from .svg import grouped_bars, scatter

__all__ = ["render_markdown", "render_html", "pareto_front"]


def _quality_metric(reports: list[dict[str, Any]]) -> tuple[str, str]:
    """(metric, axis label) for the quality axis: KLD for decoders, 1 - cosine for encoders."""
    if all("kld_mean" in (r.get("quality") or {}) for r in reports):
        return "kld_mean", "mean KL divergence vs reference (lower is better)"
    return "cosine_loss", "1 - mean embedding cosine (lower is better)"


def _quality(report: dict[str, Any], metric: str) -> float | None:
    q = report.get("quality") or {}
    if metric == "cosine_loss":
        return None if "cosine_mean" not in q else 1.0 - q["cosine_mean"]
    return q.get(metric)


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Labels of the points no other point beats on both axes (both minimized)."""
    front = []
    for label, x, y in points:
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for _, x2, y2 in points)
        if not dominated:
            front.append(label)
    return front


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def _value_text(r) -> str:
    """The rule's value with its 95 % interval when it has one."""
    return _fmt(r.value) + (f" ({_fmt(r.interval[0])}–{_fmt(r.interval[1])})" if r.interval else "")


def render_markdown(result: GateResult) -> str:
    verdict = "✅ **PASS**" if result.passed else f"❌ **FAIL** ({len(result.failed)} rule{'s' if len(result.failed) != 1 else ''})"
    lines = [f"## quantkit gate: {verdict}", "", "| artifact | rule | value (95 % interval) | limit | verdict | kind |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result.results:
        lines.append(f"| `{r.artifact}` | `{r.rule}` | {_value_text(r)} | {r.limit} | {r.verdict_text.replace('FAIL', '**FAIL**')} | {r.kind} |")
    metric, _ = _quality_metric(result.reports)
    lines += ["", f"| artifact | file | {metric} (95 % interval) | decode tok/s (measured) | peak RSS |", "| --- | --- | --- | --- | --- |"]
    for report in result.reports:
        q = _quality(report, metric)
        interval = ((report.get("quality") or {}).get("intervals") or {}).get(metric)
        decode, _ = metric_value(report, "decode_tokens_per_s") if "decode_tokens_per_s" in (report.get("latency") or {}) else (None, "")
        peak = (report.get("memory") or {}).get("peak_rss_bytes")
        lines.append(f"| `{artifact_label(report)}` | {report['memory']['file_bytes'] / 1e6:.1f} MB | "
                     f"{'-' if q is None else f'{q:.4f}'}{f' ({interval[0]:.4f}–{interval[1]:.4f})' if interval else ''} | "
                     f"{'-' if decode is None else f'{decode:.1f}'} | "
                     f"{'-' if peak is None else f'{peak / 1e6:.0f} MB'} |")
    return "\n".join(lines) + "\n"


def plots(reports: list[dict[str, Any]]) -> list[str]:
    metric, ylabel = _quality_metric(reports)
    # bitsandbytes artifacts hold no weights on disk (quantized at load): no size to plot
    points = [(artifact_label(r), r["memory"]["file_bytes"] / 1e6, q) for r in reports
              if (q := _quality(r, metric)) is not None and r["artifact"]["format"] != "bnb"]
    drawn = []
    if points:
        drawn.append(scatter(points, pareto_front(points), svg_id="plot-pareto", title="size against quality loss (Pareto front in red)",
                             xlabel="artifact size (MB)", ylabel=ylabel))
    domains = sorted({d for r in reports for d in ((r.get("quality") or {}).get("domains") or {})})
    if domains:
        key = "kld_mean" if metric == "kld_mean" else "cosine_mean"
        def figures(r, d):
            return ((r.get("quality") or {}).get("domains", {}).get(d) or {})

        series = {artifact_label(r): [figures(r, d).get(key) for d in domains] for r in reports}
        errors = {artifact_label(r): [(figures(r, d).get("intervals") or {}).get(key) for d in domains] for r in reports}
        drawn.append(grouped_bars(domains, series, svg_id="plot-domains", errors=errors,
                                  title=f"{key} per domain (error bars: 95 % interval)", ylabel=key))
    labels = [artifact_label(r) for r in reports]
    profiles = sorted({t["name"] for r in reports for t in r.get("targets", [])}, key=lambda n: (n != "host", n))
    series: dict[str, list[float | None]] = {}
    if any("decode_tokens_per_s" in (r.get("latency") or {}) for r in reports):
        series["host (measured)"] = [(r.get("latency") or {}).get("decode_tokens_per_s", {}).get("median") for r in reports]
    for name in profiles:
        series[f"{name} (estimated)"] = [next((t.get("decode_tokens_per_s") for t in r.get("targets", []) if t["name"] == name), None) for r in reports]
    if series:
        drawn.append(grouped_bars(labels, series, svg_id="plot-speed", title="decode speed: measured here, estimated per profile",
                                  ylabel="tokens/s", hatched={k for k in series if k.endswith("(estimated)")}))
    return drawn


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1000px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:14px}
th{background:#f4f4f4}.pass{color:#2a7a2a}.fail{color:#b00;font-weight:bold}.verdict{font-size:1.4em}
svg.plot{display:block;margin:1.5em 0;border:1px solid #eee}code{background:#f6f6f6;padding:0 3px}"""


def render_html(result: GateResult, title: str = "quantkit release gate") -> str:
    verdict = '<span class="pass">PASS</span>' if result.passed else f'<span class="fail">FAIL</span> ({len(result.failed)} failing)'
    rows = "\n".join(
        f'<tr><td><code>{escape(r.artifact)}</code></td><td><code>{escape(r.rule)}</code></td><td>{escape(_value_text(r))}</td>'
        f'<td>{escape(r.limit)}</td><td class="{"pass" if r.passed else "fail"}">{escape(r.verdict_text)}</td><td>{r.kind}</td></tr>'
        for r in result.results
    )
    host = next((r["host"] for r in result.reports if r.get("host")), {})
    machine = f"{escape(str(host.get('cpu_model', '?')))}, {host.get('cores', '?')} cores" if host else "unknown host"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="verdict">Verdict: {verdict}</p>
<p>{len(result.reports)} artifact(s); measured on {machine}; estimates for other targets are labelled estimated.</p>
<h2>Rules</h2>
<table id="rules"><tr><th>artifact</th><th>rule</th><th>value</th><th>limit</th><th>verdict</th><th>kind</th></tr>
{rows}
</table>
<h2>Plots</h2>
{"".join(plots(result.reports))}
</body></html>
"""
