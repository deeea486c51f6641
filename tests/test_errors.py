"""Bad input gets its own error class and leaves no output behind."""

from __future__ import annotations

import json

import pytest

from quantkit.api import convert
from quantkit.errors import (
    PickleRefusedError,
    RecipeError,
    SourceError,
    TokenizerError,
    UnsupportedArchitectureError,
)


def _left_behind(out):
    return sorted(p.name for p in out.rglob("*")) if out.exists() else []


def test_corrupt_safetensors(tiny_copy, tmp_path):
    src = tiny_copy()
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(SourceError, match="corrupt safetensors header"):
        convert(src, ["gguf:f16"], tmp_path / "out")
    assert _left_behind(tmp_path / "out") == []


def test_truncated_safetensors(tiny_copy, tmp_path):
    src = tiny_copy()
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(SourceError, match="truncated"):
        convert(src, ["gguf:f16"], tmp_path / "out")
    assert _left_behind(tmp_path / "out") == []


def test_tensor_byte_range_must_match_its_shape(tiny_copy, tmp_path):
    """The GGUF writer reads tensors at the header's offsets: a header whose byte range disagrees
    with the shape (the file size still adds up) is refused, not read as shifted data."""
    src = tiny_copy()
    path = src / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    header[name]["shape"] = [header[name]["shape"][0] // 2, header[name]["shape"][1]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(SourceError, match=f"tensor '{name}' has"):
        convert(src, ["gguf:f16"], tmp_path / "out")
    assert _left_behind(tmp_path / "out") == []
    # ranges that do not tile the data (a gap, then an overlap), with the file size still right
    header = json.loads(data[8 : 8 + n])
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    header[first]["data_offsets"][0] += 4
    header[second]["data_offsets"][0] -= 4
    header[second]["data_offsets"][1] -= 4
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(SourceError, match=f"tensor '{first}' starts at byte 4"):
        convert(src, ["gguf:f16"], tmp_path / "out")


def test_truncated_gguf(tiny_model, tmp_path):
    art = convert(tiny_model("llama"), ["gguf:f16"], tmp_path / "a", verify=False).artifacts[0]
    cut = tmp_path / "cut.gguf"
    data = art.main_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="truncated"):
        convert(cut, ["gguf:q4_0"], tmp_path / "out")
    assert _left_behind(tmp_path / "out") == []


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(SourceError, match="not a GGUF file"):
        convert(bad, ["gguf:q4_0"], tmp_path / "out")


def test_unknown_architecture(tiny_copy, tmp_path):
    src = tiny_copy()
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="FancyNewForCausalLM.*supported: .*Gemma3ForCausalLM.*Qwen3MoeForCausalLM"):
        convert(src, ["gguf:f16"], tmp_path / "out")
    assert _left_behind(tmp_path / "out") == []


def test_missing_tokenizer(tiny_copy, tmp_path):
    src = tiny_copy()
    for name in ("tokenizer.json", "tokenizer.model"):
        (src / name).unlink(missing_ok=True)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        convert(src, ["gguf:f16"], tmp_path / "out")
    assert _left_behind(tmp_path / "out") == []


def test_pickle_only_checkpoint_is_refused_then_allowed(tiny_copy, tmp_path):
    import torch
    from safetensors.torch import load_file

    src = tiny_copy()
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        convert(src, ["gguf:f16"], tmp_path / "out")
    assert _left_behind(tmp_path / "out") == []
    art = convert(src, ["gguf:f16"], tmp_path / "out", allow_pickle=True).artifacts[0]
    assert art.manifest["details"]["verification"]["kld_mean"] < 1e-3


def test_unknown_unknown_recipe_lists_known():
    with pytest.raises(RecipeError, match="q4_k_m"):
        convert(None, ["gguf:q9_z"])
    with pytest.raises(RecipeError, match="known formats: .*gguf"):
        convert(None, ["tflite:int8"])


def test_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SourceError) as info:
        convert("nobody-here/no-such-model", ["gguf:f16"], tmp_path / "out")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_missing_path(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        convert(tmp_path / "nowhere", ["gguf:f16"], tmp_path / "out")


def test_interrupt_leaves_no_finished_looking_artifact(tiny_model, tmp_path, monkeypatch):
    import quantkit.formats.gguf as gguf_format

    def interrupted(*args, **kwargs):
        dst = args[1]
        dst.write_bytes(b"GGUF half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_format, "quantize_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_model("llama"), ["gguf:q4_0"], tmp_path / "out", verify=False)
    assert _left_behind(tmp_path / "out") == []
