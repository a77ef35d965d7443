"""The memory estimate's preference term: a pair is two sequences (chosen and rejected) in one pass, DPO's
reference pass adds no memory, DPO's log-probabilities are chunked and ORPO's logits are not; the
recommender and its suggested command follow the data's objective."""

from __future__ import annotations

import dataclasses

import pytest

from tunewiz.engine.config import catalog
from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.planning import estimator
from tunewiz.engine.planning.estimator import ModelArch, Settings, estimate
from tunewiz.engine.planning.hardware import HardwareReport
from tunewiz.engine.planning.recommend import choice_for, recommend

ARCH = ModelArch.from_entry(catalog.models()["llama-3.2-1b"])


def test_pairs_double_the_tokens_of_activations() -> None:
    sft = Settings(fused_kernels="off", micro_batch_size=2, seq_len=1024)
    for objective in ("dpo", "orpo"):
        pairs = dataclasses.replace(sft, objective=objective)
        assert pairs.tokens == 2 * sft.tokens
        assert estimator.activation_bytes(ARCH, pairs) == pytest.approx(2 * estimator.activation_bytes(ARCH, sft),
                                                                        rel=1e-6)
    # weights and adapters do not depend on the objective: DPO's reference is the base with the adapter off
    dpo = dataclasses.replace(sft, objective="dpo")
    assert estimator.weight_bytes(ARCH, dpo) == estimator.weight_bytes(ARCH, sft)
    assert estimator.adapter_bytes(ARCH, dpo) == estimator.adapter_bytes(ARCH, sft)


def test_preference_logits_are_whole_for_both_sides() -> None:
    """trl builds the whole logits of chosen and rejected, DPO and ORPO alike (a 1B DPO run on one H200 peaked at
    7.57 GiB reserved against 7.32 estimated with whole logits, 4.35 with chunked ones:
    bench/results/preference_gpu.jsonl); liger's fused loss is for SFT only."""
    sft = Settings(fused_kernels="all")
    dpo, orpo = dataclasses.replace(sft, objective="dpo"), dataclasses.replace(sft, objective="orpo")
    assert sft.fused_loss and not dpo.fused_loss and not orpo.fused_loss
    unfused = Settings(fused_kernels="off")
    for pairs in (dpo, orpo):
        assert estimator.logits_bytes(ARCH, pairs) == 2 * estimator.logits_bytes(ARCH, unfused)  # twice the tokens
    assert estimate(ARCH, dpo).total > estimate(ARCH, sft).total


def test_the_spec_objective_reaches_the_estimate() -> None:
    spec = RunSpec(name="t")
    spec.training.objective = "dpo"
    assert Settings.from_spec(spec).objective == "dpo"
    assert Settings.from_spec(RunSpec(name="t")).objective == "sft"


def _gpu_report() -> HardwareReport:
    return HardwareReport(gpus=[], cpu_count=16, ram_total_bytes=64 * 2**30, ram_available_bytes=60 * 2**30)


def test_the_recommender_needs_more_for_pairs_and_says_how_to_train_them() -> None:
    report = _gpu_report()
    vram = 24 * estimator.GIB
    sft = choice_for("llama-3.2-1b", report, 2048, vram)
    dpo = choice_for("llama-3.2-1b", report, 2048, vram, objective="dpo")
    assert (dpo.estimate.total > sft.estimate.total or dpo.micro_batch_size < sft.micro_batch_size
            or dpo.gradient_checkpointing and not sft.gradient_checkpointing)
    first = recommend(report, 2048, vram, objective="dpo").choices[0]
    overrides = first.train_overrides("ultrafeedback")
    assert "training.objective=dpo" in overrides and "dataset.preset=ultrafeedback" in overrides
    assert not any(o.startswith("training.objective") for o in first.train_overrides("alpaca"))
