"""Tokenizer -> GGUF vocabulary, decided from the tokenizer's own definition.

Three shapes cover the supported models:
- a SentencePiece ``tokenizer.model`` (Llama 2, Mistral): pieces, scores and types as stored;
- a ``tokenizer.json`` BPE with byte fallback and the '▁' space marker (SentencePiece BPE
  converted by transformers, e.g. Gemma 3): written as llama.cpp's SPM vocabulary, with each
  token's score derived from the rank of the merge that creates it (SPM merges by highest score,
  HF BPE by lowest rank, so ``score = -rank`` gives the same merge order);
- a byte-level BPE ``tokenizer.json`` (Llama 3, Qwen 2/3): tokens, merges and the llama.cpp
  pre-tokenizer, identified by comparing the tokenizer's own split regexes with the regexes of
  llama.cpp's named pre-tokenizers (llama.cpp's converter hashes known vocabularies instead and
  refuses any tokenizer it has not seen).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ...errors import TokenizerError
from ...log import logger

__all__ = ["GGUFVocab", "load_vocab", "identify_pre_tokenizer", "PRE_TOKENIZERS"]

T = gguf.TokenType
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"

# llama.cpp pre-tokenizer name -> the split regexes that define it (llama-vocab.cpp).
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt2": (_GPT2_REGEX,),
    "llama-bpe": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "qwen2": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "tekken": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
        r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}


@dataclass
class GGUFVocab:
    model: str  # llama.cpp tokenizer model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str = "default"
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def pad_to(self, size: int) -> None:
        """Pad with unused tokens when the embedding has more rows than the tokenizer has tokens."""
        for i in range(len(self.tokens), size):
            self.tokens.append(f"[PAD{i}]")
            self.token_types.append(T.UNUSED)
            if self.scores is not None:
                self.scores.append(-1000.0)

    def validate(self, where: Path) -> None:
        """What llama.cpp's vocabulary loader asserts (llama-vocab.cpp: unique token texts, a
        BOS/EOS token when one is added, special ids in range), checked before anything is
        written: a GGML_ASSERT there would abort the process that loads the file."""
        seen: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            if tok in seen:
                raise TokenizerError(f"{where}: token {tok!r} appears twice (ids {seen[tok]} and {i}); llama.cpp needs unique token texts")
            seen[tok] = i
        for key, token_id in self.special_ids.items():
            if not 0 <= token_id < len(self.tokens):
                raise TokenizerError(f"{where}: {key} token id {token_id} is outside the vocabulary of {len(self.tokens)} tokens")
        for flag, key in ((self.add_bos, "bos"), (self.add_eos, "eos")):
            if flag and key not in self.special_ids:
                raise TokenizerError(f"{where}: the tokenizer adds a {key.upper()} token but names none")
        # a text piece the vocabulary lacks falls back to one token per byte, which llama.cpp looks
        # up with unordered_map::at: a missing byte token is an uncaught C++ exception (abort)
        missing = [b for b in range(256) if not any(t in seen for t in _byte_tokens(self.model, b))]
        if missing:
            raise TokenizerError(
                f"{where}: the vocabulary has no token for {len(missing)} of the 256 bytes (e.g. 0x{missing[0]:02X}); "
                "llama.cpp needs one for every byte to tokenize arbitrary text"
            )

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        adders = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
        }
        for key, token_id in sorted(self.special_ids.items()):
            adders[key](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _byte_tokens(model: str, byte: int) -> tuple[str, ...]:
    """The token texts llama.cpp tries for a raw byte (llama-vocab.cpp byte_to_token):
    SentencePiece ``<0xNN>`` then the character itself, byte-level BPE its GPT-2 character."""
    if model == "gpt2":
        return (_GPT2_BYTE_CHARS[byte],)
    return (f"<0x{byte:02X}>",) + ((chr(byte),) if byte < 128 else ())


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE alphabets)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


_GPT2_BYTE_CHARS = _gpt2_byte_chars()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from exc


def load_vocab(folder: Path, config: dict[str, Any]) -> GGUFVocab:
    """Read the tokenizer in ``folder`` into a GGUF vocabulary (padded to the embedding size)."""
    tok_json = _read_json(folder / "tokenizer.json")
    tok_config = _read_json(folder / "tokenizer_config.json")
    vocab = _vocab_from_spm(folder / "tokenizer.model", tok_json)
    if vocab is None:
        if not tok_json:
            raise TokenizerError(f"{folder}: no tokenizer (tokenizer.json or a SentencePiece tokenizer.model)")
        if tok_json.get("model", {}).get("type") == "Unigram":
            raise TokenizerError(_unigram_refusal(folder))
        spm = folder / "tokenizer.model"
        if spm.is_file():
            what = "a GGUF file" if _is_gguf(spm) else "not a SentencePiece model"
            logger.warning(f"{spm} is {what}; the vocabulary is read from tokenizer.json")
        vocab = _vocab_from_tokenizer_json(tok_json)
    elif tok_json:
        # tokenizer.json is what transformers runs: its Metaspace/Prepend rule decides the
        # leading space even when pieces and scores come from tokenizer.model
        vocab.add_space_prefix = _prepends_space(tok_json)
    _set_specials(vocab, folder, tok_json, tok_config, config)
    vocab.chat_template = _chat_template(folder, tok_config)
    vocab_size = int(config.get("vocab_size") or len(vocab.tokens))
    if len(vocab.tokens) > vocab_size:
        extra = ", ".join(vocab.tokens[vocab_size:vocab_size + 4])
        raise TokenizerError(f"tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is {vocab_size} "
                             f"(beyond the embedding: {extra}{', ...' if len(vocab.tokens) > vocab_size + 4 else ''})")
    vocab.pad_to(vocab_size)
    vocab.validate(folder)
    return vocab


def _unigram_refusal(folder: Path) -> str:
    # llama.cpp's SentencePiece vocabulary merges pieces by score (BPE style); a Unigram model
    # segments by best total score, so the GGUF would not tokenize like this checkpoint
    spm = folder / "tokenizer.model"
    if _is_gguf(spm):
        return (f"{folder}: tokenizer.json is the Unigram model transformers builds from a GGUF vocabulary (tokenizer.model is "
                f"that GGUF file, not SentencePiece), and llama.cpp would tokenize differently; convert the original "
                f".gguf file instead (quantkit convert MODEL.gguf --to ...)")
    note = " (tokenizer.model is not a SentencePiece model)" if spm.is_file() else ""
    return (f"{folder}: tokenizer.json is a Unigram model{note}, which llama.cpp's SentencePiece vocabulary does not "
            f"tokenize the same way; add the model's SentencePiece tokenizer.model")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _vocab_from_spm(path: Path, tok_json: dict[str, Any]) -> GGUFVocab | None:
    if not path.is_file():
        return None
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:
        # transformers writes the source GGUF under this name when it saves a GGUF-loaded
        # tokenizer; such a file is not SentencePiece, and tokenizer.json is the real definition
        return None
    if not proto.pieces:
        return None
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's type numbering is GGUF's
    for added in sorted(tok_json.get("added_tokens", []), key=lambda t: t["id"]):
        if added["id"] >= len(tokens):
            while len(tokens) < added["id"]:
                tokens.append(f"[PAD{len(tokens)}]")
                scores.append(-1000.0)
                types.append(T.UNUSED)
            tokens.append(added["content"])
            scores.append(-1000.0)
            types.append(T.CONTROL if added.get("special") else T.USER_DEFINED)
    return GGUFVocab(
        "llama", tokens, types, scores=scores, add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix)
    )


def _ordered_vocab(tok_json: dict[str, Any]) -> tuple[list[str], dict[int, dict[str, Any]]]:
    model = tok_json["model"]
    by_id: dict[int, str] = {}
    by_id = {i: tok for tok, i in model["vocab"].items()}
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    for i, tok in added.items():
        by_id[i] = tok["content"]
    size = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    return tokens, added


def _uses(component: dict[str, Any] | None, type_name: str) -> bool:
    if not component:
        return False
    if component.get("type") == type_name:
        return True
    return any(_uses(c, type_name) for key in ("pretokenizers", "decoders", "normalizers") for c in component.get(key) or [])


def _vocab_from_tokenizer_json(tok_json: dict[str, Any]) -> GGUFVocab:
    model = tok_json.get("model", {})
    kind = model.get("type")
    if kind != "BPE":
        raise TokenizerError(f"tokenizer model type {kind!r} cannot be written to GGUF (BPE or SentencePiece only)")
    tokens, added = _ordered_vocab(tok_json)
    types = []
    for i, tok in enumerate(tokens):
        if i in added:
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        elif tok.startswith("[PAD") and tok not in model.get("vocab", {}):
            types.append(T.UNUSED)
        else:
            types.append(T.NORMAL)
    byte_level = _uses(tok_json.get("pre_tokenizer"), "ByteLevel") or _uses(tok_json.get("decoder"), "ByteLevel")
    if kind == "BPE" and byte_level:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        pre = identify_pre_tokenizer(tok_json.get("pre_tokenizer"))
        return GGUFVocab("gpt2", tokens, types, merges=merges, pre=pre)
    # SentencePiece-style: '▁' marks spaces, unknown bytes fall back to <0xNN> tokens
    unk = model.get("vocab", {}).get(model.get("unk_token") or "")
    for i, tok in enumerate(tokens):
        if i in added:
            continue
        if _BYTE_TOKEN.match(tok):
            types[i] = T.BYTE
        elif i == unk:
            types[i] = T.UNKNOWN
    scores = _scores_from_merges(tokens, model.get("merges", []))
    for i in added:
        scores[i] = -1000.0
    return GGUFVocab("llama", tokens, types, scores=scores, add_space_prefix=_prepends_space(tok_json))


def _scores_from_merges(tokens: list[str], merges: list[Any]) -> list[float]:
    """score(token) = -rank of the first merge producing it; tokens no merge produces get 0."""
    scores = [0.0] * len(tokens)
    index = {tok: i for i, tok in enumerate(tokens)}
    seen: set[int] = set()
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = index.get(left + right)
        if i is not None and i not in seen:
            seen.add(i)
            scores[i] = -float(rank + 1)
    return scores


def _prepends_space(tok_json: dict[str, Any]) -> bool:
    """True when the tokenizer adds a leading '▁' (SentencePiece's add_dummy_prefix)."""

    def walk(component: dict[str, Any] | None) -> bool:
        if not component:
            return False
        if component.get("type") == "Prepend" and component.get("prepend") == "▁":
            return True
        if component.get("type") == "Metaspace":
            return component.get("prepend_scheme", "always" if component.get("add_prefix_space", True) else "never") != "never"
        return any(walk(c) for key in ("normalizers", "pretokenizers") for c in component.get(key) or [])

    return walk(tok_json.get("normalizer")) or walk(tok_json.get("pre_tokenizer"))


def _split_regexes(pre_tokenizer: dict[str, Any] | None) -> list[str]:
    if not pre_tokenizer:
        return []
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return [r for p in pre_tokenizer.get("pretokenizers", []) for r in _split_regexes(p)]
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return [pattern.get("Regex") or re.escape(pattern.get("String", ""))]
    if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return [_GPT2_REGEX]
    if kind == "Digits":
        return [r"\p{N}" if pre_tokenizer.get("individual_digits") else r"\p{N}+"]
    return []


def _normalize_regex(pattern: str) -> str:
    # "(?:'[sS]|'[tT]|...)" and "(?i:'s|'t|...)" are the same contraction rule spelled two ways
    return re.sub(r"\(\?:'\[sS\]\|'\[tT\]\|'\[rR\]\[eE\]\|'\[vV\]\[eE\]\|'\[mM\]\|'\[lL\]\[lL\]\|'\[dD\]\)", _CONTRACTIONS.replace("\\", "\\\\"), pattern)


def identify_pre_tokenizer(pre_tokenizer: dict[str, Any] | None) -> str:
    """Name the llama.cpp pre-tokenizer whose regexes equal this tokenizer's split regexes."""
    found = tuple(_normalize_regex(r) for r in _split_regexes(pre_tokenizer))
    for name, regexes in PRE_TOKENIZERS.items():
        if found == tuple(_normalize_regex(r) for r in regexes):
            return name
    shown = " | ".join(found) or "none"
    raise TokenizerError(
        f"byte-level BPE pre-tokenizer with split regex {shown!r} matches none of llama.cpp's "
        f"pre-tokenizers ({', '.join(PRE_TOKENIZERS)})"
    )


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _set_specials(vocab: GGUFVocab, folder: Path, tok_json: dict, tok_config: dict, config: dict) -> None:
    index = {tok: i for i, tok in enumerate(vocab.tokens)}
    special_map = _read_json(folder / "special_tokens_map.json")
    for key in ("bos", "eos", "unk", "pad"):
        content = _token_content(tok_config.get(f"{key}_token")) or _token_content(special_map.get(f"{key}_token"))
        token_id = index.get(content) if content else None
        if token_id is None:
            cfg = config.get(f"{key}_token_id")
            token_id = cfg[0] if isinstance(cfg, list) and cfg else cfg
        if isinstance(token_id, int) and 0 <= token_id:
            vocab.special_ids[key] = token_id
    vocab.add_bos, vocab.add_eos = _adds_bos_eos(tok_json, tok_config, vocab)


def _adds_bos_eos(tok_json: dict, tok_config: dict, vocab: GGUFVocab) -> tuple[bool, bool]:
    """Read add-bos/eos from the post-processor template, else tokenizer_config's flags."""
    post = tok_json.get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in processors:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single", [])
            ids = {name: spec["ids"][0] for name, spec in proc.get("special_tokens", {}).items() if spec.get("ids")}
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if single else None
            bos, eos = vocab.special_ids.get("bos"), vocab.special_ids.get("eos")
            return (first is not None and ids.get(first) == bos), (last is not None and ids.get(last) == eos)
    default_bos = vocab.model == "llama"
    return bool(tok_config.get("add_bos_token", default_bos)), bool(tok_config.get("add_eos_token", False))


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
