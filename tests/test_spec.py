"""The run spec: TOML round trip, validation messages, `--set` overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.config.spec import RunSpec, SpecError


def full_spec() -> RunSpec:
    """A spec with every kind of value set to something other than its default."""
    spec = RunSpec(name="full-run", description='A "quoted" description with ünïcode', method="qlora",
                   output_dir="/tmp/out dir")
    spec.model = dataclasses.replace(spec.model, name="org/model", revision="abc123", gguf_file="m.gguf",
                                     trust_remote_code=True, dtype="bf16", attention="sdpa")
    spec.lora = dataclasses.replace(spec.lora, r=8, alpha=16.0, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                    use_rslora=True, use_dora=True)
    spec.quantization = dataclasses.replace(spec.quantization, quant_type="fp4", double_quant=False,
                                            compute_dtype="fp16")
    spec.dataset = dataclasses.replace(spec.dataset, source="data/my file.jsonl", subset="x", split="test",
                                       format="alpaca", columns={"instruction": "question", "output": "answer"},
                                       chat_template="chatml", system_prompt="Be brief.\nVery.", max_rows=100,
                                       eval_fraction=0.0)
    spec.training = dataclasses.replace(spec.training, epochs=2.5, max_steps=20, learning_rate=1e-5,
                                        lr_scheduler="linear", warmup_ratio=0.1, micro_batch_size=1,
                                        gradient_accumulation=16, max_seq_length=4096, packing=True,
                                        gradient_checkpointing=False, optimizer="adamw_8bit", weight_decay=0.01,
                                        max_grad_norm=0.3, seed=7, log_every=5, eval_every=50, save_every=100,
                                        sample_every=25, sample_prompts=2, sample_max_new_tokens=32,
                                        save_total_limit=3)
    return spec


def test_round_trip_is_exact(tmp_path: Path) -> None:
    spec = full_spec()
    path = tmp_path / "spec.toml"
    spec_mod.save(spec, path)
    loaded = spec_mod.load(path)
    assert loaded == spec
    assert spec_mod.dumps(loaded) == path.read_text()


def test_defaults_round_trip_and_unset_values_are_omitted() -> None:
    spec = RunSpec(name="d")
    spec.dataset.preset = "demo"
    text = spec_mod.dumps(spec)
    assert "max_steps" not in text  # None cannot be written in TOML; it is left out
    assert spec_mod.loads(text) == spec


def test_builtin_demo_preset_is_canonical() -> None:
    from tunewiz.engine.config.presets import builtin_dir

    spec = spec_mod.load(builtin_dir() / "demo.toml")
    assert spec.name == "demo" and spec.dataset.preset == "demo"
    assert spec_mod.loads(spec_mod.dumps(spec)) == spec


def _problems(text: str) -> list[spec_mod.Problem]:
    with pytest.raises(SpecError) as info:
        spec_mod.loads(text, source="my.toml")
    return info.value.problems


BASE = 'name = "x"\n[dataset]\npreset = "demo"\n'


@pytest.mark.parametrize(
    ("extra", "key", "fragment"),
    [
        ("[training]\nlearning_rate = \"fast\"\n", "training.learning_rate", "expected a number"),
        ("[training]\nmicro_batch_size = 0\n", "training.micro_batch_size", "at least 1"),
        ("[training]\nmicro_batch_size = 2.5\n", "training.micro_batch_size", "whole number"),
        ("[training]\nepochs = 0\n", "training.epochs", "greater than 0"),
        ("[training]\nlearning_rate = nan\n", "training.learning_rate", "finite"),
        ("[training]\npacking = \"yes\"\n", "training.packing", "true or false"),
        ("[training]\nlr_scheduler = \"cosin\"\n", "training.lr_scheduler", "did you mean 'cosine'"),
        ("[training]\nlearning_rat = 1e-4\n", "training.learning_rat", "did you mean 'training.learning_rate'"),
        ("[trainning]\nepochs = 1\n", "trainning", "did you mean 'training'"),
        ("[lora]\ntarget_modules = [1, 2]\n", "lora.target_modules", "list of strings"),
        ("[lora]\ntarget_modules = []\n", "lora.target_modules", "empty"),
        ("[lora]\nr = 0\n", "lora.r", "at least 1"),
        ("[dataset.columns]\ninstruction = 3\n", "dataset.columns", "table of strings"),
        ("[quantization]\nquant_type = \"nf5\"\n", "quantization.quant_type", "did you mean 'nf4'"),
        ("model = \"gpt2\"\n", "model", "expected a table"),
        ("method = \"qlora4\"\n", "method", "did you mean 'qlora'"),
        ("spec_version = 9\n", "spec_version", "reads version 1"),
    ],
)
def test_validation_names_key_value_and_allowed(extra: str, key: str, fragment: str) -> None:
    # top-level keys must come before the first table
    text = extra + BASE if not extra.startswith("[") else BASE + extra
    problems = _problems(text)
    match = [p for p in problems if p.key == key]
    assert match, problems
    assert fragment in match[0].message
    assert match[0].line is not None


def test_eval_fraction_range() -> None:
    (problem,) = _problems(BASE + "eval_fraction = 0.9\n")
    assert problem.key == "dataset.eval_fraction" and "at most 0.5" in problem.message and problem.line == 4


def test_validation_reports_the_right_line() -> None:
    text = BASE + "[training]\nepochs = 1.0\n\nwarmup_ratio = -1\n"
    (problem,) = _problems(text)
    assert problem.key == "training.warmup_ratio"
    assert problem.line == 7
    assert "my.toml:7: training.warmup_ratio: -1" in str(SpecError([problem], "my.toml"))


def test_all_problems_reported_at_once() -> None:
    problems = _problems(BASE + "[training]\nepochs = -1\nseed = \"x\"\n")
    assert {p.key for p in problems} == {"training.epochs", "training.seed"}


def test_cross_field_rules() -> None:
    assert "not both" in _problems('name = "x"\n[dataset]\npreset = "demo"\nsource = "a.jsonl"\n')[0].message
    assert "no data" in _problems('name = "x"\n')[0].message
    assert "letters, digits" in _problems('name = "a b"\n[dataset]\npreset = "demo"\n')[0].message


def test_invalid_toml_reports_line() -> None:
    (problem,) = _problems(BASE + "[training]\nepochs = \n")
    assert "not valid TOML" in problem.message and problem.line == 5


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        spec_mod.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SpecError, match="not UTF-8"):
        spec_mod.load(bad)


def test_set_overrides_parse_values() -> None:
    spec = spec_mod.loads(BASE)
    new = spec_mod.apply_overrides(spec, [
        "training.max_steps=20", "training.learning_rate=1e-4", "training.packing=true",
        "model.name=org/some-model", 'lora.target_modules=["q_proj","k_proj"]', "name=renamed",
        "dataset.columns={instruction = \"q\"}",
    ])
    assert new.training.max_steps == 20 and new.training.learning_rate == 1e-4
    assert new.training.packing is True and new.model.name == "org/some-model"
    assert new.lora.target_modules == ["q_proj", "k_proj"] and new.name == "renamed"
    assert new.dataset.columns == {"instruction": "q"}
    assert spec.training.max_steps is None  # the original is untouched


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("training.max_stepz=3", "did you mean 'training.max_steps'"),
        ("trainig.max_steps=3", "did you mean 'training'"),
        ("training.max_steps=abc", "whole number"),
        ("training.max_steps", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
    ],
)
def test_set_override_errors(override: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        spec_mod.apply_overrides(spec_mod.loads(BASE), [override])


def test_every_field_is_documented() -> None:
    rows = spec_mod.field_docs()
    assert len(rows) > 40
    assert all(doc for _key, _tp, _default, doc in rows)


def test_spec_doc_is_current() -> None:
    from tunewiz.engine.config.spec_doc import render

    doc = Path(__file__).resolve().parent.parent / "docs" / "run-spec.md"
    assert doc.read_text() == render(), "regenerate with: python -m tunewiz.engine.config.spec_doc > docs/run-spec.md"


def test_gpus_takes_a_count_or_a_list_of_indices() -> None:
    base = '[dataset]\npreset = "demo"\n[training]\n'
    assert spec_mod.loads(base + "gpus = 2\n").training.gpus == 2
    assert spec_mod.loads(base + "gpus = [0, 2]\n").training.gpus == [0, 2]
    with pytest.raises(SpecError, match=r"spec:4: training.gpus: 'two': expected a whole number or a list"):
        spec_mod.loads(base + 'gpus = "two"\n', source="spec")
    with pytest.raises(SpecError, match=r"training.gpus: \[1, 1\]: list distinct GPU indices"):
        spec_mod.loads(base + "gpus = [1, 1]\n")
    with pytest.raises(SpecError, match=r"training.checkpoint_layers: 0: must be at least 1"):
        spec_mod.loads(base + "checkpoint_layers = 0\n")
    with pytest.raises(SpecError, match=r"training.gpus: -1: must be at least 0"):
        spec_mod.loads(base + "gpus = -1\n")


def test_speed_levers_round_trip_and_reject_unknown_values() -> None:
    text = '[dataset]\npreset = "demo"\n[speed]\nfused_kernels = "loss"\nadapter_dtype = "bf16"\ncompile = true\n'
    loaded = spec_mod.loads(text)
    assert (loaded.speed.fused_kernels, loaded.speed.adapter_dtype, loaded.speed.compile) == ("loss", "bf16", True)
    assert spec_mod.loads(spec_mod.dumps(loaded)) == loaded
    with pytest.raises(SpecError, match=r"speed.fused_kernels: 'al': expected one of .*did you mean 'all'"):
        spec_mod.loads('[dataset]\npreset = "demo"\n[speed]\nfused_kernels = "al"\n')
