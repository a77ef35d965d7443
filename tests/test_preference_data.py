"""Preference data: the `preference` format, pair encoding (masking as for SFT), the data check's pair
problems and lengths, and clear errors for data or settings a preference run cannot use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunewiz.engine.config.spec import RunSpec, SpecError, loads
from tunewiz.engine.data import check, formats, sources
from tunewiz.engine.data.chat import IGNORE_INDEX, ChatEncoder
from tunewiz.engine.data.formats import Example, RowProblem
from tunewiz.engine.data.pairs import EncodedPair, encode_pair, prepare_pairs, trim_pair
from tunewiz.engine.errors import DataError

PAIR = {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "Well, let me think about numbers for a while."}
CONVERSATIONS = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                 "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Greetings, human."}]}


def test_preference_rows_are_detected_and_normalised() -> None:
    assert formats.detect(PAIR, {}) == "preference"
    assert formats.detect(CONVERSATIONS, {}) == "preference"
    assert formats.detect({"question": "q", "chosen": "a", "rejected": "b"}, {"prompt": "question"}) == "preference"
    example = formats.normalise(PAIR, "preference", {})
    assert example.messages == (("user", PAIR["prompt"]), ("assistant", "4."))
    assert example.rejected == PAIR["rejected"]
    whole = formats.normalise(CONVERSATIONS, "preference", {})
    assert whole.messages == (("user", "Hi"), ("assistant", "Hello!")) and whole.rejected == "Greetings, human."
    system = formats.normalise({**PAIR, "system": "Be brief."}, "preference", {})
    assert system.messages[0] == ("system", "Be brief.")


@pytest.mark.parametrize(("row", "kind", "words"), [
    ({**PAIR, "rejected": " 4. "}, "same_answers", "the same"),
    ({**PAIR, "chosen": "  "}, "empty_answer", "chosen answer is empty"),
    ({**PAIR, "rejected": None}, "empty_answer", "rejected answer is empty"),
    ({**CONVERSATIONS, "rejected": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Yo"}]},
     "prompts_differ", "differ at turn 1"),
    ({"chosen": "a", "rejected": "b"}, "missing_field", "no prompt"),
    ({**CONVERSATIONS, "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
     "empty_answer", "chosen answer is empty"),
])
def test_unusable_pairs_say_why(row: dict[str, Any], kind: str, words: str) -> None:
    with pytest.raises(RowProblem) as caught:
        formats.normalise(row, "preference", {})
    assert caught.value.kind == kind and words in str(caught.value)


def test_a_pair_is_masked_like_supervised_data(demo_tokenizer: Any) -> None:
    encoder = ChatEncoder(demo_tokenizer)
    example = formats.normalise(PAIR, "preference", {})
    pair = encode_pair(encoder, example)
    decode = demo_tokenizer.decode
    assert decode(pair.prompt_ids).endswith("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert decode(pair.chosen_ids) == "4.<|im_end|>"
    assert decode(pair.rejected_ids) == PAIR["rejected"] + "<|im_end|>"
    # the chosen side is exactly what SFT trains on for the same conversation
    sft = encoder.encode(Example(messages=example.messages))
    assert [t for t in sft.labels if t != IGNORE_INDEX] == pair.chosen_ids
    assert sft.input_ids[:len(pair.prompt_ids)] == pair.prompt_ids


def test_trimming_cuts_answers_and_drops_prompts_that_fill_the_limit() -> None:
    pair = EncodedPair([1, 2, 3], [4, 5], [6, 7, 8, 9])
    assert trim_pair(pair, 10) == (pair, False, None)
    assert trim_pair(pair, 5) == (EncodedPair([1, 2, 3], [4, 5], [6, 7]), True, None)
    assert trim_pair(pair, 3)[2] == "truncated_before_answer"


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_data_check_reports_each_pair_problem_with_its_line_and_the_answer_lengths(tmp_path: Path,
                                                                                 demo_tokenizer: Any) -> None:
    rows = [PAIR, {**PAIR, "rejected": "4."}, {**PAIR, "chosen": ""},
            {**CONVERSATIONS, "rejected": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "x"}]},
            {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "There are so many colours to choose from."},
            PAIR]
    source = sources.DataSource("file", str(_write(tmp_path / "pairs.jsonl", rows)))
    report = check.check(source, ChatEncoder(demo_tokenizer), 256)
    assert report.format == "preference" and report.rows == 6 and report.examples == 3
    found = {(p.line, p.kind) for p in report.problems}
    assert found == {(2, "same_answers"), (3, "empty_answer"), (4, "prompts_differ"), (6, "duplicate")}
    assert all(p.where == f"pairs.jsonl:{p.line}" for p in report.problems)
    chosen, rejected = report.answer_lengths["chosen"], report.answer_lengths["rejected"]
    assert chosen["max"] == 3 and rejected["max"] > chosen["max"]  # "Blue.<|im_end|>" / the long one


def test_supervised_data_has_no_answer_lengths(tmp_path: Path, demo_tokenizer: Any) -> None:
    path = _write(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    assert check.check(sources.DataSource("file", str(path)), ChatEncoder(demo_tokenizer), 64).answer_lengths == {}


def _spec(source: Path, objective: str = "dpo") -> RunSpec:
    spec = RunSpec(name="t")
    spec.dataset.source = str(source)
    spec.dataset.eval_fraction = 0.0
    spec.training.objective = objective  # type: ignore[assignment]
    return spec


def test_a_preference_objective_on_supervised_data_is_a_clear_error(tmp_path: Path, demo_tokenizer: Any) -> None:
    path = _write(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError) as caught:
        prepare_pairs(_spec(path), demo_tokenizer)
    assert "training.objective = 'dpo' learns from preference pairs" in str(caught.value)
    assert "prompt_completion data" in str(caught.value) and "training.objective = \"sft\"" in caught.value.hint


def test_pairs_that_cannot_fit_are_counted_and_none_left_is_an_error(tmp_path: Path, demo_tokenizer: Any) -> None:
    path = _write(tmp_path / "pairs.jsonl", [PAIR, {**PAIR, "rejected": "4."}])
    spec = _spec(path)
    data = prepare_pairs(spec, demo_tokenizer)
    assert len(data.train) == 1 and data.stats["dropped"] == {"same_answers": 1}
    assert data.stats["answer_lengths"]["chosen"]["max"] == 3
    spec.training.max_seq_length = 16  # the prompt alone (with SmolLM2's system message) is longer
    with pytest.raises(DataError, match="no trainable preference pairs"):
        prepare_pairs(spec, demo_tokenizer)


def test_the_spec_takes_an_objective_and_refuses_packing_with_pairs() -> None:
    spec = loads('name = "t"\n[dataset]\npreset = "concise"\n[training]\nobjective = "orpo"\nbeta = 0.2\n')
    assert spec.training.objective == "orpo" and spec.training.beta == 0.2
    with pytest.raises(SpecError, match=r"training.objective: 'dop': expected one of .*did you mean 'dpo'"):
        loads('name = "t"\n[dataset]\npreset = "concise"\n[training]\nobjective = "dop"\n')
    with pytest.raises(SpecError, match=r"spec:6: training.packing: objective 'dpo' compares whole answer pairs"):
        loads('name = "t"\n[dataset]\npreset = "concise"\n[training]\nobjective = "dpo"\npacking = true\n')


def test_train_refuses_a_preference_objective_on_supervised_data_before_making_a_run(
        demo_model: Path, tunewiz_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tunewiz.engine import locations
    from tunewiz.engine.cli.main import main

    code = main(["train", "demo", "--set", "training.objective=dpo", "--detach"])
    assert code != 0
    assert "learns from preference pairs, and train.jsonl is messages data" in capsys.readouterr().err
    runs = locations.runs_dir()
    assert not runs.exists() or not any(runs.iterdir())  # nothing half-made


def test_the_cli_prints_preference_events_as_a_line() -> None:
    from tunewiz.engine.render import format_event
    from tunewiz.engine.run.events import Event

    line = format_event(Event(1, 1, 0.0, "preference", {"step": 3, "split": "eval", "chosen_reward": 0.25,
                                                        "rejected_reward": -1.5, "margin": 1.75, "accuracy": 0.5}))
    assert line.endswith("eval rewards at step 3: chosen 0.250  rejected -1.500  margin 1.750  accuracy 50%")
