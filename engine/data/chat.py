"""Rendering conversations with a chat template and deciding which tokens are trained on.

The supervised tokens are derived from the template itself: for each assistant turn, the text the
template produces for the conversation up to that turn's generation prompt is the context, and what
the turn adds after it, up to and including the end-of-turn token, is the answer. Nothing here
knows any template's markers. Every assistant turn must end with a token that stops generation; if
the template writes none, the tokenizer's EOS is inserted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunewiz.engine.data.formats import Example
from tunewiz.engine.errors import DataError

IGNORE_INDEX = -100

NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


@dataclass
class Encoded:
    """Token ids of one example and its labels (IGNORE_INDEX where not trained on)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def resolve_template(name: str | None, tokenizer: Any) -> str | None:
    """The Jinja template to use: a named one, a file's contents, or None for the tokenizer's own."""
    if name is None:
        return None
    if name in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name]
    path = Path(name).expanduser()
    if path.exists():
        return path.read_text(encoding="utf-8")
    raise DataError(f"dataset.chat_template {name!r} is neither a named template nor a file",
                    hint=f"named templates: {', '.join(NAMED_TEMPLATES)}; or a path to a Jinja file; or leave it "
                         "unset to use the model's own template")


class ChatEncoder:
    """Encodes examples for one tokenizer and chat template."""

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.has_template = template is not None or bool(getattr(tokenizer, "chat_template", None))
        self.end_tokens = self._end_tokens()

    def _end_tokens(self) -> list[str]:
        """Token strings that stop generation (more come from the model's generation config)."""
        return [self.tokenizer.eos_token] if self.tokenizer.eos_token else []

    def add_stop_ids(self, ids: list[int]) -> None:
        """Also accept these ids (from the model's generation config) as end-of-turn tokens."""
        for token_id in ids:
            token = self.tokenizer.convert_ids_to_tokens(int(token_id))
            if token and token not in self.end_tokens:
                self.end_tokens.append(token)

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(t) for t in self.end_tokens]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if not self.has_template:
            raise DataError("this model has no chat template, and the data is conversational",
                            hint="set dataset.chat_template (chatml, llama3 or alpaca), or use an instruct model")
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation's context with the assistant's generation prompt appended."""
        text = self.render(messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, example: Example) -> Encoded:
        if not example.is_chat:
            return self._encode_text(example.text or "")
        messages = example.as_dicts()
        text, spans = self._supervised_spans(messages)
        return self._label(text, spans)

    def _encode_text(self, text: str) -> Encoded:
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return Encoded(ids, list(ids))

    def _answer_end(self, text: str, start: int, end: int) -> int | None:
        """End of the first stop token inside text[start:end], or None when the turn has none."""
        best = None
        for token in self.end_tokens:
            found = text.find(token, start, end)
            if found >= 0 and (best is None or found + len(token) < best):
                best = found + len(token)
        return best

    def _supervised_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The full rendered text and the character spans of every assistant answer (with its stop token)."""
        full = self.render(messages)
        raw_spans = []
        cursor = 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:index], add_generation_prompt=True)
            upto = self.render(messages[: index + 1])
            if upto.startswith(prefix) and full.startswith(upto) and len(prefix) >= cursor:
                start, end = len(prefix), len(upto)
            else:
                # Templates that rewrite earlier turns (e.g. dropping old reasoning) are not
                # prefix-stable: find the answer text itself and extend it to the stop token.
                start = full.find(message["content"].strip(), cursor)
                if start < 0:
                    raise DataError("the chat template changes assistant text, so the trained tokens cannot be "
                                    "located", hint="set dataset.chat_template to a named template")
                end = len(full)
            raw_spans.append((start, end))
            cursor = start
        # Cut each span after its stop token, or insert an EOS where the template wrote none.
        pieces, spans, shift, last = [], [], 0, 0
        eos = self.tokenizer.eos_token or ""
        for start, end in raw_spans:
            stop = self._answer_end(full, start, end)
            if stop is None:
                answer_end = start + len(full[start:end].rstrip())
                if start >= answer_end:
                    answer_end = end
                pieces.append(full[last:answer_end] + eos)
                spans.append((start + shift, answer_end + shift + len(eos)))
                shift += len(eos)
                last = answer_end
            else:
                spans.append((start + shift, stop + shift))
        pieces.append(full[last:])
        return "".join(pieces), spans

    def _label(self, text: str, spans: list[tuple[int, int]]) -> Encoded:
        if self.tokenizer.is_fast:
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(encoding["input_ids"])
            labels = []
            for token_id, (s, e) in zip(ids, encoding["offset_mapping"]):
                inside = any(s < span_end and e > span_start for span_start, span_end in spans) and e > s
                labels.append(token_id if inside else IGNORE_INDEX)
            return Encoded(ids, labels)
        ids, labels, last = [], [], 0
        for start, end in spans:
            for piece, train in ((text[last:start], False), (text[start:end], True)):
                piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
                ids += piece_ids
                labels += piece_ids if train else [IGNORE_INDEX] * len(piece_ids)
            last = end
        tail = self.tokenizer(text[last:], add_special_tokens=False)["input_ids"] if text[last:] else []
        return Encoded(ids + tail, labels + [IGNORE_INDEX] * len(tail))
