"""gRPC status code → HTTP status, as google/rpc/code.proto documents the mapping."""
from __future__ import annotations

# Index = gRPC code. CANCELLED is 499 ("client closed request"), the value code.proto gives.
_HTTP_BY_CODE = (
    200,  # 0  OK
    499,  # 1  CANCELLED
    500,  # 2  UNKNOWN
    400,  # 3  INVALID_ARGUMENT
    504,  # 4  DEADLINE_EXCEEDED
    404,  # 5  NOT_FOUND
    409,  # 6  ALREADY_EXISTS
    403,  # 7  PERMISSION_DENIED
    429,  # 8  RESOURCE_EXHAUSTED
    400,  # 9  FAILED_PRECONDITION
    409,  # 10 ABORTED
    400,  # 11 OUT_OF_RANGE
    501,  # 12 UNIMPLEMENTED
    500,  # 13 INTERNAL
    503,  # 14 UNAVAILABLE
    500,  # 15 DATA_LOSS
    401,  # 16 UNAUTHENTICATED
)

CODE_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)


def http_status(grpc_code: int) -> int:
    """Codes outside 0..16 (a misbehaving upstream) are 500, like UNKNOWN."""
    if 0 <= grpc_code < len(_HTTP_BY_CODE):
        return _HTTP_BY_CODE[grpc_code]
    return 500
