"""The fused LoRA blocks (`speed.fused_lora`) against peft: the same loss and gradients in fp32, dropout
included; peft's path wherever they do not apply; how they compose with the lean forward."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tunewiz.engine.config.spec import RunSpec, apply_overrides
from tunewiz.engine.training import fused_lora, speed

VOCAB = 256


def _spec(*overrides: str) -> RunSpec:
    spec = RunSpec()
    spec.dataset.preset = "demo"
    return apply_overrides(spec, list(overrides))


def _config(family: str, **extra: Any) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    sizes = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": VOCAB, **extra}
    return LlamaConfig(**sizes) if family == "llama" else Qwen2Config(**sizes)  # Qwen2: biased Q/K/V


def _model(family: str = "llama", *, fused: bool, lean: bool = False, dropout: float = 0.0,
           checkpointing: bool = False, dtype: torch.dtype = torch.float32, **config: Any) -> Any:
    """A tiny random model with LoRA on all 7 projections (B not zero), through the trainer's preparation."""
    from transformers import AutoModelForCausalLM

    from tunewiz.engine.training.trainer import prepare_trainable

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config(family, **config)).to(dtype)
    spec = _spec(f"lora.dropout={dropout}", 'lora.target_modules=["all-linear"]',
                 f"speed.lean_lora={str(lean).lower()}",
                 f"speed.fused_lora={str(fused).lower()}")
    model, _ = prepare_trainable(base, spec, dtype, cuda=False)
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.1)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _step(model: Any, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and the gradients of every adapter weight and of the input embeddings, one seeded step."""
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(tokens).detach().requires_grad_()
    torch.manual_seed(5)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(inputs_embeds=embeds, labels=tokens).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), {**grads, "inputs_embeds": embeds.grad}


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("this path must not run")


@pytest.fixture
def no_peft_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora import Linear

    monkeypatch.setattr(Linear, "forward", _refuse)


@pytest.fixture
def no_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_lora.LoraSwiGLU, "apply", _refuse)
    monkeypatch.setattr(fused_lora.LoraProjections, "apply", _refuse)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_blocks_give_peft_loss_and_every_gradient(family: str, dropout: float, checkpointing: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    peft_loss, peft_grads = _step(_model(family, fused=False, dropout=dropout, checkpointing=checkpointing))
    fused = _model(family, fused=True, dropout=dropout, checkpointing=checkpointing)
    from peft.tuners.lora import Linear

    monkeypatch.setattr(Linear, "forward", _refuse)  # every projection goes through a fused block
    loss, grads = _step(fused)
    assert torch.allclose(loss, peft_loss, atol=1e-5)
    # A and B x 7 projections x 2 layers, and the input
    assert grads.keys() == peft_grads.keys() and len(grads) == 2 * 7 * 2 + 1
    for name, grad in grads.items():
        assert torch.allclose(grad, peft_grads[name], atol=1e-5), name


def test_dropout_is_live_and_masks_the_input_of_a_only() -> None:
    """Another draw of masks changes the loss; no dropout at all gives the base path exactly what peft's does."""
    with_dropout = _step(_model(fused=True, dropout=0.5))[0]
    without = _step(_model(fused=True, dropout=0.0))[0]
    assert not torch.allclose(with_dropout, without)
    model = _model(fused=True, dropout=0.5)
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    model.eval()  # dropout off in evaluation, as peft's nn.Dropout
    with torch.no_grad():
        first, second = model(input_ids=tokens).logits, model(input_ids=tokens).logits
    assert torch.equal(first, second)


def test_backward_redraws_the_forward_masks_and_restores_the_random_state() -> None:
    model = _model(fused=True, dropout=0.3)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    loss = model(input_ids=tokens, labels=tokens).loss
    after_forward = torch.get_rng_state()
    loss.backward()
    assert torch.equal(torch.get_rng_state(), after_forward)  # the backward's redraw left no trace


def test_fused_blocks_save_less_than_peft() -> None:
    """Autograd keeps the MLP's input, gate and up outputs and rank-r products, not peft's per-op tensors."""
    def saved_bytes(model: Any) -> int:
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if not isinstance(tensor, torch.nn.Parameter):
                total += tensor.numel() * tensor.element_size()
            return tensor

        mlp = model.base_model.model.model.layers[0].mlp
        x = torch.randn(2, 16, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x)
        return total

    column = 2 * 16 * 4  # bytes of one fp32 feature over the 32 tokens
    fused = saved_bytes(_model(fused=True, dropout=0.1))
    assert fused == column * (64 + 96 + 96 + 3 * 16)  # x, the gate and up outputs, 3 x (input @ A^T) at r=16
    assert fused < saved_bytes(_model(fused=False, dropout=0.1)) / 2


def test_lever_off_changes_nothing() -> None:
    model = _model(fused=False, lean=True)
    assert speed.apply_fused_lora(model, _spec("speed.fused_lora=false"), cuda=False) == []
    assert not any(isinstance(m.__dict__.get("forward"), fused_lora.functools.partial) for m in model.modules())


def test_fused_lora_is_on_by_default_and_stands_aside_under_fsdp() -> None:
    assert RunSpec().speed.fused_lora
    model = _model(fused=False)
    assert speed.apply_fused_lora(model, _spec(), cuda=False, fsdp=True) == [
        "fused LoRA blocks skipped: not under FSDP (the lean forward serves every layer)"]
    assert not any(isinstance(m.__dict__.get("forward"), fused_lora.functools.partial) for m in model.modules())


def test_fused_lora_counts_the_blocks_it_patches() -> None:
    model = _model(fused=False)
    # 2 layers: their MLPs and attention blocks; no Triton norms on a CPU
    assert speed.apply_fused_lora(model, _spec("speed.fused_lora=true"), cuda=False) == [
        "fused LoRA blocks on 2 MLPs and 2 attention blocks (speed.fused_lora)"]


def test_disabled_and_merged_adapters_take_peft_path(no_fused: None) -> None:
    fused, plain = _model(fused=True), _model(fused=False)
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with fused.disable_adapter(), plain.disable_adapter():
            assert torch.allclose(fused(input_ids=tokens).logits, plain(input_ids=tokens).logits, atol=1e-6)
        with_adapter = plain(input_ids=tokens).logits
        fused.merge_adapter()
        assert torch.allclose(fused(input_ids=tokens).logits, with_adapter, atol=1e-5)  # not added twice


def test_operands_follow_disabling_merging_and_eval_after_a_fused_call() -> None:
    """The operands prepared at the first call are reused only while peft's state and the mode stay the same."""
    fused, plain = _model(fused=True, dropout=0.5), _model(fused=False, dropout=0.5)
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    _step(fused)  # the fused blocks prepared their operands in training mode, dropout live
    fused.eval(), plain.eval()
    with torch.no_grad():
        with_adapter = plain(input_ids=tokens).logits
        assert torch.allclose(fused(input_ids=tokens).logits, with_adapter, atol=1e-5)  # no dropout in eval
        with fused.disable_adapter(), plain.disable_adapter():
            assert torch.allclose(fused(input_ids=tokens).logits, plain(input_ids=tokens).logits, atol=1e-6)
        assert torch.allclose(fused(input_ids=tokens).logits, with_adapter, atol=1e-5)  # enabled again
        fused.merge_adapter()
        assert torch.allclose(fused(input_ids=tokens).logits, with_adapter, atol=1e-5)  # not added twice


def test_adapter_casts_are_made_once_and_follow_every_update() -> None:
    weight = torch.randn(4, 8, requires_grad=True)
    first = fused_lora._cast(weight, torch.bfloat16)
    assert fused_lora._cast(weight, torch.bfloat16) is first  # reused while the weight is unchanged
    with torch.no_grad():
        weight.add_(1.0)  # what an optimiser step does
    assert torch.equal(fused_lora._cast(weight, torch.bfloat16), (weight.detach() + 0).bfloat16())
    key = id(weight)
    del weight
    assert key not in fused_lora._CASTS  # the cast goes with its weight


def test_stacked_adapters_are_made_once_and_follow_every_update() -> None:
    weights = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    first = fused_lora._stacked_cast(weights, torch.bfloat16)
    assert fused_lora._stacked_cast(weights, torch.bfloat16) is first
    with torch.no_grad():
        weights[1].add_(1.0)  # one of them stepped
    assert torch.equal(fused_lora._stacked_cast(weights, torch.bfloat16),
                       torch.cat([w.detach() + 0 for w in weights]).bfloat16())
    key = tuple(id(w) for w in weights)
    del weights[2]
    assert key not in fused_lora._STACKS  # the stack goes with any of its weights


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_projections_of_one_input_share_one_matmul_for_their_a_without_dropout(
        dropout: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without dropout Q/K/V's A matrices run as one matmul, and so do gate's and up's (stacked once a call);
    with dropout each projection draws its own mask over the input, so each keeps its own."""
    stacked: list[int] = []
    real = fused_lora._stacked_cast
    monkeypatch.setattr(fused_lora, "_stacked_cast", lambda weights, dtype: stacked.append(len(weights))
                        or real(weights, dtype))
    _step(_model(fused=True, dropout=dropout))
    layers = 2
    assert sorted(stacked) == ([] if dropout else sorted([3, 2] * layers))  # the backward reuses the forward's


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_the_scaling_rides_in_the_gemms_alpha(dropout: float) -> None:
    """No kernel of its own scales a LoRA product or gradient: the scaling and the dropout's 1 / (1 - p) are the
    alpha of the GEMMs that make them (only the dropout mask is multiplied in); the results are autograd's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6, bias=False)
    projection = fused_lora._Projection(base, 2.5, dropout)
    x, a, b, grad = torch.randn(5, 8), torch.randn(4, 8), torch.randn(6, 4), torch.randn(5, 6)
    mask = (torch.rand(5, 8) >= dropout).float() if dropout else None
    with Ops() as ops:
        out, product = fused_lora._lora_forward(x, projection, a, b, mask, torch.float32)
        grad_x, grad_a, grad_b = fused_lora._lora_backward(x, product, grad, projection, a, b, mask,
                                                           torch.float32, True)
    multiplies = [name for name in ops.names if name.startswith(("mul", "div"))]
    assert multiplies == (["mul", "mul"] if dropout else [])  # x * mask: forward and A's gradient (addcmul: input's)
    inputs, a_ref, b_ref = (t.clone().requires_grad_() for t in (x, a, b))
    kept = inputs if mask is None else inputs * mask / (1 - dropout)
    expected = inputs @ base.weight.t() + 2.5 * kept @ a_ref.t() @ b_ref.t()
    expected.backward(grad)
    assert torch.allclose(out, expected, atol=1e-5)
    for got, want in ((grad_x, inputs.grad), (grad_a, a_ref.grad), (grad_b, b_ref.grad)):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kernel", ["for-loop", "foreach", "fused"])
def test_cached_casts_train_exactly_as_fresh_ones(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three optimiser steps under bf16 autocast (fp32 adapters cast to bf16): bit for bit the same losses and
    gradients as casting afresh at every use, so no step ever computes with a cast from before an update.
    Fused AdamW (the engine's optimiser on CUDA) leaves the parameters' version counters as they were."""

    def train() -> list[torch.Tensor]:
        model = _model(fused=True, dtype=torch.bfloat16, checkpointing=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                      foreach=kernel == "foreach", fused=kernel == "fused")
        seen = []
        for _ in range(3):
            loss, grads = _step(model, autocast=True)
            seen += [loss, *grads.values()]
            optimizer.step()
            optimizer.zero_grad()
        return seen

    cached = train()
    monkeypatch.setattr(fused_lora, "_cast", lambda weight, dtype: weight.detach().to(dtype))
    monkeypatch.setattr(fused_lora, "_stacked_cast",
                        lambda weights, dtype: torch.cat([w.detach() for w in weights]).to(dtype))
    fresh = train()
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh, strict=True))


def _peft_model(**lora: Any) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(_config("llama")),
                           LoraConfig(r=4, target_modules="all-linear", **lora))
    fused_lora.apply_fused_lora(model)
    return model


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"lora_bias": True}], ids=["dora", "lora-bias"])
def test_variants_take_peft_path(lora: dict[str, Any], no_fused: None) -> None:
    model = _peft_model(**lora)
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert model.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].weight.grad is not None


def test_several_active_adapters_take_peft_path(no_fused: None) -> None:
    from peft import LoraConfig

    model = _peft_model()
    model.add_adapter("other", LoraConfig(r=4, target_modules="all-linear"))
    fused_lora.apply_fused_lora(model)
    model.base_model.set_adapter(["default", "other"])
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    model(input_ids=tokens, labels=tokens).loss.backward()


def test_a_non_swiglu_mlp_keeps_its_layers_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GELU MLP is not fused: its projections keep the lean forward; the attention blocks are fused."""
    calls: list[str] = []
    lean = speed._lean_lora_forward

    def counting(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(type(self).__name__)
        return lean(self, x, *args, **kwargs)

    monkeypatch.setattr(speed, "_lean_lora_forward", counting)
    model = _model(fused=True, lean=True, hidden_act="gelu")
    assert fused_lora.apply_fused_lora(model) == (0, 2)
    _step(model)
    assert len(calls) == 3 * 2  # gate, up and down of 2 layers; Q/K/V and O went through the fused blocks


def test_fused_supersedes_the_lean_forward_on_the_blocks_it_covers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speed, "_lean_lora_forward", _refuse)
    model = _model(fused=True, lean=True)
    reference_loss, reference_grads = _step(_model(fused=False, lean=False))
    loss, grads = _step(model)  # no lean forward ran
    assert torch.allclose(loss, reference_loss, atol=1e-5)
    assert all(torch.allclose(grads[k], reference_grads[k], atol=1e-5) for k in grads)


def test_q_k_v_in_one_node_and_a_new_input_recomputes() -> None:
    model = _model(fused=True)
    attention = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 4, 64, requires_grad=True)
    q = attention.q_proj(x)
    k, v = attention.k_proj(x), attention.v_proj(x)
    assert q.grad_fn is k.grad_fn is v.grad_fn  # one autograd node for the three
    other = torch.randn(1, 4, 64)
    attention.q_proj(x)
    k_other = attention.k_proj(other)  # another input: computed for it, not the pending output for x
    with torch.no_grad():
        lora = attention.k_proj
        adapter = lora.lora_B["default"](lora.lora_A["default"](other)) * lora.scaling["default"]
        reference = lora.base_layer(other) + adapter
    assert torch.allclose(k_other, reference, atol=1e-6)


def test_bf16_autocast_stays_close_to_peft() -> None:
    """bf16 weights, fp32 adapters, autocast: the engine's GPU set-up, here on the CPU."""
    peft_loss, peft_grads = _step(_model(fused=False, dtype=torch.bfloat16), autocast=True)
    loss, grads = _step(_model(fused=True, dtype=torch.bfloat16), autocast=True)
    assert abs(peft_loss.item() - loss.item()) < 2e-2
    flat = torch.cat([g.float().flatten() for g in grads.values()])
    peft_flat = torch.cat([g.float().flatten() for g in peft_grads.values()])
    assert torch.nn.functional.cosine_similarity(flat, peft_flat, dim=0) > 0.999


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs on CUDA, or on a CPU with TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_swiglu_kernels_match_torch(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from tunewiz.engine.training import swiglu_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    gate, up, grad = (torch.randn(3, 1000, generator=generator, device=device).to(dtype) for _ in range(3))
    reference = [t.detach().cpu().float().clone() for t in (gate, up, grad)]  # torch's operations, in fp32
    tolerance = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    expected = fused_lora.swiglu_forward(*reference[:2])
    assert torch.allclose(swiglu_triton.forward(gate, up).cpu().float(), expected, **tolerance)
    expected_gate, expected_up = fused_lora.swiglu_backward(*reference, spare=torch.empty(3, 1000))
    grad_gate, grad_up = swiglu_triton.backward(gate, up, grad.clone(), torch.empty_like(gate))
    assert torch.allclose(grad_gate.cpu().float(), expected_gate, **tolerance)
    assert torch.allclose(grad_up.cpu().float(), expected_up, **tolerance)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs on CUDA, or on a CPU with TRITON_INTERPRET=1")
def test_triton_swiglu_rounds_in_bf16_as_transformers_mlp() -> None:
    """In bf16 the kernels round where torch's operations do (SiLU's output, the gradient reaching it): the output
    and gradients are transformers' bit for bit, but for an element in ten thousand or fewer where the exponential
    functions' last bits differ (by one bf16 step at most)."""
    pytest.importorskip("triton")
    import torch.nn.functional as F

    from tunewiz.engine.training import swiglu_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    gate, up, grad = (torch.randn(8, 4096, generator=generator, device=device).to(torch.bfloat16) for _ in range(3))
    gate_ref, up_ref = gate.clone().requires_grad_(), up.clone().requires_grad_()
    expected = F.silu(gate_ref) * up_ref  # transformers' LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
    expected.backward(grad)
    got = swiglu_triton.forward(gate, up)
    grad_gate, grad_up = swiglu_triton.backward(gate, up, grad.clone(), torch.empty_like(gate))
    for mine, reference in ((got, expected.detach()), (grad_gate, gate_ref.grad), (grad_up, up_ref.grad)):
        assert reference is not None
        differ = mine != reference
        assert differ.float().mean().item() <= 1e-4
        step = torch.finfo(torch.bfloat16).eps * reference[differ].float().abs().clamp_min(1e-30)
        assert ((mine[differ].float() - reference[differ].float()).abs() <= step * 1.01).all()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors: needs TRITON_INTERPRET=1 "
                    "(on CUDA the gpu test runs the kernels inside the fused MLP)")
def test_fused_mlp_with_the_triton_kernels_gives_peft_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from tunewiz.engine.training import swiglu_triton

    peft_loss, peft_grads = _step(_model(fused=False, dropout=0.1))
    used: list[bool] = []
    monkeypatch.setattr(fused_lora, "_kernels_for", lambda tensor: used.append(True) or swiglu_triton)
    loss, grads = _step(_model(fused=True, dropout=0.1))
    assert len(used) == 2 * 3  # 2 layers: forward, and the backward's recompute and gradient
    assert torch.allclose(loss, peft_loss, atol=1e-5)
    assert all(torch.allclose(grads[k], peft_grads[k], atol=1e-5) for k in grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_fused_blocks_in_bf16_on_cuda(quantized: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weights (or NF4 ones, dequantised by the fused blocks), fp32 adapters, autocast, on CUDA; with the
    lever's Triton RMSNorm and rotary embedding."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear
    from peft.tuners.lora.bnb import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.models.llama import modeling_llama

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama", hidden_size=256, intermediate_size=512)).save_pretrained(tmp_path)
    quantization = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16) if quantized else None)

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda",
                                                    quantization_config=quantization)
        torch.manual_seed(1)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(std=0.05)
        if fused:
            monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)  # restored
            assert speed.apply_fused_lora(model, _spec("speed.fused_lora=true"), cuda=True) == [
                "fused LoRA blocks on 2 MLPs and 2 attention blocks (speed.fused_lora)", "Triton RMSNorm on 5 norms",
                "Triton rotary embedding"]
        model.train()
        tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
        with monkeypatch.context() as patch:
            if fused:  # every projection goes through a fused block
                patch.setattr(Linear4bit if quantized else Linear, "forward", _refuse)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
        return loss.detach(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])

    from tunewiz.engine.training import swiglu_triton

    assert fused_lora._kernels_for(torch.empty(1, device="cuda")) is swiglu_triton  # Triton comes with CUDA torch
    peft_loss, peft_grads = run(False)
    loss, grads = run(True)
    assert abs(peft_loss.item() - loss.item()) < 1e-2
    assert torch.nn.functional.cosine_similarity(grads, peft_grads, dim=0) > 0.995


