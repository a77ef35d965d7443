"""Commands that use a trained model: `tunewiz chat` and `tunewiz eval`.

Both are torch-free here: chat talks to the chat process (engine/use/chat_client.py), and eval imports
the training stack only once its arguments are checked.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run import rundir
from tunewiz.engine.use.chat_client import ChatClient, Conversation, SamplingSettings, stats_line

CHAT_HELP = """commands:
  /compare          answer with the base model and the tuned one, side by side (again: off)
  /base, /tuned     which model answers when not comparing
  /set temperature T | top_p P | max_new_tokens N     (temperature 0 = greedy, the default)
  /reset            forget the conversation
  /quit             leave (or Ctrl-D); Ctrl-C stops an answer"""


class ChatSession:
    """The terminal chat: conversation history per side, settings, and the request/reply loop."""

    def __init__(self, client: ChatClient, out: TextIO, settings: SamplingSettings, compare: bool = False) -> None:
        self.client = client
        self.out = out
        self.settings = settings
        self.compare = compare
        self.adapter = True
        self.conversation = Conversation()

    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        words = line[1:].split()
        name = words[0] if words else ""
        if name in ("quit", "exit", "q"):
            return False
        if name == "reset":
            self.conversation.reset()
            self.say("conversation cleared")
        elif name == "compare":
            self.compare = not self.compare
            self.say("comparing base and tuned answers" if self.compare else "tuned model only")
        elif name in ("base", "tuned"):
            self.adapter, self.compare = name == "tuned", False
            self.say(f"the {name} model answers")
        elif name == "set" and len(words) == 3:
            try:
                self.settings = _set(self.settings, words[1], words[2])
                self.say(self.settings.describe())
            except (TunewizError, ValueError) as exc:
                self.say(f"cannot set {words[1]}: {exc}")
        else:
            self.say(CHAT_HELP)
        return True

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def ask(self, text: str) -> None:
        """Answer one user message (on both sides when comparing)."""
        sides = [False, True] if self.compare else [self.adapter]
        for adapter in sides:
            messages = self.conversation.ask(adapter, text)
            label = "tuned" if adapter else "base"
            self.out.write(f"{label}> ")
            self.out.flush()
            done = self._stream(self.client.generate(messages, adapter, self.settings))
            if done is None:
                continue
            answer = done.get("text", "")
            stats = done.get("stats", {})
            self.conversation.answered(adapter, messages, answer, stats.get("finish"))
            self.say(f"\n  ({stats_line(stats)})")

    def _stream(self, request_id: str) -> dict[str, Any] | None:
        """Print the answer's pieces as they come; Ctrl-C cancels it. Returns the `done` reply's data."""
        replies = self.client.replies()
        while True:
            try:
                for reply in replies:
                    if reply.id != request_id:
                        continue
                    if reply.type == "token":
                        self.out.write(reply.data.get("text", ""))
                        self.out.flush()
                    elif reply.type == "done":
                        return reply.data
                    elif reply.type == "error":
                        hint = reply.data.get("hint")
                        self.say(f"\nerror: {reply.data.get('message')}" + (f"\nhint: {hint}" if hint else ""))
                        return None
                raise TunewizError("the chat process ended", hint=f"see {self.client.log_path}:\n"
                                                                 f"{self.client.log_tail()}")
            except KeyboardInterrupt:
                self.client.cancel(request_id)


def _set(settings: SamplingSettings, key: str, value: str) -> SamplingSettings:
    key = key.replace("-", "_")
    if key == "temperature":
        new = replace(settings, temperature=float(value))
    elif key == "top_p":
        new = replace(settings, top_p=float(value))
    elif key == "max_new_tokens":
        new = replace(settings, max_new_tokens=int(value))
    else:
        raise TunewizError(f"unknown setting {key!r}", hint="temperature, top_p or max_new_tokens")
    new.check()
    return new


def _read_lines(stream: TextIO, prompt: Callable[[], None]) -> Any:
    while True:
        prompt()
        line = stream.readline()
        if not line:
            return
        yield line.rstrip("\n")


def cmd_chat(args: argparse.Namespace) -> int:
    run = rundir.find(args.run)
    settings = SamplingSettings(args.temperature, args.top_p, args.max_new_tokens)
    settings.check()
    _ensure_adapter(run, args.checkpoint)
    client = ChatClient(run.path, args.checkpoint)
    client.start()
    try:
        info = client.wait_ready(on_loading=lambda msg: print(msg, file=sys.stderr, flush=True))
        session = ChatSession(client, sys.stdout, settings, compare=args.compare)
        which = f"checkpoint {info['checkpoint']}" if info.get("checkpoint") else "final adapter"
        for note in info.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
        interactive = sys.stdin.isatty()
        if args.prompt is not None:
            session.ask(args.prompt)
            return 0
        if interactive:
            system = info.get("system_prompt")
            session.say(f"chatting with {info['model']} + run {info['run_id']} ({which}) on {info['device']}; "
                        f"{settings.describe()}" + (f"\nsystem prompt: {system}" if system else "")
                        + "\n/help lists commands; Ctrl-D quits")
        prompt = (lambda: print("you> ", end="", flush=True)) if interactive else (lambda: None)
        for line in _read_lines(sys.stdin, prompt):
            if not line.strip():
                continue
            if line.startswith("/"):
                if not session.command(line.strip()):
                    break
                continue
            session.ask(line)
        return 0
    finally:
        client.close()


def _ensure_adapter(run: rundir.RunDir, checkpoint: int | None) -> None:
    """Fail fast, before a model loads, when there is nothing to chat with."""
    from tunewiz.engine.use.inference import adapter_path  # torch-free at import; it only looks at files

    run.trusted_spec()
    adapter_path(run, checkpoint)


def _say(message: str) -> None:
    """Progress on stderr, so that `--json` output on stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from tunewiz.engine.use import evaluate

    run = rundir.find(args.run)
    data = Path(args.data).expanduser() if args.data else None
    if data is not None and not data.exists():
        raise TunewizError(f"--data {data} does not exist", hint="name a .jsonl, .json, .csv or .parquet file")
    if args.limit is not None and args.limit < 1:
        raise TunewizError("--limit must be at least 1")
    _ensure_adapter(run, args.checkpoint)
    report = evaluate.evaluate_run(run, checkpoint=args.checkpoint, data_file=data, limit=args.limit,
                                   max_new_tokens=args.max_new_tokens, on_progress=_say)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.summary_text())
        print(f"\nreport: {report.path}")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("chat", help="talk to a run's tuned model (and compare it with the base model)")
    p.add_argument("run", metavar="RUN", help="run id or a unique prefix of it ('last' for the newest)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="use this checkpoint instead of the final adapter")
    p.add_argument("--compare", action="store_true", help="answer each message with the base and the tuned model")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) answers greedily: reproducible")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with a temperature above 0)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--prompt", metavar="TEXT", help="answer this one message and exit")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="before/after: answer held-out examples with the base and the tuned model")
    p.add_argument("run", metavar="RUN", help="run id or a unique prefix of it ('last' for the newest)")
    p.add_argument("--data", metavar="FILE", help="examples to use instead of the run's held-out ones")
    p.add_argument("--limit", type=int, metavar="N", help="use at most N examples")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="evaluate this checkpoint's adapter")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="answer length limit (default: a little over the longest reference)")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    p.set_defaults(func=cmd_eval)
