"""Lagged step logs (engine/training/step_log.py): the engine's Trainer logs each step at the next step's logging
point, from numbers copied without waiting, and the run's events, trainer state and checkpoints are exactly
those of a run that reads every step at once. On a CPU the lag is forced (the engine lags only on one CUDA
device); the GPU test checks that a lagged step never makes the host wait."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.data.chat import ChatEncoder, resolve_template
from tunewiz.engine.data.prepare import prepare
from tunewiz.engine.run.events import validate
from tunewiz.engine.training import step_log
from tunewiz.engine.training.step_log import StepClock
from tunewiz.engine.training.token_count import TokenCounter
from tunewiz.engine.training.trainer import (
    ExampleDataset,
    PaddingCollator,
    _connect,
    _make_callback,
    _trainer_class,
    _training_arguments,
    prepare_trainable,
)

TIMING = ("tokens_per_s", "samples_per_s", "elapsed_s", "eta_s")


class _Context:
    """Stands in for the engine context: keeps the events (checked against the schema), never asked to stop."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.events: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def emit(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {"v": 1, "seq": len(self.events) + 1, "time": 0.0, "type": kind, **data}
        assert validate(event) == [], event
        self.events.append(event)
        return event

    def log(self, message: str, level: str = "info") -> None:
        pass

    def should_stop(self) -> bool:
        return False


def _tokenizer(folder: Path) -> Any:
    """The tokenizer of the random-init test models (the demo model's, or the one carried to a GPU machine)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _tiny_model(tokenizer: Any, device: str = "cpu") -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)


class _Order(TrainerCallback):
    """Notes when steps end, logs arrive and checkpoints are saved, as the Trainer calls its callbacks."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seen.append(("end", state.global_step))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.seen.append(("log", state.global_step))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seen.append(("save", state.global_step))


def _train(tmp_path: Path, tokenizer_dir: Path, lagged: bool, steps: int = 6, nan_at: int | None = None,
           device: str = "cpu", watch: Any = None, fail_at: int | None = None,
           **training: Any) -> tuple[Any, _Context, _Order, Any]:
    """A real engine Trainer on a tiny random model and the demo data, `lagged` or reading each step at once
    (`watch`: one more callback; `nan_at`: the loss is NaN from that step on; `fail_at`: that step's second
    micro-batch raises, as an out-of-memory error would, which `trainer.train()` lets through)."""
    import torch
    from transformers import PrinterCallback

    tokenizer = _tokenizer(tokenizer_dir)

    spec = RunSpec(name="t")
    spec.dataset.preset = "demo"
    settings = {"max_steps": steps, "micro_batch_size": 2, "gradient_accumulation": 2, "learning_rate": 1e-3,
                "max_seq_length": 128, "sample_every": 1000, "save_every": 4, **training}
    for key, value in settings.items():
        setattr(spec.training, key, value)
    data = prepare(spec, tokenizer)
    model, _ = prepare_trainable(_tiny_model(tokenizer, device), spec, torch.float32, cuda=device == "cuda")
    ctx = _Context(spec)
    encoder = ChatEncoder(tokenizer, resolve_template(spec.dataset.chat_template, tokenizer))
    tokens = TokenCounter()
    callback = _make_callback(ctx, model, encoder, data, steps, 1000, lambda kind, fields: None,
                              tokens, lagged)
    order = _Order()
    args = _training_arguments(spec, tmp_path, steps, device == "cuda", torch.float32, bool(data.eval))
    trainer_class = _trainer_class(False)
    if nan_at is not None or fail_at is not None:
        class Breaking(trainer_class):  # type: ignore[misc, valid-type]
            batches = 0

            def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
                if self.model.training and self.state.global_step + 1 == fail_at:
                    self.batches += 1
                    if self.batches == 2:
                        raise RuntimeError("CUDA out of memory (a stand-in)")
                loss = super().compute_loss(*args, **kwargs)
                broken = nan_at is not None and self.state.global_step + 1 >= nan_at and self.model.training
                return loss * float("nan") if broken else loss
        trainer_class = Breaking
    trainer = trainer_class(model=model, args=args, train_dataset=ExampleDataset(data.train),
                            eval_dataset=ExampleDataset(data.eval) if data.eval else None,
                            data_collator=PaddingCollator(tokenizer.pad_token_id),
                            callbacks=[callback, order, *([watch] if watch else [])])
    trainer.remove_callback(PrinterCallback)
    _connect(trainer, callback, tokens, lagged)
    if fail_at is None:
        trainer.train()
    else:
        with pytest.raises(RuntimeError, match="out of memory"):
            trainer.train()
    return trainer, ctx, order, callback


