from pathlib import Path

import pytest

from services.trainer.backends import LocalBackend, OpenAIBackend
from services.trainer.errors import TrainingFailedError
from services.trainer.finetune_local import parse_args
from services.trainer.settings import OpenAIBackendSettings, TrainingOptions
from services.trainer.store import ModelVersion


def test_local_backend_command_carries_every_training_option():
    options = TrainingOptions(
        epochs=2, max_steps=7, batch_size=4, learning_rate=1e-3, rank=8, seed=9
    )
    backend = LocalBackend(options, Path("adapters"))

    command = backend._command(Path("ds/train.jsonl"), Path("adapters/bot-v2"))

    dataset, output, parsed = parse_args(command[3:])
    assert (dataset, output) == (Path("ds/train.jsonl"), Path("adapters/bot-v2"))
    assert (parsed.epochs, parsed.max_steps, parsed.batch_size) == (2, 7, 4)
    assert (parsed.learning_rate, parsed.rank, parsed.seed) == (1e-3, 8, 9)


async def test_openai_backend_refuses_a_file_that_breaks_the_format(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n')
    backend = OpenAIBackend(
        OpenAIBackendSettings(base_url="http://127.0.0.1:9/v1", api_key="sk-x")
    )
    production = ModelVersion(
        "bot-v1", "bot", "m", None, "http://127.0.0.1:9/v1", "production"
    )

    with pytest.raises(TrainingFailedError) as refused:
        await backend.train(tmp_path, "bot-v2", production)

    assert "line 1: missing_messages" in str(refused.value)
    assert "too_few_examples" in str(refused.value)
    assert refused.value.retriable is False
