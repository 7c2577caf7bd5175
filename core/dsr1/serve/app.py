"""The FastAPI app of ``dsr1 serve``: OpenAI-compatible routes over one :class:`AsyncEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream with
``stream: true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``. Every error, from a
malformed body to a full queue, is OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``. With an API key, the ``/v1`` routes need ``Authorization: Bearer KEY`` (compared in
constant time); ``/health`` and ``/metrics`` stay open for orchestrators and scrapers.
"""
from __future__ import annotations

import hmac
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsr1.errors import Dsr1Error
from dsr1.serve.generation import Generation
from dsr1.serve.metrics import ServerMetrics
from dsr1.serve.openai_schema import BadRequest
from dsr1.serve.responses import error_body
from dsr1.serve.state import ServeState

#: OpenAI's error ``type`` per HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable", 500: "internal_error"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, ERROR_TYPES.get(status, "invalid_request_error"), param, code),
                        status_code=status, headers=headers)


def create_app(state: ServeState) -> FastAPI:
    """The app of one server; ``state`` holds the engine once it is loaded."""
    app = FastAPI(title="dsr1", docs_url=None, redoc_url=None, openapi_url=None)
    settings = state.settings
    metrics = ServerMetrics(state.stats, state.monitor, lambda: state.draining)
    gen = Generation(state, metrics)
    app.state.dsr1 = state
    app.state.metrics = metrics
    key = settings.api_key.encode("utf-8") if settings.api_key else None

    def guard(request: Request) -> None:
        """Auth, then availability (401 before 503), before any body is read. A dependency of the
        ``/v1`` routes rather than an HTTP middleware: Starlette's ``BaseHTTPMiddleware`` would relay
        every streamed chunk through an extra task and memory stream, on the path of every token."""
        if key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), key):
                raise BadRequest("missing or wrong API key: send 'Authorization: Bearer KEY' with the key the server "
                                 "was started with (--api-key)", status=401, code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
        if request.method != "POST":
            return
        status = state.status()
        if status == "loading":
            raise BadRequest("the model is still loading; retry shortly", status=503, code=status,
                             headers={"Retry-After": "5"})
        if status == "draining":
            raise BadRequest("the server is shutting down and takes no new requests", status=503, code=status)
        if status == "error":
            why = state.load_error or (state.engine.error if state.engine is not None else None)
            raise BadRequest(f"the engine stopped after an error: {why}", status=503, code=status)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest) -> JSONResponse:
        metrics.rejected(err.status)
        return error_response(err.status, str(err), err.param, err.code, err.headers)

    @app.exception_handler(Dsr1Error)
    async def engine_refused(request: Request, err: Dsr1Error) -> JSONResponse:
        metrics.rejected(400)
        return error_response(400, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        return error_response(500, f"the engine failed: {type(err).__name__}: {err}", code="engine_error")

    @app.get("/health")
    async def health() -> Response:
        status = state.status()
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(guard)])
    async def models() -> Response:
        data = [{"id": settings.model_name, "object": "model", "created": int(state.started), "owned_by": "dsr1",
                 "max_model_len": gen.context, "vocab_size": gen.vocab_size}] if state.ready else []
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions", dependencies=[Depends(guard)])
    async def completions(request: Request) -> Response:
        return await gen.handle(request, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(guard)])
    async def chat_completions(request: Request) -> Response:
        return await gen.handle(request, chat=True)

    return app


__all__ = ["create_app", "error_response"]
