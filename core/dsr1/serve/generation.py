"""The two generating routes: body → checks → prompt ids → engine → JSON or server-sent events.

Everything a request can be refused for is decided before the response starts, so a refusal is
always a status code (400, 404, 413, 429) and never a stream that breaks off: the body is parsed
and checked, the prompt tokenized (through the chat template for chat), its length checked
against the context, and the request handed to the engine loop, which admits it or says why not
(:meth:`AsyncEngine.submit`). Then a client that goes away aborts its request at once: a stream
through Starlette's disconnect listener (which cancels the body iterator), a non-streaming
request through a watcher racing the generation.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from dsr1.engine.async_engine import QueueFull, RequestStream
from dsr1.engine.engine import RequestOutput
from dsr1.errors import Dsr1Error
from dsr1.serve.metrics import ServerMetrics
from dsr1.serve.openai_schema import (BadRequest, ChatCompletionRequest, CompletionRequest, check_unsupported,
                                      decide_max_tokens, messages_of, parse, prompt_of, sampling_params)
from dsr1.serve.responses import Reply, error_body, sse
from dsr1.serve.state import ServeState


class _Timing:
    """One request's clock: received, first token, last token (server side, what a client sees)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.first: float | None = None

    def saw(self, out: RequestOutput) -> None:
        if self.first is None and out.new_ids:
            self.first = time.monotonic()
            self.metrics.first_token(self.first - self.start)

    def done(self, out: RequestOutput | None, prompt_len: int) -> None:
        """Count the request; one whose last output is not final was aborted (its client left)."""
        now = time.monotonic()
        decode = now - self.first if self.first is not None else None
        n_out = 0 if out is None else len(out.output_ids)
        reason = out.finish_reason if out is not None and out.finished else "abort"
        self.metrics.finished(prompt_len, n_out, reason, now - self.start, decode)


class Generation:
    """``/v1/completions`` and ``/v1/chat/completions`` over the server's engine."""

    def __init__(self, state: ServeState, metrics: ServerMetrics) -> None:
        self.state, self.metrics = state, metrics

    @property
    def context(self) -> int:
        engine = self.state.engine
        return 0 if engine is None else engine.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        engine = self.state.engine
        return 0 if engine is None else int(engine.engine.model.args.vocab_size)

    async def handle(self, request: Request, chat: bool) -> Response:
        state = self.state
        state.enter()
        entered = True
        try:
            req = await self._read(request, ChatCompletionRequest if chat else CompletionRequest)
            timing = _Timing(self.metrics)
            stream, reply = await self._start(req, chat)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                cleanup = _Cleanup(stream, state)
                entered = False  # the stream's cleanup leaves, whenever the stream ends
                return StreamingResponse(self._events(stream, reply, timing, include_usage, cleanup),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                         background=BackgroundTask(cleanup.run))
            out = await self._collect(request, stream, timing)
            if out is None:  # the client went away: nobody reads this
                return Response(status_code=499)
            return JSONResponse(reply.full(out))
        finally:
            if entered:
                state.leave()

    # --- before the response ---------------------------------------------------------------------

    async def _read(self, request: Request, model: type[Any]) -> Any:
        limit = self.state.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BadRequest(f"request body of {length} bytes is larger than the server's limit of {limit}",
                             status=413, code="body_too_large")
        body = await request.body()
        if len(body) > limit:
            raise BadRequest(f"request body of {len(body)} bytes is larger than the server's limit of {limit}",
                             status=413, code="body_too_large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise BadRequest(f"the request body is not valid JSON: {err}", code="invalid_json") from None
        req = parse(model, data)
        name = self.state.settings.model_name
        if req.model != name:
            raise BadRequest(f"model {req.model!r} is not served here; this server serves {name!r} (GET /v1/models)",
                             param="model", status=404, code="model_not_found")
        check_unsupported(req)
        return req

    async def _start(self, req: Any, chat: bool) -> tuple[RequestStream, Reply]:
        state = self.state
        engine = state.engine
        assert engine is not None  # the guard answered 503 while loading
        tokenizer = engine.engine.tokenizer
        if chat:
            if tokenizer is None or tokenizer.chat_template is None:
                raise BadRequest("this model has no chat template (tokenizer_config.json or chat_template.jinja); "
                                 "use /v1/completions", param="messages", code="no_chat_template")
            text = tokenizer.apply_chat_template(messages_of(req), add_generation_prompt=True, tokenize=False)
            ids = tokenizer.encode(text, add_special_tokens=False)  # the template writes its own special tokens
        else:
            prompt = prompt_of(req)
            if isinstance(prompt, str):
                if tokenizer is None:
                    raise BadRequest("this model has no tokenizer: send the prompt as token ids", param="prompt")
                ids = tokenizer.encode(prompt)
            else:
                ids = list(prompt)
        max_tokens = decide_max_tokens(req, len(ids), self.context)
        params = sampling_params(req, engine.engine.default_params, max_tokens)
        try:
            stream = await engine.submit(ids, params, max_waiting=state.settings.max_queue)
        except QueueFull as err:
            raise BadRequest(str(err), status=429, code="queue_full", headers={"Retry-After": "1"}) from None
        except BadRequest:
            raise
        except Dsr1Error as err:  # the engine refused it (ids outside the vocabulary, larger than the pool)
            raise BadRequest(str(err)) from None
        want_logprobs = (req.logprobs is not None) if not chat else bool(req.logprobs)
        return stream, Reply("chat" if chat else "completion", state.settings.model_name, tokenizer, want_logprobs,
                             reasoning=chat and engine.engine.reasoning is not None)

    # --- the response ----------------------------------------------------------------------------

    async def _collect(self, request: Request, stream: RequestStream, timing: _Timing) -> RequestOutput | None:
        """The final output, or None if the client disconnected first (the request is then aborted)."""
        async def run() -> RequestOutput | None:
            last = None
            async for out in stream:
                timing.saw(out)
                last = out
            return last

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(run()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()  # the stream aborts its request when cancelled
                await stream.aclose()
        if work.cancelled():
            timing.done(None, stream.prompt_len)
            return None
        out = work.result()  # an engine failure raises here: a 500 for this request
        timing.done(out, stream.prompt_len)
        return out

    async def _events(self, stream: RequestStream, reply: Reply, timing: _Timing, include_usage: bool,
                      cleanup: _Cleanup) -> AsyncIterator[str]:
        last = None
        try:
            async for out in stream:
                timing.saw(out)
                last = out
                if out.new_ids or out.delta or out.finished:
                    yield sse(reply.chunk(out))
            if include_usage and last is not None:
                yield sse(reply.usage_chunk(last))
        except Exception as err:  # noqa: BLE001 - the engine loop failed mid-stream: say so in the stream
            yield sse(error_body(f"the engine failed: {type(err).__name__}: {err}", "internal_error", None,
                                 "engine_error"))
        finally:
            timing.done(last, stream.prompt_len)
            await cleanup.run()
        yield sse("[DONE]")


class _Cleanup:
    """Once, whichever comes first (the stream's end, or Starlette's background task after a
    disconnect): abort the request if it still runs, and leave the in-flight count."""

    def __init__(self, stream: RequestStream, state: ServeState) -> None:
        self.stream, self.state, self.done = stream, state, False

    async def run(self) -> None:
        if self.done:
            return
        self.done = True
        await self.stream.aclose()
        self.state.leave()


__all__ = ["Generation"]
