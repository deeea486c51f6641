"""CLI parsing, exit codes and one-line messages (no tracebacks unless --debug)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from quantkit import __version__
from quantkit.cli import cli, main


def test_help_and_version():
    runner = CliRunner()
    assert "convert" in runner.invoke(cli, ["--help"]).output
    out = runner.invoke(cli, ["convert", "--help"]).output
    assert "--to" in out and "--allow-pickle" in out and "--verify" in out
    assert __version__ in runner.invoke(cli, ["--version"]).output


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    code = main(["convert", str(tmp_path / "missing"), "--to", "gguf:q4_k_m", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_bad_recipe_exits_2(capsys):
    assert main(["convert", "--to", "gguf:q7_k"]) == 2
    assert "unknown GGUF type 'q7_k'" in capsys.readouterr().err


def test_usage_error_exits_2(capsys):
    assert main(["convert", "--threads", "zero"]) == 2


def test_debug_shows_traceback(tmp_path, capsys):
    main(["--debug", "convert", str(tmp_path / "missing")])
    assert "Traceback" in capsys.readouterr().err


def test_convert_json_output(tiny_model, tmp_path, capsys):
    code = main(["-q", "convert", str(tiny_model("qwen2")), "--to", "gguf:q8_0", "-o", str(tmp_path), "--no-verify", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    (artifact,) = payload["artifacts"]
    assert artifact["recipe"] == "gguf:q8_0" and artifact["file_bytes"] > 0
    assert artifact["file"].endswith("-Q8_0.gguf")
