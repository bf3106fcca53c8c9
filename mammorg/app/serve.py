"""The reporting service: ``mammorg serve --bundle BUNDLE [--host 127.0.0.1] [--port 8080]``.

A FastAPI app (run by uvicorn) that loads a bundle once and reports on exams:

- ``GET /health``: the bundle's name, the sha256 of its metadata (which lists every file's hash)
  and the versions of mammorg, torch and transformers;
- ``POST /report``: one exam's views as multipart files (field ``files``, DICOM), answered with the
  report JSON (``?format=json``), the DICOM Comprehensive SR (``?format=sr``) or an HTML fragment
  for the page (``?format=html``);
- ``GET /``: a page to upload an exam and see the four views with the stage-1 heatmaps, the
  narrative, the structured findings and the probabilities.

Each request's views are decoded and preprocessed beside the others; the exams then wait in a
bounded queue and the model takes every waiting exam in one batch (stage 1 and decoding
batched), so concurrent clients share the model's work; a full queue answers 503. With
``--workers N`` (default 2 on two cores or more) the model runs in N worker processes, N batches at a
time (``mammorg.app.workers``). Uploads are limited in size and number of views; a bad upload (not
DICOM, no usable view, too large, too many files) gets a 4xx with a one-line reason and the
service keeps serving. Logs hold a request number, the number of views, the status and the time:
nothing of the patient. Each report's ``Server-Timing`` header says where its time went (upload,
preprocessing, queue, model, batch size). It binds to the loopback address unless told
otherwise; with a token, ``POST /report`` needs ``Authorization: Bearer T``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import io
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pydicom
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydicom.errors import InvalidDicomError
from starlette.concurrency import run_in_threadpool

from mammorg.app.reporting import ExamReport, ExamReporter, ExamViews
from mammorg.app.results import STYLE, stage1_summary, views_png
from mammorg.app.workers import ModelWorkers, default_workers
from mammorg.io import MammorgError
from mammorg.labels import VIEWS

LOG = logging.getLogger("mammorg.serve")
CHUNK = 1 << 20


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def health_record(folder: Path) -> dict[str, Any]:
    meta = folder / "metadata.json"
    return {
        "status": "ok",
        "bundle": folder.name,
        "bundle_sha256": hashlib.sha256(meta.read_bytes()).hexdigest(),
        "versions": {p: _version(p) for p in ("mammorg", "torch", "transformers")},
    }


def report_fragment(report: ExamReport) -> str:
    """The page's view of one report: views with heatmaps, narrative, facts, probabilities."""
    views = report.exam_views
    figure = (
        views_png(
            views.images,
            None if report.heatmaps is None else report.heatmaps.numpy(),
            report.stage1.grounded,
            views.geometry,
        )
        if views
        else ""
    )
    flags = "".join(f"<p class='bad'>{html.escape(f)}</p>" for f in report.flags)
    return (
        f"<section class='card'><h3>Report ({report.seconds:.2f} s; views {', '.join(report.views)})</h3>{flags}"
        + (f"<img class='views' alt='views with stage-1 heatmaps' src='{figure}'>" if figure else "")
        + f"<div class='reports'><div><b>Narrative</b><pre>{html.escape(report.text)}</pre></div>"
        f"<div><b>Structured</b><pre>{html.escape(json.dumps(report.structured.to_json(), indent=1))}</pre></div></div>"
        f"{stage1_summary(report.stage1)}</section>"
    )


