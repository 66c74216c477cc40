"""The user's mistakes, as one family of exceptions, and how to find one inside Ray's wrappers.

:class:`UserError` is the base of every error that is the user's to fix (a bad config, a data file that does
not match its format, too many bad images, a stale cache): the command line shows its message alone, without
a traceback, and exits with status 2. Every other exception is a fault of the program or the machine and
keeps its traceback.

An error raised inside a Ray task, actor or Train worker reaches the driver wrapped (``RayTaskError``,
Ray Data's ``UserCodeException``, Ray Train's ``WorkerGroupError`` / ``TrainingFailedError``);
:func:`find_user_error` digs the original out of those wrappers.
"""

from __future__ import annotations

from collections.abc import Iterator


class UserError(Exception):
    """An error the user can fix; the message names the file, key or value and says what to do."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: Ray's ``cause``, ``__cause__``/``__context__``, Train's per-worker errors."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.append(getattr(current, "cause", None))  # ray.exceptions.RayTaskError
        todo.append(current.__cause__)
        todo.append(current.__context__)
        # Ray Train's WorkerGroupError / ControllerError hold the errors of each worker.
        for attr in ("worker_failures", "errors"):
            nested = getattr(current, attr, None)
            if isinstance(nested, dict):
                todo.extend(v for v in nested.values() if isinstance(v, BaseException))
            elif isinstance(nested, (list, tuple)):
                todo.extend(v for v in nested if isinstance(v, BaseException))
        error = getattr(current, "error", None)  # ray.train's TrainingFailedError wrappers
        if isinstance(error, BaseException):
            todo.append(error)


def find_user_error(exc: BaseException) -> UserError | None:
    """The first :class:`UserError` inside ``exc`` (itself included), or None.

    A ``RayTaskError`` created from a ``UserError`` is itself an instance of the user's class (Ray makes a
    subclass of both) but carries the remote traceback in its message; the original in ``cause`` is returned
    instead, so the message is the user's alone.
    """
    found = None
    for candidate in _causes(exc):
        if isinstance(candidate, UserError):
            found = candidate
            if type(candidate).__module__.startswith("ray"):
                continue  # the Ray wrapper: look for the original inside it
            return candidate
    return found


def find_os_error(exc: BaseException, errno_codes: tuple[int, ...]) -> OSError | None:
    """The first ``OSError`` inside ``exc`` whose errno is one of ``errno_codes`` (e.g. ENOSPC), or None."""
    for candidate in _causes(exc):
        if isinstance(candidate, OSError) and candidate.errno in errno_codes:
            return candidate
    return None
