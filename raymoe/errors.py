"""Getting a user's error back out of Ray's wrappers."""

from __future__ import annotations

from typing import Optional, TypeVar

E = TypeVar("E", bound=BaseException)


def find_cause(err: BaseException, kind: type[E] | tuple[type[E], ...]) -> Optional[E]:
    """The first exception of ``kind`` in the chain of causes Ray builds around a task's
    error (RayTaskError.cause, UserCodeException, __cause__), or None."""
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return None
