"""`tunewiz completion SHELL`: the bash script completes commands, options, run ids and presets when
sourced in a real bash (with `tunewiz` on the PATH as users have it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, subprocess_env
from tunewiz.engine.cli.main import build_parser, main


def _complete(words: list[str], home: Path, script: str, tmp_path: Path) -> list[str]:
    """What Tab offers after `words` (the last one is being typed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "tunewiz").write_text(f"#!/bin/sh\nexec {PYTHON} -m tunewiz.engine \"$@\"\n")
    (bin_dir / "tunewiz").chmod(0o755)
    quoted = " ".join(f"'{w}'" for w in words)
    program = (f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _tunewiz\n"
               "printf '%s\\n' \"${COMPREPLY[@]}\"")
    env = {**subprocess_env(), "TUNEWIZ_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "--norc", "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_bash_completes_commands_options_runs_and_presets(tunewiz_home: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    runs = tunewiz_home / "state" / "runs"
    (runs / "20261202-101010-demo-abcd").mkdir(parents=True)
    assert _complete(["tunewiz", "st"], tunewiz_home, script, tmp_path) == ["stop"]
    assert _complete(["tunewiz", "tail", ""], tunewiz_home, script, tmp_path) == ["last", "20261202-101010-demo-abcd"]
    assert "--gguf" in _complete(["tunewiz", "export", "--g"], tunewiz_home, script, tmp_path)
    assert "demo" in _complete(["tunewiz", "train", "de"], tunewiz_home, script, tmp_path)
    assert _complete(["tunewiz", "completion", "f"], tunewiz_home, script, tmp_path) == ["fish"]


def test_every_command_is_in_every_script() -> None:
    from tunewiz.engine.cli import completion

    parser = build_parser()
    names = [c.name for c in completion.commands(parser)]
    assert {"train", "tail", "chat", "export", "completion"} <= set(names)
    for shell in completion.SHELLS:
        text = completion.script(shell, parser)
        assert all(name in text for name in names), shell


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_the_other_shells_parse_their_script(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here")
    from tunewiz.engine.cli import completion

    result = subprocess.run([shell, "-n"], input=completion.script(shell, build_parser()), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
