"""Message content sealed at rest: collector writes, trainer reads, key rotation."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from services.collector.handlers import feedback_row, interaction_row
from services.collector.store import EventStore
from services.common.events import encode
from services.common.kafka import Topics, make_producer
from services.common.key_rotation import rotate_content_key
from services.common.sealing import KeyConfigError, Keyring, UnknownKeyError
from services.common.settings import EncryptionSettings, KafkaSettings, PostgresSettings
from services.trainer.snapshot import build_dataset
from tests.conftest import REPO_ROOT, wait_until
from tests.integration.test_collector import (
    collector_settings,
    make_feedback,
    make_interaction,
    send_all,
    start_app,
    stop_app,
)

pytestmark = pytest.mark.integration

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(100, 132))).decode()
ROUTE = "support-bot"


@pytest.fixture
async def producer(kafka_settings: KafkaSettings) -> AsyncIterator[AIOKafkaProducer]:
    client = make_producer(kafka_settings, client_id="encryption-test")
    await client.start()
    yield client
    await client.stop()


def keys(active: str, *entries: str) -> EncryptionSettings:
    return EncryptionSettings(keys=",".join(entries), active_key=active)


def conversation(tag: str) -> tuple[str, str, str]:
    """A prompt, an answer and a correction, each a string found nowhere else."""
    return (
        f"prompt-{tag}-{uuid.uuid4().hex}",
        f"answer-{tag}-{uuid.uuid4().hex}",
        f"correction-{tag}-{uuid.uuid4().hex}",
    )


async def raw_table_text(pool: asyncpg.Pool) -> str:
    rows = await pool.fetch(
        "SELECT t::text AS line FROM interactions t"
        " UNION ALL SELECT t::text FROM feedback t"
    )
    return "\n".join(row["line"] for row in rows)


async def dataset_content(pool: asyncpg.Pool, keyring: Keyring, out: Path) -> dict:
    """What the trainer's dataset builder reads: prompt -> (completions, rejected)."""
    dataset = await build_dataset(
        pool,
        ROUTE,
        window_end=datetime.now(UTC),
        exclude=("flywheel_split", "eval"),
        holdout_share=0.0,
        max_tokens=4096,
        out_dir=out,
        keyring=keyring,
    )
    found: dict[str, set[str]] = {}
    for example in dataset.train:
        found.setdefault(example.prompt[0]["content"], set()).add(example.completion)
    for pair in dataset.pairs_train:
        found.setdefault(pair.prompt[0]["content"], set()).add(f"!{pair.rejected}")
    return found


async def test_collector_with_a_key_stores_no_plaintext_and_trainer_reads_it(
    kafka_settings: KafkaSettings,
    pg_settings: PostgresSettings,
    pg_pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    tmp_path: Path,
) -> None:
    topics = Topics(kafka_settings.topic_prefix)
    encryption = keys("ka", f"ka:{KEY_A}")
    rated_prompt, rated_answer, _ = conversation("rated")
    wrong_prompt, wrong_answer, correction = conversation("corrected")
    rated = make_interaction(
        request_messages=[{"role": "user", "content": rated_prompt}],
        response_text=rated_answer,
    )
    wrong = make_interaction(
        request_messages=[{"role": "user", "content": wrong_prompt}],
        response_text=wrong_answer,
    )
    events = [
        (topics.interactions, rated),
        (topics.interactions, wrong),
        (topics.feedback, make_feedback(rated.interaction_id)),
        (
            topics.feedback,
            make_feedback(
                wrong.interaction_id, kind="correction", value=None, text=correction
            ),
        ),
    ]
    settings = collector_settings(kafka_settings, pg_settings, encryption=encryption)

    await send_all(producer, [(topic, None, encode(event)) for topic, event in events])
    app, task = await start_app(settings)
    try:
        await wait_until(
            lambda: app.intake is not None and app.intake.totals["stored"] == 4,
            timeout_s=60,
        )
    finally:
        await stop_app(app, task)

    raw = await raw_table_text(pg_pool)
    for secret in (rated_prompt, rated_answer, wrong_prompt, wrong_answer, correction):
        assert secret not in raw
    key_ids = await pg_pool.fetch(
        "SELECT content_key_id FROM interactions UNION ALL"
        " SELECT content_key_id FROM feedback"
    )
    assert [row["content_key_id"] for row in key_ids] == ["ka"] * 4
    found = await dataset_content(pg_pool, encryption.keyring, tmp_path)
    assert found == {
        rated_prompt: {rated_answer},
        wrong_prompt: {correction, f"!{wrong_answer}"},
    }
    with pytest.raises(UnknownKeyError, match="'ka'"):
        await dataset_content(pg_pool, Keyring.empty(), tmp_path)


async def store_rated(
    pool: asyncpg.Pool, keyring: Keyring | None, count: int
) -> dict[str, set[str]]:
    """`count` rated interactions, every second corrected, stored like the collector.

    `pool` is one as the collector's store uses it (jsonb as JSON text).
    """
    store = EventStore(pool)
    expected: dict[str, set[str]] = {}
    for index in range(count):
        prompt, answer, correction = conversation(str(index))
        interaction = make_interaction(
            request_messages=[{"role": "user", "content": prompt}],
            response_text=answer,
        )
        feedback = [make_feedback(interaction.interaction_id)]
        expected[prompt] = {answer}
        if index % 2:
            feedback.append(
                make_feedback(
                    interaction.interaction_id,
                    kind="correction",
                    value=None,
                    text=correction,
                )
            )
            expected[prompt] |= {correction, f"!{answer}"}
        await store.insert_batch(
            [interaction_row(interaction, keyring)],
            [feedback_row(item, keyring) for item in feedback],
        )
    return expected


