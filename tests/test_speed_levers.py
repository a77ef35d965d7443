"""The speed levers' decisions on any machine (their GPU effect is measured by bench/speed.py), the rank
helpers in a single process, and the benchmark's own arithmetic."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from bench import speed as bench_speed
from tunewiz.engine.config.catalog import models
from tunewiz.engine.config.spec import RunSpec, apply_overrides
from tunewiz.engine.planning.estimator import ModelArch
from tunewiz.engine.run import ranks
from tunewiz.engine.training import speed


def _spec(*overrides: str) -> RunSpec:
    spec = RunSpec()
    spec.dataset.preset = "demo"
    return apply_overrides(spec, list(overrides))


class _Model:
    def __init__(self, model_type: str) -> None:
        self.config = types.SimpleNamespace(model_type=model_type)


@pytest.fixture
def fake_liger(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A liger-kernel whose patch function records what it was asked for."""
    calls: list[dict[str, Any]] = []
    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": object()}
    patch._apply_liger_kernel_to_instance = lambda **kwargs: calls.append(kwargs)
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patch)
    monkeypatch.setattr(speed, "liger_available", lambda: True)
    return calls


def test_fused_kernels_ask_liger_for_what_the_spec_says(fake_liger: list[dict[str, Any]]) -> None:
    model = _Model("llama")
    assert speed.apply_fused_kernels(model, _spec(), cuda=True)[0] is True
    assert speed.apply_fused_kernels(model, _spec('speed.fused_kernels="loss"'), cuda=True)[0] is True
    everything, loss_only = fake_liger
    assert everything["model"] is model and everything["cross_entropy"] is False
    assert all(everything[k] for k in ("fused_linear_cross_entropy", "rms_norm", "rope", "swiglu"))
    assert loss_only["fused_linear_cross_entropy"] and not any(loss_only[k] for k in ("rms_norm", "rope", "swiglu"))


