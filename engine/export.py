"""`tunewiz export`: the trained adapter, or a merged 16-bit model that plain transformers loads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from engine import models
from engine.errors import TunewizError
from engine.rundir import RunDir

MERGE_DTYPES = ("bf16", "fp16", "fp32")


def adapter_dir(run: RunDir) -> Path:
    path = run.output_dir() / "adapter"
    if not (path / "adapter_config.json").exists():
        raise TunewizError(f"run {run.run_id} has no trained adapter (state: {run.state()})",
                           hint="only completed runs have one; resume a stopped run first: "
                                f"tunewiz resume {run.run_id}")
    return path


def export_adapter(run: RunDir, out: Path) -> Path:
    """Copy the adapter (safetensors, config, tokenizer and chat template) to `out`."""
    source = adapter_dir(run)
    if out.exists() and any(out.iterdir()):
        raise TunewizError(f"{out} exists and is not empty", hint="choose a new folder")
    shutil.copytree(source, out, dirs_exist_ok=True)
    return out


def load_base_and_adapter(run: RunDir, dtype: Any, device: str = "cpu") -> tuple[Any, Any]:
    """The run's base model in 16/32-bit with its adapter applied (not merged), and the tokenizer."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    spec = run.load_spec()
    source = models.converted_folder(models.resolve(spec))
    base = models.load_model(source, _unquantised(spec), dtype, device)
    model = PeftModel.from_pretrained(base, str(adapter_dir(run)))
    return model, AutoTokenizer.from_pretrained(adapter_dir(run))


def _unquantised(spec: Any) -> Any:
    """The same spec with plain LoRA, so a QLoRA run's base is loaded in 16 bits for merging."""
    import dataclasses

    return dataclasses.replace(spec, method="lora")


def export_merged(run: RunDir, out: Path, dtype_name: str = "bf16", on_progress: Any = None) -> Path:
    """Merge the adapter into the base weights and save a regular model folder at `out`."""
    import torch

    if dtype_name not in MERGE_DTYPES:
        raise TunewizError(f"--dtype {dtype_name!r} is not one of {', '.join(MERGE_DTYPES)}")
    if out.exists() and any(out.iterdir()):
        raise TunewizError(f"{out} exists and is not empty", hint="choose a new folder")
    say = on_progress or (lambda _msg: None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    say("loading the base model and the adapter")
    model, tokenizer = load_base_and_adapter(run, dtype)
    say("merging")
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.rename(out)
    say(f"merged {dtype_name} model written to {out}")
    return out
