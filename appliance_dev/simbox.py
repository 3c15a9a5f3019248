"""Simulated appliances for fleet benchmarks: many boxes' ``/metrics`` served from one process.

Each box's exposition is made by the real catalogue (the families, names, labels and units of
``appliance.metrics.catalogue``, built with the same helpers as the real collector) from a small simulated
state that moves on every refresh: instances arrive, jobs run, results are sent, the disk fills, now and then
a destination fails. One selector loop serves every box's port, so a thousand boxes fit a 2-core machine.
"""

from __future__ import annotations

import random
import selectors
import socket
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from appliance import __version__
from appliance.metrics.catalogue import BY_NAME, CATALOGUE
from appliance.metrics.collect import counter_family, gauge_family
from appliance.store import histograms
from appliance.store.states import SeriesState


@dataclass
class BoxState:
    seed: int
    rng: random.Random = field(init=False)
    instances: int = 0
    bytes: int = 0
    jobs_done: int = 0
    attempts_ok: int = 0
    attempts_failed: int = 0
    dead: int = 0
    pending: int = 0
    disk_free: int = 200_000_000_000
    store_obs: list[int] = field(default_factory=lambda: [0] * (len(histograms.STORE.bounds) + 1))
    ttr_obs: list[int] = field(default_factory=lambda: [0] * (len(histograms.WAIT.bounds) + 1))

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def step(self) -> None:
        r = self.rng
        n = r.choice((0, 0, 120, 300, 600))
        self.instances += n
        self.bytes += n * 524_288
        self.disk_free -= n * 524_288
        for _ in range(min(n, 50)):
            self.store_obs[min(len(self.store_obs) - 1, int(r.expovariate(1 / 3)))] += 1
        if n:
            self.jobs_done += 1
            ok = r.random() > 0.02
            self.attempts_ok += 3 if ok else 0
            self.attempts_failed += 0 if ok else 3
            self.pending = 0 if ok else 3
            self.ttr_obs[min(len(self.ttr_obs) - 1, int(r.expovariate(1 / 2)) + 1)] += 1


class _BoxCollector(Collector):
    def __init__(self, state: BoxState) -> None:
        self.s = state

    def collect(self) -> list[Metric]:
        s = self.s
        out: list[Metric] = []
        f = BY_NAME["appliance_build"]
        m = InfoMetricFamily(f.name, f.help, labels=[])
        m.add_metric([], {"version": __version__, "platform": "linux-aarch64"})
        out.append(m)
        f = BY_NAME["appliance_model"]
        m = InfoMetricFamily(f.name, f.help, labels=[])
        m.add_metric([], {"model": "liver-ct-demo", "version": "1.4.0", "backend": "tensorrt", "precision": "fp16",
                          "device": "cuda:0"})
        out.append(m)
        values = {
            "appliance_dicom_associations": [([], s.rng.choice((0, 0, 1, 2)))],
            "appliance_dicom_listeners_up": [([], 4)],
            "appliance_dicom_instances_received": [(["CT"], s.instances)],
            "appliance_dicom_received": [([], s.bytes)],
            "appliance_series": [([str(st)], s.rng.randint(0, 30)) for st in SeriesState],
            "appliance_queue_depth": [(["0"], s.rng.choice((0, 0, 1)))],
            "appliance_jobs": [(["liver-ct-demo", "done"], s.jobs_done)],
            "appliance_export_attempts": [(["pacs", "ok"], s.attempts_ok), (["pacs", "failed"], s.attempts_failed)],
            "appliance_outbox_pending": [(["pacs"], s.pending)],
            "appliance_outbox_dead": [(["pacs"], s.dead)],
            "appliance_export_oldest_pending": [(["pacs"], 30.0 if s.pending else 0.0)],
            "appliance_disk_free": [(["data_dir"], s.disk_free)],
            "appliance_disk_reserve": [([], 2_000_000_000)],
            "appliance_worker_up": [([], 1)],
            "appliance_ready": [([c], 1) for c in ("store", "listeners", "worker", "models", "disk")],
            "appliance_gpu_utilization": [([], s.rng.random())],
            "appliance_gpu_temperature": [([], 45 + 20 * s.rng.random())],
            "appliance_gpu_power": [([], 5 + 10 * s.rng.random())],
            "appliance_process_resident_memory": [([r], 80_000_000) for r in ("supervisor", "listener-0", "worker")],
        }
        for f in CATALOGUE:
            if f.kind in ("gauge", "counter") and f.name in values:
                m = (gauge_family if f.kind == "gauge" else counter_family)(f.name)
                for labels, v in values[f.name]:
                    m.add_metric(labels, v)
                out.append(m)
        for name, obs, buckets, labels in (("appliance_store_duration", s.store_obs, histograms.STORE, []),
                                           ("appliance_time_to_result", s.ttr_obs, histograms.WAIT, ["liver-ct-demo"])):
            f = BY_NAME[name]
            h = HistogramMetricFamily(f.name + "_seconds", f.help, labels=list(f.labels), unit="seconds")
            running, cum = 0, []
            for le, n in zip([*(f"{b:g}" for b in buckets.bounds), "+Inf"], obs, strict=True):
                running += n
                cum.append((le, float(running)))
            h.add_metric(labels, cum, float(sum(obs)))
            out.append(h)
        return out


class Fleet:
    """``n`` boxes on consecutive free ports of 127.0.0.1, served by :meth:`serve_forever`'s one loop."""

    def __init__(self, n: int, refresh_seconds: float = 15.0) -> None:
        self.sel = selectors.DefaultSelector()
        self.boxes: list[tuple[int, BoxState, CollectorRegistry]] = []
        self.refresh = refresh_seconds
        self.scrapes = 0
        for i in range(n):
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", 0))
            srv.listen(64)
            srv.setblocking(False)
            state = BoxState(seed=i)
            reg = CollectorRegistry(auto_describe=False)
            reg.register(_BoxCollector(state))
            self.sel.register(srv, selectors.EVENT_READ, ("listen", i))
            self.boxes.append((srv.getsockname()[1], state, reg))
        self._bodies: dict[int, bytes] = {}
        self._made: dict[int, float] = {}

    def ports(self) -> list[int]:
        return [p for p, _, _ in self.boxes]

    def _body(self, i: int) -> bytes:
        now = time.monotonic()
        if now - self._made.get(i, -1e9) >= self.refresh:
            _, state, reg = self.boxes[i]
            state.step()
            self._bodies[i] = generate_latest(reg)
            self._made[i] = now
        return self._bodies[i]

    def serve_forever(self, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            for key, _ in self.sel.select(timeout=0.5):
                kind, i = key.data
                if kind == "listen":
                    try:
                        conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    self.sel.register(conn, selectors.EVENT_READ, ("conn", i))
                else:
                    conn = key.fileobj  # type: ignore[assignment]
                    try:
                        data = conn.recv(65536)  # type: ignore[union-attr]
                    except (BlockingIOError, ConnectionError):
                        data = b""
                    if not data or b"\r\n\r\n" not in data:
                        if not data:
                            self.sel.unregister(conn)
                            conn.close()  # type: ignore[union-attr]
                        continue
                    body = self._body(i)
                    head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {len(body)}"
                            "\r\n\r\n").encode()
                    conn.setblocking(True)  # type: ignore[union-attr]
                    try:
                        conn.sendall(head + body)  # type: ignore[union-attr]
                    except OSError:
                        pass
                    conn.setblocking(False)  # type: ignore[union-attr]
                    self.scrapes += 1
