"""Small, dependency-free SVG charts for the HTML report: a scatter with a highlighted front, and
grouped bars. Each returns one ``<svg>`` element with an ``id``; no scripts, no external files.
"""

from __future__ import annotations

import math
from html import escape

__all__ = ["scatter", "grouped_bars", "PALETTE"]

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_W, _H, _L, _R, _T, _B = 720, 360, 70, 20, 30, 60


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    span = (hi - lo) or 1.0
    step = 10 ** math.floor(math.log10(span / 4))
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= 6:
            step *= mult
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e9:
        return f"{v / 1e9:g}G"
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _axes(svg: list[str], xlabel: str, ylabel: str, xt, yt, sx, sy) -> None:
    svg.append(f'<line x1="{_L}" y1="{_H - _B}" x2="{_W - _R}" y2="{_H - _B}" stroke="#333"/>')
    svg.append(f'<line x1="{_L}" y1="{_T}" x2="{_L}" y2="{_H - _B}" stroke="#333"/>')
    for t in xt:
        x = sx(t)
        if _L - 1 <= x <= _W - _R + 1:
            svg.append(f'<text x="{x:.1f}" y="{_H - _B + 16}" font-size="11" text-anchor="middle">{_fmt(t)}</text>')
    for t in yt:
        y = sy(t)
        if _T - 1 <= y <= _H - _B + 1:
            svg.append(f'<line x1="{_L}" y1="{y:.1f}" x2="{_W - _R}" y2="{y:.1f}" stroke="#eee"/>')
            svg.append(f'<text x="{_L - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{_fmt(t)}</text>')
    svg.append(f'<text x="{(_L + _W - _R) / 2}" y="{_H - 18}" font-size="12" text-anchor="middle">{escape(xlabel)}</text>')
    svg.append(f'<text x="16" y="{(_T + _H - _B) / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 16 {(_T + _H - _B) / 2})">{escape(ylabel)}</text>')


