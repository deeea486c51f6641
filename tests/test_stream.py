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
