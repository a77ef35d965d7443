"""`tunewiz probe`: one real training step at full sequence length, to check memory before a long run.

It loads the model exactly as training does, applies the adapter, and runs two optimiser steps
(the second one holds the optimiser state too) on random tokens of the full length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.errors import HardwareError
from tunewiz.engine.planning.estimator import ModelArch, Settings, estimate
from tunewiz.engine.training import models


def probe_step(spec: RunSpec) -> dict[str, Any]:
    """Measured and estimated peak memory of one step of `spec` on GPU 0."""
    import torch

    from tunewiz.engine.training.trainer import check_method_supported, prepare_trainable

    if not torch.cuda.is_available():
        raise HardwareError("tunewiz probe measures GPU memory, and no CUDA GPU is available",
                            hint="on a CPU-only machine the demo preset needs no check; `tunewiz recommend --vram GB` "
                                 "shows estimates for a GPU you are planning to use")
    check_method_supported(spec, True)
    source = models.converted_folder(models.resolve(spec))
    dtype = models.choose_dtype(spec, True, torch.cuda.is_bf16_supported())
    free_before, _ = torch.cuda.mem_get_info(0)
    torch.cuda.reset_peak_memory_stats(0)
    model = models.load_model(source, spec, dtype, "cuda:0")
    model, _prepared = prepare_trainable(model, spec, dtype, True)
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = model.get_input_embeddings().num_embeddings
    batch = torch.randint(0, vocab, (spec.training.micro_batch_size, spec.training.max_seq_length), device="cuda:0")
    autocast = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else torch.autocast("cuda", enabled=False)
    for _ in range(2):
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    arch = ModelArch.from_config(json.loads((Path(source.name_or_path) / "config.json").read_text())
                                 if source.is_local else model.config.to_dict())
    predicted = estimate(arch, Settings.from_spec(spec))
    measured = torch.cuda.max_memory_reserved(0)
    return {"gpu": torch.cuda.get_device_name(0), "free_bytes_before": free_before,
            "measured_reserved_bytes": measured, "measured_allocated_bytes": torch.cuda.max_memory_allocated(0),
            "estimate": predicted.breakdown(), "error": (predicted.total - measured) / measured}
