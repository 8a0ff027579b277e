"""The analyzer's errors: one base, named situations, each saying whether to retry."""

from __future__ import annotations


class AnalyzerError(Exception):
    """Base of every analyzer error."""

    retriable = False


class InvalidEventError(AnalyzerError):
    """An input message is not an event the analyzer can read; it is counted, skipped.

    The collector dead-letters the same message with its bytes, so nothing is lost.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class VerdictDeliveryError(AnalyzerError):
    """The trainer did not take a verdict; the next evaluation sends it again."""

    retriable = True
