"""LoRA fine-tuning of the local model with transformers + peft (CPU, or a GPU).

`train_lora` trains on OpenAI chat fine-tuning rows (`{"messages": [...]}`), with the
loss on the assistant tokens only, and saves a peft adapter the inference server can
serve by folder name. Run as a subprocess:

    python -m services.trainer.finetune_local --dataset train.jsonl --output DIR

which prints the result as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from services.inference.protocol import flatten_content
from services.inference.settings import ModelSource

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
METADATA_FILE = "flywheel_adapter.json"


class TrainOptions(BaseModel):
    """Hyper-parameters of one LoRA run; `max_steps`, when set, overrides `epochs`."""

    epochs: int = Field(default=3, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=5e-4, gt=0)
    rank: int = Field(default=16, ge=1)
    alpha: int | None = Field(default=None, ge=1)  # None: twice the rank
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0
    max_length: int = Field(default=512, ge=8)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(default=2, ge=1)
    model: ModelSource = Field(default_factory=ModelSource)


@dataclass(frozen=True)
class TrainResult:
    """What a run did: where the adapter is and how the loss went."""

    output_dir: str
    base_model: str
    steps: int
    losses: list[float]
    seconds: float
    examples: int
    skipped_examples: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]


def encode_example(
    tokenizer: Any, messages: Sequence[dict[str, Any]], max_length: int
) -> EncodedExample | None:
    """Token ids and labels of one conversation; only assistant tokens are learned.

    The template is rendered turn by turn, so each piece is known to be prompt
    (labels -100) or answer (labels = ids, including the end-of-turn token). An
    assistant message with `"weight": 0` is treated as prompt, as in OpenAI's format.
    Returns None when truncation to `max_length` leaves no answer token.
    """
    chat = [
        {"role": m["role"], "content": flatten_content(m.get("content"))}
        for m in messages
    ]
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        full = _render(tokenizer, chat[: index + 1], opened=False)
        pieces = [(full, False)]
        if message["role"] == "assistant" and message.get("weight", 1) != 0:
            head = _render(tokenizer, chat[:index], opened=True)
            pieces = [(head, False), (full, True)]
        for text, learned in pieces:
            if not text.startswith(rendered):
                raise ValueError("the chat template does not render turns as prefixes")
            piece_ids = tokenizer(text[len(rendered) :], add_special_tokens=False)[
                "input_ids"
            ]
            ids.extend(piece_ids)
            labels.extend(piece_ids if learned else [IGNORE_INDEX] * len(piece_ids))
            rendered = text
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return EncodedExample(ids, labels)


def _render(tokenizer: Any, chat: list[dict[str, str]], *, opened: bool) -> str:
    if not chat and not opened:
        return ""
    return str(
        tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=opened
        )
    )


def train_lora(
    examples: Iterable[dict[str, Any]],
    output_dir: str | Path,
    options: TrainOptions | None = None,
    *,
    base: tuple[Any, Any] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on chat rows and save it to `output_dir`.

    `base` is an already loaded (tokenizer, model) pair to start from; the model is
    deep-copied, never changed. Without it the base is loaded from `options.model`.
    The folder appears complete or not at all: it is written beside and renamed.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from services.inference.model import load_base, resolve_device

    options = options or TrainOptions()
    started = time.monotonic()

    # 1. Seed every random source so a run is repeatable.
    random.seed(options.seed)
    torch.manual_seed(options.seed)
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    device = resolve_device(options.device)

    # 2. The base model, and the rows encoded with the prompt masked.
    if base is None:
        tokenizer, model = load_base(options.model, device)
    else:
        if getattr(base[1], "_hf_peft_config_loaded", False):
            raise ValueError("the base model has adapters loaded; pass a bare one")
        tokenizer, model = base[0], copy.deepcopy(base[1]).to(device)
    rows = [row for row in examples]
    encoded = [
        encode_example(tokenizer, row["messages"], options.max_length) for row in rows
    ]
    usable = [example for example in encoded if example is not None]
    if not usable:
        raise ValueError("no example has an assistant answer to learn from")

    # 3. LoRA on the target modules; only the adapter weights train.
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=options.rank,
        lora_alpha=options.alpha or 2 * options.rank,
        lora_dropout=options.dropout,
        target_modules=list(options.target_modules),
    )
    peft_model = get_peft_model(model, config)
    loop_started = time.monotonic()
    losses = _train_loop(peft_model, usable, options, _pad_id(tokenizer, model), device)
    step_s = (time.monotonic() - loop_started) / len(losses)

    # 4. Save atomically with the run's metadata beside the weights.
    result = TrainResult(
        output_dir=str(output_dir),
        base_model=options.model.describe(),
        steps=len(losses),
        losses=losses,
        seconds=round(time.monotonic() - started, 2),
        examples=len(usable),
        skipped_examples=len(encoded) - len(usable),
    )
    _save_adapter(peft_model, Path(output_dir), result, options)
    logger.info(
        "adapter trained output=%s steps=%s step_seconds=%.2f first_loss=%.4f "
        "last_loss=%.4f seconds=%s",
        output_dir,
        result.steps,
        step_s,
        losses[0],
        losses[-1],
        result.seconds,
    )
    return result


def _train_loop(
    model: Any,
    examples: list[EncodedExample],
    options: TrainOptions,
    pad_id: int,
    device: Any,
) -> list[float]:
    import torch

    batches_per_epoch = math.ceil(len(examples) / options.batch_size)
    total_steps = options.max_steps or batches_per_epoch * options.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.learning_rate, weight_decay=0.0)
    shuffler = torch.Generator().manual_seed(options.seed)
    model.train()
    losses: list[float] = []
    while len(losses) < total_steps:
        order = torch.randperm(len(examples), generator=shuffler).tolist()
        for first in range(0, len(order), options.batch_size):
            batch = [examples[i] for i in order[first : first + options.batch_size]]
            inputs = {k: v.to(device) for k, v in _collate(batch, pad_id).items()}
            loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(float(loss.detach()), 5))
            logger.debug("train step=%s loss=%.4f", len(losses), losses[-1])
            if len(losses) >= total_steps:
                break
    model.eval()
    return losses


def _collate(batch: list[EncodedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch; padding is neither attended to nor learned."""
    import torch

    width = max(len(example.input_ids) for example in batch)
    ids, labels, mask = [], [], []
    for example in batch:
        padding = width - len(example.input_ids)
        ids.append(example.input_ids + [pad_id] * padding)
        labels.append(example.labels + [IGNORE_INDEX] * padding)
        mask.append([1] * len(example.input_ids) + [0] * padding)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def _pad_id(tokenizer: Any, model: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    eos = model.generation_config.eos_token_id
    return int(eos[0] if isinstance(eos, list) else eos or 0)


def _save_adapter(
    model: Any, output_dir: Path, result: TrainResult, options: TrainOptions
) -> None:
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent)
    )
    try:
        # Only the LoRA weights: the embeddings are the base's, unchanged.
        model.save_pretrained(staging, save_embedding_layers=False)
        metadata = asdict(result) | {
            "options": options.model_dump(mode="json"),
            "created_at": datetime.now(UTC).isoformat(),
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        if output_dir.exists():
            # NOTE: replacing a folder is two renames, not one; a reader between them
            # sees no adapter (a 404), never a half-written one.
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_dataset(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file of `{"messages": [...]}` objects."""
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise ValueError(f"{path}:{number}: expected an object with 'messages'")
            rows.append(row)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> tuple[Path, Path, TrainOptions]:
    """The dataset, the output folder and the options from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--alpha", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--num-threads", type=int)
    parser.add_argument("--model-path", type=Path)
    parser.add_argument("--gguf-file")
    args = vars(parser.parse_args(argv))
    dataset, output = args.pop("dataset"), args.pop("output")
    source = {"model_path": args.pop("model_path"), "gguf_file": args.pop("gguf_file")}
    given = {key: value for key, value in args.items() if value is not None}
    return dataset, output, TrainOptions(model=ModelSource(**source), **given)


def main(argv: Sequence[str] | None = None) -> int:
    # Set before transformers is imported: never reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    dataset, output, options = parse_args(argv)
    result = train_lora(read_dataset(dataset), output, options)
    print(result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
