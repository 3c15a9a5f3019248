"""The fleet kit: alerting and recording rules with their promtool tests, Grafana dashboards and Prometheus
examples, written by ``appliance fleet kit DIR`` for a vendor to load into their own monitoring.

Generated from the catalogue, so it is versioned with the appliance and cannot name a metric the box does not
export (a test runs every expression against a real Prometheus). YAML is written as JSON-quoted scalars, which
every YAML parser reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.metrics.catalogue import CATALOGUE, exposed_name

JOB = "appliance"


@dataclass(frozen=True)
class KitOptions:
    #: Local hours (Prometheus evaluates in UTC: give UTC hours) in which a box that receives nothing is an alert.
    clinic_hours: tuple[int, int] = (7, 19)
    #: p95 of last instance -> results acknowledged at PACS above this is an alert.
    time_to_result_target_seconds: float = 600.0
    gpu_hot_celsius: float = 85.0
    oldest_pending_seconds: float = 3600.0


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    runbook: str


def alerts(o: KitOptions) -> list[Alert]:
    lo, hi = o.clinic_hours
    sel = f'{{job="{JOB}"}}'
    return [
        Alert(
            "ApplianceDown",
            f"up{sel} == 0",
            "5m",
            "critical",
            "{{ $labels.instance }} is not answering scrapes",
            "Check the box is powered and on the network; on it: systemctl status, appliance status.",
        ),
        Alert(
            "ApplianceNotReady",
            f"appliance_ready{sel} == 0",
            "10m",
            "critical",
            "{{ $labels.instance }} readiness check {{ $labels.check }} failing",
            "GET /readyz on the box names the reason; the README's troubleshooting table says what to do.",
        ),
        Alert(
            "ApplianceNotReceiving",
            f"sum by (instance) (increase(appliance_dicom_instances_received_total{sel}[2h])) == 0"
            f" and on () (hour() >= {lo} and hour() < {hi})",
            "30m",
            "warning",
            "{{ $labels.instance }} received no instance for 2 h in clinic hours",
            "Modalities may send elsewhere: check their destination AE title/port and the box's allowed_callers.",
        ),
        Alert(
            "ApplianceQueueBackingUp",
            f"sum by (instance) (appliance_queue_depth{sel}) > 20",
            "15m",
            "warning",
            "{{ $labels.instance }} has more than 20 jobs waiting for 15 min",
            "The worker is slower than the arrivals: check appliance_stage_duration_seconds and the worker's log.",
        ),
        Alert(
            "ApplianceTimeToResultSlow",
            f"histogram_quantile(0.95, sum by (instance, le) (rate(appliance_time_to_result_seconds_bucket{sel}[1h])))"
            f" > {o.time_to_result_target_seconds:g}",
            "30m",
            "warning",
            "{{ $labels.instance }}: p95 time from last instance to results at PACS over target",
            "Compare time to job (queueing) with stage durations (processing) and export attempts (PACS).",
        ),
        Alert(
            "ApplianceDeadLetters",
            f"appliance_outbox_dead{sel} > 0",
            "5m",
            "warning",
            "{{ $labels.instance }}: results for {{ $labels.destination }} could not be delivered",
            "appliance outbox list --state dead shows the PACS's answer; fix it, then appliance outbox retry --all-dead.",
        ),
        Alert(
            "ApplianceExportStuck",
            f"appliance_export_oldest_pending_seconds{sel} > {o.oldest_pending_seconds:g}",
            "10m",
            "warning",
            "{{ $labels.instance }}: a result has waited too long for {{ $labels.destination }}",
            "The destination refuses or is unreachable: appliance outbox list shows the last error.",
        ),
        Alert(
            "ApplianceDiskFilling",
            f"predict_linear(appliance_disk_free_bytes{sel}[6h], 24 * 3600)"
            f" < on (instance) group_left () appliance_disk_reserve_bytes{sel}",
            "30m",
            "warning",
            "{{ $labels.instance }} will reach its disk reserve within a day",
            "Lower retention_days, add storage, or check for a destination that never acknowledges (undelivered work is kept).",
        ),
        Alert(
            "ApplianceDiskLow",
            f"appliance_disk_free_bytes{sel} < on (instance) group_left () appliance_disk_reserve_bytes{sel}",
            "5m",
            "critical",
            "{{ $labels.instance }} is below its disk reserve and refuses new instances",
            "Free space now: retention, or move data; modalities keep their studies and resend.",
        ),
        Alert(
            "ApplianceGpuHot",
            f"appliance_gpu_temperature_celsius{sel} > {o.gpu_hot_celsius:g}",
            "10m",
            "warning",
            "{{ $labels.instance }} GPU above its temperature limit",
            "Check the box's airflow and fan; a Jetson throttles when hot.",
        ),
        Alert(
            "ApplianceListenerRestarts",
            f'sum by (instance) (resets(appliance_process_cpu_seconds_total{{job="{JOB}",role=~"listener-.*"}}[30m])) > 2',
            "0m",
            "warning",
            "{{ $labels.instance }}: DICOM listeners restarted more than twice in 30 min",
            "The appliance's log has each listener's exit code; a listener that keeps dying stops the appliance.",
        ),
        Alert(
            "ApplianceModelNotLoaded",
            f'appliance_ready{{job="{JOB}",check="models"}} == 0',
            "5m",
            "critical",
            "{{ $labels.instance }}: a routed model is not loaded",
            "appliance models list on the box shows refused packages with the reason (checksum, manifest).",
        ),
    ]


RECORDING = [
    (
        "appliance:instances_received:rate5m",
        f'sum by (instance) (rate(appliance_dicom_instances_received_total{{job="{JOB}"}}[5m]))',
    ),
    (
        "appliance:time_to_result_seconds:p95_1h",
        f'histogram_quantile(0.95, sum by (instance, le) (rate(appliance_time_to_result_seconds_bucket{{job="{JOB}"}}[1h])))',
    ),
    (
        "appliance:store_duration_seconds:p99_5m",
        f'histogram_quantile(0.99, sum by (instance, le) (rate(appliance_store_duration_seconds_bucket{{job="{JOB}"}}[5m])))',
    ),
    ("appliance:outbox_dead:sum", f'sum by (instance) (appliance_outbox_dead{{job="{JOB}"}})'),
]


def _q(text: str) -> str:
    return json.dumps(text)


def rules_yaml(o: KitOptions) -> str:
    lines = [
        f"# Appliance {__version__} alerting and recording rules (appliance fleet kit).",
        "groups:",
        "  - name: appliance-recording",
        "    rules:",
    ]
    for name, expr in RECORDING:
        lines += [f"      - record: {name}", f"        expr: {_q(expr)}"]
    lines += ["  - name: appliance-alerts", "    rules:"]
    for a in alerts(o):
        lines += [
            f"      - alert: {a.name}",
            f"        expr: {_q(a.expr)}",
            f"        for: {a.for_}",
            "        labels:",
            f"          severity: {a.severity}",
            "        annotations:",
            f"          summary: {_q(a.summary)}",
            f"          runbook: {_q(a.runbook)}",
        ]
    return "\n".join(lines) + "\n"


#: promtool unit tests: for every alert, series that make it fire and series that do not (1m scrape steps).
def _series(metric: str, values: str) -> list[str]:
    return [f"      - series: {_q(metric)}", f"        values: {_q(values)}"]


def rule_tests_yaml(o: KitOptions) -> str:
    i = 'instance="box1:9464", job="appliance"'
    lo = o.clinic_hours[0]
    cases: list[tuple[str, list[tuple[str, str]], str, list[dict[str, str]]]] = [
        # (alert, [(series, values)], eval_time, expected labels of firing alerts; [] = must not fire)
        ("ApplianceDown", [(f"up{{{i}}}", "0x10")], "10m", [{"severity": "critical"}]),
        ("ApplianceDown", [(f"up{{{i}}}", "1x10")], "10m", []),
        (
            "ApplianceNotReady",
            [(f'appliance_ready{{check="worker", {i}}}', "0x15")],
            "15m",
            [{"check": "worker", "severity": "critical"}],
        ),
        ("ApplianceNotReady", [(f'appliance_ready{{check="worker", {i}}}', "1x15")], "15m", []),
        (
            "ApplianceQueueBackingUp",
            [(f'appliance_queue_depth{{priority="0", {i}}}', "30x20")],
            "20m",
            [{"severity": "warning"}],
        ),
        ("ApplianceQueueBackingUp", [(f'appliance_queue_depth{{priority="0", {i}}}', "3x20")], "20m", []),
        (
            "ApplianceDeadLetters",
            [(f'appliance_outbox_dead{{destination="pacs", {i}}}', "2x10")],
            "10m",
            [{"destination": "pacs", "severity": "warning"}],
        ),
        ("ApplianceDeadLetters", [(f'appliance_outbox_dead{{destination="pacs", {i}}}', "0x10")], "10m", []),
        (
            "ApplianceExportStuck",
            [
                (
                    f'appliance_export_oldest_pending_seconds{{destination="pacs", {i}}}',
                    f"{o.oldest_pending_seconds + 60:g}+60x20",
                )
            ],
            "20m",
            [{"destination": "pacs", "severity": "warning"}],
        ),
        (
            "ApplianceExportStuck",
            [(f'appliance_export_oldest_pending_seconds{{destination="pacs", {i}}}', "30x20")],
            "20m",
            [],
        ),
        (
            "ApplianceDiskLow",
            [
                (f'appliance_disk_free_bytes{{path="data_dir", {i}}}', "1000x10"),
                (f"appliance_disk_reserve_bytes{{{i}}}", "5000x10"),
            ],
            "10m",
            [{"severity": "critical"}],
        ),
        (
            "ApplianceDiskLow",
            [
                (f'appliance_disk_free_bytes{{path="data_dir", {i}}}', "9000x10"),
                (f"appliance_disk_reserve_bytes{{{i}}}", "5000x10"),
            ],
            "10m",
            [],
        ),
        (
            "ApplianceDiskFilling",
            [
                (f'appliance_disk_free_bytes{{path="data_dir", {i}}}', "100000000-100000x600"),
                (f"appliance_disk_reserve_bytes{{{i}}}", "10000000x600"),
            ],
            "9h",
            [{"severity": "warning"}],
        ),
        (
            "ApplianceDiskFilling",
            [
                (f'appliance_disk_free_bytes{{path="data_dir", {i}}}', "100000000x600"),
                (f"appliance_disk_reserve_bytes{{{i}}}", "10000000x600"),
            ],
            "9h",
            [],
        ),
        ("ApplianceGpuHot", [(f"appliance_gpu_temperature_celsius{{{i}}}", "90x15")], "15m", [{"severity": "warning"}]),
        ("ApplianceGpuHot", [(f"appliance_gpu_temperature_celsius{{{i}}}", "60x15")], "15m", []),
        (
            "ApplianceListenerRestarts",
            [(f'appliance_process_cpu_seconds_total{{role="listener-0", {i}}}', "5 1 6 1 7 1 8 1 9")],
            "8m",
            [{"severity": "warning"}],
        ),
        (
            "ApplianceListenerRestarts",
            [(f'appliance_process_cpu_seconds_total{{role="listener-0", {i}}}', "1+1x10")],
            "10m",
            [],
        ),
        (
            "ApplianceModelNotLoaded",
            [(f'appliance_ready{{check="models", {i}}}', "0x10")],
            "10m",
            [{"check": "models", "severity": "critical"}],
        ),
        ("ApplianceModelNotLoaded", [(f'appliance_ready{{check="models", {i}}}', "1x10")], "10m", []),
        (
            "ApplianceTimeToResultSlow",
            [
                (f'appliance_time_to_result_seconds_bucket{{le="{b}", model="liver-ct-demo", {i}}}', v)
                for b, v in (("60", "0x90"), ("600", "0x90"), ("1800", "0+10x90"), ("+Inf", "0+10x90"))
            ],
            "90m",
            [{"severity": "warning"}],
        ),
        (
            "ApplianceTimeToResultSlow",
            [
                (f'appliance_time_to_result_seconds_bucket{{le="{b}", model="liver-ct-demo", {i}}}', v)
                for b, v in (("60", "0+10x90"), ("600", "0+10x90"), ("1800", "0+10x90"), ("+Inf", "0+10x90"))
            ],
            "90m",
            [],
        ),
        # 2h of no instances, inside clinic hours (the test clock starts at 1970-01-01 00:00 UTC: shift into hours)
        (
            "ApplianceNotReceiving",
            [(f'appliance_dicom_instances_received_total{{modality="CT", {i}}}', f"5x{(lo + 4) * 60}")],
            f"{lo + 3}h",
            [{"severity": "warning"}],
        ),
        (
            "ApplianceNotReceiving",
            [(f'appliance_dicom_instances_received_total{{modality="CT", {i}}}', f"0+1x{(lo + 4) * 60}")],
            f"{lo + 3}h",
            [],
        ),
    ]
    names = {a.name for a in alerts(o)}
    assert {c[0] for c in cases} == names, "every alert has a test"
    out = [
        "# promtool test rules appliance.rules.test.yml",
        "rule_files:",
        "  - appliance.rules.yml",
        "evaluation_interval: 1m",
        "tests:",
    ]
    for alert, series, at, firing in cases:
        out += ["  - interval: 1m", "    input_series:"]
        for metric, values in series:
            out += _series(metric, values)
        out += [
            "    alert_rule_test:",
            f"      - eval_time: {at}",
            f"        alertname: {alert}",
            "        exp_alerts:" + (" []" if not firing else ""),
        ]
        for labels in firing:
            base = dict(_labels_of(series[0][0]))
            if alert in (
                "ApplianceNotReceiving",
                "ApplianceQueueBackingUp",
                "ApplianceTimeToResultSlow",
                "ApplianceListenerRestarts",
            ):
                base = {"instance": base["instance"]}  # summed by instance
            full = {**base, **labels}
            out.append("          - exp_labels:")
            out += [f"              {k}: {_q(v)}" for k, v in sorted(full.items())]
            rule = next(a for a in alerts(o) if a.name == alert)
            out.append("            exp_annotations:")
            for key, text in (("runbook", rule.runbook), ("summary", rule.summary)):
                out.append(f"              {key}: {_q(_render(text, full))}")
    return "\n".join(out) + "\n"


def _render(template: str, labels: dict[str, str]) -> str:
    """What Prometheus makes of a summary that uses only ``{{ $labels.x }}``."""
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)


def _labels_of(series: str) -> list[tuple[str, str]]:
    inner = series[series.index("{") + 1 : series.rindex("}")]
    out = []
    for part in inner.split(", "):
        k, _, v = part.partition("=")
        out.append((k.strip(), v.strip().strip('"')))
    return out


# -- dashboards ------------------------------------------------------------------------------------------


def _panel(
    pid: int, title: str, exprs: list[tuple[str, str]], y: int, kind: str = "timeseries", unit: str = "short"
) -> dict[str, Any]:
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * ((pid - 1) % 2), "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": legend} for i, (e, legend) in enumerate(exprs)],
    }


_UNITS = {"seconds": "s", "bytes": "bytes", "ratio": "percentunit", "celsius": "celsius", "watts": "watt"}


def panel_exprs(selector: str, by: str) -> list[tuple[str, list[tuple[str, str]], str, str]]:
    """(title, [(expr, legend)], panel type, unit) for every family of the catalogue."""
    out = []
    for f in CATALOGUE:
        name = exposed_name(f)
        unit = _UNITS.get(f.unit, "short")
        labels = ", ".join(f.labels)
        group = ", ".join(x for x in (by, labels) if x)
        legend = " ".join("{{" + x + "}}" for x in (by, *f.labels) if x) or f.name
        if f.kind == "counter":
            exprs = [(f"sum by ({group}) (rate({name}{selector}[5m]))", legend)]
            title, unit = f"{f.name} (per second)", ("Bps" if f.unit == "bytes" else unit)
        elif f.kind == "histogram":
            g = ", ".join(x for x in (by, labels, "le") if x)
            exprs = [
                (
                    f"histogram_quantile({q}, sum by ({g}) (rate({name}_bucket{selector}[15m])))",
                    f"p{int(q * 100)} {legend}",
                )
                for q in (0.5, 0.95)
            ]
            title = f"{f.name} (p50, p95)"
        elif f.kind == "info":
            exprs = [(f"{name}{selector}", legend)]
            title = f.name
        else:
            exprs = [(f"sum by ({group}) ({name}{selector})", legend)]
            title = f.name
        out.append((title, exprs, "table" if f.kind == "info" else "timeseries", unit))
    return out


def dashboard(fleet: bool) -> dict[str, Any]:
    if fleet:
        selector, by = f'{{job="{JOB}", site=~"$site", device=~"$device"}}', "site, device"
        variables = [
            _var("site", f'label_values(up{{job="{JOB}"}}, site)'),
            _var("device", f'label_values(up{{job="{JOB}", site=~"$site"}}, device)'),
        ]
    else:
        selector, by = f'{{job="{JOB}", instance="$instance"}}', ""
        variables = [_var("instance", f'label_values(up{{job="{JOB}"}}, instance)', multi=False)]
    panels = []
    y = 0
    if fleet:
        panels.append(_panel(1, "boxes up", [(f'sum by (site) (up{{job="{JOB}", site=~"$site"}})', "{{site}}")], 0))
    for title, exprs, kind, unit in panel_exprs(selector, by):
        pid = len(panels) + 1
        y = 8 * ((pid - 1) // 2)
        panels.append(_panel(pid, title, exprs, y, kind, unit))
    return {
        "title": f"Appliance {'fleet' if fleet else 'box'}",
        "uid": f"appliance-{'fleet' if fleet else 'box'}",
        "schemaVersion": 39,
        "version": 1,
        "tags": ["appliance", __version__],
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "1m",
        "editable": True,
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}, *variables]},
        "panels": panels,
    }


def _var(name: str, query: str, multi: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "refresh": 2,
        "multi": multi,
        "includeAll": multi,
        "allValue": ".*" if multi else None,
    }


# -- Prometheus examples ---------------------------------------------------------------------------------

SCRAPE = f"""# Scraping boxes: one target per box; site and device are target labels added here (by relabelling a
# file_sd or static target's address), not labels each box puts on every metric ([device] id, site in a
# later release only name the box in its own logs).
global:
  scrape_interval: 15s
  evaluation_interval: 15s
