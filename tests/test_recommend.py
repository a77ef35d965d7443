"""The recommender on simulated machines: what it picks and what it says."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tunewiz.engine.cli.main import main
from tunewiz.engine.config import catalog
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.planning.devices import GpuInfo, GpuProcess
from tunewiz.engine.planning.hardware import HardwareReport
from tunewiz.engine.planning.recommend import MARGIN, choice_for, estimate_spec, recommend

GB = 10**9


def gpu(total_gb: float, used_gb: float = 0.5, index: int = 0, name: str = "NVIDIA Test GPU",
        others: list[GpuProcess] | None = None) -> GpuInfo:
    total, used = int(total_gb * 2**30), int(used_gb * 2**30)
    return GpuInfo(index=index, name=name, cuda_index=index, memory_total_bytes=total, memory_used_bytes=used,
                   memory_free_bytes=total - used, other_processes=others or [], compute_capability=(8, 9),
                   bf16_supported=True)


def machine(*gpus: GpuInfo) -> HardwareReport:
    return HardwareReport(gpus=list(gpus), cpu_count=16, ram_total_bytes=64 * 2**30, ram_available_bytes=60 * 2**30)


NO_GPU = HardwareReport(gpus=[], nvml_error="No NVIDIA driver found (NVML library missing).", cpu_count=2,
                        ram_available_bytes=20 * 2**30)


# The guide's advice as the ranking (issue 15): the most capable model that fits with margin first, LoRA when it
# fits, else QLoRA. Free memory in GiB; 3 GiB at the demo data's 256 tokens, the rest at 2048.
RANKING_TABLE = [
    # free GiB, seq len, first model, its method, a model in the first three rows (or None)
    (3, 256, "smollm2-360m", "qlora", None),
    (4, 2048, "qwen3-0.6b", "qlora", None),
    (8, 2048, "qwen3-4b", "qlora", None),
    (12, 2048, "llama-3.1-8b", "qlora", None),
    (16, 2048, "llama-3.1-8b", "qlora", None),
    (20, 2048, "llama-3.1-8b", "qlora", None),
    (24, 2048, "llama-3.1-8b", "lora", None),
    (48, 2048, "qwen2.5-32b", "qlora", "llama-3.1-8b"),
    (80, 2048, "llama-3.3-70b", "qlora", "llama-3.1-8b"),
    (141, 2048, "llama-3.3-70b", "qlora", "llama-3.1-8b"),
]


@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize(("free_gib", "seq_len", "first", "method", "also"), RANKING_TABLE)
def test_ranking_table(free_gib: int, seq_len: int, first: str, method: str, also: str | None, gpus: int) -> None:
    result = recommend(machine(*[gpu(free_gib + 0.5, index=i) for i in range(gpus)]), seq_len)
    top = result.choices[0]
    assert (top.model, top.method, top.fit, top.gpus, top.strategy) == (first, method, "fits", gpus, "ddp")
    assert top.needed_bytes <= result.available_bytes * MARGIN
    if also:
        assert also in [c.model for c in result.choices[:3]]
    fitting = [c for c in result.choices if c.fit == "fits"]
    entries = catalog.models()
    # after the first, bigger models of the same tier never follow smaller ones
    for before, after in zip(fitting[1:], fitting[2:]):
        if entries[before.model].tier == entries[after.model].tier and before.strategy == after.strategy:
            assert entries[before.model].params >= entries[after.model].params or \
                entries[before.model].gated < entries[after.model].gated
    smaller = [c for c in fitting[1:] if entries[c.model].params < entries[top.model].params]
    assert all(c.reason.startswith("Faster alternative") for c in smaller) and (smaller or free_gib == 3)
    assert "needs about" in top.reason and f"with {'QLoRA' if method == 'qlora' else 'LoRA'}" in top.reason
    assert result.summary.startswith("On ")


def test_nothing_fits_at_this_length_names_the_length_that_would() -> None:
    summary = recommend(machine(gpu(3.5)), 2048).summary
    assert "nothing fits with margin at 2048 tokens; with data of at most 1024 tokens" in summary
    assert "tunewiz recommend --seq-len 1024" in summary


def test_every_choice_is_consistent() -> None:
    result = recommend(machine(gpu(24)))
    available = result.available_bytes
    for choice in result.choices:
        ratio = choice.needed_bytes / available
        expected = "fits" if ratio <= MARGIN else "tight" if ratio <= 1 else "too_big"
        assert choice.fit == expected, choice
        assert choice.micro_batch_size * choice.gradient_accumulation >= 16
    order = [{"fits": 0, "tight": 1, "too_big": 2}[c.fit] for c in result.choices]
    assert order == sorted(order)


def test_qlora_when_only_4bit_fits_and_the_reason_compares_with_lora() -> None:
    choice = choice_for("llama-3.1-8b", machine(gpu(16)))
    assert choice.method == "qlora" and choice.fit == "fits"
    assert "with QLoRA needs about" in choice.reason and "with LoRA it would need about" in choice.reason
    assert "Ungated copy of meta-llama/Llama-3.1-8B-Instruct; the Llama licence still applies" in choice.reason
    assert "Gated" in choice_for("llama-3.1-8b-meta", machine(gpu(16))).reason


def test_8b_on_an_80gb_card_trains_without_checkpointing() -> None:
    # The automatic choice for 8B on 80 GB. The fused blocks keep no dropout copies, so a bigger micro-batch fits
    # than before them (bench/results/speed.jsonl: micro-batch 8 peaked at 71.9 GiB, estimated 68.5 GiB).
    choice = choice_for("llama-3.1-8b", machine(gpu(80)))
    assert (choice.method, choice.gradient_checkpointing, choice.micro_batch_size) == ("lora", False, 4)
    assert choice.micro_batch_size * choice.gradient_accumulation == 16


def test_partial_checkpointing_when_no_checkpointing_does_not_fit() -> None:
    choice = choice_for("llama-3.1-8b", machine(gpu(32)))
    assert (choice.gradient_checkpointing, choice.checkpoint_layers, choice.micro_batch_size) == (True, 16, 2)
    assert "checkpointing on for 16 of 32 layers" in choice.reason
    spec = choice.apply(spec_mod.loads('[dataset]\npreset = "demo"\n'))
    assert (spec.training.gradient_checkpointing, spec.training.checkpoint_layers) == (True, 16)
    tighter = choice_for("llama-3.1-8b", machine(gpu(28)))
    assert tighter.checkpoint_layers == 24  # less memory: more layers recompute


def test_offloaded_checkpoints_when_they_let_a_bigger_batch_fit_on_one_gpu() -> None:
    """8B LoRA on 24 GB: micro-batch 4 fits only with the checkpointed layers' inputs in CPU memory (2 GiB of
    the GPU's on this shape), which runs at the same speed (docs/speed.md)."""
    choice = choice_for("llama-3.1-8b", machine(gpu(24)))
    assert (choice.gradient_checkpointing, choice.offload_checkpoints, choice.micro_batch_size) == (True, True, 4)
    assert "checkpointing on, their inputs kept in CPU memory" in choice.reason
    spec = choice.apply(spec_mod.loads('[dataset]\npreset = "demo"\n'))
    assert spec.speed.offload_checkpoints and estimate_spec(spec).total == choice.estimate.total
    kept = dataclasses.replace(spec, speed=dataclasses.replace(spec.speed, offload_checkpoints=False))
    assert estimate_spec(kept).total - choice.estimate.total > 1.5 * 2**30  # the inputs stay on the GPU
    assert "speed.offload_checkpoints=true" in choice.train_overrides("alpaca")
    roomy = choice_for("llama-3.1-8b", machine(gpu(80)))  # what fits without it never offloads
    assert not roomy.offload_checkpoints and not roomy.apply(spec).speed.offload_checkpoints
    assert "speed.offload_checkpoints=true" not in roomy.train_overrides("alpaca")
    two = choice_for("llama-3.1-8b", machine(gpu(24), gpu(24, index=1)))  # the engine offloads on one GPU only
    assert not two.offload_checkpoints


