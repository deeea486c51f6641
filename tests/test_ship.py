"""Shipping (issue 20): the bundle (artifact, fit, commands, Modelfile, model card, SHA256SUMS) and
the chat template translated to Ollama's Go template, checked by rendering both."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from served import served_bundle

import quantkit.api as api
from quantkit.ship.gotemplate import TemplateError, render
from quantkit.ship.templates import FAMILIES, translate

REPO = Path(__file__).resolve().parents[1]

# chat templates written here in the style of each family's releases (the real ones, from llama.cpp's
# source, are checked below where the benchmarks fetched it)
TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "", "<|im_end|>"),
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}"
               "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
               "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": ("{{ bos_token }}{% set sys = '' %}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
              "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
              "else m['role'] %}<start_of_turn>{{ role }}\n{% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }}<end_of_turn>\n"
              "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}", "<bos>", "<eos>"),
    "mistral": ("{{ bos_token }}{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
                "{% set loop_messages = messages[1:] if sys else messages %}{% for m in loop_messages %}{% if m['role'] == 'user' %}"
                "{% if loop.last and sys %}[INST] {{ sys }}\n\n{{ m['content'] }}[/INST]{% else %}[INST] {{ m['content'] }}[/INST]{% endif %}"
                "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}", "<s>", "</s>"),
}
CONVERSATION = [("system", "Be brief."), ("user", "One."), ("assistant", "Two."), ("user", "Three."), ("assistant", "Four."),
                ("user", "Five?")]


def _go_data(conversation):
    return {"Messages": [{"Role": r, "Content": c} for r, c in conversation],
            "System": next((c for r, c in conversation if r == "system"), "")}


def _jinja(source, conversation, bos, eos):
    from quantkit.ship.templates import render_jinja

    text = render_jinja(source, [{"role": r, "content": c} for r, c in conversation], bos=bos, eos=eos)
    return text[len(bos):] if bos and text.startswith(bos) else text


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_each_family_translates_and_renders_as_its_jinja_template(family):
    source, bos, eos = TEMPLATES[family]
    t = translate(source, bos=bos, eos=eos)
    assert t.family == family and t.template, t.why
    assert FAMILIES[family][1] in t.stop
    # a longer conversation than the probes: the two renderings agree
    assert render(t.template, _go_data(CONVERSATION)) == _jinja(source, CONVERSATION, bos, eos)


def test_templates_that_cannot_be_checked_are_not_shipped():
    phi = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n"
    t = translate(phi, eos="<|endoftext|>")
    assert t.template is None and "not of a family" in t.why and t.stop == ("<|endoftext|>",)
    # a ChatML-looking template that renders differently (an extra space) is refused, not approximated
    off = TEMPLATES["chatml"][0].replace("{{ m['content'] }}<|im_end|>", "{{ m['content'] }} <|im_end|>")
    assert translate(off, eos="<|im_end|>").template is None
    assert translate(None).template is None


REAL = REPO / "out" / "bench" / "llama.cpp-0.3.36" / "models" / "templates"


@pytest.mark.skipif(not REAL.is_dir(), reason="llama.cpp's source (fetched by the benchmarks) is not here")
@pytest.mark.parametrize("name,bos,eos", [
    ("Qwen-Qwen2.5-7B-Instruct", "", "<|im_end|>"), ("Qwen-Qwen3-0.6B", "", "<|im_end|>"),
    ("meta-llama-Llama-3.1-8B-Instruct", "<|begin_of_text|>", "<|eot_id|>"),
    ("google-gemma-2-2b-it", "<bos>", "<eos>"), ("mistralai-Mistral-Nemo-Instruct-2407", "<s>", "</s>"),
])
def test_real_chat_templates_translate(name, bos, eos):
    source = (REAL / f"{name}.jinja").read_text(encoding="utf-8")
    t = translate(source, bos=bos, eos=eos)
    assert t.template, t.why
    conversation = CONVERSATION if "gemma" not in name else CONVERSATION[1:]  # Gemma 2 refuses a system role
    assert render(t.template, _go_data(conversation)) == _jinja(source, conversation, bos, eos)


def test_go_template_subset():
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "System": "s"}
    assert render("{{- range $i, $m := .Messages }}{{ $i }}{{ $m.Role }} {{ end -}}\n!", data) == "0user 1assistant !"
    assert render('{{ if eq (len .Messages) 2 }}two{{ else if .System }}sys{{ else }}none{{ end }}', data) == "two"
    assert render('{{ $x := "a" }}{{ if true }}{{ $x = "b" }}{{ end }}{{ $x }}', data) == "b"
    for bad in ("{{ .Missing }}", "{{ if .System }}", "{{ template \"x\" }}", "{{ call .System }}"):
        with pytest.raises(TemplateError):
            render(bad, data)


# -- the bundle ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_gguf(tiny_model, tmp_path_factory):
    return api.convert(tiny_model("qwen2"), ["gguf:q8_0"], tmp_path_factory.mktemp("ship"), verify=False).artifacts[0]


def test_bundle_of_a_gguf(qwen_gguf, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "bundle"
    summary = api.ship(qwen_gguf.path, "rtx-4060-8gb", out)
    files = set(summary["files"])
    assert {"Modelfile", "README.md", "run.sh", "SHA256SUMS", "model/manifest.json", f"model/{qwen_gguf.main_file.name}"} <= files
    sums = dict(line.split("  ")[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == files - {"SHA256SUMS"}
    for rel, digest in sums.items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    fit = summary["fit"]
    run = (out / "run.sh").read_text()
    assert f"llama-server -m model/{qwen_gguf.main_file.name} -ngl {fit['n_gpu_layers']} -c {fit['ctx']}" in run
    assert f"--n_gpu_layers {fit['n_gpu_layers']} --n_ctx {fit['ctx']}" in run
    assert fit["all_layers_on_gpu"] and "mmap" not in run  # the GPU holds every weight: llama.cpp's default mapping
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./model/{qwen_gguf.main_file.name}\n")
    assert f"PARAMETER num_ctx {fit['ctx']}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    # the Modelfile's TEMPLATE, rendered as Ollama renders it, is the prompt transformers makes
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    messages = [("user", "Who wrote Hamlet?"), ("assistant", "Shakespeare."), ("user", "When?")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    expected = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=True)
    assert render(template, _go_data(messages)) == expected
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: gguf" in card and "Fitted to `rtx-4060-8gb` (estimated)" in card
    # the same artifact and profile: the same bundle, byte for byte
    again = api.ship(qwen_gguf.path, "rtx-4060-8gb", tmp_path / "again")
    assert (tmp_path / "again" / "SHA256SUMS").read_bytes() == (out / "SHA256SUMS").read_bytes() and again["fit"] == fit


def test_bundle_with_a_report_and_of_a_gptq_checkpoint(qwen_gguf, tiny_model, tmp_path):
    report = api.profile(qwen_gguf.path, chunks=1, latency=False)
    path = tmp_path / "report.json"
    from quantkit.report.render import write_json

    write_json(report, path)
    api.ship(qwen_gguf.path, "laptop-x86-8gb", tmp_path / "b", report=path)
    card = (tmp_path / "b" / "README.md").read_text()
    assert "| domain | mean KLD | top-1 agreement | perplexity change |" in card and "| all |" in card
    assert (tmp_path / "b" / "quality.svg").read_text().startswith("<svg")
    gptq = api.convert(tiny_model("qwen2"), ["gptq:w4g32-rtn"], tmp_path / "g", verify=False).artifacts[0]
    summary = api.ship(gptq.path, "rtx-4090-24gb", tmp_path / "gb")
    assert "vllm serve model --quantization gptq" in (tmp_path / "gb" / "run.sh").read_text() and "fit" not in summary
    assert "library_name: transformers" in (tmp_path / "gb" / "README.md").read_text()


def test_what_cannot_fit_is_one_line_and_writes_nothing(qwen_gguf, tmp_path):
    board = tmp_path / "tiny.yaml"
    board.write_text("name: tiny\nkind: cpu\nmemory: {total_bytes: 200000000, bandwidth_bytes_per_s: 1.0e9, reserved_bytes: 0}\n"
                     "compute: {fp32: 1.0e9}\nruntimes:\n  - {name: llama.cpp, backend: cpu, formats: [gguf], quant_types: null}\n")
    out = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", "ship", str(qwen_gguf.path), "--profile", str(board), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "GB missing" in proc.stderr, proc.stderr
    assert not out.exists() and not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())


# -- served for real -----------------------------------------------------------------------------
def test_bundle_is_served_by_llama_cpp_server(qwen_gguf, tiny_model, tmp_path):
    """The bundle's own `python -m llama_cpp.server` line (on a free port) serves the model: a
    two-turn chat is formatted exactly as transformers' apply_chat_template formats it (the same
    prompt tokens and the same next-token log-probabilities as a plain completion of that prompt),
    and generation stops at the end-of-turn token."""
    import gguf
    from transformers import AutoTokenizer

    bundle = tmp_path / "bundle"
    api.ship(qwen_gguf.path, "laptop-x86-8gb", bundle)
    # the CPU runs every weight: read, not mapped (a mapped file's repacked weights stay resident twice)
    run = (bundle / "run.sh").read_text()
    assert " --no-mmap " in run and " --use_mmap false " in run
    with served_bundle(bundle) as post:
        messages = [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."},
                    {"role": "user", "content": "When was it written?"}]
        prompt = AutoTokenizer.from_pretrained(tiny_model("qwen2")).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chat = post("/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 5})
        plain = post("/v1/completions", {"prompt": prompt, "temperature": 0, "max_tokens": 6, "logprobs": 5})
        assert chat["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
        assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
        first_chat = {t["token"]: t["logprob"] for t in chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
        first_plain = plain["choices"][0]["logprobs"]["top_logprobs"][0]
        assert first_chat.keys() == first_plain.keys() and all(abs(first_chat[k] - first_plain[k]) < 1e-4 for k in first_chat)
        # the end-of-turn token ends the reply (and is not part of it)
        tokens = [str(t) for t in gguf.GGUFReader(qwen_gguf.main_file).fields["tokenizer.ggml.tokens"].contents()]
        stopped = post("/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 6,
                                               "logit_bias": {str(tokens.index("<|im_end|>")): 100}})
        assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["choices"][0]["message"]["content"] == ""


def test_bundle_never_replaces_a_folder_it_did_not_write(qwen_gguf, tmp_path):
    from quantkit.errors import InputError

    crowded = tmp_path / "models"
    crowded.mkdir()
    (crowded / "someone-elses.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an earlier quantkit bundle"):
        api.ship(qwen_gguf.path, "rtx-4060-8gb", crowded)
    assert (crowded / "someone-elses.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="would replace the artifact"):
        api.ship(qwen_gguf.path, "rtx-4060-8gb", qwen_gguf.path.parent)
    assert qwen_gguf.main_file.is_file()
    bundle = tmp_path / "bundle"
    api.ship(qwen_gguf.path, "rtx-4060-8gb", bundle)
    api.ship(qwen_gguf.path, "laptop-x86-8gb", bundle)  # an earlier bundle: replaced
    assert "laptop-x86-8gb" in (bundle / "README.md").read_text()


def test_a_report_of_another_artifact_is_refused(qwen_gguf, tiny_model, tmp_path):
    from quantkit.errors import InputError
    from quantkit.report.render import write_json

    other = api.convert(tiny_model("qwen2"), ["gguf:q4_0"], tmp_path / "o", verify=False).artifacts[0]
    path = tmp_path / "other.json"
    write_json(api.profile(other.path, chunks=1, latency=False), path)
    with pytest.raises(InputError, match="another artifact"):
        api.ship(qwen_gguf.path, "rtx-4060-8gb", tmp_path / "b", report=path)
    assert not (tmp_path / "b").exists()


def test_bundle_of_an_imatrix_quantization_ships_the_matrix(tiny_model, tmp_path):
    """Below 5 bits (q4_k_s) the GGUF is quantized with an importance matrix by default: the bundle carries
    it beside the GGUF, the card says so (and tags it), and SHA256SUMS covers it."""
    art = api.convert(tiny_model("qwen2"), ["gguf:q4_k_s"], tmp_path / "o", verify=False,
                      recipe_options={"calib_samples": 2, "calib_seqlen": 32}).artifacts[0]
    api.ship(art.path, "laptop-x86-8gb", tmp_path / "b")
    assert (tmp_path / "b" / "model" / "imatrix.gguf").read_bytes() == (art.path / "imatrix.gguf").read_bytes()
    card = (tmp_path / "b" / "README.md").read_text()
    assert "- imatrix" in card.split("---")[1] and "2 windows of 32 tokens" in card and "model/imatrix.gguf" in card
    assert "model/imatrix.gguf" in (tmp_path / "b" / "SHA256SUMS").read_text()


def test_run_lines_read_the_weights_the_cpu_runs():
    """--no-mmap wherever the CPU runs weights (ggml repacks them; a mapped file's pages of them
    would stay resident beside the copy): a CPU split, experts kept in RAM; never for a GPU that
    holds every weight."""
    from quantkit.ship import _commands

    def lines(fit, layers):
        summary = {"fit": fit, "fit_layers_only": layers, "profile": "p", "python_server_logits_all": True}
        server, _, python = _commands("gguf", "m.gguf", summary, {"files": []})["lines"][1:4]
        return server, python

    gpu = {"n_gpu_layers": 29, "ctx": 4096, "kv_type": "f16", "all_layers_on_gpu": True, "n_cpu_moe": 0}
    split = {**gpu, "n_gpu_layers": 20, "all_layers_on_gpu": False}
    server, python = lines(gpu, gpu)
    assert "mmap" not in server and "mmap" not in python
    server, python = lines(split, split)
    assert " --no-mmap" in server and " --use_mmap false" in python
    server, python = lines({**gpu, "n_cpu_moe": 2}, split)  # experts in RAM: every layer offloaded, experts on the CPU
    assert " --no-mmap" in server and "--n-cpu-moe 2" in server and " --use_mmap false" in python
