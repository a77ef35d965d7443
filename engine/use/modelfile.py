"""An Ollama Modelfile for an exported GGUF: FROM, a TEMPLATE equal to the model's chat template,
stop parameters and the run's system prompt.

Ollama templates are Go text/template, not Jinja, so the chat template is not translated: it is
probed. Conversations with marker contents are rendered with the tokenizer's own template, and the
text around the markers gives each role's prefix and suffix, the generation prompt, the text before
the first message and any default system prompt the template inserts. The pieces are checked
against more renders before they are used; a template they cannot reproduce gets no TEMPLATE line
(Ollama then falls back on the chat template stored in the GGUF file) and a warning.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunewiz.engine.errors import TunewizError

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> text

_S, _U1, _A1, _U2, _A2 = "SYSMARK7", "USERMARK1", "ASSTMARK1", "USERMARK2", "ASSTMARK2"


@dataclass(frozen=True)
class ChatShape:
    """A chat template as plain pieces: what each message is wrapped in."""

    head: str  # before the first message (BOS text is left to the runtime, which adds BOS itself)
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str  # what asks the model to answer
    default_system: str | None  # inserted by the template when the conversation has no system message

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the template writes it, with the generation prompt."""
        text = self.head
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            text += self.prefix["system"] + self.default_system + self.suffix["system"]
        for message in messages:
            text += self.prefix[message["role"]] + message["content"] + self.suffix[message["role"]]
        return text + self.generation


def _split(text: str, markers: list[str]) -> list[str]:
    """The text between consecutive markers (len(markers) + 1 pieces)."""
    pieces = []
    for marker in markers:
        before, found, text = text.partition(marker)
        if not found:
            raise ValueError(f"marker {marker} not rendered")
        pieces.append(before)
    return [*pieces, text]


def _msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def _cut_end(text: str, end: str) -> str:
    if not text.endswith(end):
        raise ValueError("pieces do not line up")
    return text[:len(text) - len(end)] if end else text


def _cut_start(text: str, start: str) -> str:
    if not text.startswith(start):
        raise ValueError("pieces do not line up")
    return text[len(start):]


def probe(render: Render, strip: str = "") -> ChatShape:
    """The pieces of a chat template; `strip` (the BOS text, when the runtime adds BOS) is dropped from
    the front. Raises ValueError when the template is not per-message wrapping."""
    def text(messages: list[dict[str, str]], generation: bool) -> str:
        out = render(messages, generation)
        return out[len(strip):] if strip and out.startswith(strip) else out

    user, assistant = ("user", _U1), ("assistant", _A1)
    _, u_gen = _split(text(_msgs(user), True), [_U1])
    _, u_end = _split(text(_msgs(user), False), [_U1])
    generation = _cut_start(u_gen, u_end)
    four = _msgs(user, assistant, ("user", _U2), ("assistant", _A2))
    lead, between_ua, between_au, _, a_end = _split(text(four, False), [_U1, _A1, _U2, _A2])
    user_suffix = u_end
    assistant_prefix = _cut_start(between_ua, user_suffix)
    user_prefix = _cut_start(between_au, a_end)
    before_user = _cut_end(lead, user_prefix)
    prefix = {"user": user_prefix, "assistant": assistant_prefix}
    suffix = {"user": user_suffix, "assistant": a_end}
    head, default_system = before_user, None
    try:
        s_lead, s_between, _ = _split(text(_msgs(("system", _S), user), False), [_S, _U1])
    except Exception:  # noqa: BLE001 - templates that refuse a system message raise their own errors
        s_lead = None
    if s_lead is not None:
        system_suffix = _cut_end(s_between, user_prefix)
        if before_user.startswith(s_lead) and before_user.endswith(system_suffix) and before_user != s_lead:
            # the template writes a system message of its own when there is none
            head = ""
            for end in range(len(s_lead) + 1):
                candidate_head, system_prefix = s_lead[:end], s_lead[end:]
                inner = before_user[len(candidate_head):]
                if inner.startswith(system_prefix):
                    head = candidate_head
                    break
            system_prefix = s_lead[len(head):]
            default_system = before_user[len(s_lead):len(before_user) - len(system_suffix)]
        else:
            system_prefix = _cut_start(s_lead, before_user)
        prefix["system"], suffix["system"] = system_prefix, system_suffix
    return ChatShape(head, prefix, suffix, generation, default_system)


def check(shape: ChatShape, render: Render, strip: str = "") -> None:
    """Raise ValueError unless the pieces reproduce the template on conversations of several shapes."""
    probes = [_msgs(("user", "hi")),
              _msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
              _msgs(("user", "one"), ("assistant", "two"), ("user", "three"), ("assistant", "four"), ("user", "5"))]
    if "system" in shape.prefix:
        probes += [_msgs(("system", "be brief"), ("user", "hi")),
                   _msgs(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"))]
    for messages in probes:
        expected = render(messages, True)
        expected = expected[len(strip):] if strip and expected.startswith(strip) else expected
        if shape.render(messages) != expected:
            raise ValueError(f"pieces render {shape.render(messages)!r}, the template {expected!r}")


def _lit(text: str) -> str:
    """A Go string literal action printing `text` exactly."""
    return "{{ " + json.dumps(text) + " }}" if text else ""


def go_template(shape: ChatShape) -> str:
    """The Ollama TEMPLATE (Go text/template over .Messages) that writes what `shape` writes."""
    lines = [_lit(shape.head)]
    if shape.default_system is not None:
        lines.append('{{- if ne (index .Messages 0).Role "system" }}'
                     + _lit(shape.prefix["system"] + shape.default_system + shape.suffix["system"]) + "{{ end }}")
    branches: list[str] = []
    for role in ("system", "user", "assistant"):
        if role in shape.prefix:
            keyword = "if" if not branches else "else if"
            branches.append(f'{{{{- {keyword} eq .Role "{role}" }}}}' + _lit(shape.prefix[role]) + "{{ .Content }}"
                            + _lit(shape.suffix[role]))
    lines.append("{{- range .Messages }}")
    lines.extend(branches)
    lines.append("{{- end }}")
    lines.append("{{- end }}" + _lit(shape.generation))
    return "\n".join(line for line in lines if line)


def _quote(text: str) -> str:
    """A Modelfile triple-quoted value (which cannot hold three quotes in a row)."""
    if '"""' in text:
        raise TunewizError("the text for the Modelfile contains three double quotes in a row",
                           hint="Ollama's Modelfile cannot quote that; change the system prompt")
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: str | None, stops: list[str], system: str | None) -> str:
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_name: str, tokenizer: object, chat_template: str | None, add_bos: bool,
                    stops: list[str], system: str | None) -> tuple[Path, str | None]:
    """Write `folder`/Modelfile; returns its path and a warning when no TEMPLATE could be derived."""
    from tunewiz.engine.fileio import atomic_write_text

    bos = getattr(tokenizer, "bos_token", None) or ""

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,  # type: ignore[attr-defined]
                                             add_generation_prompt=generation)

    strip = bos if add_bos else ""
    template, warning = None, None
    try:
        shape = probe(render, strip)
        check(shape, render, strip)
        template = go_template(shape)
    except ValueError as exc:
        warning = (f"the chat template is not a plain per-message template ({exc}); the Modelfile has no TEMPLATE, "
                   "so Ollama uses the chat template stored in the GGUF file: check its answers")
    path = folder / "Modelfile"
    atomic_write_text(path, modelfile_text(gguf_name, template, stops, system))
    return path, warning
