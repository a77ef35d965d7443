"""The wizard driven with key presses (Textual's Pilot) on simulated hardware, asserting the spec that is launched.

The services are fakes (tests/tui_fakes.py): no GPU / 24 GiB / 80 GiB hardware, a recommender following the
tunewiz.engine.planning.recommend contract, a canned data check, and a launcher that records the spec instead of
training.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.tui_fakes import (
    FakeServices,
    demo_check_report,
    fake_choice_for,
    fake_recommend,
    gpu24_report,
    gpu80_report,
    no_gpu_report,
)
from tunewiz.engine.config import presets
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.config.spec import SpecError
from tunewiz.engine.run import rundir
from tunewiz.tui import wizard
from tunewiz.tui.app import TunewizApp
from tunewiz.tui.dialogs import ConfirmDialog, MessageDialog, NameDialog
from tunewiz.tui.screens.dashboard import DashboardScreen
from tunewiz.tui.screens.dataset import DatasetScreen
from tunewiz.tui.screens.hardware import HardwareScreen
from tunewiz.tui.screens.model import ModelScreen
from tunewiz.tui.screens.presets import PresetsScreen
from tunewiz.tui.screens.review import ReviewScreen
from tunewiz.tui.screens.runs import RunsScreen
from tunewiz.tui.screens.settings import SettingsScreen
from tunewiz.tui.screens.welcome import WelcomeScreen
from tunewiz.tui.services import Services

pytestmark = pytest.mark.timeout(120)


def text_of(widget: Any) -> str:
    """What a Static shows, as plain text."""
    console = Console(width=200, file=io.StringIO(), color_system=None)
    console.print(widget.content)
    return console.file.getvalue()


def make_app(report: Any, tmp_path: Path, **fake: Any) -> tuple[TunewizApp, FakeServices]:
    fakes = FakeServices(report, tmp_path / "runs", **fake)
    return TunewizApp(fakes.services()), fakes


async def wait_until(pilot: Any, predicate: Callable[[], Any], what: str = "condition", timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; screen is {type(pilot.app.screen).__name__}")
        await pilot.pause(0.05)


async def on_screen(pilot: Any, cls: type) -> None:
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, cls), cls.__name__)


async def to_model_step(pilot: Any) -> None:
    await on_screen(pilot, WelcomeScreen)
    await pilot.press("n")
    await on_screen(pilot, HardwareScreen)
    await wait_until(pilot, lambda: pilot.app.state.report is not None, "the hardware probe")
    await pilot.press("enter")
    await on_screen(pilot, ModelScreen)


async def launch_from_review(pilot: Any, fakes: FakeServices) -> None:
    await on_screen(pilot, ReviewScreen)
    await pilot.press("l")
    await wait_until(pilot, lambda: fakes.launched, "the launch")
    await on_screen(pilot, DashboardScreen)


def demo_preset_text() -> str:
    return spec_mod.dumps(presets.resolve("demo")[0])


# ---------------------------------------------------------------------------------------------
# The wizard's rules, without the UI


def test_accepting_the_demo_choice_and_data_gives_the_demo_preset() -> None:
    base = wizard.base_spec()
    report = no_gpu_report()
    choice = fake_recommend(report).choices[0]
    spec = wizard.apply_choice(base, choice, base)
    spec = wizard.apply_dataset(spec, wizard.DatasetSelection(preset="demo"), base, choice)
    assert spec_mod.dumps(spec) == demo_preset_text()


def test_dataset_length_is_capped_by_what_the_recommendation_allows() -> None:
    base = wizard.base_spec()
    choice = fake_choice_for("llama-3.1-8b", gpu24_report(), 512)
    spec = wizard.apply_choice(base, choice, base)
    alpaca = wizard.apply_dataset(spec, wizard.DatasetSelection(preset="alpaca"), base, choice)
    assert alpaca.training.max_seq_length == 512  # alpaca asks for 1024; memory allows 512
    assert alpaca.name == "alpaca-llama-3.1-8b"
    custom = wizard.apply_dataset(spec, wizard.DatasetSelection(source="/data/qa.jsonl", format="alpaca",
                                                                columns=(("instruction", "q"),)), base, choice)
    assert (custom.dataset.source, custom.dataset.preset, custom.dataset.columns) == ("/data/qa.jsonl", None,
                                                                                      {"instruction": "q"})
    assert custom.name == "qa-llama-3.1-8b"


def test_set_value_validates_like_the_spec_does() -> None:
    spec = wizard.base_spec()
    assert wizard.set_value(spec, "training.learning_rate", "1e-4").training.learning_rate == 1e-4
    assert wizard.set_value(spec, "training.max_steps", "20").training.max_steps == 20
    assert wizard.set_value(wizard.set_value(spec, "training.max_steps", "20"), "training.max_steps",
                            "").training.max_steps is None
    assert wizard.set_value(spec, "name", "123").name == "123"  # strings stay strings
    assert wizard.set_value(spec, "lora.target_modules", '["q_proj", "v_proj"]').lora.target_modules == [
        "q_proj", "v_proj"]
    assert wizard.set_value(spec, "training.packing", "true").training.packing is True
    for key, text, words in [("training.learning_rate", "abc", "expected a number"),
                             ("training.learning_rate", "0", "greater than 0"),
                             ("training.epochs", "", "empty"),
                             ("method", "lorra", "did you mean 'lora'"),
                             ("name", "my run!", "letters, digits")]:
        with pytest.raises(SpecError) as caught:
            wizard.set_value(spec, key, text)
        assert words in wizard.problem_text(caught.value, key), (key, text, caught.value)
    for key in wizard.FIELDS:  # what the form shows reads back as the same value
        assert wizard.set_value(spec, key, wizard.value_text(spec, key)) == spec, key


def test_check_request_argv_matches_the_data_check_command() -> None:
    request = wizard.CheckRequest("/d/qa.jsonl", "smollm2-135m-demo", 256, "alpaca",
                                  (("instruction", "q"), ("output", "a")))
    assert request.argv() == ["data", "check", "/d/qa.jsonl", "--model", "smollm2-135m-demo", "--max-seq-len",
                              "256", "--json", "--format", "alpaca", "--columns", "instruction=q,output=a",
                              "--limit", str(wizard.CHECK_ROW_LIMIT)]


def test_memory_verdict_uses_free_ram_without_a_gpu() -> None:
    from tunewiz.tui.widgets.memory import verdict

    big = fake_choice_for("llama-3.1-8b", gpu24_report())  # the recommender's verdict is about the GPU
    assert verdict(big, gpu24_report())[1:] == ("fits", "free")
    report = no_gpu_report()  # 5 GiB of RAM free
    assert verdict(big, report) == (report.ram_available_bytes, "too_big", "RAM free")
    assert verdict(fake_recommend(report).choices[0], report)[1] == "fits"


def test_no_cuda_context_is_counted_on_a_cpu() -> None:
    from tunewiz.engine.planning.recommend import choice_for
    from tunewiz.tui.widgets.memory import estimate_breakdown, estimate_total

    choice = choice_for("llama-3.1-8b", gpu24_report())
    assert estimate_total(choice, gpu24_report()) == choice.needed_bytes
    assert "CUDA context" in estimate_breakdown(choice, gpu24_report())
    assert estimate_total(choice, no_gpu_report()) == choice.estimate.total < choice.needed_bytes
    assert "CUDA context" not in estimate_breakdown(choice, no_gpu_report())


def test_peek_reads_columns_and_guesses_a_mapping(tmp_path: Path) -> None:
    from tunewiz.tui.datafile import guess_mapping, peek

    rows = tmp_path / "rows.jsonl"
    rows.write_text('\n{"Question": "q", "Answer": "a"}\n')
    found = peek(str(rows))
    assert (found.columns, found.detected, found.error) == (("Question", "Answer"), None, None)
    assert guess_mapping(found.columns) == {"instruction": "Question", "output": "Answer"}
    table = tmp_path / "rows.csv"
    table.write_text("instruction,output\nsay hi,hi\n")
    assert peek(str(table)).detected == "alpaca"
    assert peek(str(tmp_path / "missing.jsonl")).error.startswith("no file at")
    assert peek("org/dataset") == peek("org/dataset").__class__()  # hub ids are left to the checker
    assert guess_mapping(("text", "label")) is None


# ---------------------------------------------------------------------------------------------
# Whole flows with simulated hardware


async def enter_to_review(pilot: Any) -> None:
    """From the start, Enter on every step's default up to the review."""
    await on_screen(pilot, WelcomeScreen)
    await wait_until(pilot, lambda: pilot.app.state.report is not None, "the hardware probe")
    for screen in (WelcomeScreen, HardwareScreen, ModelScreen, DatasetScreen, SettingsScreen):
        await on_screen(pilot, screen)
        await pilot.press("enter")
    await on_screen(pilot, ReviewScreen)


