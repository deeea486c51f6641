"""GGUF SentencePiece vocabulary -> an HF ``tokenizers`` BPE tokenizer that tokenizes like llama.cpp.

transformers' own GGUF loader turns llama.cpp's SPM vocabulary into a Unigram model scored by the
SPM scores; for BPE-trained SentencePiece models such as Gemma 3 that segments text differently
from llama.cpp and from the original tokenizer ("Hello world" becomes four tokens, not two). Here
the vocabulary becomes a byte-fallback BPE whose merges are every split of a token into two
vocabulary pieces, ranked by the token's score: the merge order llama.cpp's SPM tokenizer uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from ...errors import TokenizerError

__all__ = ["hf_tokenizer_files_from_gguf"]

T = gguf.TokenType


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def hf_tokenizer_files_from_gguf(path: Path, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for ``path``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    reader = gguf.GGUFReader(path)
    if _field(reader, "tokenizer.ggml.model") != "llama":
        raise TokenizerError(f"{path}: only SentencePiece ('llama') GGUF vocabularies are rebuilt here")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    scores: list[float] = _field(reader, "tokenizer.ggml.scores")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    ids = {tok: i for i, tok in enumerate(tokens)}

    candidates = []
    for i, tok in enumerate(tokens):
        if types[i] != T.NORMAL or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            li, ri = ids.get(left), ids.get(right)
            if li is not None and ri is not None and types[li] in (T.NORMAL, T.BYTE) and types[ri] in (T.NORMAL, T.BYTE):
                candidates.append((-scores[i], i, li, ri, left, right))
    candidates.sort()
    merges = [(c[4], c[5]) for c in candidates]

    unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id", 0))
    bpe = models.BPE(vocab=ids, merges=merges, unk_token=tokens[unk_id], byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(bpe)
    add_space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    steps = ([normalizers.Prepend("▁")] if add_space_prefix else []) + [normalizers.Replace(" ", "▁")]
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])
    )
    added = [
        AddedToken(tok, special=(types[i] == T.CONTROL), normalized=False)
        for i, tok in enumerate(tokens)
        if types[i] in (T.CONTROL, T.USER_DEFINED)
    ]
    tokenizer.add_tokens(added)

    special = {}
    for key in ("bos", "eos", "unknown", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            special[{"unknown": "unk", "padding": "pad"}.get(key, key)] = tokens[int(token_id)]
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", True)) and "bos" in special
    if add_bos:
        bos = special["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])]
        )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length", 2048)),
        **{f"{k}_token": v for k, v in special.items()},
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {f"{k}_token": v for k, v in special.items()}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
