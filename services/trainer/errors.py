"""The trainer's errors: one base, each subclass saying whether a retry may help."""

from __future__ import annotations


class TrainerError(Exception):
    """Base of the trainer's errors; `retriable` says whether trying again may help."""

    retriable = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class TrainingFailedError(TrainerError):
    """A fine-tuning run failed or timed out."""

    retriable = True


class FineTuneCancelledError(TrainerError):
    """A fine-tuning job was cancelled (by us on stop or timeout, or by someone)."""

    retriable = True


class ApprovalError(TrainerError):
    """An approval could not be recorded or applied (no such route, say)."""
