"""The memory estimator against real GPU measurements (tests/data/memory_calibration.jsonl)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench.calibrate_memory import features, row_settings
from tunewiz.engine.config import catalog
from tunewiz.engine.planning.estimator import COEFFICIENTS, ModelArch, Settings, adapter_params, estimate

CALIBRATION = Path(__file__).parent / "data" / "memory_calibration.jsonl"
ROWS = [json.loads(line) for line in CALIBRATION.read_text().splitlines() if line.strip()]


def test_the_calibration_fit_models_exactly_what_the_estimator_computes() -> None:
    """`bench.calibrate_memory fit` refits the coefficients on the estimator's own terms: with today's
    coefficients its linear model gives every row the estimator's number (offloaded and partial checkpointing,
    the fused blocks' recompute, QLoRA's buffers, preference runs and the CPU alike)."""
    c = COEFFICIENTS
    scale = 1 + c["overhead_fraction"]
    weights = [scale, scale * c["activations_no_checkpointing"], scale * c["activations_checkpointing"],
               scale * c["logits_bytes_per_vocab_token"], scale * c["fused_loss_bytes_per_hidden_token"],
               c["overhead_bytes"]]
    arch = ModelArch.from_entry(catalog.models()["llama-3.1-8b"])
    settings = [row_settings(r) for r in ROWS] + [(arch, s) for s in (
        Settings(offload_checkpoints=True), Settings(checkpoint_layers=16), Settings(method="qlora"),
        Settings(objective="dpo"), Settings(gradient_checkpointing=False, lora_dropout=True, fused_lora=False))]
    for row_arch, row in settings:
        linear = sum(w * f for w, f in zip(weights, features(row_arch, row)))
        assert linear == pytest.approx(estimate(row_arch, row).total, rel=1e-6), row


def test_calibration_covers_what_the_estimator_claims() -> None:
    done = [r for r in ROWS if r["status"] == "completed"]
    assert len(done) >= 16
    assert len({r["model"] for r in done}) >= 3
    assert {r["method"] for r in done} == {"lora", "qlora"}
    assert {r["gradient_checkpointing"] for r in done} == {True, False}
    assert len({r["seq_len"] for r in done}) >= 2
    assert all(r["gpu"] and r["torch_peak_reserved_bytes"] > 0 for r in done)
    assert sum(r.get("nvml_used_bytes", 0) > 0 for r in done) >= 16  # CUDA_CONTEXT_BYTES comes from these
    levers = {(r.get("fused_kernels", "off"), r.get("adapter_bytes", 4)) for r in done}
    assert {("off", 4), ("all", 4), ("all", 2), ("loss", 4)} <= levers  # the engine's defaults and each lever


@pytest.mark.parametrize("row", [r for r in ROWS if r["status"] == "completed"],
                         ids=lambda r: f"{r['model']}-{r['method']}-{r['seq_len']}-gc{int(r['gradient_checkpointing'])}"
                                       f"-{r.get('fused_kernels', 'off')}-{r.get('adapter_bytes', 4)}B")
def test_estimate_within_ten_percent_of_measured(row: dict) -> None:
    arch, settings = row_settings(row)
    predicted = estimate(arch, settings).total
    measured = row["torch_peak_reserved_bytes"]
    assert abs(predicted - measured) / measured <= 0.10, (predicted / 2**30, measured / 2**30)


@pytest.mark.parametrize("name", sorted(catalog.models()))
def test_architecture_facts_match_the_parameter_count(name: str) -> None:
    entry = catalog.models()[name]
    assert abs(ModelArch.from_entry(entry).params - entry.params) / entry.params < 0.01


def test_adapter_size_matches_the_known_llama_8b_figure() -> None:
    arch = ModelArch.from_entry(catalog.models()["llama-3.1-8b"])
    assert adapter_params(arch, Settings(r=16)) == 41_943_040  # peft's count for r=16 on all 7 projections


def test_estimate_moves_the_right_way() -> None:
    arch = ModelArch.from_entry(catalog.models()["llama-3.1-8b"])
    base = Settings()
    assert estimate(arch, Settings(method="qlora")).weights < estimate(arch, base).weights / 2.5
    assert estimate(arch, Settings(gradient_checkpointing=False)).activations > 3 * estimate(arch, base).activations
    assert estimate(arch, Settings(seq_len=4096)).total > estimate(arch, base).total
    assert estimate(arch, Settings(r=64)).adapters_optimizer == 4 * estimate(arch, base).adapters_optimizer
    assert estimate(arch, Settings(optimizer="adamw_8bit")).adapters_optimizer < estimate(arch, base).adapters_optimizer
    breakdown = estimate(arch, base).breakdown()
    assert breakdown["total"] == sum(v for k, v in breakdown.items() if k != "total")


def test_arch_from_config_json() -> None:
    config = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}
    arch = ModelArch.from_config(config)
    assert arch.kv_dim == 32 and arch.q_dim == 64
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        ModelArch.from_config({"num_hidden_layers": 2})


def test_partial_checkpointing_sits_between_none_and_full() -> None:
    arch = ModelArch.from_entry(catalog.models()["llama-3.1-8b"])
    full = estimate(arch, Settings()).activations
    assert estimate(arch, Settings(checkpoint_layers=arch.layers)).activations == full
    quarter = estimate(arch, Settings(checkpoint_layers=8)).activations
    half = estimate(arch, Settings(checkpoint_layers=16)).activations
    none = estimate(arch, Settings(gradient_checkpointing=False)).activations
    assert full < half < quarter < none
    assert estimate(arch, Settings(gradient_checkpointing=False, checkpoint_layers=8)).activations == none


def test_offloaded_checkpoints_keep_two_layer_inputs_on_the_gpu() -> None:
    arch = ModelArch.from_entry(catalog.models()["llama-3.1-8b"])
    full = estimate(arch, Settings()).activations
    offloaded = estimate(arch, Settings(offload_checkpoints=True)).activations
    layer_input = 2 * arch.hidden * Settings().tokens  # 32 MiB at 2 x 2048 tokens
    kept_off = (arch.layers - 2) * layer_input * COEFFICIENTS["activations_checkpointing"]
    assert full - offloaded == pytest.approx(kept_off, rel=1e-6)  # about 0.9 GiB
    assert estimate(arch, Settings(offload_checkpoints=True, gradient_checkpointing=False)).activations == estimate(
        arch, Settings(gradient_checkpointing=False)).activations  # nothing to offload without checkpointing
    assert estimate(arch, Settings(offload_checkpoints=True, cpu=True)).activations == estimate(
        arch, Settings(cpu=True)).activations  # the engine does not offload on a CPU
    assert estimate(arch, Settings(offload_checkpoints=True, gpus=2)).activations == estimate(
        arch, Settings(gpus=2)).activations  # nor on several GPUs


def test_fused_qlora_holds_one_dequantised_buffer_per_projection_shape() -> None:
    arch = ModelArch.from_entry(catalog.models()["llama-3.1-8b"])
    buffers = 2 * (4096 * 4096 + 1024 * 4096 + 14336 * 4096 + 4096 * 14336)  # q/o, k/v, gate/up, down: 0.26 GiB
    assert estimate(arch, Settings(method="qlora", fused_lora=True)).weights - estimate(
        arch, Settings(method="qlora", fused_lora=False)).weights == buffers
    assert estimate(arch, Settings(fused_lora=True)).weights == estimate(arch, Settings(fused_lora=False)).weights


def test_fused_blocks_keep_no_dropout_copies_nor_the_down_projection_input() -> None:
    """Without checkpointing every layer keeps what autograd saved: the fused blocks keep their inputs and O's
    contiguous input, but no dropout copies and no down-projection input. With checkpointing, the layer being
    recomputed peaks with the same transient buffers either way: the same estimate."""
    arch = ModelArch.from_entry(catalog.models()["llama-3.1-8b"])
    h, f, tokens, layers = 4096, 14336, 2 * 2048, 32
    unfused = estimate(arch, Settings(gradient_checkpointing=False, fused_lora=False, lora_dropout=True)).activations
    fused = estimate(arch, Settings(gradient_checkpointing=False, lora_dropout=True)).activations
    dropout_copies = 3 * (6 * h + f)  # bf16 input and 1-byte mask of Q, K, V, O, gate, up (h each) and down (f)
    rank_products = 2 * 16 * 7
    block_inputs = 2 * h + 2 * h + 2 * h  # the attention's and the MLP's normed inputs, O's contiguous input
    per_token = 2 * f + dropout_copies - rank_products - block_inputs
    coefficient = COEFFICIENTS["activations_no_checkpointing"]
    assert unfused - fused == pytest.approx(per_token * tokens * layers * coefficient, rel=1e-6)  # about 16 GiB
    dropout = Settings(lora_dropout=True)
    assert estimate(arch, dropout).activations == estimate(arch, replace(dropout, fused_lora=False)).activations
