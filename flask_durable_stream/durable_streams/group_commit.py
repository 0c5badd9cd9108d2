"""Group commit: the writes that arrive together share one transaction.

A commit costs the same for one append as for ten (the ``BEGIN``, the
``COMMIT`` and the pages written to the WAL), so the writes a process
receives at the same time are run one after the other inside one
transaction, each in its own savepoint, and every caller gets its own result
only once that transaction has committed: nothing is acknowledged before it
is durable.

The first caller to arrive leads: it yields once (under gevent the requests
read in the same turn of the event loop reach :meth:`GroupCommit.run` in the
meantime; with threads, callers queue while a commit runs), takes everything
queued, commits it, and hands the lead to the first caller queued after its
batch, if any. A caller never waits for more than the batch before its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from .._concurrency import real_lock
from .store import yield_to_greenlets

_T = TypeVar("_T")


_SET = threading.Event()  # the leader's: it never waits
_SET.set()


class Job(Generic[_T]):
    """One caller's function and, once its batch committed, its outcome."""

    __slots__ = ("fn", "done", "lead", "value", "error")

    def __init__(self, fn: Callable[..., _T]) -> None:
        self.fn = fn
        self.done: threading.Event = _SET  # a caller that queues gets one to wait on
        self.lead = False
        self.value: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> _T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[no-any-return]


class GroupCommit:
    """``commit(jobs)`` runs every job's function in one transaction and sets each outcome.

    It must set an outcome on every job (an error on all of them if the
    transaction failed) and never raise.
    """

    def __init__(self, commit: Callable[[Sequence[Job[Any]]], None]) -> None:
        self._commit = commit
        self._lock = real_lock()  # short sections that never switch
        self._queue: list[Job[Any]] = []
        self._busy = False

    def run(self, fn: Callable[..., _T]) -> _T:
        job: Job[_T] = Job(fn)
        with self._lock:
            self._queue.append(job)
            lead = not self._busy
            self._busy = True
            if not lead:
                job.done = threading.Event()
        if not lead:
            try:
                job.done.wait()
            except BaseException:  # killed while queued: never leave a dead job to lead
                self._withdraw(job)
                raise
            if not job.lead:
                return job.outcome()
        self._lead(job)
        return job.outcome()

    def _withdraw(self, job: Job[Any]) -> None:
        """Take a waiting caller's job out; if the lead was just handed to it, pass it on."""
        with self._lock:
            if job not in self._queue:
                return  # its batch was taken: it commits (or not) with it
            self._queue.remove(job)
            if not job.lead:
                return
            if self._queue:
                self._queue[0].lead = True
                self._queue[0].done.set()
            else:
                self._busy = False

    def _lead(self, job: Job[Any]) -> None:
        batch: list[Job[Any]] | None = None
        try:
            yield_to_greenlets()  # the writes that arrived with this one join it
            with self._lock:
                batch, self._queue = self._queue, []
            self._commit(batch)
        finally:
            with self._lock:
                if batch is None:  # interrupted before taking the batch: this job is not run
                    self._queue.remove(job)
                    job.error = job.error or RuntimeError("interrupted before it committed")
                if self._queue:  # arrived during the commit: the first of them leads next
                    self._queue[0].lead = True
                    self._queue[0].done.set()
                else:
                    self._busy = False
            for other in batch or ():
                if other is not job:
                    other.done.set()
