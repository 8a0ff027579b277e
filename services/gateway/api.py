"""The HTTP surface: every endpoint, wired to one Starlette application."""

from __future__ import annotations

import logging

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.kafka import Topics
from services.common.openai_errors import error_body
from services.gateway.chat import (
    ChatEndpoint,
    Gatekeeper,
    error_response,
    json_response,
)
from services.gateway.errors import (
    GatewayError,
    InteractionIdTakenError,
    InteractionNotFoundError,
)
from services.gateway.handlers import parse_json_object
from services.gateway.intake import (
    FeedbackIn,
    InteractionIn,
    build_feedback,
    build_logged_interaction,
    parse_items,
)
from services.gateway.metrics import FEEDBACK_REFUSED, REGISTRY
from services.gateway.proxy import UpstreamClient
from services.gateway.publisher import EventPublisher
from services.gateway.settings import GatewaySettings
from services.gateway.tables import TableSource

logger = logging.getLogger(__name__)


CHAT_PATH = "/v1/chat/completions"


class ChatFastPath:
    """ASGI: POST /v1/chat/completions straight to the endpoint, the rest to `app`.

    Served by the gateway's own protocol (`services.gateway.server`), chat
    completions do not even come here: it finds the endpoint as `.chat` and answers
    them without ASGI. This path serves them under any other ASGI server (tests).
    """

    def __init__(self, chat: ChatEndpoint, app: ASGIApp) -> None:
        self._chat = chat
        self._app = app

    @property
    def chat(self) -> ChatEndpoint:
        return self._chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != CHAT_PATH
            or scope["method"] != "POST"
        ):
            await self._app(scope, receive, send)
            return
        request = Request(scope, receive)
        reply = await self._chat.serve(
            request.headers, lambda: self._chat.gatekeeper.read_body(request)
        )
        try:
            await reply.to_response()(scope, receive, send)
        finally:
            # The call is recorded once its answer is out, however sending ended.
            self._chat.sent(reply.interaction_id)


