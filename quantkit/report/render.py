"""Render a profile report as tables on the terminal, and write it as JSON atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ..artifact import atomic_file
from .tables import ID, NUM, TEXT, console, print_table

__all__ = ["write_json", "write_text", "profile_table", "convert_table", "targets_table", "profiles_table", "gate_table", "plan_table"]


def write_text(path: str | Path, text: str) -> None:
    """Write under a temporary name, then rename: no half-written report that looks complete."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(report: dict, path: str | Path) -> None:
    write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def profile_table(report: dict) -> None:
    out = console()
    q = report.get("quality")
    if q and "cosine_mean" in q:
        print_table("embedding quality vs reference (measured, cosine similarity of pooled embeddings)",
                    [("domain", ID), ("passages", NUM), ("cosine_mean", NUM), ("cosine_min", NUM)],
                    [[name, str(d["passages"]), f"{d['cosine_mean']:.5f}", f"{d['cosine_min']:.5f}"]
                     for name, d in [*q["domains"].items(), ("overall", q)]], out)
    elif q:
        print_table(f"quality vs reference (measured, ctx {report['settings']['ctx']}, second half scored; "
                    "± standard error, (95 % interval))",
                    [("domain", ID)] + [(c, NUM) for c in ("tokens", "kld_mean", "kld_p99", "top1", "Δppl %", "ppl")],
                    [[name, str(d["tokens"]), _with_stderr(d, "kld_mean", ".4f"), _with_interval(d, "kld_p99", ".4f"),
                      _with_interval(d, "top1_agreement", ".3f"), _with_interval(d, "ppl_delta_pct", "+.2f"), f"{d['ppl']:.2f}"]
                     for name, d in [*q["domains"].items(), ("overall", q)]], out)
    lat = report.get("latency")
    if lat and "encode_s" in lat:
        rows = [[key, f"{lat[key]['median']:.1f} ({lat[key]['min']:.1f}–{lat[key]['max']:.1f}) {unit}"]
                for key, unit in (("encode_texts_per_s", "passages/s"), ("encode_tokens_per_s", "tok/s"))]
        print_table(f"latency (measured, {lat['threads']} threads, {lat['texts']} passages one at a time, median (min–max) of {lat['repeats']})",
                    [("metric", ID), ("value", NUM)], rows, out)
    elif lat:
        rows = [[f"{key} ({lat['prompt_tokens']}-token prompt)" if key != "decode_tokens_per_s" else key,
                 f"{lat[key]['median']:.3f} ({lat[key]['min']:.3f}–{lat[key]['max']:.3f}) {unit}"]
                for key, unit in (("ttft_s", "s"), ("prefill_tokens_per_s", "tok/s"), ("decode_tokens_per_s", "tok/s"))]
        print_table(f"latency (measured, {lat['threads']} threads, median (min–max) of {lat['repeats']})",
                    [("metric", ID), ("value", NUM)], rows, out)
    m, h = report["memory"], report["host"]
    rows = [["file_bytes", _mb(m["file_bytes"]), "measured"]]
    if "peak_rss_bytes" in m:
        rows.append(["peak_rss_bytes", _mb(m["peak_rss_bytes"]), "measured"])
        rows.append(["predicted_peak_bytes", f"{_mb(m['predicted_peak_bytes'])} ({m['predicted_error_pct']:+.1f}%)", "estimated"])
    rows.append(["kv_cache_bytes_per_token", f"{m['kv_cache_bytes_per_token']:,}", "estimated"])
    rows.append(["memory bandwidth", f"{h['memory_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s", "measured"])
    if "decode_roofline_tokens_per_s" in h:
        rows.append(["decode_roofline_tokens_per_s", f"{h['decode_roofline_tokens_per_s']:.1f}", "estimated"])
    if "decode_roofline_fraction" in h:
        rows.append(["decode_roofline_fraction", f"{h['decode_roofline_fraction']:.2f}", "measured/estimated"])
    print_table("memory and host", [("metric", ID), ("value", NUM), ("kind", ID)], rows, out)


