"""Importance matrices: accumulated on the layer-streaming engine, written in llama.cpp's GGUF
imatrix format, used by llama.cpp's quantizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from quantkit.api import convert
from quantkit.cli import main


def _direct_sums(folder, windows):
    """Sum of squared inputs per column of every block Linear, from the whole transformers model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sums, counts = {}, {}

    def hook(name):
        def record(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.register_forward_hook(hook(name + ".weight"))
    with torch.no_grad():
        for window in windows:
            model(torch.tensor([window]))
    return sums, counts


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_imatrix_is_the_sum_of_squared_inputs(arch, tiny_model):
    from quantkit.formats.gguf.imatrix import compute_imatrix
    from quantkit.source import resolve_source

    folder = tiny_model(arch)
    source = resolve_source(str(folder))
    rng = np.random.default_rng(0)
    windows = [[1, *rng.integers(3, 200, size=n).tolist()] for n in (20, 33, 7)]
    matrix = compute_imatrix(source, windows, datasets=["test"])
    sums, counts = _direct_sums(folder, windows)
    assert len(matrix.sums) == len(sums) == 2 * 7  # q k v o gate up down, two blocks
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GEMMA3, 2)
    for hf_name, expected in sums.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        np.testing.assert_allclose(matrix.sums[name], expected, rtol=1e-5)
        assert matrix.counts[name] == counts[hf_name] == sum(map(len, windows))
    assert matrix.chunk_size == 34


def test_imatrix_file_is_llama_cpps_format_and_reads_back(tmp_path):
    from quantkit.formats.gguf.imatrix import ImportanceMatrix

    sums = {"blk.0.attn_q.weight": np.arange(8, dtype=np.float64) + 0.5, "blk.0.ffn_down.weight": np.full(16, 2.0)}
    matrix = ImportanceMatrix(sums, {"blk.0.attn_q.weight": 1024, "blk.0.ffn_down.weight": 1024}, ["calib.txt"], 512)
    matrix.write(tmp_path / "imatrix.gguf")
    reader = gguf.GGUFReader(tmp_path / "imatrix.gguf")
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("general.architecture") is None
    assert reader.get_field("imatrix.datasets").contents() == ["calib.txt"]
    assert reader.get_field("imatrix.chunk_count").contents() == 2 and reader.get_field("imatrix.chunk_size").contents() == 512
    assert [t.name for t in reader.tensors] == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                                                "blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts"]
    again = ImportanceMatrix.read(tmp_path / "imatrix.gguf")
    assert again.counts == matrix.counts and again.digest() == matrix.digest()
    np.testing.assert_allclose(again.means()["blk.0.attn_q.weight"], sums["blk.0.attn_q.weight"] / 1024, rtol=1e-6)


def test_imatrix_changes_llama_cpps_choice_and_is_shipped(tiny_model, tmp_path):
    """q3_k_m+imatrix: the same file type, other codes (the errors weighed by the imatrix), the
    imatrix beside it; a user's imatrix file gives the same bytes as the one computed."""
    folder = tiny_model("qwen2")
    calib = {"calib_samples": 4, "calib_seqlen": 64}
    plain, weighted = convert(folder, ["gguf:q3_k_m", "gguf:q3_k_m+imatrix"], tmp_path / "a", verify=False,
                              recipe_options=calib).artifacts
    assert weighted.recipe == "gguf:q3_k_m+imatrix" and weighted.main_file.name.endswith("Q3_K_M+IMATRIX.gguf")
    file_type = int(gguf.LlamaFileType.MOSTLY_Q3_K_M)
    for art in (plain, weighted):
        assert gguf.GGUFReader(art.main_file).fields["general.file_type"].contents() == file_type
    assert plain.main_file.read_bytes() != weighted.main_file.read_bytes()
    info = weighted.manifest["details"]["imatrix"]
    assert (weighted.path / "imatrix.gguf").is_file() and info["calibration"]["samples"] == 4
    assert "imatrix" not in plain.manifest["details"]
    reused = convert(folder, ["gguf:q3_k_m"], tmp_path / "b", verify=False,
                     recipe_options={"imatrix": str(weighted.path / "imatrix.gguf")}).artifacts[0]
    assert reused.recipe == "gguf:q3_k_m+imatrix" and reused.manifest["details"]["imatrix"]["sha256"] == info["sha256"]
    assert reused.main_file.read_bytes() == weighted.main_file.read_bytes()


def test_i_quants_need_an_importance_matrix(tiny_model, tmp_path, capsys):
    folder = tiny_model("qwen2")
    assert main(["-q", "convert", str(folder), "--to", "gguf:iq2_xs", "--imatrix", "none", "-o", str(tmp_path)]) == 2
    assert "needs an importance matrix" in capsys.readouterr().err
    assert main(["-q", "convert", str(folder), "--to", "gguf:f16+imatrix", "-o", str(tmp_path)]) == 2
    assert "not quantized" in capsys.readouterr().err
    damaged = tmp_path / "imatrix.gguf"  # a GGUF header whose first string runs past the end
    damaged.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(200)))
    assert main(["-q", "convert", str(folder), "--to", "gguf:q4_0", "--imatrix", str(damaged), "--no-verify", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt or truncated GGUF" in err[0]
