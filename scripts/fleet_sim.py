#!/usr/bin/env python3
"""A fleet on one machine: N simulated appliances scraped by a real Prometheus with the fleet kit's rules.

Run from the project root with the project's environment:

    .venv/bin/python scripts/fleet_sim.py [--boxes 1000] [--interval 15] [--minutes 3]

Each box serves a realistic, changing exposition made by the real metric catalogue
(``appliance_dev/simbox.py``); all boxes are served by one selector loop. Prometheus (Debian's ``prometheus``)
scrapes every box at ``--interval`` with ``site``/``device`` target labels and evaluates
``appliance fleet kit``'s rules. Reported, measured at the end: targets up, the rule groups' last evaluation
time, Prometheus's resident memory and ingested series, scrapes served. The reference, measured in the same run,
is the same Prometheus with ``--reference-boxes`` (default 10) boxes: the last line prints the ratios.
JSON in bench-results/fleet_sim.json. Goal: 1,000 boxes at 15 s, every target up, rule evaluation under 1 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from appliance.metrics.kit import write_kit
from appliance_dev.harness import PROJECT_ROOT, free_port, progress
from appliance_dev.simbox import Fleet

DEFAULT_JSON = PROJECT_ROOT / "bench-results" / "fleet_sim.json"


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=20) as r:
        return json.loads(r.read())["data"]["result"]


def scalar(base: str, expr: str) -> float | None:
    try:
        res = query(base, expr)
    except OSError:
        return None
    return float(res[0]["value"][1]) if res else None


def run(boxes: int, interval: float, seconds: float, work: Path) -> dict[str, Any]:
    fleet = Fleet(boxes, refresh_seconds=interval)
    kit = work / f"kit-{boxes}"
    write_kit(kit)
    targets = [{"targets": [f"127.0.0.1:{p}"], "labels": {"site": f"site-{i // 25:03d}", "device": f"box-{i:04d}"}}
               for i, p in enumerate(fleet.ports())]
    (work / f"targets-{boxes}.json").write_text(json.dumps(targets))
    port = free_port()
    cfg = work / f"prometheus-{boxes}.yml"
    cfg.write_text(f"""global:
  scrape_interval: {interval:g}s
  evaluation_interval: {interval:g}s
rule_files: ["{kit}/appliance.rules.yml"]
scrape_configs:
  - job_name: appliance
    file_sd_configs: [{{files: ["{work}/targets-{boxes}.json"]}}]
  - job_name: prometheus
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
""")
    stop_at = time.monotonic() + seconds + 30
    server = threading.Thread(target=fleet.serve_forever, args=(stop_at,), daemon=True)
    server.start()
    exe = shutil.which("prometheus")
    if exe is None:
        raise SystemExit("prometheus is not installed (Debian: apt-get install prometheus; scripts/dev setup does it)")
    log = open(work / f"prometheus-{boxes}.log", "wb")
    proc = subprocess.Popen([exe, f"--config.file={cfg}", f"--storage.tsdb.path={work / f'tsdb-{boxes}'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(min(15.0, seconds))
            up = scalar(base, 'sum(up{job="appliance"})')
            progress(f"{boxes} boxes: {time.monotonic() - t0:.0f}s, up {up}, scrapes served {fleet.scrapes}")
        out = {
            "boxes": boxes,
            "interval_s": interval,
            "ran_s": round(time.monotonic() - t0, 1),
            "targets_up": scalar(base, 'sum(up{job="appliance"})'),
            "targets": boxes,
            "rule_eval_s_max": scalar(base, 'max(prometheus_rule_group_last_duration_seconds)'),
            "rule_eval_s_by_group": {r["metric"].get("rule_group", "?").rsplit(";", 1)[-1]: float(r["value"][1])
                                     for r in query(base, "prometheus_rule_group_last_duration_seconds")},
            "prometheus_rss_bytes": scalar(base, 'process_resident_memory_bytes{job="prometheus"}'),
            "head_series": scalar(base, "prometheus_tsdb_head_series"),
            "scrape_duration_s_p99": scalar(base, 'quantile(0.99, scrape_duration_seconds{job="appliance"})'),
            "scrapes_served": fleet.scrapes,
        }
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, default=1000, help="simulated appliances (default 1000)")
    ap.add_argument("--reference-boxes", type=int, default=10, help="boxes in the reference run (default 10)")
    ap.add_argument("--interval", type=float, default=15.0, help="scrape and rule interval, s (default 15)")
    ap.add_argument("--minutes", type=float, default=3.0, help="how long each run scrapes (default 3)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as td:
        work = Path(td)
        ref = run(args.reference_boxes, args.interval, args.minutes * 60, work)
        big = run(args.boxes, args.interval, args.minutes * 60, work)
    result = {"reference": ref, "fleet": big, "python": sys.version.split()[0]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for r in (ref, big):
        print(json.dumps(r))

    def ratio(key: str) -> str:
        a, b = big.get(key), ref.get(key)
        return f"{a / b:.1f}x" if a is not None and b else "n/a"

    up_ok = big["targets_up"] == big["targets"]
    rule_ok = big["rule_eval_s_max"] is not None and big["rule_eval_s_max"] < 1.0
    print(f"{big['boxes']} boxes at {args.interval:g}s: up {big['targets_up']:.0f}/{big['targets']} "
          f"({'all' if up_ok else 'NOT all'}), rule evaluation {big['rule_eval_s_max']:.3f}s "
          f"({'< 1 s' if rule_ok else 'NOT < 1 s'}), Prometheus RSS {big['prometheus_rss_bytes'] / 1e6:.0f} MB, "
          f"{big['head_series']:.0f} series; against {ref['boxes']} boxes: rule evaluation {ratio('rule_eval_s_max')}, "
          f"RSS {ratio('prometheus_rss_bytes')}, series {ratio('head_series')}")
    return 0 if up_ok and rule_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
