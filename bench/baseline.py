"""The plain baseline the engine is measured against: transformers + peft as their docs show it.

    python -m bench.baseline SPEC.toml RESULT.json

It trains on exactly the engine's examples (the same tokenisation and masking, from the spec) with
the same LoRA shape, learning rate, schedule, seed and batch, but with nothing the engine adds: SDPA
attention, the model's own loss on full logits, fp32 adapters (peft's default), torch AdamW
(`adamw_torch`), and for QLoRA peft's `prepare_model_for_kbit_training` (which upcasts the
embeddings, norms and LM head to fp32). Step timing waits for the GPU at each step's end, as the
engine's does, and the peak memory counts from the start of training, as the engine's run card does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def loop_seeds(seed: int, dropout_seed: int | None) -> dict[str, int]:
    """TrainingArguments' seeds: `seed` drives the loop's random numbers (the LoRA dropout masks),
    `data_seed` the data order, which stays the spec's whatever the dropout seed. The adapter's
    initial weights come from the spec's seed before the Trainer exists."""
    return {"seed": seed if dropout_seed is None else dropout_seed, "data_seed": seed}


def run(spec_path: Path, dropout_seed: int | None = None) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tunewiz.engine.config import spec as spec_mod
    from tunewiz.engine.data.prepare import prepare
    from tunewiz.engine.training import models
    from tunewiz.engine.training.trainer import ExampleDataset, PaddingCollator

    spec = spec_mod.load(spec_path)
    t = spec.training
    torch.manual_seed(t.seed)
    folder = spec.model.name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare(spec, tokenizer, stop_ids=[])

    cuda = torch.cuda.is_available()  # the CPU path exists for the bench's own tests
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa",
                              "device_map": {"": 0} if cuda else None}
    if spec.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False
    if spec.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = models.linear_target_names(model)
    model = get_peft_model(model, LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                                             target_modules=targets, bias="none", task_type="CAUSAL_LM"))

    class Timing(TrainerCallback):
        def __init__(self) -> None:
            self.began = 0.0
            self.seconds: list[float] = []
            self.losses: list[float] = []
            self.tokens: list[int] = []
            self.seen = 0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.began = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.monotonic() - self.began)
            self.tokens.append(int(state.num_input_tokens_seen) - self.seen)
            self.seen = int(state.num_input_tokens_seen)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    timing = Timing()
    args = TrainingArguments(
        output_dir=str(spec_path.parent / f"{spec.name}-baseline"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation, max_steps=t.max_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim="adamw_torch", **loop_seeds(t.seed, dropout_seed), logging_steps=1,
        save_strategy="no", bf16=cuda, use_cpu=not cuda, gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        include_num_input_tokens_seen="non_padding", report_to="none", remove_unused_columns=False,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ExampleDataset(data.train),
                      data_collator=PaddingCollator(tokenizer.pad_token_id, 8), callbacks=[timing])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"losses": timing.losses, "step_seconds": timing.seconds, "tokens_per_step": timing.tokens,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
            "gpu": torch.cuda.get_device_name(0) if cuda else "cpu"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--dropout-seed", type=int, help="seed the training loop's random numbers (the LoRA dropout "
                        "masks) apart from the spec's seed; the adapter's initial weights and the data order stay")
    args = parser.parse_args(argv)
    args.result.write_text(json.dumps(run(args.spec, args.dropout_seed)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
