"""The one error tree, and the middleware that renders every error as OpenAI's JSON shape.

    LumenError (status, type, code)
    ├── BadRequest 400 ── PayloadTooLarge 413
    ├── InvalidKey 401
    ├── InsufficientQuota 402
    ├── ModelNotAllowed 403
    ├── NotFound 404 ── ModelNotFound 404
    ├── MethodNotAllowed 405
    ├── RequestTimeout 408
    ├── RateLimited 429
    ├── InternalError 500
    ├── BadGateway 502
    ├── Unavailable 503 ── BackendUnavailable, StorageUnavailable
    └── UpstreamTimeout 504

Handlers raise; only :func:`error_middleware` builds responses, so every body is in the shape the
path's clients parse (:class:`ErrorShape`): OpenAI's ``{"error": {"message", "type", "param", "code"}}``,
or on the Anthropic Messages API ``{"type": "error", "error": {"type", "message"}}``, whose SDKs read
nothing else. Nothing internal ever leaks to a client.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

log = logging.getLogger("lumen_proxy")
REQUEST_ID = web.RequestKey("request_id", str)
STREAM_STARTED = web.RequestKey("stream_started", web.StreamResponse)
"""Set by a handler just before it sends a stream's headers: from then on nothing may render a response."""


class LumenError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None,
                 headers: Mapping[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )


class BadRequest(LumenError):
    status, type = 400, "invalid_request_error"


class PayloadTooLarge(BadRequest):
    status, code = 413, "request_too_large"


class InvalidKey(LumenError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class InsufficientQuota(LumenError):
    status, type, code = 402, "insufficient_quota", "insufficient_quota"


class ModelNotAllowed(LumenError):
    status, type, code = 403, "invalid_request_error", "model_not_allowed"


class NotFound(LumenError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(LumenError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class RequestTimeout(LumenError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class RateLimited(LumenError):
    status, type, code = 429, "rate_limit_exceeded", "rate_limit_exceeded"


class InternalError(LumenError):
    status, type, code = 500, "server_error", "internal_error"


class BadGateway(LumenError):
    status, type, code = 502, "server_error", "bad_gateway"


class Unavailable(LumenError):
    status, type, code = 503, "server_error", "service_unavailable"


class BackendUnavailable(Unavailable):
    code = "backend_unavailable"


class StorageUnavailable(Unavailable):
    code = "storage_unavailable"


class UpstreamTimeout(LumenError):
    status, type, code = 504, "server_error", "upstream_timeout"


def request_ids() -> Iterator[str]:
    """Unique ids without a syscall per request: a random per-app prefix and a counter."""
    prefix = "req_" + secrets.token_hex(8)
    return (f"{prefix}{n:08x}" for n in itertools.count(1))


class ErrorShape:
    """OpenAI's error shape: the body of a refusal, and the event that ends a broken stream."""

    name = "openai"

    def body(self, error: LumenError) -> bytes:
        return error.body()

    def stream_event(self, error: LumenError) -> bytes:
        """The SDKs raise on a ``data:`` event whose object has an ``error`` key."""
        return b"data: " + self.body(error) + b"\n\n"

    def headers(self, request_id: str) -> dict[str, str]:
        return {"x-request-id": request_id}


class ResponsesErrorShape(ErrorShape):
    """The Responses API's: OpenAI's body; in streams an ``event: error`` whose data is the API's error
    event (``type``, ``code``, ``message``, ``param``, read by clients that switch on ``type``) that also
    holds OpenAI's ``error`` object (the openai SDKs raise only on that)."""

    name = "responses"

    def stream_event(self, error: LumenError) -> bytes:
        data = {"type": "error", "code": error.code, "message": error.message, "param": error.param,
                "error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


class AnthropicErrorShape(ErrorShape):
    """Anthropic's: ``{"type": "error", "error": {"type", "message"}}``, its types by status, an
    ``event: error`` in streams (the SDKs raise on that event name only) and a ``request-id`` header."""

    name = "anthropic"
    TYPES: Mapping[int, str] = {
        400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
        404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "request_too_large",
        429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error", 504: "timeout_error",
    }

    def body(self, error: LumenError) -> bytes:
        kind = self.TYPES.get(error.status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": error.message}})

    def stream_event(self, error: LumenError) -> bytes:
        return b"event: error\ndata: " + self.body(error) + b"\n\n"

    def headers(self, request_id: str) -> dict[str, str]:
        return {"x-request-id": request_id, "request-id": request_id}


OPENAI_ERRORS = ErrorShape()
RESPONSES_ERRORS = ResponsesErrorShape()
ANTHROPIC_ERRORS = AnthropicErrorShape()


def error_response(error: LumenError, request_id: str, shape: ErrorShape = OPENAI_ERRORS) -> web.Response:
    headers = {**shape.headers(request_id), **error.headers}
    return web.Response(status=error.status, body=shape.body(error), content_type="application/json",
                        headers=headers)


def _translate_http(exc: web.HTTPException, request: web.Request, served: str) -> LumenError:
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")  # RFC 9110: a 405 must say which methods are allowed
        return MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.",
                                headers={"Allow": allow})
    if exc.status == 404:
        return NotFound(f"Lumen does not serve {request.method} {request.path}. It serves {served}.")
    if exc.status == 413:
        return PayloadTooLarge("Request body is too large.")
    return BadRequest(exc.reason or "Bad request.", code=None)


def make_error_middleware(shape_of: Callable[[str], ErrorShape] = lambda path: OPENAI_ERRORS,
                          served: str = "the OpenAI API under /v1/") -> Middleware:
    """``shape_of(path)``: the error shape of a path's clients; ``served``: what a 404 says Lumen serves."""
    ids = request_ids()

    @web.middleware
    async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Give every request an id and turn any failure into an OpenAI-shaped error (never a traceback)."""
        request_id = next(ids)  # ours, never the client's: it keys the usage row
        request[REQUEST_ID] = request_id
        try:
            response = await handler(request)
        except LumenError as exc:
            if STREAM_STARTED in request:
                log.error("%s after the stream of request %s started: %s", type(exc).__name__, request_id, exc)
                return request[STREAM_STARTED]
            return error_response(exc, request_id, shape_of(request.path))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(_translate_http(exc, request, served), request_id, shape_of(request.path))
        except Exception:
            log.exception("internal error on %s %s (request %s)", request.method, request.path, request_id)
            if STREAM_STARTED in request:  # a second status line inside a chunked body would corrupt it
                return request[STREAM_STARTED]
            return error_response(InternalError("Internal error. The administrator can find it in the logs "
                                                f"under request id {request_id}."), request_id, shape_of(request.path))
        if not response.prepared:
            response.headers.setdefault("x-request-id", request_id)
        return response

    return error_middleware
