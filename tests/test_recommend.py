"""The recommender on simulated machines: what it picks and what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import catalog, spec as spec_mod
from engine.cli import main
from engine.hardware import GpuInfo, GpuProcess, HardwareReport
from engine.recommend import MARGIN, choice_for, recommend

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


@pytest.mark.parametrize(
    ("total_gb", "top_method", "min_params_b", "max_params_b"),
    # With the fused cross-entropy (the default) the logits cost almost nothing, so each card takes a bigger
    # model than the stock stack would allow (bench/results/speed.jsonl: 8B LoRA with checkpointing 18.6 GiB).
    [(8, "lora", 0.3, 2.0), (12, "lora", 1.0, 3.5), (16, "lora", 3.0, 4.5), (24, "lora", 4.0, 8.5),
     (48, "lora", 8.0, 15.0), (80, "lora", 8.0, 15.0), (141, "lora", 14.0, 33.0)],
)
def test_top_choice_per_card(total_gb: float, top_method: str, min_params_b: float, max_params_b: float) -> None:
    result = recommend(machine(gpu(total_gb)))
    top = result.choices[0]
    params = catalog.models()[top.model].params / 1e9
    assert top.fit == "fits" and top.method == top_method
    assert min_params_b <= params <= max_params_b, (top.model, params)
    assert top.needed_bytes <= result.available_bytes * MARGIN
    assert f"needs about" in top.reason and "free" in top.reason
    assert result.summary.startswith("On NVIDIA Test GPU")


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
    assert "Gated" in choice.reason


def test_8b_on_an_80gb_card_trains_without_checkpointing() -> None:
    # The automatic choice for 8B on 80 GB; bench/results/speed.jsonl measured it (the engine_auto case) at
    # 2.01x the tokens/s of the baseline with checkpointing (H200).
    choice = choice_for("llama-3.1-8b", machine(gpu(80)))
    assert (choice.method, choice.gradient_checkpointing, choice.micro_batch_size) == ("lora", False, 2)
    assert choice.micro_batch_size * choice.gradient_accumulation == 16


def test_partial_checkpointing_when_no_checkpointing_does_not_fit() -> None:
    choice = choice_for("llama-3.1-8b", machine(gpu(48)))
    assert (choice.gradient_checkpointing, choice.checkpoint_layers, choice.micro_batch_size) == (True, 8, 2)
    assert "checkpointing on for 8 of 32 layers" in choice.reason
    spec = choice.apply(spec_mod.loads('[dataset]\npreset = "demo"\n'))
    assert (spec.training.gradient_checkpointing, spec.training.checkpoint_layers) == (True, 8)
    roomier = choice_for("llama-3.1-8b", machine(gpu(40)))
    assert roomier.checkpoint_layers == 16  # less memory: more layers recompute


def test_checkpointing_off_when_memory_allows() -> None:
    small = choice_for("qwen2.5-1.5b", machine(gpu(80)))
    assert small.method == "lora" and small.gradient_checkpointing is False and small.micro_batch_size >= 4
    tight = choice_for("qwen2.5-1.5b", machine(gpu(16)))
    assert tight.gradient_checkpointing is True


def test_too_big_even_with_qlora() -> None:
    choice = choice_for("llama-3.3-70b", machine(gpu(24)))
    assert choice.fit == "too_big" and "even with QLoRA" in choice.reason


def test_cpu_only_recommends_the_demo() -> None:
    result = recommend(NO_GPU)
    assert [c.model for c in result.choices] == ["smollm2-135m-demo"]
    assert result.choices[0].method == "lora" and "CPU" in result.choices[0].reason
    assert "24 GB GPU" in result.choices[0].reason and "No GPU" in result.summary


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


def test_recommend_cli_json_and_doctor(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--vram", "24", "--json", "--top", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["choices"]) == 3 and data["choices"][0]["estimate"]["total"] > 0
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "No GPU" in out and "libraries:" in out and "torch" in out
    assert main(["models"]) == 0
    assert "llama-3.1-8b" in capsys.readouterr().out


def test_probe_on_a_cpu_says_why(capsys: pytest.CaptureFixture[str]) -> None:
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
    from engine.estimator import Settings, estimate
    from engine.recommend import arch_for, estimate_spec

    spec = spec_mod.loads('name = "x"\nmethod = "qlora"\n[model]\nname = "llama-3.1-8b"\n[dataset]\npreset = "demo"\n'
                          '[training]\nmicro_batch_size = 1\nmax_seq_length = 4096\n')
    expected = estimate(arch_for("llama-3.1-8b"), Settings(method="qlora", micro_batch_size=1, seq_len=4096))
    assert estimate_spec(spec) == expected


def test_a_missing_folder_is_named_as_such_without_asking_the_hub(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    import huggingface_hub

    from engine.errors import ModelError
    from engine.recommend import arch_for

    def hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("asked the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(ModelError, match=r"model '.*missing' is not a catalog model, an existing path or a hub id"):
        arch_for(str(tmp_path / "missing"))
    with pytest.raises(ModelError) as typo:
        arch_for("llama-3.1-8bb")
    assert "maybe llama-3.2-1b, llama-3.2-3b, llama-3.1-8b" in str(typo.value.hint)
