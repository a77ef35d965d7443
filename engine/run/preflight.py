"""Checks made before a run directory exists, so that bad inputs never leave a half-created run.

It resolves the model, checks the hardware can run the method, and runs the whole data pipeline
(the result is cached, so the engine does not tokenise twice).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunewiz.engine import locations
from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.data import sources
from tunewiz.engine.errors import HardwareError, TunewizError
from tunewiz.engine.fileio import free_bytes
from tunewiz.engine.planning import hardware
from tunewiz.engine.training import distributed, models

DISK_SLACK_BYTES = 100 * 1000 * 1000  # logs, events, the dataset cache and room to record a failure
CHECKPOINT_BYTES_PER_PARAM = 16  # adapter weights (4) and AdamW's two moments (8), with room for the rest


def check(spec: RunSpec, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Raise a TunewizError (with a hint) for anything that would make the run fail at once;
    return the data statistics otherwise."""
    say = on_progress or (lambda _msg: None)
    check_disk(spec)
    check_trackers(spec)
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
    if spec.training.objective != "sft":  # pairs for dpo/orpo: data that is not pairs fails here
        from tunewiz.engine.data.pairs import prepare_pairs

        return prepare_pairs(spec, tokenizer).stats
    from tunewiz.engine.data.prepare import prepare

    return prepare(spec, tokenizer).stats


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""training.report_to's trackers and the package each needs (the import name and the pip name agree)."""


def check_trackers(spec: RunSpec) -> None:
    """Every tracker in training.report_to is installed (transformers would stop the run at its start)."""
    from importlib.util import find_spec

    missing = [name for name in spec.training.report_to if find_spec(TRACKER_PACKAGES[name]) is None]
    if missing:
        raise TunewizError(f"training.report_to names {', '.join(missing)}, which is not installed",
                           hint=f"pip install {' '.join(TRACKER_PACKAGES[m] for m in missing)} (into tunewiz's "
                                "environment), or remove it from training.report_to")


def disk_needed(spec: RunSpec) -> int:
    """Bytes the run will write: the checkpoints kept at once (one more while the next is written),
    the final adapter, and slack. An estimate; a model the estimator does not know counts as slack only."""
    from tunewiz.engine.planning import estimator
    from tunewiz.engine.planning.recommend import arch_for

    try:
        params = estimator.adapter_params(arch_for(spec.model.name), estimator.Settings.from_spec(spec))
    except Exception:  # noqa: BLE001 - an unknown architecture, or a model that is not here yet
        params = 0
    checkpoints = (spec.training.save_total_limit + 1) * params * CHECKPOINT_BYTES_PER_PARAM
    return checkpoints + params * 4 + DISK_SLACK_BYTES


def check_disk(spec: RunSpec) -> None:
    """Refuse to start a run whose outputs would not fit on the disk that holds them."""
    needed = disk_needed(spec)
    places = {locations.runs_dir(), Path(spec.output_dir).expanduser() if spec.output_dir else locations.runs_dir()}
    for place in places:
        free = free_bytes(place)
        if free < needed:
            raise TunewizError(f"not enough free space for this run on the disk holding {place}: "
                               f"{free / 1e6:.0f} MB free, about {needed / 1e6:.0f} MB needed (checkpoints, the "
                               "adapter, logs)",
                               hint="free space on that disk, set output_dir to a disk with room, or keep fewer "
                                    "checkpoints (training.save_total_limit)")
