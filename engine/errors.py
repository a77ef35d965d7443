"""Errors a user can act on: each carries a plain-words hint saying what to do."""

from __future__ import annotations


class TunewizError(Exception):
    """A problem with the user's inputs or machine, reported without a traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class DataError(TunewizError):
    """The dataset cannot be read or has no usable examples."""


class ModelError(TunewizError):
    """The model cannot be found or loaded."""


class HardwareError(TunewizError):
    """The machine cannot run what the spec asks for."""


OOM_HINT = (
    "The GPU ran out of memory. Try, in this order: a smaller training.micro_batch_size (raise "
    "training.gradient_accumulation to keep the same effective batch), a shorter "
    "training.max_seq_length, training.gradient_checkpointing = true, method = \"qlora\", or a "
    "smaller model. `tunewiz recommend` estimates what fits."
)


def hint_for(exc: BaseException) -> str | None:
    """The hint to show for an exception, if we know one."""
    if isinstance(exc, TunewizError):
        return exc.hint
    text = f"{type(exc).__name__}: {exc}"
    if "OutOfMemoryError" in type(exc).__name__ or "out of memory" in text.lower():
        return OOM_HINT
    if isinstance(exc, MemoryError):
        return "The machine ran out of RAM. Close other programs, or lower the micro-batch or max sequence length."
    return None


# The `tunewiz` command's exit statuses (the README lists them).
EXIT_FAILED = 1
"""The run the command trained or followed failed, or the data check found problems."""
EXIT_ERROR = 2
"""The command could not do what was asked: a bad command line or input, a missing run, a full disk."""
EXIT_INTERRUPTED = 130
"""Ctrl-C, as shells report SIGINT."""