@pytest.mark.asyncio
async def test_no_gpu_pressing_enter_all_the_way_launches_the_demo_preset(tmp_path: Path) -> None:
    app, fakes = make_app(no_gpu_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await enter_to_review(pilot)
        await pilot.press("enter")  # the Launch button has the focus
        await wait_until(pilot, lambda: fakes.launched, "the launch")
        await on_screen(pilot, DashboardScreen)
        assert [type(s).__name__ for s in app.screen_stack[1:]] == ["WelcomeScreen", "DashboardScreen"]
    assert len(fakes.launched) == 1 and fakes.trusted == [False]
    assert spec_mod.dumps(fakes.launched[0]) == demo_preset_text()
    assert fakes.checks and fakes.checks[-1].target == "demo" and fakes.checks[-1].max_seq_len == 256


@pytest.mark.asyncio
async def test_a_spec_that_runs_model_code_is_launched_only_after_the_user_says_so(tmp_path: Path) -> None:
    from tunewiz.tui.dialogs import ConfirmDialog

    app, fakes = make_app(no_gpu_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await enter_to_review(pilot)
        spec = app.state.spec
        app.state.spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, trust_remote_code=True))
        await pilot.press("l")
        await on_screen(pilot, ConfirmDialog)
        assert "runs Python code from its folder" in app.screen.message
        await pilot.press("n")
        await on_screen(pilot, ReviewScreen)
        assert not fakes.launched
        await pilot.press("l")
        await on_screen(pilot, ConfirmDialog)
        await pilot.press("y")
        await wait_until(pilot, lambda: fakes.launched, "the launch")
    assert fakes.trusted == [True] and fakes.launched[0].model.trust_remote_code


