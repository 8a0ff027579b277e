"""The write order of overlapping batches, on its own (the store's use: integration)."""

from __future__ import annotations

import asyncio

import pytest

from services.collector.errors import StoreUnavailableError
from services.collector.ordering import (
    EarlierBatchAbandonedError,
    TurnState,
    WriteTurn,
)


async def settles(awaitable: asyncio.Future[None] | asyncio.Task[None]) -> bool:
    """Whether it finished after the loop ran everything ready to run."""
    for _ in range(5):
        await asyncio.sleep(0)
    return awaitable.done()


async def test_first_batch_claims_and_commits_at_once() -> None:
    turn = WriteTurn()

    await turn.may_claim()
    turn.claimed()
    await turn.may_commit()
    turn.committed()

    assert turn.state is TurnState.COMMITTED


async def test_claim_waits_for_the_claim_of_the_batch_before() -> None:
    before = WriteTurn()
    after = WriteTurn(before)
    claim = asyncio.create_task(after.may_claim())

    waited = not await settles(claim)
    before.claimed()

    assert waited
    assert await settles(claim)


async def test_commit_waits_for_the_commit_of_the_batch_before() -> None:
    before = WriteTurn()
    before.claimed()
    after = WriteTurn(before)
    await after.may_claim()
    after.claimed()
    commit = asyncio.create_task(after.may_commit())

    waited = not await settles(commit)
    before.committed()

    assert waited
    assert await settles(commit)
    commit.result()


async def test_failed_attempt_before_makes_the_later_commit_retriable() -> None:
    before = WriteTurn()
    before.claimed()
    after = WriteTurn(before)
    await after.may_claim()
    commit = asyncio.create_task(after.may_commit())
    await settles(commit)

    before.attempt_failed()

    with pytest.raises(StoreUnavailableError) as raised:
        await commit
    assert raised.value.retriable
    # The retry waits for the next claim of the batch before.
    after.attempt_failed()
    claim = asyncio.create_task(after.may_claim())
    assert not await settles(claim)
    before.claimed()
    before.committed()
    assert await settles(claim)
    await after.may_commit()


async def test_abandoned_batch_before_ends_both_waits_for_good() -> None:
    before = WriteTurn()
    after = WriteTurn(before)
    claim = asyncio.create_task(after.may_claim())
    await settles(claim)

    before.abandon()

    with pytest.raises(EarlierBatchAbandonedError) as raised:
        await claim
    assert not raised.value.retriable
    with pytest.raises(EarlierBatchAbandonedError):
        await after.may_commit()


async def test_committed_batch_stays_committed() -> None:
    turn = WriteTurn()
    turn.claimed()
    turn.committed()

    turn.attempt_failed()
    turn.abandon()

    assert turn.state is TurnState.COMMITTED
    assert turn.attempt == 0


async def test_final_turn_forgets_the_one_before() -> None:
    """A steady stream never empties the store: finished turns must not chain up."""
    first = WriteTurn()
    second = WriteTurn(first)
    third = WriteTurn(second)
    for turn in (first, second):
        turn.claimed()
        turn.committed()
    third.abandon()

    assert (second.before, third.before) == (None, None)
