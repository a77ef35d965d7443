"""The Chat screen and the dashboard's next steps, driven with Pilot and a stand-in chat process.

The stand-in speaks the chat protocol (engine/use/chat_server.py) from a thread: tests of the real process
are in tests/test_engine_cpu.py. Snapshots at 80x24; update after an intended change with
`pytest tests/test_tui_chat.py -k snapshot --snapshot-update` and look at the SVGs first.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, OptionList

from tests.test_tui_dashboard import FIXED, make_services, place, shown, text_of, wait_until
from tunewiz.engine.run import rundir
from tunewiz.engine.use.chat_client import Reply, SamplingSettings
from tunewiz.tui.app import TunewizApp
from tunewiz.tui.dialogs import ChoiceDialog, MessageDialog, SamplingDialog
from tunewiz.tui.screens.chat import ChatScreen
from tunewiz.tui.screens.dashboard import DashboardScreen
from tunewiz.tui.screens.runs import RunsScreen

pytestmark = [pytest.mark.usefixtures("plain_hints"), pytest.mark.timeout(120)]

ANSWERS = {True: "positive", False: "This headline is about a company that is doing well."}


class FakeChatClient:
    """Answers word by word, `step_s` apart; the tuned side says ANSWERS[True], the base side ANSWERS[False]."""

    def __init__(self, step_s: float = 0.0, fail: str | None = None) -> None:
        self.step_s = step_s
        self.fail = fail
        self.out: queue.Queue[Reply | None] = queue.Queue()
        self.requests: list[tuple[str, list[dict[str, str]], bool, SamplingSettings]] = []
        self.cancelled: set[str] = set()
        self.closed = False
        self.log_path = Path("/nonexistent/chat.log")
        self._ids = 0

    def start(self) -> None:
        self.out.put(Reply("loading", {"message": "loading smollm2-135m-demo on cpu"}))
        if self.fail:
            self.out.put(Reply("error", {"id": None, "message": self.fail, "hint": "resume the run", "fatal": True}))
            self.out.put(None)
            return
        self.out.put(Reply("ready", {"run_id": "r", "model": "demo", "checkpoint": None, "device": "cpu",
                                     "system_prompt": None, "context_length": 8192, "notes": []}))

    def replies(self) -> Any:
        while (reply := self.out.get()) is not None:
            yield reply

    def generate(self, messages: list[dict[str, str]], adapter: bool = True,
                 settings: SamplingSettings | None = None) -> str:
        self._ids += 1
        request_id = str(self._ids)
        self.requests.append((request_id, messages, adapter, settings or SamplingSettings()))
        threading.Thread(target=self._answer, args=(request_id, adapter), daemon=True).start()
        return request_id

    def _answer(self, request_id: str, adapter: bool) -> None:
        words = ANSWERS[adapter].split()
        sent: list[str] = []
        for word in words * (50 if self.step_s else 1):
            if request_id in self.cancelled:
                self.out.put(Reply("done", {"id": request_id, "text": " ".join(sent),
                                            "stats": {"tokens": len(sent), "finish": "cancelled"}}))
                return
            self.out.put(Reply("token", {"id": request_id, "text": (" " if sent else "") + word}))
            sent.append(word)
            time.sleep(self.step_s)
        self.out.put(Reply("done", {"id": request_id, "text": " ".join(sent), "stats": {
            "tokens": len(sent), "first_token_s": 0.25, "tokens_per_s": 12.5, "finish": "stop"}}))

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    def log_tail(self) -> str:
        return ""

    def close(self, timeout: float = 10.0) -> None:
        self.closed = True
        self.out.put(None)


def chat_app(root: Path, state: str = "completed", client: FakeChatClient | None = None
             ) -> tuple[TunewizApp, FakeChatClient, Any]:
    placed = place(root, state)
    services, _ = make_services(placed.root, 1795817700.0)
    fake = client or FakeChatClient()
    services.chat = lambda run, checkpoint: fake
    return TunewizApp(services, attach=placed.runs[state]), fake, placed


async def open_chat(pilot: Any, key: str = "c") -> ChatScreen:
    await shown(pilot, None)
    await pilot.press(key)
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen) and pilot.app.screen.ready is not None,
                     "the chat screen, ready")
    return pilot.app.screen


async def send(pilot: Any, text: str) -> None:
    pilot.app.screen.query_one("#chat-input", Input).value = text
    await pilot.press("enter")


def transcript(screen: ChatScreen) -> str:
    return "\n".join(text_of(widget) for widget in screen.query("#chat-log Static"))


@pytest.mark.asyncio
async def test_chat_streams_the_answer_and_shows_its_speed(tmp_path: Path) -> None:
    app, fake, _ = chat_app(tmp_path / "runs")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_chat(pilot)
        assert "tuned model" in text_of(screen.query_one("#chat-status")) and "greedy" in text_of(
            screen.query_one("#chat-status"))
        await send(pilot, "Headline: Acme wins a contract")
        await wait_until(pilot, lambda: not screen.busy, "the answer")
        shown_text = transcript(screen)
        assert "you: Headline: Acme wins a contract" in shown_text
        assert "tuned: positive" in shown_text and "first token 0.25 s · 12.5 tok/s · 1 token" in shown_text
        assert fake.requests[0][2] is True and fake.requests[0][3] == SamplingSettings()
        await send(pilot, "And why?")  # the conversation goes on with the first answer in it
        await wait_until(pilot, lambda: len(fake.requests) == 2 and not screen.busy, "the second answer")
        assert [m["content"] for m in fake.requests[1][1]] == ["Headline: Acme wins a contract", "positive",
                                                               "And why?"]
        await pilot.press("ctrl+r")
        await send(pilot, "Hello")
        await wait_until(pilot, lambda: len(fake.requests) == 3 and not screen.busy, "a new conversation")
        assert [m["content"] for m in fake.requests[2][1]] == ["Hello"]
        await pilot.press("escape")  # idle: back to the dashboard, and the chat process is told to quit
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, DashboardScreen), "the dashboard")
        assert fake.closed


@pytest.mark.asyncio
async def test_compare_answers_with_the_base_and_the_tuned_model_side_by_side(tmp_path: Path) -> None:
    app, fake, _ = chat_app(tmp_path / "runs")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_chat(pilot, "b")
        assert screen.compare and "base | tuned" in text_of(screen.query_one("#chat-status"))
        await send(pilot, "Headline: Acme wins a contract")
        await wait_until(pilot, lambda: not screen.busy and len(fake.requests) == 2, "both answers")
        assert [r[2] for r in fake.requests] == [False, True]
        pair = screen.query_one(".chat-pair")
        texts = [text_of(w) for w in pair.query("Static")]
        assert texts[0].startswith("base: This headline") and texts[1].startswith("tuned: positive")
        await pilot.press("ctrl+b")
        assert not screen.compare


@pytest.mark.asyncio
async def test_esc_stops_an_answer_and_the_app_stays_responsive(tmp_path: Path) -> None:
    app, fake, _ = chat_app(tmp_path / "runs", client=FakeChatClient(step_s=0.05))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_chat(pilot)
        await send(pilot, "Tell me a long story")
        await wait_until(pilot, lambda: "tuned: positive positive" in transcript(screen), "streaming")
        assert screen.busy
        await send(pilot, "another")  # refused while answering, without losing what was typed
        assert screen.query_one("#chat-input", Input).value == "another" and len(fake.requests) == 1
        await pilot.press("escape")
        await wait_until(pilot, lambda: not screen.busy, "the cancelled answer")
        assert fake.cancelled == {"1"} and isinstance(pilot.app.screen, ChatScreen)
        assert "stopped" in transcript(screen)


@pytest.mark.asyncio
async def test_sampling_settings_are_edited_and_checked(tmp_path: Path) -> None:
    app, fake, _ = chat_app(tmp_path / "runs")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_chat(pilot)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, SamplingDialog), "the settings dialog")
        dialog = pilot.app.screen
        dialog.query_one("#s-temperature", Input).value = "9"
        dialog.query_one("#s-temperature", Input).focus()
        await pilot.press("enter")
        assert "temperature 9 is out of range" in text_of(dialog.query_one("#s-error"))
        dialog.query_one("#s-temperature", Input).value = "0.7"
        dialog.query_one("#s-max_new_tokens", Input).value = "64"
        await pilot.press("enter")
        await wait_until(pilot, lambda: pilot.app.screen is screen, "the chat again")
        assert screen.settings == SamplingSettings(temperature=0.7, top_p=1.0, max_new_tokens=64)
        assert "temperature 0.7" in text_of(screen.query_one("#chat-status"))
        await send(pilot, "hi")
        await wait_until(pilot, lambda: fake.requests, "a request")
        assert fake.requests[0][3].temperature == 0.7


@pytest.mark.asyncio
async def test_any_checkpoint_can_be_chosen(tmp_path: Path) -> None:
    app, _, placed = chat_app(tmp_path / "runs")
    output = placed.runs["completed"].output_dir()
    for step in (12, 24):
        (output / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (output / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        rundir.seal_checkpoint(output / "checkpoints" / f"checkpoint-{step}")
    asked: list[int | None] = []

    def chat(run: Any, checkpoint: int | None) -> FakeChatClient:
        asked.append(checkpoint)
        return FakeChatClient()

    app.services.chat = chat
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await open_chat(pilot)
        await send(pilot, "hello")
        await wait_until(pilot, lambda: not screen.busy and screen.answers, "an answer")
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChoiceDialog), "the checkpoint choice")
        labels = [str(o.prompt) for o in pilot.app.screen.query_one(OptionList).options]
        assert labels == ["the final adapter", "checkpoint 12", "checkpoint 24"]
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: pilot.app.screen is screen and screen.ready is not None, "the new model")
        assert asked == [None, 12] and not screen.answers and not screen.conversation.history[True]
        assert "checkpoint 12" in text_of(screen.query_one("#chat-title"))


@pytest.mark.asyncio
async def test_a_model_that_cannot_load_is_explained(tmp_path: Path) -> None:
    app, _, _ = chat_app(tmp_path / "runs", client=FakeChatClient(fail="run r has no trained adapter yet"))
    async with app.run_test(size=(80, 24)) as pilot:
        await shown(pilot, None)
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, MessageDialog), "the error dialog")
        assert pilot.app.screen.message == "run r has no trained adapter yet"
        assert pilot.app.screen.hint == "resume the run"


@pytest.mark.asyncio
async def test_chat_is_offered_only_where_there_is_an_adapter(tmp_path: Path) -> None:
    placed = place(tmp_path / "runs", "completed", "cancelled", "dead")
    services, _ = make_services(placed.root, 1795817700.0)
    services.chat = lambda run, checkpoint: FakeChatClient()
    for state, offered in (("completed", True), ("cancelled", True), ("dead", False)):
        app = TunewizApp(services, attach=placed.runs[state])
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await shown(pilot, state)
            assert bool(screen.check_action("chat", ())) is offered, state
            assert bool(screen.check_action("evaluate", ())) is (state == "completed")
            if state == "completed":
                alert = text_of(screen.query_one("#run-alert"))
                assert "c chat with your model" in alert and "v evaluate" in alert and "GGUF" in alert
            if state == "cancelled":
                assert "c chats with that checkpoint" in text_of(screen.query_one("#run-alert"))


@pytest.mark.asyncio
async def test_chat_from_past_runs(tmp_path: Path) -> None:
    placed = place(tmp_path / "runs", "completed", "dead")
    services, _ = make_services(placed.root, 1795817700.0)
    services.chat = lambda run, checkpoint: FakeChatClient()
    app = TunewizApp(services)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.2)
        await pilot.app.workers.wait_for_complete()
        pilot.app.push_screen(RunsScreen())
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, RunsScreen) and pilot.app.screen.rows, "runs")
        runs_screen = pilot.app.screen
        assert runs_screen.selected_row()["state"] == "dead"  # newest first
        await pilot.press("c")
        await pilot.pause(0.1)
        assert pilot.app.screen is runs_screen  # nothing to chat with: a note, no screen
        await pilot.press("down", "c")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ChatScreen), "the chat screen")
        assert pilot.app.screen.run.run_id == placed.runs["completed"].run_id


@pytest.mark.asyncio
async def test_evaluate_runs_in_a_worker_and_shows_before_and_after(tmp_path: Path) -> None:
    app, _, placed = chat_app(tmp_path / "runs")
    summary = {"task": "label", "headline": "normalised", "examples": 40,
               "base": {"exact": 0.05, "normalised": 0.1, "f1": 0.2, "loss": 3.0},
               "tuned": {"exact": 0.9, "normalised": 0.93, "f1": 0.93, "loss": 0.1},
               "summary": ["before/after on 40 examples", "normalised match    0.10    0.93"]}
    progress_seen = threading.Event()

    def evaluate(run: Any, on_progress: Any) -> dict[str, Any]:
        on_progress("tuned model: answering 10/40")
        progress_seen.wait(5)
        return summary

    app.services.evaluate = evaluate
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await shown(pilot, "completed")
        await pilot.press("v")
        await wait_until(pilot, lambda: "answering 10/40" in text_of(screen.query_one("#run-alert")), "progress")
        assert not screen.check_action("evaluate", ())  # one evaluation at a time
        progress_seen.set()
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, MessageDialog), "the summary")
        assert "normalised match    0.10    0.93" in pilot.app.screen.message
        await pilot.press("enter")
        assert "match 0.10 → 0.93 on 40 held-out examples" in text_of(screen.query_one("#run-alert"))


# ---------------------------------------------------------------------------------------------
# Snapshots


def _chat_case(key: str) -> Any:
    async def steps(pilot: Any) -> None:
        screen = await open_chat(pilot, key)
        await send(pilot, "Headline: Quorvia Pharma wins approval for its new drug. Positive or negative?")
        await wait_until(pilot, lambda: not screen.busy and screen.answers, "the answer")
        pilot.app.clear_notifications()
        await pilot.pause(0.2)

    return steps


@pytest.mark.parametrize("case", ["chat", "compare"])
def test_snapshot(snap_compare: Any, case: str) -> None:
    app, _, _ = chat_app(FIXED / "chat-runs")
    assert snap_compare(app, terminal_size=(80, 24), run_before=_chat_case("c" if case == "chat" else "b"))
