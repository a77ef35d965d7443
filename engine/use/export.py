"""`tunewiz export`: the trained adapter, a merged 16-bit model that plain transformers loads, or one
GGUF file with an Ollama Modelfile (llama.cpp, Ollama, LM Studio).

Merged and GGUF exports are verified: the written model is re-loaded and must answer the run's
held-out prompts as the adapter does (engine/use/export_check.py); the result goes into the run card.
Everything is written under a temporary name and renamed when complete, so a failure leaves nothing.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunewiz.engine import hints
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run.rundir import RunDir
from tunewiz.engine.training import models
from tunewiz.engine.use import export_check

MERGE_DTYPES = ("bf16", "fp16", "fp32")
MERGE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DISK_MARGIN = 1.1  # metadata, tokenizer and the filesystem's own slack
Progress = Callable[[str], None]


@dataclass
class ExportResult:
    """Where an export went and how its round trip went."""

    path: Path  # the folder written
    lines: list[str] = field(default_factory=list)  # what to tell the user afterwards
    check: export_check.Check | None = None
    warning: str | None = None


def adapter_dir(run: RunDir) -> Path:
    path = run.output_dir() / "adapter"
    if not (path / "adapter_config.json").exists():
        raise TunewizError(f"run {run.run_id} has no trained adapter (state: {run.state()})",
                           hint="only completed runs have one; resume a stopped run first: "
                                f"{hints.command(f'resume {run.run_id}')}")
    return path


def default_out(run: RunDir, kind: str) -> Path:
    """The export's folder inside the run directory: RUN/exports/<kind>."""
    return run.path / "exports" / kind


def check_target(out: Path) -> None:
    """The target must be a new or empty folder."""
    if out.exists() and not out.is_dir():
        raise TunewizError(f"--out {out} is a file", hint="name a folder to create (the export writes several files)")
    if out.exists() and any(out.iterdir()):
        raise TunewizError(f"{out} exists and is not empty", hint="choose a new folder with --out, or remove that one")


def check_disk(out: Path, needed: float, what: str) -> None:
    """A clear error when the filesystem that will hold `out` has less than `needed` bytes free."""
    place = out
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    if free < needed * DISK_MARGIN:
        raise TunewizError(f"not enough disk space for {what}: it needs about {needed * DISK_MARGIN / 1e6:,.0f} MB, "
                           f"{free / 1e6:,.0f} MB are free in {place}",
                           hint="free some space, or write elsewhere with --out")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """No progress bars, advisories or FutureWarnings from transformers, huggingface_hub and
    bitsandbytes while exporting; all restored afterwards (the app keeps its own settings)."""
    import logging

    import huggingface_hub.utils as hub_utils
    import transformers.modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars = not hub_utils.are_progress_bars_disabled()
    bnb_logger = logging.getLogger("bitsandbytes")  # says at import that the optional `kernels` is missing
    bnb_level = bnb_logger.level
    gguf_bar = gguf_loading.tqdm  # the GGUF loader's bar is plain tqdm, outside transformers' switch
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    bnb_logger.setLevel(logging.ERROR)
    gguf_loading.tqdm = hf_logging.tqdm
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        gguf_loading.tqdm = gguf_bar
        bnb_logger.setLevel(bnb_level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub_utils.enable_progress_bars()


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


@contextlib.contextmanager
def _written_atomically(out: Path) -> Iterator[Path]:
    """A temporary folder next to `out` that becomes `out` only when the block succeeds."""
    staging = _staging(out)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty (check_target made sure)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_adapter(run: RunDir, out: Path | None = None) -> Path:
    """Copy the adapter (safetensors, config, tokenizer and chat template) to `out`."""
    source = adapter_dir(run)
    out = out or default_out(run, "adapter")
    check_target(out)
    check_disk(out, sum(f.stat().st_size for f in source.rglob("*") if f.is_file()), "the adapter")
    with _written_atomically(out) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
    return out


def _model_config(run: RunDir) -> Any:
    """The base model's config, read without loading weights (to refuse early)."""
    from transformers import AutoConfig

    spec = run.trusted_spec()
    source = models.converted_folder(models.resolve(spec))
    return AutoConfig.from_pretrained(source.name_or_path, revision=source.revision,
                                      trust_remote_code=spec.model.trust_remote_code)


def _load(run: RunDir, say: Progress) -> Any:
    """The run's model with its adapter (not merged); a QLoRA base unquantised, so it can be merged."""
    from tunewiz.engine.use.inference import RunModel

    device = "cpu" if run.load_spec().method == "qlora" else None  # RunModel keeps 4-bit weights only on a GPU
    return RunModel(run, device=device, on_progress=say)


def _verify(run: RunDir, result: ExportResult, check: export_check.Check, entry: dict[str, Any],
            quantised: bool, say: Progress) -> None:
    result.check = check
    result.warning = check.warning(quantised)
    say(check.summary)
    if result.warning:
        say(result.warning)
    export_check.record_in_run_card(run.output_dir(), check.record(entry))


def export_merged(run: RunDir, out: Path | None = None, dtype_name: str = "bf16", on_progress: Progress | None = None,
                  verify_limit: int | None = None) -> ExportResult:
    """Merge the adapter into the base weights, save a regular model folder and verify it."""
    import torch

    say = on_progress or (lambda _msg: None)
    if dtype_name not in MERGE_DTYPES:
        raise TunewizError(f"--dtype {dtype_name!r} is not one of {', '.join(MERGE_DTYPES)}")
    adapter_dir(run)
    out = out or default_out(run, f"merged-{dtype_name}")
    check_target(out)
    with quiet_libraries():
        loaded = _load(run, say)
        prompts = export_check.adapter_answers(loaded, verify_limit, say)
        started = time.monotonic()  # the export itself: merge, convert, write
        say("merging the adapter into the base weights")
        merged = loaded.model.merge_and_unload()
        merged.config.use_cache = True
        check_disk(out, merged.num_parameters() * MERGE_BYTES[dtype_name], f"a merged {dtype_name} model")
        merged.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name])
        say(f"writing the merged {dtype_name} model")
        with _written_atomically(out) as staging:
            merged.save_pretrained(staging, safe_serialization=True)
            loaded.tokenizer.save_pretrained(staging)
        seconds = time.monotonic() - started
        say(f"merged {dtype_name} model written to {out} ({_size(out) / 1e6:,.0f} MB, {seconds:.0f} s)")
        del merged, loaded
        say("verifying: re-loading the merged model and answering the held-out prompts")
        result = ExportResult(out, [f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r})"])
        check = export_check.check_merged(out, f"merged {dtype_name}", prompts, _encoder_of(run, out))
    _verify(run, result, check, {"kind": "merged", "type": dtype_name, "path": str(out), "size_bytes": _size(out),
                                 "export_s": round(seconds, 1)}, False, say)
    return result


