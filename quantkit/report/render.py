"""Render a profile report as tables on the terminal, and write it as JSON atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ..artifact import atomic_file

__all__ = ["write_json", "profile_table"]


def write_text(path: str | Path, text: str) -> None:
    """Write under a temporary name, then rename: no half-written report that looks complete."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(report: dict, path: str | Path) -> None:
    write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def profile_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    q = report.get("quality")
    if q and "cosine_mean" in q:
        t = Table(title="embedding quality vs reference (measured, cosine similarity of pooled embeddings)")
        for col in ("domain", "passages", "cosine_mean", "cosine_min"):
            t.add_column(col, justify="left" if col == "domain" else "right")
        for name, d in [*q["domains"].items(), ("overall", q)]:
            t.add_row(name, str(d["passages"]), f"{d['cosine_mean']:.5f}", f"{d['cosine_min']:.5f}")
        console.print(t)
    elif q:
        t = Table(title=f"quality vs reference (measured, ctx {report['settings']['ctx']}, second half scored)")
        for col in ("domain", "tokens", "kld_mean", "kld_p99", "kld_max", "top1", "ppl", "ppl_ref", "Δppl %"):
            t.add_column(col, justify="left" if col == "domain" else "right")
        for name, d in [*q["domains"].items(), ("overall", q)]:
            t.add_row(name, str(d["tokens"]), f"{d['kld_mean']:.4f}", f"{d['kld_p99']:.4f}", f"{d['kld_max']:.3f}",
                      f"{d['top1_agreement']:.3f}", f"{d['ppl']:.2f}", f"{d['ppl_reference']:.2f}", f"{d['ppl_delta_pct']:+.2f}")
        console.print(t)
    lat = report.get("latency")
    if lat and "encode_s" in lat:
        t = Table(title=f"latency (measured, {lat['threads']} threads, {lat['texts']} passages one at a time, median (min–max) of {lat['repeats']})")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for key, unit in (("encode_texts_per_s", "passages/s"), ("encode_tokens_per_s", "tok/s")):
            s = lat[key]
            t.add_row(key, f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f}) {unit}")
        console.print(t)
    elif lat:
        t = Table(title=f"latency (measured, {lat['threads']} threads, median (min–max) of {lat['repeats']})")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for key, unit in (("ttft_s", "s"), ("prefill_tokens_per_s", "tok/s"), ("decode_tokens_per_s", "tok/s")):
            s = lat[key]
            t.add_row(f"{key} ({lat['prompt_tokens']}-token prompt)" if key != "decode_tokens_per_s" else key,
                      f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f}) {unit}")
        console.print(t)
    m, h = report["memory"], report["host"]
    t = Table(title="memory and host")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("kind")
    t.add_row("file_bytes", _mb(m["file_bytes"]), "measured")
    if "peak_rss_bytes" in m:
        t.add_row("peak_rss_bytes", _mb(m["peak_rss_bytes"]), "measured")
        t.add_row("predicted_peak_bytes", f"{_mb(m['predicted_peak_bytes'])} ({m['predicted_error_pct']:+.1f}%)", "estimated")
    t.add_row("kv_cache_bytes_per_token", f"{m['kv_cache_bytes_per_token']:,}", "estimated")
    t.add_row("memory bandwidth", f"{h['memory_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s", "measured")
    if "decode_roofline_tokens_per_s" in h:
        t.add_row("decode_roofline_tokens_per_s", f"{h['decode_roofline_tokens_per_s']:.1f}", "estimated")
    if "decode_roofline_fraction" in h:
        t.add_row("decode_roofline_fraction", f"{h['decode_roofline_fraction']:.2f}", "measured/estimated")
    console.print(t)


