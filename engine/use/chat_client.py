"""The client side of the chat process (engine/use/chat_server.py): start it, send requests, read replies.

Torch-free, so the app and `tunewiz chat` stay light: the model lives in the child process. The
child's stderr (library warnings, tracebacks) goes to `chat.log` in the run directory.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tunewiz.engine.errors import TunewizError

LOG_NAME = "chat.log"


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick tokens, as the user edits them. Temperature 0 is greedy: the same answer every time."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def check(self) -> None:
        if not 0 <= self.temperature <= 5:
            raise TunewizError(f"temperature {self.temperature:g} is out of range", hint="use 0 (greedy) to 5")
        if not 0 < self.top_p <= 1:
            raise TunewizError(f"top-p {self.top_p:g} is out of range", hint="use a value above 0 and at most 1")
        if not 1 <= self.max_new_tokens <= 32768:
            raise TunewizError(f"max new tokens {self.max_new_tokens} is out of range", hint="use 1 to 32768")

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed}

    def describe(self) -> str:
        mode = "greedy" if self.temperature == 0 else f"temperature {self.temperature:g}, top-p {self.top_p:g}"
        return f"{mode}, up to {self.max_new_tokens} new tokens"


class Conversation:
    """The messages so far, one history per side: the base model and the tuned one each see their own answers."""

    def __init__(self) -> None:
        self.history: dict[bool, list[dict[str, str]]] = {True: [], False: []}

    def ask(self, adapter: bool, text: str) -> list[dict[str, str]]:
        """The messages to send for a new user message to one side."""
        return [*self.history[adapter], {"role": "user", "content": text}]

    def answered(self, adapter: bool, messages: list[dict[str, str]], answer: str, finish: str | None) -> None:
        """Keep a finished answer; a cancelled one is dropped with its question."""
        if finish != "cancelled":
            self.history[adapter] = [*messages, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.history = {True: [], False: []}


def stats_line(stats: dict[str, Any]) -> str:
    """How an answer went, in a few words."""
    parts = []
    if stats.get("first_token_s") is not None:
        parts.append(f"first token {stats['first_token_s']:.2f} s")
    if stats.get("tokens_per_s"):
        parts.append(f"{stats['tokens_per_s']:.1f} tok/s")
    tokens = stats.get("tokens", 0)
    parts.append(f"{tokens} token{'' if tokens == 1 else 's'}")
    if stats.get("finish") == "length":
        parts.append("cut at max new tokens")
    elif stats.get("finish") == "cancelled":
        parts.append("stopped")
    return " · ".join(parts)


@dataclass
class Reply:
    """What the server said, parsed: `type` is loading, ready, token, done or error."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str | None:
        return self.data.get("id")


class ChatClient:
    """One chat process for one run (and checkpoint)."""

    def __init__(self, run_path: Path, checkpoint: int | None = None, python: str = sys.executable,
                 env: dict[str, str] | None = None) -> None:
        self.run_path = run_path
        self.checkpoint = checkpoint
        self.python = python
        self.env = env
        self.process: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] | None = None
        self._ids = itertools.count(1)
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.run_path / LOG_NAME

    def start(self) -> None:
        command = [self.python, "-m", "tunewiz.engine.use.chat_server", str(self.run_path)]
        if self.checkpoint is not None:
            command += ["--checkpoint", str(self.checkpoint)]
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                        text=True, encoding="utf-8", bufsize=1, env=self.env)

    def replies(self) -> Iterator[Reply]:
        """Every reply line until the process ends (blocking)."""
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # not ours: the server sends only JSON lines on stdout
            if isinstance(obj, dict) and isinstance(obj.get("type"), str):
                reply = Reply(obj.pop("type"), obj)
                if reply.type == "ready":
                    self.ready = reply.data
                yield reply

    def wait_ready(self, on_loading: Any = None) -> dict[str, Any]:
        """Read until the model is loaded; raise TunewizError with the reason if it cannot be."""
        for reply in self.replies():
            if reply.type == "ready":
                return reply.data
            if reply.type == "loading" and on_loading:
                on_loading(reply.data.get("message", ""))
            if reply.type == "error" and reply.data.get("fatal"):
                self.close()
                raise TunewizError(reply.data.get("message", "the chat process failed"), hint=reply.data.get("hint"))
        raise TunewizError("the chat process ended before the model was loaded",
                           hint=f"its output is in {self.log_path}:\n{self.log_tail()}")

    def generate(self, messages: list[dict[str, str]], adapter: bool = True,
                 settings: SamplingSettings | None = None) -> str:
        """Send a request; the answer streams back as `token` replies and ends with `done` (or `error`)."""
        request_id = str(next(self._ids))
        self._send({"op": "generate", "id": request_id, "messages": messages, "adapter": adapter,
                    "settings": (settings or SamplingSettings()).as_dict()})
        return request_id

    def cancel(self, request_id: str) -> None:
        self._send({"op": "cancel", "id": request_id})

    def _send(self, obj: dict[str, Any]) -> None:
        if self.process is None or self.process.stdin is None or self.process.poll() is not None:
            raise TunewizError("the chat process is not running", hint=f"see {self.log_path}")
        try:
            self.process.stdin.write(json.dumps(obj) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise TunewizError("the chat process ended", hint=f"see {self.log_path}") from exc

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self, timeout: float = 10.0) -> None:
        """Ask the process to quit; kill it if it does not."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            try:
                self._send({"op": "quit"})
                if process.stdin:
                    process.stdin.close()
                process.wait(timeout)
            except (TunewizError, subprocess.TimeoutExpired, OSError):
                process.kill()
                process.wait()
        if self._log:
            self._log.close()
            self._log = None
