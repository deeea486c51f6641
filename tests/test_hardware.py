"""Hardware profiles: the shipped files, precise errors for broken ones, and what the profiler
says per target (fits, compatibility, estimates) on tiny artifacts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from quantkit.api import convert, list_profiles, profile, validate_profiles
from quantkit.cli import main
from quantkit.hardware import ProfileError, load_profile, load_profile_file, profile_files
from quantkit.hardware.schema import HardwareProfile

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("laptop-x86-16gb", "laptop-x86-8gb", "apple-m2-16gb", "raspberry-pi-5-8gb", "rtx-4060-8gb",
           "rtx-4090-24gb", "jetson-orin-nano-8gb", "ascend-310p", "ascend-910b")

NPU = """\
name: npu-test
kind: npu
memory:
  total_bytes: 25769803776
  bandwidth_bytes_per_s: 204.8e9
  reserved_bytes: 2000000000
compute:
  fp16: 70.0e12
  int8: 140.0e12
runtimes:
  - name: llama.cpp
    backend: cann
    formats: [gguf]
    quant_types: [f16, q8_0, q4_0]
  - name: atc
    backend: CANN
    formats: [onnx]
    quant_types: [fp32, fp16, int8-static]
constraints:
  static_shapes: true
  max_onnx_opset: 18
  onnx_domains: [ai.onnx]
compiler:
  name: atc
  soc_version: Ascend310P3
  command: atc --model={model} --framework=5 --output={output} --soc_version=Ascend310P3 --input_shape="{input_shape}"
