"""The local model: loading, chat template, generation and LoRA adapters.

Generation is CPU-bound and the model holds mutable adapter state, so `LocalModel`
runs one generation at a time (a lock); callers run it in a worker thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from services.inference.adapters import AdapterRef
from services.inference.errors import AdapterLoadError, InvalidRequestError
from services.inference.settings import ModelSource

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    """Decoding options of one request; temperature 0 means greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    """What one generation produced."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def resolve_device(device: str) -> torch.device:
    """`auto` picks the GPU when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_base(source: ModelSource, device: torch.device) -> tuple[Any, Any]:
    """Load the tokenizer and the causal LM (float32; GGUF files are de-quantized).

    Only local files are read: a model hub is never contacted.
    """
    folder, gguf_file = source.resolve()
    options: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        options["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, **options
    )
    if tokenizer.chat_template is None:
        raise ValueError(
            f"the model at {folder} has no chat template; use an instruct model"
        )
    return tokenizer, model.to(device).eval()


@dataclass
class StopScanner:
    """Turns the growing decoded text into safe-to-send pieces, cut at a stop string.

    Text that could still be the start of a stop string, or an incomplete UTF-8
    character, is held back until the next token decides it.
    """

    stop: Sequence[str]
    sent: str = ""
    stopped: bool = False

    def update(self, text: str) -> str:
        """Feed the whole text decoded so far; returns the newly safe piece."""
        if self.stopped:
            return ""
        cut = min(
            (i for i in (text.find(s) for s in self.stop if s) if i >= 0), default=-1
        )
        if cut >= 0:
            self.stopped = True
            return self._advance(text[:cut])
        safe = text.rstrip("\ufffd")
        held = max((_overlap(safe, s) for s in self.stop if s), default=0)
        return self._advance(safe[: len(safe) - held])

    def finish(self, text: str) -> str:
        """The rest of the text once generation ended (nothing is held back now)."""
        if self.stopped:
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a beginning of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


@dataclass
class _Progress(BaseStreamer, StoppingCriteria):
    """Watches tokens as `generate` makes them: streams text, applies stop strings."""

    tokenizer: Any
    scanner: StopScanner
    on_text: Callable[[str], None] | None
    should_stop: Callable[[], bool] | None
    token_ids: list[int] = field(default_factory=list)
    prompt_seen: bool = False

    def put(self, value: torch.Tensor) -> None:
        # The first call carries the prompt; the rest one new token each.
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.token_ids.extend(int(t) for t in value.reshape(-1).tolist())
        piece = self.scanner.update(self.text())
        if piece and self.on_text:
            self.on_text(piece)

    def end(self) -> None:
        return None

    def text(self) -> str:
        text = self.tokenizer.decode(
            self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return str(text)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> Any:
        done = self.scanner.stopped or bool(self.should_stop and self.should_stop())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


class LocalModel:
    """A loaded base model plus the LoRA adapters loaded onto it on first use."""

    def __init__(
        self, tokenizer: Any, model: Any, *, max_loaded_adapters: int = 8
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.max_loaded_adapters = max_loaded_adapters
        self._lock = threading.Lock()
        # served name -> (internal peft name, stamp); peft names cannot contain dots.
        self._adapters: OrderedDict[str, tuple[str, AdapterRef]] = OrderedDict()
        self._adapter_serial = 0
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    @classmethod
    def load(
        cls, source: ModelSource, *, device: str = "auto", max_loaded_adapters: int = 8
    ) -> LocalModel:
        """Load the base model from local files (no adapters yet)."""
        started = time.monotonic()
        tokenizer, model = load_base(source, resolve_device(device))
        logger.info(
            "model loaded source=%s device=%s seconds=%.1f",
            source.describe(),
            model.device,
            time.monotonic() - started,
        )
        return cls(tokenizer, model, max_loaded_adapters=max_loaded_adapters)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids: the chat template with the assistant turn opened."""
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a prompt that leaves no room for `max_new_tokens` in the context."""
        limit = self.context_length
        if limit and prompt_tokens + max_new_tokens > limit:
            raise InvalidRequestError(
                f"The prompt ({prompt_tokens} tokens) plus max_tokens "
                f"({max_new_tokens}) exceed the model's context of {limit} tokens",
                param="messages",
                code="context_length_exceeded",
            )

    def ensure_adapter(self, adapter: AdapterRef) -> None:
        """Load `adapter` now (idempotent), so a broken one fails before streaming."""
        with self._lock:
            self._ensure_adapter(adapter)

    def generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        *,
        adapter: AdapterRef | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generation:
        """Generate a reply to `prompt_ids`, with `adapter` or the bare base model.

        Blocks; `on_text` gets each newly safe piece of text; `should_stop` is polled
        after every token (a client that went away).
        """
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        progress = _Progress(
            self.tokenizer, StopScanner(params.stop), on_text, should_stop
        )
        with self._lock, torch.inference_mode():
            self._activate(adapter)
            output = self.model.generate(
                **self._generate_options(prompt_ids, params),
                streamer=progress,
                stopping_criteria=[progress],
            )
        new_ids = output[0][len(prompt_ids) :].tolist()
        text = progress.text()
        tail = progress.scanner.finish(text)
        if tail and on_text:
            on_text(tail)
        hit_end = progress.scanner.stopped or (
            bool(new_ids) and new_ids[-1] in self.eos_token_ids
        )
        return Generation(
            text=progress.scanner.sent,
            finish_reason="stop"
            if hit_end or len(new_ids) < params.max_new_tokens
            else "length",
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(new_ids),
        )

    def _generate_options(
        self, prompt_ids: list[int], params: GenerationParams
    ) -> dict[str, Any]:
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        options: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": params.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id
            or next(iter(self.eos_token_ids), None),
        }
        if params.temperature > 0:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            options.update(
                do_sample=True, temperature=params.temperature, top_p=params.top_p
            )
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return options

    def _activate(self, adapter: AdapterRef | None) -> None:
        """Point the model at `adapter`, loading it first; None disables adapters."""
        if adapter is None:
            if self._adapters:
                self.model.disable_adapters()
            return
        internal = self._ensure_adapter(adapter)
        self.model.enable_adapters()
        self.model.set_adapter(internal)

    def _ensure_adapter(self, adapter: AdapterRef) -> str:
        loaded = self._adapters.get(adapter.name)
        if loaded and loaded[1] == adapter:
            self._adapters.move_to_end(adapter.name)
            return loaded[0]
        if loaded:
            # The folder was rewritten (a retrained adapter): drop the old weights.
            self._drop_adapter(adapter.name)
        self._adapter_serial += 1
        internal = f"adapter_{self._adapter_serial}"
        started = time.monotonic()
        try:
            self.model.load_adapter(str(adapter.path), adapter_name=internal)
        except Exception as exc:
            raise AdapterLoadError(
                f"The adapter '{adapter.name}' at {adapter.path} could not be loaded: "
                f"{exc}",
                param="model",
                code="adapter_load_failed",
            ) from exc
        self._adapters[adapter.name] = (internal, adapter)
        logger.info(
            "adapter loaded name=%s path=%s seconds=%.2f",
            adapter.name,
            adapter.path,
            time.monotonic() - started,
        )
        while len(self._adapters) > self.max_loaded_adapters:
            self._drop_adapter(next(iter(self._adapters)))
        return internal

    def _drop_adapter(self, name: str) -> None:
        internal, _ = self._adapters.pop(name)
        self.model.delete_adapter(internal)
        logger.info("adapter unloaded name=%s", name)

    def loaded_adapters(self) -> list[str]:
        """Names of the adapters in memory, least recently used first."""
        return list(self._adapters)
