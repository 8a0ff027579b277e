"""The `openai` backend against a real HTTP server that follows OpenAI's API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.trainer.errors import FineTuneCancelledError, TrainingFailedError
from services.trainer.finetune_openai import OpenAIFineTuner
from services.trainer.settings import OpenAIBackendSettings
from tests.conftest import wait_until
from tests.trainer.fake_openai import FakeOpenAI

ROW = {
    "messages": [
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
    ]
}


@pytest.fixture
def fake():
    server = FakeOpenAI()
    server.base_url = server.start()
    yield server
    server.stop()


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(ROW) + "\n" for _ in range(10)))
    return path


def tuner_for(fake: FakeOpenAI, **overrides) -> OpenAIFineTuner:
    settings = OpenAIBackendSettings(
        base_url=fake.base_url,
        api_key=overrides.pop("api_key", fake.api_key),
        poll_initial_s=0.01,
        poll_max_s=0.05,
        max_retries=overrides.pop("max_retries", 0),
        **overrides,
    )
    return OpenAIFineTuner(settings)


async def test_job_is_followed_to_its_fine_tuned_model(fake, train_file):
    tuner = tuner_for(fake, n_epochs=3)

    job = await tuner.run(train_file, suffix="bot-v2")
    await tuner.close()

    assert job.fine_tuned_model == "ft:gpt-4o-mini-2024-07-18:org-fake:bot-v2:abc123"
    assert job.statuses == ["validating_files", "queued", "running", "succeeded"]
    assert fake.contents[job.training_file] == train_file.read_bytes()
    created = fake.jobs[job.job_id]
    assert created["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 3}},
    }
    assert ("GET", f"/v1/fine_tuning/jobs/{job.job_id}/events") in fake.requests


async def test_dpo_method_is_asked_for_when_configured(fake, train_file):
    tuner = tuner_for(fake, method="dpo")

    job = await tuner.run(train_file, suffix="bot-v3")
    await tuner.close()

    assert fake.jobs[job.job_id]["method"]["type"] == "dpo"


async def test_failed_job_raises_with_openai_error_code(fake, train_file):
    fake.outcome = "failed"
    tuner = tuner_for(fake)

    with pytest.raises(TrainingFailedError) as failed:
        await tuner.run(train_file, suffix="bot-v2")
    await tuner.close()

    assert "invalid_training_file" in str(failed.value)
    assert failed.value.retriable is False


async def test_failure_on_openai_side_is_retriable(fake, train_file):
    fake.outcome, fake.failure_code = "failed", "server_error"
    tuner = tuner_for(fake)

    with pytest.raises(TrainingFailedError) as failed:
        await tuner.run(train_file, suffix="bot-v2")
    await tuner.close()

    assert failed.value.retriable is True


async def test_stop_cancels_the_running_job(fake, train_file):
    fake.hold_running = True
    tuner = tuner_for(fake)
    stop = asyncio.Event()

    run = asyncio.create_task(tuner.run(train_file, suffix="bot-v2", stop=stop))
    await wait_until(
        lambda: any(job["status"] == "running" for job in fake.jobs.values())
    )
    stop.set()
    with pytest.raises(FineTuneCancelledError):
        await run
    await tuner.close()

    [job] = fake.jobs.values()
    assert job["status"] == "cancelled"
    assert ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel") in fake.requests


async def test_job_past_its_timeout_is_cancelled(fake, train_file):
    fake.hold_running = True
    tuner = tuner_for(fake, timeout_s=0.2)

    with pytest.raises(FineTuneCancelledError, match="timed out"):
        await tuner.run(train_file, suffix="bot-v2")
    await tuner.close()

    assert [job["status"] for job in fake.jobs.values()] == ["cancelled"]


async def test_job_cancelled_by_someone_else_raises(fake, train_file):
    fake.hold_running = True
    tuner = tuner_for(fake)

    run = asyncio.create_task(tuner.run(train_file, suffix="bot-v2"))
    await wait_until(
        lambda: any(job["status"] == "running" for job in fake.jobs.values())
    )
    for job in fake.jobs.values():
        job["status"] = "cancelled"
    with pytest.raises(FineTuneCancelledError, match="was cancelled"):
        await run
    await tuner.close()


async def test_wrong_key_is_refused_and_not_retriable(fake, train_file):
    tuner = tuner_for(fake, api_key="sk-wrong")

    with pytest.raises(TrainingFailedError, match="HTTP 401") as refused:
        await tuner.run(train_file, suffix="bot-v2")
    await tuner.close()

    assert refused.value.retriable is False
    assert fake.files == {}


async def test_unknown_model_is_a_bad_request(fake, train_file):
    tuner = tuner_for(fake, model="gpt-nonexistent")

    with pytest.raises(TrainingFailedError, match="HTTP 400") as refused:
        await tuner.run(train_file, suffix="bot-v2")
    await tuner.close()

    assert "not available" in str(refused.value)
    assert refused.value.retriable is False


async def test_server_errors_are_retriable_when_the_client_gives_up(fake, train_file):
    fake.faults = [500]
    tuner = tuner_for(fake)

    with pytest.raises(TrainingFailedError, match="HTTP 500") as failed:
        await tuner.run(train_file, suffix="bot-v2")
    await tuner.close()

    assert failed.value.retriable is True


async def test_rate_limit_and_server_errors_are_retried_by_the_client(fake, train_file):
    fake.faults = [429, 503]
    tuner = tuner_for(fake, max_retries=2)

    job = await tuner.run(train_file, suffix="bot-v2")
    await tuner.close()

    assert job.status == "succeeded"
    assert fake.requests[:3] == [("POST", "/v1/files")] * 3
