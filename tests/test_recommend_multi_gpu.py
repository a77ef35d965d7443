"""The recommender on simulated machines with several GPUs: DDP when a model fits one card, FSDP when only
sharding makes it fit, and what a chosen run's spec says about its GPUs."""

from __future__ import annotations

import dataclasses

import pytest

from tests.test_recommend import NO_GPU, gpu, machine
from tunewiz.engine.cli.main import main
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.planning import hardware
from tunewiz.engine.planning.estimator import Settings, estimate
from tunewiz.engine.planning.recommend import EFFECTIVE_BATCH, MARGIN, arch_for, choice_for, estimate_spec, recommend


def cards(count: int, total_gb: float, name: str = "NVIDIA Test GPU") -> list:
    return [gpu(total_gb, index=i, name=name) for i in range(count)]


def plain_spec() -> spec_mod.RunSpec:
    return spec_mod.loads('name = "x"\n[dataset]\npreset = "demo"\n')


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("total_gb", [24, 80])
def test_a_model_that_fits_one_card_trains_on_all_of_them_with_ddp(count: int, total_gb: float) -> None:
    one = choice_for("qwen2.5-7b", machine(gpu(total_gb)))
    several = choice_for("qwen2.5-7b", machine(*cards(count, total_gb)))
    assert one.fit == "fits" and one.gpus == 1
    assert (several.gpus, several.strategy, several.gpu_ids, several.training_gpus) == (
        count, "ddp", tuple(range(count)), count)
    assert several.fit == "fits" and several.method == one.method
    assert several.micro_batch_size * count <= EFFECTIVE_BATCH  # the effective batch can be kept
    assert several.micro_batch_size * several.gradient_accumulation == EFFECTIVE_BATCH
    assert f"on {count} GPUs (DDP)" in several.reason and "of each GPU's" in several.reason
    speed = {2: "about 1.6–1.7× as fast as one GPU", 4: "about 3.2–3.4× as fast as one GPU"}[count]
    assert speed in several.reason and "80–84% scaling measured for 8B on 2 GPUs" in several.reason
    assert ("more GPUs not measured" in several.reason) == (count > 2)


@pytest.mark.parametrize(("count", "model"), [(2, "qwen2.5-32b"), (4, "llama-3.3-70b")])
def test_a_model_that_only_fits_sharded_gets_fsdp(count: int, model: str) -> None:
    one = choice_for(model, machine(gpu(24)))
    several = choice_for(model, machine(*cards(count, 24)))
    assert one.fit != "fits"
    assert (several.fit, several.strategy, several.gpus, several.method) == ("fits", "fsdp", count, "qlora")
    assert several.needed_bytes <= several.available_bytes * MARGIN < one.needed_bytes
    settings = Settings(method="qlora", micro_batch_size=several.micro_batch_size, seq_len=2048,
                        gradient_checkpointing=several.gradient_checkpointing, gpus=count, fsdp=True)
    assert several.estimate == estimate(arch_for(model), settings)
    assert f"sharded over {count} GPUs (FSDP)" in several.reason
    assert "stored as bf16 so that FSDP can shard them" in several.reason and "slower than DDP" in several.reason


def test_bigger_models_that_fit_sharded_are_ranked_like_any_other() -> None:
    result = recommend(machine(*cards(4, 24)))
    assert all(c.gpus == 4 for c in result.choices)
    by_model = {c.model: c for c in result.choices}
    assert by_model["llama-3.3-70b"].strategy == "fsdp" and by_model["llama-3.3-70b"].fit == "fits"
    one = {c.model: c for c in recommend(machine(gpu(24))).choices}
    assert one["llama-3.3-70b"].fit == "too_big"
    # what fits one GPU (DDP) comes before what only fits sharded (FSDP); the first is as on one GPU
    strategies = [c.strategy for c in result.choices if c.fit == "fits"]
    assert strategies == sorted(strategies)
    assert (result.choices[0].model, result.choices[0].strategy) == ("llama-3.1-8b", "ddp")


def test_too_big_even_sharded_says_so() -> None:
    choice = choice_for("llama-3.3-70b", machine(*cards(2, 24)))
    assert (choice.fit, choice.strategy) == ("too_big", "fsdp")
    assert "on each GPU even with QLoRA sharded over 2 GPUs (FSDP)" in choice.reason