async def key_ids(pool: asyncpg.Pool) -> list[str | None]:
    rows = await pool.fetch(
        "SELECT content_key_id FROM interactions UNION ALL"
        " SELECT content_key_id FROM feedback"
    )
    return [row["content_key_id"] for row in rows]


async def test_rotate_reseals_old_key_and_plaintext_rows_once(
    pg_pool: asyncpg.Pool, store_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    old = keys("ka", f"ka:{KEY_A}").keyring
    expected = await store_rated(store_pool, old, 5)
    expected |= await store_rated(store_pool, None, 4)
    both = keys("kb", f"ka:{KEY_A}", f"kb:{KEY_B}").keyring
    only_new = keys("kb", f"kb:{KEY_B}").keyring

    first = await rotate_content_key(pg_pool, both, batch_size=3)
    second = await rotate_content_key(pg_pool, both, batch_size=3)

    # 9 interactions; 9 ratings and 2 + 2 corrections.
    assert first.resealed == {"interactions": 9, "feedback": 13}
    assert first.remaining == {"interactions": 0, "feedback": 0}
    assert second.resealed == {"interactions": 0, "feedback": 0}
    assert set(await key_ids(pg_pool)) == {"kb"}
    raw = await raw_table_text(pg_pool)
    for texts in expected.items():
        for text in (texts[0], *texts[1]):
            assert text.removeprefix("!") not in raw
    assert await dataset_content(pg_pool, only_new, tmp_path) == expected


async def test_rotate_skips_a_locked_row_and_a_rerun_takes_it(
    pg_pool: asyncpg.Pool, store_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    expected = await store_rated(store_pool, None, 3)
    keyring = keys("kb", f"kb:{KEY_B}").keyring
    locked_id = await pg_pool.fetchval(
        "SELECT event_id FROM interactions ORDER BY event_id LIMIT 1"
    )

    async with pg_pool.acquire() as holder, holder.transaction():
        await holder.execute(
            "SELECT 1 FROM interactions WHERE event_id = $1 FOR UPDATE", locked_id
        )
        during = await rotate_content_key(pg_pool, keyring, batch_size=2)
    after = await rotate_content_key(pg_pool, keyring, batch_size=2)

    assert during.resealed == {"interactions": 2, "feedback": 4}
    assert during.remaining == {"interactions": 1, "feedback": 0}
    assert after.resealed == {"interactions": 1, "feedback": 0}
    assert set(await key_ids(pg_pool)) == {"kb"}
    assert await dataset_content(pg_pool, keyring, tmp_path) == expected


async def test_cli_rotate_key_prints_counts_and_refuses_bad_keys(
    pg_settings: PostgresSettings, pg_pool: asyncpg.Pool, store_pool: asyncpg.Pool
) -> None:
    await store_rated(store_pool, keys("ka", f"ka:{KEY_A}").keyring, 2)
    env = {
        **os.environ,
        "FLYWHEEL_ENCRYPTION__KEYS": f"ka:{KEY_A},kb:{KEY_B}",
        "FLYWHEEL_ENCRYPTION__ACTIVE_KEY": "kb",
    }
    command = [
        sys.executable,
        "-m",
        "services.cli",
        "db",
        "rotate-key",
        "--dsn",
        pg_settings.dsn.get_secret_value(),
        "--schema",
        pg_settings.db_schema,
    ]

    async def run(environment: dict[str, str]) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=REPO_ROOT,
            env=environment,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
        return int(process.returncode or 0), output.decode()

    code, output = await run(env)
    again_code, again = await run(env)
    bad_code, bad = await run({**env, "FLYWHEEL_ENCRYPTION__ACTIVE_KEY": "kc"})

    assert code == 0, output
    assert "re-sealed 5 rows to key 'kb' (interactions 2, feedback 3)" in output
    assert again_code == 0, again
    assert "re-sealed 0 rows" in again
    assert bad_code == 2
    assert "FLYWHEEL_ENCRYPTION__ACTIVE_KEY='kc'" in bad
    assert set(await key_ids(pg_pool)) == {"kb"}


async def test_schema_refuses_a_row_with_a_key_id_and_plaintext_content(
    pg_pool: asyncpg.Pool,
    store_pool: asyncpg.Pool,
) -> None:
    keyring = keys("ka", f"ka:{KEY_A}").keyring
    interaction = make_interaction()
    feedback = make_feedback(interaction.interaction_id, kind="comment", text="hi")
    await EventStore(store_pool).insert_batch(
        [interaction_row(interaction, keyring)], [feedback_row(feedback, keyring)]
    )

    with pytest.raises(asyncpg.CheckViolationError):
        await pg_pool.execute(
            "UPDATE interactions SET response_text = 'leaked' WHERE event_id = $1",
            interaction.event_id,
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await pg_pool.execute(
            "UPDATE feedback SET text = 'leaked' WHERE event_id = $1",
            feedback.event_id,
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await pg_pool.execute(
            "UPDATE interactions SET content_key_id = NULL WHERE event_id = $1",
            interaction.event_id,
        )


async def test_rotate_without_an_active_key_refuses(pg_pool: asyncpg.Pool) -> None:
    with pytest.raises(KeyConfigError, match="FLYWHEEL_ENCRYPTION__ACTIVE_KEY"):
        await rotate_content_key(pg_pool, Keyring.empty())
