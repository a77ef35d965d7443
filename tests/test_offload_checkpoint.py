"""The engine's own checkpointing (one node per layer) and its offloaded layer inputs
(`speed.offload_checkpoints`): the same gradients as torch's checkpointing, dropout and autocast included;
torch's path where it does not apply; the wiring."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from tunewiz.engine.config.spec import RunSpec, apply_overrides
from tunewiz.engine.training import offload_checkpoint, speed

VOCAB = 256


def _spec(*overrides: str) -> RunSpec:
    spec = RunSpec()
    spec.dataset.preset = "demo"
    return apply_overrides(spec, list(overrides))


def _model(*, offload: bool, fused: bool, family: str = "llama") -> Any:
    """A tiny random model of `family` (Llama unless said) with LoRA (dropout 0.1) on all 7 projections and
    checkpointing on every layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunewiz.engine.training.trainer import prepare_trainable

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                                  tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_config(config)
    spec = _spec("lora.dropout=0.1", 'lora.target_modules=["all-linear"]', f"speed.fused_lora={str(fused).lower()}")
    model, _ = prepare_trainable(base, spec, torch.float32, cuda=False)
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if offload:
        assert offload_checkpoint.apply_checkpointing(model, offload=True) == 2  # kept in place on a CPU
    return model.train()


