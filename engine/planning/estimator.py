"""Peak GPU memory of a LoRA/QLoRA run, itemised, from the model's architecture and the settings.

The terms follow the physics of training (docs: shared notes on LoRA/QLoRA memory):
  weights      bf16 (2 B/param), or NF4 linear weights (0.5 B + quantisation constants) with
               embeddings, norms and the LM head kept in bf16;
  adapters     r * (d_in + d_out) per adapted linear: weights, gradients and optimiser state, in fp32
               or in bf16 (`speed.adapter_dtype`);
  activations  what autograd keeps per token: every layer's saved tensors without checkpointing,
               or each layer's input plus one recomputed layer with it (liger's fused RMSNorm and
               SwiGLU keep less than the stock layers);
  logits       the vocabulary-wide logits and their fp32 loss copies, or with the fused linear
               cross-entropy (`speed.fused_kernels`) only one chunk of them at a time;
  overhead     the allocator's reserve beyond what tensors hold (on the CPU also the process itself).
Preference pairs (`training.objective` dpo or orpo) run each pair as two sequences, chosen and
rejected, in one batch: twice the tokens of activations and logits per micro-batch. DPO's extra
forward pass (the reference: the base with the adapter off) runs without gradients before the
policy's and frees its work before the policy's forward starts, so it adds time, not memory; trl
builds the full logits of both sides for DPO and ORPO alike (measured on a GPU).
On the CPU (`Settings.cpu`) weights and activations are fp32, and the estimate is of the process's RAM.
Under FSDP the weights and adapters are sharded across the GPUs, and each GPU also holds the
gathered weights of the layers being computed and prefetched.
The free coefficients (how much of the theoretical activation and logit bytes autograd really
holds, and the allocator overhead) are fitted to real measurements: tests/data/memory_calibration.jsonl,
measured by running the engine on a GPU (bench/calibrate_memory.py). The estimate is of torch's
peak *reserved* memory; the CUDA context comes on top (CUDA_CONTEXT_BYTES).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from tunewiz.engine.config.catalog import ModelEntry
from tunewiz.engine.config.spec import Method

if TYPE_CHECKING:
    from tunewiz.engine.config.spec import RunSpec

GIB = 1024**3
# What NVML sees beyond torch's reserved memory (driver context, cuBLAS workspaces): 1.35-1.95 GiB,
# 1.9 GiB on average over the calibration rows (H200, CUDA 13). Added to the estimate to check a fit.
# Rounded up to the largest measured value; smaller GPUs (fewer SMs) likely need less, but no card other
# than the H200 has been measured, so the allowance stays at 2 GiB (docs/tui.md, "The memory number").
CUDA_CONTEXT_BYTES = 2 * GIB
# A CPU run's process before any tensor: Python with torch, transformers and peft imported (ru_maxrss after
# `import torch, transformers, peft, tunewiz.engine.training.trainer`: 392 MiB on the 2-core CPU box, torch 2.13).
CPU_RUNTIME_BYTES = 392 * 2**20

# Fitted on tests/data/memory_calibration.jsonl: 24 runs of the engine before its speed levers (H200:
# 1B/3B/8B Llama shapes, LoRA and QLoRA, checkpointing on and off, 512 and 2048 tokens) and 13 with them
# (H100 and H200: fused kernels all/loss/off, fp32 and bf16 adapters; from bench/results/speed.jsonl).
# `python -m bench.calibrate_memory fit tests/data/memory_calibration.jsonl` prints them and each row's
# error (worst 7.4%).
COEFFICIENTS = {
    "activations_no_checkpointing": 0.86,
    "activations_checkpointing": 0.918,
    "logits_bytes_per_vocab_token": 13.339,
    "fused_loss_bytes_per_hidden_token": 16.923,
    "overhead_fraction": 0.0251,
    "overhead_bytes": 107_978_954,
}

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}


@dataclass(frozen=True)
class ModelArch:
    """The architecture facts the estimate needs (decoder-only transformer with a gated MLP)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    head_dim: int | None = None

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one layer."""
        h, f = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.layers * 2 * self.hidden + self.hidden

    @classmethod
    def from_entry(cls, entry: ModelEntry) -> ModelArch:
        return cls(entry.layers, entry.hidden, entry.intermediate, entry.heads, entry.kv_heads, entry.vocab,
                   entry.tied_embeddings, entry.head_dim)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelArch:
        """From a Hugging Face config.json (decoder-only models with the usual key names)."""
        text = config.get("text_config", config)
        try:
            return cls(layers=text["num_hidden_layers"], hidden=text["hidden_size"],
                       intermediate=text["intermediate_size"], heads=text["num_attention_heads"],
                       kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
                       vocab=text["vocab_size"], tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                       head_dim=text.get("head_dim"))
        except KeyError as missing:
            raise ValueError(f"config.json lacks {missing}: not a decoder-only model tunewiz can estimate") from None


@dataclass(frozen=True)
class Settings:
    """The run settings that move memory; the defaults are the engine's (engine/config/spec.py)."""

    method: Method = "lora"
    r: int = 16
    targets: tuple[str, ...] = ALL_LINEAR
    micro_batch_size: int = 2
    seq_len: int = 2048
    gradient_checkpointing: bool = True
    optimizer: str = "adamw_torch_fused"
    lora_dropout: bool = False
    double_quant: bool = True
    fused_kernels: str = "all"  # speed.fused_kernels: "all", "loss" or "off"
    adapter_bytes: int = 4  # bytes per adapter weight: 4 (fp32, the default) or 2 (bf16)
    gpus: int = 1
    fsdp: bool = False
    checkpoint_layers: int | None = None  # with checkpointing: how many layers recompute (None: all)
    offload_checkpoints: bool = False  # speed.offload_checkpoints: checkpointed layers' inputs in CPU memory
    fused_lora: bool = True  # speed.fused_lora: fewer saved activations; with QLoRA, dequantisation buffers
    cpu: bool = False  # trains on the CPU: fp32 weights and activations, RAM instead of GPU memory
    objective: str = "sft"  # training.objective: "dpo" and "orpo" run a chosen and a rejected sequence per example

    @property
    def sequences_per_example(self) -> int:
        """The preference term: a pair is two sequences in the same forward and backward pass."""
        return 1 if self.objective == "sft" else 2

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len * self.sequences_per_example

    @classmethod
    def from_spec(cls, spec: RunSpec) -> Settings:
        targets = ALL_LINEAR if spec.lora.target_modules == ["all-linear"] else tuple(spec.lora.target_modules)
        gpus = spec.training.gpus
        count = len(gpus) if isinstance(gpus, list) else max(gpus, 1)
        bf16 = spec.model.dtype in ("auto", "bf16")
        return cls(method=spec.method, r=spec.lora.r, targets=targets,
                   micro_batch_size=spec.training.micro_batch_size, seq_len=spec.training.max_seq_length,
                   gradient_checkpointing=spec.training.gradient_checkpointing, optimizer=spec.training.optimizer,
                   lora_dropout=spec.lora.dropout > 0, double_quant=spec.quantization.double_quant,
                   fused_kernels=spec.speed.fused_kernels,
                   adapter_bytes=2 if spec.speed.adapter_dtype == "bf16" and bf16 else 4,
                   gpus=count, fsdp=count > 1 and spec.training.strategy == "fsdp",
                   checkpoint_layers=spec.training.checkpoint_layers,
                   offload_checkpoints=spec.speed.offload_checkpoints, fused_lora=spec.speed.fused_lora,
                   objective=spec.training.objective)

    @property
    def fused_loss(self) -> bool:
        """liger's fused loss: supervised runs only (trl computes the preference losses itself)."""
        return self.fused_kernels in ("all", "loss") and self.objective == "sft"

    @property
    def chunked_logits(self) -> bool:
        """Logits made a chunk at a time: by liger's fused loss only. trl's DPO and ORPO trainers build the whole
        logits of chosen and rejected (measured: a 1B DPO run on one H200, bench/results/preference_gpu.jsonl)."""
        return self.fused_loss


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of peak GPU memory, by what holds them."""

    weights: int
    adapters_optimizer: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters_optimizer + self.activations + self.logits + self.overhead

    def breakdown(self) -> dict[str, int]:
        return {"weights": self.weights, "adapters_optimizer": self.adapters_optimizer,
                "activations": self.activations, "logits": self.logits, "overhead": self.overhead,
                "total": self.total}


def weight_bytes(arch: ModelArch, settings: Settings) -> int:
    """The frozen weights one GPU holds (a 1/N shard under FSDP, plus the layers gathered for compute)."""
    other = arch.params - arch.linear_params  # embeddings, LM head, norms stay 16-bit
    if settings.method == "qlora":
        # NF4: 4 bits per weight; one absmax per 64 weights, itself 8-bit with double quantisation.
        constants = (1 / 64 + 4 / (64 * 256)) if settings.double_quant else 4 / 64
        total = int(arch.linear_params * (0.5 + constants) + 2 * other)
        if settings.fused_lora:  # the fused blocks dequantise into one bf16 buffer per projection shape
            shapes = {shape for name, shape in arch.linear_shapes().items() if name in settings.targets}
            total += 2 * sum(i * o for i, o in shapes)
    else:
        total = (4 if settings.cpu else 2) * arch.params  # the CPU trains in fp32
    if not settings.fsdp:
        return total
    gathered = 2 * 2 * arch.linear_params // arch.layers  # the layer computed and the one prefetched, 16-bit
    return total // settings.gpus + gathered


def adapter_params(arch: ModelArch, settings: Settings) -> int:
    shapes = arch.linear_shapes()
    return arch.layers * settings.r * sum(i + o for name, (i, o) in shapes.items() if name in settings.targets)


def adapter_bytes(arch: ModelArch, settings: Settings) -> int:
    """Adapter weights and gradients, plus the optimiser's state (AdamW keeps it in the weights' dtype;
    8-bit optimisers keep 2 bytes whatever the dtype); sharded under FSDP."""
    state = OPTIMIZER_STATE_BYTES.get(settings.optimizer, 8)
    if state == 8:
        state = 2 * settings.adapter_bytes
    total = adapter_params(arch, settings) * (2 * settings.adapter_bytes + state)
    return total // settings.gpus if settings.fsdp else total


def layer_activation_bytes_per_token(arch: ModelArch, settings: Settings) -> int:
    """Bytes autograd keeps per token for one decoder layer (bf16 activations, SDPA attention)."""
    h, f, q, kv = arch.hidden, arch.intermediate, arch.q_dim, arch.kv_dim
    fused = settings.fused_kernels == "all"
    # two RMSNorms: fp32 input and bf16 output each; liger's keeps its bf16 input (and a scalar per row)
    saved = 2 * (2 if fused else 6) * h
    saved += 2 * q + 2 * 2 * kv + 2 * q  # attention: q, k, v and its output
    if settings.fused_lora:
        # The fused attention and MLP blocks keep their (normed) inputs, O its contiguous input beside the
        # attention output that SDPA keeps, the MLP the gate and up outputs (SwiGLU and the down projection's
        # input are recomputed), and every projection its rank-r product; the dropout masks are redrawn in
        # the backward, so no dropped copies. Measured: 106 KB per token and layer on the 8B shape.
        return saved + 2 * 2 * h + 2 * h + 2 * 2 * f + 2 * settings.r * len(settings.targets)
    saved += (2 if fused else 3) * 2 * f  # gate and up outputs (+ the activation's output, unless fused)
    saved += 2 * f  # down projection input
    if settings.lora_dropout:
        # each adapted linear keeps its own dropout copy of its input (bf16) and mask (1 B)
        inputs = {name: i for name, (i, _) in arch.linear_shapes().items()}
        saved += sum(3 * inputs[name] for name in settings.targets if name in inputs)
    return saved


def checkpointed_layers(arch: ModelArch, settings: Settings) -> int:
    """How many decoder layers recompute their activations (0 without checkpointing)."""
    if not settings.gradient_checkpointing:
        return 0
    return min(settings.checkpoint_layers or arch.layers, arch.layers)


def activation_terms(arch: ModelArch, settings: Settings) -> tuple[float, float]:
    """The activation bytes before their fitted coefficients: (checkpointed layers, layers that keep everything).

    Checkpointed layers keep their input and one of them is recomputed at a time; the others keep everything
    (partial checkpointing mixes the two). With the inputs offloaded to CPU memory, at most two are on the GPU
    at once: the one in use and the next one coming back (the engine offloads on a single GPU only, not on a
    CPU nor with several GPUs)."""
    scale = settings.tokens * (2 if settings.cpu else 1)
    recomputed = checkpointed_layers(arch, settings)
    kept = arch.layers - recomputed
    checkpointed = full = 0.0
    if recomputed:
        offloaded = settings.offload_checkpoints and not settings.cpu and settings.gpus == 1
        inputs = min(recomputed, 2) if offloaded else recomputed
        # The layer being recomputed peaks in its backward, whose transient gradient buffers the fused blocks
        # have too: its term stays the unfused one, which the fitted coefficient scales to cover them (the fused
        # blocks' calibration rows with checkpointing are within 2.5% so, and 7.4% under with the fused count).
        recompute_peak = layer_activation_bytes_per_token(arch, replace(settings, fused_lora=False))
        checkpointed = inputs * 2 * arch.hidden * settings.tokens + recompute_peak * scale
    if kept:
        extra = 0 if recomputed else 2 * arch.hidden * settings.tokens
        full = kept * layer_activation_bytes_per_token(arch, settings) * scale + extra
    return checkpointed, full


def activation_bytes(arch: ModelArch, settings: Settings) -> int:
    checkpointed, full = activation_terms(arch, settings)
    return int(checkpointed * COEFFICIENTS["activations_checkpointing"]
               + full * COEFFICIENTS["activations_no_checkpointing"])


def logits_bytes(arch: ModelArch, settings: Settings) -> int:
    if settings.chunked_logits:
        # liger computes the loss in chunks of about tokens * hidden / vocab tokens, so a chunk of
        # logits is about as big as the hidden states; plus the gradient of the hidden states.
        return int(arch.hidden * settings.tokens * COEFFICIENTS["fused_loss_bytes_per_hidden_token"])
    return int(arch.vocab * settings.tokens * COEFFICIENTS["logits_bytes_per_vocab_token"])


def estimate(arch: ModelArch, settings: Settings) -> MemoryEstimate:
    """Torch's peak reserved memory for one GPU running these settings."""
    weights = weight_bytes(arch, settings)
    adapters = adapter_bytes(arch, settings)
    activations = activation_bytes(arch, settings)
    logits = logits_bytes(arch, settings)
    held = weights + adapters + activations + logits
    overhead = int(held * COEFFICIENTS["overhead_fraction"] + COEFFICIENTS["overhead_bytes"])
    if settings.cpu:
        overhead += CPU_RUNTIME_BYTES
    return MemoryEstimate(weights, adapters, activations, logits, overhead)
