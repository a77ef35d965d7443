"""The Modelfile's TEMPLATE renders conversations exactly as the tokenizer's chat template does.

The Go template is run with real Go text/template when `go` is on PATH, else with a small Python
evaluator of exactly the subset engine/use/modelfile.py emits (so a CI without Go still checks it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tunewiz.engine.data.chat import NAMED_TEMPLATES
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.use.modelfile import modelfile_text, write_modelfile

GO_MAIN = """package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	text, _ := os.ReadFile(os.Args[1])
	raw, _ := os.ReadFile(os.Args[2])
	var conversations [][]Message
	if err := json.Unmarshal(raw, &conversations); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("t").Parse(string(text)))
	out := []string{}
	for _, messages := range conversations {
		var b strings.Builder
		if err := tmpl.Execute(&b, map[string]any{"Messages": messages, "System": ""}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	encoded, _ := json.Marshal(out)
	fmt.Print(string(encoded))
}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You label headlines."}, {"role": "user", "content": "Stocks rise"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
     {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"},
     {"role": "assistant", "content": "four"}, {"role": "user", "content": "five\nlines"}],
]


def render_go(template: str, conversations: list[list[dict[str, str]]], tmp_path: Path) -> list[str]:
    go = shutil.which("go")
    if go is None:
        return [PythonGoSubset(template).render(messages) for messages in conversations]
    (tmp_path / "main.go").write_text(GO_MAIN)
    (tmp_path / "t.tmpl").write_text(template)
    (tmp_path / "c.json").write_text(json.dumps(conversations))
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    result = subprocess.run([go, "run", "main.go", "t.tmpl", "c.json"], cwd=tmp_path, capture_output=True, text=True,
                            check=False,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class PythonGoSubset:
    """Go text/template, only as far as engine/use/modelfile.py writes it: string literals, .Content,
    range .Messages, if/else if eq .Role "x", if ne (index .Messages 0).Role "x", end, and {{- trims."""

    ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)

    def __init__(self, template: str) -> None:
        items: list[tuple[str, str]] = []
        position = 0
        for match in self.ACTION.finditer(template):
            text = template[position:match.start()]
            if match.group(1):
                text = text.rstrip()
            items.append(("text", text))
            items.append(("action", match.group(2)))
            position = match.end()
            if match.group(3):
                rest = template[position:]
                position += len(rest) - len(rest.lstrip())
        items.append(("text", template[position:]))
        self.items = items

    def render(self, messages: list[dict[str, str]]) -> str:
        out, _ = self._run(0, {"Messages": messages}, None)
        return out

    def _run(self, index: int, data: dict[str, Any], dot: dict[str, str] | None) -> tuple[str, int]:
        """Render from items[index] to the matching end/else; return the text and the stop index."""
        out = ""
        while index < len(self.items):
            kind, value = self.items[index]
            if kind == "text":
                out += value
                index += 1
            elif value == "end" or value.startswith("else"):
                return out, index
            elif value.startswith('"'):
                out += json.loads(value)
                index += 1
            elif value == ".Content":
                assert dot is not None
                out += dot["Content"]
                index += 1
            elif value == "range .Messages":
                end = index
                for message in data["Messages"]:
                    body, end = self._run(index + 1, data, {"Role": message["role"], "Content": message["content"]})
                    out += body
                if not data["Messages"]:
                    end = self._skip(index + 1)
                index = end + 1
            elif value.startswith("if "):
                body, index = self._if(index, data, dot)
                out += body
            else:
                raise AssertionError(f"action outside the subset: {value!r}")
        return out, index

    def _condition(self, expression: str, data: dict[str, Any], dot: dict[str, str] | None) -> bool:
        if match := re.fullmatch(r'eq \.Role "(\w+)"', expression):
            assert dot is not None
            return dot["Role"] == match.group(1)
        if match := re.fullmatch(r'ne \(index \.Messages 0\)\.Role "(\w+)"', expression):
            return data["Messages"][0]["role"] != match.group(1)
        raise AssertionError(f"condition outside the subset: {expression!r}")

    def _if(self, index: int, data: dict[str, Any], dot: dict[str, str] | None) -> tuple[str, int]:
        chosen = ""
        taken = False
        value = self.items[index][1]
        while True:
            condition = value.removeprefix("else ").removeprefix("if ")
            body, index = self._run(index + 1, data, dot)
            if not taken and self._condition(condition, data, dot):
                chosen, taken = body, True
            value = self.items[index][1]
            if value == "end":
                return chosen, index + 1

    def _skip(self, index: int) -> int:
        depth = 0
        while True:
            value = self.items[index][1] if self.items[index][0] == "action" else ""
            if value.startswith(("if ", "range ")):
                depth += 1
            elif value == "end":
                if depth == 0:
                    return index
                depth -= 1
            index += 1


