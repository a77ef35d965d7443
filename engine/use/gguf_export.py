"""Writing a merged model as one GGUF file (the format llama.cpp, Ollama and LM Studio read).

The file holds the architecture's hyperparameters, every weight under llama.cpp's tensor names in
the chosen type, and the tokenizer with its chat template and stop ids (engine/use/gguf_vocab.py).
Weights are converted and written one tensor at a time, so memory holds one converted tensor.
k-quants (q4_k_m) come from llama.cpp's own quantizer (the optional `llama-cpp-python` package),
run on an f16 file written first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunewiz.engine.errors import TunewizError
from tunewiz.engine.use.gguf_vocab import read_vocab

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")
BYTES_PER_WEIGHT = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_k_m": 0.6}  # for the disk-space check
LLAMA_EXTRA = "llama"  # pyproject.toml's optional extra that brings llama-cpp-python


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model type maps onto a llama.cpp architecture."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's llama graph rotates interleaved pairs, HF rotates halves
    norm_offset: float = 0.0  # Gemma stores norm weights as (w - 1); llama.cpp wants w
    head_dims: bool = False  # write attention key/value lengths even when they equal hidden / heads


FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),  # GGUF stores Mistral as llama
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3", head_dims=True),
    "gemma2": Family("GEMMA2", norm_offset=1.0, head_dims=True),
    "phi3": Family("PHI3"),
}
FAMILY_NAMES = "Llama (also SmolLM), Mistral, Qwen2, Qwen3, Gemma 2 and Phi-3"


def family_of(model_type: str) -> Family:
    """The family of a config's model_type; a TunewizError naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise TunewizError(f"GGUF export does not support the {model_type!r} architecture yet",
                           hint=f"it supports {FAMILY_NAMES}; export a merged model instead "
                                "(tunewiz export RUN --merged) and convert it with llama.cpp's convert_hf_to_gguf.py")
    return FAMILIES[model_type]


def check_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise TunewizError(f"--gguf {gguf_type!r} is not a type tunewiz writes",
                           hint=f"use one of {', '.join(GGUF_TYPES)}")
    if gguf_type == "q4_k_m":
        llama_quantizer()


def llama_quantizer() -> Any:
    """llama.cpp's Python binding, which k-quants need; a clear error naming the extra without it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise TunewizError("q4_k_m needs llama.cpp's quantizer, from the optional llama-cpp-python package",
                           hint=f"install it: pip install 'tunewiz[{LLAMA_EXTRA}]' (or pip install llama-cpp-python); "
                                "f16, bf16 and q8_0 need nothing more") from exc
    return llama_cpp


def _rope(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in params and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # per-layer-type parameters (Gemma)
    return dict(params)


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _llama3_rope_factors(config: Any, rope: dict[str, Any]) -> Any:
    """Llama 3.1's long-context frequency scaling, as the per-dimension divisors llama.cpp reads."""
    import numpy as np

    dim = _head_dim(config)
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_context / high, 1.0,
                       np.where(wavelen > old_context / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _write_metadata(writer: Any, config: Any, family: Family, name: str, file_type: int) -> list[tuple[str, Any]]:
    """Hyperparameters under the architecture's keys; returns extra tensors the rope scaling needs."""
    import gguf
    import numpy as np

    rope = _rope(config)
    heads, head_dim = config.num_attention_heads, _head_dim(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    if family.head_dims or head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rotary = int(getattr(config, "partial_rotary_factor", None) or rope.get("partial_rotary_factor", 1.0)
                 * head_dim)
    writer.add_rope_dimension_count(rotary)
    if family.arch == "GEMMA2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    if family.arch == "PHI3":
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    extra: list[tuple[str, Any]] = []
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "llama3" and family.arch == "LLAMA":
        extra.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(config, rope)))
    elif rope_type == "longrope" and family.arch == "PHI3":
        original = rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        for tensor, key in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"),
                            (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor")):
            extra.append((gguf.TENSOR_NAMES[tensor] + ".weight", np.asarray(rope[key], dtype=np.float32)))
    elif rope_type != "default":
        raise TunewizError(f"GGUF export does not support rope scaling {rope_type!r} for {config.model_type}",
                           hint="export a merged model instead (tunewiz export RUN --merged)")
    return extra


def _permute(weights: Any, heads: int) -> Any:
    """Reorder each head's rows from HF's two halves to llama.cpp's interleaved rotary pairs."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _tensors(model: Any, family: Family) -> Iterator[tuple[str, tuple[int, ...], Callable[[], Any]]]:
    """(GGUF name, shape, a function giving the float32 numpy array) for every weight, in file order."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunewizError(f"no GGUF name for the weight {hf_name} of this {config.model_type} model",
                               hint="export a merged model instead (tunewiz export RUN --merged)")

        def load(tensor: Any = tensor, name: str = name) -> Any:
            data = tensor.detach().float().cpu().numpy()
            if family.permute_qk and name.endswith(("attn_q.weight", "attn_q.bias")):
                data = _permute(data, heads)
            elif family.permute_qk and name.endswith(("attn_k.weight", "attn_k.bias")):
                data = _permute(data, kv_heads)
            if family.norm_offset and name.endswith("norm.weight"):
                data = data + family.norm_offset
            return data

        yield name, tuple(tensor.shape), load