def test_fused_kernels_say_why_they_are_skipped(fake_liger: list[dict[str, Any]],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    llama = _Model("llama")
    assert speed.apply_fused_kernels(llama, _spec('speed.fused_kernels="off"'), cuda=True) == (
        False, 'fused kernels off (speed.fused_kernels = "off")')
    assert "on the CPU" in speed.apply_fused_kernels(llama, _spec(), cuda=False)[1]
    fused, note = speed.apply_fused_kernels(_Model("gpt_bigcode"), _spec(), cuda=True)
    assert not fused and "liger-kernel has none for model type 'gpt_bigcode'" in note
    monkeypatch.setattr(speed, "liger_available", lambda: False)
    fused, note = speed.apply_fused_kernels(llama, _spec(), cuda=True)
    assert not fused and "pip install liger-kernel" in note
    assert not fake_liger  # liger was never asked


def test_adapter_dtype() -> None:
    import torch

    assert speed.adapter_dtype(_spec(), torch.bfloat16, cuda=True) == torch.float32  # the default
    bf16 = _spec('speed.adapter_dtype="bf16"')
    assert speed.adapter_dtype(bf16, torch.bfloat16, cuda=True) == torch.bfloat16
    assert speed.adapter_dtype(bf16, torch.float16, cuda=True) == torch.float32  # fp16 needs fp32 masters
    assert speed.adapter_dtype(bf16, torch.float32, cuda=False) == torch.float32


def test_cast_adapters_changes_only_trainable_weights() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    assert speed.cast_adapters(model, torch.bfloat16) == 2
    assert model[0].weight.dtype == torch.float32 and model[1].weight.dtype == torch.bfloat16
    assert speed.cast_adapters(model, torch.bfloat16) == 0


def test_rank_helpers_in_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (ranks.rank(), ranks.local_rank(), ranks.world_size(), ranks.is_main()) == (0, 0, 1, True)
    assert ranks.any_rank(True) is True and ranks.any_rank(False) is False
    assert ranks.gather_int(7) == [7]
    monkeypatch.setenv("RANK", "3")
    assert not ranks.is_main()


def test_benchmark_flops_match_the_published_accounting() -> None:
    # docs: Llama-3.1-8B at s=2048 costs 32.2 GFLOP per LoRA token without recomputation.
    arch = ModelArch.from_entry(models()["llama-3.1-8b"])
    assert bench_speed.flops_per_token(arch, 2048) == pytest.approx(32.2e9, rel=0.02)
    assert bench_speed.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_speed.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench_speed.peak_flops("Some Future GPU") is None


def test_benchmark_suites_keep_their_dropout_and_the_automatic_choice_takes_the_engines(tmp_path: Path) -> None:
    """The suites run at dropout 0.05 whatever the engine's default (rows stay comparable, and the curve suite's
    noise floor is another draw of the masks); the automatic choice runs as a user gets it."""
    def dropout(variant: str, checkpointing: bool = True) -> float:
        case = bench_speed.Case("fused", "llama-3.1-8b", "lora", checkpointing, variant)
        return bench_speed.case_spec(case, Path("llama-3.1-8b"), tmp_path / "data.jsonl").lora.dropout

    assert dropout("engine") == dropout("baseline") == dropout("engine_offload") == bench_speed.SUITE_DROPOUT == 0.05
    assert dropout("engine_fused_offload_no_dropout") == 0.0
    assert dropout("engine_auto_fused", checkpointing=False) == RunSpec().lora.dropout == 0.0
    assert dropout("engine_auto_dropout", checkpointing=False) == 0.05


def test_benchmark_table_compares_within_one_suite_and_card() -> None:
    def row(suite: str, variant: str, tokens: float, gib: float, gpu: str = "H100") -> dict[str, Any]:
        return {"suite": suite, "shape": "llama-3.1-8b", "method": "lora", "checkpointing": True, "variant": variant,
                "status": "completed", "tokens_per_s": tokens, "mfu": 0.2, "peak_allocated_gib": gib,
                "peak_reserved_gib": gib, "first_loss": 12.5, "gpu": gpu, "losses": [12.5, 11.0]}

    text = bench_speed.table([row("headline", "baseline", 5000, 25), row("headline", "engine", 7500, 17.5),
                              row("curve", "baseline", 500, 3), row("levers", "plain", 6000, 25, "H200"),
                              row("levers", "fused_all", 6600, 18.5, "H200"), row("levers", "compile", 9000, 6)])
    lines = {line.split(" | ")[3]: line for line in text.splitlines() if line.startswith("| llama")}
    assert lines["engine"].endswith("| 1.50x | 0.70x |")  # against the headline baseline, not the curve's
    assert lines["fused_all"].endswith("| 1.10x | 0.74x |")
    assert lines["compile"].endswith("|  |  |")  # another card: no ratio
    auto = {**row("headline", "engine_auto", 12500, 45), "checkpointing": False}
    text = bench_speed.table([row("headline", "baseline", 5000, 25), {**row("headline", "baseline", 8000, 55),
                                                                      "checkpointing": False}, auto])
    assert next(line for line in text.splitlines() if "engine_auto" in line).endswith("| 2.50x | 1.80x |")
    # the same card in another machine session is another reference: never mixed
    text = bench_speed.table([{**row("headline", "baseline", 5000, 25), "machine": "a"},
                              {**row("headline", "engine", 7500, 17.5), "machine": "b"}])
    assert "(a; H100)" in text and "(b; H100)" in text
    assert next(line for line in text.splitlines() if "| engine |" in line).endswith("|  |  |")


def test_benchmark_auto_case_trains_what_the_recommender_picks(tmp_path: Any) -> None:
    import json

    from tunewiz.engine.planning import recommend

    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    from bench.random_model import llama_config

    (folder / "config.json").write_text(json.dumps(llama_config("llama-3.1-8b").to_dict()))
    (case,) = [c for c in bench_speed.suite_cases("headline") if c.variant == "engine_auto"]
    spec = bench_speed.case_spec(case, folder, tmp_path / "long.jsonl")
    choice = recommend.choice_for(str(folder), recommend.HardwareReport(), 2048, 80 * 10**9, gpus=1)
    assert (spec.training.micro_batch_size, spec.training.gradient_accumulation,
            spec.training.gradient_checkpointing) == (choice.micro_batch_size, choice.gradient_accumulation,
                                                      choice.gradient_checkpointing)
    assert not spec.training.gradient_checkpointing  # 8B LoRA on 80 GB: no checkpointing, as the README says
    row = bench_speed.summarise(case, {"status": "failed", "error": "x"}, 1.0, spec)
    assert row["settings"]["gradient_accumulation"] == choice.gradient_accumulation  # what ran, not the case's default


def test_benchmark_fused_suite_compares_the_fused_blocks_with_the_defaults(tmp_path: Any) -> None:
    cases = {(c.method, c.checkpointing, c.variant): c for c in bench_speed.suite_cases("fused")}
    assert {"engine", "engine_unfused_lora", "baseline"} <= {v for m, gc, v in cases if m == "qlora" and gc}
    unfused = bench_speed.case_spec(cases["lora", True, "engine_unfused_lora"], tmp_path, tmp_path / "long.jsonl")
    default = bench_speed.case_spec(cases["lora", True, "engine"], tmp_path, tmp_path / "long.jsonl")
    assert default.speed.fused_lora and not unfused.speed.fused_lora and unfused.speed.lean_lora
    assert bench_speed.settings_of(cases["lora", True, "engine_unfused_lora"], unfused)["fused_lora"] is False

    def row(variant: str, tokens: float) -> dict[str, Any]:
        return {"suite": "fused", "shape": "llama-3.1-8b", "method": "lora", "checkpointing": True,
                "variant": variant, "status": "completed", "tokens_per_s": tokens, "mfu": 0.3,
                "peak_allocated_gib": 17.0, "peak_reserved_gib": 17.0, "first_loss": 12.5, "gpu": "H200"}

    text = bench_speed.table([row("baseline", 6000), row("engine", 9000), row("engine_fused_lora", 10800)])
    assert "### fused: against the baseline" in text
    assert next(line for line in text.splitlines() if "| engine_fused_lora |" in line).endswith("| 1.80x | 1.00x |")


def test_benchmark_curves_pair_each_variant_with_its_baseline() -> None:
    def row(variant: str, losses: list[float]) -> dict[str, Any]:
        return {"suite": "curve", "shape": "llama-3.2-1b", "method": "lora", "checkpointing": True, "variant": variant,
                "status": "completed", "losses": losses, "gpu": "H100"}

    text = bench_speed.table([row("baseline", [10.0] * 10), row("engine", [10.2] * 10),
                              row("baseline_no_dropout", [8.0] * 10), row("engine_no_dropout", [8.0] * 10)])
    assert "engine against baseline (" in text and "gap of the 5-step moving averages 2.00%" in text
    assert "engine_no_dropout against baseline_no_dropout (" in text and "averages 0.00%" in text


def test_the_curves_noise_floor_is_every_pair_of_dropout_draws_on_the_engines_gpu() -> None:
    def row(variant: str, level: float, gpu: str = "H200", machine: str = "call 1") -> dict[str, Any]:
        return {"suite": "curve", "shape": "llama-3.2-1b", "method": "lora", "checkpointing": True, "variant": variant,
                "status": "completed", "losses": [level] * 10, "gpu": gpu, "machine": machine}

    rows = [row("baseline", 10.0), row("baseline_other_dropout", 10.1), row("engine", 10.25),
            row("baseline", 10.0, machine="call 2"), row("baseline_other_dropout_2", 9.8, machine="call 2"),
            row("baseline_other_dropout_3", 50.0, gpu="H100")]  # another card's draw stays out
    noise = bench_speed.curve_noise(rows)
    assert noise is not None and noise.baseline_spread == 0.0
    # draws 10.0, 10.1 and 9.8: pairs 1%, 2%, about 2.97% (gaps are relative to the first curve of each pair)
    assert sorted(round(gap, 4) for gap in noise.floor) == [0.01, 0.02, 0.0297]
    assert sorted(round(gap, 4) for gap in noise.against) == [0.0149, 0.025, 0.0459]
    assert not noise.within  # 4.59% against the widest pair's 2.97%
    # from 10.1 the engine (1.49%) lies between 10.0 (0.99%) and 9.8 (2.97%); from the other two it is the farthest
    assert noise.ranks == [3, 2, 3] and noise.typical_rank == 2.0
    text = bench_speed.table(rows)
    assert "3 draws of the baseline's dropout masks" in text and "outside the floor" in text
    assert bench_speed.curve_noise([row("baseline", 10.0), row("engine", 10.1)]) is None  # one draw: no floor


def test_packing_is_compared_within_one_call_shape_and_method() -> None:
    assert {(c.shape, c.method) for c in bench_speed.suite_cases("packing")} == {
        ("llama-3.2-1b", "lora"), ("llama-3.1-8b", "lora"), ("llama-3.1-8b", "qlora")}

    def row(machine: str, method: str, packed: bool, speed: float) -> dict[str, Any]:
        return {"suite": "packing", "shape": "llama-3.1-8b", "method": method, "checkpointing": True,
                "variant": "engine", "packing": packed, "status": "completed", "tokens_per_s": speed,
                "peak_reserved_gib": 10.0, "machine": machine, "gpu": "H200"}

    text = bench_speed.table([row("call 1", "lora", False, 100.0), row("call 1", "lora", True, 150.0),
                              row("call 2", "lora", False, 120.0), row("call 2", "qlora", True, 90.0),
                              row("call 2", "qlora", False, 60.0)])
    lines = [line for line in text.splitlines() if line.startswith("Packing")]
    assert len(lines) == 2  # call 2's LoRA has no packed row
    assert "lora (call 1;" in lines[0] and "(1.50x)" in lines[0]
    assert "qlora (call 2;" in lines[1] and "(1.50x)" in lines[1]


def test_curve_summary_measures_the_gap_of_moving_averages() -> None:
    summary = bench_speed.curve_summary([10.0] * 10, [10.0] * 5 + [10.5] * 5, window=5)
    assert "difference 0.0000" in summary and "largest gap of the 5-step moving averages 5.00%" in summary


def _tiny_llama(layers: int = 4) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))


