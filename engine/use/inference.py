"""A trained run, loaded to answer: its base model with the adapter of any checkpoint, its chat
template, system prompt and stop tokens. Chat, evaluation and export verification all use it.

One copy of the weights serves both sides of a comparison: the base model's answer is the same
model with the adapter switched off (peft's `disable_adapter`), not a second model in memory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunewiz.engine import hints
from tunewiz.engine.data.chat import ChatEncoder, resolve_template
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run.rundir import RunDir, checkpoint_steps
from tunewiz.engine.training import models
from tunewiz.engine.use.chat_client import SamplingSettings
from tunewiz.engine.use.heldout import system_prompt

ADAPTER_FILES = ("adapter_config.json",)


@dataclass
class Generation:
    """One answer and how it went."""

    text: str
    tokens: int
    prompt_tokens: int
    first_token_s: float | None
    total_s: float
    finish: str  # "stop" (a stop token), "length" (max new tokens) or "cancelled"

    @property
    def tokens_per_s(self) -> float | None:
        if self.first_token_s is None or self.tokens < 2 or self.total_s <= self.first_token_s:
            return None
        return (self.tokens - 1) / (self.total_s - self.first_token_s)

    def stats(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "prompt_tokens": self.prompt_tokens, "first_token_s": self.first_token_s,
                "total_s": round(self.total_s, 3), "tokens_per_s": self.tokens_per_s, "finish": self.finish}


def adapter_path(run: RunDir, checkpoint: int | None = None) -> tuple[Path, int | None]:
    """The adapter to load and its checkpoint step (None for the final adapter).

    Without `checkpoint`: the final adapter of a completed run, else the newest checkpoint (a
    stopped run can be tried before it is resumed)."""
    output = run.output_dir()
    steps = checkpoint_steps(output)
    if checkpoint is not None:
        if checkpoint not in steps:
            listed = ", ".join(str(s) for s in steps) or "none"
            raise TunewizError(f"run {run.run_id} has no checkpoint at step {checkpoint} (checkpoints: {listed})",
                               hint="pick one of those steps, or leave the checkpoint out for the final adapter")
        return steps[checkpoint], checkpoint
    final = output / "adapter"
    if all((final / name).exists() for name in ADAPTER_FILES):
        return final, None
    if steps:
        newest = max(steps)
        return steps[newest], newest
    raise TunewizError(f"run {run.run_id} has no trained adapter yet (state: {run.state()})",
                       hint="wait for its first checkpoint, or resume it if it stopped before one: "
                            f"{hints.command(f'resume {run.run_id}')}")


class RunModel:
    """A run's base model with its adapter applied (not merged), ready to answer chat prompts."""

    def __init__(self, run: RunDir, checkpoint: int | None = None, device: str | None = None,
                 on_progress: Callable[[str], None] | None = None) -> None:
        import torch
        from peft import PeftModel

        say = on_progress or (lambda _msg: None)
        self.run = run
        self.spec = run.trusted_spec()
        self.adapter_dir, self.checkpoint = adapter_path(run, checkpoint)
        cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        self.device = device or ("cuda:0" if cuda else "cpu")
        spec = self.spec
        self.notes: list[str] = []
        if spec.method == "qlora" and not cuda:
            # bitsandbytes' 4-bit kernels need a GPU; the same adapter on unquantised weights
            # answers nearly as the 4-bit model does.
            spec = dataclasses.replace(spec, method="lora")
            self.notes.append("QLoRA run on a machine without a GPU: the base model is loaded unquantised, "
                              "so answers can differ slightly from the 4-bit model's")
        say(f"loading {self.spec.model.name} on {self.device}")
        source = models.converted_folder(models.resolve(spec), on_progress=say)
        self.tokenizer = models.load_tokenizer(source, spec)
        dtype = models.choose_dtype(spec, cuda, cuda and torch.cuda.is_bf16_supported())
        base = models.load_model(source, spec, dtype, self.device)
        say("applying the adapter" + (f" of checkpoint {self.checkpoint}" if self.checkpoint else ""))
        self.model = PeftModel.from_pretrained(base, str(self.adapter_dir))
        self.model.eval()
        self.model.config.use_cache = True
        self.encoder = ChatEncoder(self.tokenizer, resolve_template(spec.dataset.chat_template, self.tokenizer))
        self.encoder.add_stop_ids(models.generation_stop_ids(source))
        self.system_prompt = system_prompt(run)
        self.context_length = int(getattr(base.config, "max_position_embeddings", 0) or 0) or None
        self.label = source.label

    def conversation(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages with the run's system prompt first, when they bring none of their own."""
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return list(messages)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encoder.prompt_ids(self.conversation(messages))

    def generate(self, messages: list[dict[str, str]], settings: SamplingSettings | None = None,
                 adapter: bool = True, on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Generation:
        """Answer the conversation, streaming text pieces to `on_text`; `should_stop` cancels."""
        import torch

        settings = settings or SamplingSettings()
        settings.check()
        ids = self.prompt_ids(messages)
        max_new = settings.max_new_tokens
        if self.context_length:
            room = self.context_length - len(ids)
            if room < 1:
                raise TunewizError(f"the conversation is {len(ids)} tokens long; this model reads at most "
                                   f"{self.context_length}", hint="start a new conversation or shorten the message")
            max_new = min(max_new, room)
        streamer = _TextStream(self.tokenizer, on_text, should_stop)
        input_ids = torch.tensor([ids], device=self.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if settings.temperature > 0:
            torch.manual_seed(settings.seed)
            sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
        else:  # the model's generation config may ask for sampling; greedy means greedy
            sampling.update(temperature=None, top_p=None, top_k=None)
        started = time.monotonic()
        streamer.started = started
        with torch.no_grad(), self._adapter(adapter):
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new,
                eos_token_id=self.encoder.stop_token_ids or None, pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer, stopping_criteria=_stopping(streamer), use_cache=True, **sampling)
        new = output[0, len(ids):].tolist()
        stop_ids = set(self.encoder.stop_token_ids)
        finish = ("cancelled" if streamer.cancelled else "stop" if new and new[-1] in stop_ids else "length")
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        streamer.flush(text)
        return Generation(text.strip(), len(new), len(ids), streamer.first_token_s,
                          time.monotonic() - started, finish)

    def answers(self, prompts: list[list[dict[str, str]]], max_new_tokens: int, adapter: bool = True) -> list[str]:
        """Greedy answers to each conversation."""
        settings = SamplingSettings(max_new_tokens=max_new_tokens)
        return [self.generate(messages, settings, adapter=adapter).text for messages in prompts]

    def _adapter(self, enabled: bool) -> Any:
        import contextlib

        return contextlib.nullcontext() if enabled else self.model.disable_adapter()


class _TextStream:
    """A transformers streamer that turns new token ids into text pieces as they come.

    It decodes everything generated so far and hands on what was added, holding back an
    incomplete multi-byte character, so pieces join into exactly the final text."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None,
                 should_stop: Callable[[], bool] | None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.should_stop = should_stop or (lambda: False)
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.started = time.monotonic()
        self.first_token_s: float | None = None
        self.cancelled = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        if self.first_token_s is None:
            self.first_token_s = round(time.monotonic() - self.started, 4)
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._send(text)

    def end(self) -> None:
        pass

    def flush(self, final_text: str) -> None:
        self._send(final_text)

    def _send(self, text: str) -> None:
        if self.on_text and text.startswith(self.sent) and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent):], text
            self.on_text(piece)

    def stop_now(self) -> bool:
        if self.should_stop():
            self.cancelled = True
        return self.cancelled


def _stopping(stream: _TextStream) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancel(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            return torch.full((input_ids.shape[0],), stream.stop_now(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancel()])