PAGE = """<!doctype html><html lang='en'><head><meta charset='utf-8'><title>mammorg reporting</title>
<meta name='viewport' content='width=device-width'><style>{style}
form{{background:#fff;border:1px solid #d5dde5;border-radius:8px;padding:16px 18px}}
button{{background:#15324b;color:#fff;border:0;border-radius:5px;padding:7px 16px;font-size:15px;cursor:pointer}}
#status{{margin-left:12px;color:#45535f}}</style></head><body>
<header><h1>mammorg reporting</h1>
<p>{bundle} · upload the DICOM views of one exam (L-CC, L-MLO, R-CC, R-MLO)</p></header>
<main><form id='f'><input type='file' id='files' name='files' multiple accept='.dcm,.dicom,application/dicom'>
<input type='password' id='token' placeholder='access token (if the service has one)'>
<button type='submit'>Report</button><span id='status'></span></form><div id='out'></div></main>
<script>
document.getElementById('f').addEventListener('submit', async (e) => {{
  e.preventDefault();
  const data = new FormData();
  for (const file of document.getElementById('files').files) data.append('files', file);
  const headers = {{}};
  const token = document.getElementById('token').value;
  if (token) headers['Authorization'] = 'Bearer ' + token;
  const status = document.getElementById('status');
  status.textContent = 'reporting...';
  const response = await fetch('report?format=html', {{method: 'POST', body: data, headers}});
  if (response.ok) {{ document.getElementById('out').innerHTML = await response.text(); status.textContent = ''; }}
  else {{ status.textContent = (await response.json()).detail; }}
}});
</script></body></html>"""


@dataclass(frozen=True)
class ModelTiming:
    """Where an exam's time in the model went: waiting for a batch slot (``queued``, seconds), its
    batch's run (``model``) and the batch's size. The service sends it as ``Server-Timing``."""

    queued: float
    model: float
    batch: int


