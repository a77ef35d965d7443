"""The data checker: each problem kind with its exact line, token statistics, and `tunewiz data check`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tunewiz.engine.cli.main import main
from tunewiz.engine.data import check, sources
from tunewiz.engine.data.chat import ChatEncoder
from tunewiz.engine.data.prepare import ExampleReader
from tunewiz.engine.errors import DataError


def chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_lines(path: Path, lines: list[str | dict[str, Any] | list[Any]]) -> Path:
    """One line per item: strings verbatim, anything else as JSON."""
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines),
                    encoding="utf-8")
    return path


def run_check(path: Path, tokenizer: Any, max_seq_length: int = 2048, **source: Any) -> check.CheckReport:
    return check.check(sources.DataSource("file", str(path), **source), ChatEncoder(tokenizer), max_seq_length)


# (kind, a line that has it); each goes on its own line after a good first row, which fixes the format.
BROKEN = [
    ("invalid_json", '{"messages": [{"role": "user", "content": "cut off'),
    ("not_object", ["a", "list"]),
    ("missing_field", {"conversation": []}),
    ("empty_field", chat("Hello?", "   ")),
    ("non_string", {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}),
    ("unknown_role", {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}),
    ("not_ending_with_assistant", {"messages": chat("Hi", "Hello")["messages"] + [{"role": "user",
                                                                                  "content": "Bye"}]}),
    ("no_assistant", {"messages": [{"role": "user", "content": "Anyone there?"}]}),
    ("misplaced_system", {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be nice"},
                                       {"role": "assistant", "content": "Hello"}]}),
    ("duplicate", chat("What is 2 + 2?", "4")),
]


def test_each_problem_kind_is_reported_at_its_line(tmp_path: Path, demo_tokenizer: Any) -> None:
    lines: list[Any] = [chat("What is 2 + 2?", "4"), ""]  # line 2 is blank: line numbers still count it
    expected = {}
    for kind, line in BROKEN:
        lines.append(line)
        expected[kind] = len(lines)
    lines.append(chat("Name a colour.", "Blue."))
    report = run_check(write_lines(tmp_path / "broken.jsonl", lines), demo_tokenizer)
    assert {p.kind: p.line for p in report.problems} == expected
    assert report.problem_counts == {kind: 1 for kind in expected}
    assert [p.where for p in report.problems][:2] == [f"broken.jsonl:{expected['invalid_json']}",
                                                      f"broken.jsonl:{expected['not_object']}"]
    assert report.rows == len(lines) - 1  # blank lines are not rows
    assert report.examples == 3  # the first row, its duplicate (still trained on) and the last row
    assert report.skipped == len(BROKEN) - 1
    assert not report.ok


def test_undecodable_bytes_and_unknown_labels(tmp_path: Path, demo_tokenizer: Any) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_bytes(b'{"text": "Shares jump", "label": 1}\n{"text": "caf\xe9", "label": 0}\n'
                     b'{"text": "Profit warning", "label": 0}\n{"text": "New CEO", "label": 9}\n')
    report = run_check(path, demo_tokenizer, format="alpaca", columns=(("instruction", "text"), ("output", "label")),
                       label_names={"output": {"0": "negative", "1": "positive"}})
    assert [(p.line, p.kind) for p in report.problems] == [(2, "undecodable"), (4, "unknown_label")]
    assert report.examples == 2


def test_truncation_and_rows_cut_before_their_answer(tmp_path: Path, demo_tokenizer: Any) -> None:
    long_question = "word " * 300
    path = write_lines(tmp_path / "long.jsonl", [chat("Short?", "Yes."), chat(long_question, "An answer."),
                                                 chat("Tell me a long story.", "Once upon a time " * 100)])
    full = run_check(path, demo_tokenizer)
    assert full.truncated == 0 and full.token_lengths["max"] > 300 and full.token_lengths["min"] < 100
    cut = run_check(path, demo_tokenizer, max_seq_length=100)
    assert cut.truncated == 2
    assert [(p.line, p.kind) for p in cut.problems] == [(2, "truncated_before_answer")]
    assert cut.examples == 2
    assert cut.supervised_tokens_cut > 0
    assert cut.supervised_tokens + cut.supervised_tokens_cut < full.supervised_tokens
    assert cut.tokens <= 2 * 100


def test_token_statistics_and_the_rendered_example(tmp_path: Path, demo_tokenizer: Any) -> None:
    rows = [chat(f"What is {i} + {i}?", str(2 * i)) for i in range(1, 21)]
    path = write_lines(tmp_path / "sums.jsonl", rows)
    report = run_check(path, demo_tokenizer)
    encoder = ChatEncoder(demo_tokenizer)
    reader = ExampleReader(sources.DataSource("file", str(path)))
    encoded = [encoder.encode(example) for _row, example in reader]
    lengths = sorted(len(e.input_ids) for e in encoded)
    assert report.ok and report.format == "messages" and (report.rows, report.examples) == (20, 20)
    assert report.token_lengths["max"] == lengths[-1] and report.token_lengths["min"] == lengths[0]
    assert report.token_lengths["p50"] == lengths[10]
    assert report.supervised_tokens == sum(e.supervised for e in encoded)
    assert report.tokens == sum(lengths)
    assert report.example_where == "sums.jsonl:1"
    assert "".join(s.text for s in report.example) == demo_tokenizer.decode(encoded[0].input_ids)
    assert [s.text for s in report.example if s.trained] == ["2<|im_end|>"]
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["ok"] is True and as_json["example"][0]["trained"] is False


def test_progress_is_reported_in_bytes(tmp_path: Path, demo_tokenizer: Any) -> None:
    path = write_lines(tmp_path / "p.jsonl", [chat(f"Question {i}?", f"Answer {i}.") for i in range(300)])
    calls: list[tuple[int, int]] = []
    report = check.check(sources.DataSource("file", str(path)), ChatEncoder(demo_tokenizer), 2048,
                         on_progress=lambda done, total: calls.append((done, total)))
    size = path.stat().st_size
    assert calls[-1] == (size, size) and report.bytes_read == size
    assert 10 < len(calls) <= 102
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_csv_rows_keep_their_line_numbers(tmp_path: Path, demo_tokenizer: Any) -> None:
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\nCapital of France?,Paris\n"Two\nlines?",\nLargest planet?,Jupiter\n',
                    encoding="utf-8")
    report = run_check(path, demo_tokenizer, columns=(("instruction", "question"), ("output", "answer")))
    assert [(p.line, p.kind) for p in report.problems] == [(4, "empty_field")]
    assert report.examples == 2 and report.bytes_read == path.stat().st_size


def test_listed_problems_are_capped_but_counted(tmp_path: Path, demo_tokenizer: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "LISTED_PROBLEMS", 3)
    path = write_lines(tmp_path / "many.jsonl", [chat("Hi", "Hello")] + ["{broken"] * 10)
    report = run_check(path, demo_tokenizer)
    assert [p.line for p in report.problems] == [2, 3, 4]
    assert report.problem_counts == {"invalid_json": 10}


def test_length_sample_stays_bounded() -> None:
    lengths = check._Lengths(size=100)
    for value in range(1, 10_001):
        lengths.add(value)
    summary = lengths.summary()
    assert len(lengths.sample) == 100
    assert (summary["min"], summary["max"], summary["mean"]) == (1, 10_000, 5000.5)
    assert 3000 < summary["p50"] < 7000


def test_a_format_that_cannot_be_detected_stops_the_check(tmp_path: Path, demo_tokenizer: Any) -> None:
    path = write_lines(tmp_path / "odd.jsonl", [{"q": "a", "r": "b"}])
    with pytest.raises(DataError, match="cannot tell the data format"):
        run_check(path, demo_tokenizer)


# The command line, in-process.

def test_cli_check_of_a_file_lists_problems_with_lines(tmp_path: Path, demo_model: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lines(tmp_path / "d.jsonl", [chat("Hi", "Hello"), "{oops", chat("Hi", "Hello"),
                                              {"messages": [{"role": "user", "content": "Only a question"}]}])
    assert main(["data", "check", str(path), "--max-seq-len", "512"]) == 1
    out = capsys.readouterr().out
    assert "invalid_json" in out and "duplicate" in out and "no_assistant" in out
    for line, kind in ((2, "invalid_json"), (3, "duplicate"), (4, "no_assistant")):
        assert re.search(rf"\b{line}\b\W+{kind}", out), out
    assert "rows training would skip" in out and "truncated at 512 tokens" in out
    assert "Hello<|im_end|>" in out
    assert main(["data", "check", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(p["line"], p["kind"]) for p in report["problems"]] == [(2, "invalid_json"), (3, "duplicate"),
                                                                    (4, "no_assistant")]
    assert report["max_seq_length"] == 2048 and report["model"].startswith("smollm2-135m-demo")


def test_cli_check_of_a_preset_and_json(demo_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", "gsm8k"]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "gsm8k" in out and "truncated at 512 tokens" in out
    assert main(["data", "check", "finance-sentiment", "--json", "--max-seq-len", "300"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["rows"] == 20 and report["max_seq_length"] == 300
    assert report["format"] == "alpaca" and report["token_lengths"]["p99"] > 0
    assert [s["text"] for s in report["example"] if s["trained"]] == ["negative<|im_end|>"]


def test_cli_check_with_columns_and_format(tmp_path: Path, demo_model: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lines(tmp_path / "qa.jsonl", [{"q": "Capital of Peru?", "a": "Lima"},
                                               {"q": "Capital of Chile?", "a": "Santiago"}])
    assert main(["data", "check", str(path), "--json"]) == 2
    assert "cannot tell the data format" in capsys.readouterr().err
    assert main(["data", "check", str(path), "--format", "alpaca", "--columns", "instruction=q,output=a",
                 "--json", "--model", "demo"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["examples"] == 2
    assert main(["data", "check", str(path), "--columns", "instruction"]) == 2
    assert "FIELD=COLUMN" in capsys.readouterr().err
