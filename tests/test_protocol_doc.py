"""docs/run-protocol.md stays true: its event tables match tunewiz.engine.run.events.SCHEMA field for field, its
status.json table names every key the engine writes, and its example client works."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT
from tests.runtools import kill_leftovers, make_run, start, wait_finished
from tunewiz.engine.run.events import SCHEMA

DOC = ROOT / "docs" / "run-protocol.md"
ROW = re.compile(r"^\| `([A-Za-z_]+)` \| ([^|]+?) \| (?:(yes|no) \| )?")


def _section(text: str, heading: str) -> str:
    """The text under `heading` (a whole heading line) up to the next heading of any level."""
    lines = text.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start + 1:end])


def _rows(section: str) -> dict[str, tuple[str, str | None]]:
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = (match.group(2).strip(), match.group(3))
    return rows


def _type_name(types: tuple[type, ...]) -> str:
    allowed = set(types)
    nullable = type(None) in allowed
    allowed.discard(type(None))
    if allowed == {int, float}:
        base = "number"
    else:
        [only] = allowed
        base = {int: "integer", float: "number", str: "string", list: "array", dict: "object"}[only]
    return f"{base} or null" if nullable else base


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_every_event_type_has_a_section_with_exactly_its_fields(doc: str) -> None:
    documented = re.findall(r"^### `([a-z_]+)`$", doc, flags=re.M)
    assert sorted(documented) == sorted(SCHEMA), "one `### `type`` section per event type, no more"
    for kind, fields in SCHEMA.items():
        rows = _rows(_section(doc, f"### `{kind}`"))
        expected = {name: (_type_name(types), "yes" if required else "no")
                    for name, (types, required) in fields.items()}
        assert rows == expected, f"the table for `{kind}` does not match SCHEMA"


def test_every_field_name_appears_in_the_doc(doc: str) -> None:
    for kind, fields in SCHEMA.items():
        assert f"`{kind}`" in doc
        for name in fields:
            assert f"`{name}`" in doc, f"{kind}.{name} is not documented"


def test_the_envelope_is_documented(doc: str) -> None:
    rows = _rows(_section(doc, "## Events"))
    assert {k: rows[k][0] for k in ("v", "seq", "time", "type")} == {
        "v": "integer", "seq": "integer", "time": "number", "type": "string"}


def test_status_keys_the_engine_writes_are_documented(doc: str) -> None:
    run = make_run()
    start(run, steps=3, step_s=0.01)
    wait_finished(run)
    table = _section(doc, "### `status.json`")
    documented = set(re.findall(r"`([a-z_]+)`", table))
    assert set(run.status()) <= documented, sorted(set(run.status()) - documented)


def _example_client(doc: str) -> str:
    example = _section(doc, "## Example: a client in plain Python")
    match = re.search(r"```python\n(.*?)```", example, flags=re.S)
    assert match, "no python block in the example section"
    return match.group(1)


def test_the_example_client_follows_a_live_run_to_its_end(doc: str, tmp_path: Path) -> None:
    client = tmp_path / "follow.py"
    client.write_text(_example_client(doc))
    run = make_run()
    try:
        start(run, steps=12, step_s=0.03)
        result = subprocess.run([PYTHON, str(client), str(run.path)], capture_output=True, text=True, timeout=30)
    finally:
        kill_leftovers()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("step ")] == [f"{n}/12" for n in range(1, 13)]
    assert lines[-2:] == ["engine finished: completed", "run ended: completed"]

    never_started = make_run("idle")
    result = subprocess.run([PYTHON, str(client), str(never_started.path)], capture_output=True, text=True, timeout=30)
    assert result.stdout.splitlines() == ["run ended: dead"]