# Load the kit's rules by adding ../appliance.rules.yml (relative to this file) to the rule files; they are
# kept out of this example so that it also serves a Prometheus that only scrapes.
scrape_configs:
  - job_name: {JOB}
    metrics_path: /metrics
    static_configs:
      - targets: ["box-0001.clinic-a.example:9464"]
        labels: {{site: "clinic-a", device: "box-0001"}}
    file_sd_configs:
      - files: ["targets/*.json"]   # [{{"targets": ["host:9464"], "labels": {{"site": "...", "device": "..."}}}}]
"""

AGENT = f"""# A box behind NAT: a Prometheus in agent mode next to it (prometheus --enable-feature=agent) scrapes it
# and pushes with remote_write. Known limit: samples buffered in the agent's WAL while the central side is
# unreachable are lost if the agent restarts before they are sent. The kit detects the gap: the central
# side alerts on ApplianceDown (no fresh up samples) and "absent_over_time(up{{job="{JOB}"}}[10m])".
global:
  scrape_interval: 15s
scrape_configs:
  - job_name: {JOB}
    static_configs:
      - targets: ["127.0.0.1:9464"]
        labels: {{site: "clinic-a", device: "box-0001"}}
remote_write:
  - url: https://metrics.vendor.example/api/v1/write
    queue_config: {{max_samples_per_send: 2000}}
