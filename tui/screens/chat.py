"""Talk to a run's tuned model, or compare it with the base model side by side.

The model lives in a chat process (engine/use/chat_server.py) that the services start; a worker reads
its replies and posts them as messages, and the handlers here change the transcript. The screen
stays responsive while the model loads and answers; Esc stops an answer, and leaves when idle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Footer, Input, Static
from textual.worker import Worker, get_current_worker

from tunewiz.engine.use.chat_client import Conversation, SamplingSettings, stats_line
from tunewiz.tui.messages import ChatReply
from tunewiz.tui.screens.base import TunewizScreen

SIDES = {False: "base", True: "tuned"}


@dataclass
class Answer:
    """One side's answer to one message, as it streams in."""

    adapter: bool
    messages: list[dict[str, str]]
    text: str = ""
    stats: dict[str, Any] | None = None
    error: str | None = None
    widget: Static | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.stats is not None or self.error is not None

    def renderable(self) -> Text:
        label = Text(f"{SIDES[self.adapter]}: ", style="bold magenta" if self.adapter else "bold cyan")
        out = Text.assemble(label, self.text.strip() or ("…" if not self.done else "(empty)"))
        if self.error:
            out.append(f"\n{self.error}", style="red")
        elif self.stats is not None:
            out.append(f"\n{stats_line(self.stats)}", style="dim")
        return out


