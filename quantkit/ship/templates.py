"""A checkpoint's chat template (Jinja, as in tokenizer_config.json and the GGUF's
``tokenizer.chat_template``) as an Ollama Modelfile TEMPLATE (Go text/template), checked.

Each chat family has a few candidate Go templates (the way its releases differ: spacing around
Mistral's ``[INST]``, a default system prompt in Qwen 2.5); a candidate is used only if, for every
probe conversation (a user turn; system + user; user, assistant, user; all three roles), Ollama's
rendering of it (:mod:`quantkit.ship.gotemplate`) equals the Jinja template's own rendering with
the generation prompt, the BOS token left to llama.cpp where it adds one. Nothing matches: no
TEMPLATE, and the bundle says why: never a silently wrong prompt. The Jinja template runs in
jinja2's sandbox (a model file is untrusted input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .gotemplate import TemplateError, render

__all__ = ["Translation", "translate", "render_jinja", "PROBES"]

# probe conversations: every role, alone and in turn (contents without surrounding whitespace,
# which some templates trim)
PROBES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "What is the capital of France?"),),
    (("system", "You are terse."), ("user", "Name a prime number.")),
    (("user", "Hello."), ("assistant", "Hi! How can I help?"), ("user", "Tell me a joke.")),
    (("system", "Answer in French."), ("user", "Good morning."), ("assistant", "Bonjour."), ("user", "Thank you.")),
)

_CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
_CHATML_DEFAULT_SYSTEM = """{{- range $i, $m := .Messages }}{{ if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system
{{ "DEFAULT_SYSTEM" }}<|im_end|>
{{ end }}<|im_start|>{{ $m.Role }}
{{ $m.Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
_LLAMA3 = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""
# Llama 3.1: a system header on every prompt, opening with a fixed preamble (its knowledge date)
_LLAMA3_PREAMBLE = """{{- range $i, $m := .Messages }}{{ if eq $i 0 }}<|start_header_id|>system<|end_header_id|>

{{ "PREAMBLE" }}{{ if eq $m.Role "system" }}{{ $m.Content }}{{ end }}<|eot_id|>{{ end }}{{ if ne $m.Role "system" }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>

{{ $m.Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""
_GEMMA = """{{- $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}<start_of_turn>user
{{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $first = false }}{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}{{ end }}<start_of_turn>model
"""
# Mistral's releases differ in where the spaces go and where the system prompt is put
_MISTRAL_LAST = """{{- range $i, $_ := .Messages }}{{ if eq .Role "user" }}[INST] {{ if and (eq (len (slice $.Messages $i)) 1) $.System }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]{{ else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}{{ end }}"""
_MISTRAL_TIGHT = """{{- range $i, $_ := .Messages }}{{ if eq .Role "user" }}[INST]{{ if and (eq (len (slice $.Messages $i)) 1) $.System }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}"""
_MISTRAL_SPACED = """{{- range $i, $_ := .Messages }}{{ if eq .Role "user" }}[INST] {{ if and (eq (len (slice $.Messages $i)) 1) $.System }}{{ $.System }}

{{ end }}{{ .Content }} [/INST]{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}"""

# family -> (a marker its Jinja template holds, its end-of-turn text, candidate TEMPLATEs)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "chatml": ("<|im_start|>", "<|im_end|>", (_CHATML, _CHATML_DEFAULT_SYSTEM)),
    "llama3": ("<|start_header_id|>", "<|eot_id|>", (_LLAMA3, _LLAMA3_PREAMBLE)),
    "gemma": ("<start_of_turn>", "<end_of_turn>", (_GEMMA,)),
    "mistral": ("[INST]", "</s>", (_MISTRAL_LAST, _MISTRAL_TIGHT, _MISTRAL_SPACED)),
}


@dataclass(frozen=True)
class Translation:
    family: str | None
    template: str | None  # the Go TEMPLATE, or None when none reproduces the Jinja template
    stop: tuple[str, ...]  # end-of-turn texts for PARAMETER stop
    why: str  # how it was checked, or why there is no TEMPLATE


def render_jinja(source: str, messages: list[dict[str, str]], *, bos: str = "", eos: str = "", add_generation_prompt: bool = True) -> str:
    """The chat template rendered as transformers renders it (sandboxed jinja2, trim_blocks,
    lstrip_blocks, raise_exception)."""
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise JinjaError(message)

    def strftime_now(fmt: str) -> str:  # as transformers provides it (Llama 3.2 dates its prompts)
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=bos, eos_token=eos, tools=None, documents=None)


def _go_data(conversation) -> dict[str, Any]:
    messages = [{"Role": role, "Content": content} for role, content in conversation]
    system = next((content for role, content in conversation if role == "system"), "")
    return {"Messages": messages, "System": system, "Prompt": conversation[-1][1], "Response": "", "Tools": []}


def translate(source: str | None, *, bos: str = "", eos: str = "", adds_bos: bool = True) -> Translation:
    """The Go TEMPLATE that renders every probe conversation as the Jinja ``source`` does."""
    if not source:
        return Translation(None, None, (eos,) if eos else (), "the checkpoint has no chat template")
    family = next((name for name, (marker, _, _) in FAMILIES.items() if marker in source), None)
    if family is None:
        return Translation(None, None, (eos,) if eos else (), "its chat template is not of a family quantkit translates "
                           f"({', '.join(FAMILIES)})")
    _, end_of_turn, candidates = FAMILIES[family]
    stop = tuple(dict.fromkeys(t for t in (end_of_turn, eos) if t))
    expected, skipped = [], 0
    for conversation in PROBES:
        try:
            text = render_jinja(source, [{"role": r, "content": c} for r, c in conversation], bos=bos, eos=eos)
        except Exception:  # noqa: BLE001 (an untrusted template: a role it refuses, or any error of its own) not checked
            skipped += 1
            continue
        if adds_bos and bos and text.startswith(bos):  # llama.cpp adds BOS when it tokenizes the prompt
            text = text[len(bos):]
        expected.append((conversation, text))
    if not expected:
        return Translation(family, None, stop, "its chat template refused every probe conversation")
    fills = {"DEFAULT_SYSTEM": _between(source, "<|im_start|>system\n", "<|im_end|>", bos, eos),
             "PREAMBLE": _between(source, "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>", bos, eos)}
    for candidate in candidates:
        hole = next((key for key in fills if f'{{{{ "{key}" }}}}' in candidate), None)
        if hole:
            if fills[hole] is None:
                continue
            candidate = candidate.replace(f'{{{{ "{hole}" }}}}', fills[hole])
        try:
            if all(render(candidate, _go_data(conv)) == text for conv, text in expected):
                note = f"; {skipped} probe(s) refused by the Jinja template" if skipped else ""
                return Translation(family, candidate, stop, f"{family}: equal to the Jinja template on {len(expected)} probe "
                                   f"conversations{note}")
        except TemplateError:
            continue
    return Translation(family, None, stop, f"no {family} TEMPLATE renders the probe conversations as its Jinja template does")


def _between(source: str, head: str, tail: str, bos: str, eos: str) -> str | None:
    """What a template writes between ``head`` and ``tail`` for a conversation of one user turn:
    the system prompt it inserts when there is none (Qwen 2.5), the preamble of its system header
    (Llama 3.1); None where there is none, or it is not plain text."""
    try:
        text = render_jinja(source, [{"role": "user", "content": "x"}], bos=bos, eos=eos, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 (an untrusted template's own error)
        return None
    start = text.find(head)
    end = text.find(tail, start + len(head)) if start >= 0 else -1
    found = text[start + len(head) : end] if end >= 0 else None
    return found if found is not None and "{{" not in found and "}}" not in found else None
