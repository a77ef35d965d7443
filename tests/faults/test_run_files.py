"""Faults in the run directory's files, injected without training: torn and invalid event lines, a full
disk under each writer, damaged checkpoints, a lost or damaged status.json, a deleted engine.lock."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from tests.faults.engine_runs import small_disk
from tests.faults.fault_trainer import fill_disk
from tests.runtools import kill_leftovers, make_run, start, steps_seen, wait_finished, wait_for
from tunewiz.engine.cli import main as cli
from tunewiz.engine.data.chat import Encoded
from tunewiz.engine.data.prepare import PreparedData, SamplePrompt, load_cache, save_cache
from tunewiz.engine.fileio import atomic_write_json
from tunewiz.engine.run import launcher, rundir
from tunewiz.engine.run.events import EventReader, EventWriter, decode_line

pytestmark = pytest.mark.timeout(60)

STEP = {"step": 1, "total_steps": 2, "epoch": 0.5, "loss": 1.0, "learning_rate": 1e-4, "elapsed_s": 1.0}


@pytest.fixture(autouse=True)
def _no_engine_outlives_its_test(tunewiz_home: Path):
    yield
    kill_leftovers()


# ------------------------------------------------------------------------------------------------
# events.jsonl


def test_a_torn_last_line_is_cut_so_the_next_event_is_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.emit("log", level="info", message="one")
    writer.close()
    with path.open("ab") as handle:
        handle.write(b'{"v": 1, "seq": 2, "time": 1.0, "type": "lo')  # the disk filled up here
    EventWriter(path).emit("started", pid=1, host="h", run_id="r", version="0")
    read = EventReader(path).read_all()
    assert [(e.seq, e.type) for e in read] == [(1, "log"), (2, "started")]
    assert path.read_bytes().endswith(b"\n")


def test_a_whole_event_missing_only_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"v": 1, "seq": 1, "time": 1.0, "type": "log", "level": "info", "message": "m"}))
    EventWriter(path).emit("log", level="info", message="n")
    assert [e.seq for e in EventReader(path).read_all()] == [1, 2]


def test_a_failed_write_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.emit("log", level="info", message="kept")
    size = path.stat().st_size
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if fd == writer._fd and len(data) > 20:
            real_write(fd, bytes(data[:20]))  # a short write, as on a disk with 20 bytes left
            monkeypatch.setattr(os, "write", lambda *_a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
            return 20
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        writer.emit("log", level="info", message="lost to the full disk")
    monkeypatch.setattr(os, "write", real_write)
    assert path.stat().st_size == size and writer.seq == 1
    assert writer.emit("log", level="info", message="after")["seq"] == 2
    assert [e.get("message") for e in EventReader(path).read_all()] == ["kept", "after"]


@pytest.mark.parametrize("line", [
    b'{"v":1,"seq":999,"time":1,"type":"step"}',  # required fields missing
    b'{"v":1,"seq":5,"time":1,"type":"step","step":"5","total_steps":12,"epoch":0,"loss":1,'
    b'"learning_rate":0,"elapsed_s":0}',  # a field of the wrong type
    b'{"v":1,"seq":5,"time":1,"type":"finished","status":"exploded"}',
])
def test_schema_invalid_events_are_skipped_by_every_reader(line: bytes, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from tunewiz.tui.runreader import decode_object

    assert decode_line(line) is None and decode_object(line) is None
    run = make_run()
    run.events_path.write_bytes(line + b"\n")
    assert cli.main(["tail", run.run_id]) == 0  # no KeyError
    assert "step 5/12" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# status.json: a cache


def test_runs_lists_every_run_when_one_status_has_wrong_types(capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = make_run("good"), make_run("bad")
    atomic_write_json(bad.status_path, {"state": 3, "started": "yesterday", "finished": [1], "step": "7",
                                        "loss": "low", "model": {"x": 1}, "updated": None})
    assert cli.main(["runs"]) == 0
    out = capsys.readouterr().out
    assert good.run_id in out and bad.run_id in out


@pytest.mark.parametrize("damage", ["delete", "garbage", "says running"])
def test_a_completed_run_stays_completed_whatever_happens_to_status(damage: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run()
    start(run, steps=2, step_s=0.01)
    assert wait_finished(run)["status"] == "completed"
    if damage == "delete":
        run.status_path.unlink()
    elif damage == "garbage":
        run.status_path.write_text("{not json")
    else:
        atomic_write_json(run.status_path, {**run.status(), "state": "running"})
    assert run.state() == "completed"
    assert cli.main(["resume", run.run_id, "--detach"]) == 2
    assert f"run {run.run_id} completed" in capsys.readouterr().err
    assert not run.engine_alive()


# ------------------------------------------------------------------------------------------------
# engine.lock deleted: engine.pid still finds the engine


def test_a_deleted_lock_neither_hides_nor_duplicates_the_engine() -> None:
    run = make_run()
    start(run, steps=2000, step_s=0.02)
    wait_for(lambda: steps_seen(run) >= 2, run=run)
    run.lock_path.unlink()
    assert run.engine_alive() and run.state() == "running"
    with pytest.raises(BlockingIOError):
        launcher.launch(run, resume=True)
    assert launcher.stop(run, grace_s=10) == "graceful"
    assert not run.engine_alive()
    seqs = [e.seq for e in EventReader(run.events_path).read_all()]
    assert seqs == list(range(1, len(seqs) + 1))  # one engine wrote


def test_engine_identity_survives_pid_reuse_checks(tmp_path: Path) -> None:
    run = make_run()
    atomic_write_json(run.pid_path, {"pid": os.getpid(), "pgid": os.getpgid(0), "host": os.uname().nodename,
                                     "identity": "not this process"})
    assert run.recorded_engine() is None and not run.engine_alive()


# ------------------------------------------------------------------------------------------------
# Checkpoints: complete only once sealed; resume falls back past damaged ones


def _checkpoint(output: Path, step: int, seal: bool = True) -> Path:
    path = output / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"a" * 1000)
    (path / "optimizer.pt").write_bytes(b"o" * 2000)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if seal:
        rundir.seal_checkpoint(path)
    return path


@pytest.mark.parametrize("damage", ["optimizer.pt:0", "optimizer.pt:1", "optimizer.pt:1999",
                                    "adapter_model.safetensors:500", "trainer_state.json:0", "unsealed",
                                    "marker:garbage", "adapter_model.safetensors:missing"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_complete_one(damage: str, tmp_path: Path) -> None:
    _checkpoint(tmp_path, 4)
    newest = _checkpoint(tmp_path, 6, seal=damage != "unsealed")
    name, _, arg = damage.partition(":")
    if name == "marker":
        (newest / rundir.CHECKPOINT_MARKER).write_text("{")
    elif arg == "missing":
        (newest / name).unlink()
    elif name != "unsealed":
        os.truncate(newest / name, int(arg))
    scan = rundir.scan_checkpoints(tmp_path)
    assert scan.best == (tmp_path / "checkpoints" / "checkpoint-4", 4)
    assert [path.name for path, _ in scan.skipped] == ["checkpoint-6"]
    why = scan.skipped[0][1]
    assert ("never completed" in why) if name in ("unsealed", "marker") else why.startswith(name)


def test_a_checkpoint_being_written_again_stops_counting_at_once(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, 2)
    assert rundir.latest_checkpoint(tmp_path) == (path, 2)
    rundir.unseal_checkpoint(path)
    assert rundir.latest_checkpoint(tmp_path) is None


# ------------------------------------------------------------------------------------------------
# A full disk under each writer (a small tmpfs; skipped where mounting is not allowed)


def test_full_disk_under_events_status_and_cache(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        spec_module = __import__("tunewiz.engine.config.spec", fromlist=["loads"])
        run = rundir.create(spec_module.loads('[dataset]\npreset = "demo"\n'),
                            runs_root=disk / "runs")
        writer = EventWriter(run.events_path)
        writer.emit("log", level="info", message="before")
        status_before = run.status_path.read_bytes()
        fill_disk(disk / "filler")
        with pytest.raises(OSError):
            writer.emit("log", level="info", message="x" * 10000)
        with pytest.raises(OSError):
            run.update_status(state="running", note="y" * 10000)
        data = PreparedData([Encoded([1, 2] * 5000, [3, 4] * 5000)], [], [], {"n": 1}, "f" * 16)
        save_cache(disk / "cache" / "ffff.npz", data)  # only a cache: skipped, no error
        leftovers = sorted(p.name for p in disk.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".npz"))
        assert leftovers == []  # no half-written temporary files
        assert run.status_path.read_bytes() == status_before  # the old status, whole
        assert [e.get("message") for e in EventReader(run.events_path).read_all()] == ["before"]
        assert run.events_path.read_bytes().endswith(b"\n")


# ------------------------------------------------------------------------------------------------
# The dataset cache cannot run code


def _data() -> PreparedData:
    return PreparedData([Encoded([1, 2, 3], [-100, 2, 3]), Encoded([4], [4])], [Encoded([5, 6], [-100, 6])],
                        [SamplePrompt((("user", "hi"),), "hello")], {"format": "messages", "n": 2}, "abcd")


def test_the_dataset_cache_round_trips(tmp_path: Path) -> None:
    save_cache(tmp_path / "abcd.npz", _data())
    assert oct((tmp_path / "abcd.npz").stat().st_mode & 0o777) == "0o600"
    assert load_cache(tmp_path / "abcd.npz", "abcd") == _data()


def test_a_pickle_in_the_cache_folder_never_runs(tmp_path: Path) -> None:
    import pickle

    ran = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (ran,))

    cache = tmp_path / "abcd.npz"
    cache.write_bytes(pickle.dumps(Payload()))
    assert load_cache(cache, "abcd") is None and not ran.exists() and not cache.exists()


def test_a_cache_that_does_not_match_its_fingerprint_or_checksum_is_ignored(tmp_path: Path) -> None:
    import numpy as np

    cache = tmp_path / "abcd.npz"
    save_cache(cache, _data())
    assert load_cache(cache, "other") is None  # another fingerprint's data under this name
    save_cache(cache, _data())
    with np.load(cache) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["train_ids"][0] = 999  # altered tokens
    np.savez(cache, **arrays)
    assert load_cache(cache, "abcd") is None


@pytest.mark.parametrize(("error", "free", "expected"), [
    (OSError(errno.ENOSPC, "No space left on device"), 10**9, "full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 10**9, "full"),
    (OSError(errno.EIO, "Input/output error"), 10**9, "io"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), 1000, "full"),  # torch's checkpoint writer drops the errno
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), 10**9, None),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), 10**9, "full"),
    (ValueError("a bug"), 1000, None),
])
def test_disk_trouble_is_told_from_the_error_and_the_free_space(error: BaseException, free: int, expected: str | None,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    from tunewiz.engine import fileio

    monkeypatch.setattr(fileio, "free_bytes", lambda _path: free)
    wrapped = RuntimeError("the trainer failed")
    wrapped.__cause__ = error
    assert fileio.disk_trouble(error, tmp_path) == expected
    assert fileio.disk_trouble(wrapped, tmp_path) == expected  # found through the chain of causes


def test_runs_of_an_older_tunewiz_are_adopted_with_their_checkpoints(tunewiz_home: Path) -> None:
    """Run folders made before the marker existed stay runs: listed, found, resumable from their checkpoints."""
    from tunewiz.engine import locations
    from tunewiz.engine.config import spec as spec_mod

    root = locations.runs_dir()
    old = root / "20261101-120000-demo-ab12"
    (old / "output" / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    spec_mod.save(spec_mod.loads('name = "demo"\n[dataset]\npreset = "demo"\n'), old / "spec.toml")
    (old / "status.json").write_text(json.dumps({"run_id": old.name, "state": "cancelled"}))
    (old / "output" / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    (old / "output" / "checkpoints" / "checkpoint-6").mkdir()  # torn: no trainer_state.json
    stranger = root / "not-a-run"  # a folder someone put there: its status names another run
    stranger.mkdir()
    spec_mod.save(spec_mod.loads('name = "x"\n[dataset]\npreset = "demo"\n'), stranger / "spec.toml")
    (stranger / "status.json").write_text(json.dumps({"run_id": "something-else"}))

    assert [r.run_id for r in rundir.list_runs()] == [old.name]
    run = rundir.find(old.name[:15])
    assert run.marker()["trust_remote_code"] is False
    assert rundir.latest_checkpoint(run.output_dir()) == (old / "output" / "checkpoints" / "checkpoint-4", 4)
    assert not rundir.is_run_dir(stranger)
