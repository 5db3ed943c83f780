"""The HTTP face of the gateway (FastAPI): OpenAI routes at ``/v1`` (stateless) and
at ``/sessions/<id>/v1`` (recorded, token-in/token-out), plus session management.

Handlers are plain ``def``s: FastAPI runs them in its thread pool, so a request
blocked on sampling does not stop the event loop from answering other sessions.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlpost.gateway.protocol import ChatRequest, CompletionRequest, GatewayError, error_body
from rlpost.gateway.service import GatewayService


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def build_app(service: GatewayService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync handlers share anyio's default thread limiter, 40 threads: with more agents
        # than that waiting on sampling, the others could not even reach the replica's
        # batcher, and batches would stay at most 40 requests.
        anyio.to_thread.current_default_thread_limiter().total_tokens = service.cfg.max_concurrent_requests
        yield

    app = FastAPI(title="rlpost gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    key = service.cfg.api_key

    def authorize(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise GatewayError(401, "missing or wrong bearer token (send the gateway's api_key)",
                               "invalid_api_key", type="authentication_error")

    @app.exception_handler(GatewayError)
    def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        service.counters["bad_requests"] += 1
        return JSONResponse(error_body(_validation_message(exc)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)

    auth = [Depends(authorize)]

    @app.get("/v1/models", dependencies=auth)
    @app.get("/sessions/{session_id}/v1/models", dependencies=auth)
    def models() -> dict:
        return {"object": "list", "data": [{"id": service.cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "rlpost"}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    def chat(req: ChatRequest) -> dict:
        return service.chat(None, req)

    @app.post("/sessions/{session_id}/v1/chat/completions", dependencies=auth)
    def session_chat(session_id: str, req: ChatRequest) -> dict:
        return service.chat(session_id, req)

    @app.post("/v1/completions", dependencies=auth)
    def complete(req: CompletionRequest) -> dict:
        return service.complete(None, req)

    @app.post("/sessions/{session_id}/v1/completions", dependencies=auth)
    def session_complete(session_id: str, req: CompletionRequest) -> dict:
        return service.complete(session_id, req)

    @app.post("/sessions", dependencies=auth)
    def create_session(request: Request) -> dict:
        session = service.create_session()
        base = str(request.base_url).rstrip("/")
        return {"id": session.id, "replica": session.replica, "base_url": f"{base}/sessions/{session.id}/v1"}

    @app.get("/sessions/{session_id}", dependencies=auth)
    def export_session(session_id: str) -> dict:
        return {"id": session_id, "branches": [vars(s) for s in service.export(session_id)]}

    @app.delete("/sessions/{session_id}", dependencies=auth)
    def close_session(session_id: str) -> dict:
        return {"id": session_id, "branches": [vars(s) for s in service.close_session(session_id)]}

    @app.get("/metrics", dependencies=auth)
    def metrics() -> dict:
        return {f"gateway/{k}": v for k, v in service.counters.items()}

    return app