@pytest.mark.parametrize("layers", [None, 1, 3])
def test_partial_checkpointing_keeps_the_maths(layers: int | None) -> None:
    import torch

    from tunewiz.engine.training.trainer import limit_checkpointing

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for limit in (None, layers):
        model = _tiny_llama()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kept = limit_checkpointing(model, limit)
        model.train()
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert kept == (4 if layers is None else layers, 4)
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [i < kept[0] for i in range(4)]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)  # recomputing fewer layers changes no gradient


def _lora_llama(lean: bool, dropout: float = 0.0, dtype: Any = None) -> Any:
    """The tiny llama with a LoRA adapter whose B is not zero (so the adapter shows in every output)."""
    import torch

    from tunewiz.engine.training.trainer import prepare_trainable

    base = _tiny_llama(2)
    if dtype is not None:
        base = base.to(dtype)
    spec = _spec(f"lora.dropout={dropout}", f"speed.lean_lora={str(lean).lower()}",
                 'lora.target_modules=["all-linear"]', "speed.fused_lora=false")  # the lean forward alone
    model, prepared = prepare_trainable(base, spec, dtype or torch.float32, cuda=False)
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.1)
    assert bool(prepared.notes[1:]) is lean  # the run's log says when the lean forward is on
    return model


def _loss_and_grads(model: Any, autocast: bool = False) -> tuple[Any, Any]:
    import torch

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_lean_lora_keeps_the_maths() -> None:
    import torch

    peft_loss, peft_grads = _loss_and_grads(_lora_llama(lean=False))
    lean_loss, lean_grads = _loss_and_grads(_lora_llama(lean=True))
    assert torch.allclose(peft_loss, lean_loss, atol=1e-6)
    assert torch.allclose(peft_grads, lean_grads, atol=1e-6)
    # bf16 weights, fp32 adapters, autocast: the engine's GPU set-up; the lean forward skips the upcast
    peft_loss, peft_grads = _loss_and_grads(_lora_llama(lean=False, dtype=torch.bfloat16), autocast=True)
    lean_loss, lean_grads = _loss_and_grads(_lora_llama(lean=True, dtype=torch.bfloat16), autocast=True)
    assert abs(peft_loss.item() - lean_loss.item()) < 2e-2
    assert torch.nn.functional.cosine_similarity(peft_grads, lean_grads, dim=0) > 0.999


