"""Ship an artifact to a target: a folder a person copies there and runs.

``quantkit ship ARTIFACT --profile NAME -o DIR`` writes, atomically (a partial bundle never looks
complete):

* ``model/``: the artifact's files (hard-linked where the file system allows, else copied) and
  its manifest, checked against the manifest's sha256 first;
* GGUF: the split that fits the profile (``quantkit.hardware.fit``: ``-ngl``, KV cache type, the
  largest context, experts in RAM for a mixture of experts), ``run.sh`` with the ``llama-server``
  and ``python -m llama_cpp.server`` command lines for it, and an Ollama ``Modelfile`` (FROM,
  PARAMETER num_ctx / num_gpu / stop, and a TEMPLATE translated from the checkpoint's chat
  template when quantkit can check the translation: :mod:`quantkit.ship.templates`);
* GPTQ: the vLLM and transformers commands; ONNX: the onnxruntime-genai (decoders) or ONNX
  Runtime (encoders) snippet;
* ``README.md``: a model card in the Hugging Face convention (YAML front matter with
  ``base_model``, ``base_model_relation: quantized``, ``library_name``, ``tags``, the licence when
  the source says), the recipe, the fit, and with ``--report`` the quality table of the
  artifact's profile report (measured figures as measured, estimates labelled);
* ``SHA256SUMS`` over every file of the bundle (``sha256sum -c SHA256SUMS`` checks it).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from ..artifact import MANIFEST_NAME, atomic_dir, check_artifact, read_manifest, sha256_file
from ..errors import InputError

__all__ = ["ship"]

_LIBRARY = {"gguf": "gguf", "gptq": "transformers", "onnx": "onnxruntime-genai"}
_GGML_TYPE_IDS = {"f16": 1, "q8_0": 8}  # llama-cpp-python's --type_k/--type_v take ggml type ids


def ship(artifact: str | Path, profile_name: str, out_dir: str | Path, *, report: str | Path | None = None) -> dict[str, Any]:
    """Write the bundle for ``artifact`` on ``profile_name`` into ``out_dir``; returns a summary."""
    from ..hardware import load_profile

    folder = Path(artifact)
    if folder.is_file():
        folder = folder.parent
    manifest = read_manifest(folder)
    check_artifact(folder, manifest)
    fmt = manifest["recipe"]["format"]
    if fmt == "bnb":
        raise InputError(f"{folder}: a bitsandbytes artifact is an in-memory reference with no weights to ship")
    profile = load_profile(profile_name)
    main = manifest.get("main_file", manifest["files"][0]["path"])
    quality = _read_report(report, manifest, main) if report else None
    summary: dict[str, Any] = {"artifact": str(folder), "profile": profile.name, "format": fmt, "warnings": []}
    out = Path(out_dir)
    _check_out(out, folder)
    if fmt == "gguf":
        summary.update(_gguf(folder / main, profile))
    with atomic_dir(out) as tmp:
        model = tmp / "model"
        model.mkdir()
        for entry in manifest["files"]:
            _place(folder / entry["path"], model / entry["path"])
        shutil.copyfile(folder / MANIFEST_NAME, model / MANIFEST_NAME)
        run = _commands(fmt, main, summary, manifest)
        if fmt == "gguf":
            (tmp / "Modelfile").write_text(_modelfile(main, summary), encoding="utf-8")
        (tmp / "run.sh").write_text("#!/bin/sh\n# " + "\n# ".join(run["comments"]) + "\n" + "\n".join(run["lines"]) + "\n",
                                    encoding="utf-8")
        os.chmod(tmp / "run.sh", 0o755)
        (tmp / "README.md").write_text(_card(folder, manifest, profile, summary, run, quality), encoding="utf-8")
        if quality and quality.get("svg"):
            (tmp / "quality.svg").write_text(quality["svg"], encoding="utf-8")
        # the artifact's files were checked against these sha256s above: not hashed a second time
        _checksums(tmp, {f"model/{f['path']}": f["sha256"] for f in manifest["files"]})
    summary["bundle"] = str(out)
    summary["files"] = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return summary


def _check_out(out: Path, artifact: Path) -> None:
    """The bundle folder replaces ``out`` whole: only an earlier bundle may be there (never a
    folder of other files, and never the artifact or a folder holding it)."""
    out, artifact = out.resolve(), artifact.resolve()
    if out == artifact or out in artifact.parents:
        raise InputError(f"{out}: the bundle folder would replace the artifact it ships; choose another -o")
    if out.exists():
        earlier = out.is_dir() and (out / "SHA256SUMS").is_file() and (out / "model" / MANIFEST_NAME).is_file()
        if not earlier and (not out.is_dir() or any(out.iterdir())):
            raise InputError(f"{out}: exists and is not an earlier quantkit bundle; the bundle replaces its folder whole, "
                             "so give a new or empty folder")


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # no second copy of a multi-GB file on the same file system
    except OSError:
        shutil.copyfile(source, target)


def _checksums(folder: Path, known: dict[str, str]) -> None:
    """``SHA256SUMS`` of every file of the bundle (``known``: the sha256s already checked)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    lines = [f"{known.get(rel) or sha256_file(folder / rel)}  {rel}" for rel in files]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- GGUF: the fit, the chat template ---------------------------------------------------------------
