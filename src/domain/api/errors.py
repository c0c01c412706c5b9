"""Errors of the OpenAI-compatible API: an HTTP status, OpenAI's error `type`, and a code.

The body is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which the
official clients parse. `code` carries FastChat's `ErrorCode` number, so a failure reported by a
worker keeps its number on the way through the API.
"""

from __future__ import annotations

from typing import Any

from vilaserve.domain.shared.errors import ErrorCode, ServingError


class ApiError(Exception):
    status: int = 500
    error_type: str = "server_error"
    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, param: str | None = None, code: ErrorCode | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": int(self.code),
            }
        }


class BadRequest(ApiError):
    status = 400
    error_type = "invalid_request_error"
    code = ErrorCode.VALIDATION_TYPE_ERROR


class ParamOutOfRange(BadRequest):
    code = ErrorCode.PARAM_OUT_OF_RANGE


class ContextTooLong(BadRequest):
    code = ErrorCode.CONTEXT_OVERFLOW


class Unauthorized(ApiError):
    status = 401
    error_type = "authentication_error"
    code = ErrorCode.INVALID_AUTH_KEY


class NotFound(ApiError):
    status = 404
    error_type = "not_found_error"
    code = ErrorCode.VALIDATION_TYPE_ERROR


class ModelNotFound(ApiError):
    status = 404
    error_type = "not_found_error"
    code = ErrorCode.INVALID_MODEL


class PayloadTooLarge(ApiError):
    status = 413
    error_type = "invalid_request_error"
    code = ErrorCode.VALIDATION_TYPE_ERROR


class Overloaded(ApiError):
    status = 429
    error_type = "rate_limit_error"
    code = ErrorCode.ENGINE_OVERLOADED


class NoWorker(ApiError):
    """No worker serves the model right now (or the controller cannot be reached)."""

    status = 503
    error_type = "service_unavailable"
    code = ErrorCode.CONTROLLER_NO_WORKER


class UpstreamFailure(ApiError):
    """The worker failed while generating (internal error, out of device memory)."""


def as_api_error(error: ApiError | ServingError) -> ApiError:
    """What the API answers for a failure: an `ApiError` as it is, a protocol error (a worker or
    the controller unavailable, say) by its FastChat code."""
    if isinstance(error, ApiError):
        return error
    return from_worker_error(int(error.code), error.message)


def from_worker_error(code: int, message: str) -> ApiError:
    """The API error for an error chunk of the worker protocol (FastChat's codes)."""
    text = message.strip() or f"the worker reported error {code}"
    if code == ErrorCode.PARAM_OUT_OF_RANGE:
        return ParamOutOfRange(text)
    if code == ErrorCode.CONTEXT_OVERFLOW:
        return ContextTooLong(text)
    if code == ErrorCode.INVALID_MODEL:
        return ModelNotFound(text)
    if code in (ErrorCode.RATE_LIMIT, ErrorCode.QUOTA_EXCEEDED, ErrorCode.ENGINE_OVERLOADED):
        return Overloaded(text, code=ErrorCode(code))
    if code in (ErrorCode.CONTROLLER_NO_WORKER, ErrorCode.CONTROLLER_WORKER_TIMEOUT):
        return NoWorker(text, code=ErrorCode(code))
    if 40000 <= code < 50000:
        return BadRequest(text, code=_known(code, ErrorCode.VALIDATION_TYPE_ERROR))
    return UpstreamFailure(text, code=_known(code, ErrorCode.INTERNAL_ERROR))


def _known(code: int, fallback: ErrorCode) -> ErrorCode:
    # LLaVA and TinyChat workers use `error_code: 1` for everything.
    try:
        return ErrorCode(code)
    except ValueError:
        return fallback