def _with_stderr(figures: dict, key: str, fmt: str) -> str:
    se = figures.get(f"{key}_stderr")
    return f"{figures[key]:{fmt}}" + ("" if se is None else f" ± {se:{fmt.lstrip('+')}}")


def _with_interval(figures: dict, key: str, fmt: str) -> str:
    interval = (figures.get("intervals") or {}).get(key)
    text = f"{figures[key]:{fmt}}"
    return text if interval is None else f"{text} ({interval[0]:{fmt}}–{interval[1]:{fmt}})"


def convert_table(result) -> None:
    """The artifacts a conversion wrote: recipe, the file to load (whole path), size, verification."""
    out = console()
    rows = []
    for a in result.artifacts:
        v = a.manifest["details"].get("verification") or {}
        tok = ", ".join(f"{k} {d['tokens']} ok" for k, d in v.get("tokenization", {}).items()) or "-"
        if "kld_mean" in v:
            quality = f"KLD {v['kld_mean']:.2e}, top-1 {v['top1_agreement']:.3f}"
        elif "cosine_mean" in v:
            quality = f"cosine {v['cosine_mean']:.5f} (min {v['cosine_min']:.5f})"
        else:
            quality = "-"
        if auto := a.manifest["details"].get("auto"):  # gguf:auto: its mix and KLD on its probe windows
            mix = ", ".join(f"{n} {t}" for t, n in auto["type_counts"].items())
            quality = (f"{quality}; " if quality != "-" else "") + (
                f"mix {mix} ({auto['bpw']:.2f} bpw): probe KLD {auto['measured_kld']:.4f}, predicted {auto['predicted_kld']:.4f}")
        rows.append([a.recipe, str(a.main_file), _size(a.file_bytes), tok, quality])
    print_table(f"quantkit convert: {result.source['id']}",
                [("recipe", ID), ("file", ID), ("size", NUM), ("tokenization", TEXT), ("vs source", TEXT)], rows, out)
    out.print(f"done in {result.elapsed_s:.1f} s, peak RSS {_size(result.peak_rss_bytes)}")


