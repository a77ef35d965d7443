"""The tokenizer part of a GGUF file: vocabulary, merges or scores, pre-tokenizer, special ids, template.

llama.cpp knows two tokenizer styles that cover our families: byte-level BPE ("gpt2": Llama 3,
Qwen, SmolLM) with merges and a named pre-tokenizer (the regex that splits text before BPE), and
SentencePiece ("llama": Mistral, Gemma, Phi-3) with per-token scores. Both are read off the
Hugging Face tokenizer's tokenizer.json, so what the file holds is what training used.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunewiz.engine.errors import TunewizError

# The pre-tokenizer regexes of llama.cpp's named BPE vocabularies, as tokenizer.json spells them.
_LLAMA3_SPLIT = r"\p{N}{1,3}"
_QWEN2_SPLIT = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"


@dataclass
class Vocab:
    """Everything `add_to` writes under tokenizer.ggml.* and tokenizer.chat_template."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: Any  # a gguf.SpecialVocab: merges, special ids, add-BOS/EOS flags, chat template

    def add_to(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        self.special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the text splitting that runs before byte-level BPE."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds[:1] == ["Split"]:
        regex = steps[0].get("pattern", {}).get("Regex", "")
        if _LLAMA3_SPLIT in regex:
            return "llama-bpe"
        if _QWEN2_SPLIT in regex:
            return "qwen2"
    raise TunewizError(f"this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one GGUF export knows",
                       hint="GGUF export knows the tokenizers of Llama 3, Qwen 2/3, SmolLM, Mistral, Gemma 2 "
                            "and Phi-3; export a merged model instead (tunewiz export RUN --merged)")


def _tokens_by_id(tokenizer: Any, n_vocab: int) -> list[str | None]:
    tokens: list[str | None] = [None] * n_vocab
    for text, token_id in tokenizer.get_vocab().items():
        if token_id < n_vocab:
            tokens[token_id] = text
    return tokens


def adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS in front of, and EOS after, the text it encodes."""
    probe = tokenizer("a")["input_ids"]
    bos = bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    eos = bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    return bos, eos


def read_vocab(tokenizer: Any, n_vocab: int, chat_template: str | None, stop_ids: list[int]) -> Vocab:
    """The GGUF vocabulary of a (fast) Hugging Face tokenizer, padded to the model's `n_vocab` rows.

    `stop_ids` are the ids that end an answer; the first one that is not EOS becomes the
    end-of-turn token (Llama 3.1 Instruct's <|eot_id|>)."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        tokenizer_json = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    model = tokenizer_json["model"]
    byte_fallback = model.get("byte_fallback", False)
    special_ids = set(tokenizer.all_special_ids)
    added = {int(k): v for k, v in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    by_id = _tokens_by_id(tokenizer, n_vocab)
    tokens, types, scores = [], [], []
    for token_id, text in enumerate(by_id):
        if text is None:  # rows of the embedding beyond the tokenizer (padded for speed)
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-10000.0)
            continue
        tokens.append(text)
        if token_id in special_ids or (token_id in added and added[token_id].special):
            types.append(gguf.TokenType.CONTROL)
        elif token_id in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(gguf.TokenType.BYTE)
        elif token_id == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
        # SentencePiece BPE ranks pieces by score, and its pieces are numbered in score order.
        scores.append(-1000.0 if token_id in added else -float(token_id))
    if model["type"] == "BPE" and not byte_fallback:
        style, pre, token_scores = "gpt2", _pre_tokenizer_name(tokenizer_json), None
    elif model["type"] in ("BPE", "Unigram"):
        style, pre, token_scores = "llama", "default", scores
        special.merges, special.load_merges = [], False  # SentencePiece merges by score
        if model["type"] == "Unigram":
            token_scores = [float(score) for _piece, score in model["vocab"]] + scores[len(model["vocab"]):]
    else:
        raise TunewizError(f"tokenizer model {model['type']!r} cannot be written to GGUF",
                           hint="export a merged model instead (tunewiz export RUN --merged)")
    # The live tokenizer, not its files, decides: transformers keeps some of these only in memory.
    ids: dict[str, int] = {}
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            ids[key] = int(value)
    extra_stops = [i for i in stop_ids if i != ids.get("eos")]
    if extra_stops:
        ids["eot"] = int(extra_stops[0])
    add_bos, add_eos = adds_special(tokenizer)
    special.special_token_ids = ids
    special.add_special_token = {"bos": add_bos, "eos": add_eos}
    special.chat_template = chat_template
    return Vocab(style, pre, tokens, [int(t) for t in types], token_scores, special)