def expected(tokenizer: Any, template: str | None, messages: list[dict[str, str]], add_bos: bool) -> str:
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    return text.removeprefix(tokenizer.bos_token) if add_bos else text


def template_of(path: Path) -> str:
    return path.read_text().split('TEMPLATE """', 1)[1].split('"""', 1)[0]


@pytest.mark.parametrize("name,add_bos", [("own", False), ("llama3", True), ("llama3", False), ("chatml", False)])
def test_template_renders_like_the_chat_template(name: str, add_bos: bool, demo_tokenizer: Any,
                                                 tmp_path: Path) -> None:
    template = None if name == "own" else NAMED_TEMPLATES[name]  # own: SmolLM2's, with a default system prompt
    path, warning = write_modelfile(tmp_path, "m.gguf", demo_tokenizer, template, add_bos, ["<|im_end|>"], None)
    assert warning is None
    go_text = template_of(path)
    rendered = render_go(go_text, CONVERSATIONS, tmp_path)
    assert rendered == [expected(demo_tokenizer, template, m, add_bos) for m in CONVERSATIONS]
    if name == "own":
        assert "You are a helpful AI assistant named SmolLM" in rendered[0]
        assert "You are a helpful AI assistant named SmolLM" not in rendered[1]


def test_python_subset_evaluator_agrees_with_go_on_the_emitted_templates(demo_tokenizer: Any, tmp_path: Path) -> None:
    if shutil.which("go") is None:
        pytest.skip("go is not installed; the other tests ran the Python evaluator")
    path, _ = write_modelfile(tmp_path, "m.gguf", demo_tokenizer, None, False, [], None)
    go_text = template_of(path)
    assert render_go(go_text, CONVERSATIONS, tmp_path) == [PythonGoSubset(go_text).render(m) for m in CONVERSATIONS]


def test_modelfile_lines(demo_tokenizer: Any, tmp_path: Path) -> None:
    path, _ = write_modelfile(tmp_path, "run.gguf", demo_tokenizer, None, False, ["<|im_end|>", "<|endoftext|>"],
                              "You label headlines.")
    text = path.read_text()
    assert text.startswith("FROM ./run.gguf\nTEMPLATE \"\"\"")
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n' in text
    assert text.endswith('SYSTEM """You label headlines."""\n')


def test_template_that_is_not_per_message_gets_no_template_line(demo_tokenizer: Any, tmp_path: Path) -> None:
    # Mistral-style: the system prompt goes inside the last user message
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.last and messages[0]['role'] == "
                "'system' %}{{ messages[0]['content'] }}\n\n{% endif %}{{ m['content'] }}[/INST]{% elif m['role'] == "
                "'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
    path, warning = write_modelfile(tmp_path, "m.gguf", demo_tokenizer, template, False, [], "sys")
    assert warning and "no TEMPLATE" in warning
    assert "TEMPLATE" not in path.read_text()


def test_system_prompt_with_triple_quotes_is_refused() -> None:
    with pytest.raises(TunewizError, match="three double quotes"):
        modelfile_text("m.gguf", None, [], 'say """hi"""')
