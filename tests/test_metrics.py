"""/metrics, /healthz and /readyz: the catalogue is the contract, labels stay bounded, readiness says why."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import Config, parse_config
from appliance.metrics.catalogue import CATALOGUE, exposed_name
from appliance.metrics.collect import ModelView, ProcessView
from appliance.metrics.http import MetricsApp
from appliance.store import InstanceRecord, Store
from appliance.store.jobs import JobQueue, NewObject
from appliance.store.outbox import Outbox
from appliance_dev.dicom_factory import make_series
from conftest import run_storescu

UID_LIKE = re.compile(r"^\d+(\.\d+){3,}$")
FAMILY_NAMES = {exposed_name(f).removesuffix("_total") for f in CATALOGUE}  # the text parser keeps "_info"


def _scrape(app: MetricsApp, accept: str = "") -> tuple[str, str, bytes]:
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app({"PATH_INFO": "/metrics", "HTTP_ACCEPT": accept}, start_response))
    return got["status"], got["headers"]["Content-Type"], body


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _store_with_work(tmp_path: Path, config: Config) -> Store:
    store = Store.open(tmp_path)
    for i, modality in enumerate(["CT", "CT", "MR", "NOT-A-MODALITY"]):
        store.index.add_instance(InstanceRecord(f"1.2.3.4.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", f"1.2.3.9.{i % 2}",
                                                "1.2.840.10008.1.2.1", f"p{i}", 100, patient_id="SECRET^PATIENT",
                                                modality=modality), None)
    store.index.complete_quiet_series(time.time() + 60, 5.0, 0.5)
    jobs = JobQueue(store.index)
    jobs.queue_jobs("1.2.3.9.0", [("liver-ct-demo", 0, ["r"], ["pacs"])])
    job = jobs.claim(1)
    assert job is not None
    jobs.finish(job, ok=True, reason="done", backend="onnxruntime", device="cpu", precision="fp32",
                objects=[NewObject("SEG", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.9.1", "1.2.9", "results/x/seg.dcm")])
    row = Outbox(store.index).due()[0]
    Outbox(store.index).record_failure(row, "cannot connect", None, max_attempts=5, base=1.0, cap=1.0)
    store.index.count("ingest_rejected_instances", "missing_uid")
    store.index.count("ingest_protocol_errors", "oversized_pdu")
    return store


def _app(store: Store, config: Config, view: ProcessView | None = None) -> MetricsApp:
    return MetricsApp(config, store, lambda: view or ProcessView(2, 2, 2, True),
                      lambda: [ModelView("liver-ct-demo", "1.4.0")])


CONFIG = parse_config({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
                       "storage": {"min_free_bytes": 0}})


def test_exposition_is_the_catalogue_with_bounded_labels(tmp_path: Path) -> None:
    store = _store_with_work(tmp_path, CONFIG)
    status, ctype, body = _scrape(_app(store, CONFIG))
    assert status == "200 OK" and ctype.startswith("text/plain")
    fams = _families(body.decode())
    assert set(fams) == FAMILY_NAMES, set(fams) ^ FAMILY_NAMES
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert values[("appliance_dicom_instances_received_total", (("modality", "CT"),))] == 2
    assert values[("appliance_dicom_instances_received_total", (("modality", "other"),))] == 1  # a stranger's word
    assert values[("appliance_dicom_received_bytes_total", ())] == 400
    assert values[("appliance_series", (("state", "exporting"),))] == 1
    assert values[("appliance_series", (("state", "complete"),))] == 1
    assert values[("appliance_outbox_pending", (("destination", "pacs"),))] == 1
    assert values[("appliance_export_attempts_total", (("destination", "pacs"), ("result", "failed")))] == 1
    assert values[("appliance_jobs_total", (("model", "liver-ct-demo"), ("result", "done")))] == 1
    assert values[("appliance_dicom_store_failures_total", (("status", "0xC001"),))] == 1
    assert values[("appliance_dicom_protocol_errors_total", (("kind", "oversized_pdu"),))] == 1
    assert values[("appliance_dicom_associations", ())] == 2
    info = [s.labels for s in fams["appliance_model_info"].samples]
    assert info == [{"model": "liver-ct-demo", "version": "1.4.0", "backend": "onnxruntime", "precision": "fp32",
                     "device": "cpu"}]
    labels = [v for f in fams.values() for s in f.samples for v in s.labels.values()]
    assert not [v for v in labels if UID_LIKE.match(v) or "SECRET" in v]
    assert sum(len(f.samples) for f in fams.values()) < 300


def test_openmetrics_when_the_scraper_asks(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    status, ctype, body = _scrape(_app(store, CONFIG), "application/openmetrics-text; version=1.0.0")
    assert status == "200 OK" and ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_counters_never_go_backwards_when_rows_are_purged(tmp_path: Path) -> None:
    store = _store_with_work(tmp_path, CONFIG)
    store.index.conn.execute("DELETE FROM instances")  # what retention does to a purged series' rows
    fams = _families(_scrape(_app(store, CONFIG))[2].decode())
    ct = [s.value for s in fams["appliance_dicom_instances_received"].samples if s.labels.get("modality") == "CT"]
    assert ct == [2]


@pytest.mark.parametrize(("view", "min_free", "failing"), [
    (ProcessView(0, 2, 2, True), 0, set()),
    (ProcessView(0, 2, 2, False), 0, {"worker"}),
    (ProcessView(0, 1, 2, True), 0, {"listeners"}),
    (ProcessView(0, 2, 2, True), 10 ** 18, {"disk"}),
])
def test_readiness_names_each_failing_check(tmp_path: Path, view: ProcessView, min_free: int, failing: set[str]) -> None:
    config = parse_config({"storage": {"min_free_bytes": min_free}})
    app = _app(Store.open(tmp_path), config, view)
    got: dict[str, Any] = {}
    body = json.loads(b"".join(app({"PATH_INFO": "/readyz"}, lambda s, h: got.update(status=s))))
    assert got["status"] == ("200 OK" if not failing else "503 Service Unavailable")
    assert {name for name, c in body["checks"].items() if not c["ok"]} == failing
    assert all(c.get("reason") for c in body["checks"].values() if not c["ok"])


def test_a_routed_model_that_is_not_loaded_makes_the_box_not_ready(tmp_path: Path) -> None:
    config = parse_config({"routes": [{"name": "r", "match": {"Modality": "CT"}, "models": ["missing-model"]}]})
    app = _app(Store.open(tmp_path), config)
    checks = {c.name: c for c in app.checks()}
    assert not checks["models"].ok and "missing-model" in checks["models"].reason


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.slow
def test_running_appliance_serves_metrics_and_health(appliance_factory: Any, tmp_path: Path) -> None:
    app = appliance_factory()
    make_series(tmp_path / "s", 3)
    res = run_storescu(app, tmp_path / "s")
    assert res.returncode == 0, res.stdout + res.stderr
    base = f"http://127.0.0.1:{app.metrics_port}"
    status, body = _get(base + "/metrics")
    assert status == 200
    fams = _families(body.decode())
    ct = [s.value for s in fams["appliance_dicom_instances_received"].samples if s.labels.get("modality") == "CT"]
    assert ct == [3]
    assert [s.value for s in fams["appliance_dicom_listeners_up"].samples] == [2]
    count = [s.value for s in fams["appliance_store_duration_seconds"].samples if s.name.endswith("_count")]
    assert count == [3], "every stored instance is one observation, whichever listener stored it"
    roles = {s.labels["role"] for s in fams["appliance_process_resident_memory_bytes"].samples}
    assert roles == {"supervisor", "listener-0", "listener-1", "worker"}, roles
    results = {s.labels["result"]: s.value for s in fams["appliance_dicom_association_results"].samples}
    assert results["accepted"] >= 1
    assert _get(base + "/healthz")[0] == 200
    status, body = _get(base + "/readyz")
    assert status == 200, body
    assert json.loads(body)["status"] == "ready"
    assert _get(base + "/nothing")[0] == 404


def test_readme_documents_the_catalogue() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(appliance_[a-z_]+)` \| (\w+) \|", readme, re.M))
    assert documented == {(exposed_name(f), f.kind) for f in CATALOGUE}


def test_latency_histograms_follow_the_work(tmp_path: Path) -> None:
    store = _store_with_work(tmp_path, CONFIG)  # one job claimed (time to job) and finished, one row failed once
    ob = Outbox(store.index)
    row = next(r for r in ob.due(now=time.time() + 10))
    ob.record_sent(row, "0x0000")  # its job's only result: delivered
    fams = _families(_scrape(_app(store, CONFIG))[2].decode())

    def samples(name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fams[name].samples}

    wait = samples("appliance_time_to_job_seconds")
    assert wait[("appliance_time_to_job_seconds_count", ())] == 1
    assert wait[("appliance_time_to_job_seconds_bucket", (("le", "+Inf"),))] == 1
    res = samples("appliance_time_to_result_seconds")
    assert res[("appliance_time_to_result_seconds_count", (("model", "liver-ct-demo"),))] == 1
    buckets = [v for (n, lab), v in res.items() if n.endswith("_bucket")]
    assert buckets == sorted(buckets), "cumulative buckets"


def _worker_pid(app: Any) -> int | None:
    import subprocess

    from conftest import appliance_exe

    r = subprocess.run([appliance_exe(), "status", "--json", "--config", str(app.config_path)], capture_output=True,
                       text=True, timeout=30)
    data = json.loads(r.stdout) if r.stdout.strip() else {}
    return data.get("worker_pid") if data.get("worker_alive") else None


@pytest.mark.slow
def test_readyz_turns_503_while_the_worker_is_down_and_back_after(appliance_factory: Any) -> None:
    import os
    import signal

    app = appliance_factory()
    base = f"http://127.0.0.1:{app.metrics_port}"

    def wait_pid(other: int | None) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid = _worker_pid(app)
            if pid is not None and pid != other:
                return pid
            time.sleep(0.1)
        raise AssertionError("no worker came up")

    first = wait_pid(None)
    os.kill(first, signal.SIGKILL)  # the first death is restarted at once
    second = wait_pid(first)
    os.kill(second, signal.SIGKILL)  # the second waits a second: the box is not ready meanwhile
    seen = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body = _get(base + "/readyz")
        if status == 503:
            seen = json.loads(body)
            break
        time.sleep(0.02)
    assert seen is not None, "never saw /readyz 503 while the worker was down"
    assert seen["checks"]["worker"]["ok"] is False and "worker" in seen["checks"]["worker"]["reason"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _get(base + "/readyz")[0] != 200:
        time.sleep(0.2)
    assert _get(base + "/readyz")[0] == 200, "ready again once the worker is back"


@pytest.mark.slow
def test_readyz_says_the_disk_is_below_the_reserve(appliance_factory: Any) -> None:
    app = appliance_factory(storage={"min_free_bytes": 10 ** 18})
    status, body = _get(f"http://127.0.0.1:{app.metrics_port}/readyz")
    assert status == 503
    checks = json.loads(body)["checks"]
    assert not checks["disk"]["ok"] and "reserve" in checks["disk"]["reason"] and checks["store"]["ok"]


def test_device_and_site_are_on_the_build_info_only(tmp_path: Path) -> None:
    config = parse_config({"device": {"id": "box-0042", "site": "clinic-a"}})
    fams = _families(_scrape(_app(Store.open(tmp_path), config))[2].decode())
    build = [s.labels for s in fams["appliance_build_info"].samples][0]
    assert (build["device_id"], build["site_id"]) == ("box-0042", "clinic-a")
    others = [s for name, f in fams.items() if name != "appliance_build_info" for s in f.samples]
    assert not [s for s in others if "device_id" in s.labels or "site_id" in s.labels]


def test_a_device_name_that_is_no_label_value_is_refused() -> None:
    from appliance.errors import ConfigError

    with pytest.raises(ConfigError, match=r"device\.id"):
        parse_config({"device": {"id": 'box "1"\n'}})


@pytest.mark.slow
def test_hostile_header_values_never_become_labels(appliance_factory: Any, tmp_path: Path) -> None:
    import pydicom

    app = appliance_factory()
    made = make_series(tmp_path / "s", 3)
    for inst, modality in zip(made, ['CT" } evil{x="1', "\u00e9\u00e9" * 8, "MR"], strict=True):
        ds = pydicom.dcmread(inst.path)
        ds.Modality = modality
        ds.PatientName = "Hostile^Patient"
        ds.BodyPartExamined = "LIVER\n# HELP fake"
        ds.save_as(inst.path)
    res = run_storescu(app, tmp_path / "s")
    assert res.returncode == 0, res.stdout + res.stderr
    status, body = _get(f"http://127.0.0.1:{app.metrics_port}/metrics")
    assert status == 200
    fams = _families(body.decode())  # still parses: nothing a sender wrote reached the exposition's syntax
    labels = {v for f in fams.values() for s in f.samples for v in s.labels.values()}
    assert not [v for v in labels if UID_LIKE.match(v) or "Hostile" in v or "evil" in v or "HELP" in v]
    modality = {s.labels["modality"]: s.value for s in fams["appliance_dicom_instances_received"].samples}
    assert modality == {"other": 2, "MR": 1}


def test_three_models_and_five_destinations_stay_under_300_series(tmp_path: Path) -> None:
    dests = [f"pacs{i}" for i in range(5)]
    models = ["liver-ct-demo", "lung-ct", "brain-mr"]
    config = parse_config({"destinations": [{"name": d, "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
                                            for d in dests], "storage": {"min_free_bytes": 0}})
    store = Store.open(tmp_path)
    jobs, ob = JobQueue(store.index), Outbox(store.index)
    for n, model in enumerate(models):
        uid = f"1.2.3.7.{n}"
        store.index.add_instance(InstanceRecord(f"{uid}.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", uid,
                                                "1.2.840.10008.1.2.1", f"q{n}", 100, modality="CT"), None,
                                 store_seconds=0.003)
        store.index.complete_quiet_series(time.time() + 60, 5.0, 0.5)
        jobs.queue_jobs(uid, [(model, n, ["r"], dests)])
        job = jobs.claim(1)
        assert job is not None
        jobs.finish(job, ok=True, reason="done", backend="onnxruntime", device="cpu", precision="fp32",
                    timings={s: 0.5 for s in ("decode", "preprocess", "infer", "postprocess", "measure", "results")},
                    objects=[NewObject(k, "1.2.840.10008.5.1.4.1.1.66.4", f"1.2.9.{n}.{k}", "1.2.9", "r/x")
                             for k in ("SEG", "SR", "SC")])
    for i, row in enumerate(ob.due()):
        if i % 2:
            ob.record_sent(row, "0x0000")
        else:
            ob.record_failure(row, "refused", "0xA700", max_attempts=1, base=1.0, cap=1.0)
    app = MetricsApp(config, store, lambda: ProcessView(3, 4, 4, True, {"supervisor": 1}),
                     lambda: [ModelView(m, "1.0.0") for m in models])
    fams = _families(_scrape(app)[2].decode())
    total = sum(len(f.samples) for f in fams.values())
    assert total <= 300, total  # ~2xx with these; the limit a fleet plans its Prometheus with
    dead = {s.labels["destination"] for s in fams["appliance_outbox_dead"].samples}
    assert dead == set(dests)
