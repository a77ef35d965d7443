"""Held-out accuracy of the demo task, measured by generation (not by loss)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunewiz.engine.config.presets import presets_root
from tunewiz.engine.data.chat import ChatEncoder
from tunewiz.engine.training.generate import answer, matches

HELDOUT = presets_root() / "datasets" / "demo" / "heldout.jsonl"


def heldout_prompts(limit: int | None = None) -> list[tuple[list[dict[str, str]], str]]:
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    return [(row["messages"][:-1], row["messages"][-1]["content"]) for row in rows[:limit]]


def replies(model: Any, tokenizer: Any, prompts: list[tuple[list[dict[str, str]], str]]) -> list[str]:
    encoder = ChatEncoder(tokenizer)
    return [answer(model, encoder, messages, max_new_tokens=6) for messages, _ in prompts]


def accuracy(model: Any, tokenizer: Any, prompts: list[tuple[list[dict[str, str]], str]]) -> float:
    got = replies(model, tokenizer, prompts)
    return sum(matches(reply, ref) for reply, (_, ref) in zip(got, prompts)) / len(prompts)


def load_base(model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            AutoTokenizer.from_pretrained(model_dir))
