"""``forked_map``: a map over forked worker processes that share the caller's state and that a signal cannot hang.

The workers inherit the caller's state through ``fork`` (a graph of millions of cells costs
nothing to share) and talk to it over one pipe each, with no lock in the caller: whatever
exception stops the caller (a scheduler's SIGTERM raised by the CLI's handler, an error of an
item), the workers are killed and reaped at once. ``concurrent.futures.ProcessPoolExecutor``
waits on locks that a signal raising between two bytecodes can leave held, and joins its workers
at exit: interrupted calls left workers alive and the process never exited (reproduced with
timer signals; ``tests/test_signals.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

_STATE: object = None  # what forked workers read (inherited, never pickled)


def forked_map(fn: Callable[[Any, Any], Any], items: Sequence[Any], state: Any, n_jobs: int | None = None) -> list[Any]:
    """``[fn(state, item) for item in items]``, in forked worker processes when more than one CPU is usable.

    Parameters
    ----------
    fn
        A function of ``(state, item)``, inherited by the workers as ``state`` is; the items and the
        results are pickled.
    items
        Handed out in order, one at a time to whichever worker is free, so put the longest first.
    state
        Inherited by the workers, never copied.
    n_jobs
        Worker processes (default: every usable CPU; at most one per item). Each runs with one
        BLAS thread (and one torch thread, when the caller loaded torch). Without ``fork``
        (Windows, macOS defaults), with one CPU or one item, the calls run here, in order.

    Raises
    ------
    Whatever ``fn`` raised in a worker (its traceback text is the cause), or ``RuntimeError`` when a
    worker died; the other workers are killed first.
    """
    import multiprocessing as mp

    from scatlas._threads import usable_cpus

    jobs = min(len(items), n_jobs or usable_cpus())
    if jobs < 2 or "fork" not in mp.get_all_start_methods():
        return [fn(state, item) for item in items]
    global _STATE
    _STATE = state
    workers: list[tuple[Any, Any]] = []
    try:
        _start_workers(fn, jobs, workers)
        return _dispatch(items, workers)
    finally:
        _STATE = None
        for process, conn in workers:
            conn.close()  # a worker whose start a signal cut short (no pid) sees end-of-file and exits by itself
            if process.pid is not None:
                process.kill()  # idle or not: every result is in, or the call is abandoned
        for process, _ in workers:
            if process.pid is not None:
                process.join()


def _start_workers(fn: Callable[[Any, Any], Any], jobs: int, workers: list[tuple[Any, Any]]) -> None:
    """Fork ``jobs`` workers serving ``fn``, appending each ``(process, pipe end)`` to ``workers`` before it starts."""
    import multiprocessing as mp
    import warnings

    context = mp.get_context("fork")
    with warnings.catch_warnings():
        # Python ≥ 3.12 warns on fork from a process with threads (torch's pool); the workers
        # reset their thread pools before any work and never touch the parent's threads.
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        for _ in range(jobs):
            here, there = context.Pipe()
            # a worker closes the caller's ends it inherited, so each sees end-of-file once the caller's end is gone
            process = context.Process(target=_serve, args=(fn, there, [c for _, c in workers] + [here]), daemon=True)
            workers.append((process, here))  # before the fork: a signal during it leaves nothing unlisted
            try:
                process.start()
            finally:
                there.close()


def _dispatch(items: Sequence[Any], workers: list[tuple[Any, Any]]) -> list[Any]:
    """Hand ``items`` to the workers in order as each frees up; their results in the items' order."""
    from multiprocessing.connection import wait

    results: list[Any] = [None] * len(items)
    pending = iter(range(len(items)))
    busy: dict[Any, Any] = {}
    for process, conn in workers:
        index = next(pending, None)
        if index is not None:
            conn.send((index, items[index]))
            busy[conn] = process
    while busy:
        for conn in wait(list(busy)):
            try:
                index, ok, value = conn.recv()
            except (EOFError, ConnectionResetError):
                busy[conn].join(5)  # its end closes as it exits: the exit code follows
                raise RuntimeError(f"a worker process died (exit code {busy[conn].exitcode})") from None
            if not ok:
                error, trace = value
                raise error from RuntimeError(f"in a worker process:\n{trace}")
            results[index] = value
            following = next(pending, None)
            if following is None:
                del busy[conn]
            else:
                conn.send((following, items[following]))
    return results


def _serve(fn: Callable[[Any, Any], Any], conn: Any, inherited: list[Any]) -> None:
    """A worker: ``fn(state, item)`` for each ``(index, item)`` received, until end-of-file (the caller closed its end or died)."""
    import pickle
    import signal
    import sys
    import traceback

    from threadpoolctl import threadpool_limits

    for end in inherited:
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the caller kills the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a scheduler's SIGTERM to the group ends them at once
    if "torch" in sys.modules:  # one thread per worker: OpenMP in a forked child hangs unless reset, and the workers fill the CPUs
        sys.modules["torch"].set_num_threads(1)
    with threadpool_limits(1):
        while True:
            try:
                index, item = conn.recv()
            except (EOFError, ConnectionResetError):  # the caller closed its end (a socket pair: reset when it left data unread)
                return
            try:
                reply = (index, True, fn(_STATE, item))
            except Exception as error:  # noqa: BLE001 - re-raised in the caller
                reply = (index, False, (error, traceback.format_exc()))
                try:
                    pickle.loads(pickle.dumps(error))
                except Exception:  # noqa: BLE001 - an exception that cannot travel goes as its text
                    reply = (index, False, (RuntimeError(f"{type(error).__name__}: {error}"), traceback.format_exc()))
            try:
                conn.send(reply)
            except (BrokenPipeError, ConnectionResetError):
                return
