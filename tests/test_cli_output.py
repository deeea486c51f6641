"""CLI output a person can copy and a script can read (issue 21): at 80 columns and without a
terminal, names and paths are printed whole, several values are never reduced to the last one,
and no library's chatter reaches stdout or stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from quantkit.cli import cli

# what the libraries print when they are not kept quiet (llama.cpp's log, tqdm bars, warnings)
FOREIGN = re.compile(r"llama_|ggml_|load_tensors|it/s\]|\d+%\|| tensors\.\.\.|Warning|warn\(|UserWarning|FutureWarning|print_info")


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, no terminal, 80 columns: what a CI log shows."""
    env = {**os.environ, "COLUMNS": "80", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _whole(text: str, item: str) -> bool:
    """``item`` appears unbroken, delimited by spaces, table rules or line ends."""
    return re.search(rf"(^|[\s│┃:]){re.escape(item)}($|[\s│┃,])", text, re.MULTILINE) is not None


def test_profiles_list_prints_every_name_whole_at_80_columns():
    from quantkit.api import list_profiles

    result = CliRunner(env={"COLUMNS": "80"}).invoke(cli, ["profiles", "list"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80 or "- name:" in result.output
    for row in list_profiles():
        assert _whole(result.output, row["name"]), row["name"]
        for runtime in row.get("runtimes", []):  # folded onto lines, never split inside a word
            for word in runtime.split():
                assert _whole(result.output, word) or f"{word}," in result.output, word
    as_json = CliRunner().invoke(cli, ["profiles", "list", "--json"])
    assert [r["name"] for r in json.loads(as_json.output)] == [r["name"] for r in list_profiles()]


def test_wide_terminal_gets_a_table_with_whole_names():
    result = CliRunner(env={"COLUMNS": "240"}).invoke(cli, ["profiles", "list"])
    assert result.exit_code == 0 and "┃ name" in result.output and "…" not in result.output
    assert _whole(result.output, "jetson-orin-nano-8gb") and _whole(result.output, "raspberry-pi-5-8gb")


def test_repeated_and_comma_separated_values_both_count(tiny_model, tmp_path):
    """--eval-data a --eval-data b scores both; --profile and --to take commas too."""
    from tiny_models import SHARED_DATA

    out = tmp_path / "out"
    result = CliRunner(env={"COLUMNS": "80"}).invoke(
        cli, ["-q", "convert", str(tiny_model("llama")), "--to", "gguf:q8_0,gguf:q4_0", "--no-verify", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(a["recipe"] for a in json.loads(result.output)["artifacts"]) == ["gguf:q4_0", "gguf:q8_0"]
    en, zh = SHARED_DATA / "tinyshakespeare-en.txt", SHARED_DATA / "hongloumeng-zh.txt"
    art = out / "llama-q8_0"
    args = ["-q", "profile", str(art), "--no-latency", "--ctx", "64", "--chunks", "1", "--json", "-"]
    repeated = CliRunner().invoke(cli, [*args, "--eval-data", str(en), "--eval-data", str(zh),
                                        "--profile", "rtx-4060-8gb", "--profile", "raspberry-pi-5-8gb"])
    commas = CliRunner().invoke(cli, [*args, "--eval-data", f"{en},{zh}", "--profile", "rtx-4060-8gb,raspberry-pi-5-8gb"])
    for result in (repeated, commas):
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert sorted(report["quality"]["domains"]) == sorted([en.stem, zh.stem]) or len(report["quality"]["domains"]) == 2
        assert [t["name"] for t in report["targets"]] == ["rtx-4060-8gb", "raspberry-pi-5-8gb"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fd-level capture")
def test_convert_and_profile_print_whole_paths_and_no_library_chatter(tiny_model, tmp_path):
    """In a real process (the libraries' native output included), at 80 columns, no terminal."""
    out = tmp_path / "a-rather-long-output-folder-name" / "for-the-artifacts"
    done = _run("convert", str(tiny_model("gemma3")), "--to", "gguf:q8_0", "-o", str(out))
    assert done.returncode == 0, done.stderr
    path = str(out / "gemma3-q8_0" / "gemma3-Q8_0.gguf")
    assert path in done.stdout.replace("\n", "") and _whole(done.stdout, path), done.stdout
    assert not FOREIGN.search(done.stdout + done.stderr), done.stdout + done.stderr
    prof = _run("profile", str(out / "gemma3-q8_0"), "--ctx", "64", "--chunks", "1", "--profile", "raspberry-pi-5-8gb,rtx-4060-8gb")
    assert prof.returncode == 0, prof.stderr
    assert _whole(prof.stdout, "raspberry-pi-5-8gb") and _whole(prof.stdout, "rtx-4060-8gb"), prof.stdout
    assert not FOREIGN.search(prof.stdout + prof.stderr), prof.stdout + prof.stderr
    assert "…" not in prof.stdout and "…" not in done.stdout


def test_failure_ends_with_quantkits_line(tmp_path):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    run = _run("profile", str(bad))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and len(run.stderr.strip().splitlines()) == 1
