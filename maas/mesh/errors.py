"""One exception hierarchy for the domain, mapped to gRPC status codes in one place.

Service code raises these; `maas.mesh.server.ErrorInterceptor` turns them into
`context.abort(code, message)` so clients get a status and a clear message, never a
stack trace. "This request failed" (MaasError) is kept apart from "this engine is dead"
(EngineDead), which the worker also uses to mark the replica failed.
"""

from __future__ import annotations

import grpc


class MaasError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


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


def from_rpc_error(e: grpc.aio.AioRpcError, context: str = "") -> MaasError:
    """Pass a downstream service's status through unchanged (its message already names the
    problem, its trailing metadata the field)."""
    field = next((str(v) for k, v in e.trailing_metadata() or () if k == FIELD_METADATA), None)
    err = MaasError(f"{context}{e.details() or e.code().name}", field=field)
    err.code = e.code()
    return err
