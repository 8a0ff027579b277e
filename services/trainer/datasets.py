"""Dataset curation: supervised examples from rated interactions and corrections.

A dataset is a reproducible snapshot: the query window, a content hash over its rows,
the counts each cleaning rule dropped, and for every row the interaction and feedback
ids it came from (so a model version traces back to the user signals that shaped it).
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

logger = logging.getLogger(__name__)

# A positive rating: thumbs up, an implicit copy, or a score of at least 0.5.
CANDIDATES_SQL = """
WITH ratings AS (
    SELECT interaction_id,
           bool_or(kind IN ('thumbs', 'copy') AND value > 0
                   OR kind = 'score' AND value >= 0.5) AS any_positive,
           bool_or(kind IN ('thumbs', 'regenerate') AND value < 0
                   OR kind = 'score' AND value < 0.5) AS any_negative,
           (array_agg(event_id ORDER BY created_at DESC))[1] AS feedback_id
    FROM feedback
    WHERE kind IN ('thumbs', 'score', 'copy', 'regenerate')
    GROUP BY interaction_id
)
SELECT 'positive' AS source, i.interaction_id, r.feedback_id, i.request_messages,
       i.response_text AS completion, i.error IS NOT NULL AS failed, i.metadata
FROM interactions i JOIN ratings r USING (interaction_id)
WHERE i.route = $1 AND i.finished_at <= $2 AND r.any_positive AND NOT r.any_negative
UNION ALL
SELECT 'correction', i.interaction_id, f.event_id, i.request_messages,
       f.text, false, i.metadata
FROM feedback f JOIN interactions i USING (interaction_id)
WHERE i.route = $1 AND i.finished_at <= $2 AND f.kind = 'correction'
  AND f.text IS NOT NULL AND f.text <> ''
"""

NEW_RATED_SQL = """
SELECT count(DISTINCT f.interaction_id)
FROM feedback f JOIN interactions i USING (interaction_id)
WHERE i.route = $1 AND f.stored_at > $2
"""


@dataclass(frozen=True)
class Example:
    """One supervised row: the prompt messages and the answer to learn."""

    prompt: list[dict[str, Any]]
    completion: str
    source: str
    interaction_id: uuid.UUID
    feedback_id: uuid.UUID | None

    def prompt_key(self) -> str:
        return orjson.dumps(self.prompt, option=orjson.OPT_SORT_KEYS).decode()

    def chat_row(self) -> dict[str, Any]:
        """The row in OpenAI's chat fine-tuning format."""
        return {
            "messages": [
                *self.prompt,
                {"role": "assistant", "content": self.completion},
            ]
        }


@dataclass
class Dataset:
    """A curated snapshot, split by prompt into train and holdout."""

    dataset_id: str
    route: str
    window_end: datetime
    train: list[Example] = field(default_factory=list)
    holdout: list[Example] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)

    def content_sha256(self) -> str:
        digest = hashlib.sha256()
        for split, rows in (("train", self.train), ("holdout", self.holdout)):
            for example in rows:
                digest.update(split.encode())
                digest.update(
                    orjson.dumps(example.chat_row(), option=orjson.OPT_SORT_KEYS)
                )
        return digest.hexdigest()


