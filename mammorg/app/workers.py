"""Model worker processes for the reporting service (``mammorg serve --workers N``).

Decoding a report is mostly Python work between small matrix products, so one process keeps one
core busy and the others nearly idle (traced with py-spy on 2 cores). With ``N`` workers, each a
process that loads the bundle once and runs with ``cores // N`` torch threads, the service decodes
``N`` batches at a time. A lone exam then runs on fewer threads (slower alone, faster under load:
docs/benchmarks.md). Two workers are the default on two cores or more (``default_workers``);
one keeps the model in the service's own process. With workers, the service's process holds
only the bundle's preprocessing. The workers stop with the service, and exit on their own
within a second if it is killed.

Batches go to the workers as lists of ``ExamViews`` and come back as ``ExamReport`` objects
(pickled between the service and its own child processes only; nothing from a client is
unpickled).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from mammorg.app.bundle import load_spec
from mammorg.app.reporting import ExamReport, ExamReporter, ExamViews, ViewLoader
from mammorg.io import MammorgError

STARTUP_S = 300.0  # the longest a worker may take to load the bundle
PARENT_CHECK_S = 1.0  # how often a worker checks that its service is alive
_REPORTER: ExamReporter | None = None  # this worker process's bundle (set once by ``_start``)


def _start(folder: str, threads: int) -> None:
    global _REPORTER
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(threads)
    _REPORTER = ExamReporter.load(folder)


def _exit_with_parent(parent: int) -> None:
    """A worker whose service died without closing it (killed) exits instead of holding its
    memory as an orphan."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _ready(flags: str, workers: int) -> int:
    """Each worker, once loaded, holds one of these calls until every worker has answered one,
    so that each answers once (a barrier in a folder: a semaphore would outlive a service
    stopped by a signal, and the resource tracker would warn of it)."""
    (Path(flags) / str(os.getpid())).touch()
    deadline = time.monotonic() + STARTUP_S
    while len(os.listdir(flags)) < workers:
        if time.monotonic() > deadline:
            raise MammorgError(f"{len(os.listdir(flags))} of {workers} model workers started")
        time.sleep(0.05)
    return os.getpid()


def _report_many(exams: list[ExamViews]) -> list[ExamReport]:
    if _REPORTER is None:
        raise MammorgError("a model worker without its bundle")
    return _REPORTER.report_many(exams)


def default_workers() -> int:
    """The service's default: two model workers where there are two cores or more (measured on 2
    cores under 4 clients: lower p95 latency, more throughput and flat memory: docs/benchmarks.md)."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


class ModelWorkers:
    """``workers`` processes with the bundle at ``folder`` loaded; ``report_many`` runs a batch in
    whichever is free. Every worker has loaded the bundle when the constructor returns. This
    process holds only the bundle's preprocessing (``views``), not its model."""

    def __init__(self, folder: str | Path, workers: int):
        if workers < 2:
            raise MammorgError(f"--workers {workers}: worker processes are for two or more (one: in-process)")
        self.folder, self.workers = Path(folder), workers
        self.views = ViewLoader(load_spec(folder))
        context = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
        self.executor = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_start,
            initargs=(str(folder), threads_per_worker(workers)),
        )
        try:
            with tempfile.TemporaryDirectory(prefix="mammorg-workers-") as flags:
                pids = {f.result() for f in [self.executor.submit(_ready, flags, workers) for _ in range(workers)]}
        except (MammorgError, BrokenProcessPool) as exc:
            self.close()
            raise MammorgError(f"{folder}: the model workers did not start ({type(exc).__name__})") from None
        if len(pids) != workers:
            raise MammorgError(f"{folder}: {len(pids)} of {workers} model workers started")
        self.pids = sorted(pids)

    async def report_many(self, exams: Sequence[ExamViews]) -> list[ExamReport]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, _report_many, list(exams))

    def close(self) -> None:
        """Stop the workers: batches not started are cancelled, a running one ends first."""
        self.executor.shutdown(wait=True, cancel_futures=True)