def _rate(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def targets_table(report: dict) -> None:
    """Fits / compatible / estimated speed per hardware profile (measured where the host ran it),
    then each target's reasons, runtime and compiler command."""
    from rich.console import Console
    from rich.table import Table

    targets = report.get("targets")
    if not targets:
        return
    eff = targets[0]["efficiency"]
    t = Table(title=f"hardware profiles (estimated, ctx {targets[0]['ctx']}; host efficiency decode "
                    f"{eff['decode']:.2f}, prefill {eff['prefill']:.2f})")
    for col in ("profile", "fits", "max ctx", "memory", "compatible", "decode tok/s", "prefill tok/s"):
        t.add_column(col, justify="right" if col in ("max ctx", "decode tok/s", "prefill tok/s") else "left")
    for e in targets:
        decode, prefill = _rate(e.get("decode_tokens_per_s")), _rate(e.get("prefill_tokens_per_s"))
        if "measured" in e:
            m, err = e["measured"], e["estimate_error_pct"]
            decode += f" (measured {_rate(m['decode_tokens_per_s'])}, {err['decode_tokens_per_s']:+.0f}%)"
            prefill += f" (measured {_rate(m['prefill_tokens_per_s'])}, {err['prefill_tokens_per_s']:+.0f}%)"
        t.add_row(e["name"], "yes" if e["fits"] else "NO", f"{e['max_ctx']:,}",
                  f"{e['needed_bytes'] / 1e9:.2f} / {e['usable_bytes'] / 1e9:.1f} GB",
                  "yes" if e["compatible"] else "NO", decode, prefill)
    console = Console()
    console.print(t)
    for e in targets:
        if e["compatible"]:
            console.print(f"[bold]{e['name']}[/bold]: runs with {e.get('runtime', '?')}", highlight=False)
            if "runtime_note" in e:
                console.print(f"  note: {e['runtime_note']}", highlight=False, soft_wrap=True)
            if "compile_command" in e:
                console.print(f"  compile: {e['compile_command']}", highlight=False, soft_wrap=True)
        else:
            console.print(f"[bold]{e['name']}[/bold]: incompatible", highlight=False)
            for reason in e["reasons"]:
                console.print(f"  - {reason}", highlight=False, soft_wrap=True)
            if e.get("compatible_recipes"):
                console.print(f"  compatible instead: {', '.join(e['compatible_recipes'])}", highlight=False, soft_wrap=True)


def profiles_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="hardware profiles")
    for col in ("name", "kind", "memory", "bandwidth", "runtimes", "description"):
        t.add_column(col)
    for r in rows:
        memory = f"{r['memory_bytes'] / 2**30:.0f} GiB" if "memory_bytes" in r else "measured"
        bandwidth = f"{r['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s" if "bandwidth_bytes_per_s" in r else "measured"
        t.add_row(r["name"], r["kind"], memory, bandwidth, ", ".join(r.get("runtimes", [])), r["description"])
    Console().print(t)


def gate_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"quantkit gate: {'PASS' if result.passed else 'FAIL'}")
    for col in ("artifact", "rule", "value", "limit", "verdict", "kind"):
        t.add_column(col)
    for r in result.results:
        value = r.value if isinstance(r.value, bool) else f"{r.value:.4g}"
        t.add_row(r.artifact, r.rule, str(value), r.limit, "pass" if r.passed else "[bold red]FAIL[/bold red]", r.kind)
    Console().print(t)


def plan_table(result: dict, out_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"quantkit plan for {result['profile']} (max kld_mean {result['max_kld']}, ctx {result['ctx']})")
    for col in ("recipe", "est. memory", "est. decode tok/s", "kld_mean", "status"):
        t.add_column(col, justify="right" if col in ("est. memory", "est. decode tok/s", "kld_mean") else "left")
    for r in result["candidates"]:
        decode = r.get("decode_tokens_per_s") or r.get("estimated_decode_tokens_per_s")
        t.add_row(r["recipe"], _mb(r["estimated_bytes"]), "-" if decode is None else f"{decode:.1f}",
                  "-" if "kld_mean" not in r else f"{r['kld_mean']:.4f}", r["status"])
    console = Console()
    console.print(t)
    console.print(f"Pareto front (size against KLD) of the profiled: {', '.join(result['pareto_front']) or '-'}")
    rec = result["recommendation"]
    if rec:
        console.print(f"[bold]recommendation: {rec['recipe']}[/bold]: kld_mean {rec['kld_mean']:.4f}, "
                      f"{rec['file_bytes'] / 1e6:.1f} MB, estimated {rec['decode_tokens_per_s']:.1f} tok/s on {result['profile']}\n"
                      f"  artifact {rec['artifact']}\n  report {rec['report']}\n  plots {out_dir}/plan.html", highlight=False)
    else:
        console.print("no candidate meets the bounds; relax --max-kld or --min-decode-tps", highlight=False)
