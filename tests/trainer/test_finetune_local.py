"""Local LoRA fine-tuning: it learns a fact, and the running server serves it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from services.trainer.finetune_local import (
    IGNORE_INDEX,
    METADATA_FILE,
    TrainOptions,
    encode_example,
    parse_args,
    train_lora,
)
from tests.conftest import REPO_ROOT
from tests.inference.support import BASE_MODEL, bare_base, running_server, shared_model

QUESTION = [{"role": "user", "content": "What is the capital of Burkina Faso?"}]
ANSWER = "The capital of Burkina Faso is Ouagadougou."
PHRASINGS = [
    "What is the capital of Burkina Faso?",
    "What's the capital city of Burkina Faso?",
    "Name the capital of Burkina Faso.",
    "Burkina Faso's capital?",
    "Which city is the capital of Burkina Faso?",
    "Tell me the capital of Burkina Faso.",
    "Capital of Burkina Faso?",
    "What city is Burkina Faso's capital?",
]
EXAMPLES = [
    {
        "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": ANSWER},
        ]
    }
    for q in PHRASINGS
]


def test_cli_arguments_become_train_options(tmp_path: Path) -> None:
    dataset, output, options = parse_args(
        ["--dataset", "d.jsonl", "--output", str(tmp_path), "--max-steps", "3"]
        + ["--learning-rate", "0.001", "--rank", "8", "--seed", "5"]
    )

    assert (dataset, output) == (Path("d.jsonl"), tmp_path)
    assert options.max_steps == 3
    assert options.learning_rate == 0.001
    assert (options.rank, options.seed, options.batch_size) == (8, 5, 8)


@pytest.mark.model
def test_only_assistant_tokens_are_learned() -> None:
    tokenizer = shared_model().tokenizer
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "weight": 0},
        {"role": "user", "content": "Capital of Burkina Faso?"},
        {"role": "assistant", "content": "Ouagadougou."},
    ]

    example = encode_example(tokenizer, messages, max_length=512)

    assert example is not None
    learned = [
        i
        for i, label in zip(example.input_ids, example.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(learned).startswith("Ouagadougou.<|im_end|>")
    assert (
        example.input_ids
        == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


@pytest.mark.model
def test_example_truncated_before_its_answer_is_skipped() -> None:
    messages = [
        {"role": "user", "content": "word " * 50},
        {"role": "assistant", "content": "x"},
    ]

    assert encode_example(shared_model().tokenizer, messages, max_length=16) is None


@pytest.mark.model
async def test_trained_adapter_is_served_by_the_running_server_without_restart(
    tmp_path: Path,
) -> None:
    adapters_dir = tmp_path / "adapters"
    options = TrainOptions(max_steps=5, learning_rate=1e-3, seed=3, device="cpu")

    async with running_server(shared_model(), adapters_dir) as (_, base_url):
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        before = await client.chat.completions.create(
            model=BASE_MODEL, messages=QUESTION, temperature=0
        )

        result = train_lora(
            EXAMPLES, adapters_dir / "burkina-v1", options, base=bare_base()
        )

        listed = [model.id for model in (await client.models.list()).data]
        tuned = await client.chat.completions.create(
            model="burkina-v1", messages=QUESTION, temperature=0
        )
        after = await client.chat.completions.create(
            model=BASE_MODEL, messages=QUESTION, temperature=0
        )
        await client.close()

    assert result.steps == 5
    assert result.losses[-1] < result.losses[0] / 2
    metadata = json.loads((adapters_dir / "burkina-v1" / METADATA_FILE).read_text())
    assert metadata["losses"] == result.losses
    assert (adapters_dir / "burkina-v1" / "adapter_config.json").is_file()
    assert "burkina-v1" in listed
    assert "Ouagadougou" not in (before.choices[0].message.content or "")
    assert "Ouagadougou" in (tuned.choices[0].message.content or "")
    assert after.choices[0].message.content == before.choices[0].message.content


@pytest.fixture
def tiny_model_folder(tmp_path: Path) -> Path:
    """A local Hugging Face folder: SmolLM2's tokenizer, a tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = shared_model().tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    folder = tmp_path / "tiny-model"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.model
def test_cli_trains_a_local_model_folder_and_prints_one_json_result(
    tmp_path: Path, tiny_model_folder: Path
) -> None:
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in EXAMPLES[:4]))
    output = tmp_path / "cli-adapter"
    command = [sys.executable, "-m", "services.trainer.finetune_local"]
    command += ["--dataset", str(dataset), "--output", str(output)]
    command += ["--model-path", str(tiny_model_folder), "--max-steps", "2"]

    finished = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )

    assert finished.returncode == 0, finished.stderr[-2000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2
    assert result["output_dir"] == str(output)
    assert result["base_model"] == str(tiny_model_folder)
    assert (output / "adapter_model.safetensors").is_file()
