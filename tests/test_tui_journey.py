"""The beginner's journey (issue 15) in the app, with Textual's Pilot: one memory number from the spec about to
launch, re-ranking once the data's lengths are measured, the guide's method names, the mirror's licence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_tui_wizard import make_app, on_screen, text_of, to_model_step, wait_until
from tests.test_tui_wizard_multi_gpu import choices_text, to_review, to_settings
from tests.tui_fakes import gpu24_report, no_gpu_report
from tunewiz.engine.planning import recommend as rec
from tunewiz.tui import wizard
from tunewiz.tui.screens.model import choice_prompt
from tunewiz.tui.screens.review import ReviewScreen, better_choice

pytestmark = pytest.mark.timeout(120)


@pytest.mark.asyncio
async def test_review_estimates_the_spec_about_to_launch_without_cuda_context_on_a_cpu(tmp_path: Path) -> None:
    app, _fakes = make_app(no_gpu_report(), tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await to_model_step(pilot)
        model_step = choices_text(app)
        summary = await to_review(pilot)
        spec = app.state.spec
        # the data check measured the demo data's longest example: 81 tokens (tests/tui_fakes.py)
        expected = rec.estimate_spec(spec, on_gpu=False, longest=81).total
        assert app.state.review_estimate.needed_bytes == expected
        assert f"{rec.gb(expected)} of 5.0 GiB RAM free" in summary
        assert "CUDA context" not in summary and "estimated for" not in summary and summary.count("Memory:") == 1
        assert "(for the data's longest example, 81 tokens)" in summary
        assert "LoRA" in model_step and "LORA" not in model_step

        # every setting moves the bar: a bigger adapter rank is a bigger estimate
        before = app.state.review_estimate.estimate.total
        app.state.spec = wizard.set_value(spec, "lora.r", "256")
        app.state_signal.publish(None)
        await wait_until(pilot, lambda: app.state.review_estimate is not None
                         and app.state.review_estimate.estimate.total > before, "a new estimate")


def test_the_cpu_demo_estimate_is_the_one_number_everywhere() -> None:
    from tunewiz.engine.config import presets

    demo = presets.resolve("demo")[0]
    report = no_gpu_report()
    choice = rec.recommend(report).choices[0]
    # the demo data's longest example is 81 tokens (presets/datasets.toml, what the data check measures)
    assert choice.needed_bytes == rec.spec_choice(demo, report, 81).needed_bytes == \
        rec.estimate_spec(demo, False, 81).total
    # measured peak RSS of the demo preset on a 2-core CPU: 2.0-2.2 GiB before the fused LoRA blocks
    # (tests/data/runs), 1.74 GiB with them (`tunewiz train demo`, 2026-12-02: they keep no dropout copies)
    assert 1.55 * 2**30 <= choice.needed_bytes <= 1.95 * 2**30


def test_better_choice_only_for_the_recommenders_own_picks() -> None:
    report = gpu24_report()
    state = wizard.WizardState(spec=wizard.base_spec(), report=report)
    ranked = rec.recommend(report, 256).choices
    spec = ranked[3].apply(state.spec)
    state.choice = ranked[3]
    assert better_choice(state, spec, ranked) is ranked[0]
    assert better_choice(state, ranked[0].apply(state.spec), ranked) is None  # already the first
    state.extra_choices = [ranked[3]]  # typed in by the user: their call
    assert better_choice(state, spec, ranked) is None
    state.extra_choices, state.choice = [], None
    assert better_choice(state, spec, ranked) is None


@pytest.mark.asyncio
async def test_review_offers_the_first_choice_at_the_datas_length_and_r_switches(tmp_path: Path) -> None:
    app, fakes = make_app(gpu24_report(), tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await to_model_step(pilot)
        await pilot.press("down")  # the second choice (qwen2.5-3b), not the first
        await to_settings(pilot)
        assert app.state.spec.model.name == "qwen2.5-3b"
        await pilot.press("ctrl+n")
        await on_screen(pilot, ReviewScreen)
        await wait_until(pilot, lambda: "Advice:" in text_of(app.screen.query_one("#review-summary")), "the advice")
        summary = text_of(app.screen.query_one("#review-summary"))
        assert "with this data the first choice is llama-3.1-8b with QLoRA" in summary
        length = app.state.spec.training.max_seq_length
        await pilot.press("r")
        await wait_until(pilot, lambda: app.state.spec.model.name == "llama-3.1-8b", "the switch")
        spec = app.state.spec
        assert (spec.method, spec.dataset.preset, spec.training.max_seq_length) == ("qlora", "demo", length)
        assert app.screen.check_action("rerank", ()) is False


def test_the_model_step_states_the_mirror_and_its_licence() -> None:
    choice = rec.choice_for("llama-3.1-8b", gpu24_report())
    prompt = choice_prompt(choice, 1, gpu24_report())
    import io

    from rich.console import Console

    console = Console(width=300, file=io.StringIO(), color_system=None)
    console.print(prompt)
    text = console.file.getvalue()
    assert "llama-3.1-8b  LoRA" in text or "llama-3.1-8b  QLoRA" in text
    assert "Downloads unsloth/Llama-3.1-8B-Instruct" in text
    assert "Licence: Llama 3.1 Community License; the Llama licence still applies." in text
    assert "GiB" in text and " GB " not in text


# ---------------------------------------------------------------------------------------------
# Presets (issue 15, item 6)


def test_user_presets_never_shadow_builtins_and_can_be_renamed_and_deleted(capsys: pytest.CaptureFixture[str]) -> None:
    from tunewiz.engine import locations
    from tunewiz.engine.cli import main as cli
    from tunewiz.engine.config import presets
    from tunewiz.engine.config.spec import SpecError

    spec = presets.resolve("demo")[0]
    with pytest.raises(SpecError, match="'demo' is a built-in preset.*e.g. 'demo-2'"):
        presets.save_user_preset(spec, "demo")
    assert presets.free_name("demo") == "demo-2"
    presets.save_user_preset(spec, "mine")
    assert presets.resolve("mine")[0].name == "mine"  # its runs carry the preset's name
    assert cli.main(["presets", "mv", "mine", "ours"]) == 0
    assert presets.resolve("ours")[0].name == "ours" and presets.find_preset("mine") is None
    assert cli.main(["presets", "rm", "ours"]) == 0 and presets.find_preset("ours") is None
    assert cli.main(["presets", "rm", "demo"]) == 2
    assert "no user preset of this name (built-in presets cannot be changed)" in capsys.readouterr().err
    # an old user preset with a built-in's name, and a broken file: listed, said so
    (locations.user_presets_dir() / "demo.toml").write_text(presets.builtin_dir().joinpath("demo.toml").read_text())
    (locations.user_presets_dir() / "broken.toml").write_text("name = [unclosed\n")
    capsys.readouterr()
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "replaces the built-in of this name: `tunewiz train` runs this one" in out
    assert "broken" in out and "(cannot be used:" in out


def test_presets_save_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tunewiz.engine.cli import main as cli
    from tunewiz.engine.config import presets
    from tunewiz.engine.run import rundir

    spec = presets.resolve("demo")[0]
    run = rundir.create(spec)
    assert cli.main(["presets", "save", run.run_id, "headlines"]) == 0
    out = capsys.readouterr().out
    assert "run it with: " in out and "train headlines" in out
    assert presets.resolve("headlines")[0].name == "headlines"


@pytest.mark.asyncio
async def test_saved_presets_screen_survives_duplicates_and_broken_files(tmp_path: Path) -> None:
    from tunewiz.engine import locations
    from tunewiz.engine.config import presets
    from tunewiz.tui.dialogs import ConfirmDialog, MessageDialog, NameDialog
    from tunewiz.tui.screens.presets import PresetsScreen
    from tunewiz.tui.screens.welcome import WelcomeScreen

    folder = locations.user_presets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "demo.toml").write_text(presets.builtin_dir().joinpath("demo.toml").read_text())  # the old crash
    (folder / "broken.toml").write_text("name = [unclosed\n")
    presets.save_user_preset(presets.resolve("demo")[0], "mine")
    app, _fakes = make_app(no_gpu_report(), tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await on_screen(pilot, WelcomeScreen)
        await pilot.press("p")
        await on_screen(pilot, PresetsScreen)
        screen = app.screen
        assert [p.key for p in screen._listed] == ["built-in:concise", "built-in:demo", "user:broken", "user:demo",
                                                   "user:mine"]
        assert screen.check_action("delete", ()) is False  # a built-in
        await pilot.press("down", "down")  # broken: opening it says why
        await pilot.press("enter")
        await on_screen(pilot, MessageDialog)
        await pilot.press("escape")
        await on_screen(pilot, PresetsScreen)
        await pilot.press("down", "down", "m")  # mine: rename it
        await on_screen(pilot, NameDialog)
        await pilot.press(*["backspace"] * 10, *"ours", "enter")
        await on_screen(pilot, PresetsScreen)
        await wait_until(pilot, lambda: presets.find_preset("ours") is not None, "the rename")
        assert screen._highlighted().name == "ours"
        await pilot.press("d")
        await on_screen(pilot, ConfirmDialog)
        await pilot.press("enter")
        await on_screen(pilot, PresetsScreen)
        await wait_until(pilot, lambda: presets.find_preset("ours") is None, "the delete")
        await pilot.press("up")  # user:demo
        await pilot.press("enter")
        await on_screen(pilot, ReviewScreen)
        assert app.state.spec.name == "demo" and app.state.relaunch_of == "demo"


# ---------------------------------------------------------------------------------------------
# The same keys everywhere (item 13)


async def _to_dashboard_from_past_runs(pilot: Any, fakes: Any) -> None:
    from tests.test_tui_wizard import launch_from_review
    from tunewiz.tui.screens.dashboard import DashboardScreen
    from tunewiz.tui.screens.runs import RunsScreen

    await to_model_step(pilot)
    await to_review(pilot)
    await launch_from_review(pilot, fakes)
    await pilot.press("escape")  # back to the welcome screen
    await pilot.press("r")
    await on_screen(pilot, RunsScreen)
    await wait_until(pilot, lambda: len(pilot.app.screen.rows) == 1, "the list")
    await pilot.press("enter")
    await on_screen(pilot, DashboardScreen)


@pytest.mark.asyncio
async def test_detach_from_a_dashboard_opened_from_past_runs_returns_there(tmp_path: Path) -> None:
    from tunewiz.tui.screens.runs import RunsScreen

    app, fakes = make_app(no_gpu_report(), tmp_path, fixed_run_id="20260101-120000-demo-ab12")
    async with app.run_test(size=(100, 30)) as pilot:
        await _to_dashboard_from_past_runs(pilot, fakes)
        await pilot.press("d")
        await on_screen(pilot, RunsScreen)
        assert app.is_running


@pytest.mark.asyncio
async def test_q_quits_from_the_dashboard(tmp_path: Path) -> None:
    from tests.test_tui_wizard import launch_from_review

    app, fakes = make_app(no_gpu_report(), tmp_path, fixed_run_id="20260101-120000-demo-ab12")
    async with app.run_test(size=(100, 30)) as pilot:
        await to_model_step(pilot)
        await to_review(pilot)
        await launch_from_review(pilot, fakes)
        await pilot.press("q")
        await wait_until(pilot, lambda: app._exit, "the app to quit")


@pytest.mark.asyncio
async def test_q_types_in_a_text_field_and_ctrl_c_does_not_quit(tmp_path: Path) -> None:
    from textual.widgets import Input

    app, _fakes = make_app(gpu24_report(), tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await to_model_step(pilot)
        await pilot.press("o", "q")
        assert app.screen.query_one("#other", Input).value == "q" and not app._exit
        await pilot.press("ctrl+c")
        await pilot.pause(0.1)
        assert not app._exit


@pytest.mark.asyncio
async def test_help_lists_exactly_the_keys_of_the_screen_in_front(tmp_path: Path) -> None:
    from tunewiz.tui.dialogs import MessageDialog
    from tunewiz.tui.keys import keys_help

    app, fakes = make_app(no_gpu_report(), tmp_path, fixed_run_id="20260101-120000-demo-ab12")
    async with app.run_test(size=(100, 30)) as pilot:
        await to_model_step(pilot)
        await to_review(pilot)
        review = keys_help(app.screen).splitlines()
        assert review[0].startswith("esc ")
        assert any(line.startswith("l ") and line.endswith("Launch") for line in review)
        assert any(line.endswith("Save as preset") for line in review)
        assert any(line.startswith("^q q ") and "Quit" in line for line in review)
        assert not any("Rename" in line or "Stop" in line or "Use the advice" in line for line in review)
        import re

        starts = {re.match(r"^(.*?\S)\s{2,}\S", line).end() for line in review}
        assert len(starts) == 1, review  # the descriptions start in one column
        await pilot.press("question_mark")
        await on_screen(pilot, MessageDialog)
        await pilot.press("escape")
        await on_screen(pilot, ReviewScreen)
        await pilot.press("l")
        from tunewiz.tui.screens.dashboard import DashboardScreen

        await on_screen(pilot, DashboardScreen)
        dashboard = keys_help(app.screen)
        assert "Detach: leave it training" in dashboard and "Help" in dashboard
        assert "Launch" not in dashboard


@pytest.mark.asyncio
async def test_below_the_smallest_size_the_app_says_so(tmp_path: Path) -> None:
    from tunewiz.tui.app import TooSmallScreen
    from tunewiz.tui.screens.welcome import WelcomeScreen

    app, _fakes = make_app(no_gpu_report(), tmp_path)
    async with app.run_test(size=(50, 15)) as pilot:
        await on_screen(pilot, TooSmallScreen)
        assert "The terminal is 50×15; tunewiz needs at least 60×20." in text_of(app.screen.query_one("#too-small"))
        await pilot.resize_terminal(60, 20)
        await on_screen(pilot, WelcomeScreen)


# ---------------------------------------------------------------------------------------------
# Your own data (item 15)


def _support_csv(folder: Path) -> Path:
    path = folder / "support.csv"
    rows = [("Where is my order?", "It ships tomorrow; you will get a tracking link by email."),
            ("Can I get a refund?", "Yes, within 30 days: open Orders and press Refund."),
            ("How do I change my password?", "Open Settings, then Security, then Change password.")] * 4
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["customer_message", "agent_reply"])
        writer.writerows(rows)
    return path


@pytest.mark.asyncio
async def test_a_csv_with_its_own_column_names_is_mapped_in_the_app(tmp_path: Path) -> None:
    from textual.widgets import Input, Select

    from tunewiz.tui.screens.dataset import DatasetScreen

    csv_path = _support_csv(tmp_path)
    app, _fakes = make_app(no_gpu_report(), tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await to_model_step(pilot)
        await pilot.press("enter")
        await on_screen(pilot, DatasetScreen)
        await pilot.press("end", "enter")  # Your own data...
        about = text_of(app.screen.query_one("#data-about"))
        assert "alpaca: instruction, output (optional: input, system)" in about
        await pilot.press(*str(csv_path), "enter")
        screen = app.screen
        await wait_until(pilot, lambda: screen.query_one("#col-output", Input).value == "agent_reply", "the guess")
        assert screen.query_one("#col-instruction", Input).value == "customer_message"
        assert screen.query_one("#format", Select).value == "alpaca"
        spec = screen.candidate_spec()
    assert spec.dataset.columns == {"instruction": "customer_message", "output": "agent_reply"}
    assert (spec.dataset.source, spec.dataset.format) == (str(csv_path), "alpaca")


def test_that_mapping_trains(tmp_path: Path, demo_tokenizer: Any) -> None:
    from tunewiz.engine.config import presets
    from tunewiz.engine.config import spec as spec_mod
    from tunewiz.engine.data.prepare import prepare

    csv_path = _support_csv(tmp_path)
    spec = presets.resolve("demo", [f"dataset.source={csv_path}", "dataset.preset=", "dataset.format=alpaca",
                                    'dataset.columns={instruction = "customer_message", output = "agent_reply"}'])[0]
    assert spec_mod.loads(spec_mod.dumps(spec)) == spec
    stats = prepare(spec, demo_tokenizer).stats
    assert stats["train_examples"] + stats.get("eval_examples", 0) == 12 and stats["dropped_total"] == 0


def test_the_demo_states_its_measured_time() -> None:
    from tunewiz.engine.config import presets

    # measured 2026-12-02: 72 steps in 14m36s of training time on this project's shared 2-core CPU (docs/tui.md)
    assert "15 minutes measured on a shared 2-core CPU" in presets.resolve("demo")[0].description