def _storage(name: str, shape: tuple[int, ...], gguf_type: str) -> Any:
    """The GGML type a tensor is stored in: vectors stay float32, matrices take the export type."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or name.startswith("rope_"):
        return q.F32
    if gguf_type == "q8_0" and shape[-1] % 32 == 0:
        return q.Q8_0
    return q.BF16 if gguf_type == "bf16" else q.F16


def _encode(data: Any, qtype: Any) -> Any:
    import gguf
    import numpy as np

    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return data.astype(np.float32)
    if qtype == q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def write_gguf(model: Any, tokenizer: Any, chat_template: str | None, stop_ids: list[int], path: Path,
               gguf_type: str, name: str, on_progress: Callable[[str], None] | None = None) -> None:
    """Write the merged `model` with its tokenizer to `path` as one GGUF file of `gguf_type`."""
    import gguf
    import numpy as np

    say = on_progress or (lambda _msg: None)
    check_type(gguf_type)
    family = family_of(model.config.model_type)
    if gguf_type == "q4_k_m":
        staging = path.with_name(path.name + ".f16")
        try:
            write_gguf(model, tokenizer, chat_template, stop_ids, staging, "f16", name, on_progress)
            _quantize_k(staging, path, say)
        finally:
            staging.unlink(missing_ok=True)
        return
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
    extra = _write_metadata(writer, model.config, family, name, int(file_type))
    read_vocab(tokenizer, model.config.vocab_size, chat_template, stop_ids).add_to(writer)
    plan = [(n, tuple(d.shape), lambda d=d: d) for n, d in extra] + list(_tensors(model, family))
    stored = []
    for tensor_name, shape, _load in plan:
        qtype = _storage(tensor_name, shape, gguf_type)
        stored.append(qtype)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(tensor_name, shape, dtype, math.prod(shape) * dtype.itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(tensor_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, ((_name, _shape, load), qtype) in enumerate(zip(plan, stored), 1):
        writer.write_tensor_data(_encode(load(), qtype))
        if index % 20 == 0 or index == len(plan):
            say(f"converting to {gguf_type}: {index}/{len(plan)} tensors")
    writer.close()


def _quantize_k(source: Path, target: Path, say: Callable[[str], None]) -> None:
    """llama.cpp's own quantizer: f16 GGUF in, q4_k_m GGUF out (its mixed k-quant recipe).

    llama.cpp reports every tensor, partly from C past Python's logging; that output goes to a
    temporary file, and only its summary (tensors that needed a fallback type) is passed on."""
    import contextlib
    import ctypes
    import logging
    import os
    import re
    import sys
    import tempfile

    llama_cpp = llama_quantizer()
    logger = logging.getLogger("llama-cpp-python")  # its log callback prints every tensor to stderr
    level = logger.level
    say("quantising to q4_k_m with llama.cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    with tempfile.TemporaryFile("w+") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            logger.setLevel(logging.ERROR)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its Python log callback
                code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                                      ctypes.byref(params))
        finally:
            logger.setLevel(level)
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
        log.seek(0)
        text = log.read()
    if code != 0:
        target.unlink(missing_ok=True)
        raise TunewizError(f"llama.cpp's quantizer failed (code {code}) on {source.name}: {text.strip()[-300:]}",
                           hint="try --gguf q8_0, which needs no quantizer")
    fallback = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", text)
    if fallback:
        say(f"{fallback.group(1)} of {fallback.group(2)} tensors have rows too short for q4_k blocks of 256; "
            "llama.cpp stored them as q5_0/q8_0")