"""


def test_shipped_profiles_validate():
    files = profile_files()
    assert set(SHIPPED) <= set(files), sorted(set(SHIPPED) - set(files))
    assert validate_profiles([files[name] for name in SHIPPED]) == {}
    rows = {r["name"]: r for r in list_profiles()}
    assert rows["host"]["file"] is None and rows["rtx-4090-24gb"]["kind"] == "gpu"
    ascend = load_profile("ascend-310p")
    assert ascend.constraints.static_shapes and ascend.compiler is not None
    cann = next(r for r in ascend.runtimes if "gguf" in r.formats)
    assert set(cann.quant_types) == {"f16", "q8_0", "q4_0"}


def test_shipped_schema_is_the_models():
    shipped = json.loads((REPO / "quantkit" / "report" / "schemas" / "hardware-profile.schema.json").read_text())
    assert shipped == HardwareProfile.model_json_schema()


BROKEN = [
    (("kind: npu", "kind: tpu"), 2, "kind: Input should be 'cpu', 'gpu', 'npu' or 'soc'"),
    (("  bandwidth_bytes_per_s: 204.8e9", "  bandwidth_bytes_per_s: -1"), 5, "memory.bandwidth_bytes_per_s: Input should be greater than 0"),
    (("  fp16: 70.0e12", "  fp8: 70.0e12"), 8, "compute.fp8: Input should be"),
    (("    formats: [gguf]", "    formats: [safetensors]"), 13, "runtimes[0].formats[0]: Input should be 'gguf'"),
    (("constraints:", "constraint:"), 20, "constraint: Extra inputs are not permitted"),
    (("  - name: atc\n", "  - name: atc\n    extra: 1\n"), 16, "runtimes[1].extra: Extra inputs are not permitted"),
    (("{output}", "{out}"), 26, "compiler.command: command must contain {output}"),
    (("name: npu-test", "name: other"), 1, "name: 'other' differs from the file name 'npu-test'"),
    (("  total_bytes: 25769803776\n", ""), 4, "memory.total_bytes: Field required"),
    (("compute:\n", "compute: [\n"), None, "not valid YAML"),
]


@pytest.mark.parametrize("mutation,line,message", BROKEN, ids=[b[2][:30] for b in BROKEN])
def test_broken_profiles_name_file_line_and_field(tmp_path, mutation, line, message):
    path = tmp_path / "npu-test.yaml"
    path.write_text(NPU.replace(*mutation))
    with pytest.raises(ProfileError) as err:
        load_profile_file(path)
    text = str(err.value)
    assert text.startswith(f"{path}:{line}: " if line else f"{path}:"), text
    assert message in text, text


def test_validate_command_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "npu-test.yaml", tmp_path / "npu-bad.yaml"
    good.write_text(NPU)
    bad.write_text(NPU.replace("name: npu-test", "name: npu-bad").replace("kind: npu", "kind: tpu"))
    assert main(["profiles", "validate", str(good)]) == 0
    assert main(["profiles", "validate", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(bad))}:2: kind:", err), err


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("hw")
    folder = tiny_model("llama")
    arts = convert(folder, ["gguf:q4_k_m", "gguf:q4_0", "onnx:int4", "onnx:int8"], out, verify=False).artifacts
    arts += convert(folder, ["onnx:int8-static", "onnx:fp16"], out, verify=False,
                    recipe_options={"static_shapes": True, "static_seqlen": 64, "calib_samples": 2}).artifacts
    return {a.recipe + ("-static" if a.path.name.endswith("-static") else ""): a for a in arts}


def _target(tiny_artifacts, recipe, npu_file):
    report = profile(tiny_artifacts[recipe].path, quality=False, latency=False, ctx=64, profiles=[str(npu_file)])
    return report["targets"][0]


def test_npu_compatibility(tiny_artifacts, tmp_path):
    npu = tmp_path / "npu-test.yaml"
    npu.write_text(NPU)
    q4km = _target(tiny_artifacts, "gguf:q4_k_m", npu)
    assert not q4km["compatible"] and any(r.startswith("quant type: GGUF tensor types") for r in q4km["reasons"])
    assert "gguf:q4_0" in q4km["compatible_recipes"]
    q40 = _target(tiny_artifacts, "gguf:q4_0", npu)
    # tiny rows (64) send llama.cpp's k-quant choices to q8_0/q4_0 fallbacks: all CANN types
    assert q40["compatible"] and q40["runtime"] == "llama.cpp (cann)", q40
    int4 = _target(tiny_artifacts, "onnx:int4", npu)
    assert not int4["compatible"] and any("com.microsoft::MatMulNBits" in r for r in int4["reasons"])
    dynamic = _target(tiny_artifacts, "onnx:int8", npu)
    assert any(r.startswith("dynamic shapes:") for r in dynamic["reasons"])
    for recipe in ("onnx:int8-static-static", "onnx:fp16-static"):
        static = _target(tiny_artifacts, recipe, npu)
        assert static["compatible"], (recipe, static["reasons"])
        assert "input_ids:1,64;attention_mask:1,64" in static["compile_command"]
        assert static["compile_command"].startswith("atc --model=model.onnx --framework=5")


def test_fits_and_estimates(tiny_artifacts, tmp_path):
    small = tmp_path / "npu-test.yaml"
    # memory for the weights and a handful of KV-cache tokens only
    art = tiny_artifacts["gguf:q4_0"]
    weights = art.file_bytes
    small.write_text(NPU.replace("25769803776", str(weights + 3_000_000)).replace("2000000000", "1000"))
    t = _target(tiny_artifacts, "gguf:q4_0", small)
    assert t["estimated"] and t["decode_tokens_per_s"] > 0 and t["prefill_tokens_per_s"] > 0
    assert t["fits"] == (t["needed_bytes"] <= t["usable_bytes"])
    assert 0 < t["max_ctx"] <= 512  # capped by the model's own context length
    # twice the bandwidth: twice the decode estimate
    fast = tmp_path / "fast" / "npu-test.yaml"
    fast.parent.mkdir()
    fast.write_text(NPU.replace("204.8e9", "409.6e9"))
    t1, t2 = _target(tiny_artifacts, "gguf:q4_0", tmp_path / "npu-test.yaml"), _target(tiny_artifacts, "gguf:q4_0", fast)
    assert t2["decode_tokens_per_s"] == pytest.approx(2 * t1["decode_tokens_per_s"], rel=1e-6)


def test_unknown_profile_fails_before_measuring(tiny_artifacts):
    from quantkit.errors import InputError

    with pytest.raises(InputError, match="unknown hardware profile 'nope'; known: host"):
        profile(tiny_artifacts["gguf:q4_0"].path, quality=False, profiles=["nope"])


def test_profiles_ship_in_the_wheel(tmp_path):
    """A user who pip-installs quantkit gets the same profiles as a checkout: the wheel carries
    them (quantkit/profiles links to the top-level profiles/) and the installed package finds them."""
    import os
    import shutil
    import subprocess
    import sys

    tree = tmp_path / "tree"  # a copy, so the build leaves nothing (build/, egg-info) in the checkout
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    shutil.copytree(REPO / "profiles", tree / "profiles")
    shutil.copytree(REPO / "quantkit", tree / "quantkit", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(tree)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("quantkit-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "QUANTKIT_PROFILES"} | {"PYTHONPATH": str(tmp_path / "site")}
    code = "from quantkit.hardware import profile_files; import json; print(json.dumps({k: str(v) for k, v in profile_files().items()}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    installed = json.loads(out)
    assert sorted(installed) == sorted(p.stem for p in (REPO / "profiles").glob("*.yaml"))
    assert all(Path(p).is_relative_to(tmp_path / "site") for p in installed.values())
