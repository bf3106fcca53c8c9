"""Model worker processes for the reporting service (``mammorg serve --workers N``).

Decoding a report is mostly Python work between small matrix products, so one process keeps one
core busy and the others nearly idle (traced with py-spy on 2 cores). With ``N`` workers, each a
process that loads the bundle once and runs with ``cores // N`` torch threads, the service decodes
``N`` batches at a time. A lone exam then runs on fewer threads (slower alone, faster under load:
docs/benchmarks.md); one worker (the default) keeps the model in the service's own process.

Batches go to the workers as lists of ``ExamViews`` and come back as ``ExamReport`` objects
(pickled between the service and its own child processes only; nothing from a client is
unpickled).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from mammorg.app.reporting import ExamReport, ExamReporter, ExamViews
from mammorg.io import MammorgError

STARTUP_S = 300.0  # the longest a worker may take to load the bundle
_REPORTER: ExamReporter | None = None  # this worker process's bundle (set once by ``_start``)
_STARTED: Any = None  # a barrier shared by the workers as they start


def _start(folder: str, threads: int, started: Any) -> None:
    global _REPORTER, _STARTED
    torch.set_num_threads(threads)
    _REPORTER, _STARTED = ExamReporter.load(folder), started


def _ready() -> int:
    _STARTED.wait(timeout=STARTUP_S)  # each worker holds one of these until all have loaded
    return os.getpid()


def _report_many(exams: list[ExamViews]) -> list[ExamReport]:
    if _REPORTER is None:
        raise MammorgError("a model worker without its bundle")
    return _REPORTER.report_many(exams)


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


class ModelWorkers:
    """``workers`` processes with the bundle at ``folder`` loaded; ``report_many`` runs a batch in
    whichever is free. Every worker has loaded the bundle when the constructor returns."""

    def __init__(self, folder: str | Path, workers: int):
        if workers < 2:
            raise MammorgError(f"--workers {workers}: worker processes are for two or more (one: in-process)")
        self.workers = workers
        context = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
        self.executor = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_start,
            initargs=(str(folder), threads_per_worker(workers), context.Barrier(workers)),
        )
        try:
            pids = {f.result() for f in [self.executor.submit(_ready) for _ in range(workers)]}
        except (threading.BrokenBarrierError, BrokenProcessPool) as exc:
            self.close()
            raise MammorgError(f"{folder}: the model workers did not start ({type(exc).__name__})") from None
        if len(pids) != workers:
            raise MammorgError(f"{folder}: {len(pids)} of {workers} model workers started")

    async def report_many(self, exams: Sequence[ExamViews]) -> list[ExamReport]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, _report_many, list(exams))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
