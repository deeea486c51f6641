"""The README's benchmark tables are generated from benchmarks/results by benchmarks/readme.py:
the committed README must match what the committed results give, and the generator must put each
script's own table (computed from the JSON, not copied) into the marked block."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gemma_recipes  # noqa: E402
import readme  # noqa: E402


def test_readme_matches_committed_results():
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme.py"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _quantize_result(qk: float, direct: float) -> dict:
    def spread(v):
        return {"median": v, "min": v * 0.9, "max": v * 1.1}

    return {"benchmark": "quantize_gguf", "machine": "test cpu, 2 cores", "date": "2026-01-02", "rows": [
        {"type": "q8_0", "tool": "quantkit convert", "wall_s": spread(qk), "peak_rss_bytes": spread(9e8)},
        {"type": "q8_0", "tool": "llama.cpp llama_model_quantize", "wall_s": spread(direct), "peak_rss_bytes": spread(8e8)},
    ]}


def test_block_is_regenerated_from_results(tmp_path):
    (tmp_path / "quantize_gguf.json").write_text(json.dumps(_quantize_result(3.0, 2.0)))
    text = "intro\n<!-- bench:quantize_gguf:table -->\nstale numbers\n<!-- /bench -->\nafter\n"
    out = readme.render_readme(text, tmp_path)
    assert "stale numbers" not in out
    assert "test cpu, 2 cores, 2026-01-02" in out
    assert "| q8_0 | 3.00 s (2.70–3.30) | 2.00 s (1.80–2.20) | 1.50x | 900 / 800 MB |" in out
    assert out.startswith("intro\n") and out.endswith("<!-- /bench -->\nafter\n")
    assert readme.render_readme(out, tmp_path) == out  # idempotent


def test_missing_results_or_section_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        readme.render_readme("<!-- bench:quantize_gguf:table -->\n<!-- /bench -->", tmp_path)
    (tmp_path / "quantize_gguf.json").write_text(json.dumps(_quantize_result(1.0, 1.0)))
    with pytest.raises(SystemExit, match="has \\['table'\\]"):
        readme.render_readme("<!-- bench:quantize_gguf:nope -->\n<!-- /bench -->", tmp_path)


def _recipe_row(recipe: str, mb: float, kld: float, fmt_in: str = "file") -> dict:
    return {"recipe": recipe, "runtime": "llama.cpp", "file_bytes": mb * 1e6, "weights_bytes": mb * 1e6, "weights_in": fmt_in,
            "kld_mean": kld, "kld_p99": kld * 5, "top1_agreement": 0.9, "ppl_delta_pct": 1.0,
            "domains_kld_mean": {"en": kld, "zh": kld}, "decode_tokens_per_s": 40.0, "prefill_tokens_per_s": 900.0,
            "ttft_s": 0.1, "peak_rss_bytes": 4e8, "bytes_read_per_token": mb * 1e6, "roofline_tokens_per_s": 80.0,
            "roofline_fraction": 0.5, "convert": {"wall_s": 1.0, "peak_rss_bytes": 1e9, "group": [recipe]}}


def test_recipe_sweep_marks_the_pareto_front_and_plots_every_recipe():
    result = {"model": "m", "rows": [_recipe_row("gguf:q8_0", 290, 0.003), _recipe_row("gguf:q4_k_m", 250, 0.005),
                                     _recipe_row("onnx:int8", 540, 0.07), _recipe_row("bnb:nf4", 240, 0.2, "memory")]}
    assert gemma_recipes.pareto(result) == ["gguf:q8_0", "gguf:q4_k_m", "bnb:nf4"]
    table = gemma_recipes.all_table(result)
    lines = table.splitlines()[2:]
    assert [line.split("`")[1] for line in lines] == ["bnb:nf4", "gguf:q4_k_m", "gguf:q8_0", "onnx:int8"]  # by size
    assert "★" not in lines[3] and "★" in lines[2]
    assert "(in memory)" in lines[0]
    svg = gemma_recipes.plot(result)
    assert svg.count('class="point"') == 4 and "pareto-front" in svg
