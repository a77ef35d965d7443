"""LoRA dropout inside the Triton kernels (engine/training/dropout_triton.py, `speed.fused_dropout`).

On a CPU these run through Triton's interpreter (TRITON_INTERPRET=1, with Triton installed), in fp32, where
its dot products are exact; on CUDA in bf16, as the engine runs them.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tunewiz.engine.training import dropout_triton, fused_lora

pytestmark = pytest.mark.skipif(
    not dropout_triton.AVAILABLE or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="Triton runs on CUDA, or on a CPU with TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOLERANCE = 2e-2 if DTYPE == torch.bfloat16 else 1e-5


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def _mask(seed: torch.Tensor, rows: int, columns: int, p: float) -> torch.Tensor:
    """The kernels' keep mask, read back through `x_grad_` (rank 1, ones): 1 where kept, 0 where dropped."""
    ones = torch.ones(rows, 1, dtype=DTYPE, device=DEVICE)
    return dropout_triton.x_grad_(torch.zeros(rows, columns, dtype=DTYPE, device=DEVICE), ones,
                                  torch.ones(1, columns, dtype=DTYPE, device=DEVICE), seed, p, 1.0)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return (actual.float() - expected.float()).norm().item() <= TOLERANCE * max(expected.float().norm().item(), 1e-6)


def test_masks_keep_one_minus_p_and_follow_their_seed() -> None:
    p = 0.25
    mask = _mask(_seed(7), 96, 300, p)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.float().mean().item() - (1 - p)) < 0.02
    assert torch.equal(_mask(_seed(7), 96, 300, p), mask)  # a seed is a mask
    assert not torch.equal(_mask(_seed(8), 96, 300, p), mask)


@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize(("rows", "columns"), [(70, 200), (600, 72)])
def test_the_kernels_compute_dropout_lora_with_one_mask(rank: int, rows: int, columns: int) -> None:
    """Shapes off every block size; the dropped-out copy and the input's gradient against torch on the mask the
    seed draws."""
    p, scale = 0.3, 1.7
    generator = torch.Generator().manual_seed(0)
    x, a = (torch.randn(rows, columns, generator=generator).to(DEVICE, DTYPE),
            torch.randn(rank, columns, generator=generator).to(DEVICE, DTYPE))
    g = torch.randn(rows, rank, generator=generator).to(DEVICE, DTYPE)
    grad_x = torch.randn(rows, columns, generator=generator).to(DEVICE, DTYPE)
    seed = _seed(1234)
    mask = _mask(seed, rows, columns, p)
    assert torch.equal(dropout_triton.dropped(x, seed, p), x * mask)
    expected = grad_x.float() + scale * (g.float() @ a.float()) * mask.float()
    assert _close(dropout_triton.x_grad_(grad_x.clone(), g, a, seed, p, scale), expected)


class _KernelMask(torch.nn.Module):
    """A peft dropout module that applies the mask the kernels draw from `seed`."""

    def __init__(self, seed: torch.Tensor, p: float) -> None:
        super().__init__()
        self.seed, self.p = seed, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        mask = _mask(self.seed, *flat.shape, self.p).to(x.dtype)
        return (flat * mask / (1 - self.p)).view(x.shape)


@pytest.mark.skipif(DEVICE == "cuda", reason="compared in fp32 in the interpreter, where the kernels are exact")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_blocks_with_kernel_dropout_give_peft_gradients_under_the_same_masks(
        checkpointing: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, LlamaConfig

    p = 0.2
    monkeypatch.setattr(dropout_triton, "usable", lambda like, elements: True)  # fp32 CPU tensors, for the test
    drawn: list[torch.Tensor] = []
    real_seed = dropout_triton.new_seed
    monkeypatch.setattr(dropout_triton, "new_seed", lambda like: drawn.append(real_seed(like)) or drawn[-1])

    def model(fused: bool) -> Any:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128)
        peft_model = get_peft_model(AutoModelForCausalLM.from_config(config),
                                    LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules="all-linear"))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(std=0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
        if fused:
            assert fused_lora.apply_fused_lora(peft_model, seeded_dropout=True) == (2, 2)
        if checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return peft_model.train()

    def step(peft_model: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        embeds = peft_model.get_input_embeddings()(tokens).detach().requires_grad_()
        loss = peft_model(inputs_embeds=embeds, labels=tokens).loss
        loss.backward()
        grads = {n: q.grad for n, q in peft_model.named_parameters() if q.requires_grad}
        return loss.detach(), {**grads, "inputs": embeds.grad}

    fused_loss, fused_grads = step(model(fused=True))
    seeds = drawn[:2 * 7]  # the forward's, one per projection in call order (the backward draws them again)
    assert len({s.item() for s in seeds}) == len(seeds)
    reference = model(fused=False)
    layers = [module for module in reference.modules() if isinstance(module, LoraLayer)]  # in call order
    for layer, seed in zip(layers, seeds, strict=True):
        layer.lora_dropout["default"] = _KernelMask(seed, p)
    loss, grads = step(reference)
    assert torch.allclose(fused_loss, loss, atol=1e-5)
    assert grads.keys() == fused_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(fused_grads[name], grad, atol=1e-5), name
