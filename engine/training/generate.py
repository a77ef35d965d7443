"""Greedy answers to chat prompts: used for the `sample` events and to compare exports."""

from __future__ import annotations

from typing import Any

from tunewiz.engine.data.chat import ChatEncoder


def answer(model: Any, encoder: ChatEncoder, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """The model's greedy reply to `messages` (its weights are left in whatever mode they were)."""
    import torch

    ids = encoder.prompt_ids(messages)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                    eos_token_id=encoder.stop_token_ids or None,
                                    pad_token_id=encoder.tokenizer.pad_token_id)
    finally:
        if was_training:
            model.train()
    return encoder.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()


def answers(model: Any, encoder: ChatEncoder, prompts: list[list[dict[str, str]]], max_new_tokens: int
            ) -> list[str]:
    return [answer(model, encoder, messages, max_new_tokens) for messages in prompts]


def matches(reply: str, reference: str) -> bool:
    """Loose equality for short answers: case, surrounding spaces and final punctuation ignored."""
    def clean(text: str) -> str:
        return text.strip().strip(".!").strip().lower()

    return clean(reply) == clean(reference)