def test_lean_lora_replaces_peft_forward_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora import Linear

    model = _lora_llama(lean=True, dropout=0.1)
    patched = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(patched) == 14 and all("forward" in vars(m) for m in patched)  # 7 projections x 2 layers

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("peft's forward ran")

    monkeypatch.setattr(Linear, "forward", refuse)
    _loss_and_grads(model)  # every LoRA layer took the lean path, dropout included


def test_lean_lora_leaves_disabled_and_merged_adapters_to_peft() -> None:
    import torch

    lean, plain = _lora_llama(lean=True), _lora_llama(lean=False)
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with lean.disable_adapter(), plain.disable_adapter():
            without = lean(input_ids=tokens).logits
            assert torch.allclose(without, plain(input_ids=tokens).logits, atol=1e-6)  # the same base model
        with_adapter = lean(input_ids=tokens).logits
        assert not torch.allclose(without, with_adapter)
        lean.merge_adapter()
        assert torch.allclose(lean(input_ids=tokens).logits, with_adapter, atol=1e-5)  # not added twice
        lean.unmerge_adapter()
        assert torch.allclose(lean(input_ids=tokens).logits, with_adapter, atol=1e-5)


def test_multi_gpu_table_scales_against_one_gpu_of_the_same_machine() -> None:
    from bench import multi_gpu

    def row(gpus: int, tokens: float, machine: str) -> dict[str, Any]:
        return {"bench": "scaling", "shape": "llama-3.1-8b", "method": "lora", "steps": 32, "gpus": gpus,
                "tokens_per_s": tokens, "peak_reserved_gib_per_gpu": [17.9] * gpus, "machine": machine}

    text = multi_gpu.table([row(1, 9000, "a"), row(1, 5000, "b"), row(2, 15300, "a")])
    assert "| a | llama-3.1-8b | lora | 32 | 2 | 15300 | 85% | 17.9, 17.9 |" in text