def predicted_peaks_table(result) -> None:
    """``convert --dry-run``: each recipe's predicted peak memory, its largest phase, its terms."""
    out = console()
    fits = {True: "yes", False: "NO", None: "?"}
    rows = [[p["recipe"], _size(p["total_bytes"]),
             fits[None if result.available_bytes is None else p["total_bytes"] <= result.available_bytes],
             p["phase"], ", ".join(f"{k} {_size(v)}" for k, v in p["terms"].items())]
            for p in result.predicted_peaks]
    print_table(f"quantkit convert --dry-run: {result.source['id']} (predicted, nothing converted)",
                [("recipe", ID), ("peak", NUM), ("fits", TEXT), ("phase", TEXT), ("terms", TEXT)], rows, out)
    available = "unknown" if result.available_bytes is None else _size(result.available_bytes)
    out.print(f"available here: {available}" + ("" if rows else "; no prediction for a GGUF source (llama.cpp requantizes one tensor at a time)"))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _rate(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def fit_text(fit: dict, speed: bool = True) -> str:
    """One line for a GGUF's fitted split (``quantkit.hardware.fit``)."""
    if "error" in fit:
        return fit["error"]
    ngl, n = fit["n_gpu_layers"], fit["n_layers"]
    where = ("all on the CPU" if ngl == 0 else "all layers offloaded" if fit["all_layers_on_gpu"]
             else f"output layer and {ngl - 1} of {n} blocks offloaded")
    if fit.get("n_cpu_moe"):  # a mixture of experts: the first blocks' routed experts stay in RAM
        where += f", --n-cpu-moe {fit['n_cpu_moe']}: the routed experts of blocks 0-{fit['n_cpu_moe'] - 1} in RAM"
    pools = (f"{fit['device_bytes'] / 1e9:.2f} of {fit['device_usable_bytes'] / 1e9:.2f} GB on the device, "
             if fit["device_bytes"] is not None else "")
    host = f"{fit['host_bytes'] / 1e9:.2f}" + (f" of {fit['host_usable_bytes'] / 1e9:.2f}" if fit["host_usable_bytes"] else " (host RAM not in the profile)")
    rate = f"; decode {fit['decode_tokens_per_s']:.1f} tok/s" if speed and fit.get("decode_tokens_per_s") else ""
    how = "largest that fits" if fit.get("ctx_largest", True) else "as asked"
    return (f"-ngl {ngl} ({where}), KV {fit['kv_type']}" + (" with -fa on" if fit["flash_attention"] else "")
            + f", -c {fit['ctx']:,} ({how}, training context {fit['n_ctx_train']:,}); {pools}{host} GB in RAM{rate} (estimated)")


def targets_table(report: dict) -> None:
    """Fits / compatible / estimated speed per hardware profile (measured where the host ran it),
    then each target's reasons, runtime and compiler command."""
    targets = report.get("targets")
    if not targets:
        return
    rows = []
    for e in targets:
        decode, prefill = _rate(e.get("decode_tokens_per_s")), _rate(e.get("prefill_tokens_per_s"))
        if "measured" in e:
            m, err = e["measured"], e["estimate_error_pct"]
            decode += f" (measured {_rate(m['decode_tokens_per_s'])}, {err['decode_tokens_per_s']:+.0f}%)"
            prefill += f" (measured {_rate(m['prefill_tokens_per_s'])}, {err['prefill_tokens_per_s']:+.0f}%)"
        rows.append([e["name"], "yes" if e["fits"] else "NO", f"{e['max_ctx']:,}",
                     f"{e['needed_bytes'] / 1e9:.2f} / {e['usable_bytes'] / 1e9:.1f} GB",
                     "yes" if e["compatible"] else "NO", decode, prefill])
    out = console()
    print_table(f"hardware profiles (estimated, ctx {targets[0]['ctx']}; what each estimate is calibrated on is listed below)",
                [("profile", ID), ("fits", ID), ("max ctx", NUM), ("memory", NUM), ("compatible", ID),
                 ("decode tok/s", NUM), ("prefill tok/s", NUM)], rows, out)
    for e in targets:
        eff = e["efficiency"]
        calibration = (f"  calibrated on: decode {eff['calibrated_on']} (efficiency {eff['decode']:.2f}); "
                       f"prefill {eff.get('prefill_calibrated_on', eff['calibrated_on'])} (efficiency {eff['prefill']:.2f})")
        if e["compatible"]:
            out.print(f"[bold]{e['name']}[/bold]: runs with {e.get('runtime', '?')}", highlight=False, soft_wrap=True)
            out.print(calibration, highlight=False, soft_wrap=True)
            if "runtime_note" in e:
                out.print(f"  note: {e['runtime_note']}", highlight=False, soft_wrap=True)
            if "compile_command" in e:
                out.print(f"  compile: {e['compile_command']}", highlight=False, soft_wrap=True)
            if "fit" in e:
                out.print(f"  fit: {fit_text(e['fit'])}", highlight=False, soft_wrap=True)
        else:
            out.print(f"[bold]{e['name']}[/bold]: incompatible", highlight=False)
            for reason in e["reasons"]:
                out.print(f"  - {reason}", highlight=False, soft_wrap=True)
            if e.get("compatible_recipes"):
                out.print(f"  compatible instead: {', '.join(e['compatible_recipes'])}", highlight=False, soft_wrap=True)


def profiles_table(rows: list[dict]) -> None:
    table = []
    for r in rows:
        memory = f"{r['memory_bytes'] / 2**30:.0f} GiB" if "memory_bytes" in r else "measured"
        bandwidth = f"{r['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s" if "bandwidth_bytes_per_s" in r else "measured"
        table.append([r["name"], r["kind"], memory, bandwidth, ", ".join(r.get("runtimes", [])) or "-", r["description"]])
    print_table("hardware profiles", [("name", ID), ("kind", ID), ("memory", NUM), ("bandwidth", NUM),
                                      ("runtimes", TEXT), ("description", TEXT)], table)


def gate_table(result) -> None:
    rows = []
    for r in result.results:
        value = r.value if isinstance(r.value, bool) else f"{r.value:.4g}"
        if r.interval is not None:
            value += f" ({r.interval[0]:.4g}–{r.interval[1]:.4g})"
        rows.append([r.artifact, r.rule, str(value), r.limit, r.verdict_text, r.kind])
    print_table(f"quantkit gate: {'PASS' if result.passed else 'FAIL'}",
                [("artifact", ID), ("rule", ID), ("value (95 %)", NUM), ("limit", TEXT), ("verdict", TEXT), ("kind", ID)], rows)



def ship_text(summary: dict) -> str:
    """What ``quantkit ship`` wrote, in a few lines."""
    lines = [f"bundle: {summary['bundle']} ({len(summary['files'])} files, SHA256SUMS)"]
    if summary.get("fit"):
        lines.append(f"  fit on {summary['profile']}: {fit_text(summary['fit'])}")
        lines.append("  Modelfile: " + ("TEMPLATE " + summary["template_check"] if summary.get("template") else "no TEMPLATE"))
    lines += [f"  warning: {w}" for w in summary.get("warnings", [])]
    return "\n".join(lines)


def plan_table(result: dict, out_dir) -> None:
    out = console()
    if result.get("estimate_only"):  # estimates and fits only: nothing converted or profiled
        rows = []
        for r in result["candidates"]:
            decode = r.get("estimated_decode_tokens_per_s")
            rows.append([r["recipe"], _mb(r["estimated_bytes"]), "-" if decode is None else f"{decode:.1f}",
                         fit_text(r["fit"], speed=False).removesuffix(" (estimated)") if r.get("fit") else "-", r["status"]])
        print_table(f"quantkit plan for {result['profile']}: estimates only, from the model's shape (ctx {result['ctx']})",
                    [("recipe", ID), ("est. memory", NUM), ("est. decode tok/s", NUM), ("llama.cpp fit (estimated)", TEXT),
                     ("status", TEXT)], rows, out)
        return
    rows = []
    for r in result["candidates"]:
        decode = r.get("decode_tokens_per_s") or r.get("estimated_decode_tokens_per_s")
        convert_peak = r.get("predicted_convert_peak_bytes")
        rows.append([r["recipe"], _mb(r["estimated_bytes"]), "-" if convert_peak is None else _mb(convert_peak),
                     "-" if decode is None else f"{decode:.1f}", "-" if "kld_mean" not in r else f"{r['kld_mean']:.4f}", r["status"]])
    print_table(f"quantkit plan for {result['profile']} (max kld_mean {result['max_kld']}, ctx {result['ctx']})",
                [("recipe", ID), ("est. memory", NUM), ("converting here", NUM), ("est. decode tok/s", NUM), ("kld_mean", NUM),
                 ("status", TEXT)], rows, out)
    out.print(f"Pareto front (size against KLD) of the profiled: {', '.join(result['pareto_front']) or '-'}", soft_wrap=True)
    rec = result["recommendation"]
    if rec:
        out.print(f"[bold]recommendation: {rec['recipe']}[/bold]: kld_mean {rec['kld_mean']:.4f}, "
                      f"{rec['file_bytes'] / 1e6:.1f} MB, estimated {rec['decode_tokens_per_s']:.1f} tok/s on {result['profile']}\n"
                      f"  artifact {rec['artifact']}\n  report {rec['report']}\n  plots {out_dir}/plan.html", soft_wrap=True)
    else:
        out.print("no candidate meets the bounds; relax --max-kld or --min-decode-tps", highlight=False)
