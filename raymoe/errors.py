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
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of that chain: the user's error, without Ray's traceback."""
    *_, last = _causes(err)
    return last


def find_cause(err: BaseException, kind: type[E] | tuple[type[E], ...]) -> E | None:
    """The first exception of ``kind`` in the chain of causes Ray builds around a task's
    error (RayTaskError.cause, UserCodeException, __cause__), or None."""
    return next((c for c in _causes(err) if isinstance(c, kind)), None)