def test_the_summary_says_what_a_run_uses() -> None:
    two = recommend(machine(*cards(2, 80)))
    assert two.summary.startswith("On 2 × NVIDIA Test GPU with 80 GiB free each: ")
    assert "(2 GPUs found; a run uses both.)" in two.summary and "a run uses one" not in two.summary
    assert "(4 GPUs found; a run uses all 4.)" in recommend(machine(*cards(4, 24))).summary


def test_apply_sets_the_gpus_and_the_strategy() -> None:
    spec = plain_spec()
    for count, model, strategy in [(2, "qwen2.5-7b", "ddp"), (2, "qwen2.5-32b", "fsdp")]:
        choice = choice_for(model, machine(*cards(count, 24)))
        applied = choice.apply(spec)
        assert (applied.training.gpus, applied.training.strategy) == (count, strategy)
        assert spec_mod.loads(spec_mod.dumps(applied)) == applied
        assert estimate_spec(applied) == choice.estimate  # the engine estimates the spec as the choice did
    assert (spec.training.gpus, spec.training.strategy) == (1, "auto")
    one = choice_for("qwen2.5-7b", machine(gpu(24))).apply(dataclasses.replace(
        spec, training=dataclasses.replace(spec.training, gpus=2, strategy="fsdp")))
    assert (one.training.gpus, one.training.strategy) == (1, "auto")


def test_only_gpus_of_the_best_model_with_as_much_free_memory_are_used() -> None:
    mixed = machine(gpu(24, index=0, name="Small GPU"), gpu(48, index=1, name="Big GPU"),
                    gpu(48, index=2, name="Big GPU"))
    choice = recommend(mixed).choices[0]
    assert (choice.gpus, choice.gpu_ids, choice.training_gpus) == (2, (1, 2), [1, 2])
    assert choice.apply(plain_spec()).training.gpus == [1, 2]
    assert "a run uses the 2 of the same model with the most memory free (GPUs 1, 2)" in recommend(mixed).summary
    busy = machine(gpu(80, index=0), gpu(80, index=1, used_gb=40))
    result = recommend(busy)
    assert all(c.gpus == 1 for c in result.choices)
    assert "(2 GPUs found; a run uses one: the others are another model or have less memory free.)" in result.summary


def test_one_gpu_asked_for_is_the_single_gpu_advice() -> None:
    one = recommend(machine(gpu(24)))
    asked = recommend(machine(*cards(2, 24)), gpus=1)
    assert asked.choices == one.choices and all(c.gpus == 1 for c in asked.choices)
    assert asked.summary == one.summary + " (2 GPUs found; this advice is for one of them.)"
    assert choice_for("qwen2.5-7b", machine(*cards(4, 24)), gpus=1) == choice_for("qwen2.5-7b", machine(gpu(24)))
    assert choice_for("qwen2.5-7b", machine(*cards(4, 24)), gpus=2).gpus == 2


def test_single_gpu_and_vram_paths_are_unchanged() -> None:
    single = recommend(machine(gpu(24)))
    assert all((c.gpus, c.gpu_ids, c.training_gpus) == (1, (0,), 1) for c in single.choices)
    assert "GPUs found" not in single.summary
    hypothetical = recommend(machine(*cards(4, 80)), vram_bytes=24 * 2**30)
    assert hypothetical.choices == recommend(NO_GPU, vram_bytes=24 * 2**30).choices
    assert all((c.gpus, c.gpu_ids) == (1, ()) for c in hypothetical.choices)
    assert hypothetical.summary.startswith("On a GPU with 24 GiB free: ") and "GPUs found" not in hypothetical.summary
    assert recommend(NO_GPU).choices[0].gpus == 1


def test_recommend_command_shows_the_gpus(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "probe", lambda **_: machine(*cards(2, 24)))
    assert main(["recommend", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "GPUS STRATEGY" in out and "2 ddp" in out and "--set training.gpus=2" in out
    assert main(["recommend", "--top", "3", "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "GPUS" not in out and "this advice is for one of them" in out
    assert main(["recommend", "--gpus", "0"]) == 2
    assert "at least one GPU" in capsys.readouterr().err
