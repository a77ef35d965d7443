"""Label masking per data format: exactly the assistant tokens and their end-of-turn token are trained on."""

from __future__ import annotations

from typing import Any

import pytest

from tunewiz.engine.data import formats
from tunewiz.engine.data.chat import IGNORE_INDEX, ChatEncoder, Encoded


def supervised_text(tokenizer: Any, encoded: Encoded) -> list[str]:
    """The supervised tokens decoded as runs of consecutive positions."""
    runs, current = [], []
    for token_id, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            assert label == token_id
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


ROWS = {
    "messages": {"messages": [{"role": "system", "content": "Be terse."},
                              {"role": "user", "content": "Two plus two?"},
                              {"role": "assistant", "content": "Four."},
                              {"role": "user", "content": "And three plus three?"},
                              {"role": "assistant", "content": "Six."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Two plus two?"}, {"from": "gpt", "value": "Four."},
                                   {"from": "human", "value": "And three plus three?"},
                                   {"from": "gpt", "value": "Six."}]},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 2", "output": "Four."},
    "prompt_completion": {"prompt": "Two plus two?", "completion": "Four."},
}
EXPECTED = {"messages": ["Four.<|im_end|>", "Six.<|im_end|>"], "sharegpt": ["Four.<|im_end|>", "Six.<|im_end|>"],
            "alpaca": ["Four.<|im_end|>"], "prompt_completion": ["Four.<|im_end|>"]}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_only_assistant_answers_and_eos_are_supervised(fmt: str, demo_tokenizer: Any) -> None:
    assert formats.detect(ROWS[fmt], {}) == fmt
    example = formats.normalise(ROWS[fmt], fmt, {})
    encoded = ChatEncoder(demo_tokenizer).encode(example)
    assert supervised_text(demo_tokenizer, encoded) == EXPECTED[fmt]
    assert demo_tokenizer.decode(encoded.input_ids).count("<|im_start|>user") == len(EXPECTED[fmt])
    assert encoded.input_ids[-2] == demo_tokenizer.eos_token_id  # then the template's trailing newline


def test_plain_text_is_supervised_whole_with_eos(demo_tokenizer: Any) -> None:
    example = formats.normalise({"text": "Once upon a time."}, "text", {})
    encoded = ChatEncoder(demo_tokenizer).encode(example)
    assert encoded.labels == encoded.input_ids
    assert encoded.input_ids[-1] == demo_tokenizer.eos_token_id


def test_column_mapping(demo_tokenizer: Any) -> None:
    row = {"question": "Capital of France?", "answer": "Paris."}
    columns = {"instruction": "question", "output": "answer"}
    assert formats.detect(row, {}) is None
    assert formats.detect(row, columns) == "alpaca"
    encoded = ChatEncoder(demo_tokenizer).encode(formats.normalise(row, "alpaca", columns))
    assert supervised_text(demo_tokenizer, encoded) == ["Paris.<|im_end|>"]


def test_template_without_eos_gets_one(demo_tokenizer: Any) -> None:
    """A template that ends assistant turns with no stop token gets the tokenizer's EOS inserted."""
    bare = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    encoded = ChatEncoder(demo_tokenizer, bare).encode(formats.normalise(ROWS["messages"], "messages", {}))
    # " Four" is one token that starts with the prompt's space: it is trained on, as it carries the answer
    assert [run.strip() for run in supervised_text(demo_tokenizer, encoded)] == ["Four.<|im_end|>", "Six.<|im_end|>"]
    assert "user: Two plus two?" in demo_tokenizer.decode(encoded.input_ids)


def test_named_chatml_template_on_a_model(demo_tokenizer: Any) -> None:
    from tunewiz.engine.data.chat import resolve_template

    encoder = ChatEncoder(demo_tokenizer, resolve_template("chatml", demo_tokenizer))
    encoded = encoder.encode(formats.normalise(ROWS["alpaca"], "alpaca", {}))
    assert supervised_text(demo_tokenizer, encoded) == ["Four.<|im_end|>"]
    assert "You are a helpful" not in demo_tokenizer.decode(encoded.input_ids)  # not the model's own template


def test_generation_prompt_matches_training_context(demo_tokenizer: Any) -> None:
    """What the model sees before an answer in training is exactly what it is prompted with later."""
    encoder = ChatEncoder(demo_tokenizer)
    example = formats.normalise(ROWS["prompt_completion"], "prompt_completion", {})
    encoded = encoder.encode(example)
    first = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert encoded.input_ids[:first] == encoder.prompt_ids(example.as_dicts()[:-1])


@pytest.mark.parametrize(
    ("row", "fmt", "kind"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no_assistant"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                       {"role": "user", "content": "bye"}]}, "messages", "not_ending_with_assistant"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "unknown_role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "non_string"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages", "empty_field"),
        ({"messages": []}, "messages", "empty_field"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "unknown_role"),
        ({"instruction": "", "output": "x"}, "alpaca", "empty_field"),
        ({"instruction": "x"}, "alpaca", "missing_field"),
        ({"text": ["a"]}, "text", "non_string"),
        ([1, 2], "text", "not_object"),
    ],
)
def test_row_problems(row: Any, fmt: str, kind: str) -> None:
    with pytest.raises(formats.RowProblem) as info:
        formats.normalise(row, fmt, {})
    assert info.value.kind == kind