def _encoder_of(run: RunDir, folder: Path) -> Any:
    """The run's chat encoder over the tokenizer saved in `folder`."""
    from transformers import AutoTokenizer

    from tunewiz.engine.data.chat import ChatEncoder, resolve_template

    spec = run.load_spec()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = ChatEncoder(tokenizer, resolve_template(spec.dataset.chat_template, tokenizer))
    encoder.add_stop_ids(models.generation_stop_ids(models.converted_folder(models.resolve(spec))))
    return encoder


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def model_name(run: RunDir) -> str:
    """A file and Ollama model name from the run's name (lower case, letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9]+", "-", run.load_spec().name.lower()).strip("-") or "model"


def export_gguf(run: RunDir, gguf_type: str, out: Path | None = None, on_progress: Progress | None = None,
                verify_limit: int | None = None) -> ExportResult:
    """Merge the adapter, write one GGUF file of `gguf_type` and an Ollama Modelfile, and verify them."""
    from tunewiz.engine.use import gguf_export, modelfile
    from tunewiz.engine.use.gguf_vocab import adds_special

    say = on_progress or (lambda _msg: None)
    gguf_export.check_type(gguf_type)
    adapter_dir(run)
    out = out or default_out(run, f"gguf-{gguf_type}")
    check_target(out)
    with quiet_libraries():
        gguf_export.family_of(_model_config(run).model_type)  # refuse before loading anything
        loaded = _load(run, say)
        prompts = export_check.adapter_answers(loaded, verify_limit, say)
        started = time.monotonic()  # the export itself: merge, convert, write
        say("merging the adapter into the base weights")
        merged = loaded.model.merge_and_unload()
        per_weight = gguf_export.BYTES_PER_WEIGHT[gguf_type] + (2.0 if gguf_type == "q4_k_m" else 0.0)
        check_disk(out, merged.num_parameters() * per_weight, f"a {gguf_type} GGUF file")
        name = model_name(run)
        filename = f"{name}-{gguf_type}.gguf"
        encoder = loaded.encoder
        stop_ids = encoder.stop_token_ids
        chat_template = encoder.template or loaded.tokenizer.chat_template
        with _written_atomically(out) as staging:
            gguf_export.write_gguf(merged, loaded.tokenizer, chat_template, stop_ids, staging / filename, gguf_type,
                                   name, say)
            add_bos, _ = adds_special(loaded.tokenizer)
            _path, template_warning = modelfile.write_modelfile(staging, filename, loaded.tokenizer, chat_template,
                                                                add_bos, list(encoder.end_tokens), loaded.system_prompt)
        seconds = time.monotonic() - started
        path = out / filename
        say(f"{gguf_type} GGUF written to {path} ({path.stat().st_size / 1e6:,.0f} MB, {seconds:.0f} s)")
        if template_warning:
            say(f"WARNING: {template_warning}")
        del merged
        say("verifying: re-loading the GGUF file and answering the held-out prompts")
        try:
            check = export_check.check_gguf(path, f"GGUF {gguf_type}", prompts, encoder, chat_template, say)
        except TunewizError:
            shutil.rmtree(out, ignore_errors=True)  # a file that does not load is no export
            raise
    result = ExportResult(out, [f"run it with Ollama:  ollama create {name} -f {out / 'Modelfile'}",
                                f"                     ollama run {name}"])
    _verify(run, result, check, {"kind": "gguf", "type": gguf_type, "path": str(path),
                                 "size_bytes": path.stat().st_size, "export_s": round(seconds, 1)},
            gguf_type not in ("f16", "bf16"), say)
    return result