def _grads(model: Any, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One seeded step from token ids (the first layer's input needs no gradient: frozen embeddings)."""
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()  # outside autocast, as the Trainer runs it: the recompute must restore it
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fused", [False, True], ids=["lean", "fused"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_offloaded_checkpointing_gives_torch_checkpointing_gradients(fused: bool, autocast: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    reference_loss, reference = _grads(_model(offload=False, fused=fused), autocast)
    calls: list[bool] = []
    real = offload_checkpoint.LayerCheckpoint.apply
    monkeypatch.setattr(offload_checkpoint.LayerCheckpoint, "apply", lambda *a: calls.append(True) or real(*a))
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", _refuse)
    loss, grads = _grads(_model(offload=True, fused=fused), autocast)
    assert len(calls) == 2  # both layers, none through torch's checkpointing
    assert torch.equal(loss, reference_loss)
    assert reference.keys() == grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name  # layer 0's adapters too (its input needs no grad)
        assert torch.allclose(grad, reference[name], atol=1e-5), name


def _counted_grads(model: Any, monkeypatch: pytest.MonkeyPatch
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, int]]:
    """`_grads`, and how often each kind of projection ran its frozen matmul in the fused blocks."""
    from tunewiz.engine.training import fused_lora

    names = {id(module.get_base_layer()): name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name.endswith("_proj") and hasattr(module, "get_base_layer")}
    calls: dict[str, int] = {}
    real = fused_lora._base_forward

    def counted(inputs: torch.Tensor, base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
        calls[names[id(base)]] = calls.get(names[id(base)], 0) + 1
        return real(inputs, base, dtype)

    monkeypatch.setattr(fused_lora, "_base_forward", counted)
    loss, grads = _grads(model, autocast=False)
    return loss, grads, calls


# 2 layers: each frozen matmul in the forward and again in the recompute, but the down projection's only once
SKIPPING = {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 4, "gate_proj": 4, "up_proj": 4, "down_proj": 2}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_recompute_skips_the_down_projections_frozen_matmul_with_torch_checkpointing_gradients(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The down projection's output only feeds the layer's output, which the backward never reads. Held for each
    decoder layer of `MLP_LAST_LAYERS`, so that a transformers release that adds work after the MLP fails here."""
    reference_loss, reference = _grads(_model(offload=False, fused=True, family=family), autocast=False)
    model = _model(offload=True, fused=True, family=family)
    assert type(model.base_model.model.model.layers[0]).__name__ in offload_checkpoint.MLP_LAST_LAYERS
    loss, grads, calls = _counted_grads(model, monkeypatch)
    assert calls == SKIPPING
    assert not offload_checkpoint.output_unread()  # only while a layer recomputes
    assert torch.equal(loss, reference_loss)
    assert reference.keys() == grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad.abs().sum() > 0 and torch.allclose(grad, reference[name], atol=1e-5), name
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert calls["down_proj"] == 2  # outside a recompute it runs


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("this path must not run")


def test_layers_it_cannot_offload_take_torch_checkpointing(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[str] = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: used.append("torch"))
    monkeypatch.setattr(offload_checkpoint.LayerCheckpoint, "apply", lambda *a: used.append("offload"))
    x = torch.ones(2, 3)
    offload_checkpoint.checkpoint(lambda a, b: a, x, x)  # two positional inputs
    needs_grad = torch.ones(3, requires_grad=True)
    offload_checkpoint.checkpoint(functools.partial(lambda a, extra: a, extra=(needs_grad,)), x)
    offload_checkpoint.checkpoint(functools.partial(lambda a, extra: a, extra=(x,)), x)
    assert used == ["torch", "torch", "offload"]


def test_one_device_checkpoints_through_the_engines_node_and_offloads_only_on_a_gpu_when_asked() -> None:
    model = _model(offload=False, fused=False)
    layers = list(model.base_model.model.model.layers)

    def note(*overrides: str, cuda: bool = True, several_gpus: bool = False) -> str | None:
        for layer in layers:  # torch's checkpointing, as the Trainer sets it
            layer._gradient_checkpointing_func = torch.utils.checkpoint.checkpoint
        return speed.apply_checkpointing(model, _spec(*overrides), cuda, several_gpus)

    def offloads() -> set[Any]:
        functions = [layer._gradient_checkpointing_func for layer in layers]
        return {f.keywords["offload"] if isinstance(f, functools.partial) else "torch" for f in functions}

    assert note("training.gradient_checkpointing=false") is None and offloads() == {"torch"}
    assert note("speed.compile=true") is None and offloads() == {"torch"}  # compile traces torch's
    assert note(several_gpus=True) is None and offloads() == {"torch"}
    assert "one GPU only" in note("speed.offload_checkpoints=true", several_gpus=True) and offloads() == {"torch"}
    assert note() == "gradient checkpointing through one autograd node per layer on 2 layers"  # the default
    assert offloads() == {False}
    cpu = note("speed.offload_checkpoints=true", cuda=False)
    assert "on 2 layers" in cpu and "on the CPU" in cpu and offloads() == {False}
    offloaded = "checkpointed layer inputs offloaded to pinned CPU memory on 2 layers"
    assert note("speed.offload_checkpoints=true") == offloaded
    assert offloads() == {True}


def test_the_engines_checkpointing_without_offloading_gives_torch_checkpointing_gradients() -> None:
    reference_loss, reference = _grads(_model(offload=False, fused=True), autocast=False)
    model = _model(offload=False, fused=True)
    assert offload_checkpoint.apply_checkpointing(model, offload=False) == 2
    loss, grads = _grads(model, autocast=False)
    assert torch.equal(loss, reference_loss)
    assert all(torch.allclose(grads[name], reference[name], atol=1e-5) for name in reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloading_on_cuda_keeps_layer_inputs_off_the_gpu_with_the_same_gradients() -> None:
    """torch's checkpointing (None), the engine's node keeping inputs on the GPU (False), and offloading (True)."""
    from peft import LoraConfig, get_peft_model
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM, LlamaConfig

    def run(offload: bool | None) -> tuple[torch.Tensor, int]:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=VOCAB)
        base = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if offload is not None:
            assert offload_checkpoint.apply_checkpointing(model, offload=offload) == 8
        model.train()
        tokens = torch.randint(0, VOCAB, (4, 2048), generator=torch.Generator().manual_seed(1)).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        torch.manual_seed(5)
        # The math attention: flash attention's backward adds into dQ with atomics, in an order that shifts with
        # the timing (the side stream's copies shift it), which sessions 5 and 8 took for a race in offloading.
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
            loss = model(input_ids=tokens, labels=tokens).loss
            held = torch.cuda.memory_allocated() - before  # what the forward leaves for the backward
            loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
        return grads, held

    reference, held = run(None)
    again, _ = run(None)
    kept, held_kept = run(False)
    # A race between the side stream's copies and the compute would show in some runs only: three of them.
    offloaded = [run(True) for _ in range(3)]
    # The gradients first: a memory bound that fails must not hide them.
    # The same run twice sets the noise floor (exactly 0 under the math attention on an H200, 2026-12-03)
    noise = (again - reference).norm().item()
    for name, other in (("kept", kept), *((f"offloaded, run {i}", grads) for i, (grads, _) in enumerate(offloaded))):
        gap = (other - reference).norm().item()
        print(f"{name}: gradient gap {gap:.3e}, run-to-run noise {noise:.3e}, norm {reference.norm().item():.3e}")
        assert gap <= max(2 * noise, 1e-5 * reference.norm().item()), name
    layer_input = 4 * 2048 * 1024 * 2
    assert held - offloaded[0][1] >= 7 * layer_input  # 8 layer inputs on the GPU against at most one in flight
    # Kept in place: what torch's checkpointing keeps, give or take. Measured on an H200 (2026-12-02): the
    # engine's node held exactly two layer inputs' bytes more after the forward in session 4, two less in
    # session 5 (cause not established); anything held per layer would show as eight or more.
    assert abs(held_kept - held) <= 2 * layer_input


def _busy(stream: Any) -> None:
    """Keep `stream` busy for a while (about a tenth of a second on an H200), so that work queued after it waits."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_fetched_input_goes_back_to_the_compute_streams_memory_at_once() -> None:
    """Freed after its recompute, a prefetched input's memory is reused by the next allocation of the compute
    stream even while the side stream is still busy: with the side stream recorded on it, the block waited for
    the side stream's later work (eleven inputs, 0.34 GiB, held at an 8B step's peak)."""
    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    stored = offload_checkpoint._Stored(x, offload=True)
    stored.prefetch()
    fetched = stored.fetch()
    address = fetched.data_ptr()
    _busy(offload_checkpoint._side_stream(x.device))
    del fetched
    reused = torch.empty_like(x)
    torch.cuda.synchronize()
    assert reused.data_ptr() == address


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_input_dropped_before_its_fetch_is_not_overwritten_by_its_late_copy() -> None:
    """A backward that fails half-way drops prefetched inputs unread: the compute stream must not write into
    their memory before the copy back from the host has finished."""
    x = torch.ones(1024, 1024, device="cuda", dtype=torch.bfloat16)
    stored = offload_checkpoint._Stored(x, offload=True)
    torch.cuda.synchronize()
    _busy(offload_checkpoint._side_stream(x.device))  # the copy back is queued behind this
    stored.prefetch()
    assert stored.gpu is not None
    address = stored.gpu.data_ptr()
    del stored
    reused = torch.empty_like(x)
    assert reused.data_ptr() == address  # the same block, which the copy is still to write
    reused.zero_()
    torch.cuda.synchronize()
    assert reused.sum().item() == 0
