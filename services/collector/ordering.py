"""The order in which overlapping batches claim their keys and commit their rows.

A batch's rows are written while the batch before it still commits (PostgreSQL's
flush of the commit and the Kafka offset commit take milliseconds that the next
batch's COPY can use). Exactly-once effects still need the order of one batch at a
time, for an event (or interaction id) repeated across two batches: the first in
Kafka order must win. Two rules keep it:

1. A batch writes its first key only after the batch before it has written all of
   its keys (in its transaction, not committed yet). A repeated key then makes the
   later batch's write wait on PostgreSQL's lock for that key until the earlier
   transaction ends: committed, the later one finds it taken; rolled back, free.
2. A batch commits only after the batch before it committed. When the batch before
   fails instead, the later one rolls back too (its keys may be the earlier batch's
   to claim on its retry) and tries again after the earlier batch's next claim.

A later batch may still commit when the batch before failed once and then committed
on its retry before the later one asked to commit: its keys were written after the
earlier batch's first claim, and that batch's retry claimed its own again first.

Waits only ever point backwards (to earlier batches), except a retried earlier
batch waiting on a later batch's lock: the later batch rolls back as soon as it asks
to commit and finds the failure (it asks right after its COPYs), so that wait ends.
Other sessions' DDL on the event tables (a new day partition) could join such waits
into a cycle PostgreSQL cannot see; the store therefore locks the event tables at the
start of each batch's transaction (services/collector/store.py).
"""

from __future__ import annotations

import asyncio
from enum import Enum, auto

from services.collector.errors import CollectorError, StoreUnavailableError


class TurnState(Enum):
    """Where a batch's current attempt at writing stands."""

    WRITING = auto()  # keys not all written yet (or an attempt failed: again)
    CLAIMED = auto()  # every key written, transaction open
    COMMITTED = auto()  # rows committed: final
    ABANDONED = auto()  # the batch ended without committing: final


class EarlierBatchAbandonedError(CollectorError):
    """The batch before ended without committing its rows; this one must not."""

    retriable = False


class WriteTurn:
    """One batch's place in the write order (see the module's docstring).

    Whoever writes the batch (the store; the intake's row-by-row path) calls
    `may_claim` before its first key, `claimed` after its last, `may_commit`
    before COMMIT (or before a write that must follow the earlier batch's commit),
    then `committed`; `attempt_failed` when an attempt fails. The batch's owner calls
    `abandon` when the batch ends uncommitted. A turn forgets the one before it once
    its own outcome is final, so finished turns do not pile up.
    """

    def __init__(self, before: WriteTurn | None = None) -> None:
        self.before = before
        self.state = TurnState.WRITING
        self.attempt = 0
        self._changed = asyncio.Event()
        # The attempt of `before` whose claim this batch's write followed.
        self._followed: int | None = None

    def _set(self, state: TurnState) -> None:
        self.state = state
        if state in (TurnState.COMMITTED, TurnState.ABANDONED):
            self.before = None
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _until_changed(self) -> None:
        await self._changed.wait()

    async def may_claim(self) -> None:
        """Wait until the batch before has written all its keys (or committed).

        Raises EarlierBatchAbandonedError when it ended uncommitted.
        """
        before = self.before
        if before is None:
            return
        while before.state is TurnState.WRITING:
            await before._until_changed()
        if before.state is TurnState.ABANDONED:
            raise EarlierBatchAbandonedError("the batch before ended uncommitted")
        self._followed = before.attempt

    def claimed(self) -> None:
        """Every key of this attempt is written (its transaction is still open)."""
        self._set(TurnState.CLAIMED)

    async def may_commit(self) -> None:
        """Wait until the batch before committed; raise when its attempt failed.

        StoreUnavailableError (retriable) when the attempt this write followed has
        failed since: roll back, and the retry waits for that batch's next claim.
        """
        before = self.before
        if before is None:
            return
        while True:
            if before.state is TurnState.COMMITTED:
                return
            if before.state is TurnState.ABANDONED:
                raise EarlierBatchAbandonedError("the batch before ended uncommitted")
            if self._followed is not None and before.attempt != self._followed:
                raise StoreUnavailableError(
                    "the batch before failed after this one wrote its keys; "
                    "rolled back to write after it"
                )
            await before._until_changed()

    def committed(self) -> None:
        """This batch's rows are committed."""
        self._set(TurnState.COMMITTED)

    def attempt_failed(self) -> None:
        """This attempt's transaction is rolled back; the next one starts over."""
        if self.state is TurnState.COMMITTED:
            return
        self.attempt += 1
        self._followed = None
        self._set(TurnState.WRITING)

    def abandon(self) -> None:
        """The batch ends here without committing (stop, failure, cancellation)."""
        if self.state is not TurnState.COMMITTED:
            self._set(TurnState.ABANDONED)
