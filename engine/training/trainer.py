"""The real trainer: LoRA/QLoRA fine-tuning with transformers' Trainer and peft, streaming events.

We tokenise and mask the data ourselves (engine/data), so transformers' Trainer is all the loop we
need; trl's SFTTrainer would add ten seconds of imports and a bf16-on-CPU default that makes CPU
training about 25 times slower.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunewiz.engine import __version__
from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.data.chat import IGNORE_INDEX, ChatEncoder, Encoded, resolve_template
from tunewiz.engine.data.pairs import PreparedPairs, prepare_pairs
from tunewiz.engine.data.prepare import PreparedData, prepare
from tunewiz.engine.errors import HardwareError, TunewizError
from tunewiz.engine.fileio import atomic_write_json
from tunewiz.engine.run import coach, monitor, ranks
from tunewiz.engine.run.context import EngineContext, TrainOutcome
from tunewiz.engine.run.rundir import fsync_tree, scan_checkpoints
from tunewiz.engine.training import distributed, download, models, oom, packed_attention, speed, step_log
from tunewiz.engine.training.generate import answers, matches
from tunewiz.engine.training.sealing import SealingTrainerMixin
from tunewiz.engine.training.step_log import LaggedLogMixin, StepClock
from tunewiz.engine.training.token_count import DeferredTokenCountMixin, TokenCounter


def plan_steps(spec: RunSpec, n_train: int, world_size: int = 1) -> int:
    """Optimiser steps the run will take."""
    if spec.training.max_steps:
        return spec.training.max_steps
    batches = math.ceil(n_train / (spec.training.micro_batch_size * world_size))
    per_epoch = max(1, math.ceil(batches / spec.training.gradient_accumulation))
    return max(1, math.ceil(spec.training.epochs * per_epoch))


def default_interval(total: int, times: int) -> int:
    return max(1, total // times)


class ExampleDataset:
    """A map-style dataset over encoded examples, as transformers' Trainer expects."""

    def __init__(self, examples: list[Encoded]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


class PaddingCollator:
    """Right-pads a batch to its longest example (rounded up to `multiple` on GPU)."""

    def __init__(self, pad_id: int, multiple: int = 1) -> None:
        self.pad_id = pad_id
        self.multiple = multiple

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(item["input_ids"]) for item in batch)
        longest = math.ceil(longest / self.multiple) * self.multiple
        ids, labels, mask = [], [], []
        for item in batch:
            pad = longest - len(item["input_ids"])
            ids.append(item["input_ids"] + [self.pad_id] * pad)
            labels.append(item["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * len(item["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def batch_collator(spec: RunSpec, attention: str, pad_id: int, cuda: bool) -> Any:
    """Padded batches, or with `training.packing` one row of examples end to end; an attention that reads each
    example's bounds from the batch (flash-attn, packed_attention) gets them from the collator."""
    if not spec.training.packing:
        return PaddingCollator(pad_id, 8 if cuda else 1)
    from transformers import DataCollatorWithFlattening

    bounds = str(attention).startswith(("flash_attention", packed_attention.NAME))
    return DataCollatorWithFlattening(return_flash_attn_kwargs=bounds)


def _device() -> tuple[str, bool]:
    """('cuda:N', bf16 supported) with N this rank's GPU (0 in a single process), or ('cpu', False)."""
    import torch

    if torch.cuda.is_available():
        index = ranks.local_rank()
        torch.cuda.set_device(index)
        return f"cuda:{index}", torch.cuda.is_bf16_supported()
    return "cpu", False


def using_fsdp() -> bool:
    """Whether `accelerate launch` started this rank with FSDP (it tells the ranks through the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def check_method_supported(spec: RunSpec, cuda: bool) -> None:
    if spec.method == "qlora" and not cuda:
        raise HardwareError("QLoRA needs a CUDA GPU: its 4-bit weights are computed by bitsandbytes' GPU kernels, "
                            "and this machine has no usable CUDA GPU",
                            hint="use method = \"lora\" (fine for small models on a CPU), or run on a machine with "
                                 "an NVIDIA GPU")
    if spec.training.optimizer in ("adamw_8bit", "paged_adamw_8bit") and not cuda:
        raise HardwareError(f"training.optimizer = {spec.training.optimizer!r} needs a CUDA GPU",
                            hint="use \"adamw_torch\" on a CPU")


def apply_lora(model: Any, spec: RunSpec) -> tuple[Any, list[str]]:
    """Wrap `model` in a LoRA adapter on the spec's targets (every decoder linear for `all-linear`)."""
    from peft import LoraConfig, get_peft_model

    targets = spec.lora.target_modules
    resolved = models.linear_target_names(model) if targets == ["all-linear"] else targets
    missing = [t for t in resolved if not any(n.endswith(t) for n, _ in model.named_modules())]
    if missing:
        raise TunewizError(f"lora.target_modules {missing} are not modules of this model",
                           hint=f"this model's linear layers: {', '.join(models.linear_target_names(model))}; "
                                "or use [\"all-linear\"]")
    config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                        target_modules=resolved, use_rslora=spec.lora.use_rslora, use_dora=spec.lora.use_dora,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config), resolved


@dataclass
class Prepared:
    """What `prepare_trainable` did to a model."""

    targets: list[str]
    fused_loss: bool
    adapter_dtype: Any
    notes: list[str]


def prepare_trainable(model: Any, spec: RunSpec, dtype: Any, cuda: bool) -> tuple[Any, Prepared]:
    """The speed levers and the LoRA adapter on a loaded model, in the order they need.

    One function for the trainer, `tunewiz probe` and the profiler, so that what is measured is
    what trains. Fused kernels patch the base model before peft wraps it.
    """
    # trl's preference trainers compute log-probabilities in chunks themselves: no fused loss for them.
    fused_loss, kernels_note = speed.apply_fused_kernels(model, spec, cuda, loss=spec.training.objective == "sft")
    model, targets = apply_lora(model, spec)
    adapter_dtype = speed.adapter_dtype(spec, dtype, cuda)
    speed.cast_adapters(model, adapter_dtype)
    notes = [kernels_note]
    if lean := speed.apply_lean_lora(model, spec):
        notes.append(f"lean LoRA forward on {lean} layers (speed.lean_lora)")
    notes += speed.apply_fused_lora(model, spec, cuda, fsdp=using_fsdp())
    return model, Prepared(targets, fused_loss, adapter_dtype, notes)


def limit_checkpointing(model: Any, layers: int | None) -> tuple[int, int]:
    """Keep gradient checkpointing on only the first `layers` decoder layers (all when None).

    transformers turns it on for every layer that supports it; the others then keep their
    activations instead of recomputing them: faster, for the memory they hold. Returns
    (checkpointed layers, layers that support it).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    checkpointable = [m for m in model.modules()
                      if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    keep = len(checkpointable) if layers is None else min(layers, len(checkpointable))
    for module in checkpointable[keep:]:
        module.gradient_checkpointing = False
    return keep, len(checkpointable)


def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"tunewiz": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def _training_arguments(spec: RunSpec, output: Path, total: int, cuda: bool, dtype: Any, has_eval: bool,
                        config_class: type | None = None, **options: Any) -> Any:
    """transformers' TrainingArguments for the spec, or `config_class` (a subclass, e.g. trl's) with `options`."""
    import torch
    from transformers import TrainingArguments

    t = spec.training
    if "tensorboard" in t.report_to:  # beside the run's other files, unless the user chose a place
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output / "tensorboard"))
    return (config_class or TrainingArguments)(
        output_dir=str(output / "checkpoints"),
        per_device_train_batch_size=t.micro_batch_size, per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation, max_steps=total, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=t.optimizer, seed=t.seed, data_seed=t.seed,
        logging_steps=t.log_every, logging_first_step=True,
        eval_strategy="steps" if has_eval else "no", eval_steps=t.eval_every or default_interval(total, 5),
        save_strategy="steps", save_steps=t.save_every or default_interval(total, 4),
        save_total_limit=t.save_total_limit,
        bf16=cuda and dtype == torch.bfloat16, fp16=cuda and dtype == torch.float16, use_cpu=not cuda,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        include_num_input_tokens_seen="non_padding", report_to=list(t.report_to) or "none",
        remove_unused_columns=False,
        logging_nan_inf_filter=False,  # a NaN loss must reach the coach, not be averaged away
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=cuda,
        # a batch's copy to the GPU must not wait for the step before it (a lagged log never waits: step_log.py)
        accelerator_config={"non_blocking": cuda},
        ddp_find_unused_parameters=False,  # every adapter weight gets a gradient every step
        torch_compile=spec.speed.compile and cuda, **options,
    )


def _make_callback(ctx: EngineContext, model: Any, encoder: ChatEncoder, data: PreparedData | PreparedPairs,
                   total: int, sample_every: int, watch: coach.Watch, tokens: TokenCounter | None,
                   lagged: bool) -> Any:
    """The callback that turns the Trainer's progress into events (`lagged`: each step's log comes one step late,
    with its token count: engine/training/step_log.py)."""
    import torch
    from transformers import TrainerCallback

    spec = ctx.spec
    cuda = torch.cuda.is_available()

    class EventsCallback(TrainerCallback):
        """Turns the Trainer's progress into events and checks for stop requests."""

        def __init__(self) -> None:
            self.started = time.monotonic()
            self.first_step: int | None = None
            self.last_log: tuple[float, int, int] | None = None  # (compute time, step, tokens)
            self.compute_s = 0.0  # time inside training steps, without eval, samples and saving
            self.clock = StepClock(cuda)
            self.catch_up: Callable[[], None] | None = None  # a lagged Trainer's: its held log written first
            self.last_train_loss: float | None = None
            self.last_eval_loss: float | None = None
            self.broken_at: int | None = None  # the step whose loss was NaN or infinite

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            training = ctx.spec.training  # out-of-memory recovery may have changed it since (engine/training/oom.py)
            if training.gradient_checkpointing and training.checkpoint_layers is not None:
                # The Trainer has just turned checkpointing on for every layer.
                kept, total_layers = limit_checkpointing(model, training.checkpoint_layers)
                ctx.log(f"gradient checkpointing on {kept} of {total_layers} layers")
            if note := speed.apply_checkpointing(model, spec, cuda, ranks.world_size() > 1):
                ctx.log(note)
            self.started = time.monotonic()
            self.first_step = state.global_step
            self.compute_s = 0.0
            self.clock.pause()
            self.last_log = (0.0, state.global_step, state.num_input_tokens_seen)
            ctx.emit("phase", phase="train", message=f"training {total} steps"
                     + (f" from step {state.global_step}" if state.global_step else ""),
                     stats={"total_steps": total, "start_step": state.global_step})
            if state.global_step == 0:
                emit_samples(0)
            self.started = time.monotonic()  # ETA from training time, not the first samples

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            logs = logs or {}
            now = time.monotonic()
            if "eval_loss" in logs:
                self.last_eval_loss = float(logs["eval_loss"])
                ctx.emit("eval", step=state.global_step, eval_loss=self.last_eval_loss)
            if "loss" not in logs:
                return
            assert self.last_log is not None and self.first_step is not None
            self.compute_s += self.clock.seconds_through(state.global_step)
            last_compute, last_step, last_tokens = self.last_log
            dt = max(self.compute_s - last_compute, 1e-9)
            steps_done = state.global_step - last_step
            tokens = state.num_input_tokens_seen
            per_step = (now - self.started) / max(1, state.global_step - self.first_step)
            if not math.isfinite(float(logs["loss"])):  # no step event can hold it: stop, keep the last checkpoint
                watch("step", {"step": state.global_step, "loss": float(logs["loss"])})
                if self.broken_at is None:  # the first step that broke (a lagged log may bring the next one too)
                    self.broken_at = state.global_step
                control.should_training_stop = True
                control.should_evaluate = control.should_save = False
                return
            self.last_train_loss = float(logs["loss"])
            ctx.emit("step", step=state.global_step, total_steps=total, epoch=float(state.epoch or 0),
                     loss=self.last_train_loss, learning_rate=float(logs.get("learning_rate", 0.0)),
                     grad_norm=_finite(logs.get("grad_norm")),
                     tokens_per_s=round((tokens - last_tokens) / dt, 1) if steps_done and tokens else None,
                     samples_per_s=round(steps_done * args.train_batch_size * args.gradient_accumulation_steps
                                         / dt, 3) if steps_done else None,
                     tokens_seen=int(tokens), elapsed_s=round(now - self.started, 2),
                     eta_s=round(per_step * (total - state.global_step), 1))
            self.last_log = (self.compute_s, state.global_step, tokens)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.clock.begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.clock.end(state.global_step)  # timed on the GPU's clock: nothing waits for the GPU here
            if tokens is not None and not lagged:  # counted on the device during the step (token_count.py);
                state.num_input_tokens_seen += tokens.take()  # a lagged log reads it with the step's loss
            if ranks.any_rank(ctx.should_stop()):  # every rank stops at the same step
                ctx.stop_event.set()
                control.should_training_stop = True
                control.should_save = True
                return
            if state.global_step % sample_every == 0 or state.global_step == total:
                if self.catch_up is not None:  # the events stay in order: the steps before, then the samples
                    self.catch_up()
                emit_samples(state.global_step)
                self.clock.pause()

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.clock.pause()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.clock.pause()
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            ctx.emit("checkpoint", step=state.global_step, path=str(path))

    def emit_samples(step: int) -> None:
        # Rank 0 answers alone (the other ranks wait at the next gradient exchange); under FSDP each
        # rank holds a shard of the weights, so no single one can generate.
        if not data.samples or not ranks.is_main() or using_fsdp():
            return
        replies = answers(model, encoder, [s.as_dicts() for s in data.samples], spec.training.sample_max_new_tokens)
        ctx.emit("sample", step=step, samples=[
            {"prompt": s.last_user, "answer": reply, "reference": s.reference, "match": matches(reply, s.reference)}
            for s, reply in zip(data.samples, replies)])

    return EventsCallback()