def _without_timing(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events without their timing, sequence numbers and checkpoint folders (each run has its own)."""
    return [{k: Path(v).name if k == "path" else v for k, v in e.items() if k not in (*TIMING, "seq")}
            for e in events if e["type"] != "phase"]


def _state(output: Path, step: int) -> dict[str, Any]:
    """The trainer state in a run's checkpoint at `step`, without timings."""
    state = json.loads((output / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    history = [{k: v for k, v in entry.items() if not k.endswith(("_runtime", "_per_second"))}
               for entry in state["log_history"]]
    return {"global_step": state["global_step"], "tokens": state["num_input_tokens_seen"], "history": history}


def test_lagged_logs_write_what_reading_at_once_writes_one_step_later(tmp_path: Path, tokenizer_dir: Path) -> None:
    at_once, ctx_at_once, order_at_once, _ = _train(tmp_path / "at_once", tokenizer_dir, lagged=False, eval_every=3)
    lagged, ctx_lagged, order_lagged, _ = _train(tmp_path / "lagged", tokenizer_dir, lagged=True, eval_every=3)

    # Every event (steps, evals, checkpoints) in the same order with the same values: loss, gradient norm,
    # learning rate, epoch and tokens seen.
    assert _without_timing(ctx_lagged.events) == _without_timing(ctx_at_once.events)
    steps = [e for e in ctx_lagged.events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6] and all(e["tokens_per_s"] > 0 for e in steps[1:])
    assert _state(tmp_path / "lagged", 4) == _state(tmp_path / "at_once", 4)
    assert lagged.state.num_input_tokens_seen == at_once.state.num_input_tokens_seen > 0

    # Read at once, step N is logged as it ends; lagged, once step N + 1 has ended, except where an evaluation
    # (step 3), a checkpoint (4) or the end (6) needs it first. Step 5's log comes while step 6 ends: before the
    # samples of the last step (the events callback, which writes them, runs before this one).
    assert order_at_once.seen[:4] == [("end", 1), ("log", 1), ("end", 2), ("log", 2)]
    assert order_lagged.seen == [("end", 1), ("end", 2), ("log", 1), ("end", 3), ("log", 2), ("log", 3),
                                 ("end", 4), ("log", 4), ("save", 4), ("end", 5), ("log", 5), ("end", 6), ("log", 6),
                                 ("save", 6)]


def test_lagged_logs_count_tokens_of_steps_between_logs_before_a_checkpoint(tmp_path: Path,
                                                                           tokenizer_dir: Path) -> None:
    at_once, at_once_ctx, *_ = _train(tmp_path / "at_once", tokenizer_dir, lagged=False, steps=5, log_every=2,
                                      save_every=3)
    lagged, ctx, *_ = _train(tmp_path / "lagged", tokenizer_dir, lagged=True, steps=5, log_every=2, save_every=3)
    assert _state(tmp_path / "lagged", 3) == _state(tmp_path / "at_once", 3)
    assert lagged.state.num_input_tokens_seen == at_once.state.num_input_tokens_seen
    assert _without_timing(ctx.events) == _without_timing(at_once_ctx.events)
    assert [e["step"] for e in ctx.events if e["type"] == "step"] == [1, 2, 4]  # step 5 is no logging step


def test_a_lagged_nan_loss_stops_the_run_and_keeps_no_checkpoint_of_it(tmp_path: Path, tokenizer_dir: Path) -> None:
    trainer, ctx, order, callback = _train(tmp_path, tokenizer_dir, lagged=True, steps=8, nan_at=3, eval_every=100)
    assert callback.broken_at == 3  # the first broken step, though the lag brought step 4's log too
    assert trainer.state.global_step == 4  # one step further than reading at once, and not saved
    assert [e["step"] for e in ctx.events if e["type"] == "step"] == [1, 2]
    assert not any(kind == "save" for kind, _ in order.seen) and not list(tmp_path.glob("checkpoints/checkpoint-*"))


def test_an_error_mid_step_still_logs_the_step_before_and_counts_none_of_its_own(tmp_path: Path,
                                                                                  tokenizer_dir: Path) -> None:
    """A step that fails (out of memory, say) after the first of its micro-batches: the held log of the step
    before is written on the way out, and the failed step's counted tokens are not added (it trained nothing;
    out-of-memory recovery resumes from a checkpoint)."""
    _, whole, *_ = _train(tmp_path / "whole", tokenizer_dir, lagged=False, steps=4, eval_every=100, save_every=100)
    failed, ctx, *_ = _train(tmp_path / "failed", tokenizer_dir, lagged=True, steps=6, fail_at=4, eval_every=100,
                             save_every=100)
    steps = [e for e in ctx.events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]  # step 3's log was held when step 4 failed
    reference = next(e for e in whole.events if e["type"] == "step" and e["step"] == 3)
    assert steps[-1]["loss"] == reference["loss"]
    assert failed.state.num_input_tokens_seen == reference["tokens_seen"]


def test_the_clock_counts_host_gaps_between_steps_but_not_pauses() -> None:
    clock = StepClock(cuda=False)
    clock.pause()
    clock.begin()
    time.sleep(0.05)
    clock.end(1)
    time.sleep(0.1)  # the host between steps: the GPU would idle, so it counts
    clock.begin()
    time.sleep(0.05)
    clock.end(2)
    clock.pause()
    time.sleep(0.3)  # an evaluation: not training
    clock.begin()
    time.sleep(0.05)
    clock.end(3)
    first = clock.seconds_through(1)
    assert 0.05 <= first < 0.09
    second = clock.seconds_through(2)  # only what was not read before
    assert 0.15 <= second < 0.25
    assert 0.05 <= clock.seconds_through(3) < 0.09
    assert clock.seconds_through(3) == 0.0


def test_the_engine_lags_only_on_one_cuda_device_and_where_asked() -> None:
    lagged = RunSpec().speed.lagged_logs
    assert lagged and step_log.wanted(lagged, cuda=True, processes=1)
    assert not step_log.wanted(lagged, cuda=False, processes=1) and not step_log.wanted(lagged, cuda=True, processes=2)
    assert not step_log.wanted(False, cuda=True, processes=1)  # speed.lagged_logs = false


@pytest.fixture
def llama_code_restored() -> Iterator[None]:
    """transformers' Llama module as it was before the test: preparing a model on CUDA patches its functions and
    classes (liger-kernel's kernels, our rotary embedding), which must not leak into the tests that follow."""
    from transformers.models.llama import modeling_llama

    names = dict(vars(modeling_llama))
    classes = {value: dict(vars(value)) for value in names.values()
               if isinstance(value, type) and value.__module__ == modeling_llama.__name__}
    yield
    for name in set(vars(modeling_llama)) - set(names):
        delattr(modeling_llama, name)
    for name, value in names.items():
        setattr(modeling_llama, name, value)
    for kind, attributes in classes.items():
        for name in set(vars(kind)) - set(attributes):
            delattr(kind, name)
        for name, value in attributes.items():
            if vars(kind).get(name) is not value:
                setattr(kind, name, value)


def _synchronising_calls(tmp_path: Path, tokenizer_dir: Path, lagged: bool) -> tuple[int, list[dict[str, Any]]]:
    """How many calls synchronised with the GPU from step 3's beginning to step 6's end of a 7-step CUDA run
    (torch's sync debug mode warns at each), and the run's step events."""
    import warnings

    class Watch(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 6:  # the callbacks before this one have ended step 6
                torch.cuda.set_sync_debug_mode("default")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _, ctx, _, _ = _train(tmp_path, tokenizer_dir, lagged=lagged, steps=7, device="cuda", watch=Watch(),
                                  eval_every=100, save_every=100)  # no evaluation or checkpoint inside the window
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("called a synchronizing" in str(w.message) for w in caught)
    return syncs, [e for e in ctx.events if e["type"] == "step"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_lagged_step_reads_nothing_back_from_the_gpu(tmp_path: Path, tokenizer_dir: Path,
                                                       llama_code_restored: None) -> None:
    """Read at once, each logged step reads its loss, gradient norm and token count back from the GPU (three
    synchronising calls: steps 3 to 5 are logged inside the watched window, and step 6's tokens are read at its
    end); lagged, none of them does. Other synchronising calls (transformers', liger-kernel's) are the same in
    both runs. The events hold every step either way, timed on the GPU's clock."""
    at_once, _ = _synchronising_calls(tmp_path / "at_once", tokenizer_dir, lagged=False)
    lagged, steps = _synchronising_calls(tmp_path / "lagged", tokenizer_dir, lagged=True)
    assert lagged <= at_once - 10, (lagged, at_once)
    assert [e["step"] for e in steps] == list(range(1, 8)) and all(e["tokens_per_s"] > 0 for e in steps[1:])
