"""The wizard on machines with several GPUs (Textual's Pilot): the model step offers all of them or one (`g`),
and the review step says which GPUs train, how they share the work and the effective batch."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.test_tui_wizard import launch_from_review, make_app, on_screen, text_of, to_model_step, wait_until
from tests.tui_fakes import FakeServices, gpu24_report, gpu80_report, gpu80x2_report, no_gpu_report
from tunewiz.engine.config import spec as spec_mod
from tunewiz.engine.errors import TunewizError
from tunewiz.tui import wizard
from tunewiz.tui.app import TunewizApp
from tunewiz.tui.screens.dataset import DatasetScreen
from tunewiz.tui.screens.review import ReviewScreen
from tunewiz.tui.screens.settings import SettingsScreen
from tunewiz.tui.services import Services

pytestmark = pytest.mark.timeout(120)


def choices_text(app: Any) -> str:
    options = app.screen.query_one("#choices")
    return "\n".join(str(options.get_option_at_index(i).prompt.renderables[0])
                     for i in range(options.option_count))


async def to_settings(pilot: Any) -> None:
    """From the model step, Enter on the highlighted choice and on the demo data."""
    for key, screen in (("enter", DatasetScreen), ("enter", SettingsScreen)):
        await pilot.press(key)
        await on_screen(pilot, screen)


async def to_review(pilot: Any) -> str:
    """From the model step, Enter on the highlighted choice and the defaults; the review's summary."""
    await to_settings(pilot)
    await pilot.press("ctrl+n")
    await on_screen(pilot, ReviewScreen)
    await wait_until(pilot, lambda: pilot.app.state.review_estimate is not None, "the review estimate")
    await pilot.pause(0.1)
    return text_of(pilot.app.screen.query_one("#review-summary"))


# ---------------------------------------------------------------------------------------------
# The rules, without the UI


def test_gpu_plan_says_which_gpus_and_the_effective_batch() -> None:
    spec = wizard.base_spec()
    spec.training.micro_batch_size, spec.training.gradient_accumulation = 2, 8
    assert wizard.gpu_plan(spec, None) is None
    assert wizard.gpu_plan(spec, no_gpu_report()) is None
    assert wizard.gpu_plan(spec, gpu24_report()) is None  # one GPU: nothing to choose
    one = wizard.gpu_plan(spec, gpu80x2_report(), offered=2)
    assert one == (1, "1 of the 2 found (NVIDIA H100 80GB HBM3, GPU 0); g on the Model step trains on 2",
                   "effective batch 16 = 2 per GPU × 8 accumulation × 1 GPU")
    spec.training.gpus, spec.training.strategy = 0, "fsdp"  # 0: all of them
    count, text, batch = wizard.gpu_plan(spec, gpu80x2_report())
    assert count == 2 and text == ("2 × NVIDIA H100 80GB HBM3 (GPUs 0, 1) · FSDP: the weights are sharded across "
                                   "the GPUs")
    assert batch == "effective batch 16 = 2 per GPU × 4 accumulation × 2 GPUs (was 2 × 8 × 1)"
    spec.training.gpus = 4
    with pytest.raises(TunewizError, match="4 GPUs"):
        wizard.gpu_plan(spec, gpu80x2_report())


# ---------------------------------------------------------------------------------------------
# Flows


