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
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any


def start_daemon(target: Callable[..., Any], args: tuple[Any, ...], name: str | None = None) -> threading.Thread:
    """Start a daemon thread running ``target(*args)`` with every signal blocked while it starts.

    :meth:`threading.Thread.start` waits for the new thread on a Python-level condition; a signal
    handler that raises there (the CLI's SIGINT / SIGTERM handler) left its lock released twice
    and turned the interruption into ``RuntimeError: release unlocked lock`` (reproduced under load
    in ``tests/test_signals.py``). A signal that arrives meanwhile is delivered once the mask is
    restored, after the start. The thread inherits the mask, so signals always go to the waiting thread.
    """
    thread = threading.Thread(target=target, args=args, daemon=True, name=name)
    if not hasattr(signal, "pthread_sigmask"):  # no POSIX signal masks (Windows)
        thread.start()
        return thread
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread


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
                start_daemon(_work, (jobs,), self.name)
            self._jobs, self._pid = jobs, os.getpid()  # a signal between the two stores only starts threads again
        return self._jobs

    def run(self, calls: Sequence[Callable[[], Any]]) -> list[Any]:
        """Every call's result, in order, once all of them have finished.

        The calls wait in one deque of this run that the woken threads empty one ``popleft`` at a time
        (a single C call: each call is taken by exactly one thread, which records exactly one outcome
        for it). A signal that interrupts the waiting thread makes the threads drop the calls they
        have not started; the thread waits for the started ones (a wake-up the signal made it drop
        costs at most 0.1 s), then re-raises: no call still runs, or writes into the caller's buffers,
        once this returns or raises. A call's exception is re-raised.
        """
        jobs = self._start()
        results: list[Any] = [None] * len(calls)
        outcomes: list[BaseException | None] = []
        wake: queue.SimpleQueue[bool] = queue.SimpleQueue()
        dropped = [False]
        job = (collections.deque(enumerate(calls)), dropped, results, outcomes, wake)  # every call, before a thread can see one
        stopped, rescued = None, False
        try:
            for _ in range(min(self.n, len(calls))):
                jobs.put(job)
        except BaseException as exc:  # noqa: BLE001 - a signal: re-raised once the started calls have finished
            stopped = exc
        while len(outcomes) < len(calls):
            try:
                if stopped is not None and not rescued:
                    dropped[0] = True
                    jobs.put(job)  # a thread to drop what is left, should the signal have cut the puts above short
                    rescued = True  # a signal just before this only puts one more (harmless) wake-up
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


class _Dropped(Exception):
    """The outcome of a call that no thread started because a signal stopped its run."""


def _work(jobs: queue.SimpleQueue[Any]) -> None:
    while (job := jobs.get()) is not None:
        _run_pending(*job)
        job = None  # while this thread waits, it keeps nothing of the run alive


def _run_pending(pending: collections.deque[Any], dropped: list[bool], results: list[Any], outcomes: list[BaseException | None],
                 wake: queue.SimpleQueue[bool]) -> None:
    """Take the calls of one :meth:`Workers.run` until its deque is empty: run each (its result into ``results[index]``, its
    outcome, ``None`` or its exception, appended to ``outcomes``) or, once ``dropped[0]``, record a :class:`_Dropped`
    outcome; then a wake-up."""
    while True:
        try:
            index, call = pending.popleft()
        except IndexError:
            return
        if dropped[0]:
            outcomes.append(_Dropped())
        else:
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
