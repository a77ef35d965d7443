"""`tunewiz export`: the demo model exported to GGUF answers the held-out prompts as the adapter does,
and every bad input is a clear error that leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.runtools import make_run
from tunewiz.engine.cli.main import main
from tunewiz.engine.errors import TunewizError
from tunewiz.engine.run import rundir
from tunewiz.engine.use import export


@pytest.fixture
def trained(trained_demo: tuple[rundir.RunDir, Path]) -> tuple[rundir.RunDir, Path]:
    """The session's real demo run (tests/conftest.py), trained through the CLI."""
    return trained_demo


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["q8_0"])  # f16: the CLI test below (4 prompts); each full check is ~50 s
def test_demo_gguf_answers_as_the_adapter(gguf_type: str, trained: tuple[rundir.RunDir, Path]) -> None:
    run, home = trained
    os.environ["TUNEWIZ_HOME"] = str(home)
    lines: list[str] = []
    result = export.export_gguf(run, gguf_type, on_progress=lines.append)
    out = run.path / "exports" / f"gguf-{gguf_type}"
    assert result.path == out and (out / f"demo-{gguf_type}.gguf").exists() and (out / "Modelfile").exists()
    check = result.check
    assert check is not None and check.total == 40, check
    assert check.identical >= 38 and check.tokenization_mismatches == 0 and check.template_stored, check
    assert result.warning is None
    assert any(line.startswith(f"converting to {gguf_type}:") for line in lines)
    assert f"GGUF {gguf_type}: {check.identical}/40 answers identical to the adapter" in lines[-1]
    card = json.loads((run.output_dir() / "run_card.json").read_text())
    entry = next(e for e in card["exports"] if e["type"] == gguf_type)
    assert entry["kind"] == "gguf" and entry["identical"] == check.identical and entry["size_bytes"] > 50e6
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./demo-{gguf_type}.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.slow
def test_cli_gguf_export_prints_progress_and_ollama_commands_and_nothing_else(
        trained: tuple[rundir.RunDir, Path]) -> None:
    run, home = trained
    out = home / "cli-export"
    result = subprocess.run([PYTHON, "-m", "tunewiz.engine", "export", str(run.path), "--gguf", "f16",
                             "--out", str(out), "--verify-limit", "4"], check=False, capture_output=True,
                            text=True, cwd=ROOT, env=subprocess_env(TUNEWIZ_HOME=str(home)), timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no warnings, advisories or raw progress bars
    assert "merging the adapter" in result.stdout and "4/4 answers identical" in result.stdout
    assert f"ollama create demo -f {out / 'Modelfile'}" in result.stdout
    assert "ollama run demo" in result.stdout


# ---------------------------------------------------------------------------------------------- bad inputs

def _adapter_stub(run: rundir.RunDir) -> None:
    """Enough of an adapter for the checks that run before any model loads."""
    folder = run.output_dir() / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")


def test_a_run_without_an_adapter_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run()
    assert main(["export", run.run_id, "--gguf", "q8_0"]) == 2
    assert "has no trained adapter" in capsys.readouterr().err
    assert not (run.path / "exports").exists()


def test_an_unsupported_architecture_is_refused_before_loading(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    from transformers import GPTNeoXConfig

    run = make_run()
    _adapter_stub(run)
    monkeypatch.setattr(export, "_model_config", lambda _run: GPTNeoXConfig())
    monkeypatch.setattr(export, "_load", lambda *_a: pytest.fail("loaded a model"))
    with pytest.raises(TunewizError, match="does not support the 'gpt_neox' architecture"):
        export.export_gguf(run, "f16", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_targets_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run()
    _adapter_stub(run)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    a_file = tmp_path / "file.gguf"
    a_file.write_text("x")
    assert main(["export", run.run_id, "--gguf", "f16", "--out", str(full)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", run.run_id, "--merged", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert a_file.read_text() == "x" and os.listdir(full) == ["x"]


def test_adapter_export_goes_under_the_run_directory_by_default() -> None:
    run = make_run()
    _adapter_stub(run)
    assert export.export_adapter(run) == run.path / "exports" / "adapter"
    assert (run.path / "exports" / "adapter" / "adapter_config.json").exists()


def test_no_disk_space_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(TunewizError, match=r"needs about 1,100 MB, 1 MB are free"):
        export.check_disk(tmp_path / "new" / "deeper", 1e9, "a f16 GGUF file")


def test_q4_k_m_without_llama_cpp_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # an import of it fails
    with pytest.raises(TunewizError, match="llama-cpp-python") as caught:
        export.export_gguf(make_run(), "q4_k_m")
    assert "tunewiz[llama]" in caught.value.hint


def test_a_failed_write_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    out = tmp_path / "exports" / "gguf-f16"
    with pytest.raises(OSError), export._written_atomically(out) as staging:
        (staging / "half.gguf").write_bytes(b"GGUF")
        raise OSError("disk full")
    assert not out.exists() and os.listdir(out.parent) == []


def test_quiet_libraries_restores_the_settings() -> None:
    import logging

    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    with export.quiet_libraries():
        assert not hf_logging.is_progress_bar_enabled()
        assert logging.getLogger("bitsandbytes").level == logging.ERROR
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == before
    assert logging.getLogger("bitsandbytes").level == logging.NOTSET


@pytest.mark.parametrize("changes,cause", [
    ({"tokenization_mismatches": 3}, "the tokenizer: llama.cpp splits 3 of 40 prompts"),
    ({"template_stored": False}, "the chat template stored in the file"),
    ({"differences": [{"prompt": "p", "adapter": "positive", "export": "positive and more"}]}, "a stop token"),
    ({}, "quantisation"),
])
def test_a_mismatch_names_the_likely_cause(changes: dict[str, Any], cause: str) -> None:
    from tunewiz.engine.use.export_check import Check

    base: dict[str, Any] = {"differences": [{"prompt": "p", "adapter": "positive", "export": "negative"}]}
    check = Check("GGUF q8_0", "llama.cpp", 30, 40, "held-out file", **{**base, **changes})
    warning = check.warning(quantised=True)
    assert warning is not None and warning.startswith("WARNING: 30/40 answers") and cause in warning
    assert Check("GGUF f16", "llama.cpp", 39, 40, "x").warning(quantised=False) is None


def test_exports_are_appended_to_the_run_card(tmp_path: Path) -> None:
    from tunewiz.engine.use.export_check import record_in_run_card

    (tmp_path / "run_card.json").write_text(json.dumps({"run_id": "r"}))
    record_in_run_card(tmp_path, {"kind": "gguf", "type": "f16"})
    record_in_run_card(tmp_path, {"kind": "merged", "type": "bf16"})
    card = json.loads((tmp_path / "run_card.json").read_text())
    assert card["run_id"] == "r" and [e["kind"] for e in card["exports"]] == ["gguf", "merged"]