@pytest.mark.parametrize("card_gb", [16, 24, 32, 80])
def test_the_suggested_command_trains_what_was_estimated(card_gb: int) -> None:
    """`recommend` suggests `tunewiz train demo --set ...`: the demo preset with those overrides is the run the
    choice's memory estimate is for (the demo's own dropout, 0.05, would keep more in each recompute)."""
    from tunewiz.engine.config import presets

    choice = choice_for("llama-3.1-8b", machine(gpu(card_gb)))
    spec = spec_mod.apply_overrides(presets.resolve("demo")[0], choice.train_overrides("alpaca"))
    assert estimate_spec(spec).total == choice.estimate.total


def test_checkpointing_off_when_memory_allows() -> None:
    small = choice_for("qwen2.5-1.5b", machine(gpu(80)))
    assert small.method == "lora" and small.gradient_checkpointing is False and small.micro_batch_size >= 4
    tight = choice_for("qwen2.5-1.5b", machine(gpu(8)))
    assert tight.gradient_checkpointing is True


def test_too_big_even_with_qlora() -> None:
    choice = choice_for("llama-3.3-70b", machine(gpu(24)))
    assert choice.fit == "too_big" and "even with QLoRA" in choice.reason


def test_cpu_only_recommends_the_demo() -> None:
    result = recommend(NO_GPU)
    assert [c.model for c in result.choices] == ["smollm2-135m-demo"]
    assert result.choices[0].method == "lora" and "CPU" in result.choices[0].reason
    assert "With a 24 GiB GPU the first choice would be Llama-3.1-8B-Instruct with LoRA" in result.choices[0].reason
    assert "No GPU" in result.summary


