"""The collector's errors: one base, each subclass says whether it is retriable."""

from __future__ import annotations


class CollectorError(Exception):
    """Base of every error the collector raises."""

    retriable: bool = False


class StoreUnavailableError(CollectorError):
    """PostgreSQL could not take the batch now (down, unreachable, schema missing)."""

    retriable = True


class DeadLetterPublishError(CollectorError):
    """The dead-letter topic did not acknowledge a dead letter in time."""

    retriable = True


class CommitUnavailableError(CollectorError):
    """The broker did not take an offset commit; the batch stays uncommitted."""

    retriable = True
