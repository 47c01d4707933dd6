"""The proxy's exceptions, each carrying its HTTP status and OpenAI error `type`, and the one
function that renders them in the OpenAI error shape.

    ProxyError
    ├── BadRequestError        400 invalid_request_error (malformed JSON, bad header value)
    ├── AuthenticationError    401 authentication_error (no, unknown, revoked or expired key)
    ├── PermissionDeniedError  403 permission_error (other user, route, Origin, not admin)
    ├── RequestTimeoutError    408 invalid_request_error (the client stalled sending its body)
    ├── NotFoundError          404 invalid_request_error (admin API: no such memory)
    ├── PayloadTooLargeError   413 invalid_request_error
    ├── UnsupportedMediaTypeError 415 invalid_request_error (memory request not JSON)
    ├── RateLimitError         429 rate_limit_error (a key over its limit, admin work)
    ├── ServiceUnavailableError 503 server_error (admin API: memory not open or not ready)
    └── UpstreamError
        ├── UpstreamUnreachableError   502 upstream_error
        └── UpstreamTimeoutError       504 upstream_error
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProxyError",
    "RateLimitError",
    "RequestTimeoutError",
    "ServiceUnavailableError",
    "UnsupportedMediaTypeError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "UpstreamUnreachableError",
    "error_body",
    "error_response",
]


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the body field at fault, as OpenAI names it
        if code is not None:
            self.code = code


class BadRequestError(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class RequestTimeoutError(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLargeError(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class AuthenticationError(ProxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ProxyError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFoundError(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ServiceUnavailableError(ProxyError):
    status = 503
    type = "server_error"
    code = "memory_unavailable"


class UnsupportedMediaTypeError(ProxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimitError(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(ProxyError):
    status = 502
    type = "upstream_error"


class UpstreamUnreachableError(UpstreamError):
    status = 502
    code = "upstream_unreachable"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


def error_body(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: ProxyError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status,
        headers=headers,
    )
