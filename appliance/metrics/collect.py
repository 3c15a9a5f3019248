"""Samples for one scrape, read from the store and the supervisor's view of its processes.

The store is where every stage records what it did (listeners, worker and sender are separate processes), so
a scrape is a handful of indexed aggregate queries on a read-only connection of its own, not a second
bookkeeping. Counters come from rows that only ever grow (the counters table, event and attempt trails), so
they never go backwards while the appliance runs.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from appliance import __version__
from appliance.config import Config
from appliance.ingest.status import StoreStatus
from appliance.metrics.catalogue import BY_NAME, Family
from appliance.metrics.gpu import GpuSource
from appliance.store import Index, Store, histograms
from appliance.store.states import OutboxState, SeriesState
from appliance.store.stats import Stats

#: Where the label value is not one of a configured set (a destination renamed or removed since).
OTHER = "other"


@dataclass
class ProcessView:
    """What the supervisor knows about its processes at scrape time."""

    open_associations: int = 0
    listeners_alive: int = 0
    listeners: int = 0
    worker_alive: bool = False
    #: the export thread (sends results to the destinations); None where it is not known
    sender_alive: bool | None = None
    #: role (supervisor, listener-N, worker) -> pid of the process alive now
    pids: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class ModelView:
    name: str
    version: str


def _family(name: str) -> Family:
    return BY_NAME[name]


def gauge_family(name: str) -> GaugeMetricFamily:
    f = _family(name)
    return GaugeMetricFamily(f.name + (f"_{f.unit}" if f.unit else ""), f.help, labels=list(f.labels), unit=f.unit)


def counter_family(name: str) -> CounterMetricFamily:
    f = _family(name)
    return CounterMetricFamily(f.name + (f"_{f.unit}" if f.unit else ""), f.help, labels=list(f.labels), unit=f.unit)


_STATUS_HEX = {s.name.lower(): f"0x{int(s):04X}" for s in StoreStatus}


class StoreCollector(Collector):
    def __init__(
        self,
        config: Config,
        store: Store,
        processes: Callable[[], ProcessView],
        models: Callable[[], list[ModelView]],
        gpu: GpuSource | None = None,
        checks: Callable[[], list[Check]] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.processes = processes
        self.models = models
        self.destinations = [d.name for d in config.destinations]
        self.gpu = gpu
        self.checks = checks

    def _dest(self, name: str) -> str:
        return name if name in self.destinations else OTHER

    def collect(self) -> Iterator[Metric]:
        # A read-only connection per scrape: the HTTP server answers each request on a thread of its own.
        index = Index(self.store.index.db_path, readonly=True)
        try:
            # One read of each source per scrape, shared by every family that needs it.
            stats, counters, view = Stats(index), index.counters(), self.processes()
            yield self._build()
            yield self._model_info(stats)
            yield from self._dicom(stats, counters, view)
            yield from self._pipeline(stats, view)
            yield from self._export(stats)
            yield from self._disk()
            yield from self._histograms(counters)
            yield from self._processes(view)
            yield from self._gpu()
            yield self._ready()
        finally:
            index.close()

    def _build(self) -> Metric:
        f = _family("appliance_build")
        m = InfoMetricFamily(f.name, f.help, labels=[])
        d = self.config.device
        m.add_metric(
            [],
            {
                "version": __version__,
                "platform": f"{platform.system().lower()}-{platform.machine()}",
                "device_id": d.id,
                "site_id": d.site,
            },
        )
        return m

    def _model_info(self, stats: Stats) -> Metric:
        f = _family("appliance_model")
        m = InfoMetricFamily(f.name, f.help, labels=[])
        last = stats.last_backend_per_model()
        inf = self.config.inference
        for mv in self.models():
            r = last.get(mv.name)
            m.add_metric(
                [],
                {
                    "model": mv.name,
                    "version": mv.version,
                    "backend": r["backend"] if r else inf.backend,
                    "precision": r["precision"] if r else inf.precision,
                    "device": r["device"] if r else "none yet",
                },
            )
        return m

    def _dicom(self, stats: Stats, counters: dict[tuple[str, str], int], view: ProcessView) -> Iterator[Metric]:
        g = gauge_family("appliance_dicom_associations")
        g.add_metric([], view.open_associations)
        yield g
        g = gauge_family("appliance_dicom_listeners_up")
        g.add_metric([], view.listeners_alive)
        yield g
        c = counter_family("appliance_dicom_association_results")
        ends = stats.associations()
        c.add_metric(["accepted"], sum(ends.values()))
        c.add_metric(["released"], ends.get("released", 0))
        c.add_metric(["aborted"], ends.get("aborted", 0) + ends.get("lost", 0))
        for (name, label), value in sorted(counters.items()):
            if name == "ingest_rejected_associations":
                c.add_metric([f"rejected_{label}"], value)
        yield c
        c = counter_family("appliance_dicom_instances_received")
        for (name, label), value in sorted(counters.items()):
            if name == "ingest_instances":
                c.add_metric([label], value)
        yield c
        c = counter_family("appliance_dicom_received")
        c.add_metric([], counters.get(("ingest_bytes", ""), 0))
        yield c
        c = counter_family("appliance_dicom_store_failures")
        for (name, label), value in sorted(counters.items()):
            if name == "ingest_rejected_instances":
                c.add_metric([_STATUS_HEX.get(label, OTHER)], value)
        yield c
        c = counter_family("appliance_dicom_protocol_errors")
        for (name, label), value in sorted(counters.items()):
            if name == "ingest_protocol_errors":
                c.add_metric([label], value)
        yield c

    def _pipeline(self, stats: Stats, view: ProcessView) -> Iterator[Metric]:
        counts = stats.series_by_state()
        g = gauge_family("appliance_series")
        for state in SeriesState:
            g.add_metric([str(state)], counts.get(str(state), 0))
        yield g
        g = gauge_family("appliance_queue_depth")
        for prio, n in sorted(stats.queued_by_priority().items()):
            g.add_metric([str(prio)], n)
        yield g
        c = counter_family("appliance_jobs")
        for (model, result), n in sorted(stats.jobs_finished().items()):
            c.add_metric([model, result], n)
        yield c
        g = gauge_family("appliance_worker_up")
        g.add_metric([], 1 if view.worker_alive else 0)
        yield g

    def _export(self, stats: Stats) -> Iterator[Metric]:
        attempts: dict[tuple[str, str], int] = {}
        for (dest, ok), n in stats.export_attempts().items():
            key = (self._dest(dest), "ok" if ok else "failed")
            attempts[key] = attempts.get(key, 0) + n
        c = counter_family("appliance_export_attempts")
        for (dest, result), n in sorted(attempts.items()):
            c.add_metric([dest, result], n)
        yield c
        rows = {(self._dest(d), s): v for (d, s), v in stats.outbox_waiting().items()}
        now = time.time()
        pending, dead, age = (
            gauge_family("appliance_outbox_pending"),
            gauge_family("appliance_outbox_dead"),
            gauge_family("appliance_export_oldest_pending"),
        )
        for dest in self.destinations:
            n, oldest = rows.get((dest, OutboxState.PENDING), (0, None))
            pending.add_metric([dest], n)
            age.add_metric([dest], max(0.0, now - oldest) if oldest is not None else 0.0)
            dead.add_metric([dest], rows.get((dest, OutboxState.DEAD), (0, None))[0])
        yield pending
        yield dead
        yield age

    def _histograms(self, counters: dict[tuple[str, str], int]) -> Iterator[Metric]:
        for family, metric, buckets in (
            ("appliance_store_duration", "store_seconds", histograms.STORE),
            ("appliance_stage_duration", "stage_duration_seconds", histograms.STAGE),
            ("appliance_time_to_job", "time_to_job_seconds", histograms.WAIT),
            ("appliance_time_to_result", "time_to_result_seconds", histograms.WAIT),
        ):
            f = _family(family)
            h = HistogramMetricFamily(f.name + f"_{f.unit}", f.help, labels=list(f.labels), unit=f.unit)
            for label, hist in sorted(histograms.read(counters, metric, buckets).items()):
                h.add_metric([label] if f.labels else [], [(le, float(n)) for le, n in hist.buckets], hist.sum_seconds)
            yield h

    def _ready(self) -> Metric:
        g = gauge_family("appliance_ready")
        for check in self.checks() if self.checks is not None else []:
            g.add_metric([check.name], 1 if check.ok else 0)
        return g

    def _gpu(self) -> Iterator[Metric]:
        sample = self.gpu.sample() if self.gpu is not None else None
        values = (
            ("appliance_gpu_utilization", sample.utilization_ratio if sample else None),
            ("appliance_gpu_memory_used", sample.memory_used_bytes if sample else None),
            ("appliance_gpu_temperature", sample.temperature_celsius if sample else None),
            ("appliance_gpu_power", sample.power_watts if sample else None),
        )
        for family, value in values:
            g = gauge_family(family)
            if value is not None:  # absent, not zero, where the box cannot say
                g.add_metric([], value)
            yield g

    def _processes(self, view: ProcessView) -> Iterator[Metric]:
        cpu, rss = counter_family("appliance_process_cpu"), gauge_family("appliance_process_resident_memory")
        for role, pid in sorted(view.pids.items()):
            usage = proc_usage(pid)
            if usage is not None:
                cpu.add_metric([role], usage[0])
                rss.add_metric([role], usage[1])
        yield cpu
        yield rss

    def _disk(self) -> Iterator[Metric]:
        g = gauge_family("appliance_disk_free")
        try:
            g.add_metric(["data_dir"], self.store.spool.free_bytes())
        except OSError:
            pass  # absent, not zero: the filesystem cannot be asked
        yield g
        g = gauge_family("appliance_disk_reserve")
        g.add_metric([], self.config.storage.min_free_bytes)
        yield g


_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of ``pid`` from /proc; None when it is gone or /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm") as f:
            resident = int(f.read().split()[1])
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; utime, stime are fields 14, 15
        utime, stime = int(fields[11]), int(fields[12])
    except (OSError, ValueError, IndexError):
        return None
    return (utime + stime) / _TICKS, resident * _PAGE
