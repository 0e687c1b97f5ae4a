"""Domain errors that carry their gRPC status code.

Layers below the server raise these; the server boundary turns them into ``context.abort(code, message)``.
Messages say what to fix and name the field.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base class: an error with a gRPC status code and an actionable message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, ResourceExhausted, Unavailable, DeadlineExceeded,
                                      Cancelled, FailedPrecondition, Internal)}


def from_code(code: grpc.StatusCode, message: str) -> ServiceError:
    """Rebuild a ServiceError from a status (for errors relayed from another stage)."""
    return _BY_CODE.get(code, Internal)(message)
