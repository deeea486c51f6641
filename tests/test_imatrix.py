"""Importance matrices: accumulated on the layer-streaming engine, written in llama.cpp's GGUF
imatrix format, used by llama.cpp's quantizer."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from quantkit.api import convert
from quantkit.cli import main
from quantkit.errors import RecipeError
from quantkit.recipe import parse_recipe


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
    """q3_k_m (an importance matrix by default below 5 bits): the same file type as
    q3_k_m+noimatrix, other codes (the errors weighed by the imatrix), the imatrix beside it; a
    user's imatrix file gives the same bytes as the one computed."""
    folder = tiny_model("qwen2")
    calib = {"calib_samples": 4, "calib_seqlen": 64}
    plain, weighted = convert(folder, ["gguf:q3_k_m+noimatrix", "gguf:q3_k_m"], tmp_path / "a", verify=False,
                              recipe_options=calib).artifacts
    assert weighted.recipe == "gguf:q3_k_m" and weighted.main_file.name.endswith("-Q3_K_M.gguf")
    assert plain.recipe == "gguf:q3_k_m+noimatrix" and plain.main_file.name.endswith("Q3_K_M+NOIMATRIX.gguf")
    file_type = int(gguf.LlamaFileType.MOSTLY_Q3_K_M)
    for art in (plain, weighted):
        assert gguf.GGUFReader(art.main_file).fields["general.file_type"].contents() == file_type
    assert plain.main_file.read_bytes() != weighted.main_file.read_bytes()
    info = weighted.manifest["details"]["imatrix"]
    assert (weighted.path / "imatrix.gguf").is_file() and info["calibration"]["samples"] == 4
    assert "imatrix" not in plain.manifest["details"]
    reused = convert(folder, ["gguf:q3_k_m"], tmp_path / "b", verify=False,
                     recipe_options={"imatrix": str(weighted.path / "imatrix.gguf")}).artifacts[0]
    assert reused.recipe == "gguf:q3_k_m" and reused.manifest["details"]["imatrix"]["sha256"] == info["sha256"]
    assert reused.main_file.read_bytes() == weighted.main_file.read_bytes()


def test_importance_matrix_is_computed_once_per_source_and_calibration(tiny_model, tmp_path, monkeypatch):
    """A second conversion of the same source and calibration takes the matrix from quantkit's
    cache (the model is not run again) and writes the same bytes; other calibration computes."""
    import quantkit.formats.gguf.imatrix as imatrix_module

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    folder, calib = tiny_model("llama"), {"calib_samples": 2, "calib_seqlen": 32}
    [first] = convert(folder, ["gguf:q4_k_s"], tmp_path / "a", verify=False, recipe_options=calib).artifacts
    computed = imatrix_module.compute_imatrix
    monkeypatch.setattr(imatrix_module, "compute_imatrix", lambda *a, **k: pytest.fail("computed again"))
    [again] = convert(folder, ["gguf:q3_k_s"], tmp_path / "b", verify=False, recipe_options=calib).artifacts
    assert (again.path / "imatrix.gguf").read_bytes() == (first.path / "imatrix.gguf").read_bytes()
    calls = []
    monkeypatch.setattr(imatrix_module, "compute_imatrix", lambda *a, **k: calls.append(1) or computed(*a, **k))
    convert(folder, ["gguf:q4_k_s"], tmp_path / "c", verify=False, recipe_options={**calib, "calib_samples": 3})
    assert calls == [1]


@pytest.mark.parametrize("recipe, options, scheme, imatrix", [
    ("gguf:q4_k_m", {}, "q4_k_m", "auto"),  # below 5 bits: an importance matrix by default
    ("gguf:q4_k_m+imatrix", {}, "q4_k_m", "auto"),  # the suffix says the default: dropped
    ("gguf:q4_k_m", {"imatrix": "none"}, "q4_k_m+noimatrix", None),
    ("gguf:q4_k_m+noimatrix", {"imatrix": "auto"}, "q4_k_m+noimatrix", None),  # the type's suffix wins
    ("gguf:q2_k", {}, "q2_k", "auto"),
    ("gguf:iq4_xs", {}, "iq4_xs", "auto"),
    ("gguf:q4_1", {}, "q4_1", None),  # 5.0 bits: plain by default
    ("gguf:q4_0", {}, "q4_0", None),  # the 4-bit type of few-type backends (CANN): plain, see DEFAULT_IMATRIX_SCHEMES
    ("gguf:q4_0+imatrix", {}, "q4_0+imatrix", "auto"),
    ("gguf:q6_k", {}, "q6_k", None),
    ("gguf:q6_k", {"imatrix": "auto"}, "q6_k+imatrix", "auto"),
    ("gguf:q6_k+noimatrix", {}, "q6_k", None),
    ("gguf:f16", {"imatrix": "auto"}, "f16", None),  # --imatrix leaves float types alone
    ("gguf:iq2_xs", {}, "iq2_xs", "auto"),
    ("gguf:q6_k+imatrix+noimatrix", {}, None, None),  # one suffix at most
])
def test_importance_matrix_defaults_and_names(recipe, options, scheme, imatrix):
    """The artifact's name carries +imatrix/+noimatrix exactly when a recipe departs from its
    type's default (a matrix below 5 bits per weight, none above)."""
    if scheme is None:
        with pytest.raises(RecipeError):
            parse_recipe(recipe, options)
        return
    parsed = parse_recipe(recipe, options)
    assert (parsed.scheme, parsed.option("imatrix")) == (scheme, imatrix)
    assert bool(parsed.option("calib_samples")) == (imatrix == "auto")


def test_gguf_source_falls_back_to_no_importance_matrix(tiny_model, tmp_path, capsys):
    """A GGUF source cannot be run on calibration text: the default is quantized without a matrix,
    saying so; the manifest records the recipe carried out."""
    [f16] = convert(tiny_model("qwen2"), ["gguf:f16"], tmp_path / "f16", verify=False).artifacts
    assert main(["convert", str(f16.main_file), "--to", "gguf:q4_k_m", "--no-verify", "-o", str(tmp_path / "q")]) == 0
    assert "no importance matrix" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "q" / f"{f16.main_file.stem}-q4_k_m+noimatrix" / "manifest.json").read_text())
    assert manifest["recipe"] == {"format": "gguf", "scheme": "q4_k_m+noimatrix", "options": {}}
    assert "imatrix" not in manifest["details"]


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