def scatter(points: list[tuple[str, float, float]], front: list[str], *, svg_id: str, title: str,
            xlabel: str, ylabel: str, log_y: bool = True) -> str:
    """``points`` (label, x, y); the labels in ``front`` are joined by a line and drawn bold."""
    xs = [p[1] for p in points]
    ys = [max(p[2], 1e-6) if log_y else p[2] for p in points]
    # room on both sides for labels (they go left of a point when the right is taken)
    pad = 0.2 * ((max(xs) - min(xs)) or max(abs(max(xs)), 1.0))
    x_lo, x_hi = min(xs) - pad, max(xs) + 0.6 * pad
    if min(xs) >= 0:
        x_lo = max(0.0, x_lo)
    if log_y:
        y_lo, y_hi = min(ys) / 2, max(ys) * 2
        ly_lo, ly_hi = math.log10(y_lo), math.log10(y_hi)

        def sy(v):
            return _H - _B - (math.log10(max(v, 1e-12)) - ly_lo) / (ly_hi - ly_lo) * (_H - _T - _B)
    else:
        y_lo, y_hi = 0.0, max(ys) * 1.15 or 1.0

        def sy(v):
            return _H - _B - (v - y_lo) / (y_hi - y_lo) * (_H - _T - _B)

    def sx(v):
        return _L + (v - x_lo) / ((x_hi - x_lo) or 1.0) * (_W - _L - _R)

    svg = [f'<svg id="{svg_id}" class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img">',
           f'<title>{escape(title)}</title>',
           f'<text x="{_W / 2}" y="18" font-size="14" text-anchor="middle" font-weight="bold">{escape(title)}</text>']
    _axes(svg, xlabel, ylabel, _ticks(x_lo, x_hi, False), _ticks(y_lo, y_hi, log_y), sx, sy)
    on_front = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
    if len(on_front) > 1:
        path = " ".join(f"{sx(p[1]):.1f},{sy(max(p[2], 1e-6)):.1f}" for p in on_front)
        svg.append(f'<polyline class="pareto-front" points="{path}" fill="none" stroke="#d62728" stroke-width="2" stroke-dasharray="6 3"/>')
    # labels keep clear of every marker and of the labels placed before them
    placed = [(sx(x) - 6, sy(max(y, 1e-6)) - 6, sx(x) + 6, sy(max(y, 1e-6)) + 6) for _, x, y in points]
    for i, (label, x, y) in enumerate(points):
        bold = label in front
        color = PALETTE[i % len(PALETTE)]
        cx, cy = sx(x), sy(max(y, 1e-6))
        svg.append(f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="{6 if bold else 4}" fill="{color}" '
                   f'stroke="{"#d62728" if bold else "none"}" stroke-width="2"><title>{escape(label)}: {x:g}, {y:g}</title></circle>')
        weight = ' font-weight="bold"' if bold else ""
        width = len(label) * (7.0 if bold else 6.2)
        lx, ly = _place_label(cx, cy, width, placed)
        if (lx, ly) != (cx + 8, cy - 6):  # moved away from its point: a leader line says whose it is
            ex = lx - 1 if lx > cx else lx + width + 1
            svg.append(f'<line class="leader" x1="{cx:.1f}" y1="{cy:.1f}" x2="{ex:.1f}" y2="{ly - 4:.1f}" stroke="{color}" stroke-width="1"/>')
        svg.append(f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="11"{weight}>{escape(label)}</text>')
    svg.append("</svg>")
    return "\n".join(svg)


def _place_label(cx: float, cy: float, width: float, placed: list[tuple[float, float, float, float]]) -> tuple[float, float]:
    """Where a point's label goes (text baseline): the first spot around the point whose box
    overlaps nothing in ``placed`` (markers, earlier labels) and stays inside the plot; recorded there."""
    height = 12.0
    spots = [(8, -6), (8, 14), (8, -20), (8, 28), (-8 - width, -6), (-8 - width, 14), (-8 - width, -20), (8, -34), (8, 42)]
    for dx, dy in spots:
        x0, y0 = cx + dx, cy + dy - height + 2
        box = (x0, y0, x0 + width, y0 + height)
        inside = _L <= box[0] and box[2] <= _W and _T - 10 <= box[1] and box[3] <= _H - _B
        if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            placed.append(box)
            return cx + dx, cy + dy
    placed.append((cx + 8, cy - 16, cx + 8 + width, cy - 4))
    return cx + 8, cy - 6


def grouped_bars(groups: list[str], series: dict[str, list[float | None]], *, svg_id: str, title: str,
                 ylabel: str, hatched: set[str] = frozenset(),
                 errors: dict[str, list[list[float] | None]] | None = None) -> str:
    """One group of bars per entry of ``groups``; one bar per series (None: no bar). Series in
    ``hatched`` are drawn lighter (estimates next to measurements); ``errors`` gives a bar's
    [low, high] interval, drawn as an error bar."""
    errors = errors or {}
    values = [v for vs in series.values() for v in vs if v is not None]
    values += [e[1] for es in errors.values() for e in es if e is not None]
    y_hi = (max(values) if values else 1.0) * 1.15 or 1.0

    def sy(v):
        return _H - _B - v / y_hi * (_H - _T - _B)

    svg = [f'<svg id="{svg_id}" class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H + 20 * ((len(series) + 3) // 4)}" '
           f'width="{_W}" height="{_H + 20 * ((len(series) + 3) // 4)}" role="img">',
           f'<title>{escape(title)}</title>',
           f'<text x="{_W / 2}" y="18" font-size="14" text-anchor="middle" font-weight="bold">{escape(title)}</text>']
    _axes(svg, "", ylabel, [], _ticks(0, y_hi, False), lambda v: v, sy)
    slot = (_W - _L - _R) / max(1, len(groups))
    width = slot * 0.8 / max(1, len(series))
    for gi, group in enumerate(groups):
        x0 = _L + gi * slot + slot * 0.1
        svg.append(f'<text x="{x0 + slot * 0.4:.1f}" y="{_H - _B + 16}" font-size="11" text-anchor="middle">{escape(group)}</text>')
        for si, (name, vs) in enumerate(series.items()):
            v = vs[gi]
            if v is None:
                continue
            opacity = 0.45 if name in hatched else 1.0
            svg.append(f'<rect class="bar" x="{x0 + si * width:.1f}" y="{sy(v):.1f}" width="{width * 0.95:.1f}" height="{max(0.5, sy(0) - sy(v)):.1f}" '
                       f'fill="{PALETTE[si % len(PALETTE)]}" fill-opacity="{opacity}"><title>{escape(group)} / {escape(name)}: {v:g}</title></rect>')
            err = (errors.get(name) or [None] * len(groups))[gi]
            if err is not None:
                cx = x0 + si * width + width * 0.475
                svg.append(f'<path class="errorbar" d="M{cx - 3:.1f},{sy(err[0]):.1f} H{cx + 3:.1f} M{cx:.1f},{sy(err[0]):.1f} '
                           f'V{sy(err[1]):.1f} M{cx - 3:.1f},{sy(err[1]):.1f} H{cx + 3:.1f}" stroke="#222" fill="none">'
                           f'<title>95 % interval {err[0]:g}–{err[1]:g}</title></path>')
    for si, name in enumerate(series):
        lx, ly = _L + (si % 4) * 160, _H - 8 + 20 * (si // 4)
        opacity = 0.45 if name in hatched else 1.0
        svg.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{PALETTE[si % len(PALETTE)]}" fill-opacity="{opacity}"/>')
        svg.append(f'<text x="{lx + 16}" y="{ly}" font-size="11">{escape(name)}</text>')
    svg.append("</svg>")
    return "\n".join(svg)