def _connect(trainer: Any, callback: Any, tokens: TokenCounter | None, lagged: bool) -> None:
    """Give the engine's Trainer its token counter and log lag, and the events callback the Trainer's catch-up."""
    if tokens is not None:
        tokens.discard()  # a step that ran out of memory counted for nothing
        trainer.token_counter = tokens
    trainer.lag_logs = lagged
    callback.catch_up = trainer.catch_up if lagged else None


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def train(ctx: EngineContext) -> TrainOutcome:
    """Load, prepare, train, save; emits events all along. The engine process (each rank) calls this."""
    import torch

    # On N GPUs each rank runs 1/N of the accumulation: the spec's effective batch is kept.
    spec, batch_line = distributed.keep_effective_batch(ctx.spec, ranks.world_size())
    run = ctx.run
    output = run.output_dir(spec)
    device, bf16_ok = _device()
    cuda = device != "cpu"
    check_method_supported(spec, cuda)
    torch.manual_seed(spec.training.seed)

    ctx.emit("phase", phase="load_model", message=f"loading {spec.model.name} on {device}")
    source = models.converted_folder(models.resolve(spec), on_progress=ctx.log)
    download.fetch(source, ctx.emit)
    tokenizer = models.load_tokenizer(source, spec)
    dtype = models.choose_dtype(spec, cuda, bf16_ok)

    ctx.emit("phase", phase="prepare_data", message="reading and tokenising the dataset")
    model_stop_ids = models.generation_stop_ids(source)
    preferring = spec.training.objective != "sft"
    if preferring:
        from tunewiz.engine.training import preference  # trl loads only for preference runs
    data = (prepare_pairs(spec, tokenizer, model_stop_ids) if preferring
            else prepare(spec, tokenizer, stop_ids=model_stop_ids))
    ctx.emit("phase", phase="prepare_data", message=_data_summary(data.stats), stats=data.stats)
    for problem in data.stats["problems"][:5]:
        ctx.log(f"skipped row {problem}", level="warning")

    model = models.load_model(source, spec, dtype, device, fsdp=using_fsdp())
    model, prepared = prepare_trainable(model, spec, dtype, cuda)
    for line in prepared.notes:
        ctx.log(line)
    fused_loss, targets, adapter_dtype = prepared.fused_loss, prepared.targets, prepared.adapter_dtype
    trainable, total_params = model.get_nb_trainable_parameters()
    ctx.emit("phase", phase="load_model", message=f"{source.label}: {total_params / 1e6:.1f}M parameters, "
             f"{trainable / 1e6:.2f}M trainable ({spec.method}, r={spec.lora.r}, {spec.training.objective}) on "
             f"{', '.join(targets)}; "
             f"{_dtype_name(dtype)} on {device}, adapters in {_dtype_name(adapter_dtype)}",
             stats={"parameters": total_params, "trainable": trainable, "targets": targets,
                    "dtype": str(dtype), "adapter_dtype": str(adapter_dtype), "device": device,
                    "fused_loss": fused_loss})

    encoder = ChatEncoder(tokenizer, resolve_template(spec.dataset.chat_template, tokenizer))
    encoder.add_stop_ids(model_stop_ids)
    total = plan_steps(spec, len(data.train), ranks.world_size())
    if cuda:  # "per GPU" means nothing on a CPU run
        ctx.log(batch_line)
    sample_every = spec.training.sample_every or default_interval(total, 4)
    tokens = None if preferring else TokenCounter()
    lagged = not preferring and step_log.wanted(spec.speed.lagged_logs, cuda, ranks.world_size())
    callback = _make_callback(ctx, model, encoder, data, total, sample_every, coach.attach(ctx), tokens, lagged)

    from transformers import PrinterCallback

    collator = batch_collator(spec, model.config._attn_implementation, tokenizer.pad_token_id, cuda)

    def build(spec: RunSpec) -> Any:
        trainer: Any
        if isinstance(data, PreparedPairs):
            args = _training_arguments(spec, output, total, cuda, dtype, bool(data.eval),
                                       preference.config_class(spec.training.objective),
                                       **preference.config_options(spec))
            trainer = preference.make_trainer(spec, model, tokenizer, args, data,
                                              [callback, preference.events_callback(ctx)])
        else:
            args = _training_arguments(spec, output, total, cuda, dtype, bool(data.eval))
            trainer = _trainer_class(fused_loss)(model=model, args=args, train_dataset=ExampleDataset(data.train),
                                                 eval_dataset=ExampleDataset(data.eval) if data.eval else None,
                                                 data_collator=collator, callbacks=[callback])
            _connect(trainer, callback, tokens, lagged)
        trainer.remove_callback(PrinterCallback)  # our events replace its prints
        return trainer

    recovery = oom.Recovery(ctx, spec, model, lambda: _resume_point(ctx, output), ranks.world_size() == 1)
    found = _resume_point(ctx, output) if ctx.resume else None
    resources = monitor.ResourceMonitor(ctx.emit, enabled=ranks.is_main()).start()
    resources.sample()
    if cuda:
        # Loading leaves blocks cached but free (casts, the fused blocks' set-up): give them back, so that what the
        # run holds, and the run card's reserved peak, are the training's alone.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the run card's peaks are the training's, not the loading's
    started = time.time()
    result = None
    try:
        if found is not None and found[1] >= total:
            trainer = build(spec)
            _finish_from_final_checkpoint(ctx, trainer, callback, found[0], found[1], total)
        else:
            result, trainer = recovery.train(build, str(found[0]) if found else None)
    finally:
        resources.stop()
    if callback.broken_at is not None:
        raise TunewizError(f"training stopped at step {callback.broken_at}: the loss is not a number (NaN or "
                           "infinite)", hint="the alert before this says what to try; resuming would repeat it, so "
                                             "lower training.learning_rate and start a new run")
    step = trainer.state.global_step
    metrics = {"train_loss": callback.last_train_loss, "eval_loss": callback.last_eval_loss,
               "train_runtime_s": round(time.time() - started, 1), "steps": step,
               "tokens_seen": int(trainer.state.num_input_tokens_seen)}
    if cuda:  # every rank's peaks, gathered to rank 0
        allocated = ranks.gather_int(torch.cuda.max_memory_allocated())
        reserved = ranks.gather_int(torch.cuda.max_memory_reserved())
        metrics.update(peak_allocated_bytes=max(allocated), peak_reserved_bytes=max(reserved))
        if len(reserved) > 1:
            metrics.update(peak_allocated_bytes_per_gpu=allocated, peak_reserved_bytes_per_gpu=reserved,
                           gpus=len(reserved))
    if ctx.should_stop() and step < total:
        ctx.emit("phase", phase="save", message=f"stopped at step {step}; checkpoint kept for resume")
        return TrainOutcome("cancelled", step, metrics)
    ctx.emit("phase", phase="save", message="saving the adapter")
    # Written beside its place and renamed in: a crash mid-save never leaves a half adapter that
    # looks whole (the final checkpoint stays, so resume saves it again).
    adapter_dir, partial = output / "adapter", output / "adapter.partial"
    if ranks.is_main():
        shutil.rmtree(partial, ignore_errors=True)
    if using_fsdp():
        trainer.save_model(str(partial))  # gathers the sharded adapter; every rank takes part
    elif ranks.is_main():
        model.save_pretrained(partial)
    if ranks.is_main():
        tokenizer.save_pretrained(partial)
        fsync_tree(partial)  # on disk before the rename makes it count
        shutil.rmtree(adapter_dir, ignore_errors=True)
        partial.rename(adapter_dir)
        _write_run_card(ctx, output, source, data, metrics, device, result)
    return TrainOutcome("completed", step, metrics)