def _gguf(path: Path, profile) -> dict[str, Any]:
    import gguf

    from ..hardware.estimate import artifact_facts, estimate_target
    from ..hardware.fit import GGUFLayout, fit_gguf
    from ..profile.memory import kv_cache_bytes_per_token
    from ..runtimes.llamacpp import LlamaCppRuntime
    from .templates import translate

    desc = LlamaCppRuntime.describe(path)
    estimate = estimate_target(artifact_facts("gguf", None, desc, kv_cache_bytes_per_token(desc)), profile, 4096, None)
    if not estimate["compatible"]:
        raise InputError(f"{path.name} cannot run on {profile.name}: {'; '.join(estimate['reasons'])}")
    layout = GGUFLayout.of(path)
    fit = fit_gguf(path, profile, estimate=estimate, layout=layout)  # does not fit even on the CPU: one line, exit 2
    # Ollama and llama-cpp-python's server cannot keep experts in RAM: they get the best split of
    # whole layers instead (with experts in RAM that fit is llama-server's alone)
    layers_only = fit_gguf(path, profile, estimate=estimate, layout=layout, cpu_moe=False) if fit.get("n_cpu_moe") else fit
    # the vocabulary as text and the chat template (quantkit's header reader skips string arrays)
    wanted = ("tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
              "tokenizer.chat_template")
    fields = {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items() if name in wanted}
    tokens = [str(t) for t in fields.get("tokenizer.ggml.tokens") or []]

    def token(key: str) -> str:
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    adds_bos = bool(fields.get("tokenizer.ggml.add_bos_token", True))
    translation = translate(fields.get("tokenizer.chat_template"), bos=token("bos"), eos=token("eos"), adds_bos=adds_bos)
    vocabulary = set(tokens)
    stop = tuple(t for t in translation.stop if t in vocabulary)
    warnings = [] if translation.template else [f"no TEMPLATE in the Modelfile: {translation.why}; Ollama falls back to its own"]
    # llama-cpp-python's server keeps the logits of every context position (logits_all, which
    # logprobs need): n_ctx x n_vocab float32 in RAM, 32 GiB for Gemma 3's 262k vocabulary at
    # 32k tokens. Its line turns that off where it would not fit in what the split leaves of RAM
    scores = layers_only["ctx"] * len(tokens) * 4
    left = (layers_only["host_usable_bytes"] or 0) - layers_only["host_bytes"]
    return {"fit": fit, "fit_layers_only": layers_only, "template": translation.template, "template_check": translation.why,
            "stop": list(stop), "warnings": warnings, "python_server_logits_bytes": scores,
            "python_server_logits_all": scores <= left // 2}


def _modelfile(main: str, summary: dict[str, Any]) -> str:
    fit = summary["fit_layers_only"]
    lines = [f"FROM ./model/{main}"]
    if summary["template"]:
        lines.append(f'TEMPLATE """{summary["template"]}"""')
    else:
        lines.append(f"# {summary['warnings'][0]}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in summary["stop"]]
    lines += [f"PARAMETER num_ctx {fit['ctx']}", f"PARAMETER num_gpu {fit['n_gpu_layers']}"]
    return "\n".join(lines) + "\n"


def _cpu_runs_weights(fit: dict[str, Any]) -> bool:
    """Whether a split leaves weights to the CPU: layers not offloaded, or experts kept in RAM
    (``--n-cpu-moe``, even with every layer offloaded)."""
    return not fit["all_layers_on_gpu"] or bool(fit.get("n_cpu_moe"))


def _commands(fmt: str, main: str, summary: dict[str, Any], manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Command lines that run the artifact as fitted (GGUF) or as its runtime expects."""
    path = f"model/{main}"
    if fmt == "gguf":
        fit, layers = summary["fit"], summary["fit_layers_only"]
        server = ["llama-server", "-m", path, "-ngl", str(fit["n_gpu_layers"]), "-c", str(fit["ctx"])]
        python = ["python", "-m", "llama_cpp.server", "--model", path, "--n_gpu_layers", str(layers["n_gpu_layers"]),
                  "--n_ctx", str(layers["ctx"])]
        if fit["kv_type"] != "f16":
            server += ["--cache-type-k", fit["kv_type"], "--cache-type-v", fit["kv_type"], "-fa", "on"]
        if layers["kv_type"] != "f16":
            python += ["--type_k", str(_GGML_TYPE_IDS[layers["kv_type"]]), "--type_v", str(_GGML_TYPE_IDS[layers["kv_type"]]),
                       "--flash_attn", "true"]
        comments = [f"fitted to {summary['profile']} (estimated): see README.md", 'run from the bundle folder: cd "$(dirname "$0")"']
        if not summary["python_server_logits_all"]:
            python += ["--logits_all", "false"]
            comments.append(f"llama-cpp-python's server would keep n_ctx x n_vocab logits for logprobs "
                            f"({summary['python_server_logits_bytes'] / 2**30:.1f} GiB at -c {layers['ctx']}): off in its line "
                            "(requests cannot ask for logprobs); a shorter --n_ctx with --logits_all true brings them back")
        # weights the CPU runs are read, not mapped: ggml repacks Q4_0/Q4_K/IQ4_NL weights for its
        # CPU kernels and a mapped file's pages of them would stay resident beside the copy
        # (llama.cpp #16761), which the fit does not count
        if _cpu_runs_weights(fit):
            server.append("--no-mmap")
        if _cpu_runs_weights(layers):
            python += ["--use_mmap", "false"]
        if fit.get("n_cpu_moe"):
            server += ["--n-cpu-moe", str(fit["n_cpu_moe"])]
            comments.append("llama-cpp-python's server and Ollama cannot keep experts in RAM: their lines use the best "
                            f"split of whole layers (-ngl {layers['n_gpu_layers']}, -c {layers['ctx']})")
        server += ["--host", "127.0.0.1", "--port", "8080"]
        python += ["--host", "127.0.0.1", "--port", "8080"]
        return {"lines": ['cd "$(dirname "$0")"', shlex.join(server), "# or, with llama-cpp-python[server]:", "# " + shlex.join(python)],
                "comments": comments}
    if fmt == "gptq":
        vllm = ["vllm", "serve", "model", "--quantization", "gptq", "--host", "127.0.0.1", "--port", "8000"]
        transformers = ("python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer; "
                        "t = AutoTokenizer.from_pretrained('model'); m = AutoModelForCausalLM.from_pretrained('model', device_map='auto'); "
                        "print(t.decode(m.generate(**t('Hello', return_tensors='pt').to(m.device), max_new_tokens=32)[0]))\"")
        return {"lines": [shlex.join(vllm), "# or, in transformers (with GPTQModel installed):", "# " + transformers],
                "comments": ["GPTQ v1 checkpoint: vLLM, or transformers with GPTQModel"]}
    if any(f["path"].endswith("genai_config.json") for f in manifest["files"]):  # a decoder built for onnxruntime-genai
        snippet = ("python -c \"import onnxruntime_genai as og; m = og.Model('model'); t = og.Tokenizer(m); "
                   "p = og.GeneratorParams(m); p.set_search_options(max_length=256); g = og.Generator(m, p); "
                   "g.append_tokens(t.encode('Hello')); "
                   "exec('while not g.is_done(): g.generate_next_token()'); print(t.decode(g.get_sequence(0)))\"")
        return {"lines": ["# onnxruntime-genai:", snippet], "comments": ["ONNX decoder with genai_config.json"]}
    snippet = (f"python -c \"import onnxruntime as ort; s = ort.InferenceSession('{path}'); "
               "print([i.name for i in s.get_inputs()])\"")
    return {"lines": ["# ONNX Runtime:", snippet], "comments": ["ONNX encoder"]}


# -- the model card ---------------------------------------------------------------------------------
def _read_report(path: str | Path, manifest: dict[str, Any], main: str) -> dict[str, Any]:
    """The artifact's own profile report (its main file's sha256 must match): its quality goes in
    the card as measured, so a report of another artifact is refused."""
    from ..gate import read_report
    from ..report.gate_render import plots

    report = read_report(path)
    shipped = next((f["sha256"] for f in manifest["files"] if f["path"] == main), None)
    profiled = [f.get("sha256") for f in ((report.get("artifact") or {}).get("manifest") or {}).get("files", [])]
    if shipped not in profiled:
        raise InputError(f"{path}: a profile report of another artifact (its files' sha256 differ from the one shipped)")
    drawn = plots([report])  # size against KLD first, then KLD per domain with its intervals
    return {"report": report, "svg": drawn[0] if drawn else None}


def _source_card(source_id: str) -> dict[str, Any]:
    """base_model and licence of the source, where it says (a hub id; a local folder's README)."""
    out: dict[str, Any] = {}
    if "/" in source_id and not source_id.startswith(("/", ".", "embedded:")) and not Path(source_id).exists():
        out["base_model"] = source_id.split("@", 1)[0]
    folder = Path(source_id)
    readme = folder / "README.md" if folder.is_dir() else None
    if readme and readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            import yaml

            try:
                front = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                front = {}
            if isinstance(front, dict) and isinstance(front.get("license"), str):
                out["license"] = front["license"]
    if source_id.startswith("embedded:gemma"):
        out.update(base_model="google/gemma-3-270m", license="gemma")
    return out


def _card(folder: Path, manifest: dict[str, Any], profile, summary: dict[str, Any], run: dict[str, list[str]],
          quality: dict[str, Any] | None) -> str:
    import yaml

    recipe = manifest["recipe"]
    fmt = recipe["format"]
    source = manifest["source"]
    imatrix = manifest.get("details", {}).get("imatrix")
    front: dict[str, Any] = {**_source_card(str(source.get("id", ""))), "base_model_relation": "quantized",
                             "library_name": _LIBRARY.get(fmt, fmt),
                             "tags": ["quantkit", fmt, recipe["scheme"], *(["imatrix"] if imatrix else [])]}
    if "base_model" not in front:
        front.pop("base_model_relation")
    lines = ["---", yaml.safe_dump(front, sort_keys=True).strip(), "---", "", f"# {folder.name}", "",
             f"`{fmt}:{recipe['scheme']}` of `{source.get('id')}` (source fingerprint `{source.get('fingerprint', '')[:16]}...`), "
             f"made by quantkit {manifest.get('tool_versions', {}).get('quantkit', '')}; the manifest in `model/` lists every file "
             "with its sha256, and `SHA256SUMS` covers the bundle (`sha256sum -c SHA256SUMS`).", ""]
    if imatrix:
        calibration = imatrix.get("calibration") or {}
        amount = f", {calibration['samples']} windows of {calibration['seqlen']} tokens" if "samples" in calibration else ""
        lines += [f"Quantized with an importance matrix ({', '.join(imatrix.get('datasets') or ['a llama-imatrix file'])}{amount}); "
                  f"it is `model/{imatrix.get('file', 'imatrix.gguf')}` (llama.cpp's GGUF imatrix format, "
                  "`llama-quantize --imatrix` reads it).", ""]
    if fmt == "gguf":
        from ..report.render import fit_text

        lines += [f"## Fitted to `{profile.name}` (estimated)", "", fit_text(summary["fit"]), ""]
        lines += [f"Chat template: {'TEMPLATE in the Modelfile, ' + summary['template_check'] if summary['template'] else summary['warnings'][0]}.", ""]
    lines += ["## Run", "", "```sh", *run["lines"], "```", ""]
    if fmt == "gguf":
        lines += ["With Ollama: `ollama create NAME -f Modelfile`, then `ollama run NAME`.", ""]
    if quality:
        lines += _quality_table(quality["report"])
        if quality.get("svg"):
            lines += ["", "![size against KLD](quality.svg)", ""]
    if summary["warnings"]:
        lines += ["## Warnings", "", *[f"- {w}" for w in summary["warnings"]], ""]
    return "\n".join(lines)


def _quality_table(report: dict[str, Any]) -> list[str]:
    q = report["quality"]
    rows = ["## Quality against the unquantized model (measured)", "",
            f"{q.get('tokens', 0):,} tokens scored on this artifact's own runtime; 95 % intervals in brackets.", "",
            "| domain | mean KLD | top-1 agreement | perplexity change |", "| --- | --- | --- | --- |"]

    def cell(stats: dict[str, Any], key: str, fmt: str) -> str:
        value = stats.get(key)
        if value is None:
            return "-"
        low_high = (stats.get("intervals") or {}).get(key)
        return format(value, fmt) + (f" [{format(low_high[0], fmt)}, {format(low_high[1], fmt)}]" if low_high else "")

    for name, stats in [*sorted((q.get("domains") or {}).items()), ("all", q)]:
        rows.append(f"| {name} | {cell(stats, 'kld_mean', '.4f')} | {cell(stats, 'top1_agreement', '.3f')} | "
                    f"{cell(stats, 'ppl_delta_pct', '+.2f')} % |")
    targets = [t for t in report.get("targets", []) if t.get("decode_tokens_per_s")]
    if targets:
        rows += ["", "| target | decode tok/s | prefill tok/s |", "| --- | --- | --- |"]
        for t in targets:
            label = "measured" if "measured" in t else "estimated"
            rows.append(f"| {t['name']} | {t['decode_tokens_per_s']:.1f} ({label}) | {t.get('prefill_tokens_per_s') or 0:.1f} ({label}) |")
    return rows
