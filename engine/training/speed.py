"""The engine's speed levers (the `[speed]` spec section), applied to a loaded model.

Each lever is measured alone and together by `bench/speed.py`; the numbers are in
`bench/results/speed_*.jsonl` and docs/speed.md. Every function here is a no-op on a CPU.
"""

from __future__ import annotations

import importlib.util
import types
from typing import TYPE_CHECKING, Any

from tunewiz.engine.config.spec import RunSpec

if TYPE_CHECKING:
    import torch

# What each `speed.fused_kernels` setting asks liger-kernel for.
LIGER_KERNELS = {
    "all": {"fused_linear_cross_entropy": True, "rms_norm": True, "rope": True, "swiglu": True},
    "loss": {"fused_linear_cross_entropy": True, "rms_norm": False, "rope": False, "swiglu": False},
}

# peft's LoRA classes for linear layers, which the lean forward serves.
LORA_LINEAR_CLASSES = frozenset({"Linear", "Linear4bit", "Linear8bitLt"})


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def apply_fused_kernels(model: Any, spec: RunSpec, cuda: bool, loss: bool = True) -> tuple[bool, str]:
    """Patch `model` (before the adapter wraps it) with liger-kernel's fused kernels.

    Returns (whether the fused loss is active, a line for the run's log). liger-kernel
    replaces the model's forward with one that computes the loss straight from the hidden states
    in chunks, so the vocabulary-sized logits never exist in training. `loss=False` leaves the loss
    alone (trl's preference trainers compute their log-probabilities in chunks themselves).
    """
    wanted = spec.speed.fused_kernels
    if wanted == "off":
        return False, "fused kernels off (speed.fused_kernels = \"off\")"
    if not cuda:
        return False, "fused kernels skipped: they are Triton GPU kernels and this run is on the CPU"
    if not liger_available():
        return False, ("fused kernels skipped: liger-kernel is not installed (pip install liger-kernel: "
                       "less memory and faster steps; or set speed.fused_kernels = \"off\" to silence this)")
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False, f"fused kernels skipped: liger-kernel has none for model type {model_type!r}"
    kernels = dict(LIGER_KERNELS[wanted])
    kernels["fused_linear_cross_entropy"] &= loss
    if not any(kernels.values()):
        return False, "fused kernels skipped: the preference trainer computes its loss in chunks itself"
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, **kernels)
    names = [name for name, on in kernels.items() if on]
    return kernels["fused_linear_cross_entropy"], f"fused kernels (liger-kernel) for {model_type}: {', '.join(names)}"


def adapter_dtype(spec: RunSpec, compute: torch.dtype, cuda: bool) -> torch.dtype:
    """The LoRA weights' dtype: bf16 when asked for on a bf16 GPU run, else fp32.

    fp16 adapters stay fp32: fp16 mixed precision needs fp32 master weights for its loss scaler.
    """
    import torch

    if spec.speed.adapter_dtype == "bf16" and cuda and compute == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def cast_adapters(model: Any, dtype: torch.dtype) -> int:
    """Cast the trainable (adapter) weights to `dtype`; returns how many tensors changed.

    peft creates adapters in fp32 (and keeps them so for 4-bit layers whatever it is asked), so
    each adapted layer casts its bf16 input up and its output down: extra passes over the
    activations. bf16 adapters skip them, at the price of bf16-rounded weight updates.
    """
    changed = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            changed += 1
    return changed