def _resume_point(ctx: EngineContext, output: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint; the broken newer ones are reported and removed."""
    scan = scan_checkpoints(output)
    for path, why in scan.skipped:
        ctx.log(f"skipped {path.name}: {why}; removed it", level="warning")
        if ranks.is_main():
            shutil.rmtree(path, ignore_errors=True)
    if scan.best is None:
        ctx.log("no complete checkpoint found; starting from the beginning", level="warning")
    elif scan.skipped:
        ctx.log(f"resuming from {scan.best[0].name}, the newest complete checkpoint")
    return scan.best


def _finish_from_final_checkpoint(ctx: EngineContext, trainer: Any, callback: Any, path: Path, step: int,
                                  total: int) -> None:
    """The run was killed after its last checkpoint: load that checkpoint's adapter instead of
    training past the end, so that only the final save is left to do."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(path / "adapter_model.safetensors"))
    state = TrainerState.load_from_json(str(path / "trainer_state.json"))
    trainer.state.global_step = state.global_step
    trainer.state.num_input_tokens_seen = state.num_input_tokens_seen
    losses = [entry for entry in state.log_history if "loss" in entry]
    evals = [entry for entry in state.log_history if "eval_loss" in entry]
    callback.last_train_loss = float(losses[-1]["loss"]) if losses else None
    callback.last_eval_loss = float(evals[-1]["eval_loss"]) if evals else None
    ctx.emit("phase", phase="train", message=f"checkpoint-{step} is the final step of {total}: nothing left to train",
             stats={"total_steps": total, "start_step": step})


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _trainer_class(fused_loss: bool) -> type:
    """transformers' Trainer; with the fused loss, evaluation also computes the loss without logits."""
    from transformers import Trainer

    class SealingTrainer(SealingTrainerMixin, LaggedLogMixin, DeferredTokenCountMixin, Trainer):
        pass

    if not fused_loss:
        return SealingTrainer

    class FusedLossTrainer(SealingTrainer):
        def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                            ignore_keys: list[str] | None = None) -> tuple[Any, None, None]:
            # In eval mode liger's forward would build the full logits (a memory spike above the
            # training peak); eval needs only the loss.
            import torch

            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = model(**inputs, skip_logits=True).loss
            return loss.detach(), None, None

    return FusedLossTrainer


