"""The quantkit command line: parse, call one API function, render. No logic of its own."""

from __future__ import annotations

import json
import signal
import sys
import threading
import traceback

import click

from . import __version__
from .artifact import interrupt_requested, request_interrupt
from .errors import QuantkitError

__all__ = ["cli", "main"]


def _split(ctx, param, values):
    """Options that take several values accept them repeated or comma-separated, never keep only the last."""
    if values is None:
        return values
    items = [v.strip() for value in ((values,) if isinstance(values, str) else values) for v in value.split(",")]
    return tuple(v for v in items if v)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Convert open-weight LLMs to GGUF, GPTQ and ONNX; profile them; gate releases."""
    from .log import configure_cli

    configure_cli(debug)  # library chatter to quantkit's log, before any library is imported
    ctx.obj = {"debug": debug, "quiet": quiet}


@cli.command()
@click.argument("source", required=False)
@click.option("--to", "recipes", multiple=True, callback=_split, metavar="RECIPE", help="Output recipe, e.g. gguf:q4_k_m (repeatable or comma-separated). Default: gguf:q4_k_m.")
@click.option("-o", "--out", "out_dir", default="quantkit-out", show_default=True, help="Folder for the artifacts.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check tokenization and logits of each output against the source.")
@click.option("--verify-text", "verify_files", multiple=True, type=click.Path(), help="Text file(s) for verification (default: quantkit's own en/zh texts).")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin/.pt pickle weights (they can run code when loaded).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads for quantization and verification.")
@click.option("--damp", type=click.FloatRange(0, 1, min_open=True), default=None, help="GPTQ: Hessian dampening, a fraction of its mean diagonal [0.01].")
@click.option("--sym/--asym", default=None, help="GPTQ: symmetric or asymmetric integer grid [sym].")
@click.option("--act-order/--no-act-order", default=None, help="GPTQ: quantize columns by decreasing Hessian diagonal (desc_act) [off].")
@click.option("--static-groups/--no-static-groups", default=None, help="GPTQ: fix group scales before act-order permutes columns [off].")
@click.option("--imatrix", default=None, metavar="auto|none|FILE", help="GGUF: weigh quantization errors by an importance matrix computed on the calibration text (auto) or from a llama-imatrix GGUF FILE, or not (none), for every quantized type [below 5 bits but q4_0: auto, from an HF checkpoint; others: none; a +imatrix/+noimatrix suffix on a type wins].")
@click.option("--target-bpw", type=click.FloatRange(1, 16), default=None, help="gguf:auto: bits per weight to fill (llama.cpp's BPW: tensor bytes over parameters).")
@click.option("--target-size", default=None, metavar="SIZE", help="gguf:auto: file size to fill, e.g. 240MB, 1.5GiB or bytes.")
@click.option("--probe-windows", type=click.IntRange(1), default=None, help="gguf:auto: calibration windows each tensor group's sensitivity is measured on [4].")
@click.option("--calib", default=None, metavar="FILE", help="GPTQ, GGUF imatrix, onnx:int8-static, onnx:int4-gptq: calibration text (default: en/zh/code mix, disjoint from the profiler's texts).")
@click.option("--calib-samples", type=click.IntRange(1), default=None, help="GPTQ, GGUF imatrix, onnx:int8-static, onnx:int4-gptq: calibration windows [GPTQ 128, imatrix 32, ONNX 16].")
@click.option("--calib-seqlen", type=click.IntRange(16), default=None, help="GPTQ, GGUF imatrix, onnx:int8-static, onnx:int4-gptq: tokens per calibration window [GPTQ and imatrix 512, ONNX 256].")
@click.option("--static-shapes/--dynamic-shapes", default=None, help="ONNX: batch 1 and a fixed sequence length, no KV cache (for Ascend ATC and other NPU compilers) [dynamic].")
@click.option("--static-seqlen", type=click.IntRange(8), default=None, help="ONNX: the fixed sequence length of --static-shapes [512].")
@click.option("--opset", type=click.IntRange(11), default=None, help="ONNX, torch.onnx exports (encoders, static shapes): opset [18].")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None, help="ONNX int4/int8: MatMulNBits compute type, 4 = int8 activations [the builder's: 4 on the CPU].")
@click.option("--head", type=click.Choice(["same", "int8", "float"]), default=None, help="ONNX int4/int8 decoders: output head (and tied embedding) in the recipe's bits, int8 or float [same].")
@click.option("--ort-fusions/--no-ort-fusions", default=None, help="ONNX fp32 and int8 encoders: ONNX Runtime's fused Attention/SkipLayerNorm/BiasGelu (com.microsoft operators; int8: QAttention); off for other runtimes [on].")
@click.option("--seed", type=int, default=None, help="Seed for calibration sampling [0].")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result on stdout.")
@click.option("--dry-run", is_flag=True, help="Print each recipe's predicted peak memory and the memory available; convert nothing.")
@click.option("--ignore-memory", is_flag=True, help="Convert even when the predicted peak memory exceeds what is available.")
@click.option("--gate", "gate_policy", type=click.Path(), default=None, help="Then profile every artifact and gate it against this policy (exit 1 if a rule fails).")
@click.option("--html", "html_path", type=click.Path(), default=None, help="With --gate: write the HTML report here.")
@click.option("--markdown", "markdown_path", type=click.Path(), default=None, help="With --gate: write the Markdown summary here.")
@click.pass_context
def convert(ctx, source, recipes, out_dir, verify, verify_files, allow_pickle, threads, as_json, dry_run, ignore_memory,
            gate_policy, html_path, markdown_path, **recipe_options):
    """Convert SOURCE (HF folder, hub id or .gguf file; default: the embedded Gemma 3 270M)."""
    from .api import DEFAULT_RECIPES, convert_and_gate
    from .api import convert as run_convert
    from .profile.corpus import read_texts
    from .progress import Progress

    quiet = ctx.obj["quiet"] or as_json
    options = dict(
        verify=verify,
        verify_texts=read_texts(list(verify_files)) if verify_files else None,
        allow_pickle=allow_pickle,
        threads=threads,
        recipe_options=recipe_options,
        progress=Progress(None if not quiet else False),
        check_memory=not ignore_memory,
    )
    if dry_run:
        from .api import memory_refusal
        from .errors import InputError
        from .report.render import predicted_peaks_table

        result = run_convert(source, recipes or DEFAULT_RECIPES, out_dir, dry_run=True, **options)
        if as_json:
            click.echo(json.dumps(result.to_dict(), indent=2))
        else:
            predicted_peaks_table(result)
        if not ignore_memory and (message := memory_refusal(result.predicted_peaks, result.available_bytes)):
            raise InputError(message)  # exit 2, after the predictions are shown
        return
    if gate_policy:
        result, verdict = convert_and_gate(source, recipes or DEFAULT_RECIPES, out_dir, gate_policy,
                                           html=html_path, markdown=markdown_path, **options)
    else:
        result, verdict = run_convert(source, recipes or DEFAULT_RECIPES, out_dir, **options), None
    count, freed = result.stale_removed
    if count:
        click.echo(f"removed {count} unfinished output(s) left by killed runs in {out_dir} ({freed / 1e6:.1f} MB freed)", err=True)
    if as_json:
        out = result.to_dict()
        if verdict is not None:
            out["gate"] = verdict.to_dict()
        click.echo(json.dumps(out, indent=2))
    else:
        from .report.render import convert_table

        convert_table(result)
        if verdict is not None:
            from .report.render import gate_table

            gate_table(verdict)
    if verdict is not None and not verdict.passed:
        ctx.exit(1)


@cli.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path())
@click.option("--policy", required=True, type=click.Path(), help="Policy YAML: rules, fits, compatible, baseline.")
@click.option("--baseline", "baselines", multiple=True, type=click.Path(), help="Earlier report(s) for the policy's regression rule.")
@click.option("--html", "html_path", type=click.Path(), default=None, help="Write the HTML report (with plots) here.")
@click.option("--markdown", "markdown_path", type=click.Path(), default=None, help="Write the Markdown summary here.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@click.pass_context
def gate(ctx, reports, policy, baselines, html_path, markdown_path, as_json):
    """Gate profile REPORTS against a policy: exit 0 if every rule holds, 1 if one fails, 2 on bad input."""
    from .api import gate as run_gate
    from .report.render import gate_table

    result = run_gate(list(reports), policy, baseline=list(baselines), html=html_path, markdown=markdown_path)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        gate_table(result)
    if not result.passed:
        ctx.exit(1)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--reference", default=None, help="HF checkpoint to compare against (default: the artifact's recorded source).")
@click.option("--eval-data", multiple=True, callback=_split, default=("en", "zh", "code"), show_default=True, help="Domains (en, zh, code), text files, or wikitext-2-raw-v1; repeatable or comma-separated.")
@click.option("--ctx", "ctx_len", type=click.IntRange(16), default=512, show_default=True, help="Window length in tokens; the second half of each is scored.")
@click.option("--chunks", type=click.IntRange(1), default=None, help="At most N windows per domain.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads (default: all cores).")
@click.option("--no-latency", is_flag=True, help="Skip the latency/memory subprocess.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the JSON report here ('-': print it on stdout instead of the tables).")
@click.option("--profile", "profiles", multiple=True, callback=_split, metavar="NAME|FILE", help="Hardware profile to estimate for (repeatable or comma-separated; 'host' is this machine). See: quantkit profiles list.")
@click.option("--calibrate-from", type=click.Path(), default=None, help="Take host efficiencies from another report (made with --profile host) instead of this artifact's run.")
@click.option("--no-check", is_flag=True, help="Skip the sha256 check of the artifact's files against its manifest (sizes are still checked).")
@click.pass_context
def profile(ctx, artifact, reference, eval_data, ctx_len, chunks, threads, no_latency, json_path, profiles, calibrate_from, no_check):
    """Measure ARTIFACT's quality loss, latency and memory on this host."""
    from .api import profile as run_profile
    from .progress import Progress
    from .report.render import profile_table, targets_table, write_json

    report = run_profile(
        artifact, reference=reference, eval_data=list(eval_data),
        ctx=ctx_len, chunks=chunks, threads=threads, latency=not no_latency,
        progress=Progress(False if ctx.obj["quiet"] else None), profiles=list(profiles),
        calibrate_from=calibrate_from, check=not no_check,
    )
    if json_path == "-":
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    if json_path:
        write_json(report, json_path)
    profile_table(report)
    targets_table(report)


