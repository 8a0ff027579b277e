"""Dataset snapshots on the real PostgreSQL: traceability, pairs, hash, export."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.trainer.openai_format import validate_file
from services.trainer.snapshot import build_dataset, count_new_rated
from tests.trainer.signals import add_feedback, add_interaction, rated

pytestmark = pytest.mark.integration

ROUTE = "bot"


async def seed(pool):
    ids = {}
    ids["peru"] = await rated(pool, ROUTE, "Capital of Peru?", "Lima.", 1)
    ids["chad_good"] = await rated(pool, ROUTE, "Capital of Chad?", "N'Djamena.", 1)
    ids["chad_bad"] = await rated(pool, ROUTE, "Capital of Chad?", "Abuja.", -1)
    wrong = await add_interaction(pool, ROUTE, "Capital of Mali?", "Dakar.")
    ids["mali"] = (
        wrong,
        await add_feedback(pool, wrong, "correction", text="Bamako, mail a@b.example"),
    )
    failed = await add_interaction(pool, ROUTE, "Capital of Iran?", "", error={"x": 1})
    await add_feedback(pool, failed, "thumbs", 1)
    await rated(pool, "other-route", "Capital of Peru?", "Lima.", 1)
    # Another project naming these interactions shapes nothing: a poisoned
    # correction, and a rating of an interaction no one of its project rated.
    await add_feedback(
        pool, ids["peru"][0], "correction", text="Quito.", project_id="intruder"
    )
    unrated = await add_interaction(pool, ROUTE, "Capital of Laos?", "Hanoi.")
    await add_feedback(pool, unrated, "thumbs", 1, project_id="intruder")
    return ids


async def test_snapshot_rows_trace_back_to_their_signals(pg_pool, tmp_path):
    ids = await seed(pg_pool)
    window = datetime.now(UTC)

    dataset = await build_dataset(
        pg_pool,
        ROUTE,
        window_end=window,
        exclude=("flywheel_split", "eval"),
        holdout_share=0.0,
        max_tokens=256,
        out_dir=tmp_path,
    )

    snapshot = await pg_pool.fetchrow(
        "SELECT * FROM datasets WHERE dataset_id = $1", dataset.dataset_id
    )
    assert snapshot["content_sha256"] == dataset.content_sha256()
    assert snapshot["window_end"] == window
    assert snapshot["dropped"] == {"failed_call": 1}
    assert snapshot["masked"] == {"completion": 1}
    assert snapshot["counts"] == {
        "train": 3,
        "holdout": 0,
        "pairs_train": 2,
        "pairs_holdout": 0,
    }
    rows = await pg_pool.fetch(
        "SELECT * FROM dataset_rows WHERE dataset_id = $1 ORDER BY row_no",
        dataset.dataset_id,
    )
    sft = {(r["interaction_id"], r["feedback_id"]) for r in rows if r["kind"] == "sft"}
    assert sft == {ids["peru"], ids["chad_good"], ids["mali"]}
    pairs = {
        r["completion"]: (r["rejected"], r["rejected_interaction_id"])
        for r in rows
        if r["kind"] == "preference"
    }
    assert pairs == {
        "N'Djamena.": ("Abuja.", ids["chad_bad"][0]),
        "Bamako, mail [EMAIL]": ("Dakar.", ids["mali"][0]),
    }


async def test_same_window_gives_the_same_content_hash(pg_pool, tmp_path):
    await seed(pg_pool)
    window = datetime.now(UTC)
    options = {
        "window_end": window,
        "exclude": ("flywheel_split", "eval"),
        "holdout_share": 0.3,
        "max_tokens": 256,
        "out_dir": tmp_path,
    }

    first = await build_dataset(pg_pool, ROUTE, **options)
    later = await add_interaction(
        pg_pool, ROUTE, "Capital of Togo?", "Lome.", at=window + timedelta(minutes=1)
    )
    await add_feedback(pg_pool, later, "thumbs", 1)
    second = await build_dataset(pg_pool, ROUTE, **options)
    third = await build_dataset(
        pg_pool, ROUTE, **{**options, "window_end": window + timedelta(minutes=2)}
    )

    assert first.dataset_id != second.dataset_id
    assert first.content_sha256() == second.content_sha256()
    assert third.content_sha256() != first.content_sha256()


async def test_exported_files_pass_the_openai_validator(pg_pool, tmp_path):
    await seed(pg_pool)

    dataset = await build_dataset(
        pg_pool,
        ROUTE,
        window_end=datetime.now(UTC),
        exclude=("flywheel_split", "eval"),
        holdout_share=0.0,
        max_tokens=256,
        out_dir=tmp_path,
    )

    folder = tmp_path / dataset.dataset_id
    assert validate_file(folder / "train.jsonl", min_examples=3) == []
    assert (
        validate_file(folder / "preference_train.jsonl", "preference", min_examples=2)
        == []
    )
    assert len((folder / "train.jsonl").read_text().splitlines()) == 3


async def test_new_rated_counts_distinct_interactions_since_a_time(pg_pool):
    before = datetime.now(UTC)
    interaction, _ = await rated(pg_pool, ROUTE, "Q?", "A.", 1)
    await add_feedback(pg_pool, interaction, "copy", 1)
    await rated(pg_pool, ROUTE, "R?", "B.", -1)
    unrated = await add_interaction(pg_pool, ROUTE, "S?", "C.")
    await add_feedback(pg_pool, unrated, "thumbs", 1, project_id="intruder")

    assert await count_new_rated(pg_pool, ROUTE, before) == 2
    assert await count_new_rated(pg_pool, ROUTE, datetime.now(UTC)) == 0
