"""Never crash, never leave debris, never write what llama.cpp cannot load (issue 14): native
aborts in a child process, checkpoints llama.cpp would refuse, killed runs, damaged artifacts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantkit.api import convert
from quantkit.cli import main
from quantkit.errors import NativeError, TokenizerError


def _left_behind(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*")) if out.exists() else []


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# -- native aborts ---------------------------------------------------------------------------------


def test_native_abort_in_child_is_exit_1_with_llama_cpp_message(tiny_model, tmp_path, monkeypatch, capsys):
    """A GGUF whose vocabulary fails llama.cpp's own check (a duplicated token: GGML_ASSERT in
    llama_vocab::impl::load) aborts the child that loads it; quantkit exits 1 with llama.cpp's line
    and leaves nothing in the output folder."""
    import quantkit.formats.gguf.vocab as vocab_module

    monkeypatch.setattr(vocab_module.GGUFVocab, "validate", lambda self, where: None)  # quantkit's own check off
    real_load = vocab_module.load_vocab

    def duplicated(folder, config):
        vocab = real_load(folder, config)
        vocab.tokens[101] = vocab.tokens[100]
        return vocab

    monkeypatch.setattr("quantkit.formats.gguf.writer.load_vocab", duplicated)
    out = tmp_path / "out"
    model = tiny_model("llama")
    capsys.readouterr()  # what building the session's tiny model printed, when this test builds it
    code = main(["-q", "convert", str(model), "--to", "gguf:f16", "--no-verify", "-o", str(out)])
    line = _one_error_line(capsys)
    assert code == 1
    assert "GGML_ASSERT" in line and "llama-vocab.cpp" in line and "SIGABRT" in line, line
    assert _left_behind(out) == []
    # with verification on, the same abort happens in the child that probes the load
    with pytest.raises(NativeError, match="GGML_ASSERT"):
        convert(tiny_model("llama"), ["gguf:f16"], out)
    assert _left_behind(out) == []


def test_isolated_child_reports_signal_and_message():
    from quantkit.isolate import native_message, run_isolated

    with pytest.raises(NativeError, match=r"demo failed: .*boom.* \(SIGABRT\)"):
        run_isolated("quantkit.isolate:_abort_for_tests", {"message": "boom"}, what="demo")
    text = "llama_model_load: loading\n/build/llama.cpp/src/llama-vocab.cpp:2544: GGML_ASSERT(x == y) failed\n#0 0x7f\n"
    assert native_message(text) == "llama-vocab.cpp:2544: GGML_ASSERT(x == y) failed"


# -- the checkpoint transformers writes from a GGUF ----------------------------------------------------


def test_checkpoint_saved_by_transformers_from_a_gguf_is_refused_in_one_line(tiny_model, tmp_path, capsys):
    """AutoModel/AutoTokenizer.from_pretrained(gguf_file=...) then save_pretrained: a Unigram
    tokenizer.json and the GGUF itself copied as tokenizer.model. llama.cpp aborted on the GGUF
    quantkit used to write from it; now the conversion is refused before anything is written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    art = convert(tiny_model("gemma3"), ["gguf:f32"], tmp_path / "gguf", verify=False).artifacts[0]
    saved = tmp_path / "from-gguf"
    model = AutoModelForCausalLM.from_pretrained(art.path, gguf_file=art.main_file.name)
    model.hf_quantizer = None  # transformers 5 refuses to save a GGUF-loaded model otherwise
    del model.config.quantization_config
    model.save_pretrained(saved)
    AutoTokenizer.from_pretrained(art.path, gguf_file=art.main_file.name).save_pretrained(saved)
    # transformers 4 wrote a Unigram tokenizer.json and the GGUF as tokenizer.model; transformers 5
    # writes a BPE tokenizer.json with its Gemma special tokens appended past the embedding
    unigram = json.loads((saved / "tokenizer.json").read_text())["model"]["type"] == "Unigram"
    expected = "convert the original .gguf" if unigram else "beyond the embedding: <bos>, <eos>, <pad>, <mask>"

    out = tmp_path / "out"
    with pytest.raises(TokenizerError):
        convert(saved, ["gguf:f16"], out, verify=False)
    assert _left_behind(out) == []
    capsys.readouterr()  # transformers' own progress bar from loading the GGUF above
    assert main(["-q", "convert", str(saved), "--to", "gguf:f16", "-o", str(out)]) == 2
    assert expected in _one_error_line(capsys)
    assert _left_behind(out) == []


