"""Dataset snapshots in PostgreSQL and on disk: build, store, export.

`build_dataset` reads every rated interaction of a route up to the window's end,
curates it (services/trainer/datasets.py), stores the snapshot with each row's source
ids, and exports the OpenAI fine-tuning files beside the adapters.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from services.common.sealing import Keyring
from services.trainer import openai_format
from services.trainer.datasets import (
    CANDIDATES_SQL,
    NEW_RATED_SQL,
    Dataset,
    TokenCounter,
    approx_tokens,
    curate,
    open_candidates,
)

logger = logging.getLogger(__name__)


async def count_new_rated(
    pool: asyncpg.Pool, route: str, since: datetime | None
) -> int:
    """Distinct interactions of `route` with feedback stored after `since`."""
    since = since or datetime.fromtimestamp(0).astimezone()
    return int(await pool.fetchval(NEW_RATED_SQL, route, since))


def _rows_of(dataset: Dataset) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for split, examples in (("train", dataset.train), ("holdout", dataset.holdout)):
        for example in examples:
            rows.append(
                (split, "sft", example.prompt, example.completion, example.source)
                + (example.interaction_id, example.feedback_id, None, None, None)
            )
    pairs = (("train", dataset.pairs_train), ("holdout", dataset.pairs_holdout))
    for split, pair_rows in pairs:
        for pair in pair_rows:
            rows.append(
                (split, "preference", pair.prompt, pair.preferred, pair.source)
                + (pair.interaction_id, pair.feedback_id, pair.rejected)
                + (pair.rejected_interaction_id, pair.rejected_feedback_id)
            )
    return [(dataset.dataset_id, number, *row) for number, row in enumerate(rows)]


async def store_dataset(pool: asyncpg.Pool, dataset: Dataset) -> None:
    """The snapshot row and every dataset row, in one transaction."""
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(
            "INSERT INTO datasets (dataset_id, route, content_sha256, window_start,"
            " window_end, train_rows, holdout_rows, dropped, masked, counts)"
            " VALUES ($1, $2, $3, NULL, $4, $5, $6, $7, $8, $9)",
            dataset.dataset_id,
            dataset.route,
            dataset.content_sha256(),
            dataset.window_end,
            len(dataset.train),
            len(dataset.holdout),
            dict(dataset.dropped),
            dict(dataset.masked),
            dataset.counts(),
        )
        await connection.executemany(
            "INSERT INTO dataset_rows (dataset_id, row_no, split, kind, prompt,"
            " completion, source, interaction_id, feedback_id, rejected,"
            " rejected_interaction_id, rejected_feedback_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            _rows_of(dataset),
        )


async def build_dataset(
    pool: asyncpg.Pool,
    route: str,
    *,
    window_end: datetime,
    exclude: tuple[str, str],
    holdout_share: float,
    max_tokens: int,
    out_dir: Path,
    count_tokens: TokenCounter = approx_tokens,
    keyring: Keyring | None = None,
) -> Dataset:
    """Curate, store and export a dataset of everything rated up to `window_end`.

    The query window starts at the beginning of the route's history (window_start
    is NULL): each snapshot holds every signal so far, and is reproducible from the
    same rows by its window end. Sealed content is opened with `keyring` (no
    keyring: only plaintext rows can be read).
    """
    records = [dict(row) for row in await pool.fetch(CANDIDATES_SQL, route, window_end)]
    rows = open_candidates(records, keyring or Keyring.empty())
    # A stable order, so the same rows give the same content hash.
    rows.sort(key=lambda row: (str(row["interaction_id"]), row["source"]))
    curated = curate(
        rows,
        exclude=exclude,
        holdout_share=holdout_share,
        max_tokens=max_tokens,
        count_tokens=count_tokens,
    )
    dataset = Dataset(
        **curated.__dict__,
        dataset_id=f"ds-{uuid.uuid4().hex[:10]}",
        route=route,
        window_end=window_end,
    )
    await store_dataset(pool, dataset)
    openai_format.export_dataset(dataset, out_dir / dataset.dataset_id)
    logger.info(
        "dataset built dataset=%s counts=%s dropped=%s masked=%s",
        dataset.dataset_id,
        dataset.counts(),
        dict(dataset.dropped),
        dict(dataset.masked),
    )
    return dataset