class GatewayApi:
    """The endpoints, sharing the table source, upstream client and publisher."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        tables: TableSource,
        upstream: UpstreamClient,
        publisher: EventPublisher,
    ) -> None:
        self._settings = settings
        self._tables = tables
        self._publisher = publisher
        self._topics = Topics(settings.kafka.topic_prefix)
        self._pseudonym_key = settings.pseudonym_key.get_secret_value().encode()
        self._gatekeeper = Gatekeeper(settings, tables)
        self.chat = ChatEndpoint(
            settings,
            gatekeeper=self._gatekeeper,
            upstream=upstream,
            publisher=publisher,
            interactions_topic=self._topics.interactions,
        )

    def application(self) -> ASGIApp:
        """The ASGI application serving every endpoint.

        Chat completions, the hot path, skip Starlette's router and middleware;
        every other path goes through them. (`App` serves chat completions without
        ASGI at all: see `services.gateway.server`.)
        """
        return ChatFastPath(self.chat, self._router())

    def _router(self) -> Starlette:
        routes = [
            HttpRoute("/v1/chat/completions", self.chat.handle, methods=["POST"]),
            HttpRoute("/v1/feedback", self.feedback, methods=["POST"]),
            HttpRoute("/v1/interactions", self.log_interactions, methods=["POST"]),
            HttpRoute("/v1/models", self.models, methods=["GET"]),
            # /healthz predates /readyz and stays its alias (flywheel up waits on it).
            HttpRoute("/healthz", self.readyz, methods=["GET"]),
            HttpRoute("/readyz", self.readyz, methods=["GET"]),
            HttpRoute("/livez", self.livez, methods=["GET"]),
            HttpRoute("/metrics", self.metrics, methods=["GET"]),
        ]
        app = Starlette(
            routes=routes,
            exception_handlers={
                GatewayError: self._on_gateway_error,
                HTTPException: self._on_http_error,
            },
        )
        # A path with a trailing slash is unknown (404 in OpenAI's shape), not a
        # redirect that clients would follow without the body.
        app.router.redirect_slashes = False
        return app

    async def _on_gateway_error(self, _request: Request, error: Exception) -> Response:
        assert isinstance(error, GatewayError)
        return error_response(error)

    async def _on_http_error(self, request: Request, error: Exception) -> Response:
        """Unknown paths and wrong methods, in OpenAI's error shape too."""
        assert isinstance(error, HTTPException)
        body = error_body(
            f"{request.method} {request.url.path}: {error.detail}",
            error_type="invalid_request_error",
            code="not_found" if error.status_code == 404 else "method_not_allowed",
        )
        return Response(
            orjson.dumps(body),
            status_code=error.status_code,
            media_type="application/json",
            headers=error.headers,
        )

    async def feedback(self, request: Request) -> Response:
        """Accept one feedback object or `{"feedback": [...]}`; 202 with event ids."""
        project_id = self._gatekeeper.authenticate(request)
        body = parse_json_object(await self._gatekeeper.read_body(request))
        items: list[FeedbackIn] = parse_items(
            body,
            batch_field="feedback",
            model=FeedbackIn,
            max_items=self._settings.max_batch_items,
        )
        self._check_owners(items, project_id)
        fallback_user = request.headers.get("x-flywheel-user")
        event_ids = []
        for item in items:
            event = build_feedback(
                item,
                project_id=project_id,
                fallback_user=fallback_user,
                pseudonym_key=self._pseudonym_key,
            )
            owner = self._gatekeeper.recent.owner(event.interaction_id)
            if owner is None or owner == project_id:
                self._publisher.publish(
                    self._topics.feedback, str(event.interaction_id), event
                )
            else:
                # Accepted like an unknown id, so the answer tells nothing; never
                # published, so nothing is written into the other project.
                FEEDBACK_REFUSED.labels(reason="other_project").inc()
                logger.warning(
                    "feedback for another project's interaction not published "
                    "project=%s interaction_id=%s",
                    project_id,
                    event.interaction_id,
                )
            event_ids.append(str(event.event_id))
        return json_response({"event_ids": event_ids}, 202)

    def _check_owners(self, items: list[FeedbackIn], project_id: str) -> None:
        """In "refuse" mode: 404 unless this project owns every rated interaction.

        An unknown id and another project's id get the same answer.
        """
        if self._settings.unknown_interaction_feedback != "refuse":
            return
        for index, item in enumerate(items):
            if self._gatekeeper.recent.owner(item.interaction_id) != project_id:
                FEEDBACK_REFUSED.labels(reason="not_found").inc()
                raise InteractionNotFoundError(
                    f"no interaction {item.interaction_id} for this API key",
                    param=f"feedback[{index}].interaction_id"
                    if len(items) > 1
                    else "interaction_id",
                )

    async def log_interactions(self, request: Request) -> Response:
        """Accept interactions an application made itself; 202 with their ids."""
        project_id = self._gatekeeper.authenticate(request)
        body = parse_json_object(await self._gatekeeper.read_body(request))
        items: list[InteractionIn] = parse_items(
            body,
            batch_field="interactions",
            model=InteractionIn,
            max_items=self._settings.max_batch_items,
        )
        recent = self._gatekeeper.recent
        for index, item in enumerate(items):
            owner = recent.owner(item.interaction_id) if item.interaction_id else None
            if owner is not None and owner != project_id:
                raise InteractionIdTakenError(
                    "interaction_id is taken; omit it to get a fresh one",
                    param=f"interactions[{index}].interaction_id",
                )
        interaction_ids, event_ids = [], []
        for item in items:
            event = build_logged_interaction(
                item,
                project_id=project_id,
                pseudonym_key=self._pseudonym_key,
                prices=self._settings.prices,
            )
            recent.remember(event.interaction_id, project_id)
            self._publisher.publish(
                self._topics.interactions, str(event.interaction_id), event
            )
            interaction_ids.append(str(event.interaction_id))
            event_ids.append(str(event.event_id))
        return json_response(
            {"interaction_ids": interaction_ids, "event_ids": event_ids}, 202
        )

    async def models(self, request: Request) -> Response:
        """The routes, in OpenAI's model list shape."""
        self._gatekeeper.authenticate(request)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "flywheel"}
            for name in sorted(self._tables.table.routes)
        ]
        return json_response({"object": "list", "data": data})

    async def livez(self, _request: Request) -> Response:
        """200 whenever the event loop answers at all.

        Kafka and the routing table are left out on purpose: the gateway keeps
        serving (and spooling) through an outage of either, and a restart would not
        bring them back. The background loops run in one task group with the server,
        so one of them failing ends the process rather than leaving it half alive.
        """
        return json_response({"status": "ok", "problems": []})

    async def readyz(self, _request: Request) -> Response:
        """200 when the producer is up and a routing table is held, else 503 and why."""
        problems = []
        if not self._publisher.started:
            problems.append("the Kafka producer is not started")
        elif self._publisher.last_error is not None:
            problems.append(f"the broker refused events: {self._publisher.last_error}")
        if not self._tables.holds_table:
            problems.append("no routing table received yet")
        body = {
            "status": "ok" if not problems else "unavailable",
            "problems": problems,
            "routing_version": self._tables.table.version,
            "publish_queue_depth": self._publisher.queue_depth,
        }
        return json_response(body, 503 if problems else 200)

    async def metrics(self, _request: Request) -> Response:
        """Prometheus exposition of the gateway's metrics."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