# -- killed runs --------------------------------------------------------------------------------------


def _processes_with(tag: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if tag.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_leaves_only_hidden_partials_which_the_next_run_removes(tiny_model, tmp_path):
    out = tmp_path / "out"
    tag = f"QUANTKIT_TEST_TAG={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    cmd = [sys.executable, "-m", "quantkit.cli", "-q", "convert", str(tiny_model("llama")),
           "--to", "gguf:q8_0", "--to", "gguf:q4_0", "-o", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".") and ".quantkit-partial-" in p.name for p in (out.iterdir() if out.exists() else [])):
        assert proc.poll() is None and time.monotonic() < deadline, "conversion ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _left_behind(out)
    assert left and all(name.startswith(".") and ".quantkit-partial-" in name for name in os.listdir(out)), left
    # no worker outlives the killed run (children die with their parent)
    deadline = time.monotonic() + 10
    while _processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(tag) == []
    result = subprocess.run(cmd[:-4] + ["--to", "gguf:q8_0", "--no-verify", "-o", str(out)], env=env,
                            capture_output=True, text=True, check=True)
    assert "removed" in result.stderr and "left by killed runs" in result.stderr, result.stderr
    assert sorted(os.listdir(out)) == ["llama-q8_0"]


def test_stale_partials_of_live_processes_are_kept(tiny_model, tmp_path):
    from quantkit.artifact import remove_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    (out / f".x-q4_0.quantkit-partial-{dead.pid}").mkdir(parents=True)
    (out / f".x-q4_0.quantkit-partial-{dead.pid}" / "x.gguf").write_bytes(b"\0" * 1000)
    (out / f".quantkit-work.quantkit-partial-{dead.pid}").mkdir()
    live = out / f".y.quantkit-partial-{os.getppid()}"  # pytest's parent: alive
    live.mkdir()
    (out / "visible.quantkit-partial-1").mkdir()  # not hidden: not quantkit's, never touched
    (out / f".zshrc.old-{dead.pid}").write_text("a user's file")  # someone else's naming: never touched
    # killed between "artifact -> .old" and ".partial -> artifact": the old artifact comes back
    (out / f".z-q8_0.quantkit-old-{dead.pid}").mkdir()
    assert remove_stale(out) == (2, 1000)
    assert sorted(os.listdir(out)) == sorted([live.name, "visible.quantkit-partial-1", f".zshrc.old-{dead.pid}", "z-q8_0"])


def test_sigterm_cleans_up_like_ctrl_c(tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "quantkit.cli", "-q", "convert", str(tiny_model("llama")),
                             "--to", "gguf:q8_0", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.exists() and any(".quantkit-partial-" in n for n in os.listdir(out))):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err)
    assert os.listdir(out) == []