@pytest.mark.asyncio
async def test_two_gpus_the_first_choice_trains_on_both_and_review_shows_the_batch(tmp_path: Path) -> None:
    app, fakes = make_app(gpu80x2_report(), tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await to_model_step(pilot)
        note = text_of(app.screen.query_one("#gpu-note"))
        assert "Training on all 2 GPUs" in note and "g: use 1 GPU" in note
        assert app.screen.check_action("gpus", ()) is True
        assert "qwen2.5-32b  LoRA" in choices_text(app) and "2 GPUs FSDP" in choices_text(app)
        summary = await to_review(pilot)
        assert ("GPUs: 2 × NVIDIA H100 80GB HBM3 (GPUs 0, 1) · FSDP: the weights are sharded across the GPUs"
                in summary)
        assert "effective batch 16 = 2 per GPU × 4 accumulation × 2 GPUs (was 2 × 8 × 1)" in summary
        assert "of 79 GiB free per GPU" in summary
        await launch_from_review(pilot, fakes)
    spec = fakes.launched[0]
    assert (spec.model.name, spec.training.gpus, spec.training.strategy) == ("qwen2.5-32b", 2, "fsdp")
    assert (spec.training.micro_batch_size, spec.training.gradient_accumulation) == (2, 8)  # per one GPU, as saved


@pytest.mark.asyncio
async def test_g_switches_to_one_gpu_and_back(tmp_path: Path) -> None:
    app, fakes = make_app(gpu80x2_report(), tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await to_model_step(pilot)
        await pilot.press("down")  # llama-3.1-8b on 2 GPUs
        await pilot.press("g")
        await wait_until(pilot, lambda: app.state.one_gpu, "the switch")
        await pilot.pause(0.1)
        assert "Training on 1 GPU of 2 alike" in text_of(app.screen.query_one("#gpu-note"))
        assert "GPUs" not in choices_text(app)  # the one-GPU ranking
        assert app.screen._highlighted_choice().model == "llama-3.1-8b"  # the same model stays highlighted
        await pilot.press("g")
        await wait_until(pilot, lambda: not app.state.one_gpu, "the switch back")
        await pilot.pause(0.1)
        assert app.screen._highlighted_choice().model == "llama-3.1-8b"
        assert app.screen._highlighted_choice().gpus == 2
        await pilot.press("g")
        await wait_until(pilot, lambda: app.state.one_gpu, "the switch")
        summary = await to_review(pilot)
        assert "GPUs: 1 of the 2 found (NVIDIA H100 80GB HBM3, GPU 0); g on the Model step trains on 2" in summary
        assert "effective batch 16 = 8 per GPU × 2 accumulation × 1 GPU" in summary
        assert "free per GPU" not in summary
        await launch_from_review(pilot, fakes)
    spec = fakes.launched[0]
    assert (spec.model.name, spec.training.gpus, spec.training.strategy) == ("llama-3.1-8b", 1, "auto")


@pytest.mark.asyncio
async def test_typed_model_is_estimated_for_both_and_settings_show_the_gpus(tmp_path: Path) -> None:
    app, fakes = make_app(gpu80x2_report(), tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await to_model_step(pilot)
        await pilot.press("o", *"Qwen/Qwen2.5-0.5B-Instruct", "enter")
        await wait_until(pilot, lambda: app.state.extra_choices and app.state.extra_choices_one, "the estimates")
        assert (app.state.extra_choices[0].gpus, app.state.extra_choices_one[0].gpus) == (2, 1)
        await pilot.pause(0.1)
        await pilot.press("g")
        await wait_until(pilot, lambda: app.state.one_gpu, "the switch")
        await pilot.pause(0.1)
        assert app.screen._highlighted_choice() is app.state.extra_choices_one[0]
        await pilot.press("g")
        await wait_until(pilot, lambda: not app.state.one_gpu, "the switch back")
        await pilot.pause(0.1)
        await to_settings(pilot)
        await pilot.pause(0.1)
        assert "GPUs 2 DDP" in text_of(app.screen.query_one("#settings-summary"))
    assert app.state.spec.training.gpus == 2


@pytest.mark.asyncio
async def test_one_gpu_offers_no_switch(tmp_path: Path) -> None:
    app, fakes = make_app(gpu80_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await to_model_step(pilot)
        assert not app.screen.query_one("#gpu-note").display
        assert app.screen.check_action("gpus", ()) is False
        await pilot.press("g")
        await pilot.pause(0.1)
        assert app.state.use_all_gpus and app.state.recommendation_one is None
        summary = await to_review(pilot)
        assert "GPUs:" not in summary and "effective batch" not in summary
    assert fakes.launched == []


@pytest.mark.asyncio
async def test_with_the_real_recommender_two_gpus_train_with_ddp(tmp_path: Path) -> None:
    from tunewiz.engine.planning import recommend

    report = gpu24_report()
    report.gpus.append(dataclasses.replace(report.gpus[0], index=1, cuda_index=1))
    first = recommend.recommend(report, seq_len=wizard.RECOMMEND_SEQ_LEN).choices[0]
    assert (first.gpus, first.strategy) == (2, "ddp")
    fakes = FakeServices(report, tmp_path / "runs")
    app = TunewizApp(Services(probe=lambda: report, check_data=fakes.check_data, launch=fakes.launch,
                              runs_root=tmp_path / "runs"))
    async with app.run_test(size=(100, 30)) as pilot:
        await to_model_step(pilot)
        assert app.state.recommendation_one is not None
        summary = await to_review(pilot)
        assert "GPUs: 2 × NVIDIA GeForce RTX 4090 (GPUs 0, 1) · DDP: each GPU holds the whole model" in summary
        batch = first.micro_batch_size * first.gradient_accumulation
        assert f"effective batch {batch} = {first.micro_batch_size} per GPU × " in summary
        await launch_from_review(pilot, fakes)
    spec = fakes.launched[0]
    assert (spec.model.name, spec.method, spec.training.gpus, spec.training.strategy) == (
        first.model, first.method, 2, "ddp")
    assert spec_mod.loads(spec_mod.dumps(spec)) == spec