def _lean_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA layer's forward for plain training: base(x) + scaling * B(A(dropout(x))).

    peft casts the input up to the adapters' fp32 before A (a full copy of the activations that
    autocast then casts back down) and adds the scaled adapter output in two more passes. Here the
    input goes to A as it is (autocast runs A in the compute dtype either way), and B's matmul does
    the scaling and the add (`addmm`: alpha = scaling, the frozen layer's output as the term added).
    Anything else (adapters disabled or merged, several adapters, DoRA and other variants,
    mixed-adapter batches, no autocast with mismatched dtypes) goes to peft's own forward.
    """
    import torch

    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    if x.dtype != lora_A.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    hidden = lora_A(self.lora_dropout[name](x))
    out_features = result.shape[-1]
    lean = torch.addmm(result.reshape(-1, out_features), hidden.reshape(-1, hidden.shape[-1]),
                       lora_B.weight.t(), alpha=self.scaling[name])
    return lean.view(result.shape).to(result.dtype)


def apply_lean_lora(model: Any, spec: RunSpec) -> int:
    """The lean forward on every LoRA linear layer (`speed.lean_lora`); returns how many layers got it.
    The fused blocks (`apply_fused_lora`) go on top, and fall back to it.

    The layer's class forward stays the fallback, so peft's own features (disabling or merging
    the adapter, several adapters) keep working on the patched model. The fused blocks fall back
    to the lean forward (or peft's) wherever they do not apply.
    """
    patched = 0
    if spec.speed.lean_lora:
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer) and _is_linear_lora(module):
                module.forward = types.MethodType(_lean_lora_forward, module)
                patched += 1
    return patched


def apply_fused_lora(model: Any, spec: RunSpec, cuda: bool, fsdp: bool = False) -> list[str]:
    """Fused LoRA MLP and attention blocks (`speed.fused_lora`), and on CUDA our Triton RMSNorm and rotary
    embedding; what it did, for the run's log (nothing when the lever is off).

    Called after `apply_lean_lora`, so the per-layer forwards it falls back to are in place.
    """
    if not spec.speed.fused_lora:
        return []
    if fsdp:  # FSDP swaps each layer's unsharded weights in around its forward: the blocks prepare theirs once
        return ["fused LoRA blocks skipped: not under FSDP (the lean forward serves every layer)"]
    from tunewiz.engine.training import rmsnorm_triton, rope_triton
    from tunewiz.engine.training.fused_lora import apply_fused_lora as patch

    seeded = spec.speed.fused_dropout and cuda and spec.lora.dropout > 0
    mlps, attention = patch(model, seeded_dropout=seeded)
    done = [f"fused LoRA blocks on {mlps} MLPs and {attention} attention blocks (speed.fused_lora)"
            + ("; LoRA dropout inside their Triton kernels (speed.fused_dropout)" if seeded else "")]
    if norms := rmsnorm_triton.apply_frozen_rms_norm(model, cuda):
        done.append(f"Triton RMSNorm on {norms} norms")
    if rope_triton.apply_rope(model, cuda):
        done.append("Triton rotary embedding")
    return done


def _is_linear_lora(module: Any) -> bool:
    """LoRA on a linear layer (torch's, or bitsandbytes' 4/8-bit), not on embeddings or convolutions.

    By class name: peft defines its bitsandbytes classes only where bitsandbytes is installed.
    """
    return type(module).__module__.startswith("peft.tuners.lora") and type(module).__name__ in LORA_LINEAR_CLASSES


def apply_checkpointing(model: Any, spec: RunSpec, cuda: bool, several_gpus: bool) -> str | None:
    """The engine's own checkpointing on one device, its layers' inputs offloaded to pinned CPU memory with
    `speed.offload_checkpoints` on a GPU; a line for the run's log, or None where torch's checkpointing stays
    (checkpointing off, several GPUs, torch.compile). Call once the Trainer has turned checkpointing on."""
    if not spec.training.gradient_checkpointing:
        return None
    offload = spec.speed.offload_checkpoints
    if several_gpus:  # FSDP gathers a layer's weights around its forward (the recompute inside this backward
        # would miss it), and DDP's gradient hooks under a backward within the backward are not tested
        return "checkpoint offloading skipped: measured and tested on one GPU only" if offload else None
    if spec.speed.compile and not offload:
        return None  # torch.compile traces torch's checkpointing; the engine's node holds Python state
    from tunewiz.engine.training.offload_checkpoint import apply_checkpointing as patch

    layers = patch(model, offload=offload and cuda)
    if offload and cuda:
        return f"checkpointed layer inputs offloaded to pinned CPU memory on {layers} layers"
    skipped = ("; checkpoint offloading skipped: it moves GPU memory to the CPU and this run is on the CPU"
               if offload else "")
    return f"gradient checkpointing through one autograd node per layer on {layers} layers{skipped}"