def test_lean_lora_compiles_without_graph_breaks() -> None:
    """`speed.compile` traces the lean forward whole: no graph break, the same loss and gradients."""
    import torch
    import torch._dynamo

    reference_loss, reference_grads = _loss_and_grads(_lora_llama(lean=True))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss, grads = _loss_and_grads(torch.compile(_lora_llama(lean=True), backend="aot_eager"))
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch.allclose(loss, reference_loss, atol=1e-6) and torch.allclose(grads, reference_grads, atol=1e-5)


def test_baseline_dropout_seed_changes_only_the_loops_random_numbers() -> None:
    from bench.baseline import loop_seeds

    assert loop_seeds(42, None) == {"seed": 42, "data_seed": 42}
    assert loop_seeds(42, 43) == {"seed": 43, "data_seed": 42}  # the same data order, other dropout masks


def test_benchmark_table_has_unsloth_columns_for_rows_of_the_same_call(tmp_path: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def row(variant: str, tokens: float, machine: str, checkpointing: bool = True) -> dict[str, Any]:
        return {"suite": "fused", "shape": "llama-3.1-8b", "method": "qlora", "checkpointing": checkpointing,
                "variant": variant, "status": "completed", "tokens_per_s": tokens, "mfu": 0.3, "seq_len": 2048,
                "peak_allocated_gib": 8.0, "peak_reserved_gib": 8.4, "first_loss": 12.5, "gpu": "H200",
                "settings": {"micro_batch": 2}, "machine": machine}

    anchor = tmp_path / "anchor.jsonl"  # what .whl/vs-unsloth.sh writes: no machine label
    anchor.write_text("".join(json.dumps({"stack": stack, "method": "qlora", "seq": 2048, "batch": 2, "shape": "8b",
                                          "tokens_per_s": tokens, "peak_reserved_gib": 7.0}) + "\n"
                              for stack, tokens in (("unsloth", 10000.0), ("unsloth-nogc", 20000.0))))
    labelled = tmp_path / "unsloth.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench.speed", "label", str(anchor), "--machine", "call 2",
                                      "--out", str(labelled)])
    bench_speed.main()
    rows = [row("engine", 9000, "call 2"), row("engine", 12000, "call 2", checkpointing=False),
            row("engine", 9500, "call 1")] + bench_speed.load(labelled)
    text = bench_speed.table(rows)
    call_2 = text.split("### fused: against the baseline (call 2")[1].split("###")[0]
    assert "| vs Unsloth | memory vs Unsloth |" in call_2
    lines = [line for line in call_2.splitlines() if "| engine |" in line]
    assert lines[0].endswith("| 10000.0 | 7.0 | 0.90x | 1.20x |")  # checkpointing on: Unsloth's default
    assert lines[1].endswith("| 20000.0 | 7.0 | 0.60x | 1.20x |")  # off: unsloth-nogc
    call_1 = text.split("(call 1")[1]  # another call's rows get no Unsloth columns
    assert "Unsloth tok/s" not in call_1.split("\n\n")[1]


