"""Worker threads that a signal cannot hang: the parallel reads of ``data.sources`` and the matrix products of full-batch fits.

Jobs and wake-ups pass through :class:`queue.SimpleQueue`, whose ``get`` / ``put`` are single C
calls: a SIGINT / SIGTERM handler that raises in the waiting thread (the CLI's) cannot leave a
lock held halfway through one. With :class:`concurrent.futures.ThreadPoolExecutor` it could, and
its non-daemon workers, joined at exit, then kept the process from exiting (reproduced in
``tests/test_signals.py``).
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any


class Workers:
    """``n`` daemon threads running the calls of :meth:`run`.

    A thread keeps nothing of a finished call (its arguments, its buffers) while it waits for the
    next. A forked child that inherits this object starts threads of its own on first use.
    """

    def __init__(self, n: int, name: str) -> None:
        self.n, self.name = n, name
        self._pid: int | None = None
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def _start(self) -> queue.SimpleQueue[Any]:
        if self._pid != os.getpid():  # threads do not survive a fork
            jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
            for _ in range(self.n):
                threading.Thread(target=_work, args=(jobs,), daemon=True, name=self.name).start()
            self._jobs, self._pid = jobs, os.getpid()  # a signal between the two stores only starts threads again
        return self._jobs

    def run(self, calls: Sequence[Callable[[], Any]]) -> list[Any]:
        """Every call's result, in order, once all of them have finished.

        The calls wait in one deque of this run that a thread, woken, empties one ``popleft`` at a time
        (a single C call: each call is taken by exactly one thread). A signal that interrupts the waiting
        thread takes the calls no thread has started, waits for the started ones (a wake-up the signal
        made it drop costs at most 0.1 s), then re-raises: no call still runs, or writes into the caller's
        buffers, once this returns or raises. A call's exception is re-raised.
        """
        jobs = self._start()
        results: list[Any] = [None] * len(calls)
        outcomes: list[BaseException | None] = []
        wake: queue.SimpleQueue[bool] = queue.SimpleQueue()
        pending = collections.deque(enumerate(calls))  # every call, before any thread can see one
        stopped = None
        try:
            for _ in range(min(self.n, len(calls))):
                jobs.put((pending, results, outcomes, wake))
        except BaseException as exc:  # noqa: BLE001 - a signal: re-raised once the started calls have finished
            stopped = exc
        while len(outcomes) < len(calls):
            if stopped is not None:
                _cancel(pending, outcomes)
            try:
                wake.get(timeout=0.1)
            except queue.Empty:
                pass
            except BaseException as exc:  # noqa: BLE001 - a signal: re-raised once every started call has finished
                stopped = stopped or exc
        failed = stopped or next((o for o in outcomes if o is not None), None)
        if failed is not None:
            raise failed
        return results

    def close(self) -> None:
        """End the threads (once they finish what they run)."""
        if self._pid == os.getpid():
            for _ in range(self.n):
                self._jobs.put(None)
            self._pid = None


class _Cancelled(Exception):
    """The outcome of a call that no thread started because a signal stopped its run."""


def _cancel(pending: collections.deque[Any], outcomes: list[BaseException | None]) -> None:
    """Take every call of ``pending`` no thread has started, each with a :class:`_Cancelled` outcome."""
    while True:
        try:
            pending.popleft()
        except IndexError:
            return
        outcomes.append(_Cancelled())


def _work(jobs: queue.SimpleQueue[Any]) -> None:
    while (job := jobs.get()) is not None:
        _run_pending(*job)
        job = None  # while this thread waits, it keeps nothing of the run alive


def _run_pending(pending: collections.deque[Any], results: list[Any], outcomes: list[BaseException | None], wake: queue.SimpleQueue[bool]) -> None:
    """Run the calls of one :meth:`Workers.run` until its deque is empty: each result into ``results[index]``, each
    outcome (``None`` or the call's exception) appended to ``outcomes``, then a wake-up."""
    while True:
        try:
            index, call = pending.popleft()
        except IndexError:
            return
        try:
            results[index] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcomes.append(exc)
        else:
            outcomes.append(None)
        call = None
        wake.put(True)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform says, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
