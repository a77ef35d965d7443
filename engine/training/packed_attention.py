"""Attention for packed micro-batches on a CUDA GPU without flash-attn: torch's variable-length flash attention.

With `training.packing` a micro-batch is one row of examples laid end to end (transformers'
`DataCollatorWithFlattening`), and its position ids restart at each example. transformers' SDPA path turns
that into a block-diagonal mask over the whole row and runs a masked kernel over all of it, every block off the
diagonal included: on the 1B shape that made packed data train at 0.88x the real tokens/s of padded batches
(bench.speed `packing` suite, session 10 call B). `torch.nn.attention.varlen.varlen_attn` runs flash attention
on each example alone from the cumulative lengths the collator gives, so packing pays as it should.

Registered under `NAME` for the attention and, for batches that carry no lengths (a padded evaluation, a sample's
generation), SDPA's mask: those batches take transformers' SDPA path unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

NAME = "tunewiz_varlen"


def supported(cuda: bool, dtype: Any) -> bool:
    """Whether this torch has variable-length attention and the run can use it: flash attention's kernels need a
    CUDA GPU of compute capability 8 or more (Ampere on) and 16-bit activations."""
    import torch

    if not cuda or dtype not in (torch.bfloat16, torch.float16):
        return False
    return (importlib.util.find_spec("torch.nn.attention.varlen") is not None
            and torch.cuda.get_device_capability()[0] >= 8)


@functools.cache  # read once: the attention runs in every layer of every step, and the host's time counts
def _varlen() -> tuple[Callable[..., Any], dict[str, Any], bool]:
    """torch's varlen_attn, the keyword that makes it causal (torch 2.10 `is_causal`, later `window_size`),
    and whether it takes fewer key/value heads than query heads itself."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in parameters


def attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function contract: query (batch, heads, tokens, dim), key and value with their own
    head count; returns (batch, tokens, heads, dim). A packed row (its `cu_seq_lens_q` given) goes through
    variable-length flash attention, anything else through SDPA."""
    lengths_q, lengths_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if lengths_q is None or lengths_k is None or query.shape[0] != 1 or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    import torch

    varlen_attn, causal, takes_gqa = _varlen()
    q, k, v = (tensor[0].transpose(0, 1).contiguous() for tensor in (query, key, value))  # (tokens, heads, dim)
    options: dict[str, Any] = dict(causal)
    if q.shape[1] != k.shape[1]:
        if takes_gqa:
            options["enable_gqa"] = True
        else:  # each key/value head serves the query heads next to it, as transformers' repeat_kv lays them out
            repeats = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    out = varlen_attn(q, k, v, lengths_q.to(q.device, torch.int32), lengths_k.to(q.device, torch.int32),
                      int(kwargs["max_length_q"]), int(kwargs["max_length_k"]), scale=scaling, **options)
    return out.unsqueeze(0), None


def register() -> None:
    """Make `NAME` a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