def test_two_gpus_use_the_one_with_most_free_memory() -> None:
    result = recommend(machine(gpu(24, index=0), gpu(48, index=1, name="Big GPU")))
    assert result.summary.startswith("On Big GPU") and "2 GPUs found" in result.summary


def test_other_process_holding_half_the_memory() -> None:
    held = [GpuProcess(pid=123, name="python", used_bytes=40 * 2**30)]
    busy = recommend(machine(gpu(80, used_gb=40.5, others=held)))
    idle = recommend(machine(gpu(80)))
    assert busy.available_bytes < idle.available_bytes / 1.9
    assert "Other programs hold" in busy.summary
    assert catalog.models()[busy.choices[0].model].params <= catalog.models()[idle.choices[0].model].params


def test_vram_override_ignores_the_machine() -> None:
    result = recommend(NO_GPU, vram_bytes=24 * GB)
    assert result.available_bytes == 24 * GB and result.choices[0].model != "smollm2-135m-demo"


def test_choice_applies_to_a_spec() -> None:
    spec = spec_mod.loads('name = "x"\n[dataset]\npreset = "demo"\n')
    choice = choice_for("qwen2.5-7b", machine(gpu(24)), seq_len=1024)
    applied = choice.apply(spec)
    assert applied.model.name == "qwen2.5-7b" and applied.method == choice.method
    assert applied.training.max_seq_length == 1024 and spec.training.max_seq_length == 2048
    assert spec_mod.loads(spec_mod.dumps(applied)) == applied


def test_choice_for_a_local_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True}))
    local = choice_for(str(tmp_path), machine(gpu(24)))
    catalogued = choice_for("llama-3.2-1b", machine(gpu(24)))
    assert local.estimate == catalogued.estimate


