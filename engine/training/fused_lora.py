"""Fused LoRA blocks (`speed.fused_lora`): one autograd node per MLP and per attention projection group.

peft runs each adapted projection as about five autograd nodes (dropout, A, B, scale, add), and
autograd keeps every intermediate they produce. Here a Llama-like MLP (gate and up projections,
SwiGLU, down projection) is one `torch.autograd.Function`, and so are the attention's Q/K/V
projections together (they read the same input) and its O projection. Each computes base + scaled
LoRA with `addmm` and has a hand-derived backward that keeps only what it needs:

- the block's input and the rank-r products `X @ A^T` (a few columns each);
- in the MLP, the gate and up outputs; SiLU, the SwiGLU product and the down projection's input are
  recomputed in the backward (elementwise) instead of being stored, as autograd would;
- no dropout masks: each LoRA dropout draws its mask in the forward (on the input of A only, as peft
  does), and the backward draws the same masks again from the random state saved at the forward.

In the engine's checkpointing recompute of a Llama-like layer, whose output the backward never reads, the MLP
skips the down projection's frozen matmul (`offload_checkpoint.output_unread`) and returns one unwritten element
in the output's shape.

The frozen weights get no gradient. bitsandbytes 4-bit weights (QLoRA) are dequantised once per use
through `bitsandbytes.functional.dequantize_4bit`, on CUDA into buffers reused across layers (no
buffer on a CPU, where bitsandbytes cannot fill one). Anything else (adapters disabled or merged,
several adapters, DoRA and other variants, LoRA bias, another MLP, 8-bit layers)
takes the forward the module had before (peft's, or the engine's lean forward). In fp32 the loss and
every gradient equal peft's (tests/test_fused_lora.py).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from tunewiz.engine.training import dropout_triton, nf4_triton, offload_checkpoint, swiglu_triton

# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (checked in transformers 5.24).
LLAMA_LIKE_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SWIGLU_ACTIVATIONS = frozenset({"silu", "swish"})
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
# Dequantised 4-bit weights by (shape, dtype, device): one buffer per shape, reused by every layer,
# and the frozen 4-bit weight each holds now (only `_frozen_weight` writes them, and frozen weights never change).
_DEQUANT_BUFFERS: dict[tuple[Any, ...], torch.Tensor] = {}
_BUFFER_HOLDS: dict[tuple[Any, ...], torch.Tensor] = {}


@dataclass(frozen=True)
class _Projection:
    """One LoRA projection's frozen part and settings for one call (its A and B travel as tensors)."""

    base: torch.nn.Module
    scaling: float
    dropout: float
    seeded: bool = False  # its dropout inside our Triton kernels where they apply (speed.fused_dropout)


@dataclass(frozen=True)
class _Seed:
    """A dropout mask that is never materialised: the seed the Triton kernels draw it from (dropout_triton)."""

    seed: torch.Tensor


_Mask: TypeAlias = "torch.Tensor | _Seed | None"


def _is_4bit(base: torch.nn.Module) -> bool:
    return type(base).__name__ == "Linear4bit" and type(base).__module__.startswith("bitsandbytes")


def _linear_lora(module: torch.nn.Module) -> bool:
    """A peft LoRA layer on a plain or 4-bit linear layer (what the fused blocks can compute)."""
    kind = type(module)
    if not (kind.__module__.startswith("peft.tuners.lora") and kind.__name__ in ("Linear", "Linear4bit")):
        return False
    base = module.get_base_layer()
    return type(base) is torch.nn.Linear or _is_4bit(base)


def _operands(layer: Any, x: torch.Tensor, seeded: bool) -> tuple[_Projection, torch.Tensor, torch.Tensor] | None:
    """(settings, A, B) of `layer`'s one active plain LoRA adapter, or None where peft's path must run."""
    adapters = layer.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (name is None or layer.disable_adapters or layer.merged or name not in layer.lora_A or name in layer.lora_variant
            or layer.lora_B[name].bias is not None or getattr(layer, "fan_in_fan_out", False)):
        return None
    base = layer.get_base_layer()
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, torch.nn.Dropout):
        p = dropout.p if dropout.training else 0.0
    elif isinstance(dropout, torch.nn.Identity):
        p = 0.0
    else:
        return None
    return (_Projection(base, float(layer.scaling[name]), p, seeded), layer.lora_A[name].weight,
            layer.lora_B[name].weight)


