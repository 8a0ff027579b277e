"""A small real HTTP server on 127.0.0.1 that follows OpenAI's documented API.

Enough of it for the trainer: `POST /v1/files` (multipart upload, purpose
`fine-tune`), `POST /v1/fine_tuning/jobs`, `GET /v1/fine_tuning/jobs/{id}`,
`POST /v1/fine_tuning/jobs/{id}/cancel`, `GET /v1/fine_tuning/jobs/{id}/events`,
and `POST /v1/chat/completions` for staging. Jobs move one status per retrieve:
validating_files -> queued -> running -> succeeded (or failed, or stay running when
`hold_running` is set). Errors have OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) and status codes: 401 without
the key, 400 for a bad request, 404 for an unknown id, and faults on demand
(`faults`: status codes to answer the next requests with, 429 with Retry-After).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROGRESSION = ("validating_files", "queued", "running")


@dataclass
class FakeOpenAI:
    """The server's state and behaviour; tests read and steer it."""

    api_key: str = "sk-test-fake"
    models: tuple[str, ...] = ("gpt-4o-mini-2024-07-18",)
    outcome: str = "succeeded"  # or "failed"
    failure_code: str = "invalid_training_file"
    hold_running: bool = False
    faults: list[int] = field(default_factory=list)
    # Staging: models that know the answers, and the answers they know.
    good_models: set[str] = field(default_factory=set)
    facts: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- serving ---------------------------------------------------------------

    def start(self) -> str:
        """Serve in a thread on a free loopback port; the base URL (`.../v1`)."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- the API ---------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes, headers: Any) -> Any:
        self.requests.append((method, path))
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, error("Incorrect API key provided", code="invalid_api_key")
        if self.faults:
            status = self.faults.pop(0)
            return status, error(f"injected {status}", kind="server_error")
        parts = path.strip("/").split("/")[1:]  # drop "v1"
        if method == "POST" and parts == ["files"]:
            return self.upload(body, headers)
        if method == "POST" and parts == ["fine_tuning", "jobs"]:
            return self.create_job(json.loads(body))
        if parts[:2] == ["fine_tuning", "jobs"] and len(parts) >= 3:
            return self.job_call(method, parts[2], parts[3:])
        if method == "POST" and parts == ["chat", "completions"]:
            return self.chat(json.loads(body))
        return 404, error(f"Unknown path {path}", code="unknown_url")

    def upload(self, body: bytes, headers: Any) -> Any:
        head = f"Content-Type: {headers.get('Content-Type')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            head + body
        )
        fields = {
            part.get_param("name", header="content-disposition"): part
            for part in message.iter_parts()
        }
        purpose = fields["purpose"].get_content().strip() if "purpose" in fields else ""
        if purpose != "fine-tune" or "file" not in fields:
            return 400, error("purpose must be fine-tune", param="purpose")
        content = fields["file"].get_payload(decode=True)
        file_id = f"file-{uuid.uuid4().hex[:12]}"
        record = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": fields["file"].get_filename(),
            "purpose": "fine-tune",
            "status": "processed",
        }
        self.files[file_id] = record
        self.contents[file_id] = content
        return 200, record

    def create_job(self, request: dict[str, Any]) -> Any:
        if request.get("model") not in self.models:
            return 400, error(
                f"Model {request.get('model')} is not available for fine-tuning",
                param="model",
                code="model_not_available",
            )
        if request.get("training_file") not in self.files:
            return 400, error(
                f"invalid training_file: {request.get('training_file')}",
                param="training_file",
            )
        job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
        job = {
            "object": "fine_tuning.job",
            "id": job_id,
            "model": request["model"],
            "created_at": int(time.time()),
            "finished_at": None,
            "fine_tuned_model": None,
            "organization_id": "org-fake",
            "result_files": [],
            "status": "validating_files",
            "validation_file": request.get("validation_file"),
            "training_file": request["training_file"],
            "hyperparameters": {"n_epochs": "auto"},
            "method": request.get("method") or {"type": "supervised"},
            "trained_tokens": None,
            "error": None,
            "seed": 42,
            "suffix": request.get("suffix"),
        }
        self.jobs[job_id] = job
        self.events[job_id] = []
        self.event(job_id, "Validating training file")
        return 200, job

    def event(self, job_id: str, message: str) -> None:
        self.events[job_id].insert(
            0,
            {
                "object": "fine_tuning.job.event",
                "id": f"ftevent-{uuid.uuid4().hex[:12]}",
                "created_at": int(time.time()),
                "level": "info",
                "message": message,
                "data": {},
                "type": "message",
            },
        )

    def job_call(self, method: str, job_id: str, rest: list[str]) -> Any:
        job = self.jobs.get(job_id)
        if job is None:
            return 404, error(f"No such fine-tuning job: {job_id}", code="not_found")
        if method == "GET" and not rest:
            # The caller sees the job as it is, then it moves on one status.
            seen = json.loads(json.dumps(job))
            self.advance(job)
            return 200, seen
        if method == "POST" and rest == ["cancel"]:
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return 400, error(f"Job {job_id} has already completed", code=None)
            job["status"] = "cancelled"
            self.event(job_id, "Job cancelled")
            return 200, job
        if method == "GET" and rest == ["events"]:
            return 200, {
                "object": "list",
                "data": self.events[job_id],
                "has_more": False,
            }
        return 404, error("Unknown path", code="unknown_url")

    def advance(self, job: dict[str, Any]) -> dict[str, Any]:
        status = job["status"]
        if status in PROGRESSION and not (status == "running" and self.hold_running):
            index = PROGRESSION.index(status)
            job["status"] = (
                PROGRESSION[index + 1] if index + 1 < len(PROGRESSION) else self.outcome
            )
            self.event(job["id"], f"Job is {job['status']}")
            if job["status"] == "succeeded":
                suffix = job.get("suffix") or "model"
                job["fine_tuned_model"] = f"ft:{job['model']}:org-fake:{suffix}:abc123"
                job["trained_tokens"] = len(self.contents[job["training_file"]]) // 4
                job["finished_at"] = int(time.time())
            elif job["status"] == "failed":
                job["error"] = {
                    "code": self.failure_code,
                    "message": "The job failed: see the events",
                    "param": "training_file",
                }
                job["finished_at"] = int(time.time())
        return job

    def chat(self, request: dict[str, Any]) -> Any:
        question = request["messages"][-1]["content"]
        known = request["model"] in self.good_models
        text = self.facts.get(question, "I do not know.") if known else "I do not know."
        return 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }


def error(
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _handler_for(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with fake.lock:
                status, payload = fake.handle(
                    self.command, self.path.split("?")[0], body, self.headers
                )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After-Ms", "10")
            self.end_headers()
            self.wfile.write(data)

        do_GET = _serve  # noqa: N815 - http.server's method names
        do_POST = _serve  # noqa: N815 - http.server's method names

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    return Handler
