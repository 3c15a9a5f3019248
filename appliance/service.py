"""``appliance serve``: the supervisor that runs every stage.

The supervisor binds the DICOM port itself (so "port already in use" is a clear start-up error),
starts the ingest listener processes on that socket, runs the assembler, router, sender and retention
threads and the inference worker process, restarts what dies, and on SIGTERM stops everything in order
and exits 0. Listeners and the worker have separate restart policies: a listener that keeps dying stops
the appliance (reception is broken); a worker that keeps dying (a model crashing its process) is
restarted with a growing delay and never stops reception.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance import __version__
from appliance.assemble import Assembler
from appliance.config import Config, DicomConfig
from appliance.errors import ApplianceError
from appliance.export import Sender
from appliance.ingest.listener import DRAIN_SECONDS, run_listener
from appliance.ingest.recovery import index_orphans
from appliance.metrics import gpu
from appliance.metrics.collect import ModelView, ProcessView
from appliance.metrics.http import MetricsApp, MetricsServer
from appliance.models.package import find_packages
from appliance.retention import Purger
from appliance.route import Router
from appliance.status import ListenerStatus, Snapshot, status_path, write_snapshot
from appliance.store import Store
from appliance.store.jobs import JobQueue
from appliance.store.locks import lock_data_dir, wait_for_previous_run
from appliance.store.perms import restrict_umask, secure_data_dir
from appliance.worker import run_worker

log = logging.getLogger("appliance.service")

READY_TIMEOUT = 60.0
#: How often the supervisor looks at its processes.
WATCH_SECONDS = 0.5
#: A listener that dies more than MAX_RESTARTS times within RESTART_WINDOW seconds stops the appliance.
#: Worker deaths do not count: they have their own policy (:class:`RestartBackoff`).
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: A dead worker is restarted at once, and while it keeps dying after doubling delays from
#: WORKER_BACKOFF_BASE up to WORKER_BACKOFF_MAX seconds; a worker that ran WORKER_HEALTHY_SECONDS resets that.
WORKER_BACKOFF_BASE = 1.0
WORKER_BACKOFF_MAX = 60.0
WORKER_HEALTHY_SECONDS = 60.0


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
            raise StartupError(
                f"DICOM port {config.dicom.port} on {config.dicom.bind} is already in use "
                "(another appliance or DICOM service?): stop it or set [dicom] port"
            ) from None
        raise StartupError(f"cannot listen on {config.dicom.bind}:{config.dicom.port}: {exc.strerror}") from None
    return sock


class RestartBudget:
    """The listeners' policy: at most ``limit`` deaths within ``window`` seconds.

    A listener that keeps dying means reception itself is broken (a bug, the host): the appliance stops
    so that an operator looks, instead of answering associations half-way forever.
    """

    def __init__(self, limit: int = MAX_RESTARTS, window: float = RESTART_WINDOW) -> None:
        self.limit, self.window = limit, window
        self._deaths: list[float] = []

    def died(self, now: float) -> bool:
        """Record a death; True while the budget allows another restart."""
        self._deaths = [t for t in self._deaths if now - t < self.window] + [now]
        return len(self._deaths) <= self.limit

    @property
    def recent(self) -> int:
        return len(self._deaths)


class RestartBackoff:
    """The worker's policy: always restart, at once after a healthy run, else after a doubling delay.

    A model that crashes its process on every series must never stop reception: the job that kills
    the worker is failed after ``inference.max_attempts`` deaths (``JobQueue.recover``), and the delay
    keeps a worker that dies at start-up (a broken GPU driver) from spinning.
    """

    def __init__(
        self,
        base: float = WORKER_BACKOFF_BASE,
        cap: float = WORKER_BACKOFF_MAX,
        healthy_after: float = WORKER_HEALTHY_SECONDS,
    ) -> None:
        self.base, self.cap, self.healthy_after = base, cap, healthy_after
        self.failures = 0

    def delay(self, lived: float) -> float:
        """Seconds to wait before starting a worker that died after running ``lived`` seconds."""
        if lived >= self.healthy_after:
            self.failures = 0
        self.failures += 1
        if self.failures == 1:
            return 0.0
        return min(self.cap, self.base * 2 ** (self.failures - 2))


def open_access_warning(dicom: DicomConfig) -> str | None:
    """What to warn about when any caller is accepted on every interface; None otherwise."""
    if dicom.allowed_callers:
        return None
    bind = dicom.bind.strip()
    try:
        everywhere = bind in ("", "*") or ipaddress.ip_address(bind.strip("[]")).is_unspecified
    except ValueError:  # a host name: one interface
        everywhere = False
    if not everywhere:
        return None
    return (
        f"[dicom] allowed_callers is empty and bind = {dicom.bind!r} (every interface): any host that can "
        f"reach port {dicom.port} may store instances here and have them processed; list the modalities "
        "and PACS in [dicom] allowed_callers, or bind to the clinic network's address"
    )


class Supervisor:
    def __init__(
        self,
        config: Config,
        *,
        worker_target: Callable[..., None] = run_worker,
        worker_backoff: RestartBackoff | None = None,
    ) -> None:
        self.config = config
        self.stop = threading.Event()
        self.ctx = multiprocessing.get_context("spawn")
        #: The worker process's entry point (a test gives one that crashes).
        self.worker_target = worker_target
        self.worker_backoff = worker_backoff or RestartBackoff()
        self.listener_budget = RestartBudget()
        self.listeners: list[Any] = []
        self.worker: Any = None
        self._worker_started = 0.0
        #: When a dead worker is started again (monotonic); None while one runs.
        self._worker_due: float | None = None
        self._threads: list[tuple[threading.Thread, float]] = []
        self._metrics: MetricsServer | None = None
        self._panel: Any = None
        self._gpu: gpu.GpuSource | None = None
        self._packages: list[Any] = []

    def run(self) -> int:
        cfg = self.config
        restrict_umask()
        store = Store.open(cfg.storage.data_dir)
        lock = lock_data_dir(store.data_dir)
        procs_lock = wait_for_previous_run(store.data_dir)
        secure_data_dir(store.data_dir)
        self._recover(store)
        packages = self._load_models()
        fcntl.flock(procs_lock, fcntl.LOCK_SH)  # recovery done: from here on, one of the live processes
        sock = _bind(cfg)
        warning = open_access_warning(cfg.dicom)
        if warning:
            log.warning("%s", warning)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        try:
            self._run_started(store, sock, packages)
        except BaseException:
            # An unexpected error in the supervisor itself: stop the processes it started, in the same
            # order as a SIGTERM, and let the error end the program (non-zero: systemd restarts it).
            # Without this the interpreter's exit waits for the listeners and the worker, which keep
            # running, and the box hangs half-alive instead of restarting.
            log.exception("the supervisor failed; stopping every process it started")
            self.stop.set()  # the stage threads stop on it, as on SIGTERM
            self._shut_down(store, sock, procs_lock, lock)
            raise
        self._shut_down(store, sock, procs_lock, lock)
        return 0

    def _run_started(self, store: Store, sock: socket.socket, packages: list[Any]) -> None:
        """Start the listeners, stages, worker, metrics and panel, then watch them until SIGTERM."""
        cfg = self.config
        self._start_listeners(sock)
        log.info(
            "appliance %s receiving as AE %r on %s:%d (%d listener processes), data in %s",
            __version__,
            cfg.dicom.ae_title,
            cfg.dicom.bind,
            cfg.dicom.port,
            len(self.listeners),
            store.data_dir,
        )
        self._start_stages(store, packages)
        self._start_worker()
        self._start_metrics(store, packages)
        # What `appliance status` reads exists before the panel starts (Flask and its catalogues take a
        # moment to load): a box that receives says so at once.
        self._publish(store)
        self._start_panel(store, packages)
        self._watch(store)

    # -- start-up ----------------------------------------------------------------------------------

    def _recover(self, store: Store) -> None:
        """What an unclean stop left: partial files, open associations, orphan files, interrupted jobs."""
        cfg = self.config
        removed = store.spool.remove_partials()
        lost = store.index.mark_lost_associations()
        if removed or lost:
            log.warning(
                "recovered after an unclean stop: removed %d partial file(s), %d association(s) never released",
                removed,
                lost,
            )
        index_orphans(store)
        requeued, failed = JobQueue(store.index).recover(set(), cfg.inference.max_attempts)
        if requeued or failed:
            log.warning(
                "inference jobs interrupted by the unclean stop: %d re-queued, %d failed after %d attempts",
                requeued,
                failed,
                cfg.inference.max_attempts,
            )

    def _load_models(self) -> list[Any]:
        models_dir = self.config.inference.resolved_models_dir()
        packages, refused = find_packages(models_dir)
        for name, why in refused.items():
            log.error("model package %s refused: %s", name, why)
        log.info("models in %s: %s", models_dir, ", ".join(f"{p.name} {p.version}" for p in packages) or "none")
        return packages

    def _start_listeners(self, sock: socket.socket) -> None:
        n = self.config.dicom.listener_count()
        self._sock = sock
        self._slots = self.ctx.Array("i", n)
        self._readies: list[Any] = [None] * n
        self.listeners = [None] * n
        for i in range(n):
            self._start_listener(i)
        deadline = time.monotonic() + READY_TIMEOUT
        for i in range(n):
            if not self._readies[i].wait(max(0.0, deadline - time.monotonic())):
                self.stop.set()
                self._stop_all(self.listeners)
                raise StartupError(f"ingest listener {i} did not start within {READY_TIMEOUT:.0f} s; see the log above")

    def _start_listener(self, i: int) -> None:
        self._readies[i] = self.ctx.Event()
        with self._slots.get_lock():
            self._slots[i] = 0
        p = self.ctx.Process(
            target=run_listener, args=(self.config, self._sock, self._slots, i, self._readies[i]), name=f"ingest-{i}"
        )
        p.start()
        self.listeners[i] = p

    def _start_stages(self, store: Store, packages: list[Any]) -> None:
        """The in-process stages, each a thread of the supervisor: assemble, route, export, retention."""
        cfg = self.config
        assembler = Assembler(store.index, cfg.assemble)
        router = Router(
            store.index, store.spool.root, cfg.routes, {p.name for p in packages}, cfg.inference.poll_seconds
        )
        sender = Sender(cfg, store)
        purger = Purger(store, cfg.storage.retention_days)
        for name, target, join in (
            ("assemble", assembler.run, 5.0),
            ("route", router.run, 5.0),
            ("export", sender.run, cfg.export.timeout_seconds + 5),
            ("retention", purger.run, 5.0),
        ):
            t = threading.Thread(target=target, args=(self.stop,), name=name, daemon=True)
            t.start()
            self._threads.append((t, join))

    # -- watching ----------------------------------------------------------------------------------

    def _watch(self, store: Store) -> None:
        """Until SIGTERM: restart what dies, each kind under its own policy."""
        self._publish(store)
        while not self.stop.wait(WATCH_SECONDS):
            self._check_listeners(store)
            self._check_worker(store)
            self._publish(store)

    def _publish(self, store: Store) -> None:
        """The snapshot ``appliance status`` reads: processes and open associations per listener."""
        if not hasattr(self, "_started_at"):
            self._started_at = time.time()
        with self._slots.get_lock():
            counts = [self._slots[i] for i in range(len(self._slots))]
        snap = Snapshot(
            pid=os.getpid(),
            version=__version__,
            started=self._started_at,
            updated=time.time(),
            max_associations=self.config.dicom.max_associations,
            listeners=[
                ListenerStatus(
                    slot=i,
                    pid=p.pid if p is not None else None,
                    alive=p is not None and p.is_alive(),
                    open_associations=counts[i],
                )
                for i, p in enumerate(self.listeners)
            ],
            worker_pid=self.worker.pid if self.worker is not None else None,
            worker_alive=self.worker is not None and self.worker.is_alive(),
        )
        try:
            write_snapshot(store.data_dir, snap)
        except OSError as exc:  # status is a convenience; never let it stop the supervisor
            if not getattr(self, "_publish_failed", False):
                log.warning("cannot publish the status snapshot: %s", exc)
                self._publish_failed = True

    def _check_listeners(self, store: Store) -> None:
        for i, p in enumerate(self.listeners):
            if p.is_alive() or self.stop.is_set():
                continue
            if not self.listener_budget.died(time.monotonic()):
                log.error(
                    "ingest listeners died %d times within %.0f s; giving up (see the errors above)",
                    self.listener_budget.recent,
                    RESTART_WINDOW,
                )
                self.stop.set()
                self._stop_all([*self.listeners, self.worker])
                raise StartupError("ingest listeners keep dying; the appliance stopped")
            log.error("ingest listener %d (pid %s) died with exit code %s; restarting it", i, p.pid, p.exitcode)
            store.spool.remove_partials(p.pid)
            store.index.mark_lost_associations(p.pid)
            self._start_listener(i)

    def _check_worker(self, store: Store) -> None:
        if self.stop.is_set():
            return
        now = time.monotonic()
        w = self.worker
        if w is not None and not w.is_alive():
            lived = now - self._worker_started
            requeued, failed = JobQueue(store.index).recover(set(), self.config.inference.max_attempts)
            delay = self.worker_backoff.delay(lived)
            log.error(
                "inference worker (pid %s) died with exit code %s after %.1f s; %d job(s) re-queued, %d failed; "
                "restarting it%s (DICOM reception is not affected)",
                w.pid,
                w.exitcode,
                lived,
                requeued,
                failed,
                f" in {delay:.1f} s" if delay else "",
            )
            self.worker = None
            self._worker_due = now + delay
        if self.worker is None and self._worker_due is not None and now >= self._worker_due:
            self._start_worker()

    # -- stopping ----------------------------------------------------------------------------------

    def _start_metrics(self, store: Store, packages: list[Any]) -> None:
        """``[metrics]``: /metrics, /healthz, /readyz on a thread of the supervisor, which knows its processes."""
        m = self.config.metrics
        if not m.enabled:
            return
        self._packages = packages
        self._gpu = gpu.detect()
        app = MetricsApp(
            self.config,
            store,
            self.process_view,
            lambda: [ModelView(p.name, p.version) for p in self._packages],
            self._gpu,
        )
        try:
            self._metrics = MetricsServer(app, m.bind, m.port)
        except OSError as exc:
            # Monitoring must not take reception down: the box keeps receiving, loudly without metrics.
            log.error(
                "cannot serve metrics on %s:%d: %s; running WITHOUT /metrics, /healthz and /readyz (another "
                "program on that port? set [metrics] port, or enabled = false)",
                m.bind,
                m.port,
                exc.strerror or exc,
            )
            return
        self._metrics.start()

    def _start_panel(self, store: Store, packages: list[Any]) -> None:
        """``[panel]``: the technician panel on a waitress thread pool of the supervisor, which knows its
        processes; like metrics, a port that cannot be bound is logged and reception goes on."""
        pc = self.config.panel
        if not pc.enabled:
            return
        from appliance.panel.server import PanelServer

        metrics_server = getattr(self, "_metrics", None)
        if metrics_server is not None:
            checks = metrics_server.app.checks
        else:  # the same checks as /readyz, with the metrics port off
            checks = MetricsApp(
                self.config, store, self.process_view, lambda: [ModelView(p.name, p.version) for p in packages]
            ).checks
        try:
            self._panel = PanelServer(self.config, store, processes=self.process_view, checks=checks)
        except Exception as exc:  # OSError from the bind; a panel that cannot start must not stop reception
            log.error(
                "cannot serve the panel on %s:%d: %s; running WITHOUT the panel (another program on that port? "
                "set [panel] port, or enabled = false)",
                pc.bind,
                pc.port,
                getattr(exc, "strerror", None) or exc,
            )
            return
        self._panel.start()

    def process_view(self) -> ProcessView:
        """Open associations and which processes are alive, for the metrics and readiness checks."""
        slots = getattr(self, "_slots", None)
        counts = [slots[i] for i in range(len(slots))] if slots is not None else []
        return ProcessView(
            open_associations=sum(max(0, c) for c in counts),
            listeners_alive=sum(1 for p in self.listeners if p is not None and p.is_alive()),
            listeners=len(self.listeners),
            worker_alive=self.worker is not None and self.worker.is_alive(),
            sender_alive=any(t.name == "export" and t.is_alive() for t, _ in getattr(self, "_threads", [])),
            pids={
                "supervisor": os.getpid(),
                **{f"listener-{i}": p.pid for i, p in enumerate(self.listeners) if p is not None and p.is_alive()},
                **({"worker": self.worker.pid} if self.worker is not None and self.worker.is_alive() else {}),
            },
        )

    def _shut_down(self, store: Store, sock: socket.socket, *locks: Any) -> None:
        log.info("stopping")
        self._stop_all([*self.listeners, self.worker])  # reception first: nothing may delay it
        if self._panel is not None:
            self._panel.stop()
        if self._metrics is not None:
            self._metrics.stop()
        if self._gpu is not None:
            self._gpu.close()
        try:
            status_path(store.data_dir).unlink()
        except OSError:
            pass
        for t, timeout in self._threads:
            t.join(timeout)
        sock.close()
        store.index.close()
        for f in locks:
            f.close()
        log.info("stopped")

    def _start_worker(self) -> None:
        # Not waited for: the main loop must keep answering SIGTERM, and it notices a worker that dies.
        # The event must outlive the child's start-up (it unpickles it), so it is kept on self.
        self._worker_ready = self.ctx.Event()
        p = self.ctx.Process(target=self.worker_target, args=(self.config, self._worker_ready), name="worker")
        p.start()
        self.worker, self._worker_started, self._worker_due = p, time.monotonic(), None

    @staticmethod
    def _stop_all(procs: list[Any]) -> None:
        listeners = [p for p in procs if p is not None]
        for p in listeners:
            if p is not None and p.is_alive():
                p.terminate()  # SIGTERM: the listener drains and exits
        deadline = time.monotonic() + DRAIN_SECONDS + 3  # listeners drain in parallel: one budget for all
        for p in listeners:
            if p is not None:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    log.error("%s (pid %s) did not stop in time; killing it", p.name, p.pid)
                    p.kill()
                    p.join()


def serve(config: Config) -> int:
    return Supervisor(config).run()
