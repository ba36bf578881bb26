"""The user's errors (RaymoeError) and getting them back out of Ray's wrappers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class RaymoeError(Exception):
    """An error that is the user's to fix (a config, a dataset, a checkpoint, an eval file,
    the cluster's size, the job server): the CLI prints its message as one line, exit 2.
    Anything else is a bug and keeps its traceback."""


class TransientError(Exception):
    """Marks a RaymoeError raised for an I/O failure that may pass (storage unreachable or
    throttled, a connection reset, a timeout): a restart may succeed, so a training run's
    failure policy retries it on train.max_failures instead of ending the run
    (raymoe.train.failures). The class survives the trip from a Ray worker, where an
    exception's ``__cause__`` does not."""


_PASSING = ("NETWORK_CONNECTION", "Connection refused", "Connection reset", "connection was reset",
            "timed out", "Timeout", "TIMEOUT", "SlowDown", "ServiceUnavailable", "Service Unavailable",
            "InternalError", "RequestTimeout", "Broken pipe", "Temporary failure", "curlCode",
            "Could not connect", "Unable to connect", "HTTP response code: 500", "HTTP response code: 503")
"""What pyarrow's S3 and local errors say when the failure may pass; anything else (no
permission, no such bucket or key, bytes that do not decode) comes back every time."""


def may_pass(err: OSError) -> bool:
    """Whether an I/O error may pass if tried again (storage unreachable or throttled, a
    reset connection, a timeout), rather than come back every time."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return any(marker in str(err) for marker in _PASSING)


def _causes(err: BaseException) -> Iterator[BaseException]:
    """The error, then what it wraps, breadth first: a Ray task's ``cause``, Python's
    ``__cause__`` / ``__context__``, and what Ray Train's typed failures hold (the
    controller's error, ``ControllerError.controller_failure``; the per-worker errors,
    ``WorkerGroupError.worker_failures``, in rank order)."""
    seen: set[int] = set()
    pending = [err]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [getattr(current, "cause", None), getattr(current, "controller_failure", None),
                 current.__cause__, current.__context__]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            inner += [failures[rank] for rank in sorted(failures)]
        pending += [e for e in inner if isinstance(e, BaseException)]


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of that chain: the user's error, without Ray's traceback."""
    *_, last = _causes(err)
    return last


def find_cause(err: BaseException, kind: type[E] | tuple[type[E], ...]) -> E | None:
    """The first exception of ``kind`` among the causes Ray builds around a task's or a
    worker group's error (RayTaskError.cause, UserCodeException, worker_failures,
    __cause__), or None."""
    # Ray's dual-class wrapper (a RayTaskError that is also the user's error class, whose
    # text is the remote traceback) is passed over for the error it wraps.
    return next((c for c in _causes(err)
                 if isinstance(c, kind) and not isinstance(getattr(c, "cause", None), kind)), None)