def test_recommend_cli_json_and_doctor(capsys: pytest.CaptureFixture[str], cpu_only: None) -> None:
    assert main(["recommend", "--vram", "24", "--json", "--top", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["choices"]) == 3 and data["choices"][0]["estimate"]["total"] > 0
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "No GPU" in out and "libraries:" in out and "torch" in out
    assert main(["models"]) == 0
    assert "llama-3.1-8b" in capsys.readouterr().out


def test_probe_on_a_cpu_says_why(capsys: pytest.CaptureFixture[str], cpu_only: None) -> None:
    assert main(["probe", "demo"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_gated_models_come_after_open_ones_of_the_same_kind() -> None:
    choices = recommend(machine(gpu(24))).choices
    first_gated = next(i for i, c in enumerate(choices) if catalog.models()[c.model].gated)
    same_bucket_open = [c for c in choices[first_gated:] if c.fit == choices[first_gated].fit
                        and c.method == choices[first_gated].method and not catalog.models()[c.model].gated]
    assert not same_bucket_open
    assert not catalog.models()[choices[0].model].gated


def test_estimate_of_exactly_a_spec() -> None:
    from tunewiz.engine.planning.estimator import Settings, estimate
    from tunewiz.engine.planning.recommend import arch_for, estimate_spec

    spec = spec_mod.loads('name = "x"\nmethod = "qlora"\n[model]\nname = "llama-3.1-8b"\n[dataset]\npreset = "demo"\n'
                          '[training]\nmicro_batch_size = 1\nmax_seq_length = 4096\n')
    expected = estimate(arch_for("llama-3.1-8b"), Settings(method="qlora", micro_batch_size=1, seq_len=4096))
    assert estimate_spec(spec) == expected


def test_a_missing_folder_is_named_as_such_without_asking_the_hub(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    import huggingface_hub

    from tunewiz.engine.errors import ModelError
    from tunewiz.engine.planning.recommend import arch_for

    def hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("asked the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(ModelError, match=r"model '.*missing' is not a catalog model, an existing path or a hub id"):
        arch_for(str(tmp_path / "missing"))
    with pytest.raises(ModelError) as typo:
        arch_for("llama-3.1-8bb")
    assert "(maybe llama-3.1-8b, " in str(typo.value.hint)


def test_recommend_marks_offloaded_checkpointing_in_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--vram", "23", "--top", "3"]) == 0  # 8B LoRA at micro-batch 2 fits only offloaded
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if line.startswith("llama-3.1-8b"))
    assert first.split()[-1] == "on+cpu"
    assert "CKPT on+cpu: checkpointing on, the checkpointed layers' inputs in CPU memory" in out
    assert "--set speed.offload_checkpoints=true" in out
    assert main(["recommend", "--vram", "80", "--model", "llama-3.1-8b"]) == 0
    out = capsys.readouterr().out
    assert next(line for line in out.splitlines() if line.startswith("llama-3.1-8b")).split()[-1] == "off"
    assert "CKPT on+cpu" not in out and "offload" not in out


def test_recommend_prints_a_command_that_trains_what_the_table_assumed(capsys: pytest.CaptureFixture[str]) -> None:
    import shlex

    from tunewiz.engine.config import presets

    assert main(["recommend", "--vram", "24", "--top", "20"]) == 0
    out = capsys.readouterr().out
    assert "too_big" not in out and " lora " not in out and "LORA" not in out
    assert "llama-3.1-8b         LoRA" in out and "GiB" in out and " GB" not in out
    command = out.split("Train the first one on ultrachat:\n")[1].strip().splitlines()[0]
    from tunewiz.engine import hints

    assert command.startswith(hints.command("train demo") + " --set ")
    words = shlex.split(command)
    sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    spec, _ = presets.resolve("demo", sets)
    first = recommend(NO_GPU, seq_len=2048, vram_bytes=24 * 2**30).choices[0]
    t = spec.training
    assert (spec.model.name, spec.method, spec.dataset.preset) == ("llama-3.1-8b", "lora", "ultrachat")
    assert (t.max_seq_length, t.micro_batch_size, t.gradient_accumulation, t.gradient_checkpointing,
            t.checkpoint_layers) == (first.max_seq_length, first.micro_batch_size, first.gradient_accumulation,
                                     first.gradient_checkpointing, first.checkpoint_layers)


def test_recommend_for_a_dataset_uses_its_length(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--vram", "3", "--data", "demo", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["choices"][0]["max_seq_length"] == 256 and data["choices"][0]["fit"] == "fits"
    assert main(["recommend", "--data", "nope"]) == 2
    assert "--data 'nope' is not a catalog dataset" in capsys.readouterr().err


def test_models_lists_the_ungated_mirror_with_its_licence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert ("Downloads unsloth/Llama-3.1-8B-Instruct, a public ungated copy of meta-llama/Llama-3.1-8B-Instruct "
            "(the same weights)") in out
    assert "Licence: Llama 3.1 Community License; the Llama licence still applies." in out
    assert "(gated) (gated)" not in out
    meta = catalog.models()["llama-3.1-8b-meta"]
    assert meta.gated and meta.hub_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert meta.layers == catalog.models()["llama-3.1-8b"].layers  # the same weights


def test_a_gated_model_without_a_token_stops_before_any_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from tunewiz.engine.errors import ModelError
    from tunewiz.engine.training import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    token: list[str | None] = [None]
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token[0])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("downloaded"))

    def spec(name: str) -> spec_mod.RunSpec:
        return spec_mod.loads(f'[model]\nname = "{name}"\n[dataset]\npreset = "demo"\n')

    for name in ("llama-3.1-8b-meta", "meta-llama/Llama-3.1-8B-Instruct"):
        with pytest.raises(ModelError) as gated:
            models.resolve(spec(name))
        message = str(gated.value)
        assert "meta-llama/Llama-3.1-8B-Instruct is gated" in message
        assert "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct" in message
        assert "https://huggingface.co/settings/tokens" in message and "hf auth login" in message
        assert 'Or use model.name = "llama-3.1-8b"' in message
    assert models.resolve(spec("llama-3.1-8b")).name_or_path == "unsloth/Llama-3.1-8B-Instruct"
    token[0] = "hf_token"
    assert models.resolve(spec("llama-3.1-8b-meta")).name_or_path == "meta-llama/Llama-3.1-8B-Instruct"


def test_doctor_on_a_cpu_box_says_gpu_only_libraries_are_not_needed(capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     cpu_only: None) -> None:
    from tunewiz.engine.cli import hardware as cli_hw

    versions = {name: "1.0" for name in cli_hw.LIBRARIES}
    versions["liger-kernel"] = None
    monkeypatch.setattr(cli_hw, "_versions", lambda: versions)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "liger-kernel not installed (only used on NVIDIA GPUs: not needed here)" in out and "MISSING" not in out


def test_the_summary_reads_well_for_any_size() -> None:
    assert recommend(NO_GPU, vram_bytes=8 * 2**30).summary.startswith("On a GPU with 8.0 GiB free: ")