def test_a_swallowed_interrupt_still_stops_before_publishing(tiny_model, tmp_path):
    """A SIGTERM whose KeyboardInterrupt is raised where Python swallows it (inside a __del__ or a
    weakref callback: "Exception ignored in ...", seen in CI during an import) must not let the
    run publish its artifact: it ends interrupted, exit 130, nothing left."""
    out = tmp_path / "out"
    (tmp_path / "swallowed.py").write_text(
        "import os, signal, sys\n"
        "import quantkit.cli as cli\n"
        "import quantkit.formats.gguf as writer\n"
        "original = writer.write_float_gguf\n"
        "class Swallow:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # the handler's KeyboardInterrupt is raised in here\n"
        "        sum(range(1000))\n"
        "def write(*args, **kwargs):\n"
        "    Swallow()\n"
        "    return original(*args, **kwargs)\n"
        "writer.write_float_gguf = write\n"
        f"sys.exit(cli.main(['-q', 'convert', {str(tiny_model('llama'))!r}, '--to', 'gguf:q8_0', '--no-verify', '-o', {str(out)!r}]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "swallowed"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "Exception ignored" in proc.stderr  # the interrupt was indeed swallowed
    assert proc.returncode == 130 and "interrupted" in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    assert not out.exists() or os.listdir(out) == []


def test_interrupt_inside_exec_still_exits_130(tmp_path):
    # a signal that lands while a dataclass or namedtuple is being built (an exec() of a string)
    # made `python -m quantkit.cli` die by SIGINT after a clean, handled interrupt
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import quantkit.cli as cli\n"
        "def main(argv=None):\n"
        "    try:\n"
        "        exec('raise KeyboardInterrupt')\n"
        "    except KeyboardInterrupt:\n"
        "        return 130\n"
        "cli.main = main\n"
        "cli.entry()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, env=env, capture_output=True)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)


# -- damaged artifacts and other bad input: exit 2, one line ---------------------------------------------


@pytest.fixture(scope="module")
def good_artifact(tiny_model, tmp_path_factory):
    return convert(tiny_model("llama"), ["gguf:q8_0"], tmp_path_factory.mktemp("good"), verify=False).artifacts[0]


@pytest.fixture(scope="module")
def good_report(good_artifact, tmp_path_factory):
    from quantkit.api import profile

    path = tmp_path_factory.mktemp("report") / "report.json"
    path.write_text(json.dumps(profile(good_artifact.path, eval_data=["en"], ctx=64, chunks=1, latency=False)))
    return path


def _manifest_edit(edit):
    def damage(art: Path) -> None:
        manifest = json.loads((art / "manifest.json").read_text())
        edit(manifest)
        (art / "manifest.json").write_text(json.dumps(manifest))
    return damage


def _gguf_of(art: Path) -> Path:
    return next(art.glob("*.gguf"))


def _truncate(art: Path) -> None:
    data = _gguf_of(art).read_bytes()
    _gguf_of(art).write_bytes(data[: len(data) // 2])


def _flip_byte(art: Path) -> None:
    data = bytearray(_gguf_of(art).read_bytes())
    data[-10] ^= 0xFF
    _gguf_of(art).write_bytes(bytes(data))


ARTIFACT_DAMAGE = {
    "manifest without files": (_manifest_edit(lambda m: m.pop("files")), "lacks files"),
    "manifest without recipe": (_manifest_edit(lambda m: m.pop("recipe")), "lacks recipe"),
    "manifest not JSON": (lambda a: (a / "manifest.json").write_text("{oops"), "not a readable manifest"),
    "manifest a list": (lambda a: (a / "manifest.json").write_text("[]"), "JSON object"),
    "file entry without sha256": (_manifest_edit(lambda m: m["files"][0].pop("sha256")), "sha256"),
    "file entry escaping the folder": (_manifest_edit(lambda m: m["files"][0].update(path="../x.gguf")), "outside"),
    "main_file not listed": (_manifest_edit(lambda m: m.update(main_file="other.gguf")), "main_file"),
    "unknown format": (_manifest_edit(lambda m: m["recipe"].update(format="tflite")), "unknown artifact format"),
    "truncated weights": (_truncate, "truncated or replaced"),
    "sha256 mismatch": (_flip_byte, "sha256 differs"),
    "extra file": (lambda a: (a / "notes.txt").write_text("hi"), "does not list: notes.txt"),
    "missing file": (lambda a: _gguf_of(a).unlink(), "missing file"),
}


@pytest.mark.parametrize("case", list(ARTIFACT_DAMAGE))
def test_damaged_artifact_to_profile_is_exit_2(case, good_artifact, tmp_path, capsys):
    art = tmp_path / good_artifact.path.name
    shutil.copytree(good_artifact.path, art)
    damage, expected = ARTIFACT_DAMAGE[case]
    damage(art)
    assert main(["-q", "profile", str(art), "--no-latency", "--chunks", "1"]) == 2
    line = _one_error_line(capsys)
    assert expected in line, line


def test_no_check_skips_only_the_hashes(good_artifact, tmp_path, capsys):
    art = tmp_path / good_artifact.path.name
    shutil.copytree(good_artifact.path, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"][0]["sha256"] = "0" * 64  # a wrong hash, the file itself intact
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert main(["-q", "profile", str(art), "--no-latency", "--chunks", "1"]) == 2
    assert "sha256 differs" in _one_error_line(capsys)
    assert main(["-q", "profile", str(art), "--no-latency", "--chunks", "1", "--no-check", "--eval-data", "en"]) == 0


def _bad_inputs(tmp: Path, artifact: Path, report: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, text the one error line must contain)."""
    def write(name: str, text: str) -> str:
        path = tmp / name
        path.write_text(text)
        return str(path)

    data = artifact.joinpath(_gguf_of(artifact).name).read_bytes()
    cut = tmp / "cut.gguf"
    cut.write_bytes(data[: len(data) // 3])
    notgguf = tmp / "zip.gguf"
    notgguf.write_bytes(b"PK\x03\x04")
    broken = json.loads(report.read_text())
    broken["quality"] = "none"
    policy = write("ok.yaml", "rules:\n  kld_mean: {max: 5}\n")
    plan_dir = tmp / "plan"
    plan_dir.mkdir()
    (plan_dir / "plan-state.json").write_text("{not json")
    return {
        "profile: bare GGUF truncated": (["profile", str(cut)], "truncated"),
        "profile: bare file not GGUF": (["profile", str(notgguf)], "not a GGUF file"),
        "profile: no such path": (["profile", str(tmp / "nowhere")], "no such artifact"),
        "profile: folder without manifest": (["profile", str(tmp)], "no manifest.json"),
        "profile: unknown hardware profile": (["profile", str(artifact), "--profile", "no-such-box"], "no-such-box"),
        "profile: calibrate-from not a report": (["profile", str(artifact), "--calibrate-from", policy], "not a profile report"),
        "profile: eval data file missing": (["profile", str(artifact), "--eval-data", str(tmp / "none.txt")], "none.txt"),
        "gate: report not JSON": (["gate", write("r.json", "{"), "--policy", policy], "not a readable profile report"),
        "gate: report breaks the schema": (["gate", write("r2.json", json.dumps(broken)), "--policy", policy], "schema at quality"),
        "gate: policy not YAML": (["gate", str(report), "--policy", write("p.yaml", "rules: [")], "cannot read the policy"),
        "gate: policy with unknown metric": (["gate", str(report), "--policy", write("p2.yaml", "rules:\n  speed_of_light: {max: 1}\n")], "speed_of_light"),
        "gate: policy missing": (["gate", str(report), "--policy", str(tmp / "none.yaml")], "none.yaml"),
        "gate: damaged baseline": (["gate", str(report), "--policy", write("p3.yaml", "baseline: {tolerance_pct: 1}\n"),
                                    "--baseline", write("b.json", "[]")], "b.json"),
        "gate: report missing": (["gate", str(tmp / "none.json"), "--policy", policy], "none.json"),
        "plan: damaged plan state": (["plan", str(artifact.parent), "--profile", "raspberry-pi-5-8gb", "-o", str(plan_dir)], None),
        "plan: unknown profile": (["plan", "--profile", "no-such-box", "-o", str(tmp / "p")], "no-such-box"),
        "plan: broken profile file": (["plan", "--profile", write("box.yaml", "name: box\nkind: [\n"), "-o", str(tmp / "p")], "box.yaml"),
        "profiles validate: YAML syntax": (["profiles", "validate", write("a.yaml", "name: a\nkind: [\n")], "a.yaml:"),
        "profiles validate: missing fields": (["profiles", "validate", write("b.yaml", "name: b\n")], "b.yaml"),
        "profiles validate: wrong type": (["profiles", "validate", write("c.yaml", "name: c\nkind: cpu\nmemory: 12\n")], "c.yaml"),
        "profiles validate: no such file": (["profiles", "validate", str(tmp / "none.yaml")], "none.yaml"),
        "profiles show: unknown name": (["profiles", "show", "no-such-box"], "no-such-box"),
    }


def test_bad_inputs_table_each_exit_2_one_line(good_artifact, good_report, tmp_path, capsys, tiny_model):
    cases = _bad_inputs(tmp_path, good_artifact.path, good_report)
    # the plan case needs an HF source: point it at the tiny checkpoint
    argv, _ = cases["plan: damaged plan state"]
    cases["plan: damaged plan state"] = ([argv[0], str(tiny_model("llama")), *argv[2:]], "plan-state.json")
    assert len(cases) + len(ARTIFACT_DAMAGE) >= 32
    failures = []
    for name, (argv, expected) in cases.items():
        code = main(["-q", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        if code != 2 or len(err) != 1 or (expected and expected not in err[0]):
            failures.append((name, code, err))
    assert failures == []


def test_vocabulary_without_byte_tokens_is_refused_before_llama_cpp_sees_it(tiny_copy, tmp_path, capsys):
    """A byte-fallback vocabulary lacking a <0xNN> token: llama.cpp's tokenizer looks bytes up
    with unordered_map::at and the uncaught exception aborts the process (seen with a tokenizer
    transformers 5 converted badly). quantkit refuses it in one line, writing nothing."""
    folder = tiny_copy("llama")
    (folder / "tokenizer.model").unlink(missing_ok=True)  # the vocabulary comes from tokenizer.json
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["<0xE6>-gone"] = vocab.pop("<0xE6>")  # same ids; byte 0xE6 (starts many CJK characters) has no token
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "out"
    with pytest.raises(TokenizerError, match="no token for 1 of the 256 bytes"):
        convert(folder, ["gguf:f16"], out, verify=False)
    capsys.readouterr()  # the fixture's own progress bars
    assert main(["-q", "convert", str(folder), "--to", "gguf:f16", "-o", str(out)]) == 2
    assert "0xE6" in _one_error_line(capsys)
    assert _left_behind(out) == []


def test_reference_logits_leave_no_file_behind(tiny_model, tmp_path, monkeypatch):
    """Verification spills the reference's logits to disk: to files with no name, so even a
    SIGKILL (no cleanup runs) leaves nothing in the temporary folder."""
    import tempfile

    import numpy as np

    from quantkit.runtimes.torch import TorchReference
    from quantkit.source import resolve_source
    from quantkit.verify import Reference

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    source = resolve_source(tiny_model("llama"))
    reference = Reference(source, threads=1)
    windows = [[1, 5, 9, 13, 17, 21], [1, 7, 7, 30]]
    spilled = list(reference.logits(windows))
    # nothing of quantkit's named on disk while the logits are in use (torch may put its caches there)
    assert [name for name in os.listdir(tmp_path) if "quantkit" in name] == []
    direct = TorchReference(source, threads=1).logits(windows)
    for ours, theirs in zip(spilled, direct, strict=True):
        np.testing.assert_array_equal(ours, theirs)
        assert not ours.flags.writeable
    monkeypatch.setattr(reference.model, "logits", None)  # a second pass over the same windows computes nothing
    for again, first in zip(reference.logits(windows), spilled, strict=True):
        np.testing.assert_array_equal(again, first)
    reference.close()