def _data_summary(stats: dict[str, Any]) -> str:
    lengths = stats.get("token_lengths", {})
    dropped = f", dropped {stats['dropped_total']} ({stats['dropped']})" if stats["dropped_total"] else ""
    return (f"{stats['format']} data: {stats['train_examples']} train / {stats['eval_examples']} eval examples"
            f"{dropped}, {stats['truncated']} truncated at {stats['max_seq_length']} tokens; "
            f"tokens p50 {lengths.get('p50')} p90 {lengths.get('p90')} max {lengths.get('max')}; "
            f"{stats['supervised_tokens']} supervised tokens")


def _write_run_card(ctx: EngineContext, output: Path, source: models.ModelSource,
                    data: PreparedData | PreparedPairs,
                    metrics: dict[str, Any], device: str, result: Any) -> None:
    import torch

    from tunewiz.engine.config import spec as spec_mod

    gpu = torch.cuda.get_device_name(0) if device != "cpu" else None
    card = {"run_id": ctx.run.run_id, "spec": spec_mod.to_dict(ctx.spec), "base_model": source.name_or_path,
            "base_model_label": source.label, "versions": _library_versions(), "device": device, "gpu": gpu,
            "trust_remote_code": ctx.spec.model.trust_remote_code,  # the model's own code ran (the user's choice)
            "dataset": {"fingerprint": data.fingerprint, **{k: v for k, v in data.stats.items() if k != "problems"}},
            "metrics": metrics, "trainer_metrics": dict(result.metrics) if result else {}}
    atomic_write_json(output / "run_card.json", json.loads(json.dumps(card, default=str)))