@pytest.mark.parametrize("make_report", [no_gpu_report, gpu24_report, gpu80_report], ids=["no-gpu", "24gb", "80gb"])
@pytest.mark.asyncio
async def test_with_the_real_recommender_the_defaults_launch_its_first_choice(tmp_path: Path, make_report: Any) -> None:
    recommend = pytest.importorskip("tunewiz.engine.planning.recommend")
    report = make_report()
    first = recommend.recommend(report, seq_len=wizard.RECOMMEND_SEQ_LEN).choices[0]
    fakes = FakeServices(report, tmp_path / "runs")
    app = TunewizApp(Services(probe=lambda: report, check_data=fakes.check_data, launch=fakes.launch,
                              runs_root=tmp_path / "runs"))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.report is not None, "the hardware probe")
        for screen in (WelcomeScreen, HardwareScreen, ModelScreen, DatasetScreen, SettingsScreen, ReviewScreen):
            await on_screen(pilot, screen)
            if screen is ReviewScreen:
                await wait_until(pilot, lambda: app.state.review_estimate is not None, "the review estimate")
                assert "Memory:" in text_of(app.screen.query_one("#review-summary"))
            await pilot.press("enter")
        await wait_until(pilot, lambda: fakes.launched, "the launch")
    spec = fakes.launched[0]
    if not report.has_gpu:
        assert spec_mod.dumps(spec) == demo_preset_text()
    assert (spec.model.name, spec.method) == (first.model, first.method)
    assert (spec.training.micro_batch_size, spec.training.gradient_accumulation,
            spec.training.gradient_checkpointing) == (first.micro_batch_size, first.gradient_accumulation,
                                                      first.gradient_checkpointing)
    assert spec.dataset.preset == "demo" and spec.training.max_seq_length == 256