def _weight_dtype(base: torch.nn.Module) -> torch.dtype:
    return base.weight.quant_state.dtype if _is_4bit(base) else base.weight.dtype


# Adapter weights cast to the compute dtype, by id of the weight: (a weak reference to it, its version and
# storage when cast, the cast). fp32 adapters are cast to bf16 once per optimiser step instead of at every
# use (forward, recompute and backward); an entry goes when its weight does.
_CASTS: dict[int, tuple[weakref.ref[torch.Tensor], int, int, torch.Tensor]] = {}


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, cast once until the weight changes (an optimiser step bumps its version)."""
    if weight.dtype == dtype:
        return weight
    key, version, storage = id(weight), weight._version, weight.data_ptr()
    held = _CASTS.get(key)
    if held is not None and held[0]() is weight and held[1:3] == (version, storage) and held[3].dtype == dtype:
        return held[3]
    cast = weight.detach().to(dtype)
    _CASTS[key] = (weakref.ref(weight, functools.partial(_forget_cast, key)), version, storage, cast)
    _COPIES.clear()
    return cast


def _forget_cast(key: int, _: object) -> None:
    _CASTS.pop(key, None)
    _COPIES.clear()


# What the optimiser-step hook copies: [casts and stack parts], [their weights], built from `_CASTS` and `_STACKS`
# when it is first needed after one of them changed (emptied then), not at every step.
_COPIES: list[list[torch.Tensor]] = []


def _copy_lists() -> list[list[torch.Tensor]]:
    casts, weights = [], []
    for ref, _, _, cast in _CASTS.values():
        weight = ref()
        if weight is not None:
            casts.append(cast)
            weights.append(weight.detach())  # shares the weight's storage: sees every in-place update
    for refs, _, stacked in _STACKS.values():
        parts = [ref() for ref in refs]
        live = [part for part in parts if part is not None]
        if len(live) == len(parts):
            casts += list(stacked.split([part.shape[0] for part in live]))
            weights += [part.detach() for part in live]
    return [casts, weights]


def _refresh_every_cast(*hook_args: object) -> None:
    """After any optimiser's step: copy every live weight into its cast and stack again, in place, with one
    foreach copy (one call from Python for them all, not one per weight).

    Fused AdamW (the engine's optimiser on CUDA) updates parameters without bumping their version counters, so
    `_cast`'s version check alone would keep a cast from before the step, and the model would stop learning
    after one step. The stamps of weights whose version did move (other optimisers) are renewed, so the version
    check still catches any other change without casting again what was just copied."""
    if not _COPIES:
        _COPIES.extend(_copy_lists())
    casts, weights = _COPIES
    if casts:
        with torch.no_grad():
            torch._foreach_copy_(casts, weights)
    for cast_key, (ref, version, storage, cast) in list(_CASTS.items()):
        weight = ref()
        if weight is not None and weight._version != version:
            _CASTS[cast_key] = (ref, weight._version, storage, cast)
    for stack_key, (refs, stamp, stacked) in list(_STACKS.items()):
        parts = [ref() for ref in refs]
        now = tuple((part._version, part.data_ptr()) for part in parts if part is not None)
        if len(now) == len(parts) and now != stamp:
            _STACKS[stack_key] = (refs, now, stacked)


# A matrices of projections that read one input, stacked and cast to the compute dtype: keyed by the weights'
# ids, held with weak references to them and their versions and storage when stacked (as `_CASTS`).
_STACKS: dict[tuple[int, ...], tuple[list[weakref.ref[torch.Tensor]], tuple[tuple[int, int], ...], torch.Tensor]] = {}


def _stacked_cast(weights: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """`weights` (same column count) stacked by rows in `dtype`, made once until one of them changes."""
    key = tuple(id(w) for w in weights)
    stamp = tuple((w._version, w.data_ptr()) for w in weights)
    held = _STACKS.get(key)
    if (held is not None and all(ref() is w for ref, w in zip(held[0], weights)) and held[1] == stamp
            and held[2].dtype == dtype):
        return held[2]
    stacked = torch.cat([w.detach() for w in weights]).to(dtype)
    forget = functools.partial(_forget_stack, key)
    _STACKS[key] = ([weakref.ref(w, forget) for w in weights], stamp, stacked)
    _COPIES.clear()
    return stacked


def _forget_stack(key: tuple[int, ...], _: object) -> None:
    _STACKS.pop(key, None)
    _COPIES.clear()


register_optimizer_step_post_hook(_refresh_every_cast)


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale * (m1 @ m2)`, the scale in the GEMM's alpha: no kernel of its own."""
    if scale == 1.0:
        return m1 @ m2
    out = torch.empty(m1.shape[0], m2.shape[1], dtype=m1.dtype, device=m1.device)
    return out.addmm_(m1, m2, beta=0, alpha=scale)


def _grad_mm(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`m1 @ m2` in `dtype`, an adapter's gradient: on CUDA a 16-bit product goes to fp32 straight from the
    GEMM's fp32 accumulator (one kernel, and no rounding to 16 bits on the way)."""
    if m1.dtype == dtype:
        return m1 @ m2
    if m1.is_cuda and dtype == torch.float32 and m1.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(m1, m2, out_dtype=dtype)
    return (m1 @ m2).to(dtype)


def _product_scale(projection: _Projection) -> float:
    """The factor on a rank-r product `A dropout(x)`: the LoRA scaling and the dropout's 1 / (1 - p). It goes
    into the GEMM that makes the product, so that B's matmul, B's gradient and the gradient reaching A need
    none (the backward scales the gradient reaching the product the same way, in its GEMM too)."""
    return projection.scaling / (1.0 - projection.dropout)


def _compute_dtype(x: torch.Tensor, projections: list[_Projection], adapters: list[torch.Tensor]) -> torch.dtype | None:
    """The autocast dtype, or without autocast the one dtype every operand shares (else None: peft's path)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    dtypes = {x.dtype, *(_weight_dtype(p.base) for p in projections), *(t.dtype for t in adapters)}
    return x.dtype if len(dtypes) == 1 else None


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, without the call into torch where it already is (most calls: a no-op `.to()` costs
    host time, and the fused blocks make thousands of these checks a step)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _frozen_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight in `dtype`; a 4-bit one dequantised (on CUDA into the shared buffer of its shape).

    The buffer is overwritten by the next layer's dequantisation: callers use it at once and never
    keep it (the GPU runs the matmul that reads it before the copy that overwrites it). A buffer that
    still holds the weight asked for is not written again: with checkpointing, o_proj's backward comes
    right after its recompute. NF4 goes through our one-pass Triton kernel
    (engine/training/nf4_triton.py), anything else through bitsandbytes. bitsandbytes dequantises into a given
    buffer only on CUDA; elsewhere (the CPU tests) into a new tensor.
    """
    weight = base.weight
    if not _is_4bit(base):
        return _as(weight, dtype)
    state = weight.quant_state
    if not weight.is_cuda:
        import bitsandbytes.functional as bnb_functional

        return _as(bnb_functional.dequantize_4bit(weight.data, state), dtype)
    key = (state.shape, state.dtype, weight.device)
    buffer = _DEQUANT_BUFFERS.get(key)
    if buffer is None:
        buffer = _DEQUANT_BUFFERS[key] = torch.empty(state.shape, dtype=state.dtype, device=weight.device)
    if _BUFFER_HOLDS.get(key) is not weight:  # else it still holds this weight (a backward right after its recompute)
        if nf4_triton.supports(state):
            nf4_triton.dequantize(weight.data, state, buffer)
        else:
            import bitsandbytes.functional as bnb_functional

            bnb_functional.dequantize_4bit(weight.data, state, out=buffer)
        _BUFFER_HOLDS[key] = weight
    return _as(buffer, dtype)


def _base_forward(inputs: torch.Tensor, base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    weight = _frozen_weight(base, dtype)
    if base.bias is None:
        return inputs @ weight.t()
    return torch.addmm(_as(base.bias, dtype), inputs, weight.t())


def _noise(shape: tuple[int, ...], like: torch.Tensor, projection: _Projection) -> _Mask:
    """The dropout mask of `projection` over an input of `shape`: None without dropout; the seed of a mask
    the Triton kernels draw as they read the input (`speed.fused_dropout`, on CUDA); else zeros and ones,
    drawn as torch's CPU dropout draws them (same random stream).

    The 1 / (1 - p) scale is applied to the rank-r products instead: exact in any dtype, where a bf16
    mask holding 1 / (1 - p) would round it (1.0547 for p = 0.05).
    """
    p = projection.dropout
    if p == 0.0:
        return None
    if projection.seeded and dropout_triton.usable(like, math.prod(shape)):
        return _Seed(dropout_triton.new_seed(like))
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p)


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def _rng_replayed(device: torch.device, state: torch.Tensor) -> Iterator[None]:
    """Run with the random state `state`, then put the current one back (the forward's masks, redrawn)."""
    current = _rng_state(device)
    setter: Callable[..., None] = (functools.partial(torch.cuda.set_rng_state, device=device)
                                   if device.type == "cuda" else torch.set_rng_state)
    setter(state)
    try:
        yield
    finally:
        setter(current)


def _dropped(inputs: torch.Tensor, noise: _Mask, projection: _Projection) -> torch.Tensor:
    """`inputs` as A reads them: the dropped elements zeroed (by the mask, or by the seed's in one Triton pass),
    not yet scaled by 1 / (1 - p) (`_product_scale` puts that in the matmul's alpha)."""
    if noise is None:
        return inputs
    if isinstance(noise, _Seed):
        return dropout_triton.dropped(inputs, noise.seed, projection.dropout)
    return inputs * noise


def _product(inputs: torch.Tensor, projection: _Projection, a: torch.Tensor, noise: _Mask,
             dtype: torch.dtype) -> torch.Tensor:
    """The rank-r product P = scaling * A dropout(inputs) for 2-D `inputs` in `dtype`, the dropout's 1 / (1 - p)
    included (`_product_scale`)."""
    return _scaled_mm(_dropped(inputs, noise, projection), _cast(a, dtype).t(), _product_scale(projection))


def _lora_forward(inputs: torch.Tensor, projection: _Projection, a: torch.Tensor, b: torch.Tensor,
                  noise: _Mask, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(base(inputs) + B P, P) for 2-D `inputs` in `dtype`, P as `_product` makes it."""
    inputs_a = _product(inputs, projection, a, noise, dtype)
    out = _base_forward(inputs, projection.base, dtype)
    return out.addmm_(inputs_a, _cast(b, dtype).t()), inputs_a


def _lora_backward(inputs: torch.Tensor, inputs_a: torch.Tensor, grad: torch.Tensor, projection: _Projection,
                   a: torch.Tensor, b: torch.Tensor, noise: _Mask, dtype: torch.dtype,
                   need_input: bool, into: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(grad of inputs or None, grad of A, grad of B) of `_lora_forward`'s output; the inputs' gradient in
    `dtype`, added to `into` where given (another projection's of the same inputs), A's and B's in their own.

    The forward's product already holds the scaling, so B's gradient needs none; the gradient reaching the
    product gets it in its own GEMM, and A's gradient and the input's LoRA part then need none either.
    """
    a_cast = _cast(a, dtype)
    grad_b = _grad_mm(grad.t(), inputs_a, b.dtype)
    grad_a_out = _scaled_mm(grad, _cast(b, dtype), _product_scale(projection))  # reaching A's output, scaled
    grad_a = _grad_mm(grad_a_out.t(), _dropped(inputs, noise, projection), a.dtype)
    if not need_input:
        return None, grad_a, grad_b
    weight = _frozen_weight(projection.base, dtype)
    grad_inputs = grad @ weight if into is None else into.addmm_(grad, weight)
    if noise is None:
        grad_inputs.addmm_(grad_a_out, a_cast)
    elif isinstance(noise, _Seed):
        dropout_triton.x_grad_(grad_inputs, grad_a_out, a_cast, noise.seed, projection.dropout, 1.0)
    else:
        grad_inputs.addcmul_(grad_a_out @ a_cast, noise)
    return grad_inputs, grad_a, grad_b


def _shares_a(projections: list[_Projection], adapters: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> bool:
    """Whether projections of one input can run their A matrices as one matmul: no dropout (each projection
    would draw its own mask over the input), one scaling and one adapter dtype."""
    return (len(projections) > 1 and all(p.dropout == 0.0 for p in projections)
            and len({p.scaling for p in projections}) == 1 and len({a.dtype for a in adapters[0::2]}) == 1)


def _projections_forward(flat: torch.Tensor, projections: list[_Projection],
                         adapters: list[torch.Tensor] | tuple[torch.Tensor, ...], dtype: torch.dtype, shared: bool
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """(each projection's output, the rank-r products the backward needs, the stacked A matrices or None) for
    projections of one 2-D input.

    Where they share A (`shared`, as `_shares_a` found when the operands were prepared), one matmul with the
    stacked A matrices gives every rank-r product, and each B reads its columns of it: one kernel in place
    of one per projection, forward and backward. Else each projection on its own, drawing its dropout mask
    in peft's order."""
    if not shared:
        outputs, products = [], []
        for index, projection in enumerate(projections):
            noise = _noise(flat.shape, flat, projection)
            out, inputs_a = _lora_forward(flat, projection, adapters[2 * index], adapters[2 * index + 1], noise, dtype)
            outputs.append(out)
            products.append(inputs_a)
        return outputs, products, None
    stacked = _stacked_cast(list(adapters[0::2]), dtype)
    inputs_a = _scaled_mm(flat, stacked.t(), _product_scale(projections[0]))  # one scaling, no dropout: shared
    outputs, start = [], 0
    for projection, b in zip(projections, adapters[1::2]):
        rank = b.shape[1]
        out = _base_forward(flat, projection.base, dtype)
        outputs.append(out.addmm_(inputs_a[:, start:start + rank], _cast(b, dtype).t()))
        start += rank
    return outputs, [inputs_a], stacked


def _projections_backward(flat: torch.Tensor, products: list[torch.Tensor], grads: list[torch.Tensor],
                          projections: list[_Projection], adapters: list[torch.Tensor] | tuple[torch.Tensor, ...],
                          noises: list[_Mask], dtype: torch.dtype, need_input: bool, stacked: torch.Tensor | None
                          ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(grad of the input or None, [grad A, grad B] per projection) of `_projections_forward`, given the
    stacked A matrices it returned (None: each projection on its own)."""
    grad_x: torch.Tensor | None = None
    adapter_grads: list[torch.Tensor] = []
    if stacked is None:
        for index, projection in enumerate(projections):
            grad_x, grad_a, grad_b = _lora_backward(flat, products[index], grads[index], projection,
                                                    adapters[2 * index], adapters[2 * index + 1], noises[index],
                                                    dtype, need_input, grad_x)
            adapter_grads += [grad_a, grad_b]
        return grad_x, adapter_grads
    (inputs_a,), scale = products, _product_scale(projections[0])
    grad_products = torch.empty_like(inputs_a)  # the gradient reaching each A's output, scaled as the product
    grad_bs, start = [], 0
    for projection, b, grad in zip(projections, adapters[1::2], grads):
        rank = b.shape[1]
        grad_products[:, start:start + rank].addmm_(grad, _cast(b, dtype), beta=0, alpha=scale)
        grad_bs.append(_grad_mm(grad.t(), inputs_a[:, start:start + rank], b.dtype))
        if need_input:
            weight = _frozen_weight(projection.base, dtype)
            grad_x = grad @ weight if grad_x is None else grad_x.addmm_(grad, weight)
        start += rank
    grad_stacked = _grad_mm(grad_products.t(), flat, adapters[0].dtype)
    if grad_x is not None:
        grad_x.addmm_(grad_products, stacked)
    grad_as = grad_stacked.split([b.shape[1] for b in adapters[1::2]])
    return grad_x, [g for pair in zip(grad_as, grad_bs) for g in pair]


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _as(x.reshape(-1, x.shape[-1]), dtype)


class LoraProjections(torch.autograd.Function):
    """Several LoRA projections of one input (Q, K and V; or O alone) as one autograd node.

    apply(x, projections, dtype, shared, A0, B0, A1, B1, ...) returns one output per projection (`shared`: their
    A matrices run as one, `_projections_forward`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, projections: list[_Projection], dtype: torch.dtype, shared: bool,
                *adapters: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = _flat(x, dtype)
        ctx.rng = _rng_state(x.device) if any(p.dropout for p in projections) else None
        with torch.autocast(x.device.type, enabled=False):
            outputs, products, ctx.stacked = _projections_forward(flat, projections, adapters, dtype, shared)
        ctx.save_for_backward(x, *adapters, *products)
        ctx.projections, ctx.dtype = projections, dtype
        return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *saved = ctx.saved_tensors
        projections, dtype = ctx.projections, ctx.dtype
        adapters, products = saved[:2 * len(projections)], saved[2 * len(projections):]
        flat = _flat(x, dtype)
        noises = _redraw(ctx.rng, x.device, [(flat.shape, p) for p in projections], flat)
        with torch.autocast(x.device.type, enabled=False):
            grad_x, adapter_grads = _projections_backward(flat, products, [_flat(g, dtype) for g in grads],
                                                          projections, adapters, noises, dtype,
                                                          ctx.needs_input_grad[0], ctx.stacked)
        grad_x = None if grad_x is None else _as(grad_x.view(x.shape), x.dtype)
        return (grad_x, None, None, None, *adapter_grads)


def _redraw(state: torch.Tensor | None, device: torch.device, draws: list[tuple[tuple[int, ...], _Projection]],
            like: torch.Tensor) -> list[_Mask]:
    """The forward's dropout masks (or their seeds), in the forward's order, from its saved random state."""
    if state is None:
        return [None] * len(draws)
    with _rng_replayed(device, state):
        return [_noise(shape, like, projection) for shape, projection in draws]


def _kernels_for(tensor: torch.Tensor) -> Any:
    """The Triton SwiGLU kernels for a CUDA tensor where Triton is installed; None: torch's operations."""
    return swiglu_triton if tensor.is_cuda and swiglu_triton.AVAILABLE else None


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    kernels = _kernels_for(gate)
    return kernels.forward(gate, up) if kernels else F.silu(gate).mul_(up)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor,
                    spare: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of gate, grad of up) of silu(gate) * up, written into `grad` and `spare` (both consumed)."""
    kernels = _kernels_for(gate)
    if kernels:
        return kernels.backward(gate, up, grad, spare)
    sigmoid = torch.sigmoid(gate)
    grad_up = torch.mul(gate, sigmoid, out=spare).mul_(grad)  # d/d up = silu(gate)
    # d/d gate = up * silu'(gate), silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    derivative = torch.sub(1, sigmoid).mul_(gate).add_(1).mul_(sigmoid)
    del sigmoid
    return grad.mul_(up).mul_(derivative), grad_up


class LoraSwiGLU(torch.autograd.Function):
    """A Llama-like MLP, down(silu(gate(x)) * up(x)), each projection with LoRA, as one autograd node.

    apply(x, (gate, up, down), dtype, shared, A_gate, B_gate, A_up, B_up, A_down, B_down) (`shared`: gate's and
    up's A matrices run as one).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, projections: tuple[_Projection, _Projection, _Projection],
                dtype: torch.dtype, shared: bool, *adapters: torch.Tensor) -> torch.Tensor:
        gate, up, down = projections
        flat = _flat(x, dtype)
        ctx.rng = _rng_state(x.device) if any(p.dropout for p in projections) else None
        with torch.autocast(x.device.type, enabled=False):
            # the masks are drawn in peft's order: gate's, up's, then down's
            (gate_out, up_out), products, ctx.stacked = _projections_forward(flat, [gate, up], adapters[:4], dtype,
                                                                             shared)
            hidden = swiglu_forward(gate_out, up_out)
            noise = _noise(hidden.shape, hidden, down)
            if offload_checkpoint.output_unread():  # a recompute: only what the backward saves matters
                down_a = _product(hidden, down, adapters[4], noise, dtype)
                out = hidden.new_empty(()).expand(hidden.shape[0], down.base.out_features)  # no memory
            else:
                out, down_a = _lora_forward(hidden, down, adapters[4], adapters[5], noise, dtype)
        ctx.save_for_backward(x, gate_out, up_out, down_a, *adapters, *products)
        ctx.projections, ctx.dtype = projections, dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gate_out, up_out, down_a, *saved = ctx.saved_tensors
        adapters, products = saved[:6], saved[6:]
        (gate, up, down), dtype = ctx.projections, ctx.dtype
        flat = _flat(x, dtype)
        noise_gate, noise_up, noise_down = _redraw(
            ctx.rng, x.device,
            [(flat.shape, gate), (flat.shape, up), (up_out.shape, down)], flat)
        with torch.autocast(x.device.type, enabled=False):
            hidden = swiglu_forward(gate_out, up_out)  # recomputed: autograd would have kept it, and SiLU's output
            grad_hidden, grad_a_down, grad_b_down = _lora_backward(hidden, down_a, _flat(grad, dtype), down,
                                                                   adapters[4], adapters[5], noise_down, dtype, True)
            assert grad_hidden is not None  # asked for (need_input=True)
            grad_gate, grad_up = swiglu_backward(gate_out, up_out, grad_hidden, spare=hidden)
            need = ctx.needs_input_grad[0]
            grad_x, grads = _projections_backward(flat, products, [grad_gate, grad_up], [gate, up], adapters[:4],
                                                  [noise_gate, noise_up], dtype, need, ctx.stacked)
        grad_input = _as(grad_x.view(x.shape), x.dtype) if need and grad_x is not None else None
        return (grad_input, None, None, None, *grads, grad_a_down, grad_b_down)


def previous_forward(module: torch.nn.Module) -> Callable[..., Any]:
    """The forward `module` runs now: an instance patch (the lean forward, liger's) or its class's, looked up
    at call time so that a later patch of the class is honoured."""
    patched = module.__dict__.get("forward")
    return patched if patched is not None else (lambda *args, **kwargs: type(module).forward(module, *args, **kwargs))


# (projections, their A and B weights, the compute dtype, whether the first ones that read one input share A)
Prepared = tuple[list[_Projection], list[torch.Tensor], torch.dtype, bool]


def _prepare(layers: list[Any], x: torch.Tensor, seeded: bool, sharing: int) -> Prepared | None:
    """Every layer's operands, the compute dtype and whether the first `sharing` projections (those that read
    one input) share A (`_shares_a`); None when any layer must take peft's path."""
    found = [_operands(layer, x, seeded) for layer in layers]
    operands = [o for o in found if o is not None]
    if len(operands) != len(found):
        return None
    projections = [o[0] for o in operands]
    adapters = [t for o in operands for t in o[1:]]
    dtype = _compute_dtype(x, projections, adapters)
    if dtype is None:
        return None
    return projections, adapters, dtype, _shares_a(projections[:sharing], adapters[:2 * sharing])


# peft's LoraLayer attributes that change at run time: disabling (trl's reference pass), merging, the active adapter.
_LAYER_STATE = ("_disable_adapters", "merged_adapters", "_active_adapter")


def _state_key(layers: list[Any], x: torch.Tensor) -> tuple[Any, ...] | None:
    """What `_prepare`'s answer depends on that can change between calls, read straight from the layers'
    attributes (peft's properties and nn.Module's attribute lookup cost more than the matmuls of a small
    projection); None where a layer lacks one of them (another peft: prepare at every call)."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    key: list[Any] = [autocast, torch.get_autocast_dtype(device) if autocast else None, x.dtype, x.device]
    for layer in layers:
        state = layer.__dict__
        if any(name not in state for name in _LAYER_STATE):
            return None
        active = state["_active_adapter"]
        active = active if isinstance(active, str) else tuple(active)
        scaling = state.get("scaling")
        key.append((state["_disable_adapters"], bool(state["merged_adapters"]), active, state.get("training"),
                    scaling.get(active) if isinstance(scaling, dict) and isinstance(active, str) else None))
    return tuple(key)


class _Group:
    """LoRA layers computed together, with their operands prepared once for each state they are called in."""

    def __init__(self, layers: list[Any], seeded_dropout: bool, sharing: int) -> None:
        self.layers, self.seeded_dropout, self.sharing = layers, seeded_dropout, sharing
        self.key: tuple[Any, ...] | None = None
        self.prepared: Prepared | None = None

    def prepare(self, x: torch.Tensor) -> Prepared | None:
        key = _state_key(self.layers, x)
        if key is None or key != self.key:
            self.prepared, self.key = _prepare(self.layers, x, self.seeded_dropout, self.sharing), key
        return self.prepared


class _SharedInput(_Group):
    """LoRA projections that read one input (Q, K, V): the first call computes them all in one node, the
    others take their output. The pending outputs are keyed by the input tensor itself, so a call with
    another input (or grad mode) computes afresh and nothing stale is ever returned."""

    def __init__(self, layers: list[Any], seeded_dropout: bool) -> None:
        super().__init__(layers, seeded_dropout, sharing=len(layers))
        self.fallbacks = [previous_forward(layer) for layer in layers]
        self.pending: dict[int, tuple[torch.Tensor, bool, torch.Tensor]] = {}

    def forward(self, index: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            return self.fallbacks[index](x, *args, **kwargs)
        entry = self.pending.pop(index, None)
        if entry is not None and entry[0] is x and entry[1] == torch.is_grad_enabled():
            return entry[2]
        prepared = self.prepare(x)
        if prepared is None:
            self.pending.clear()
            return self.fallbacks[index](x)
        projections, adapters, dtype, shared = prepared
        outputs = LoraProjections.apply(x, projections, dtype, shared, *adapters)
        grad = torch.is_grad_enabled()
        self.pending = {i: (x, grad, out) for i, out in enumerate(outputs) if i != index}
        return outputs[index]


class _FusedMLP(_Group):
    """A Llama-like MLP's forward: the fused block, or the forward it had before where that must run."""

    def __init__(self, mlp: torch.nn.Module, seeded_dropout: bool) -> None:
        super().__init__([mlp.gate_proj, mlp.up_proj, mlp.down_proj], seeded_dropout, sharing=2)  # gate, up
        self.fallback = previous_forward(mlp)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        prepared = None if args or kwargs else self.prepare(x)
        if prepared is None:
            return self.fallback(x, *args, **kwargs)
        projections, adapters, dtype, shared = prepared
        return LoraSwiGLU.apply(x, tuple(projections), dtype, shared, *adapters)


def _fusable_mlp(module: torch.nn.Module) -> bool:
    config = getattr(module, "config", None)
    return (type(module).__name__ in LLAMA_LIKE_MLPS and getattr(config, "hidden_act", None) in SWIGLU_ACTIVATIONS
            and all(_linear_lora(getattr(module, name, None)) for name in ("gate_proj", "up_proj", "down_proj")))


def _patch_group(layers: list[Any], seeded_dropout: bool) -> None:
    group = _SharedInput(layers, seeded_dropout)
    for index, layer in enumerate(layers):
        layer.forward = functools.partial(group.forward, index)


def apply_fused_lora(model: torch.nn.Module, seeded_dropout: bool = False) -> tuple[int, int]:
    """Give every Llama-like MLP and every attention block's LoRA projections the fused forward.

    Returns (MLP blocks, attention blocks) patched. The forward each module had before stays its
    fallback, so call this after the per-layer forwards (`speed.lean_lora`) are in place.
    """
    mlps = attentions = 0
    for module in list(model.modules()):
        if _fusable_mlp(module):
            module.forward = _FusedMLP(module, seeded_dropout).forward
            mlps += 1
        inputs = [getattr(module, name) for name in ATTENTION_INPUTS if _linear_lora(getattr(module, name, None))]
        if inputs and _linear_lora(getattr(module, "o_proj", None)):
            _patch_group(inputs, seeded_dropout)
            _patch_group([module.o_proj], seeded_dropout)
            attentions += 1
    return mlps, attentions
