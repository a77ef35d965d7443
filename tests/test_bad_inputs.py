"""Bad inputs give a specific error before any run directory exists."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env
from tunewiz.engine import locations
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.errors import DataError, HardwareError, ModelError
from tunewiz.engine.run import preflight


def spec_for(source: Path | str, **training: object) -> spec_mod.RunSpec:
    spec = spec_mod.RunSpec(name="bad")
    spec.model.name = "smollm2-135m-demo"
    spec.dataset.source = str(source)
    for key, value in training.items():
        setattr(spec.training, key, value)
    return spec


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        preflight.check(spec_for(tmp_path / "nope.jsonl"))


def test_empty_file(tmp_path: Path, demo_model: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="is empty"):
        preflight.check(spec_for(path))


def test_invalid_json_names_the_line(tmp_path: Path, demo_model: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"messages": [\n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:3: invalid JSON"):
        preflight.check(spec_for(path))


def test_unknown_columns_list_what_was_found(tmp_path: Path, demo_model: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "reply": "r"}])
    with pytest.raises(DataError) as info:
        preflight.check(spec_for(path))
    assert "cannot tell the data format" in str(info.value)
    assert "columns found: question, reply" in info.value.hint
    assert "dataset.columns" in info.value.hint


def test_wrong_column_mapping_for_a_forced_format(tmp_path: Path, demo_model: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "reply": "r"}] * 3)
    spec = spec_for(path)
    spec.dataset.format = "alpaca"
    spec.dataset.columns = {"instruction": "question", "output": "answer"}
    with pytest.raises(DataError, match="missing field.*output.*columns here: question, reply"):
        preflight.check(spec)


def test_unknown_format_is_a_spec_error() -> None:
    with pytest.raises(spec_mod.SpecError, match="dataset.format.*did you mean 'alpaca'"):
        spec_mod.loads('name = "x"\n[dataset]\nsource = "a.jsonl"\nformat = "alpacca"\n')


@pytest.mark.parametrize("name", ["./no/such/folder", "not a model", "org/model/extra/parts"])
def test_model_that_does_not_exist(tmp_path: Path, name: str) -> None:
    path = write_jsonl(tmp_path / "ok.jsonl", [GOOD])
    spec = spec_for(path)
    spec.model.name = name
    with pytest.raises(ModelError, match="not a catalog model|does not exist|no config.json"):
        preflight.check(spec)


def test_hub_model_unreachable_offline(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ok.jsonl", [GOOD])
    spec = spec_for(path)
    spec.model.name = "nobody-here/no-such-model-xyz"
    with pytest.raises(ModelError, match="cannot load the tokenizer"):
        preflight.check(spec)


def test_qlora_without_cuda(tmp_path: Path, cpu_only: None) -> None:
    spec = spec_for(write_jsonl(tmp_path / "ok.jsonl", [GOOD]))
    spec.method = "qlora"
    with pytest.raises(HardwareError, match="QLoRA needs a CUDA GPU") as info:
        preflight.check(spec)
    assert "method = \"lora\"" in info.value.hint


def test_more_gpus_than_the_machine_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunewiz.engine.errors import TunewizError
    from tunewiz.engine.training import distributed

    monkeypatch.setattr(distributed, "visible_gpu_count", lambda: 2)
    spec = spec_for(write_jsonl(tmp_path / "ok.jsonl", [GOOD]), gpus=4)
    with pytest.raises(TunewizError, match=r"training.gpus = 4 asks for 4 GPUs, but only 2 are visible") as info:
        preflight.check(spec)
    assert "at most 2" in info.value.hint


def test_max_seq_length_shorter_than_every_example(tmp_path: Path, demo_model: Path) -> None:
    path = write_jsonl(tmp_path / "ok.jsonl", [GOOD] * 4)
    with pytest.raises(DataError, match="max_seq_length = 16 is shorter than every example") as info:
        preflight.check(spec_for(path, max_seq_length=16))
    assert "raise training.max_seq_length" in info.value.hint


def test_rows_with_problems_are_skipped_and_counted(tmp_path: Path, demo_model: Path) -> None:
    no_answer = {"messages": [{"role": "user", "content": "Only a question"}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, no_answer, GOOD, {"messages": "oops"}])
    stats = preflight.check(spec_for(path))
    assert stats["train_examples"] == 2
    assert stats["dropped"] == {"no_assistant": 1, "non_string": 1}
    assert any(p.startswith("mixed.jsonl:2:") for p in stats["problems"])


def test_cli_reports_and_creates_no_run(tmp_path: Path, demo_model: Path) -> None:
    data = tmp_path / "broken.jsonl"
    data.write_text(json.dumps(GOOD) + "\n{not json\n")
    spec_file = tmp_path / "mine.toml"
    spec_mod.save(spec_for(data), spec_file)
    result = subprocess.run([PYTHON, "-m", "tunewiz.engine", "train", str(spec_file)], capture_output=True, text=True,
                            cwd=ROOT, env=subprocess_env(), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "broken.jsonl:2: invalid JSON" in result.stderr
    assert "hint:" in result.stderr
    assert not any(locations.runs_dir().iterdir())


def test_template_that_rejects_a_row_drops_only_that_row(tmp_path: Path, demo_model: Path) -> None:
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with_system = {"messages": [{"role": "system", "content": "Be brief."}] + GOOD["messages"]}
    spec = spec_for(write_jsonl(tmp_path / "mixed.jsonl", [GOOD, with_system, GOOD]))
    spec.dataset.chat_template = str(template)
    stats = preflight.check(spec)
    assert stats["train_examples"] == 2 and stats["dropped"] == {"template_error": 1}
    assert "no system role" in stats["problems"][0]
