#!/usr/bin/env python3
"""How ``[dicom] max_pdu_size`` trades ingest time against listener memory.

Run from the project root with the project's environment:

    .venv/bin/python scripts/bench_pdu_size.py [--rounds 3] [--sizes 16384,131072,1048576,4194304]

Why: the Maximum Length we advertise bounds every P-DATA-TF PDU a listener buffers, so the worst
case is max_associations x max_pdu_size of buffers on the box; a larger PDU means fewer Python
round trips per instance. Two senders, because they use the limit differently: DCMTK ``storescu``
caps its PDVs at 128 KiB whatever we advertise (`storescu -d` prints "Max Send PDV"), pynetdicom's SCU sends up to our
limit. For each size, the appliance (one listener process, no routes) receives the same 300-slice
512x512 series once per sender and round, sizes in turn within a round; the time to send it and the
listener's peak resident memory (VmHWM) are recorded. The reference is the smallest size in the same
run: the last line prints each size's time ratio against it. JSON in bench-results/bench_pdu_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance_dev.ct_series import make_volume, write_series
from appliance_dev.harness import (
    DCMTK_ENV, PROJECT_ROOT, BenchError, Children, bench_main, find_dcmtk, free_port, progress, wait_port,
)
from appliance_dev.receivers import ListenerRss

DEFAULT_JSON = PROJECT_ROOT / "bench-results" / "bench_pdu_size.json"
SENDERS = ("storescu", "pynetdicom")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Results: stdout (last line: "
                                 "ratios against the smallest size) and JSON.")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per size and sender (default 3)")
    ap.add_argument("--sizes", default="16384,131072,1048576,4194304",
                    help="comma-separated max_pdu_size values (default 16384,131072,1048576,4194304)")
    ap.add_argument("--slices", type=int, default=300, help="instances in the series (default 300)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--appliance", type=Path, default=Path(sys.executable).parent / "appliance",
                    help="the appliance executable (default: next to this Python)")
    return ap.parse_args(argv)


def _listener_hwm_mb(rss: ListenerRss, supervisor: int) -> int | None:
    peaks = []
    for pid in rss.listener_pids():
        if pid == supervisor:
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            peaks.append(int(status.split("VmHWM:")[1].split()[0]) // 1024)
        except (OSError, IndexError, ValueError):
            continue
    return max(peaks) if peaks else None


def _send_pynetdicom(port: int, files: list[Path]) -> None:
    from pydicom import dcmread
    from pynetdicom import AE

    datasets = [dcmread(f) for f in files]  # read before the clock starts
    ae = AE("BENCH")
    ae.add_requested_context(datasets[0].SOPClassUID, [datasets[0].file_meta.TransferSyntaxUID])
    t = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    if not assoc.is_established:
        raise BenchError("pynetdicom could not associate")
    for ds in datasets:
        rsp = assoc.send_c_store(ds)
        if not rsp or rsp.Status != 0:
            raise BenchError(f"pynetdicom C-STORE failed: {rsp}")
    assoc.release()
    _send_pynetdicom.seconds = time.perf_counter() - t  # type: ignore[attr-defined]


def run(args: argparse.Namespace, children: Children, work: Path) -> tuple[int, list[str]]:
    sizes = [int(s) for s in args.sizes.split(",")]
    storescu = find_dcmtk("storescu")
    series = work / "series"
    progress(f"writing {args.slices} slices")
    write_series(make_volume(args.slices, 512), series, 1, "pdu")
    files = sorted(series.rglob("*.dcm"))
    folder = files[0].parent
    results: dict[str, dict[int, list[dict[str, Any]]]] = {s: {n: [] for n in sizes} for s in SENDERS}
    for rnd in range(args.rounds):
        for n in sizes:
            for sender in SENDERS:
                d = work / f"r{rnd}-{n}-{sender}"
                d.mkdir()
                port = free_port()
                cfg = d / "appliance.toml"
                cfg.write_text(f'routes = []\n[dicom]\nae_title = "EDGE"\nbind = "127.0.0.1"\nport = {port}\n'
                               f'listeners = 1\nmax_pdu_size = {n}\n[storage]\ndata_dir = "{d / "data"}"\n'
                               'min_free_bytes = 0\n')
                proc = children.start([str(args.appliance), "serve", "--config", str(cfg)], d / "log", cwd=d)
                if not wait_port(port, proc, 90):
                    raise BenchError(f"appliance did not start; see {d / 'log'}")
                time.sleep(1.0)
                if sender == "storescu":
                    t = time.perf_counter()
                    subprocess.run([storescu, "+sd", "+r", "-aec", "EDGE", "127.0.0.1", str(port), str(folder)],
                                   env={**os.environ, **DCMTK_ENV}, check=True, capture_output=True)
                    seconds = time.perf_counter() - t
                else:
                    _send_pynetdicom(port, files)
                    seconds = _send_pynetdicom.seconds  # type: ignore[attr-defined]
                hwm = _listener_hwm_mb(ListenerRss(proc.pid, port), proc.pid)
                children.stop(proc)
                shutil.rmtree(d / "data", ignore_errors=True)
                results[sender][n].append({"seconds": seconds, "listener_peak_mb": hwm})
                progress(f"round {rnd + 1}: max_pdu_size={n} {sender}: {seconds:.2f} s, listener peak {hwm} MB")
    lines = [f"{'sender':<11} {'max_pdu_size':>12} {'median s':>9} {'peak MB':>8} {'x ref':>6}"]
    ratios = []
    summary: dict[str, Any] = {}
    for sender in SENDERS:
        ref = statistics.median(r["seconds"] for r in results[sender][sizes[0]])
        for n in sizes:
            med = statistics.median(r["seconds"] for r in results[sender][n])
            peak = max((r["listener_peak_mb"] or 0) for r in results[sender][n])
            lines.append(f"{sender:<11} {n:>12} {med:>9.2f} {peak:>8} {med / ref:>6.2f}")
            summary.setdefault(sender, {})[str(n)] = {"median_seconds": med, "listener_peak_mb": peak,
                                                        "ratio_to_smallest": med / ref}
            ratios.append(f"{sender}@{n}={med / ref:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "bench_pdu_size", "date": time.strftime("%Y-%m-%d"),
                                     "slices": args.slices, "rounds": args.rounds, "summary": summary,
                                     "runs": {s: {str(n): v for n, v in r.items()} for s, r in results.items()}},
                                    indent=2))
    lines.append(f"time against max_pdu_size={sizes[0]} (same run): " + " ".join(ratios))
    return 0, lines


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench_pdu_size", parse_args(argv), Children(), run, "stopping the appliance")


if __name__ == "__main__":
    sys.exit(main())
