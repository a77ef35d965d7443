"""Fetching a hub model's files before loading it, with the download's progress as `phase` events: the
dashboard shows "downloading … 3.2 GiB of 16 GiB" instead of a silent wait of many minutes."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

from tunewiz.engine.render import memory
from tunewiz.engine.training.models import ModelSource

WEIGHT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
"""What loading a model and its tokenizer reads (never the .bin, .pth or .gguf copies some repos hold)."""
REPORT_EVERY_S = 2.0

Report = Callable[[int, int], None]
"""(bytes done, bytes in all) of the download."""


def progress_class(report: Report, every_s: float = REPORT_EVERY_S) -> type:
    """A tqdm class for huggingface_hub that passes its byte counts to `report` (at most every `every_s`
    seconds, and once at the end) and prints nothing."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class Progress(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = io.StringIO()
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)
            self._bytes = kwargs.get("unit") == "B"  # the byte bar, not the count of files
            self._said = 0.0

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            now = time.monotonic()
            if self._bytes and self.total and now - self._said >= every_s:
                self._said = now
                report(int(self.n), int(self.total))
            return shown

        def close(self) -> None:
            if self._bytes and self.total and self.n:
                report(int(self.n), int(self.total))
            super().close()

    return Progress


def download_message(repo: str, done: int, total: int) -> str:
    return f"downloading {repo}: {memory(done)} of {memory(total)} ({100 * done / max(total, 1):.0f}%)"


def fetch(source: ModelSource, emit: Callable[..., Any]) -> None:
    """Download the files a hub model needs into the hub cache, emitting `phase` events as it goes; local
    folders and offline mode (the files must already be cached) are left to the loader."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    from tunewiz.engine.errors import ModelError

    if source.is_local or constants.HF_HUB_OFFLINE:
        return

    def report(done: int, total: int) -> None:
        emit("phase", phase="download", message=download_message(source.label, done, total),
             done_bytes=done, total_bytes=total)

    try:
        snapshot_download(source.name_or_path, revision=source.revision, allow_patterns=WEIGHT_FILES,
                          tqdm_class=progress_class(report))
    except (OSError, ValueError, HfHubHTTPError) as exc:
        raise ModelError(f"cannot download model {source.label}: {exc}",
                         hint="check model.name and your internet connection; a gated model needs its licence "
                              "accepted on the hub and `hf auth login`") from exc
