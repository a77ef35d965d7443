"""Randomly initialised models shaped like catalog models, so GPU work needs no weight download.

`python -m bench.random_model SHAPE OUT --tokenizer DIR` writes a model folder (config, random
bf16 safetensors, and the tokenizer files copied from DIR) that `model.name` can point at.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from tunewiz.engine.config import catalog

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def llama_config(shape: str) -> Any:
    """A Llama config with the architecture of catalog model `shape` (presets/models.toml)."""
    from transformers import LlamaConfig

    e = catalog.models()[shape]
    return LlamaConfig(hidden_size=e.hidden, intermediate_size=e.intermediate, num_hidden_layers=e.layers,
                       num_attention_heads=e.heads, num_key_value_heads=e.kv_heads, head_dim=e.head_dim,
                       vocab_size=e.vocab, tie_word_embeddings=e.tied_embeddings,
                       max_position_embeddings=e.context, bos_token_id=1, eos_token_id=2)


def make(shape: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a random-init LlamaForCausalLM shaped like catalog model `shape` to `out` (kept if it exists)."""
    import torch
    from transformers import LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    config = llama_config(shape)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, staging / name)
    staging.rename(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU to the engine process that trains it
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shape", choices=sorted(catalog.models()), help="a catalog model whose shape to copy")
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer files to copy")
    args = parser.parse_args()
    print(make(args.shape, args.out, args.tokenizer))


if __name__ == "__main__":
    main()