"""

FEDERATION = f"""# Federation: a regional Prometheus scrapes the boxes with appliance.rules.yml loaded; the global one
# pulls only the aggregated series (the recording rules) from it.
global:
  scrape_interval: 60s
scrape_configs:
  - job_name: appliance-federate
    honor_labels: true
    metrics_path: /federate
    params:
      "match[]":
        - '{{__name__=~"appliance:.*"}}'
        - 'up{{job="{JOB}"}}'
    static_configs:
      - targets: ["prometheus.region-1.example:9090"]
"""


def write_kit(directory: Path, o: KitOptions | None = None) -> list[Path]:
    """Write the kit into ``directory`` (created); returns the files written."""
    o = o or KitOptions()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dashboards").mkdir(exist_ok=True)
    (directory / "prometheus").mkdir(exist_ok=True)
    files = {
        "appliance.rules.yml": rules_yaml(o),
        "appliance.rules.test.yml": rule_tests_yaml(o),
        "dashboards/appliance-box.json": json.dumps(dashboard(False), indent=2) + "\n",
        "dashboards/appliance-fleet.json": json.dumps(dashboard(True), indent=2) + "\n",
        "prometheus/scrape.yml": SCRAPE,
        "prometheus/agent.yml": AGENT,
        "prometheus/federation.yml": FEDERATION,
    }
    out = []
    for rel, text in files.items():
        path = directory / rel
        path.write_text(text, encoding="utf-8")
        out.append(path)
    return out