class ChatScreen(TunewizScreen):
    """A conversation with the run's model; ctrl+b answers with the base model too, side by side."""

    DEFAULT_CSS = """
    ChatScreen { layout: vertical; }
    ChatScreen #chat-title, ChatScreen #chat-status { height: 1; padding: 0 1; text-wrap: nowrap;
        text-overflow: ellipsis; }
    ChatScreen #chat-log { height: 1fr; padding: 0 1; }
    ChatScreen .chat-user { margin-top: 1; color: $text; text-style: bold; }
    ChatScreen .chat-pair { height: auto; }
    ChatScreen .chat-pair > Static { width: 1fr; padding-right: 1; }
    ChatScreen #chat-input { margin: 0 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "escape", "Back/stop"),
        Binding("ctrl+b", "compare", "Compare"),
        Binding("ctrl+r", "new_chat", "New chat"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+o", "checkpoint", "Checkpoint"),
    ]

    def __init__(self, run: Any, checkpoint: int | None = None, compare: bool = False) -> None:
        super().__init__()
        self.run = run
        self.checkpoint = checkpoint
        self.compare = compare
        self.settings = SamplingSettings()
        self.conversation = Conversation()
        self.client: Any = None
        self.ready: dict[str, Any] | None = None
        self.failed: str | None = None
        self.pending: dict[str, Answer] = {}
        """Answers still streaming, by request id."""
        self.answers: list[Answer] = []

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def _title(self) -> Text:
        which = f"checkpoint {self.checkpoint}" if self.checkpoint else "final adapter"
        if self.ready is not None and self.ready.get("checkpoint") and not self.checkpoint:
            which = f"checkpoint {self.ready['checkpoint']} (the newest)"
        return Text.assemble(("Chat ", "bold"), f"· run {self.run.run_id} · {which}")

    def compose(self) -> ComposeResult:
        yield Static(self._title(), id="chat-title")
        yield Static(Text("starting the model…", style="yellow"), id="chat-status")
        yield VerticalScroll(id="chat-log")
        yield Input(placeholder="Type a message, Enter sends", id="chat-input", disabled=True)
        yield Footer(show_command_palette=False)

    def on_mount(self) -> None:
        self.converse()

    def on_unmount(self) -> None:
        if self.client is not None:
            self.client.close(timeout=2.0)

    # ------------------------------------------------------------------ the chat process

    @work(thread=True, exclusive=True, group="chat", exit_on_error=False)
    def converse(self) -> None:
        """Start the chat process and pass on everything it says until it ends."""
        worker = get_current_worker()
        client = self.tw.services.chat(self.run, self.checkpoint)
        self.client = client
        client.start()
        for reply in client.replies():
            if worker.is_cancelled:
                break
            self.post_message(ChatReply(reply.type, reply.data))
        else:
            if not worker.is_cancelled:
                self.post_message(ChatReply("ended", {"log": client.log_tail()}))

    @on(ChatReply)
    def _reply(self, message: ChatReply) -> None:
        data = message.data
        if message.type == "loading":
            self._status(Text(str(data.get("message", "")), style="yellow"))
        elif message.type == "ready":
            self.ready = data
            self.query_one("#chat-title", Static).update(self._title())
            self.query_one("#chat-input", Input).disabled = False
            self.query_one("#chat-input", Input).focus()
            self._status_ready()
            for note in data.get("notes", []):
                self.notify(note, timeout=10)
        elif message.type == "token":
            answer = self.pending.get(str(data.get("id")))
            if answer is not None:
                answer.text += str(data.get("text", ""))
                self._draw(answer)
        elif message.type == "done":
            answer = self.pending.pop(str(data.get("id")), None)
            if answer is not None:
                answer.text = str(data.get("text", answer.text))
                answer.stats = dict(data.get("stats") or {})
                self.conversation.answered(answer.adapter, answer.messages, answer.text, answer.stats.get("finish"))
                self._draw(answer)
                self._status_ready()
        elif message.type == "error":
            self._error(data)
        elif message.type == "ended" and self.failed is None:
            self._failed("the chat process ended", f"see {self.run.path / 'chat.log'}")

    def _error(self, data: dict[str, Any]) -> None:
        request_id = data.get("id")
        text = str(data.get("message", "error")) + (f" — {data['hint']}" if data.get("hint") else "")
        if data.get("fatal"):
            self._failed(str(data.get("message", "error")), data.get("hint"))
            return
        answer = self.pending.pop(str(request_id), None) if request_id is not None else None
        if answer is None:
            self.notify(text, severity="error", timeout=10)
            return
        answer.error = text
        self._draw(answer)
        self._status_ready()

    def _failed(self, message: str, hint: str | None) -> None:
        self.failed = message
        self.query_one("#chat-input", Input).disabled = True
        self._status(Text(f"the model could not be loaded: {message}", style="bold red"))
        self.tw.show_error("Could not start the chat", message, hint)

    # ------------------------------------------------------------------ drawing

    def _status(self, text: Text) -> None:
        self.query_one("#chat-status", Static).update(text)

    def _status_ready(self) -> None:
        if self.ready is None:
            return
        mode = "base | tuned side by side" if self.compare else "tuned model"
        busy = "answering… (esc stops)" if self.busy else f"{self.ready.get('device')}"
        self._status(Text.assemble((f"{mode}", "bold"), f" · {self.settings.describe()} · {busy}"))

    def _draw(self, answer: Answer) -> None:
        if answer.widget is not None:
            answer.widget.update(answer.renderable())
            self.query_one("#chat-log", VerticalScroll).scroll_end(animate=False)

    def _ask(self, text: str) -> None:
        log = self.query_one("#chat-log", VerticalScroll)
        log.mount(Static(Text.assemble(("you: ", "bold green"), text), classes="chat-user"))
        sides = [False, True] if self.compare else [True]
        new = []
        for adapter in sides:
            messages = self.conversation.ask(adapter, text)
            answer = Answer(adapter, messages)
            answer.widget = Static(answer.renderable())
            new.append(answer)
        widgets = [answer.widget for answer in new if answer.widget is not None]
        log.mount(Horizontal(*widgets, classes="chat-pair") if self.compare else widgets[0])
        for answer in new:
            request_id = self.client.generate(answer.messages, answer.adapter, self.settings)
            self.pending[request_id] = answer
            self.answers.append(answer)
        log.scroll_end(animate=False)
        self._status_ready()

    # ------------------------------------------------------------------ keys

    @on(Input.Submitted, "#chat-input")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.ready is None:
            return
        if self.busy:
            self.notify("Wait for the answer, or press Esc to stop it.")
            return
        event.input.value = ""
        self._ask(text)

    def action_escape(self) -> None:
        if self.busy and self.client is not None:
            for request_id in list(self.pending):
                self.client.cancel(request_id)
            self._status(Text("stopping the answer…", style="yellow"))
            return
        self.app.pop_screen()

    def action_compare(self) -> None:
        self.compare = not self.compare
        self.notify("Each message is answered by the base model and the tuned one." if self.compare
                    else "Only the tuned model answers.")
        self._status_ready()

    def action_new_chat(self) -> None:
        if self.busy:
            self.notify("Wait for the answer, or press Esc to stop it.")
            return
        self.conversation.reset()
        self.answers.clear()
        self.query_one("#chat-log", VerticalScroll).remove_children()
        self.notify("New conversation.")

    def action_settings(self) -> None:
        from tunewiz.tui.dialogs import SamplingDialog

        def chosen(settings: SamplingSettings | None) -> None:
            if settings is not None:
                self.settings = settings
                self._status_ready()

        self.app.push_screen(SamplingDialog(self.settings), chosen)

    def action_checkpoint(self) -> None:
        """Chat with another checkpoint of the run: a new chat process loads it."""
        from tunewiz.engine.run.rundir import checkpoint_steps
        from tunewiz.tui.dialogs import ChoiceDialog

        if self.busy:
            self.notify("Wait for the answer, or press Esc to stop it.")
            return
        steps = sorted(checkpoint_steps(self.run.output_dir()))
        final = (self.run.output_dir() / "adapter" / "adapter_config.json").exists()
        options = ([("final", "the final adapter")] if final else []) + [(str(s), f"checkpoint {s}") for s in steps]
        if len(options) < 2:
            self.notify("This run has no other checkpoint to chat with.")
            return

        def chosen(value: str | None) -> None:
            if value is None:
                return
            checkpoint = None if value == "final" else int(value)
            if checkpoint == self.checkpoint:
                return
            self.checkpoint = checkpoint
            self._restart()

        self.app.push_screen(ChoiceDialog("Chat with which checkpoint?", options), chosen)

    def _restart(self) -> None:
        """Drop the conversation and the chat process; start one for `self.checkpoint`."""
        self.workers.cancel_group(self, "chat")  # first: the old reader must not report its process's end
        if self.client is not None:
            self.client.close(timeout=2.0)
        self.client, self.ready, self.failed = None, None, None
        self.pending.clear()
        self.answers.clear()
        self.conversation.reset()
        self.query_one("#chat-log", VerticalScroll).remove_children()
        self.query_one("#chat-input", Input).disabled = True
        self.query_one("#chat-title", Static).update(self._title())
        self._status(Text("starting the model…", style="yellow"))
        self.converse()

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        self.tw.report_worker_error(event)