@pytest.mark.asyncio
async def test_24gb_qlora_on_alpaca_with_edited_settings(tmp_path: Path) -> None:
    app, fakes = make_app(gpu24_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("enter")  # the first choice: llama-3.1-8b with QLoRA
        await on_screen(pilot, DatasetScreen)
        await pilot.press("down", "enter")  # alpaca
        await on_screen(pilot, SettingsScreen)
        assert app.focused is not None and app.focused.id == "f-name"
        await pilot.press("tab", "ctrl+u", *"2", "tab", *"100")  # epochs 2, max steps 100
        await pilot.press("ctrl+n")
        await launch_from_review(pilot, fakes)
    spec = fakes.launched[0]
    assert (spec.model.name, spec.method) == ("llama-3.1-8b", "qlora")
    assert (spec.training.micro_batch_size, spec.training.gradient_accumulation) == (2, 8)
    assert spec.training.gradient_checkpointing is True
    assert spec.training.max_seq_length == 1024  # alpaca's length, within the 2048 the estimate allows
    assert (spec.training.epochs, spec.training.max_steps) == (2.0, 100)
    assert (spec.dataset.preset, spec.dataset.source) == ("alpaca", None)
    assert spec.name == "alpaca-llama-3.1-8b"
    assert spec.training.learning_rate == presets.resolve("demo")[0].training.learning_rate


@pytest.mark.asyncio
async def test_80gb_big_model_on_your_own_file_with_guessed_columns(tmp_path: Path) -> None:
    data = tmp_path / "support.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(5)))
    app, fakes = make_app(gpu80_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("down", "enter")  # llama-3.1-70b with QLoRA
        await on_screen(pilot, DatasetScreen)
        await pilot.press("end", "enter")  # "Your own data..." moves to the path box
        assert app.focused is not None and app.focused.id == "source"
        await pilot.press(*str(data), "enter")
        await wait_until(pilot, lambda: app.screen.query_one("#col-instruction").value == "question",
                         "the guessed column mapping")
        await wait_until(pilot, lambda: any(r.columns for r in fakes.checks), "a check with the mapping")
        await pilot.press("ctrl+n")
        await on_screen(pilot, SettingsScreen)
        await pilot.press("ctrl+n")
        await launch_from_review(pilot, fakes)
    spec = fakes.launched[0]
    assert (spec.model.name, spec.method, spec.training.micro_batch_size) == ("llama-3.1-70b", "qlora", 1)
    assert (spec.dataset.preset, spec.dataset.source, spec.dataset.format) == (None, str(data), "alpaca")
    assert spec.dataset.columns == {"instruction": "question", "output": "answer"}
    assert spec.training.max_seq_length == 2048
    assert spec.name == "support-llama-3.1-70b"
    checked = [r for r in fakes.checks if r.columns]
    assert checked[-1] == wizard.CheckRequest(str(data), "llama-3.1-70b", 2048, "alpaca",
                                              (("instruction", "question"), ("output", "answer")))


@pytest.mark.asyncio
async def test_a_model_that_does_not_fit_asks_first(tmp_path: Path) -> None:
    app, fakes = make_app(gpu24_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("down", "down", "down")  # llama-3.1-70b QLoRA: does not fit in 22 GB
        await pilot.press("enter")
        await on_screen(pilot, ConfirmDialog)
        await pilot.press("n")
        await on_screen(pilot, ModelScreen)
        assert app.state.choice is None
        await pilot.press("enter", "y")
        await on_screen(pilot, DatasetScreen)
        assert app.state.spec.model.name == "llama-3.1-70b"


@pytest.mark.asyncio
async def test_qlora_without_bitsandbytes_asks_first(tmp_path: Path) -> None:
    app, fakes = make_app(gpu24_report(bitsandbytes=False), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("enter")  # the first choice is QLoRA
        await on_screen(pilot, ConfirmDialog)
        assert "bitsandbytes" in app.screen.message
        await pilot.press("escape", "down", "enter")  # LoRA instead
        await on_screen(pilot, DatasetScreen)
        assert app.state.spec.method == "lora"


@pytest.mark.asyncio
async def test_typed_model_is_estimated_and_offered_first(tmp_path: Path) -> None:
    app, fakes = make_app(gpu24_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("o", *"nobody/nothing", "enter")
        await on_screen(pilot, MessageDialog)
        assert "nobody/nothing" in app.screen.message and "spelling" in (app.screen.hint or "")
        await pilot.press("enter")
        await on_screen(pilot, ModelScreen)
        await pilot.press("o", "ctrl+u", *"Qwen/Qwen2.5-0.5B-Instruct", "enter")
        await wait_until(pilot, lambda: app.state.extra_choices, "the estimate")
        await pilot.pause(0.1)
        assert app.focused is not None and app.focused.id == "choices"
        await pilot.press("enter")
        await on_screen(pilot, DatasetScreen)
        assert (app.state.spec.model.name, app.state.spec.training.micro_batch_size) == (
            "Qwen/Qwen2.5-0.5B-Instruct", 8)


@pytest.mark.asyncio
async def test_settings_are_validated_as_you_type_and_block_next(tmp_path: Path) -> None:
    app, fakes = make_app(no_gpu_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("enter", "enter")
        await on_screen(pilot, SettingsScreen)
        screen = app.screen
        await pilot.press("tab", "tab", "tab")  # learning rate
        assert app.focused.id == "f-training--learning_rate"
        await pilot.press("ctrl+u", *"fast")
        assert "expected a number" in text_of(screen.query_one("#help-f-training--learning_rate"))
        assert screen.query_one("#row-f-training--learning_rate").has_class("invalid")
        await pilot.press("ctrl+n")
        assert isinstance(app.screen, SettingsScreen)
        await pilot.press("ctrl+u", *"5e-5")
        assert not screen.errors
        await pilot.press("ctrl+t")  # every setting
        assert screen.query_one("#row-f-lora--r").display
        await pilot.press("ctrl+n")
        await on_screen(pilot, ReviewScreen)
        assert app.state.spec.training.learning_rate == 5e-5
        assert 'learning_rate = 5e-05' in text_of(app.screen.query_one("#toml"))


@pytest.mark.asyncio
async def test_back_works_from_every_step_and_keeps_the_choices(tmp_path: Path) -> None:
    app, fakes = make_app(gpu24_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("down", "enter")  # qwen2.5-3b LoRA
        await on_screen(pilot, DatasetScreen)
        await pilot.press("down", "down", "enter")  # ultrachat
        await on_screen(pilot, SettingsScreen)
        await pilot.press("ctrl+n")
        await on_screen(pilot, ReviewScreen)
        for screen in (SettingsScreen, DatasetScreen, ModelScreen, HardwareScreen, WelcomeScreen):
            await pilot.press("escape")
            await on_screen(pilot, screen)
        await pilot.press("escape")  # nothing behind the welcome screen
        assert isinstance(app.screen, WelcomeScreen)
        assert (app.state.spec.model.name, app.state.spec.dataset.preset) == ("qwen2.5-3b", "ultrachat")
        await pilot.press("n")  # a new fine-tune starts from the demo preset again
        await on_screen(pilot, HardwareScreen)
        assert spec_mod.dumps(app.state.spec) == demo_preset_text()
    assert not fakes.launched


@pytest.mark.asyncio
async def test_escape_in_a_text_box_returns_to_the_list_first(tmp_path: Path) -> None:
    app, fakes = make_app(gpu24_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("o", *"abc")
        await pilot.press("escape")
        assert isinstance(app.screen, ModelScreen) and app.focused.id == "choices"
        await pilot.press("escape")
        await on_screen(pilot, HardwareScreen)


@pytest.mark.asyncio
async def test_save_a_preset_then_relaunch_it_from_the_welcome_screen(tmp_path: Path, tunewiz_home: Path) -> None:
    app, fakes = make_app(gpu80_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("enter")  # llama-3.1-8b LoRA
        await on_screen(pilot, DatasetScreen)
        await pilot.press("enter")  # demo data
        await on_screen(pilot, SettingsScreen)
        await pilot.press("ctrl+n")
        await on_screen(pilot, ReviewScreen)
        reviewed = app.state.spec
        await pilot.press("s")
        await on_screen(pilot, NameDialog)
        await pilot.press("ctrl+u", *"my-recipe", "enter")
        await on_screen(pilot, ReviewScreen)
        saved = tunewiz_home / "config" / "presets" / "my-recipe.toml"
        reviewed = dataclasses.replace(reviewed, name="my-recipe")  # a preset's runs carry its name
        assert spec_mod.load(saved) == reviewed
        await pilot.press("s", "ctrl+u", *"my-recipe", "enter")  # the same name again asks first
        await on_screen(pilot, ConfirmDialog)
        await pilot.press("y")
        await on_screen(pilot, ReviewScreen)
        for _ in range(5):
            await pilot.press("escape")
        await on_screen(pilot, WelcomeScreen)
        await pilot.press("p")
        await on_screen(pilot, PresetsScreen)
        options = app.screen.query_one("#presets")
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert ids == ["built-in:concise", "built-in:demo", "user:my-recipe"]
        await pilot.press("down", "down", "enter")
        await launch_from_review(pilot, fakes)
    assert fakes.launched == [reviewed]


@pytest.mark.asyncio
async def test_past_runs_are_listed_and_open_in_the_run_view(tmp_path: Path) -> None:
    app, fakes = make_app(no_gpu_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await on_screen(pilot, WelcomeScreen)
        await pilot.press("r")
        await on_screen(pilot, RunsScreen)
        await wait_until(pilot, lambda: "No runs yet" in text_of(app.screen.query_one("#runs-empty")),
                         "the empty list")
        await pilot.press("escape")
        await to_model_step(pilot)
        await pilot.press("ctrl+n")
        await on_screen(pilot, DatasetScreen)
        await pilot.press("ctrl+n")
        await on_screen(pilot, SettingsScreen)
        await pilot.press("ctrl+n")
        await launch_from_review(pilot, fakes)
        await wait_until(pilot, lambda: app.screen.view is not None and app.screen.view.step == 2, "the events")
        assert "step 2/40" in text_of(app.screen.query_one("#run-progress"))
        await pilot.press("escape")
        await on_screen(pilot, WelcomeScreen)
        await pilot.press("r")
        await on_screen(pilot, RunsScreen)
        await wait_until(pilot, lambda: len(app.screen.rows) == 1, "the run in the list")
        await pilot.press("enter")
        await on_screen(pilot, DashboardScreen)
        assert app.screen.run.run_id == rundir.list_runs(tmp_path / "runs")[0].run_id


@pytest.mark.asyncio
async def test_a_failing_worker_becomes_a_dialog(tmp_path: Path) -> None:
    def broken_probe() -> Any:
        raise RuntimeError("NVML exploded")

    app = TunewizApp(Services(probe=broken_probe, recommend=fake_recommend, runs_root=tmp_path / "runs"))
    async with app.run_test(size=(80, 24)) as pilot:
        await on_screen(pilot, MessageDialog)
        assert app.screen.title_text == "The hardware check failed"
        assert "NVML exploded" in app.screen.message
        await pilot.press("enter")
        await on_screen(pilot, WelcomeScreen)


@pytest.mark.asyncio
async def test_a_failed_data_check_is_shown_and_asks_before_going_on(tmp_path: Path) -> None:
    from tunewiz.tui.services import ServiceError

    def failing_check(request: Any, is_cancelled: Any) -> dict[str, Any]:
        raise ServiceError("dataset file /nowhere.jsonl does not exist", "check dataset.source")

    fakes = FakeServices(no_gpu_report(), tmp_path / "runs")
    services = fakes.services()
    services.check_data = failing_check
    app = TunewizApp(services)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("enter")
        await on_screen(pilot, DatasetScreen)
        await pilot.press("end", "enter", *"/nowhere.jsonl", "enter")
        await wait_until(pilot, lambda: "does not exist" in text_of(app.screen.query_one("#data-check")),
                         "the check's error")
        assert "no file at /nowhere.jsonl" in text_of(app.screen.query_one("#columns-found"))
        await pilot.press("ctrl+n")
        await on_screen(pilot, ConfirmDialog)
        await pilot.press("n")
        await on_screen(pilot, DatasetScreen)


@pytest.mark.asyncio
async def test_demo_check_report_reaches_review(tmp_path: Path) -> None:
    app, fakes = make_app(no_gpu_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        await pilot.press("enter")
        await on_screen(pilot, DatasetScreen)
        await wait_until(pilot, lambda: app.state.check_for(app.screen.candidate_spec()) is not None
                         and app.state.check_for(app.screen.candidate_spec()).report, "the data check")
        # The state changes before the screen is redrawn: wait for the text, not just the state.
        await wait_until(pilot, lambda: "318 usable" in text_of(app.screen.query_one("#data-check")),
                         "the data check on screen")
        await pilot.press("ctrl+n", "ctrl+n")
        await on_screen(pilot, ReviewScreen)
        await wait_until(pilot, lambda: "318 usable examples of 320 read, 2 skipped"
                         in text_of(app.screen.query_one("#review-summary")), "the check in the review")
        assert demo_check_report(fakes.checks[0])["examples"] == 318


# ---------------------------------------------------------------------------------------------
# Start-up time and the terminal going away (real processes)

STARTUP = """
import json, time
wall, cpu = time.perf_counter(), time.process_time()
import tunewiz.tui.app
app = tunewiz.tui.app.TunewizApp()
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))
"""


def test_app_starts_fast(tunewiz_home: Path) -> None:
    """Import and construct the app in a fresh interpreter: CPU time well under 0.5 s.

    CPU time is what the app costs; wall time on this shared machine also counts other people's work, so its
    bound is looser.
    """
    timings = []
    for _ in range(3):
        result = subprocess.run([PYTHON, "-c", STARTUP], env=subprocess_env(), cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        timings.append(json.loads(result.stdout))
    best_cpu = min(t["cpu"] for t in timings)
    best_wall = min(t["wall"] for t in timings)
    print(f"start-up: cpu {best_cpu:.3f} s, wall {best_wall:.3f} s")
    assert best_cpu < 0.5, timings
    assert best_wall < 1.5, timings


HANGUP_APP = """
import sys
from tests.tui_fakes import FakeServices, no_gpu_report
from tunewiz.tui.app import run_app
from pathlib import Path
sys.exit(run_app(FakeServices(no_gpu_report(), Path(sys.argv[1])).services()))
"""


def _take_terminal() -> None:
    """In the child, after setsid: make the pty its controlling terminal, as a login shell's would be."""
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _spawn_in_pty(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    master, slave = pty.openpty()
    env = subprocess_env(TERM="xterm-256color", COLUMNS="80", LINES="24")
    process = subprocess.Popen([PYTHON, "-c", HANGUP_APP, str(tmp_path / "runs")], stdin=slave, stdout=slave,
                               stderr=slave, env=env, cwd=ROOT, start_new_session=True, close_fds=True,
                               preexec_fn=_take_terminal)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 30
    while b"New fine-tune" not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                seen += os.read(master, 65536)
            except OSError:
                break
    assert b"New fine-tune" in seen, seen[-2000:]
    return process, master


@pytest.mark.parametrize("how", ["sighup", "terminal closed"])
def test_the_app_exits_cleanly_when_the_terminal_goes_away(tmp_path: Path, how: str) -> None:
    process, master = _spawn_in_pty(tmp_path)
    try:
        if how == "sighup":
            os.kill(process.pid, signal.SIGHUP)
        else:
            os.close(master)
            master = -1
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        if master >= 0:
            os.close(master)


# ---------------------------------------------------------------------------------------------
# End to end: the real launcher starts the engine (with the stand-in trainer) from the wizard


@pytest.mark.asyncio
async def test_end_to_end_the_wizard_launches_a_real_engine_process(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Enter all the way on a machine without a GPU: the engine starts detached and step events arrive."""
    from tests.fake_trainer import __name__ as fake_trainer_module

    monkeypatch.setenv("TUNEWIZ_TRAINER", f"{fake_trainer_module}:train")
    monkeypatch.setenv("FAKE_STEPS", "200")
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    fakes = FakeServices(no_gpu_report(), tmp_path / "runs")
    services = Services(probe=no_gpu_report, check_data=fakes.check_data, runs_root=tmp_path / "runs")
    app = TunewizApp(services)  # the default recommender and the real launcher
    run = None
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.state.report is not None, "the hardware probe")
            for screen in (WelcomeScreen, HardwareScreen, ModelScreen, DatasetScreen, SettingsScreen, ReviewScreen):
                await on_screen(pilot, screen)
                await pilot.press("enter")
            await on_screen(pilot, DashboardScreen)
            run = app.launched[0]
            assert run.path.parent == tmp_path / "runs"
            spec = run.load_spec()
            assert (spec.model.name, spec.method, spec.dataset.preset) == ("smollm2-135m-demo", "lora", "demo")

            def steps() -> int:
                if not run.events_path.exists():
                    return 0
                return sum(json.loads(line)["type"] == "step" for line in run.events_path.read_text().splitlines())

            await wait_until(pilot, lambda: steps() >= 3, "step events in the run directory", timeout=60)
            await wait_until(pilot, lambda: "step " in text_of(app.screen.query_one("#run-progress")),
                             "the run view to show progress", timeout=30)
            assert app.screen.view.step >= 1
            await pilot.press("s")
            await on_screen(pilot, ConfirmDialog)
            await pilot.press("y")
            await wait_until(pilot, lambda: run.state() == "cancelled", "the graceful stop", timeout=60)
            await wait_until(pilot, lambda: "CANCELLED" in text_of(app.screen.query_one("#run-title")),
                             "the run view to show the end", timeout=30)
        finished = [json.loads(line) for line in run.events_path.read_text().splitlines()
                    if json.loads(line)["type"] == "finished"]
        assert finished and finished[-1]["status"] == "cancelled"
    finally:
        if run is not None and run.engine_alive():
            pgid = run.status().get("pgid")
            if isinstance(pgid, int):
                os.killpg(pgid, signal.SIGKILL)
