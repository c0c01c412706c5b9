"""Error codes of the FastChat worker protocol and the domain errors that carry them.

Every failure a client can see is one of these: a code from FastChat's `ErrorCode` table and a
message that names the cause. Nothing is reported as a blanket "network error".
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """FastChat's `fastchat.constants.ErrorCode` numbers (the OpenAI server maps them to HTTP)."""

    OK = 0
    VALIDATION_TYPE_ERROR = 40001
    INVALID_AUTH_KEY = 40101
    INCORRECT_AUTH_KEY = 40102
    NO_PERMISSION = 40103
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    RATE_LIMIT = 42901
    QUOTA_EXCEEDED = 42902
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001
    CUDA_OUT_OF_MEMORY = 50002
    GRADIO_REQUEST_ERROR = 50003
    GRADIO_STREAM_UNKNOWN_ERROR = 50004
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006


class ServingError(Exception):
    """A failure that is reported to the client as an error chunk."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def is_client_error(self) -> bool:
        return 40000 <= int(self.code) < 50000


class InvalidRequest(ServingError):
    """The request is malformed: bad JSON, a missing field, a value of the wrong type."""

    code = ErrorCode.VALIDATION_TYPE_ERROR


class ParamOutOfRange(ServingError):
    """A sampling parameter has a value outside its allowed range."""

    code = ErrorCode.PARAM_OUT_OF_RANGE


class InvalidImage(ServingError):
    """An image payload is not valid base64, not an image, or too large."""

    code = ErrorCode.VALIDATION_TYPE_ERROR


class ContextOverflow(ServingError):
    """The prompt (text plus image tokens) does not fit the model's context."""

    code = ErrorCode.CONTEXT_OVERFLOW


class EngineOverloaded(ServingError):
    """The worker's queue is full; the client should retry later."""

    code = ErrorCode.ENGINE_OVERLOADED


class OutOfDeviceMemory(ServingError):
    """The accelerator ran out of memory for this request."""

    code = ErrorCode.CUDA_OUT_OF_MEMORY


class ShuttingDown(ServingError):
    """The worker is stopping and its drain time ran out before this request finished."""

    code = ErrorCode.CONTROLLER_WORKER_TIMEOUT


class NoWorkerForModel(ServingError):
    """The controller knows no live worker that serves the requested model."""

    code = ErrorCode.CONTROLLER_NO_WORKER


class Unavailable(ServingError):
    """Another service cannot be reached, did not answer in time, broke its stream off, or
    answered something that is not the protocol.

    The one family for "unreachable": adapters raise it wherever they talk to another process,
    and the message names the service, its address and the cause. Use cases decide what it
    means for their client (the controller drops the worker, the API answers 503).
    """

    service = "service"

    def __init__(self, address: str, reason: str, timed_out: bool = False) -> None:
        what = "did not answer in time" if timed_out else "failed"
        super().__init__(f"the {self.service} at {address} {what}: {reason}")
        self.address = address
        self.reason = reason
        self.timed_out = timed_out


class WorkerUnavailable(Unavailable):
    """A model worker cannot be reached, timed out, or broke its stream off."""

    service = "worker"
    code = ErrorCode.CONTROLLER_WORKER_TIMEOUT


class WorkerBusy(WorkerUnavailable):
    """A worker that answered, but refused the connection (its open-connection limit, 503):
    alive, so the controller keeps it; this request fails over or fails."""


class ControllerUnavailable(Unavailable):
    """The controller cannot be reached or gave an answer that is not the protocol."""

    service = "controller"
    code = ErrorCode.CONTROLLER_NO_WORKER
