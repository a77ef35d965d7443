"""Checks made before a run directory exists, so that bad inputs never leave a half-created run.

It resolves the model, checks the hardware can run the method, and runs the whole data pipeline
(the result is cached, so the engine does not tokenise twice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine import distributed, hardware, models
from engine.data import sources
from engine.errors import HardwareError
from engine.spec import RunSpec


def check(spec: RunSpec, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Raise a TunewizError (with a hint) for anything that would make the run fail at once;
    return the data statistics otherwise."""
    say = on_progress or (lambda _msg: None)
    source = models.resolve(spec)
    sources.resolve(spec.dataset)  # a missing file or unknown preset fails here, before any model loads
    if spec.training.gpus != 1:  # more GPUs than this machine has fails here, not in the engine
        distributed.resolve_gpus(spec.training.gpus, distributed.visible_gpu_count())
    if spec.method == "qlora":
        report = hardware.probe(check_libraries=True)
        if not report.has_gpu or not report.torch_cuda:
            reason = report.nvml_error or ("the installed torch has no CUDA support" if report.has_gpu
                                           else "no NVIDIA GPU is visible")
            raise HardwareError(f"QLoRA needs a CUDA GPU: {reason}",
                                hint="use method = \"lora\" (e.g. --set method=lora), or run on a machine with an "
                                     "NVIDIA GPU and a CUDA build of torch")
    say("checking the model and the data")
    source = models.converted_folder(source, on_progress=say)
    tokenizer = models.load_tokenizer(source, spec)
    from engine.data.prepare import prepare

    return prepare(spec, tokenizer).stats
