"""Property tests for every reader of bytes quantkit did not write: any mutation of a valid input
either parses or raises quantkit's input error (exit code 2) — never another exception.

Examples per reader: $QUANTKIT_FUZZ_EXAMPLES (default 200, derandomized, about 10 s for all seven here);
``make fuzz`` runs 2,000 random ones per reader (about 45 s here).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit.errors import InputError

EXAMPLES = int(os.environ.get("QUANTKIT_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("QUANTKIT_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- mutations ---------------------------------------------------------------------------------


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    """Flip, delete, insert, duplicate or truncate bytes, one to four times."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "dup", "zero8"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[at] ^= draw(st.integers(1, 255))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate":
            del out[at:]
        elif op == "dup":
            out[at:at] = out[at : at + draw(st.integers(1, 32))]
        elif op == "zero8":  # a length or count field set to 0 or to a huge value
            out[at : at + 8] = draw(st.sampled_from([b"\0" * 8, b"\xff" * 8, b"\x7f" + b"\xff" * 7]))
    return bytes(out)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def tree_mutations(draw, doc):
    """Replace, delete or retype values anywhere in a JSON-like document, one to three times."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        if not path:
            doc = draw(JSON_VALUES)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return doc


def _accepts_or_input_error(call) -> None:
    try:
        call()
    except InputError:
        pass


def _mutated_document(data, doc, dump) -> bytes:
    """A structural mutation of ``doc`` or a byte mutation of its text, half the time each."""
    if data.draw(st.booleans()):
        return dump(data.draw(tree_mutations(doc))).encode()
    return data.draw(byte_mutations(dump(doc).encode()))


def _read_file(name: str, raw: bytes, read) -> None:
    """Write ``raw`` as ``name`` in a fresh folder and read it: it parses or is an input error."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(raw)
        _accepts_or_input_error(lambda: read(path))


# -- valid inputs --------------------------------------------------------------------------------


def _safetensors_bytes() -> bytes:
    from safetensors.numpy import save

    return save({"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, dtype=np.float16)})


def _gguf_bytes() -> bytes:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_block_count(1)
        writer.add_file_type(1)
        writer.add_token_list(["<unk>", "a", "b"])
        writer.add_token_scores([0.0, -1.0, -2.0])
        writer.add_tensor("token_embd.weight", np.ones((3, 8), dtype=np.float16))
        writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def _manifest() -> dict:
    return {"manifest_version": 1, "recipe": {"format": "gguf", "scheme": "q8_0"}, "source": {"kind": "hf", "id": "x"},
            "tool_versions": {"quantkit": "0"}, "details": {}, "main_file": "m.gguf",
            "files": [{"path": "m.gguf", "bytes": 4, "sha256": "0" * 64}]}


POLICY = {"rules": {"kld_mean": {"max": 0.05}, "zh.top1_agreement": {"min": 0.9},
                    "rtx-4060-8gb.decode_tokens_per_s": {"min": 1}},
          "fits": ["rtx-4060-8gb"], "compatible": ["ascend-310p"], "baseline": {"tolerance_pct": 2}}


def _profile_yaml() -> str:
    from quantkit.hardware import profile_files

    return profile_files()["rtx-4060-8gb"].read_text(encoding="utf-8")


def _report() -> dict:
    # a real report of a tiny model (quantkit profile, committed as a format sample)
    return json.loads((Path(__file__).parent / "data" / "profile-report.json").read_text(encoding="utf-8"))


# -- the readers --------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_safetensors_header_reader(data):
    from quantkit.source import _read_safetensors_header

    valid = _safetensors_bytes()
    n = int.from_bytes(valid[:8], "little")
    if data.draw(st.booleans()):
        raw = data.draw(byte_mutations(valid))
    else:  # a structurally different header, with the rest of the file as it was
        header = data.draw(tree_mutations(json.loads(valid[8 : 8 + n])))
        text = json.dumps(header).encode()
        raw = len(text).to_bytes(8, "little") + text + valid[8 + n :]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(raw)
        _accepts_or_input_error(lambda: _read_safetensors_header(path))


@FUZZ
@given(data=st.data())
def test_safetensors_index_reader(data):
    from quantkit.source import _index_weights

    index = {"metadata": {"total_size": 68}, "weight_map": {"a.weight": "model-00001.safetensors", "b": "model-00001.safetensors"}}
    mutated = data.draw(tree_mutations(index))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "model-00001.safetensors").write_bytes(_safetensors_bytes())
        (folder / "model.safetensors.index.json").write_text(json.dumps(mutated))
        _accepts_or_input_error(lambda: _index_weights(folder, allow_pickle=False))


@FUZZ
@given(data=st.data())
def test_gguf_header_reader(data):
    from quantkit.formats.gguf.header import read_gguf_summary

    _read_file("m.gguf", data.draw(byte_mutations(_GGUF)), read_gguf_summary)


@FUZZ
@given(data=st.data())
def test_manifest_reader(data):
    from quantkit.artifact import check_artifact, read_manifest

    doc = data.draw(tree_mutations(_manifest()))
    raw = json.dumps(doc).encode() if data.draw(st.booleans()) else data.draw(byte_mutations(json.dumps(_manifest()).encode()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "m.gguf").write_bytes(b"GGUF")
        (folder / "manifest.json").write_bytes(raw)

        def read():
            check_artifact(folder, read_manifest(folder))

        _accepts_or_input_error(read)


@FUZZ
@given(data=st.data())
def test_policy_reader(data):
    import yaml

    from quantkit.gate import load_policy

    _read_file("policy.yaml", _mutated_document(data, POLICY, yaml.safe_dump), load_policy)


@FUZZ
@given(data=st.data())
def test_hardware_profile_reader(data):
    import yaml

    from quantkit.hardware import load_profile_file

    raw = _mutated_document(data, yaml.safe_load(_PROFILE), lambda doc: yaml.safe_dump(doc, allow_unicode=True))
    _read_file("rtx-4060-8gb.yaml", raw, load_profile_file)


@FUZZ
@given(data=st.data())
def test_profile_report_reader(data):
    from quantkit.gate import evaluate, load_policy, read_report

    raw = _mutated_document(data, _REPORT, json.dumps)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        path.write_bytes(raw)
        policy = Path(tmp) / "policy.yaml"
        policy.write_text("rules:\n  kld_mean: {max: 0.05}\n  en.top1_agreement: {min: 0.5}\n")

        def read_and_gate():  # what `quantkit gate` does with a report it was given
            evaluate([read_report(path)], load_policy(policy))

        _accepts_or_input_error(read_and_gate)


def test_valid_inputs_parse():
    """The unmutated inputs are accepted: the properties above start from valid data."""
    from quantkit.formats.gguf.header import read_gguf_summary
    from quantkit.gate import read_report

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.gguf").write_bytes(_GGUF)
        assert read_gguf_summary(Path(tmp) / "m.gguf")["tensor_count"] == 2
        (Path(tmp) / "r.json").write_text(json.dumps(_REPORT))
        assert read_report(Path(tmp) / "r.json")["schema_version"] == 1


_GGUF = _gguf_bytes()
_PROFILE = _profile_yaml()
_REPORT = _report()
