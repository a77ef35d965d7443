"""`tunewiz compare`, `tunewiz plot`, and the coach's alerts in `tunewiz runs` and `tunewiz tail`, in process
through tunewiz.engine.cli.main.main on copies of the recorded runs (tests/data/runs/)."""

from __future__ import annotations

import builtins
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tunewiz.engine import locations
from tunewiz.engine.cli import main as cli
from tunewiz.engine.run import rundir
from tunewiz.engine.run.curves import alert_codes, load
from tunewiz.engine.use import plot

FIXTURES = ROOT / "tests" / "data" / "runs"
ALERT = {"v": 1, "seq": 1000, "time": 1795817700.0, "type": "alert", "code": "overfitting", "severity": "warning",
         "step": 20, "message": "The eval loss has been rising since step 20.", "hint": "Stop here.", "details": {}}


@pytest.fixture()
def runs(tunewiz_home: Path) -> dict[str, rundir.RunDir]:
    """The recorded completed, cancelled and dead runs in this test's runs folder."""
    root = locations.runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    placed = {}
    for folder in (f for f in FIXTURES.iterdir() if f.is_dir()):
        state = folder.name.split("-")[3]
        if state in ("completed", "cancelled", "dead"):
            placed[state] = rundir.RunDir(Path(shutil.copytree(folder, root / folder.name)))
    return placed


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_shows_runs_settings_and_curves_side_by_side(runs: dict[str, rundir.RunDir],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "compare", runs["completed"].run_id, runs["cancelled"].run_id)
    assert code == 0
    assert f"1 {runs['completed'].run_id}" in out and f"2 {runs['cancelled'].run_id}" in out
    assert "completed   24/24" in out and "cancelled   16/40" in out and "GiB RAM" in out
    assert "settings that differ" in out and "training.max_steps   24   40" in out
    assert "training loss by step" in out and "eval loss by step" in out and "step 1" in out


def test_compare_as_json_by_tokens(runs: dict[str, rundir.RunDir], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "compare", runs["completed"].run_id, runs["dead"].run_id, "--by", "tokens",
                           "--json")
    data = json.loads(out)
    assert code == 0 and data["by"] == "tokens"
    assert [r["steps"] for r in data["runs"]] == [24, 14] and data["runs"][1]["state"] == "dead"
    assert data["runs"][0]["best_eval_step"] == 24 and data["settings_that_differ"]["training.max_steps"] == [24, 40]


def test_compare_refuses_one_run_or_the_same_run_twice(runs: dict[str, rundir.RunDir],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "compare", runs["completed"].run_id)
    assert code == 2 and "at least two runs" in err
    code, _, err = run_cli(capsys, "compare", runs["completed"].run_id, runs["completed"].run_id[:20])
    assert code == 2 and "the same run is named twice" in err


def test_curves_key_repeated_steps_by_step_the_later_winning(tmp_path: Path) -> None:
    run = rundir.RunDir(Path(shutil.copytree(FIXTURES / "20261127-221642-demo-cancelled-4049", tmp_path / "r")))
    lines = run.events_path.read_text().splitlines()
    step = next(json.loads(line) for line in lines if '"type": "step"' in line and '"step": 15,' in line)
    with run.events_path.open("a") as handle:  # a resumed life repeats step 15 with another loss
        handle.write(json.dumps({**step, "seq": 10_000, "loss": 9.5}) + "\n")
    curves = load(run)
    assert sorted(curves.steps) == list(range(1, 16)) and curves.final_loss == 9.5


def test_plot_writes_the_metrics_as_csv(runs: dict[str, rundir.RunDir], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "metrics.csv"
    code, said, _ = run_cli(capsys, "plot", runs["completed"].run_id, "--csv", str(out))
    rows = list(csv.DictReader(out.open()))
    assert code == 0 and "wrote 24 steps" in said and len(rows) == 24
    assert rows[0]["step"] == "1" and rows[0]["tokens_seen"] == "289"
    assert float(rows[0]["loss"]) == pytest.approx(1.645, abs=1e-3)
    assert [r["step"] for r in rows if r["eval_loss"]] == ["4", "8", "12", "16", "20", "24"]
    assert not plot.default_path(runs["completed"]).exists()  # --csv alone draws nothing


def test_plot_draws_the_chart_and_the_eval_report_links_it(runs: dict[str, rundir.RunDir], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    run = runs["completed"]
    report = run.path / "eval" / "report.md"
    report.parent.mkdir()
    report.write_text("# Evaluation\n")
    code, said, _ = run_cli(capsys, "plot", run.run_id)
    chart = plot.default_path(run)
    assert code == 0 and chart.read_bytes().startswith(b"\x89PNG") and "linked it from" in said
    assert report.read_text().endswith("![loss, eval loss and learning rate](../plots/curves.png)\n")
    run_cli(capsys, "plot", run.run_id)
    assert report.read_text().count("curves.png") == 1  # linked once
    assert plot.report_link(run, run.path / "eval" / "checkpoint-12").strip().endswith("(../../plots/curves.png)")
    code, _, _ = run_cli(capsys, "plot", run.run_id, "--out", str(tmp_path / "loss.svg"))
    assert code == 0 and b"<svg" in (tmp_path / "loss.svg").read_bytes()[:400]


def test_plot_refuses_an_unknown_format_and_names_the_extra_without_matplotlib(
        runs: dict[str, rundir.RunDir], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(capsys, "plot", runs["completed"].run_id, "--out", str(tmp_path / "loss.gif"))
    assert code == 2 and "cannot write a chart as 'loss.gif'" in err
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = run_cli(capsys, "plot", runs["completed"].run_id, "--out", str(tmp_path / "loss.png"))
    assert code == 2 and "needs matplotlib" in err and "tunewiz[plot]" in err
    assert not (tmp_path / "loss.png").exists()


def test_runs_and_tail_show_alerts(runs: dict[str, rundir.RunDir], capsys: pytest.CaptureFixture[str]) -> None:
    run = runs["completed"]
    with run.events_path.open("a") as handle:
        handle.write(json.dumps(ALERT) + "\n")
    assert alert_codes(run.events_path) == ["overfitting"]
    code, out, _ = run_cli(capsys, "runs")
    line = next(line for line in out.splitlines() if line.startswith(run.run_id))
    assert code == 0 and out.splitlines()[0].endswith("ALERTS") and line.endswith("overfitting")
    assert json.loads(run_cli(capsys, "runs", "--json")[1])[-1]["alerts"] in ([], ["overfitting"])
    code, out, _ = run_cli(capsys, "tail", run.run_id)
    assert "ALERT overfitting at step 20: The eval loss has been rising since step 20.\n    try: Stop here." in out
