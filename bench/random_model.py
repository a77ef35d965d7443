"""Randomly initialised models of real architectures, so GPU work needs no weight download.

`python -m bench.random_model SHAPE OUT --tokenizer DIR` writes a model folder (config, random
bf16 safetensors, and the tokenizer files copied from DIR) that `model.name` can point at.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

# Architecture facts of public checkpoints (from their config.json files).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def make(shape: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a random-init LlamaForCausalLM of `shape` to `out` (skipped when it exists)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
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
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer files to copy")
    args = parser.parse_args()
    print(make(args.shape, args.out, args.tokenizer))


if __name__ == "__main__":
    main()