@cli.command()
@click.argument("source", required=False)
@click.option("--profile", "profile_name", required=True, metavar="NAME", help="Hardware profile to plan for.")
@click.option("--max-kld", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True, help="Quality bound: kld_mean at most this.")
@click.option("--min-decode-tps", type=click.FloatRange(0), default=None, help="Estimated decode tokens/s on the target at least this.")
@click.option("--ctx", "ctx_len", type=click.IntRange(16), default=512, show_default=True, help="Context the model must fit with.")
@click.option("-o", "--out", "out_dir", default="quantkit-plan", show_default=True, help="Folder for candidates, reports and plan.json (resumable).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Threads.")
@click.option("--estimate-only", is_flag=True, help="Only the estimates and the fit on the target, from the model's shape "
              "(a folder with config.json alone is enough); nothing is converted.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def plan(ctx, source, profile_name, max_kld, min_decode_tps, ctx_len, out_dir, threads, estimate_only, as_json):
    """Pick the best recipe for a hardware profile: prune by estimates, convert and profile the rest."""
    from .api import plan as run_plan
    from .progress import Progress
    from .report.render import plan_table

    result = run_plan(source, profile_name, out_dir, max_kld=max_kld, min_decode_tps=min_decode_tps, ctx=ctx_len,
                      threads=threads, progress=Progress(False if ctx.obj["quiet"] or as_json else None), estimate_only=estimate_only)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        plan_table(result, out_dir)
    if result["recommendation"] is None and not estimate_only:
        ctx.exit(1)


@cli.command()
@click.argument("artifact")
@click.option("--profile", "profile_name", required=True, metavar="NAME", help="Hardware profile to ship for.")
@click.option("-o", "--out", "out_dir", required=True, help="Bundle folder to write (replaced atomically).")
@click.option("--report", "report", default=None, help="The artifact's profile report (JSON): its quality table goes in the model card.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def ship(artifact, profile_name, out_dir, report, as_json):
    """Write a deployment bundle: the artifact, its fit, run commands, Modelfile, model card, SHA256SUMS."""
    from .api import ship as run_ship
    from .report.render import ship_text

    summary = run_ship(artifact, profile_name, out_dir, report=report)
    click.echo(json.dumps(summary, indent=2) if as_json else ship_text(summary))


@cli.group()
def profiles() -> None:
    """Hardware profiles: the targets quantkit estimates for (profiles/*.yaml, and 'host')."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def profiles_list(as_json: bool) -> None:
    """List the known profiles."""
    from .api import list_profiles
    from .report.render import profiles_table

    rows = list_profiles()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        profiles_table(rows)


@profiles.command("show")
@click.argument("name")
def profiles_show(name: str) -> None:
    """Show one profile, validated ('host' is measured now)."""
    from .api import show_profile

    click.echo(json.dumps(show_profile(name), indent=2))


@profiles.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def profiles_validate(files) -> None:
    """Validate profile FILES; each problem names the file, the line and the field."""
    from .api import validate_profiles

    problems = validate_profiles(list(files))
    for path in files:
        if path not in problems:
            click.echo(f"ok: {path}")
    for message in problems.values():
        click.echo(f"error: {message}", err=True)
    if problems:
        click.get_current_context().exit(2)


@profiles.command("schema")
def profiles_schema() -> None:
    """Print the JSON Schema of a profile file."""
    from .hardware.schema import HardwareProfile

    click.echo(json.dumps(HardwareProfile.model_json_schema(), indent=2))


def _terminated(signum, frame):
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so unfinished outputs are removed. Where
    # Python swallows the KeyboardInterrupt (raised inside a weakref callback or __del__: seen in
    # CI during an import), the recorded request still stops the run before it publishes anything
    request_interrupt()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: map quantkit errors to one-line messages and exit codes."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # without standalone mode click returns, rather than raises, a command's ctx.exit(code)
        code = cli.main(args=argv, prog_name="quantkit", standalone_mode=False)
        if interrupt_requested():  # its KeyboardInterrupt was swallowed and nothing raised it again
            click.echo("interrupted", err=True)
            return 130
        if isinstance(code, int) and code:
            return code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code  # 2 for usage errors
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted; no partial artifact was kept", err=True)
        return 130
    except OSError as exc:  # full disk, permissions: the OS's own words, one line
        if debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror or exc}{where}", err=True)
        return 1
    except QuantkitError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except Exception as exc:  # an internal failure: one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        return 1
    return 0


def entry() -> None:
    """Console-script entry point."""
    try:
        code = main()
    except KeyboardInterrupt:  # a second signal while the first one's cleanup ran: still exit 130
        code = 130
    if code == 130:
        # interrupted and cleaned up: exit 130, not death by SIGINT. CPython remembers a
        # KeyboardInterrupt that left any exec() of a string (dataclasses and namedtuples are built
        # that way, so a signal landing during a lazy import does it) and, under `python -m`, kills
        # itself with SIGINT at exit even though the interrupt was handled (CI: returncode -2). Each
        # exec() of a string clears that flag first, so one empty exec() clears it.
        exec("")
        # and a second signal during interpreter shutdown must not do it either
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
