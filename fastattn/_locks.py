"""ForkSafeLock: the one kind of lock fastattn holds.

``fork()`` copies a ``threading.Lock`` in the state it had in the parent.  A
lock held by another thread of the parent at that moment stays held in the
child, where that thread does not exist and never releases it: the child's
first ``acquire`` waits forever.  A module's weights and a cache's length
each change by one assignment, so the child finds them consistent whenever
the fork came; the lock is what must start free there.
"""

from __future__ import annotations

import os
import threading
import weakref

__all__ = ["ForkSafeLock"]


class ForkSafeLock:
    """A non-reentrant lock that is released in a forked child, whatever
    other thread of the parent held it when the process forked.

    Used as ``threading.Lock``: ``with lock:``, or ``acquire(blocking=False)``
    and ``release()``.  The thread that forks must not hold it.
    """

    __slots__ = ("_lock", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _live.add(self)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> "ForkSafeLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


# every ForkSafeLock alive: a child replaces their locks with fresh ones
_live: "weakref.WeakSet[ForkSafeLock]" = weakref.WeakSet()


def _release_all_in_child() -> None:
    for lock in list(_live):
        lock._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_release_all_in_child)