class Batcher:
    """Exams wait in a bounded queue; the model takes every exam waiting (up to ``max_batch``) in
    one batch, so concurrent clients share stage-1 passes and decoding steps. A batch that fails
    is retried exam by exam, so one bad exam fails only its own request. ``run`` reports on a
    batch (in the service's process, or in a model worker: ``mammorg.app.workers``); up to
    ``slots`` batches run at once (one per worker).

    Under load the model also waits (at most ``linger`` seconds) for its share of the exams that
    were in the service while the last batch ran (the most at any moment: queued, being gathered
    or reported on, shared among the ``slots``): the clients just answered send their next exams
    while the others run, and without the wait the batches settle into a lone exam and the rest
    (traced with 4 clients: batches of 1 and 3, alternating, never 4; with two slots and no
    sharing, one slot waited for all four and the other stayed idle). The peak, not the count when
    the batch ended: clients answered a moment before are between requests then, and counting
    only those in the service split 4 clients on 2 slots into batches of 1 again and again (a
    simulation, 4 seeds: 8 to 22 lone batches in about 64, against 1 to 3 in 59). While another
    slot is free a batch takes only its share of the waiting exams and leaves it the rest. An
    idle service (its last batch ended longer than ``linger`` ago) starts at once."""

    def __init__(
        self,
        run: Callable[[list[Any]], Awaitable[list[ExamReport]]],
        max_batch: int = 8,
        limit: int = 32,
        linger: float = 0.25,
        slots: int = 1,
    ):
        self.run, self.max_batch, self.linger, self.slots, self.limit = run, max_batch, linger, slots, limit
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop the queue and worker belong to
        self.queue: asyncio.Queue = asyncio.Queue(limit)
        self.worker: asyncio.Task | None = None
        self.inflight = 0  # exams in the service: queued, being gathered or reported on
        self.running: dict[asyncio.Task, int] = {}  # batches being reported on: peak inflight while each ran
        self.expected = 1  # the peak of inflight while the last batch ran
        self.finished = float("-inf")  # when it ended (event-loop time)

    async def report(self, views: Any) -> ExamReport:
        return (await self.report_timed(views))[0]

    async def report_timed(self, views: Any) -> tuple[ExamReport, ModelTiming]:
        """The exam's report and where its time in the model went."""
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # a new event loop (a restarted server, a test client): start afresh
            self.loop, self.queue, self.worker = loop, asyncio.Queue(self.limit), None
        if self.queue.full():
            raise HTTPException(503, f"the service is busy ({self.queue.qsize()} exams waiting); try again shortly")
        future = loop.create_future()
        queued = loop.time()
        await self.queue.put((views, future))
        self.inflight += 1
        for task, peak in self.running.items():
            self.running[task] = max(peak, self.inflight)
        try:
            if self.worker is None or self.worker.done():
                self.worker = asyncio.create_task(self._run())
            report, started, ended, size = await future
        finally:
            self.inflight -= 1
        return report, ModelTiming(started - queued, ended - started, size)

    async def collect(self, idle_slots: int = 0) -> list[tuple[Any, asyncio.Future]]:
        """The next batch: every exam waiting and, under load, those expected within ``linger``.
        While ``idle_slots`` other slots are free it takes only its share and leaves them the rest."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        start = loop.time()
        busy = start - self.finished < self.linger
        share = max(-(-self.expected // self.slots) if busy else 1, -(-(1 + self.queue.qsize()) // (1 + idle_slots)))
        share = min(self.max_batch, share)
        while len(batch) < (share if idle_slots else self.max_batch):
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = start + self.linger - loop.time()
            if len(batch) >= share or left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        free = asyncio.Semaphore(self.slots)
        while True:
            await free.acquire()
            batch = await self.collect(idle_slots=self.slots - 1 - len(self.running))
            task = asyncio.create_task(self._answer(batch))
            self.running[task] = self.inflight
            task.add_done_callback(self._done)
            task.add_done_callback(lambda _: free.release())

    def _done(self, task: asyncio.Task) -> None:
        self.running.pop(task, None)

    async def _answer(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            reports = await self.run([views for views, _ in batch])
            ended = loop.time()
            LOG.info("batch of %d exam(s): %.2f s", len(batch), ended - started)
            for (_, future), report in zip(batch, reports):
                future.set_result((report, started, ended, len(batch)))
        except Exception:
            for views, future in batch:  # one by one: the failing exam fails alone
                try:
                    alone = loop.time()
                    report = (await self.run([views]))[0]
                    future.set_result((report, alone, loop.time(), 1))
                except Exception as exc:
                    future.set_exception(exc)
        task = asyncio.current_task()
        self.expected = max(self.running.get(task, 1) if task else 1, self.inflight)
        self.finished = asyncio.get_running_loop().time()


def server_timing(read: float, prepare: float, model: ModelTiming) -> str:
    """The ``Server-Timing`` header of a report (milliseconds): reading the upload, decoding and
    preprocessing its views, waiting for a model slot, the batch's run, and the batch's size."""
    parts = {"read": read, "prepare": prepare, "queue": model.queued, "model": model.model}
    timed = ", ".join(f"{name};dur={1000 * seconds:.1f}" for name, seconds in parts.items())
    return f'{timed}, batch;desc="{model.batch}"'


async def read_uploads(files: list[UploadFile], max_bytes: int, max_views: int) -> list[pydicom.Dataset]:
    """The uploaded DICOM datasets; a 4xx with a one-line reason for a bad upload."""
    if not files:
        raise HTTPException(422, "no files: send the exam's views as multipart field 'files'")
    if len(files) > max_views:
        raise HTTPException(422, f"{len(files)} files: an exam has at most {max_views} views")
    datasets: list[pydicom.Dataset] = []
    total = 0
    for number, upload in enumerate(files, 1):
        name = f"file {number}"  # never the client's file name (it may hold a patient's name)
        buf = io.BytesIO()
        while chunk := await upload.read(CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise HTTPException(413, f"upload larger than {max_bytes // (1 << 20)} MiB")
            buf.write(chunk)
        try:
            datasets.append(pydicom.dcmread(io.BytesIO(buf.getvalue())))
        except (InvalidDicomError, EOFError, ValueError, TypeError, OSError) as exc:
            raise HTTPException(415, f"{name}: not a readable DICOM file ({str(exc).splitlines()[0][:120]})") from None
    return datasets


def create_app(
    model: ExamReporter | ModelWorkers,
    token: str | None = None,
    max_upload_mb: float = 64.0,
    max_views: int = len(VIEWS),
    max_waiting: int = 32,
    batch_wait: float = 0.25,
) -> FastAPI:
    """The service (see the module docstring) around a bundle loaded in this process
    (``ExamReporter``) or in model worker processes (``ModelWorkers``, closed with the app)."""
    pool: ModelWorkers | None = None
    if isinstance(model, ModelWorkers):
        pool = model
        run, slots, views, folder = pool.report_many, pool.workers, pool.views, pool.folder
    else:
        reporter = model

        async def in_process(exams: Sequence[ExamViews]) -> list[ExamReport]:
            return await run_in_threadpool(reporter.report_many, exams)

        run, slots, views, folder = in_process, 1, reporter.views, reporter.bundle.folder

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if pool is not None:
            pool.close()

    app = FastAPI(title="mammorg reporting", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    batcher = Batcher(run, limit=max_waiting, linger=batch_wait, slots=slots)
    health = health_record(folder)
    counter = itertools.count(1)
    max_bytes = int(max_upload_mb * (1 << 20))

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token")

    @app.exception_handler(HTTPException)
    async def one_line(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail).splitlines()[0]}, status_code=exc.status_code)

    @app.get("/health")
    async def get_health() -> dict[str, Any]:
        return health

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.format(style=STYLE, bundle=html.escape(health["bundle"]))

    @app.post("/report")
    async def post_report(
        request: Request,
        files: list[UploadFile] = File(default=[]),  # noqa: B008 (FastAPI's declaration style)
        format: str = Query("json", pattern="^(json|sr|html)$"),
    ) -> Response:
        number, t0 = next(counter), time.perf_counter()
        status = 500
        try:
            authorised(request)
            length = int(request.headers.get("content-length") or 0)
            if length > max_bytes + (1 << 16):
                raise HTTPException(413, f"upload larger than {max_upload_mb:g} MiB")
            datasets = await read_uploads(files, max_bytes, max_views)
            t_read = time.perf_counter()
            try:  # preprocessing runs beside other requests; the model takes exams in batches
                exam = await run_in_threadpool(views.load_datasets, datasets)
                t_prepared = time.perf_counter()
                report, timing = await batcher.report_timed(exam)
            except MammorgError as exc:
                raise HTTPException(422, str(exc).splitlines()[0]) from None
            status = 200
            headers = {"Server-Timing": server_timing(t_read - t0, t_prepared - t_read, timing)}
            if format == "sr":
                buf = io.BytesIO()
                report.to_sr().save_as(buf, enforce_file_format=True)
                return Response(buf.getvalue(), media_type="application/dicom", headers=headers)
            if format == "html":
                return HTMLResponse(report_fragment(report), headers=headers)
            return JSONResponse(report.to_json(), headers=headers)
        except HTTPException as exc:
            status = exc.status_code
            raise
        except Exception as exc:  # one line, never a traceback to the client
            LOG.exception("request %d failed", number)
            raise HTTPException(500, f"internal error ({type(exc).__name__})") from None
        finally:
            LOG.info("request %d: %d file(s), status %d, %.2f s", number, len(files), status, time.perf_counter() - t0)

    return app


def serve(
    bundle: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    max_upload_mb: float = 64.0,
    batch_wait: float = 0.25,
    workers: int | None = None,
) -> None:
    """Load the bundle once (in this process, or once per model worker with ``workers`` > 1: this
    process then holds only its preprocessing) and serve it with uvicorn. ``workers`` None: the
    default for this machine (``default_workers``)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        LOG.warning("serving on %s without a token: anyone who can reach it can send exams", host)
    workers = default_workers() if workers is None else workers
    LOG.info("loading %s in %s", Path(bundle).name, f"{workers} model workers" if workers > 1 else "this process")
    model = ModelWorkers(bundle, workers) if workers > 1 else ExamReporter.load(bundle)
    app = create_app(model, token, max_upload_mb, batch_wait=batch_wait)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
