"""A disk that fills up under a real run: the failure is recorded whole and explained, and a resume after
freeing space continues from the last complete checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.engine_runs import engine_life, of_type, small_disk, tiny_run
from tunewiz.engine.run import rundir

pytestmark = pytest.mark.slow


def test_a_disk_that_fills_up_mid_run_fails_the_run_plainly_and_resume_continues(
        tmp_path: Path, demo_model: Path, tunewiz_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with small_disk(tmp_path / "disk", "24m") as disk:
        home = disk / "home"
        (home / "data").mkdir(parents=True)
        (home / "data" / "models").symlink_to(tunewiz_home / "data" / "models")  # the model stays on the big disk
        monkeypatch.setenv("TUNEWIZ_HOME", str(home))
        run = tiny_run()
        filler = disk / "filler"
        # After checkpoint-1, another program takes all but 64 KB: the events and status.json still fit for a
        # while, and then checkpoint-2 (about 800 KB) does not.
        life = engine_life(run, "fill_disk:1", FAULT_FILLER=str(filler), FAULT_LEAVE_BYTES=str(64 * 1024))
        assert life[-1]["type"] == "finished" and life[-1]["status"] == "failed"
        error = of_type(life, "error")[-1]
        assert error["error_type"] == "DiskFull", error
        assert f"the disk holding {disk}" in error["message"] and "MB free" in error["message"]
        assert f"tunewiz resume {run.run_id}" in error["hint"] and "step 1" in error["hint"]
        assert run.state() == "failed" and run.status()["error"]["type"] == "DiskFull"
        log = run.log_path.read_text()
        last = log.rstrip().splitlines()[-1]  # the log is whole, up to the error's last line
        assert "Traceback" in log and ("No space left" in last or "file write failed" in last), log[-2000:]
        assert not (run.output_dir() / "checkpoints" / "checkpoint-2").exists()  # the torn one is gone

        filler.unlink()  # the user frees space
        life = engine_life(run, resume=True)
        assert of_type(life, "started")[0]["resumed_from_step"] == 1
        assert [e["step"] for e in of_type(life, "step")] == [2]
        assert life[-1]["status"] == "completed" and run.state() == "completed"
        assert rundir.latest_checkpoint(run.output_dir())[1] == 2
        assert oct(run.path.stat().st_mode & 0o777) == "0o700"
        private = [run.events_path, run.log_path, run.status_path,
                   run.output_dir() / "adapter" / "adapter_model.safetensors"]
        assert {oct(p.stat().st_mode & 0o777) for p in private} == {"0o600"}
        assert os.listdir(run.output_dir()) and not list(run.path.rglob("*.tmp"))
