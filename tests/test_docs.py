"""The README and docs/ say what is true: the commands they show parse, the spec keys and files they name
exist, and the numbers they quote come from the results files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import statistics
import typing
from collections.abc import Iterator

import pytest

from bench.calibrate_memory import row_settings
from bench.speed import OTHER_DROPOUT_DRAWS, curve_gaps, curve_noise
from tests.conftest import ROOT
from tunewiz.engine.cli.main import build_parser
from tunewiz.engine.config.spec import RunSpec
from tunewiz.engine.planning.estimator import estimate

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDERS = {"N": "2", "RUN": "20261202-101010-demo-abcd", "...": None}
PATH = re.compile(r"(?<![\w/.-])((?:engine|tui|tests|bench|docs|presets|tools)/[\w/.-]*\w)")
FILE_TYPES = {"py", "md", "toml", "json", "jsonl", "tcss"}  # `speed.py` names a file, not a key
SPEC_KEY = re.compile(r"(?<![\w.])(model|lora|quantization|dataset|training|speed)\.([a-z_]+)\b")


def _spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def _block_lines(text: str) -> list[str]:
    return [line.split(" #")[0].strip() for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
            for line in block.splitlines()]


def _commands() -> list[tuple[str, str]]:
    parser = build_parser()
    known = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    found = []
    for doc in DOCS:
        text = doc.read_text()
        spans = [s for s in _spans(text) if s.startswith("tunewiz ") and s != "tunewiz ..."]
        lines = [s for s in _block_lines(text) if s.startswith("tunewiz ") and s.split()[1] in known]
        found += [(doc.name, command) for command in dict.fromkeys(spans + lines)]
    return found


class _Refused(Exception):
    pass


def _parse(command: str) -> None:
    words = []
    for word in shlex.split(command)[1:]:
        if word in (">", ">>", "|", "&&", ";"):  # the shell's part of the line
            break
        words.append(PLACEHOLDERS.get(word, word))
    parser = build_parser()

    def refuse(message: str) -> typing.NoReturn:
        raise _Refused(message)

    def every(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from every(sub)

    for p in every(parser):
        p.error = refuse  # type: ignore[method-assign]
    try:
        parser.parse_args([w for w in words if w is not None])
    except _Refused as exc:
        if "the following arguments are required" not in str(exc):  # a mention such as `tunewiz attach`
            raise


@pytest.mark.parametrize(("doc", "command"), _commands())
def test_every_command_shown_parses(doc: str, command: str) -> None:
    _parse(command)


def test_the_command_check_catches_a_wrong_flag() -> None:
    with pytest.raises(_Refused):
        _parse("tunewiz export RUN --guff q8_0")
    assert len(_commands()) > 40


def _spec_keys() -> set[str]:
    keys = set()
    hints = typing.get_type_hints(RunSpec)
    for f in dataclasses.fields(RunSpec):
        section = hints[f.name]
        if isinstance(section, type) and dataclasses.is_dataclass(section):
            keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(section)}
    return keys


def test_every_spec_key_named_exists() -> None:
    keys = _spec_keys()
    wrong = [(doc.name, f"{m.group(1)}.{m.group(2)}") for doc in DOCS for span in _spans(doc.read_text())
             for m in SPEC_KEY.finditer(span)
             if m.group(2) not in FILE_TYPES and f"{m.group(1)}.{m.group(2)}" not in keys]
    assert not wrong


def test_every_file_named_exists() -> None:
    wrong = [(doc.name, m.group(1)) for doc in DOCS for span in _spans(doc.read_text())
             for m in PATH.finditer(span) if not any(ROOT.glob(m.group(1).rstrip("/") + "*"))]
    assert not wrong


def test_readme_numbers_come_from_the_results() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = [json.loads(line) for line in (ROOT / "tests/data/memory_calibration.jsonl").read_text().splitlines()
            if line.strip()]
    worst = max(abs(estimate(*row_settings(r)).total - r["torch_peak_reserved_bytes"]) / r["torch_peak_reserved_bytes"]
                for r in rows)
    assert f"calibrated on {len(rows)} real runs" in readme
    assert f"the\nworst estimate is {worst:.1%} off" in readme or f"worst estimate is {worst:.1%} off" in readme
    # rows stamped with their session; the unstamped ones predate today's defaults (docs/speed.md lists them)
    speed = [row for line in (ROOT / "bench/results/speed.jsonl").read_text().splitlines() if line.strip()
             for row in [json.loads(line)] if row.get("machine")]
    fused_calls = {r["machine"] for r in speed if r["suite"] == "curve" and r["variant"] == "engine"
                   and r["settings"].get("fused_lora")}  # the fused blocks' curves (after the stale-cast fix)
    before = curve_gaps([r for r in speed if r["machine"] not in fused_calls], "engine")
    fused = curve_gaps([r for r in speed if r["machine"] in fused_calls], "engine")
    words = {1: "one", 2: "two", 3: "three"}
    assert re.search(rf"within {min(before):.1%} to\s+{max(before):.1%} of the baseline's \({words[len(before)]} "
                     "sessions", readme)
    assert re.search(rf"within {min(fused):.1%} and\s+{max(fused):.1%} \({words[len(fused)]} calls", readme)
    (no_lean,) = curve_gaps(speed, "engine_no_lean")
    assert f"{no_lean:.1%} with `speed.lean_lora = false`" in readme
    noise = curve_noise(speed)
    assert noise is not None and len(noise.against) == len(OTHER_DROPOUT_DRAWS) + 1 == 8
    assert (f"Eight draws of the baseline's own dropout masks lie {min(noise.floor):.1%} to {max(noise.floor):.1%} "
            f"apart (median {statistics.median(noise.floor):.1%}), and the engine's curve lies "
            f"{min(noise.against):.1%} to {max(noise.against):.1%} from them (median "
            f"{statistics.median(noise.against):.1%})") in " ".join(readme.split())
