"""``appliance serve``: the supervisor that runs every stage.

The supervisor binds the DICOM port itself (so "port already in use" is a clear start-up error),
starts the ingest listener processes on that socket, runs the assembler, restarts a listener that
dies, and on SIGTERM stops everything in order and exits 0.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import multiprocessing
import signal
import socket
import threading
import time
from typing import Any

from appliance import __version__
from appliance.assemble import Assembler
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.export import Sender
from appliance.retention import Purger
from appliance.ingest.listener import DRAIN_SECONDS, run_listener
from appliance.ingest.recovery import index_orphans
from appliance.models.package import find_packages
from appliance.route import Router
from appliance.store.jobs import JobQueue
from appliance.worker import run_worker
from appliance.store import Store
from appliance.store.locks import lock_data_dir, wait_for_previous_run

log = logging.getLogger("appliance.service")

READY_TIMEOUT = 60.0
#: A listener that dies more than MAX_RESTARTS times within RESTART_WINDOW seconds stops the appliance.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


class StartupError(ApplianceError):
    """The appliance cannot start; the message says what to fix."""


def _bind(config: Config) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.dicom.bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.dicom.bind, config.dicom.port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"DICOM port {config.dicom.port} on {config.dicom.bind} is already in use "
                               "(another appliance or DICOM service?): stop it or set [dicom] port") from None
        raise StartupError(f"cannot listen on {config.dicom.bind}:{config.dicom.port}: {exc.strerror}") from None
    return sock


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stop = threading.Event()
        self.ctx = multiprocessing.get_context("spawn")

    def run(self) -> int:
        cfg = self.config
        store = Store.open(cfg.storage.data_dir)
        lock = lock_data_dir(store.data_dir)
        procs_lock = wait_for_previous_run(store.data_dir)
        removed = store.spool.remove_partials()
        lost = store.index.mark_lost_associations()
        if removed or lost:
            log.warning("recovered after an unclean stop: removed %d partial file(s), %d association(s) never "
                        "released", removed, lost)
        index_orphans(store)
        requeued, failed = JobQueue(store.index).recover(set(), cfg.inference.max_attempts)
        if requeued or failed:
            log.warning("inference jobs interrupted by the unclean stop: %d re-queued, %d failed after %d attempts",
                        requeued, failed, cfg.inference.max_attempts)
        models_dir = cfg.inference.resolved_models_dir()
        packages, refused = find_packages(models_dir)
        for name, why in refused.items():
            log.error("model package %s refused: %s", name, why)
        log.info("models in %s: %s", models_dir, ", ".join(f"{p.name} {p.version}" for p in packages) or "none")
        fcntl.flock(procs_lock, fcntl.LOCK_SH)  # recovery done: from here on, one of the live processes
        sock = _bind(cfg)
        n = cfg.dicom.listener_count()
        slots = self.ctx.Array("i", n)
        listeners: list[Any] = [None] * n
        readies: list[Any] = [None] * n

        def start(i: int) -> None:
            readies[i] = self.ctx.Event()
            with slots.get_lock():
                slots[i] = 0
            p = self.ctx.Process(target=run_listener, args=(cfg, sock, slots, i, readies[i]), name=f"ingest-{i}")
            p.start()
            listeners[i] = p

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        for i in range(n):
            start(i)
        deadline = time.monotonic() + READY_TIMEOUT
        for i in range(n):
            if not readies[i].wait(max(0.0, deadline - time.monotonic())):
                self.stop.set()
                self._stop_all(listeners)
                raise StartupError(f"ingest listener {i} did not start within {READY_TIMEOUT:.0f} s; see the log above")
        log.info("appliance %s receiving as AE %r on %s:%d (%d listener processes), data in %s",
                 __version__, cfg.dicom.ae_title, cfg.dicom.bind, cfg.dicom.port, n, store.data_dir)

        assembler = Assembler(store.index, cfg.assemble)
        assemble_thread = threading.Thread(target=assembler.run, args=(self.stop,), name="assemble", daemon=True)
        assemble_thread.start()
        router = Router(store.index, store.spool.root, cfg.routes, {p.name for p in packages},
                        cfg.inference.poll_seconds)
        route_thread = threading.Thread(target=router.run, args=(self.stop,), name="route", daemon=True)
        route_thread.start()
        sender = Sender(cfg, store)
        export_thread = threading.Thread(target=sender.run, args=(self.stop,), name="export", daemon=True)
        export_thread.start()
        purger = Purger(store, cfg.storage.retention_days)
        purge_thread = threading.Thread(target=purger.run, args=(self.stop,), name="retention", daemon=True)
        purge_thread.start()
        worker = self._start_worker()

        restarts: list[float] = []
        while not self.stop.wait(0.5):
            for i, p in enumerate(listeners):
                if p.is_alive() or self.stop.is_set():
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
                if len(restarts) > MAX_RESTARTS:
                    log.error("ingest listeners died %d times within %.0f s; giving up (see the errors above)",
                              len(restarts), RESTART_WINDOW)
                    self._stop_all(listeners)
                    raise StartupError("ingest listeners keep dying; the appliance stopped")
                log.error("ingest listener %d (pid %s) died with exit code %s; restarting it", i, p.pid, p.exitcode)
                store.spool.remove_partials(p.pid)
                store.index.mark_lost_associations(p.pid)
                start(i)
            if not worker.is_alive() and not self.stop.is_set():
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
                requeued, failed = JobQueue(store.index).recover(set(), cfg.inference.max_attempts)
                log.error("inference worker (pid %s) died with exit code %s; %d job(s) re-queued, %d failed; "
                          "restarting it", worker.pid, worker.exitcode, requeued, failed)
                if len(restarts) > MAX_RESTARTS:
                    self._stop_all([*listeners, worker])
                    raise StartupError("processes keep dying; the appliance stopped (see the errors above)")
                worker = self._start_worker()

        log.info("stopping")
        self._stop_all([*listeners, worker])
        assemble_thread.join(5)
        route_thread.join(5)
        export_thread.join(cfg.export.timeout_seconds + 5)
        purge_thread.join(5)
        sock.close()
        store.index.close()
        procs_lock.close()
        lock.close()
        log.info("stopped")
        return 0

    def _start_worker(self) -> Any:
        # Not waited for: the main loop must keep answering SIGTERM, and it notices a worker that dies.
        # The event must outlive the child's start-up (it unpickles it), so it is kept on self.
        self._worker_ready = self.ctx.Event()
        p = self.ctx.Process(target=run_worker, args=(self.config, self._worker_ready), name="worker")
        p.start()
        return p

    @staticmethod
    def _stop_all(listeners: list[Any]) -> None:
        for p in listeners:
            if p is not None and p.is_alive():
                p.terminate()  # SIGTERM: the listener drains and exits
        deadline = time.monotonic() + DRAIN_SECONDS + 3  # listeners drain in parallel: one budget for all
        for p in listeners:
            if p is not None:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    log.error("listener pid %s did not stop in time; killing it", p.pid)
                    p.kill()
                    p.join()


def serve(config: Config) -> int:
    return Supervisor(config).run()