def test_benchmark_shapes_suite_runs_the_other_shapes_and_long_sequences_against_unsloth(tmp_path: Any) -> None:
    """#17 holds 1B, 3B and the 8B at one sequence of 4096 to the 8B's ratios: their cases train at their own
    length and batch, and the table sets each against Unsloth's row of the same shape, length and batch."""
    cases = {c.name: c for c in bench_speed.suite_cases("shapes")}
    long = cases["shapes-llama-3.1-8b-lora-gc-engine_fused_offload_no_dropout-4096x1"]
    assert {c.shape for c in cases.values()} == {"llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"}
    spec = bench_speed.case_spec(long, tmp_path, tmp_path / "long.jsonl")
    assert (spec.training.max_seq_length, spec.training.micro_batch_size) == (4096, 1)
    assert spec.lora.dropout == 0.0 and spec.speed.offload_checkpoints
    row = bench_speed.summarise(long, {"status": "failed", "error": "x"}, 1.0, spec)
    assert (row["seq_len"], row["micro_batch"]) == (4096, 1)

    def engine(seq_len: int, batch: int, tokens: float) -> dict[str, Any]:
        return {"suite": "shapes", "shape": "llama-3.1-8b", "method": "lora", "checkpointing": True,
                "variant": "engine_fused_offload_no_dropout", "status": "completed", "tokens_per_s": tokens,
                "mfu": 0.3, "peak_allocated_gib": 17.0, "peak_reserved_gib": 17.0, "first_loss": 12.5, "gpu": "H200",
                "seq_len": seq_len, "micro_batch": batch, "settings": {"micro_batch": batch}, "machine": "m"}

    unsloth = {"stack": "unsloth", "method": "lora", "seq": 4096, "batch": 1, "shape": "8b", "tokens_per_s": 10000.0,
               "peak_reserved_gib": 17.0, "machine": "m"}
    text = bench_speed.table([engine(4096, 1, 11000), engine(2048, 2, 12000), unsloth])
    lines = [line for line in text.splitlines() if line.startswith("| llama-3.1-8b")]
    (long_line,) = [line for line in lines if "(4096 x 1)" in line]
    assert long_line.endswith("| 1.10x | 1.00x |")  # against Unsloth's row of 4096 x 1
    assert [line for line in lines if line != long_line][0].endswith("|  |  |")  # 2048 x 2: no Unsloth row of it
