"""Simulated users: they ask questions through the gateway and rate the answers.

A user gives a thumbs up to an answer that is correct and concise, a thumbs down
otherwise, and now and then sends the right answer as a correction. Questions kept
out of training are asked with `metadata.flywheel_split = "eval"`, which the trainer
never learns from.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx
from openai import AsyncOpenAI, OpenAIError

from services.demo.questions import Question, is_concise, is_correct


@dataclass
class Exchange:
    """One question asked, what came back, and how the user rated it."""

    at_s: float
    interaction_id: str
    user: str
    question: Question
    answer: str
    correct: bool
    positive: bool
    corrected: bool


@dataclass
class Traffic:
    """Everything the simulated users did, shared with the progress display."""

    exchanges: list[Exchange] = field(default_factory=list)
    errors: int = 0
    feedback_sent: int = 0
    feedback_errors: int = 0

    def rated(self) -> int:
        return len(self.exchanges)


@dataclass(frozen=True)
class UserBehaviour:
    """How users rate: word limit for 'concise', chance of sending a correction."""

    max_words: int = 12
    correction_rate: float = 0.5
    max_tokens: int = 32


class SimulatedUsers:
    """A population of users, each sending questions in turn to the gateway."""

    def __init__(
        self,
        gateway_url: str,
        api_key: str,
        route: str,
        questions: list[Question],
        *,
        users: int,
        seed: int,
        behaviour: UserBehaviour,
    ) -> None:
        self._route = route
        self._questions = questions
        self._users = [f"user-{n:03d}" for n in range(users)]
        self._rng = random.Random(seed)
        self._behaviour = behaviour
        self._client = AsyncOpenAI(
            base_url=gateway_url, api_key=api_key, timeout=120, max_retries=1
        )
        self._http = httpx.AsyncClient(
            base_url=gateway_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=30,
        )
        self._started = time.monotonic()
        self.traffic = Traffic()
        # Cleared while the machine trains: on one small machine users and LoRA
        # training compete for the same cores.
        self.resume = asyncio.Event()
        self.resume.set()

    async def close(self) -> None:
        await self._client.close()
        await self._http.aclose()

    async def ask_once(self) -> None:
        user = self._rng.choice(self._users)
        question = self._rng.choice(self._questions)
        metadata = {"flywheel_split": "eval" if question.held_out else "train"}
        try:
            response = await self._client.chat.completions.create(
                model=self._route,
                messages=[{"role": "user", "content": question.text}],
                max_tokens=self._behaviour.max_tokens,
                temperature=0,
                user=user,
                metadata=metadata,
            )
        except OpenAIError:
            self.traffic.errors += 1
            return
        answer = response.choices[0].message.content or ""
        correct = is_correct(question, answer)
        positive = correct and is_concise(answer, self._behaviour.max_words)
        corrected = not correct and self._rng.random() < self._behaviour.correction_rate
        feedback = [
            {
                "interaction_id": response.id,
                "kind": "thumbs",
                "value": 1 if positive else -1,
                "user": user,
            }
        ]
        if corrected:
            feedback.append(
                {
                    "interaction_id": response.id,
                    "kind": "correction",
                    "text": question.correction,
                    "user": user,
                }
            )
        try:
            reply = await self._http.post("/feedback", json={"feedback": feedback})
            reply.raise_for_status()
        except httpx.HTTPError:
            self.traffic.feedback_errors += 1
        else:
            self.traffic.feedback_sent += len(feedback)
        self.traffic.exchanges.append(
            Exchange(
                at_s=time.monotonic() - self._started,
                interaction_id=response.id,
                user=user,
                question=question,
                answer=answer,
                correct=correct,
                positive=positive,
                corrected=corrected,
            )
        )

    async def run(
        self, stop: asyncio.Event, *, concurrency: int, limit: int | None = None
    ) -> None:
        """Send questions with `concurrency` users at a time until `stop` or `limit`."""
        start_count = len(self.traffic.exchanges) + self.traffic.errors

        async def one_user() -> None:
            while not stop.is_set():
                if not self.resume.is_set():
                    await asyncio.sleep(0.5)
                    continue
                done = len(self.traffic.exchanges) + self.traffic.errors - start_count
                if limit is not None and done >= limit:
                    return
                await self.ask_once()

        async with asyncio.TaskGroup() as tasks:
            for _ in range(concurrency):
                tasks.create_task(one_user())
