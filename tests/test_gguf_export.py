"""GGUF files written by engine/use/gguf_export.py: per architecture, the weights, names and metadata are
right when transformers' own GGUF loader rebuilds the same model (same logits) from the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tunewiz.engine.errors import TunewizError
from tunewiz.engine.use.gguf_export import FAMILIES, family_of, write_gguf

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}


def tiny_config(model_type: str, vocab_size: int, **overrides: Any) -> Any:
    from transformers import AutoConfig

    extra: dict[str, Any] = {"tie_word_embeddings": False}
    if model_type == "qwen2":
        extra = {"tie_word_embeddings": True}
    if model_type == "qwen3":
        # head_dim != hidden / heads, as in Qwen3-0.6B; 128 because transformers' loader assumes it
        # (it does not read attention.key_length back for qwen3; llama.cpp does)
        extra = {"head_dim": 128, "tie_word_embeddings": True}
    if model_type == "gemma2":
        extra = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 128, "tie_word_embeddings": True}
    if model_type == "mistral":
        extra = {"sliding_window": None, "tie_word_embeddings": False}
    if model_type == "phi3":
        extra = {"pad_token_id": 0, "tie_word_embeddings": False}
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**TINY, **extra, **overrides})


def random_model(config: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at exactly 1 (or 0 for Gemma); make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_round_trips_through_transformers_gguf_loader(model_type: str, demo_tokenizer: Any,
                                                                  tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = random_model(tiny_config(model_type, len(demo_tokenizer)))
    path = tmp_path / "model.gguf"
    write_gguf(model, demo_tokenizer, demo_tokenizer.chat_template, [], path, "f16", "tiny")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = demo_tokenizer("The quick brown fox jumps over the lazy dog, twice.")["input_ids"]
    expected, got = logits(model, ids), logits(reloaded, ids)
    assert torch.allclose(got, expected, atol=2e-2, rtol=1e-2), (got - expected).abs().max()


def test_unsupported_architecture_names_the_supported_ones() -> None:
    with pytest.raises(TunewizError) as caught:
        family_of("gpt_neox")
    assert "gpt_neox" in str(caught.value) and "Qwen3" in caught.value.hint and "Phi-3" in caught.value.hint


def sentencepiece_style_tokenizer() -> Any:
    """A tiny tokenizer shaped like Mistral's, Gemma's and Phi-3's: BPE over '▁'-joined pieces, with
    byte fallback, pieces numbered in merge order."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    merges = [("▁", "h"), ("e", "l"), ("l", "o"), ("▁h", "el"), ("▁hel", "lo"), ("▁", "w"), ("o", "r"),
              ("▁w", "or"), ("▁wor", "l"), ("▁worl", "d")]
    pieces = (["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + list("▁helowrd")
              + ["".join(m) for m in merges])
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                                     byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_style_vocabulary_round_trips(tmp_path: Path) -> None:
    import gguf
    from transformers import AutoTokenizer

    from tunewiz.engine.use.gguf_vocab import read_vocab

    tokenizer = sentencepiece_style_tokenizer()
    vocab = read_vocab(tokenizer, len(tokenizer) + 2, None, [])
    assert (vocab.model, vocab.pre, vocab.special.merges) == ("llama", "default", [])
    assert vocab.types[1] == gguf.TokenType.CONTROL and vocab.types[3 + 0x41] == gguf.TokenType.BYTE
    assert vocab.tokens[-1] == f"[PAD{len(tokenizer) + 1}]" and vocab.types[-1] == gguf.TokenType.UNUSED
    write_gguf(random_model(tiny_config("llama", len(tokenizer))), tokenizer, None, [], tmp_path / "m.gguf", "f16", "t")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["hello world!", "hello", "world hello é"]:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert back(text, add_special_tokens=False)["input_ids"] == expected


def test_byte_level_vocabulary_special_ids_and_template(demo_tokenizer: Any) -> None:
    import gguf

    from tunewiz.engine.use.gguf_vocab import read_vocab

    vocab = read_vocab(demo_tokenizer, len(demo_tokenizer), "TEMPLATE", [2, 0])
    assert (vocab.model, vocab.pre) == ("gpt2", "gpt-2")  # the demo's converted tokenizer: plain GPT-2 splitting
    assert len(vocab.special.merges) > 40000 and vocab.scores is None
    assert vocab.special.special_token_ids["eos"] == 2 and vocab.special.special_token_ids["eot"] == 0
    assert vocab.special.add_special_token == {"bos": False, "eos": False} and vocab.special.chat_template == "TEMPLATE"
    assert vocab.types[2] == gguf.TokenType.CONTROL and vocab.types[1000] == gguf.TokenType.NORMAL


@pytest.mark.parametrize("pre_tokenizer,name", [
    ({"type": "ByteLevel", "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                                               r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"}},
        {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
                                               r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"}},
        {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
])
def test_pre_tokenizer_names(pre_tokenizer: dict[str, Any], name: str) -> None:
    from tunewiz.engine.use.gguf_vocab import _pre_tokenizer_name

    assert _pre_tokenizer_name({"pre_tokenizer": pre_tokenizer}) == name


def test_unknown_pre_tokenizer_is_a_clear_error() -> None:
    from tunewiz.engine.use.gguf_vocab import _pre_tokenizer_name

    with pytest.raises(TunewizError, match="pre-tokenizer"):
        _pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_llama3_rope_scaling_becomes_rope_freqs(demo_tokenizer: Any, tmp_path: Path) -> None:
    import numpy as np
    import torch
    from gguf import GGUFReader

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = random_model(tiny_config("llama", len(demo_tokenizer), rope_parameters=rope))
    write_gguf(model, demo_tokenizer, None, [], tmp_path / "m.gguf", "q8_0", "t")
    tensors = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
    dim = model.config.hidden_size // model.config.num_attention_heads
    plain = 1.0 / (500000.0 ** (np.arange(0, dim, 2) / dim))
    scaled = model.model.rotary_emb.inv_freq.to(torch.float64).numpy()  # transformers' llama3 frequencies
    assert np.allclose(plain / factors, scaled, rtol=1e-5)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_unsupported_rope_scaling_is_refused(demo_tokenizer: Any, tmp_path: Path) -> None:
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    model = random_model(tiny_config("llama", len(demo_tokenizer), rope_parameters=rope))
    with pytest.raises(TunewizError, match="rope scaling 'dynamic'"):
        write_gguf(model, demo_tokenizer, None, [], tmp_path / "m.gguf", "f16", "t")


def test_phi3_longrope_writes_both_factor_tensors(demo_tokenizer: Any, tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFReader

    long, short = [1.0 + i / 4 for i in range(8)], [1.0 + i / 16 for i in range(8)]  # head_dim 16 -> 8 pairs
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": long, "short_factor": short,
            "original_max_position_embeddings": 64}
    model = random_model(tiny_config("phi3", len(demo_tokenizer), rope_parameters=rope,
                                     original_max_position_embeddings=64))
    write_gguf(model, demo_tokenizer, None, [], tmp_path / "m.gguf", "f16", "t")
    reader = GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert np.allclose(tensors["rope_factors_long.weight"], long)
    assert np.allclose(tensors["rope_factors_short.weight"], short)
    assert reader.fields["phi3.rope.scaling.original_context_length"].contents() == 64
    assert reader.fields["phi3.rope.scaling.attn_factor"].contents() > 1.0  # 256 positions over 64


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_gives_the_same_logits_in_llama_cpp(model_type: str, demo_tokenizer: Any, tmp_path: Path) -> None:
    """llama.cpp itself (what Ollama runs) reads the file as the model it came from; skipped without
    llama-cpp-python (the optional `llama` extra)."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    model = random_model(tiny_config(model_type, len(demo_tokenizer)))
    path = tmp_path / "model.gguf"
    write_gguf(model, demo_tokenizer, demo_tokenizer.chat_template, [], path, "f16", "tiny")
    ids = demo_tokenizer("The quick brown fox jumps over the lazy dog, twice.")["input_ids"]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    llm.close()
    expected = logits(model, ids).numpy()
    assert np.allclose(got, expected, atol=3e-2, rtol=1e-2), np.abs(got - expected).max()


@pytest.mark.parametrize("style", ["byte-level", "sentencepiece"])
def test_llama_cpp_tokenises_as_the_tokenizer(style: str, demo_tokenizer: Any, tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer = demo_tokenizer if style == "byte-level" else sentencepiece_style_tokenizer()
    path = tmp_path / "model.gguf"
    write_gguf(random_model(tiny_config("llama", len(tokenizer))), tokenizer, None, [], path, "f16", "tiny")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    texts = ["hello world", "<|im_start|>user\nPrices rose 12.5% in 2024 — café!<|im_end|>\n", "  two  spaces\n\n"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text, add_special_tokens=False)[
            "input_ids"], text
    llm.close()


def test_q4_k_m_is_quantised_by_llama_cpp_from_an_f16_file(demo_tokenizer: Any, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    # 320 columns: some rows are too short for q4_k's 256-wide blocks, which llama.cpp reports per tensor
    model = random_model(tiny_config("llama", len(demo_tokenizer), hidden_size=320, intermediate_size=512))
    folder = tmp_path / "out"
    folder.mkdir()
    lines: list[str] = []
    write_gguf(model, demo_tokenizer, None, [], folder / "m.gguf", "q4_k_m", "t", lines.append)
    assert [p.name for p in folder.iterdir()] == ["m.gguf"]  # the f16 intermediate is gone
    types = {t.name: t.tensor_type.name for t in GGUFReader(folder / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.0.attn_q.weight"] != "F16"
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # llama.cpp's per-tensor lines are kept out of the terminal
    assert "quantising to q4_k_m with llama.cpp" in lines and "stored them as q5_0/q8_0" in lines[-1]


@pytest.mark.parametrize("gguf_type,tolerance", [("bf16", 1e-1), ("q8_0", 1e-1)])
def test_bf16_and_q8_0_files_load_close_to_the_model(gguf_type: str, tolerance: float, demo_tokenizer: Any,
                                                     tmp_path: Path) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    model = random_model(tiny_config("llama", len(demo_tokenizer)))
    path = tmp_path / "model.gguf"
    write_gguf(model, demo_tokenizer, None, [], path, gguf_type, "tiny")
    assert {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}["blk.1.ffn_down.weight"] == gguf_type.upper()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = demo_tokenizer("The quick brown fox jumps over the lazy dog, twice.")["input_ids"]
    assert torch.allclose(logits(reloaded, ids), logits(model, ids), atol=tolerance)


def test_the_llama_cpp_check_runs_in_a_child_process(demo_tokenizer: Any, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from tunewiz.engine.data.chat import ChatEncoder
    from tunewiz.engine.use.export_check import Prompts, check_gguf

    path = tmp_path / "model.gguf"
    write_gguf(random_model(tiny_config("llama", len(demo_tokenizer))), demo_tokenizer, demo_tokenizer.chat_template,
               [], path, "f16", "tiny")
    encoder = ChatEncoder(demo_tokenizer)
    conversations = [[{"role": "user", "content": text}] for text in ("hello", "Prices rose 12% — café")]
    texts = [encoder.render(c, add_generation_prompt=True) for c in conversations]
    ids = [encoder.prompt_ids(c) for c in conversations]
    prompts = Prompts(conversations, ids, texts, ["", ""], 3, "test")
    lines: list[str] = []
    check = check_gguf(path, "GGUF f16", prompts, encoder, demo_tokenizer.chat_template, lines.append)
    assert lines == ["checking the GGUF file in llama.cpp"]
    assert (check.engine, check.total, check.tokenization_mismatches, check.template_stored) == (
        "llama.cpp", 2, 0, True)
