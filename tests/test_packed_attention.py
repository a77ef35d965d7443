"""Packed micro-batches on CUDA go through torch's variable-length flash attention (packed_attention), with the
same loss and gradients as padded batches; everything else keeps transformers' SDPA path."""

from __future__ import annotations

from typing import Any

import pytest

from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.training import models, packed_attention
from tunewiz.engine.training.trainer import PaddingCollator, batch_collator

torch = pytest.importorskip("torch")


def _rows(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
    return rows


def _llama(attention: str, dtype: Any = torch.float32, device: str = "cpu", kv_heads: int = 2) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    packed_attention.register()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=256, use_cache=False)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attention)
    return model.to(device=device, dtype=dtype)


def _per_example_attention(q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_q: int, max_k: int, *,
                           scale: float | None = None, **causal: Any) -> Any:
    """What varlen_attn computes, one example at a time with causal SDPA (torch's kernel is CUDA-only)."""
    assert causal.pop("window_size", (-1, 0)) == (-1, 0) and causal.pop("is_causal", True)
    gqa = causal.pop("enable_gqa", False)
    assert not causal and max_q == max(int(b - a) for a, b in zip(cu_q[:-1], cu_q[1:]))
    outs = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        parts = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (heads, tokens, dim)
        outs.append(torch.nn.functional.scaled_dot_product_attention(*parts, is_causal=True, scale=scale,
                                                                     enable_gqa=gqa).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("signature", ["window_size, enable_gqa", "is_causal, no gqa"])
def test_a_packed_row_through_varlen_attention_gives_the_padded_loss_and_gradients(
        monkeypatch: pytest.MonkeyPatch, signature: str) -> None:
    from transformers import DataCollatorWithFlattening

    causal = {"window_size": (-1, 0)} if signature.startswith("window") else {"is_causal": True}
    calls: list[int] = []

    def varlen(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0].shape[1])
        return _per_example_attention(*args, **kwargs)

    monkeypatch.setattr(packed_attention, "_varlen", lambda: (varlen, causal, "enable" in signature))
    rows = _rows([5, 11, 3, 8])
    padded_model, packed_model = _llama("sdpa"), _llama(packed_attention.NAME)
    padded_loss = padded_model(**PaddingCollator(0)(rows)).loss
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(rows)
    packed_loss = packed_model(**packed).loss
    padded_loss.backward()
    packed_loss.backward()
    assert calls == [4, 4]  # both layers, forward only (autograd differentiates the reference), query heads
    assert torch.allclose(packed_loss, padded_loss, atol=1e-5), (packed_loss, padded_loss)
    for (name, a), (_, b) in zip(padded_model.named_parameters(), packed_model.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_without_bounds_the_attention_is_sdpas(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("varlen_attn called for a padded batch")

    monkeypatch.setattr(packed_attention, "_varlen", never)
    rows = _rows([4, 9])
    batch = PaddingCollator(0)(rows)
    with torch.no_grad():
        expected = _llama("sdpa")(**batch).logits
        got = _llama(packed_attention.NAME)(**batch).logits
    assert torch.equal(expected, got)


def test_auto_attention_takes_varlen_only_for_packed_data_on_a_gpu_that_runs_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = RunSpec()
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # no flash-attn installed
    monkeypatch.setattr(packed_attention, "supported", lambda cuda, dtype: cuda)
    assert models.attention_implementation(spec, cuda=True, dtype=torch.bfloat16) == "sdpa"  # padded batches
    spec.training.packing = True
    assert models.attention_implementation(spec, cuda=True, dtype=torch.bfloat16) == packed_attention.NAME
    assert models.attention_implementation(spec, cuda=False) == "sdpa"
    spec.model.attention = "eager"  # the user's word stands
    assert models.attention_implementation(spec, cuda=True, dtype=torch.bfloat16) == "eager"


def test_varlen_needs_a_16_bit_run_on_a_cuda_gpu() -> None:
    assert not packed_attention.supported(False, torch.bfloat16)
    if torch.cuda.is_available():
        assert not packed_attention.supported(True, torch.float32)


def test_the_packed_collator_gives_the_bounds_to_an_attention_that_reads_them() -> None:
    spec = RunSpec()
    assert isinstance(batch_collator(spec, packed_attention.NAME, 0, cuda=True), PaddingCollator)
    spec.training.packing = True
    rows = _rows([3, 4])
    for attention, bounds in ((packed_attention.NAME, True), ("flash_attention_2", True), ("sdpa", False)):
        batch = batch_collator(spec, attention, 0, cuda=True)(rows)
        assert ("cu_seq_lens_q" in batch) is bounds, attention
        assert batch["input_ids"].shape == (1, 7)
    assert batch_collator(spec, packed_attention.NAME, 0, cuda=True)(rows)["cu_seq_lens_q"].tolist() == [0, 3, 7]


@pytest.mark.gpu
def test_varlen_attention_on_a_gpu_matches_the_masked_sdpa_of_a_packed_row() -> None:
    """bf16 on CUDA: torch's own varlen kernel (this torch's signature) against transformers' block-diagonal
    mask, loss and every gradient."""
    from transformers import DataCollatorWithFlattening

    if not packed_attention.supported(torch.cuda.is_available(), torch.bfloat16):
        pytest.skip("needs a CUDA GPU of compute capability 8 or more and torch.nn.attention.varlen")
    rows = _rows([40, 130, 7, 300, 64])
    packed = {key: value.cuda() if hasattr(value, "cuda") else value
              for key, value in DataCollatorWithFlattening(return_flash_attn_kwargs=True)(rows).items()}
    losses, grads = [], []
    for attention in ("sdpa", packed_attention.NAME):
        model = _llama(attention, torch.bfloat16, "cuda")
        loss = model(**packed).loss
        loss.backward()
        losses.append(loss.float())
        grads.append([p.grad.float() for p in model.parameters()])
    assert torch.allclose(losses[0], losses[1], atol=2e-2), losses
    for a, b in zip(*grads):
        assert (a - b).norm() <= 0.02 * a.norm() + 1e-3
