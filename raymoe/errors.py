"""The user's errors (RaymoeError) and getting them back out of Ray's wrappers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class RaymoeError(Exception):
    """An error that is the user's to fix (a config, a dataset, a checkpoint, an eval file,
    the cluster's size, the job server): the CLI prints its message as one line, exit 2.
    Anything else is a bug and keeps its traceback."""


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
