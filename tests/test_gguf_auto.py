"""gguf:auto: per-tensor llama.cpp types under a size budget, from measured sensitivities."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from quantkit.api import convert
from quantkit.cli import main
from quantkit.errors import RecipeError
from quantkit.formats.gguf.auto import _LABEL, budget_label, group_of, knapsack, parse_budget
from quantkit.formats.gguf.quantize import QUANT_SCHEMES


def _brute_force(items, capacity):
    best = None
    for picks in itertools.product(*(range(len(options)) for options in items)):
        weight = sum(items[k][j][0] for k, j in enumerate(picks))
        cost = sum(items[k][j][1] for k, j in enumerate(picks))
        if weight <= capacity and (best is None or cost < best[0]):
            best = (cost, picks)
    return best


def test_knapsack_finds_the_optimum_of_hand_built_tables():
    # a table where taking the cheapest option per item greedily by cost/byte is not optimal
    items = [[(2, 9.0), (4, 4.0), (8, 0.5)], [(2, 6.0), (3, 5.0), (6, 1.0)], [(1, 3.0), (5, 0.0)]]
    picks = knapsack(items, 12)
    assert picks == list(_brute_force(items, 12)[1]) == [1, 2, 0]
    assert knapsack(items, 4) is None  # the lightest mix weighs 5
    rng = np.random.default_rng(0)
    for _ in range(40):
        table = [[(int(w), float(c)) for w, c in zip(rng.integers(1, 9, n), rng.random(n) * 10, strict=True)]
                 for n in rng.integers(1, 5, size=rng.integers(1, 6))]
        capacity = int(rng.integers(0, 30))
        expected, picks = _brute_force(table, capacity), knapsack(table, capacity)
        if expected is None:
            assert picks is None
        else:
            assert sum(table[k][j][0] for k, j in enumerate(picks)) <= capacity
            assert sum(table[k][j][1] for k, j in enumerate(picks)) == pytest.approx(expected[0])


def test_budgets_and_groups_parse():
    assert parse_budget("4.5bpw") == {"target_bpw": 4.5}
    assert parse_budget("240MB") == {"target_size": 240_000_000}
    assert parse_budget("1.5GiB") == {"target_size": 1_610_612_736}
    assert budget_label(parse_budget("1.5GiB")) == "1536mib" and budget_label(parse_budget("240MB")) == "240mb"
    for bad in ("0.5bpw", "much", "-3MB"):
        with pytest.raises(RecipeError):
            parse_budget(bad)
    assert [group_of(f"blk.{i}.attn_q.weight", 18) for i in (0, 5, 6, 17)] == ["attn_q[0-5]"] * 2 + ["attn_q[6-11]", "attn_q[12-17]"]
    assert group_of("token_embd.weight", 18) == "token_embd"


def test_auto_respects_the_budget_end_to_end(tiny_model, tmp_path):
    """Two budgets in one run share one analysis; each file fits its budget, carries the types the
    manifest lists, and the predicted and measured KLD are recorded; a tighter budget gives a
    smaller file."""
    folder = tiny_model("llama")
    opts = {"calib_samples": 4, "calib_seqlen": 64, "probe_windows": 2}
    small, large = convert(folder, ["gguf:auto-5bpw", "gguf:auto-7bpw"], tmp_path / "a", verify=False,
                           recipe_options=opts).artifacts
    sizes = []
    for art, bpw in ((small, 5.0), (large, 7.0)):
        info = art.manifest["details"]["auto"]
        reader = gguf.GGUFReader(art.main_file)
        params = sum(int(t.n_elements) for t in reader.tensors)
        tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
        assert 8 * tensor_bytes / params <= bpw and info["bpw"] == pytest.approx(8 * tensor_bytes / params, abs=1e-3)
        assert art.main_file.stat().st_size == info["predicted_file_bytes"]
        assert {t.name: t.tensor_type.name.lower() for t in reader.tensors if t.name in info["types"]} == info["types"]
        assert len(info["types"]) == 2 * 7 + 2  # every block matrix, the embedding and the head
        assert np.isfinite(info["predicted_kld"]) and info["measured_kld"] > 0 and info["measured_kld_stderr"] > 0
        assert set(info["groups"]) >= {"attn_q[0-0]", "ffn_down[1-1]", "token_embd", "output"}
        assert (art.path / "imatrix.gguf").is_file()
        sizes.append(art.main_file.stat().st_size)
        # labelled with the file type of the tensor type that holds the most bytes
        by_bytes: dict[str, int] = {}
        for t in reader.tensors:
            if t.name in info["types"]:
                by_bytes[info["types"][t.name]] = by_bytes.get(info["types"][t.name], 0) + int(t.n_bytes)
        label = _LABEL[max(sorted(by_bytes), key=by_bytes.__getitem__)]
        assert reader.fields["general.file_type"].contents() == int(QUANT_SCHEMES[label])
    assert sizes[0] < sizes[1]
    assert len(set(small.manifest["details"]["auto"]["types"].values())) >= 2  # a mix, not one type
    # the same budget twice gives the same bytes
    again = convert(folder, ["gguf:auto-5bpw"], tmp_path / "b", verify=False, recipe_options=opts).artifacts[0]
    assert again.main_file.read_bytes() == small.main_file.read_bytes()


def test_auto_refuses_what_it_cannot_do(tiny_model, tmp_path, capsys):
    folder = tiny_model("llama")
    assert main(["-q", "convert", str(folder), "--to", "gguf:auto", "-o", str(tmp_path)]) == 2
    assert "needs one budget" in capsys.readouterr().err
    assert main(["-q", "convert", str(folder), "--to", "gguf:auto-1bpw", "--calib-samples", "2", "--calib-seqlen", "32",
                 "--no-verify", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the smallest mix" in err[0]
    assert not any((tmp_path / "o").glob("*auto*"))
    # a GGUF source has no float model to measure sensitivities against
    [f16] = convert(folder, ["gguf:f16"], tmp_path / "f", verify=False).artifacts
    assert main(["-q", "convert", str(f16.main_file), "--to", "gguf:auto-6bpw", "--imatrix", str(tmp_path / "none.gguf"),
                 "-o", str(tmp_path / "g")]) == 2
    assert main(["-q", "convert", str(f16.main_file), "--to", "gguf:auto-6bpw", "-o", str(tmp_path / "g")]) == 2
    assert "measures sensitivities against the float model" in capsys.readouterr().err


def test_planner_recommends_auto_where_q8_0_does_not_fit(tiny_model, tmp_path):
    """A board whose memory holds the tiny model at about 6 bits per weight but not at q8_0's 8.5:
    the planner adds gguf:auto at the most bits that fit, converts it and can recommend it."""
    import quantkit.api as api
    from quantkit.hardware import load_profile
    from quantkit.hardware.estimate import estimate_target
    from quantkit.plan import CANDIDATES, Candidate, _facts, _shape, auto_candidate, plan
    from quantkit.source import resolve_source

    folder = tiny_model("llama")
    shape = _shape(resolve_source(str(folder)))
    board = tmp_path / "small-board.yaml"

    def write(total: int) -> None:
        board.write_text(
            f"name: small-board\nkind: soc\nmemory: {{total_bytes: {total}, bandwidth_bytes_per_s: 1.0e10, reserved_bytes: 0}}\n"
            "compute: {fp32: 1.0e10}\nruntimes:\n  - {name: llama.cpp, backend: cpu, formats: [gguf], quant_types: null}\n")

    write(10**9)
    needed = {bpw: estimate_target(_facts(Candidate("gguf:x", bpw, bpw), shape, False), load_profile(str(board)), 128,
                                   None)["needed_bytes"] for bpw in (6.0, 8.5)}
    write((needed[6.0] + needed[8.5]) // 2)
    sized = auto_candidate(shape, load_profile(str(board)), False, 128)
    assert sized is not None and 6.0 <= sized.bits_per_weight < 8.5
    # the table's q8_0 and the sized gguf:auto (the others would be estimated faster and win first)
    result = plan(str(folder), str(board), tmp_path / "plan", max_kld=10.0, ctx=128, convert=api.convert,
                  profile=api.profile, candidates=tuple(c for c in CANDIDATES if c.recipe == "gguf:q8_0"))
    statuses = {c["recipe"]: c["status"] for c in result["candidates"]}
    assert statuses["gguf:q8_0"].startswith("pruned: does not fit") and sized.recipe in statuses
    auto_row = next(c for c in result["candidates"] if c["recipe"] == sized.recipe)
    assert auto_row["status"] == "qualifies" and result["recommendation"]["recipe"] == sized.recipe
    manifest = json.loads((Path(auto_row["artifact"]) / "manifest.json").read_text())
    assert auto_row["fits"] and manifest["details"]["auto"]["bpw"] <= sized.bits_per_weight
