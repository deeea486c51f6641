"""The layer-streaming engine: the same logits as the whole float32 model on every architecture,
one block in memory at a time, each block given its own mask and rotary embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantkit.runtimes.stream import LayerStream
from quantkit.source import resolve_source

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3"]


def _full_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _windows(vocab: int, lengths=(48, 17, 48)) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_the_whole_float32_model(tiny_model, arch):
    source = resolve_source(tiny_model(arch))
    windows = _windows(source.config["vocab_size"])  # windows of different lengths in one pass
    model = _full_model(source.path)
    got = list(LayerStream(source).logits(windows))
    assert len(got) == len(windows)
    with torch.inference_mode():
        for window, logits in zip(windows, got, strict=True):
            expected = model(input_ids=torch.tensor([window]), use_cache=False).logits[0].numpy()
            assert logits.shape == expected.shape and logits.dtype == np.float32
            assert np.abs(logits - expected).max() < 1e-4


def test_one_block_at_a_time_with_its_own_inputs(tiny_copy, monkeypatch):
    """Gemma 3 gives sliding-window and full-attention blocks different masks; each block must
    see the hidden states the whole model gives it, and only that block may hold weights."""
    import json

    import quantkit.runtimes.stream as stream

    folder = tiny_copy("gemma3")
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"]
    (folder / "config.json").write_text(json.dumps(config))
    source = resolve_source(folder)
    model = _full_model(source.path)
    # a window longer than the sliding window (16) so that the two masks differ
    windows = _windows(source.config["vocab_size"], lengths=(40, 24))
    engine = LayerStream(source)
    monkeypatch.setattr(stream, "HEAD_CHUNK_BYTES", 4 * 64 * 100)  # the head in chunks of 100 rows
    seen = []
    with torch.inference_mode():
        expected = [model(input_ids=torch.tensor([w]), output_hidden_states=True).hidden_states for w in windows]
        for step in engine.steps(windows):
            loaded = [i for i, block in enumerate(engine.blocks) if any(p.device.type != "meta" for p in block.parameters())]
            assert loaded == [step.index]
            for j, hidden in enumerate(step.inputs):
                assert torch.allclose(hidden, expected[j][step.index], atol=1e-5)
            seen.append(step.index)
    assert seen == list(range(source.config["num_hidden_layers"]))
    assert all(p.device.type == "meta" for p in engine.model.parameters())  # everything released
    logits = list(engine.logits(windows))
    with torch.inference_mode():
        for window, got in zip(windows, logits, strict=True):
            assert np.abs(got - model(input_ids=torch.tensor([window])).logits[0].numpy()).max() < 1e-4


def test_checkpoint_that_does_not_match_its_config(tiny_copy):
    import json

    from quantkit.errors import ConversionError

    folder = tiny_copy("llama")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"mlp\.gate_proj\.weight has shape .* config\.json implies"):
        list(LayerStream(resolve_source(folder)).logits([[1, 2, 3]]))


def test_dry_run_predicts_without_converting(tiny_model, tmp_path):
    import json

    from click.testing import CliRunner

    from quantkit.cli import cli

    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", str(tiny_model("qwen2")), "--to", "gguf:q4_k_m,gptq:w4g32,onnx:int4",
                                   "--dry-run", "--json", "-o", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["dry_run"] and result["artifacts"] == [] and not out.exists()
    peaks = {p["recipe"]: p for p in result["predicted_peaks"]}
    assert set(peaks) == {"gguf:q4_k_m", "gptq:w4g32", "onnx:int4"}
    for p in peaks.values():
        assert p["total_bytes"] == sum(p["terms"].values()) > 0 and p["phase"] in p["phases"]
    phases = peaks["gguf:q4_k_m"]["phases"]
    assert phases["verify"] > phases["quantize"]  # llama.cpp beside the reference outgrows quantizing
    assert "imatrix" in phases  # the importance matrix below 5 bits: the engine over the calibration windows
    no_verify = CliRunner().invoke(cli, ["convert", str(tiny_model("qwen2")), "--to", "gguf:q4_k_m+noimatrix", "--no-verify",
                                         "--dry-run", "--json"])
    assert json.loads(no_verify.output)["predicted_peaks"][0]["phase"] == "quantize"


def test_conversion_refused_when_the_prediction_exceeds_available_memory(tiny_model, tmp_path, monkeypatch, capsys):
    import quantkit.footprint as footprint
    from quantkit.cli import main

    monkeypatch.setattr(footprint, "available_memory_bytes", lambda: 10**6)
    out = tmp_path / "out"
    assert main(["convert", str(tiny_model("llama")), "--to", "gptq:w4g32-rtn", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predicted peak memory" in err and "0.0 GB available" in err and "--ignore-memory" in err
    assert not out.exists() or not any(out.iterdir())
    assert main(["-q", "convert", str(tiny_model("llama")), "--to", "gptq:w4g32-rtn", "--ignore-memory", "--no-verify",
                 "-o", str(out)]) == 0
