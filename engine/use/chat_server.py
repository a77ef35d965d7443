"""The chat process: loads a run's model once and answers requests over JSON lines on stdin/stdout.

`tunewiz chat` and the app's Chat screen start it (engine/use/chat_client.py), so neither imports torch.
docs/run-protocol.md ("The chat protocol") describes the messages; in short:

  client -> server  {"op": "generate", "id": "1", "messages": [...], "adapter": true, "settings": {...}}
                    {"op": "cancel", "id": "1"}          {"op": "quit"}
  server -> client  {"type": "loading", "message": ...}  {"type": "ready", "model": ..., ...}
                    {"type": "token", "id": "1", "text": "piece"}
                    {"type": "done", "id": "1", "text": "whole answer", "stats": {...}}
                    {"type": "error", "id": "1" or null, "message": ..., "hint": ..., "fatal": false}

Requests are answered one at a time, in order; a cancel ends the generation it names at the next
token (or drops it if it has not started). Anything else the libraries print goes to stderr, so
stdout carries protocol lines only.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

from tunewiz.engine.errors import TunewizError, hint_for
from tunewiz.engine.use.chat_client import SamplingSettings

PROTOCOL_VERSION = 1


class Channel:
    """Writes whole protocol lines to the real stdout, from any thread."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def send(self, type_: str, **fields: Any) -> None:
        line = json.dumps({"type": type_, **fields}, ensure_ascii=False)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class Requests:
    """Reads requests from stdin in a thread; cancels are applied at once, the rest queued."""

    def __init__(self, stream: IO[str], channel: Channel) -> None:
        self.stream = stream
        self.channel = channel
        self.pending: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancelled: set[str] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True, name="chat-requests").start()

    def _read(self) -> None:
        for line in self.stream:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                    raise ValueError("a request is a JSON object with an \"op\"")
            except ValueError as exc:
                self.channel.send("error", id=None, message=f"bad request line: {exc}", hint=None, fatal=False)
                continue
            if request["op"] == "cancel":
                with self.lock:
                    self.cancelled.add(str(request.get("id")))
            else:
                self.pending.put(request)
        self.pending.put(None)  # stdin closed: the client is gone

    def is_cancelled(self, request_id: str) -> bool:
        with self.lock:
            return request_id in self.cancelled


def _settings(raw: Any) -> SamplingSettings:
    if raw is None:
        return SamplingSettings()
    if not isinstance(raw, dict):
        raise TunewizError("settings must be an object")
    known = {"temperature", "top_p", "max_new_tokens", "seed"}
    unknown = set(raw) - known
    if unknown:
        raise TunewizError(f"unknown settings {sorted(unknown)}", hint=f"known: {', '.join(sorted(known))}")
    try:
        values: dict[str, Any] = {k: (int(v) if k in ("max_new_tokens", "seed") else float(v))
                                  for k, v in raw.items()}
        settings = SamplingSettings(**values)
    except (TypeError, ValueError) as exc:
        raise TunewizError(f"bad settings value: {exc}") from exc
    settings.check()
    return settings


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise TunewizError("messages must be a non-empty list of {role, content} objects")
    out = []
    for item in raw:
        if (not isinstance(item, dict) or item.get("role") not in ("system", "user", "assistant")
                or not isinstance(item.get("content"), str)):
            raise TunewizError(f"bad message {item!r}", hint="each message is {\"role\": system|user|assistant, "
                                                               "\"content\": text}")
        out.append({"role": item["role"], "content": item["content"]})
    if out[-1]["role"] != "user":
        raise TunewizError("the last message must be the user's")
    return out


def _load(run: Any, checkpoint: int | None, on_progress: Callable[[str], None]) -> Any:
    from tunewiz.engine.use.inference import RunModel

    return RunModel(run, checkpoint, on_progress=on_progress)


def serve(run_path: str, checkpoint: int | None, channel: Channel, stdin: IO[str],
          load: Callable[[Any, int | None, Callable[[str], None]], Any] = _load) -> int:
    """Load the model (`load` returns a tunewiz.engine.use.inference.RunModel), then answer requests until told
    to quit."""
    from tunewiz.engine.run import rundir

    try:
        run = rundir.find(run_path)
        loaded = load(run, checkpoint, lambda msg: channel.send("loading", message=msg))
    except Exception as exc:  # noqa: BLE001 - every failure to load is reported, then the process ends
        channel.send("error", id=None, message=str(exc) or type(exc).__name__, hint=hint_for(exc), fatal=True)
        return 1
    channel.send("ready", protocol=PROTOCOL_VERSION, run_id=run.run_id, model=loaded.label,
                 checkpoint=loaded.checkpoint, device=loaded.device, system_prompt=loaded.system_prompt,
                 context_length=loaded.context_length, notes=loaded.notes)
    requests = Requests(stdin, channel)
    while (request := requests.pending.get()) is not None:
        if request["op"] == "quit":
            break
        request_id = str(request.get("id"))
        if request["op"] != "generate":
            channel.send("error", id=request_id, message=f"unknown op {request['op']!r}", hint=None, fatal=False)
            continue
        if requests.is_cancelled(request_id):
            channel.send("done", id=request_id, text="", stats={"finish": "cancelled", "tokens": 0})
            continue
        try:
            generation = loaded.generate(
                _messages(request.get("messages")), _settings(request.get("settings")),
                adapter=bool(request.get("adapter", True)),
                on_text=lambda piece, rid=request_id: channel.send("token", id=rid, text=piece),
                should_stop=lambda rid=request_id: requests.is_cancelled(rid))
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the session
            channel.send("error", id=request_id, message=str(exc) or type(exc).__name__, hint=hint_for(exc),
                         fatal=False)
            continue
        channel.send("done", id=request_id, text=generation.text, stats=generation.stats())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunewiz.engine.use.chat_server")
    parser.add_argument("run")
    parser.add_argument("--checkpoint", type=int)
    args = parser.parse_args(argv)
    # Protocol lines go to the real stdout; whatever the libraries print (Python or C) goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stdin = open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)
    return serve(args.run, args.checkpoint, Channel(protocol), stdin)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    sys.exit(main(sys.argv[1:]))
