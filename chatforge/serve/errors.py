"""Errors in OpenAI's JSON shape, and the handlers that make every bad request a 4xx.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Bad JSON, wrong types, unknown fields and unknown routes are turned into that shape here; a
``ChatforgeError`` raised while handling a request (the engine's checks of sampling settings and prompts)
is the client's fault by construction, so it is a 400 (naming the parameter when it is a ``ParamError``).
A database that cannot be reached is a 503; a row the database refuses is a 400. Only a genuine bug is a
500, and its text stays in the server's log (the client gets an incident number), on a connection that
stays open.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from starlette.exceptions import HTTPException

from chatforge.errors import ChatforgeError
from chatforge.infer.params import ParamError

log = logging.getLogger("chatforge.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _param(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic names the union member it tried ("prompt.str", "content.function-after[...]"); the client only
    # knows the field (no field name has brackets)
    return ".".join(p for p in parts if p not in ("str", "int") and "[" not in p)


def validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    kind, param = first.get("type", ""), _param(tuple(first.get("loc", ())))
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('msg', '')})", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if kind == "missing" and not param:
        return APIError(400, "the request needs a JSON object body", code="invalid_body")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if not param:
        return APIError(400, f"the request body must be a JSON object ({first.get('msg', '')})", code="invalid_body")
    return APIError(400, f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param,
                    code="invalid_type" if kind.endswith("_type") else "invalid_value")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(ParamError)
    async def _param_error(request: Request, exc: ParamError):
        return APIError(400, str(exc), param=exc.param).response()

    @app.exception_handler(ChatforgeError)
    async def _chatforge(request: Request, exc: ChatforgeError):
        return APIError(400, str(exc)).response()

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError):
        if isinstance(exc, IntegrityError):
            return APIError(400, "the feedback store refused this change (it conflicts with what is stored)",
                            code="conflict").response()
        log.error("feedback database error on %s %s: %s", request.method, request.url.path, exc)
        return APIError(503, "the feedback store is unavailable; retry shortly", type="server_error",
                        code="database_unavailable", headers={"Retry-After": "5"}).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                        headers=getattr(exc, "headers", None)).response()


class InternalErrors:
    """ASGI middleware: an unhandled exception becomes a 500 in OpenAI's shape whose text says nothing of the
    server's internals. Unlike Starlette's own handler it does not re-raise, so the server keeps the
    connection alive (the client's next request on it is not reset). After the response started, there is
    nothing to answer with: the error propagates and the connection closes."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("unhandled error on %s %s (incident %s)", scope["method"], scope["path"], incident)
            if started:
                raise
            await APIError(500, f"the server failed to handle this request (incident {incident}; its log has the "
                                "details)", type="server_error").response()(scope, receive, send)
