"""The engine's gradient checkpointing: one autograd node per layer, its input optionally in pinned CPU memory.

torch's (non-reentrant) checkpointing runs a Python hook for every tensor the layer saves, in the forward
and again in the backward: about 11,000 calls a step on a 32-layer model, half the host time that
checkpointing adds (`python -m bench.host_time` with and without `--torch-checkpointing`). Here each
checkpointed layer is one autograd node that keeps its input, runs the layer without recording, and in the
backward runs it again with the forward's random state and autocast state, as torch's checkpointing does.
The engine uses it for every checkpointing run on one device (speed.apply_checkpointing).

With `speed.offload_checkpoints` on one GPU, the input also leaves the GPU. Every decoder layer keeps only
its input for the backward, where it runs again: 2 x hidden bytes per token and layer (1 GiB for an 8B model
at 2 x 2048 tokens). Here the input is copied to pinned host memory on a side stream as soon as the layer
has read it, overlapped with the layer's own forward, and the GPU copy is freed. In the backward each layer's
input comes back on the side stream while the layer after it (in forward order) recomputes, so at most two
inputs are on the GPU at a time. The recompute replays the forward's random state (the LoRA dropout masks)
and autocast state, as torch's checkpointing does. Under the math attention, offloaded runs give torch's
checkpointing's gradients exactly on an H200; flash and cuDNN attention's backward sums in an order that
moves with the timing, so there any change of timing (the side stream's copies) changes the last bits.

Without offloading, and on a CPU, nothing is copied (the input is kept as it is): the same recompute, so the
tests compare the gradients there. Layers called with more than one positional argument, or whose keyword
arguments carry a tensor that needs a gradient, take torch's own (non-reentrant) checkpointing.

The recompute's output is never read: the backward needs only its graph. In a Llama-like decoder layer the
MLP's output feeds nothing but that output (through the residual add), so while such a layer recomputes,
`output_unread()` is true and the fused MLP skips the down projection's frozen matmul (`fused_lora.LoraSwiGLU`):
a quarter of the layer's matmul work in the recompute, about 8% of an 8B checkpointed step's.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

# Decoder layers that end with `residual + mlp(norm(hidden))` and return it: nothing in the layer reads the MLP's
# output (checked in transformers 5.24).
MLP_LAST_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})

_SIDE_STREAMS: dict[torch.device, Any] = {}
_ANCHORS: dict[torch.device, torch.Tensor] = {}
# The input stored last on each device: the next one stored links back to it, so that each backward
# can bring back the input of the layer before it while it computes.
_LAST_STORED: dict[torch.device, weakref.ReferenceType[_Stored]] = {}
# Set on the thread that recomputes a layer of MLP_LAST_LAYERS (autograd runs a CUDA backward on a thread of its own).
_RECOMPUTE = threading.local()


def output_unread() -> bool:
    """Whether this thread is recomputing a layer whose MLP output the backward never reads (see the module's doc)."""
    return getattr(_RECOMPUTE, "output_unread", False)


@contextlib.contextmanager
def _recomputing(output_unread: bool) -> Iterator[None]:
    before = getattr(_RECOMPUTE, "output_unread", False)
    _RECOMPUTE.output_unread = output_unread
    try:
        yield
    finally:
        _RECOMPUTE.output_unread = before


def _side_stream(device: torch.device) -> Any:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _Stored:
    """One layer input, in pinned host memory (offloaded from CUDA) or as it is, and its way back."""

    def __init__(self, tensor: torch.Tensor, offload: bool) -> None:
        self.device, self.shape, self.dtype = tensor.device, tensor.shape, tensor.dtype
        self.gpu: torch.Tensor | None = None
        self.ready: Any = None
        self.offloaded = offload and tensor.device.type == "cuda"
        self.previous: weakref.ReferenceType[_Stored] | None = None
        if not self.offloaded:
            self.host: torch.Tensor | None = tensor.detach()  # kept where it is
            return
        self.previous = _LAST_STORED.get(self.device)  # weak: the chain never keeps an old step's inputs alive
        _LAST_STORED[self.device] = weakref.ref(self)
        stream = _side_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the input has been computed
        with torch.cuda.stream(stream):
            self.host = torch.empty(self.shape, dtype=self.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its GPU memory is not reused before the copy has read it

    def prefetch(self) -> None:
        """Start copying the input back to the GPU (a no-op when kept in place, or when under way or done)."""
        if not self.offloaded or self.host is None or self.gpu is not None:
            return
        main = torch.cuda.current_stream(self.device)
        stream = _side_stream(self.device)
        self.gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # the main stream's memory
        stream.wait_stream(main)  # which the main stream may have used until now
        with torch.cuda.stream(stream):
            self.gpu.copy_(self.host, non_blocking=True)
            self.ready = stream.record_event()
        # No record_stream: the main stream waits for the copy before it reads the tensor (fetch), so its memory
        # goes back to the main stream's pool as soon as the recompute is done with it. With record_stream each
        # freed input waited for the side stream's next event, checked only at a later allocation: with the host
        # ten layers ahead of the GPU, eleven inputs (0.34 GiB on 8B) were held at the peak (bench.memory_peak).

    def __del__(self) -> None:
        # Dropped before it was fetched (a backward that failed half-way): the main stream must not reuse the
        # memory while the copy may still write into it.
        if self.gpu is not None and self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)

    def fetch(self) -> torch.Tensor:
        """The input on its device, once; the host copy is released."""
        if not self.offloaded:
            tensor, self.host = self.host, None
            assert tensor is not None, "a checkpointed layer's input was fetched twice"
            return tensor
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        tensor, self.gpu, self.host = self.gpu, None, None
        assert tensor is not None, "a checkpointed layer's input was fetched twice"
        return tensor


def _anchor(device: torch.device) -> torch.Tensor:
    """An empty tensor that needs a gradient, so that autograd runs the backward even when the layer's
    input needs none (the first layer's, from frozen embeddings): the adapters inside still do."""
    if device not in _ANCHORS:
        _ANCHORS[device] = torch.zeros(0, device=device, requires_grad=True)
    return _ANCHORS[device]


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class LayerCheckpoint(torch.autograd.Function):
    """apply(run, anchor, hidden, offload, mlp_last): run(hidden), keeping only hidden for the backward (in CPU
    memory with `offload` on CUDA); `mlp_last`: the layer is of MLP_LAST_LAYERS (its recompute may skip work)."""

    @staticmethod
    def forward(ctx: Any, run: Callable[[torch.Tensor], Any], anchor: torch.Tensor, hidden: torch.Tensor,
                offload: bool, mlp_last: bool) -> Any:
        kind = hidden.device.type
        ctx.run, ctx.device, ctx.mlp_last = run, hidden.device, mlp_last
        ctx.autocast = {"enabled": torch.is_autocast_enabled(kind), "dtype": torch.get_autocast_dtype(kind)}
        ctx.rng = _rng_states(hidden.device)
        ctx.stored = _Stored(hidden, offload)
        return run(hidden)  # autograd runs a Function's forward without recording

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        stored, device = ctx.stored, ctx.device
        hidden = stored.fetch().detach().requires_grad_(True)
        previous = stored.previous() if stored.previous is not None else None
        if previous is not None:
            previous.prefetch()  # the layer before this one: back while this one recomputes
        cpu_state, cuda_state = ctx.rng
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)
            with torch.enable_grad(), torch.autocast(device.type, **ctx.autocast), _recomputing(ctx.mlp_last):
                outputs = ctx.run(hidden)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grads)
                 if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return None, None, hidden.grad, None, None


def checkpoint(function: Callable[..., Any], *args: Any, offload: bool = False, mlp_last: bool = False) -> Any:
    """A `_gradient_checkpointing_func` for transformers' checkpointed layers: function(*args) through one node."""
    keywords = getattr(function, "keywords", {}) if isinstance(function, functools.partial) else {}
    hidden = args[0] if len(args) == 1 else None
    needs_grad = any(isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in pytree.tree_leaves(keywords))
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or needs_grad:
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return LayerCheckpoint.apply(function, _anchor(hidden.device), hidden, offload, mlp_last)


def apply_checkpointing(model: torch.nn.Module, offload: bool) -> int:
    """Checkpoint every layer that checkpoints now through `LayerCheckpoint`, its input offloaded to pinned
    CPU memory with `offload` (on CUDA); returns how many layers. Call it after the Trainer has turned
    checkpointing on (and `training.checkpoint_layers` has limited it)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        function = functools.partial(checkpoint, offload=offload, mlp_last=type(layer).__name__ in MLP_LAST_LAYERS)
        setattr(layer, "_gradient_checkpointing_func", function)  # noqa: B010 (an nn.Module attribute mypy types as a tensor)
    return len(layers)
