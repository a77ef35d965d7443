"""A hub model's download reaches the event stream as `phase` events (no network: the hub client's
download function is replaced by one that drives the progress bar it is given, as the real one does)."""

from __future__ import annotations

from typing import Any

import huggingface_hub
import pytest
from huggingface_hub import constants

from tunewiz.engine.errors import ModelError
from tunewiz.engine.run.events import validate
from tunewiz.engine.training import download
from tunewiz.engine.training.models import ModelSource

GIB = 1024**3


def _fake_snapshot(total: int, chunks: int, fail: Exception | None = None) -> Any:
    def snapshot_download(repo_id: str, revision: str | None = None, allow_patterns: Any = None,
                          tqdm_class: Any = None) -> str:
        if fail is not None:
            raise fail
        files = tqdm_class(total=3, desc="Fetching 3 files")  # the file count: not reported
        files.update(3)
        files.close()
        bar = tqdm_class(total=total, unit="B", unit_scale=True, name="huggingface_hub.snapshot_download")
        for _ in range(chunks):
            bar.update(total // chunks)
        bar.close()
        return "/cache/" + repo_id

    return snapshot_download


def _events(monkeypatch: pytest.MonkeyPatch, **fake: Any) -> list[dict[str, Any]]:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(**fake))
    emitted: list[dict[str, Any]] = []
    source = ModelSource("meta-llama/Llama-3.1-8B-Instruct", label="meta-llama/Llama-3.1-8B-Instruct")
    download.fetch(source, lambda kind, **data: emitted.append({"type": kind, **data}))
    return emitted


def test_download_progress_becomes_phase_events(monkeypatch: pytest.MonkeyPatch) -> None:
    events = _events(monkeypatch, total=16 * GIB, chunks=4)
    assert events, "no progress reported"
    last = events[-1]
    assert last["phase"] == "download" and last["done_bytes"] == last["total_bytes"] == 16 * GIB
    assert last["message"] == "downloading meta-llama/Llama-3.1-8B-Instruct: 16 GiB of 16 GiB (100%)"
    for event in events:  # each is a valid event once the writer adds its envelope
        assert validate({"v": 1, "seq": 1, "time": 0.0, **event}) == []


def test_progress_is_reported_every_few_seconds_not_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    events = _events(monkeypatch, total=4 * GIB, chunks=1000)
    assert 1 <= len(events) <= 3  # the first chunk, perhaps one more, and the end


def test_local_models_and_offline_mode_download_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    emitted: list[Any] = []
    download.fetch(ModelSource("/models/llama", is_local=True, label="llama"), lambda *a, **k: emitted.append(a))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    download.fetch(ModelSource("org/model", label="org/model"), lambda *a, **k: emitted.append(a))
    assert emitted == []


def test_a_failed_download_says_what_to_check(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="cannot download model meta-llama") as caught:
        _events(monkeypatch, total=1, chunks=1, fail=OSError("connection refused"))
    assert "internet" in (caught.value.hint or "")
