"""One exception hierarchy for the domain, mapped to gRPC status codes in one place.

Service code raises these; `maas.mesh.server.ErrorInterceptor` turns them into
`context.abort(code, message)` so clients get a status and a clear message, never a
stack trace. "This request failed" (MaasError) is kept apart from "this engine is dead"
(EngineDead), which the worker also uses to mark the replica failed.
"""

from __future__ import annotations

import math

import grpc


class MaasError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle with every attribute (a worker's engine process sends errors to it)."""
        return _restore, (type(self), self.message, dict(self.__dict__))


def _restore(cls: type[MaasError], message: str, state: dict[str, object]) -> MaasError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidArgument(MaasError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MaasError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MaasError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MaasError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MaasError):
    """Over a limit or out of capacity; `retry_after` (seconds) hints when to try again
    (HTTP Retry-After, gRPC trailing metadata `retry-after`)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class Unavailable(MaasError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(MaasError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(MaasError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MaasError):
    code = grpc.StatusCode.PERMISSION_DENIED


class EngineDead(MaasError):
    """The engine itself failed; the replica must be marked failed, not just the request."""

    code = grpc.StatusCode.UNAVAILABLE


class StartupError(Exception):
    """A service cannot start (etcd unreachable, port taken). Printed without a traceback."""


FIELD_METADATA = "maas-field"  # trailing metadata naming the bad field of an error (MaasError.field)
RETRY_AFTER_METADATA = "retry-after"  # trailing metadata: seconds until a retry may succeed (ResourceExhausted)

BY_CODE: dict[grpc.StatusCode, type[MaasError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
                              Unavailable, DeadlineExceeded, Unauthenticated, PermissionDenied)
}
"""The exception class a status code is rebuilt as one hop on (`from_rpc_error`); EngineDead,
also UNAVAILABLE, stays on the worker that raised it."""


def from_rpc_error(e: grpc.aio.AioRpcError, context: str = "") -> MaasError:
    """A downstream service's status as the same exception class (`BY_CODE`; a MaasError
    with that code for the rest), its message prefixed with `context`, its field and
    retry-after restored from the trailing metadata."""
    trailers = {k: str(v) for k, v in e.trailing_metadata() or ()}
    message, field, code = f"{context}{e.details() or e.code().name}", trailers.get(FIELD_METADATA), e.code()
    cls = BY_CODE.get(code)
    if cls is ResourceExhausted:
        return ResourceExhausted(message, field=field, retry_after=_seconds(trailers.get(RETRY_AFTER_METADATA)))
    if cls is not None:
        return cls(message, field=field)
    err = MaasError(message, field=field)
    err.code = code
    return err


def _seconds(raw: str | None) -> float | None:
    """A retry-after value as seconds (None if absent or not a finite number >= 0)."""
    try:
        seconds = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
