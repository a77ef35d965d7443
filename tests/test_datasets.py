"""The dataset catalog: every preset's offline sample goes through the training pipeline and the checker."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env
from tunewiz.engine.cli.main import main
from tunewiz.engine.config import catalog
from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.data import check, formats, sources
from tunewiz.engine.data.chat import ChatEncoder
from tunewiz.engine.data.formats import RowProblem
from tunewiz.engine.data.prepare import prepare, read_examples

PRESETS = list(catalog.datasets())
USES = {"instruction", "chat", "classification", "support", "legal", "math", "reasoning", "code", "preference"}


def preset_spec(name: str) -> RunSpec:
    spec = RunSpec(name="t")
    spec.dataset.preset = name
    spec.training.max_seq_length = catalog.datasets()[name].max_seq_length
    return spec


def sample_rows(name: str) -> list[dict[str, Any]]:
    lines = catalog.datasets()[name].sample_path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_the_catalog_covers_the_uses() -> None:
    entries = catalog.datasets()
    assert USES <= {e.task for e in entries.values()}
    assert entries["demo"].bundled
    assert len([e for e in entries.values() if not e.bundled]) >= 8


@pytest.mark.parametrize("name", PRESETS)
def test_entry_is_complete_and_its_mapping_fits_the_sample(name: str) -> None:
    entry = catalog.datasets()[name]
    assert entry.description and "\n" not in entry.description and len(entry.description) <= 110
    assert entry.license and entry.size and entry.task
    assert entry.format in formats.FORMATS
    assert entry.max_seq_length >= 64 and entry.epochs > 0
    if not entry.bundled:
        assert sources.HUB_ID.match(entry.hub_id), entry.hub_id
        assert entry.url == f"https://huggingface.co/datasets/{entry.hub_id}"
    rows = sample_rows(name)
    assert 10 <= len(rows) <= 50 or entry.bundled
    columns = set(rows[0])
    assert all(set(row) == columns for row in rows), "every sample row has the same columns, like the real data"
    assert set(entry.columns.values()) <= columns, "the column mapping names real columns of the data"
    assert set(entry.label_names) <= set(formats.FORMATS[entry.format]) | {"input", "system"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sample_trains_renders_and_passes_the_checker(name: str, demo_tokenizer: Any) -> None:
    spec = preset_spec(name)
    data = prepare(spec, demo_tokenizer, offline_sample=True, use_cache=False)
    stats = data.stats
    assert stats["dropped_total"] == 0, stats["problems"]
    assert stats["train_examples"] + stats["eval_examples"] == stats["rows_read"]
    assert stats["truncated"] == 0
    assert data.samples, "sample prompts come from the data"
    rendered = demo_tokenizer.decode(data.train[0].input_ids)
    assert "<|im_start|>assistant" in rendered and rendered.rstrip().endswith("<|im_end|>")

    report = check.check(sources.resolve(spec.dataset, offline_sample=True), ChatEncoder(demo_tokenizer),
                         spec.training.max_seq_length)
    assert report.ok, report.problems
    assert report.rows == report.examples == stats["rows_read"]
    assert report.format == catalog.datasets()[name].format
    assert any(s.trained for s in report.example) and any(not s.trained for s in report.example)


def test_the_data_cache_tells_apart_preparations_with_other_stop_tokens(demo_tokenizer: Any, tmp_path: Path) -> None:
    """A model whose generation config adds a stop token trains each answer only up to it: the cache of a run
    without that stop token must not be reused (two runs share one TUNEWIZ_HOME)."""
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}<|endoftext|> then more words"}]}
            for i in range(12)]
    data_file = tmp_path / "chat.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    spec = RunSpec(name="t")
    spec.dataset = dataclasses.replace(spec.dataset, source=str(data_file), eval_fraction=0.0)
    stop = demo_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    plain = prepare(spec, demo_tokenizer)
    stopped = prepare(spec, demo_tokenizer, stop_ids=[stop])
    assert plain.fingerprint != stopped.fingerprint
    def trained(data: Any) -> list[int]:
        return [sum(label != -100 for label in example.labels) for example in data.train]

    assert all(cut < whole for cut, whole in zip(trained(stopped), trained(plain), strict=True))
    assert prepare(spec, demo_tokenizer, stop_ids=[stop]).fingerprint == stopped.fingerprint  # and its own is reused


def test_label_names_turn_integer_labels_into_words() -> None:
    spec = preset_spec("finance-sentiment")
    examples, fmt, problems, _, rows = read_examples(sources.resolve(spec.dataset, offline_sample=True))
    assert (fmt, rows, sum(problems.values())) == ("alpaca", len(sample_rows("finance-sentiment")), 0)
    answers = {example.messages[-1][1] for example in examples}
    assert answers == {"negative", "positive", "neutral"}
    assert all(example.messages[0][0] == "system" for example in examples), "the preset's system prompt is added"
    labels = {"output": {"0": "negative", "1": "positive"}}
    columns = {"instruction": "text", "output": "label"}
    already_named = formats.normalise({"text": "x", "label": "positive"}, "alpaca", columns, label_names=labels)
    assert already_named.messages[-1] == ("assistant", "positive")
    with pytest.raises(RowProblem, match="value 7, which is not a known label") as info:
        formats.normalise({"text": "x", "label": 7}, "alpaca", columns, label_names=labels)
    assert info.value.kind == "unknown_label"


def test_a_system_column_of_sharegpt_and_messages_rows_comes_first() -> None:
    row = {"system": "Think first.", "conversations": [{"from": "user", "value": "1+1?"},
                                                       {"from": "assistant", "value": "2"}]}
    assert formats.normalise(row, "sharegpt", {}).messages[0] == ("system", "Think first.")
    row = {"system": "", "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    assert formats.normalise(row, "messages", {}, system_prompt="Be brief.").messages[0] == ("system", "Be brief.")


def test_hub_presets_resolve_to_their_real_data_and_split() -> None:
    spec = preset_spec("ultrachat")
    hub = sources.resolve(spec.dataset)
    assert (hub.kind, hub.location, hub.split, hub.format) == ("hub", "HuggingFaceH4/ultrachat_200k", "train_sft",
                                                               "messages")
    spec.dataset.split = "test_sft"
    assert sources.resolve(spec.dataset).split == "test_sft"
    gsm = sources.resolve(preset_spec("gsm8k").dataset)
    assert (gsm.subset, dict(gsm.columns)) == ("main", {"instruction": "question", "output": "answer"})


def test_datasets_command_lists_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in catalog.datasets():
        assert name in out
    assert "openai/gsm8k" in out and "CDLA-Sharing-1.0" in out
    assert main(["datasets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == PRESETS
    gsm = next(d for d in listed if d["name"] == "gsm8k")
    assert gsm["subset"] == "main" and gsm["columns"] == {"instruction": "question", "output": "answer"}
    assert Path(gsm["sample"]).exists()


def test_datasets_command_does_not_import_torch() -> None:
    code = ("import json, sys\nfrom tunewiz.engine.cli.main import main\n"
            "main(['datasets']); main(['datasets', '--json'])\n"
            "print(json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))")
    result = subprocess.run([PYTHON, "-c", code], env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert not loaded & {"torch", "transformers", "datasets", "textual"}


def test_the_format_names_are_defined_once() -> None:
    """FORMATS (fields), OPTIONAL_FIELDS and the spec's `dataset.format` all use formats.RowFormat's names."""
    import typing

    from tunewiz.engine.config.spec import DatasetSpec
    from tunewiz.engine.data.formats import FORMATS, OPTIONAL_FIELDS, RowFormat

    names = set(typing.get_args(RowFormat))
    assert set(FORMATS) == names and set(OPTIONAL_FIELDS) <= names
    spec_names = set(typing.get_args(typing.get_type_hints(DatasetSpec)["format"]))
    assert spec_names == names | {"auto"}
