"""The inference server over HTTP, driven by the official `openai` client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from services.inference.app import InferenceApp
from services.inference.settings import InferenceSettings
from tests.inference.support import BASE_MODEL, running_server, shared_model

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "What is the capital of Burkina Faso?"}]


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
async def server(adapters_dir: Path) -> AsyncIterator[tuple[InferenceApp, str]]:
    async with running_server(shared_model(), adapters_dir) as running:
        yield running


@pytest.fixture
async def client(server: tuple[InferenceApp, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=server[1], api_key="unused", max_retries=0
    ) as client:
        yield client


async def test_chat_completion_answers_in_openai_shape(
    client: openai.AsyncOpenAI,
) -> None:
    completion = await client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, temperature=0, max_tokens=64
    )

    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert completion.model == BASE_MODEL
    assert "Burkina" in (choice.message.content or "")
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 10
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_streamed_answer_matches_whole_answer_and_ends_with_usage(
    client: openai.AsyncOpenAI,
) -> None:
    whole = await client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, temperature=0, max_tokens=64
    )

    stream = await client.chat.completions.create(
        model=BASE_MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content
    assert finishes[-1] == "stop"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


async def test_max_tokens_cuts_answer_with_length_finish(
    client: openai.AsyncOpenAI,
) -> None:
    completion = await client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, temperature=0, max_completion_tokens=3
    )

    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


async def test_stop_sequence_ends_answer_before_it(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, temperature=0, stop=["Faso"]
    )

    content = completion.choices[0].message.content or ""
    assert "Burkina" in content
    assert "Faso" not in content
    assert completion.choices[0].finish_reason == "stop"


async def test_sampling_with_a_seed_repeats(client: openai.AsyncOpenAI) -> None:
    options = {"temperature": 1.0, "top_p": 0.95, "seed": 7, "max_tokens": 12}

    first = await client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, **options
    )
    second = await client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, **options
    )

    assert first.choices[0].message.content == second.choices[0].message.content


async def test_models_lists_base_model_and_adapter_folders(
    client: openai.AsyncOpenAI, adapters_dir: Path
) -> None:
    (adapters_dir / "listed-v1").mkdir()
    (adapters_dir / "listed-v1" / "adapter_config.json").write_text("{}")
    (adapters_dir / "half-written").mkdir()

    models = await client.models.list()

    ids = [model.id for model in models.data]
    assert ids[0] == BASE_MODEL
    assert "listed-v1" in ids
    assert "half-written" not in ids


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"messages": []}, "messages"),
    ],
)
async def test_bad_input_gets_400_in_openai_error_shape(
    client: openai.AsyncOpenAI, options: dict[str, object], param: str
) -> None:
    request = {"model": BASE_MODEL, "messages": QUESTION} | options

    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(**request)  # type: ignore[call-overload]

    error = caught.value.response.json()["error"]
    assert caught.value.status_code == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert set(error) == {"message", "type", "param", "code"}


async def test_body_that_is_not_json_gets_400(server: tuple[InferenceApp, str]) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{server[1]}/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_unknown_model_gets_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="no-such-adapter", messages=QUESTION)

    error = caught.value.response.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"


async def test_healthz_is_503_until_model_is_loaded(tmp_path: Path) -> None:
    app = InferenceApp(InferenceSettings(port=0, adapters_dir=tmp_path))
    transport = httpx.ASGITransport(app=app.asgi)

    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        loading = await http.get("/healthz")
        refused = await http.post(
            "/v1/chat/completions", json={"model": BASE_MODEL, "messages": QUESTION}
        )
        app.model = shared_model()
        ready = await http.get("/healthz")

    assert loading.status_code == 503
    assert refused.status_code == 503
    assert json.loads(refused.content)["error"]["code"] == "loading"
    assert ready.status_code == 200
