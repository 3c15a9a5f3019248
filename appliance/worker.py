"""The ``infer`` worker: its own process, taking queued jobs from the store in priority order.

A crash inside a GPU or codec library kills only this process; the supervisor re-queues the job it held
(``JobQueue.recover``) and starts a new worker, so a job is retried after a crash or kill and marked
failed after ``inference.max_attempts`` tries. Models and backends are opened once and kept.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from appliance import logs
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.fsio import fsync_dir
from appliance.infer.backends import Backend, open_backend
from appliance.infer.pipeline import limit_heap_retention, paused_gc, run_series, write_outputs
from appliance.models.package import ModelPackage, installed_package
from appliance.results import build_results
from appliance.store import RESULTS_DIR, Store
from appliance.store.jobs import Job, JobQueue, NewObject
from appliance.store.locks import hold_processes_lock

log = logging.getLogger("appliance.worker")


class _Stopping(BaseException):
    """Raised in the worker's main thread by SIGTERM: abandon the job, give it back, exit."""


class Worker:
    def __init__(self, config: Config, store: Store) -> None:
        self.config, self.store = config, store
        self.jobs = JobQueue(store.index)
        #: Opened models, by name: loading and engine set-up happen once per worker.
        self._opened: dict[str, tuple[ModelPackage, Backend]] = {}
        #: True while a job runs: only then does SIGTERM interrupt (and give the job back).
        self.busy = False
        self._last_disk_warning = 0.0

    def disk_too_low(self) -> bool:
        """True while the data disk is under half the ingest reserve: jobs then wait instead of failing.

        Ingest stops accepting at ``storage.min_free_bytes``, so the lower half of that reserve is what is kept
        for results. A job that ran out of disk would fail for good; waiting lets retention or an admin free
        space, and the queued work (whose scans are safe in the spool) resumes by itself.
        """
        reserve = self.config.storage.min_free_bytes // 2
        if reserve <= 0:
            return False
        free = self.store.spool.free_bytes()
        if free >= reserve:
            return False
        now = time.monotonic()
        if now - self._last_disk_warning >= 60.0 or self._last_disk_warning == 0.0:
            self._last_disk_warning = now
            log.warning(
                "data disk %s has %d MB free, under half the reserve (%d MB): queued jobs wait until space "
                "is freed (delivered series are purged after storage.retention_days)",
                self.store.data_dir,
                free // 1_000_000,
                self.config.storage.min_free_bytes // 1_000_000,
            )
        return True

    def backend_for(self, model: str) -> tuple[ModelPackage, Backend]:
        if model not in self._opened:
            inf = self.config.inference
            package = installed_package(inf.resolved_models_dir(), model)
            backend = open_backend(package, inf.backend, inf.precision, self.store.data_dir / "engines", inf.threads)
            log.info(
                "model %s %s opened on %s (%s, %s)",
                package.name,
                package.version,
                backend.name,
                backend.device,
                backend.precision,
            )
            self._opened[model] = (package, backend)
        return self._opened[model]

    def run_job(self, job: Job) -> None:
        t0 = time.perf_counter()
        log.info("job %d: %s on series %s (attempt %d)", job.id, job.model, job.series_uid, job.attempts)
        try:
            package, backend = self.backend_for(job.model)
            paths = [self.store.spool.root / r["path"] for r in self.store.index.series_instances(job.series_uid)]
            # In slabs: the worker's peak memory follows [inference] memory_budget_mb, not the series length.
            result = run_series(paths, package, backend, memory_budget_mb=self.config.inference.memory_budget_mb)
            rel = f"{RESULTS_DIR}/{job.series_uid}/{job.model}"
            out = self.store.data_dir / rel
            t_res = time.perf_counter()
            # labelmap.npz is mostly zlib (which releases the GIL) and the DICOM results mostly Python: on a
            # thread of its own the archive costs the second core, not the job's wall time (~0.3 s at 300
            # slices). Both read the label map, neither changes it.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="labelmap") as pool:
                written = pool.submit(write_outputs, result, out)
                made = build_results(result, package, out)
                written.result()
            result.timings["results"] = time.perf_counter() - t_res
            fsync_dir(out)
            fsync_dir(out.parent)
            fsync_dir(out.parent.parent)
        except ApplianceError as exc:
            log.error("job %d (%s on %s) failed: %s", job.id, job.model, job.series_uid, exc)
            self.jobs.finish(job, ok=False, reason=str(exc))
            return
        except (MemoryError, Exception) as exc:  # a bug or a library fault: fail this job, keep serving
            log.exception("job %d (%s on %s) failed with an internal error", job.id, job.model, job.series_uid)
            self.jobs.finish(job, ok=False, reason=f"internal error: {type(exc).__name__}: {exc}")
            return
        timings = {k: round(v, 3) for k, v in result.timings.items()}
        timings["total"] = round(time.perf_counter() - t0, 3)
        objects = [
            NewObject(
                kind=o.kind,
                sop_class_uid=o.sop_class_uid,
                sop_instance_uid=o.sop_instance_uid,
                result_series_uid=o.series_instance_uid,
                path=f"{rel}/{o.filename}",
            )
            for o in made
        ]
        if self.jobs.finish(
            job,
            ok=True,
            reason="done",
            backend=backend.name,
            device=backend.device,
            precision=backend.precision,
            timings=timings,
            result_dir=rel,
            objects=objects,
        ):
            log.info(
                "job %d done in %.1f s (%s): %d slices, %d lesion(s), %d result object(s) for %s; %s",
                job.id,
                timings["total"],
                backend.name,
                result.labels.shape[0],
                result.summary.measurements.lesion_count,
                len(objects),
                ", ".join(job.destinations) or "no destination",
                ", ".join(f"{k} {v:.2f}s" for k, v in timings.items() if k != "total"),
            )
        else:
            log.info("job %d finished but its series changed meanwhile; the newer run will replace it", job.id)

    def run(self, stop: threading.Event, poll_seconds: float) -> None:
        pid = os.getpid()
        while not stop.is_set():
            if self.disk_too_low():
                stop.wait(max(poll_seconds, 5.0))
                continue
            job = self.jobs.claim(pid)
            if job is None:
                stop.wait(poll_seconds)
                continue
            try:
                self.busy = True
                with paused_gc():  # collected once the job is finished and recorded (see paused_gc)
                    self.run_job(job)
            except _Stopping:
                self.jobs.give_back(job)
                log.info("job %d given back to the queue (stopping)", job.id)
                return
            finally:
                self.busy = False


def run_worker(config: Config, ready: Any) -> None:
    """Process entry point: work until SIGTERM."""
    logs.setup(config.logging.level)
    limit_heap_retention()  # slab buffers go back to the system when freed: the peak stays at the budget
    if config.inference.nice:
        # Receiving comes first: a modality waiting on a C-STORE response must not wait for a model.
        os.nice(config.inference.nice)
    stop = threading.Event()

    def on_term(*_: Any) -> None:
        if stop.is_set():
            return  # already stopping: let the give-back finish
        stop.set()
        if worker.busy:  # interrupt the job; between jobs the loop sees ``stop`` by itself
            raise _Stopping

    store = Store.open(config.storage.data_dir)
    alive = hold_processes_lock(store.data_dir)  # noqa: F841 (held until this process exits)
    worker = Worker(config, store)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    ready.set()
    try:
        worker.run(stop, config.inference.poll_seconds)
    except _Stopping:
        pass
    store.index.close()
    log.info("worker stopped")