def _quantize_linears(model: Any) -> None:
    """Every decoder-layer linear layer as a bitsandbytes NF4 layer (fp32 compute; bitsandbytes runs it on a CPU)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                                  compute_dtype=torch.float32, quant_type="nf4")
                    quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                    if child.bias is not None:
                        quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(parent, name, quantized.to("cpu"))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_4bit_layers_give_peft_loss_and_gradients(dropout: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """QLoRA: the fused blocks dequantise NF4 weights through bitsandbytes and match peft's Linear4bit."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit
    from transformers import AutoModelForCausalLM

    def model(fused: bool) -> Any:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(_config("qwen2"))
        _quantize_linears(base)
        base.is_loaded_in_4bit = True  # what transformers sets when it loads a 4-bit model; peft reads it
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                     target_modules="all-linear"))
        torch.manual_seed(2)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(std=0.1)
        if fused:
            assert fused_lora.apply_fused_lora(peft_model) == (2, 2)
        return peft_model.train()

    peft_loss, peft_grads = _step(model(fused=False))
    assert sum(isinstance(m, Linear4bit) for m in model(fused=False).modules()) == 14
    fused = model(fused=True)
    monkeypatch.setattr(Linear4bit, "forward", _refuse)
    loss, grads = _step(fused)
    assert torch.allclose(loss, peft_loss, atol=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(grad, peft_grads[name], atol=1e-5), name


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs on CUDA, or on a CPU with TRITON_INTERPRET=1")
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-scales"])
def test_triton_nf4_dequantisation_matches_bitsandbytes(nested: bool) -> None:
    pytest.importorskip("triton")
    import bitsandbytes.functional as bnb_functional

    from tunewiz.engine.training import nf4_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight = torch.randn(300, 70, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)  # odd blocks
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
    assert nf4_triton.supports(state) and state.nested == nested
    expected = bnb_functional.dequantize_4bit(packed, state)
    exact = nf4_triton.dequantize(packed, state, torch.empty(weight.shape, device=device))  # float32: no rounding
    assert torch.equal(exact.to(torch.bfloat16), expected)
    rounded = nf4_triton.dequantize(packed, state, torch.empty_like(weight))
    if device == "cuda":
        assert torch.equal(rounded, expected)
    else:  # Triton's interpreter casts to bf16 by truncation, the GPU rounds to nearest
        assert torch.allclose(rounded.float(), expected.float(), rtol=2**-7, atol=0)
    assert not nf4_triton.supports(bnb_functional.quantize_4bit(weight, quant_type="fp4")[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_dequantises_each_weight_once_per_use_through_the_triton_kernel(tmp_path: Any,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With checkpointing: forward, recompute and backward, less the weights the shared buffer of their shape
    still holds: o_proj and down_proj in each layer's backward (right after their recompute), and the last
    layer's down_proj in its recompute (right after the forward)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunewiz.engine.training import nf4_triton

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama", hidden_size=256, intermediate_size=512)).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cuda",
                                                quantization_config=quantization)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    fused_lora.apply_fused_lora(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    calls: list[tuple[int, ...]] = []
    real = nf4_triton.dequantize
    monkeypatch.setattr(nf4_triton, "dequantize", lambda packed, state, out: calls.append(tuple(out.shape))
                        or real(packed, state, out))
    fused_lora._BUFFER_HOLDS.clear()
    tokens = torch.randint(0, VOCAB, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=tokens, labels=tokens).loss
    assert len(calls) == 2 * 7  # 2 layers, 7 projections: the forward
    loss.backward()
    assert len(calls) == 2 * 7 + (6 + 5) + (7 + 5)  # forward; layer 1 recompute and backward; layer 0's


@pytest.mark.parametrize(("cuda", "dropout", "lever", "seeded"), [
    (True, 0.1, True, True), (False, 0.1, True, False), (True, 0.0, True, False), (True, 0.1, False, False)])
def test_kernel_dropout_is_used_on_cuda_with_dropout_when_asked(cuda: bool, dropout: float, lever: bool,
                                                                seeded: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunewiz.engine.training import speed

    spec = _spec(f"lora.dropout={dropout}", f"speed.fused_dropout={str(lever).lower()}")
    model = get_peft_model(AutoModelForCausalLM.from_config(_config("llama")),
                           LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear"))
    notes = speed.apply_fused_lora(model, spec, cuda)
    mlp = model.base_model.model.model.layers[0].mlp
    assert mlp.forward.__self__.seeded_dropout is seeded
    assert ("speed.fused_dropout" in notes[0]) is seeded


def test_kernel_dropout_falls_back_to_torch_masks_where_the_kernels_do_not_apply() -> None:
    """An fp32 or CPU input (or one too large for the kernels' 32-bit counter) gets torch's mask."""
    projection = fused_lora._Projection(torch.nn.Linear(8, 8), 1.0, 0.5, seeded=True)
    noise = fused_lora._noise((4, 8), torch.zeros(1), projection)
    assert isinstance(noise, torch.Tensor) and set(noise.unique().tolist()) <= {0.0, 1.0}
    no_dropout = fused_lora._Projection(torch.nn.Linear(8, 8), 1.0, 0.0, seeded=True)
    assert fused_lora._noise((4, 8), torch.zeros(1), no_dropout) is None