def normalize(text: str) -> str:
    """Lowercase, punctuation and runs of whitespace removed: for near-duplicates."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def approx_tokens(example: Example) -> int:
    # About four characters a token for English text with a BPE tokenizer; precise
    # enough to drop the over-long outliers without loading the tokenizer here.
    chars = len(example.completion) + sum(
        len(str(m.get("content", ""))) for m in example.prompt
    )
    return chars // 4 + 4 * (len(example.prompt) + 1)


def in_holdout(prompt_key: str, share: float) -> bool:
    """Stable split by prompt: the same prompt always falls on the same side."""
    value = int.from_bytes(hashlib.sha256(prompt_key.encode()).digest()[:4], "big")
    return value / 2**32 < share


def curate(
    rows: list[dict[str, Any]],
    *,
    exclude: tuple[str, str],
    holdout_share: float,
    max_tokens: int,
) -> tuple[list[Example], list[Example], Counter[str]]:
    """Clean candidate rows and split them by prompt. Pure: no database here."""
    dropped: Counter[str] = Counter()
    seen_exact: set[tuple[str, str]] = set()
    seen_near: set[tuple[str, str]] = set()
    train: list[Example] = []
    holdout: list[Example] = []
    exclude_key, exclude_value = exclude
    for row in rows:
        if (row.get("metadata") or {}).get(exclude_key) == exclude_value:
            dropped["excluded_by_metadata"] += 1
            continue
        if row["failed"] or not row["completion"]:
            dropped["failed_call"] += 1
            continue
        prompt = [
            {"role": m["role"], "content": m.get("content") or ""}
            for m in row["request_messages"]
        ]
        example = Example(
            prompt=prompt,
            completion=row["completion"].strip(),
            source=row["source"],
            interaction_id=row["interaction_id"],
            feedback_id=row["feedback_id"],
        )
        key = example.prompt_key()
        if (key, example.completion) in seen_exact:
            dropped["exact_duplicate"] += 1
            continue
        seen_exact.add((key, example.completion))
        near = (normalize(key), normalize(example.completion))
        if near in seen_near:
            dropped["near_duplicate"] += 1
            continue
        seen_near.add(near)
        if approx_tokens(example) > max_tokens:
            dropped["too_long"] += 1
            continue
        (holdout if in_holdout(key, holdout_share) else train).append(example)
    return train, holdout, dropped


async def count_new_rated(
    pool: asyncpg.Pool, route: str, since: datetime | None
) -> int:
    since = since or datetime.fromtimestamp(0).astimezone()
    return int(await pool.fetchval(NEW_RATED_SQL, route, since))


async def last_window_end(pool: asyncpg.Pool, route: str) -> datetime | None:
    value = await pool.fetchval(
        "SELECT max(window_end) FROM datasets WHERE route = $1", route
    )
    return value  # type: ignore[no-any-return]


async def build_dataset(
    pool: asyncpg.Pool,
    route: str,
    *,
    window_end: datetime,
    exclude: tuple[str, str],
    holdout_share: float,
    max_tokens: int,
    out_dir: Path,
) -> Dataset:
    """Curate, store and export a dataset of everything rated up to `window_end`."""
    rows = [dict(row) for row in await pool.fetch(CANDIDATES_SQL, route, window_end)]
    rows.sort(key=lambda row: (str(row["interaction_id"]), row["source"]))
    train, holdout, dropped = curate(
        rows, exclude=exclude, holdout_share=holdout_share, max_tokens=max_tokens
    )
    dataset = Dataset(
        dataset_id=f"ds-{uuid.uuid4().hex[:10]}",
        route=route,
        window_end=window_end,
        train=train,
        holdout=holdout,
        dropped=dropped,
    )
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(
            "INSERT INTO datasets (dataset_id, route, content_sha256, window_end,"
            " train_rows, holdout_rows, dropped) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            dataset.dataset_id,
            route,
            dataset.content_sha256(),
            window_end,
            len(train),
            len(holdout),
            dict(dropped),
        )
        await connection.executemany(
            "INSERT INTO dataset_rows (dataset_id, row_no, split, prompt, completion,"
            " source, interaction_id, feedback_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [
                (
                    dataset.dataset_id,
                    number,
                    split,
                    example.prompt,
                    example.completion,
                    example.source,
                    example.interaction_id,
                    example.feedback_id,
                )
                for number, (split, example) in enumerate(
                    [("train", e) for e in train] + [("holdout", e) for e in holdout]
                )
            ],
        )
    export_jsonl(dataset, out_dir / dataset.dataset_id)
    logger.info(
        "dataset built dataset=%s train=%d holdout=%d dropped=%s",
        dataset.dataset_id,
        len(train),
        len(holdout),
        dict(dropped),
    )
    return dataset


def export_jsonl(dataset: Dataset, folder: Path) -> None:
    """Write train.jsonl and holdout.jsonl in OpenAI's chat fine-tuning format."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", dataset.train), ("holdout", dataset.holdout)):
        with (folder / f"{name}.jsonl").open("wb") as out:
            for example in rows:
                out.write(orjson.dumps(example.chat_row()) + b"\n")
