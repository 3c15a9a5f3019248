#!/usr/bin/env python3
"""Ingest benchmark: how fast the appliance takes a CT series compared with Orthanc and DCMTK storescp.

Run from the project root with the project's environment:

    .venv/bin/python scripts/bench_ingest.py [--rounds 5] [--parallel both]

Why these peers: Orthanc with ``SyncStorageArea: true`` is the durable receiver clinics already trust,
so appliance/Orthanc is the figure with a goal (<= 1.0 with one association, <= 0.8 with four);
``storescp`` writes without fsync and is about as fast as DICOM over loopback gets, so
appliance/storescp shows how far we are from the network's ceiling.

How it measures, and why:
- One synthetic series (default 300 slices of 512x512 int16, Explicit VR Little Endian, a full CT
  header) is written afresh for every round and association count with new UIDs, so neither the
  appliance nor Orthanc ever sees a duplicate (duplicates take a different, cheaper path).
- DCMTK ``storescu`` sends it, the way a modality would; DCMTK and Orthanc get ``TCP_NODELAY=1`` in
  their environment, without which every instance waits ~44 ms for a delayed ACK on loopback.
- Within a round the receivers take turns, starting with a different one each round, so slow drift
  of the machine (other jobs, page cache, writeback) spreads over all of them instead of one.
- Before every timed send the dirty page cache is flushed and the machine left idle for a moment,
  so one receiver's deferred writeback (storescp never fsyncs) is not charged to the next one.
- Each receiver first gets a short untimed warm-up series, so first-connection costs (imports,
  database creation) do not land on round 1.
- A send counts only if storescu exits 0 and reports a Success response for every instance; a
  failed send is reported and left out of the statistics, never silently timed.

This is a benchmark, not a test: its output is numbers (stdout, and JSON for machines); progress
goes to stderr. Every child runs in its own session and its whole process group is killed on exit,
on error and on Ctrl-C. The process handling, the receivers and the series are shared with the other
benchmarks (``appliance_dev.harness``, ``appliance_dev.receivers``, ``appliance_dev.ct_series``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance_dev.ct_series import make_volume, write_series
from appliance_dev.harness import (
    CALLING_AET,
    DCMTK_ENV,
    SETTLE_SECONDS,
    SUCCESS_MARK,
    BenchError,
    Children,
    bench_main,
    find_dcmtk,
    find_orthanc,
    fmt,
    free_port,
    host_info,
    log_tail,
    progress,
    settle,
)
from appliance_dev.receivers import ListenerRss, Receiver, clear_dir, start_orthanc, start_storescp, wait_ready

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = PROJECT_ROOT / "bench-results" / "bench_ingest.json"

#: Goals for appliance/Orthanc (ratio of median seconds) per association count.
GOALS: dict[int, float] = {1: 1.0, 4: 0.8}
WARMUP_SLICES = 10
SEND_TIMEOUT_S = 600.0
RECEIVERS = ("appliance", "orthanc", "storescp")


# --------------------------------------------------------------------------------------------- receivers


def start_appliance(children: Children, exe: Path, work: Path, listeners: int = 0) -> Receiver:
    port = free_port()
    cfg = work / "appliance.toml"
    cfg.write_text(
        # Ingest alone: no routes, so no model runs on the benchmark's random-noise series between rounds.
        "routes = []\n"
        "[dicom]\n"
        'ae_title = "EDGE"\n'
        'bind = "127.0.0.1"\n'
        f"port = {port}\n"
        f"listeners = {listeners}\n"
        "[storage]\n"
        f"data_dir = {json.dumps(str(work / 'appliance-data'))}\n"
        "min_free_bytes = 0\n"
        "[assemble]\n"
        "stable_seconds = 30\n"
        "release_grace_seconds = 1\n"
    )
    log = work / "appliance.log"
    proc = children.start([str(exe), "serve", "--config", str(cfg)], log, cwd=work)
    return Receiver("appliance", "EDGE", port, proc, log, extra={"config": str(cfg)})


# --------------------------------------------------------------------------------------------- sending


@dataclass
class Send:
    """One timed send of one series to one receiver (raw data for the JSON)."""
    receiver: str
    associations: int
    round: int
    position: int  # 0-based turn within the round for this association count
    seconds: float
    acknowledged: int
    expected: int
    returncodes: list[int | None]
    ok: bool
    error: str | None = None
    #: Largest resident memory of one appliance listener process during this send (MB; None for the others).
    listener_peak_rss_mb: float | None = None


def send(children: Children, storescu: str, rcv: Receiver, folders: list[Path], expected: int, logdir: Path,
         tag: str, rss: ListenerRss | None = None) -> tuple[float, int, list[int | None], str | None]:
    """Start one storescu per folder at once (one association each) and time until all have finished.
    Returns (seconds, instances acknowledged with Success, exit codes, error or None). With ``rss``, the
    listeners' resident memory is sampled meanwhile (read it from ``rss.peak_mb``)."""
    rcv.check_alive()
    if rss is not None:
        rss.start()
    logs = [logdir / f"{tag}-{k}.log" for k in range(len(folders))]
    t0 = time.perf_counter()
    procs = [children.start([storescu, "-v", "-xs", "+sd", "+r", "-aet", CALLING_AET, "-aec", rcv.aec,
                             "127.0.0.1", str(rcv.port), str(folder)], log, env=DCMTK_ENV)
             for folder, log in zip(folders, logs)]
    error = None
    deadline = time.monotonic() + SEND_TIMEOUT_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            error = f"storescu still running after {SEND_TIMEOUT_S:.0f}s; killed"
            break
    seconds = time.perf_counter() - t0
    if rss is not None:
        rss.stop()
    for p in procs:
        if p.returncode is None:
            children.stop(p, timeout=5.0)
        else:
            children.forget(p)
    codes = [p.returncode for p in procs]
    acked = sum(log.read_text(errors="replace").count(SUCCESS_MARK) for log in logs)
    if error is None and (any(codes) or acked != expected):
        error = (f"exit codes {codes}, {acked}/{expected} acknowledged; storescu log tail: "
                 f"{log_tail(logs[0], 300)}")
    return seconds, acked, codes, error


def stats(values: list[float]) -> dict[str, Any]:
    """n/min/median/max of the successful sends (None where there were none)."""
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}


def orthanc_instances(rcv: Receiver) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{rcv.extra['http_port']}/statistics", timeout=30) as r:
            return int(json.load(r)["CountInstances"])
    except (OSError, ValueError, KeyError):
        return None


def appliance_instances(exe: Path, rcv: Receiver) -> int | None:
    try:
        r = subprocess.run([str(exe), "series", "--config", rcv.extra["config"], "--json"], check=False,
                           capture_output=True, text=True, timeout=60, cwd=rcv.log.parent)
        return sum(int(s.get("instances", 0)) for s in json.loads(r.stdout))
    except (OSError, subprocess.SubprocessError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark DICOM ingest: the appliance against Orthanc (durable, SyncStorageArea) and DCMTK "
                    "storescp (no fsync), DCMTK storescu over loopback, alternating rounds. Results on stdout "
                    "(last line: the ratios) and as JSON; progress on stderr.")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per receiver and association count (default 5)")
    p.add_argument("--slices", type=int, default=300, help="instances in the series (default 300)")
    p.add_argument("--size", type=int, default=512, help="rows = columns of each slice (default 512)")
    p.add_argument("--parallel", choices=("1", "4", "both"), default="both",
                   help="associations per send: 1, 4 (series split into 4 folders, 4 storescu at once), "
                        "or both (default)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--listeners", type=int, default=0,
                   help="appliance listener processes ([dicom] listeners; default 0 = the appliance's own choice)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, receivers' data)")
    p.add_argument("--appliance", type=Path, default=Path(sys.executable).parent / "appliance",
                   help="the appliance executable (default: next to this Python)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.slices < 1 or args.size < 8:
        p.error("--rounds and --slices must be >= 1 and --size >= 8")
    args.assoc_counts = [1, 4] if args.parallel == "both" else [int(args.parallel)]
    if args.slices < max(args.assoc_counts):
        most = max(args.assoc_counts)
        p.error(f"--slices must be at least {most} to split the series over {most} associations")
    return args


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run(args: argparse.Namespace, children: Children, work: Path) -> tuple[int, list[str]]:
    """The whole benchmark; returns the exit status and the result lines, which main() prints only after
    every child has stopped, so that the ratio line stays the last line even with stderr merged in."""
    appliance = args.appliance
    if not appliance.exists():
        raise BenchError(f"appliance executable {appliance} not found (pip install -e . in the venv, or --appliance)")
    storescu, storescp, orthanc = find_dcmtk("storescu"), find_dcmtk("storescp"), find_orthanc()
    series_bytes = args.slices * args.size * args.size * 2
    need = series_bytes * (args.rounds * len(args.assoc_counts) * 3 + 2)
    free = shutil.disk_usage(work).free
    if free < need:
        raise BenchError(f"{work} has {free / 1e9:.1f} GB free, the run needs about {need / 1e9:.1f} GB")

    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    progress(f"work dir {work}; generating a {args.slices}x{args.size}^2 int16 volume")
    vol = make_volume(args.slices, args.size)
    warm_vol = vol[:min(WARMUP_SLICES, args.slices)]

    progress("starting receivers: appliance, Orthanc, storescp" + (" (+ --fork)" if 4 in args.assoc_counts else ""))
    app = start_appliance(children, appliance, work, args.listeners)
    orth = start_orthanc(children, orthanc, work)
    scp: dict[int, Receiver] = {n: start_storescp(children, storescp, work, fork=n > 1) for n in args.assoc_counts}
    wait_ready([app, orth, *scp.values()])
    by_count: dict[int, dict[str, Receiver]] = {
        n: {"appliance": app, "orthanc": orth, "storescp": scp[n]} for n in args.assoc_counts}
    logs = work / "storescu-logs"
    logs.mkdir()

    # Untimed warm-up, one association each; also proves every path works before the long part.
    warm = write_series(warm_vol, work / "series-warmup", 1, "WARM")
    for name, rcv in by_count[args.assoc_counts[0]].items():
        _, acked, codes, err = send(children, storescu, rcv, warm, len(warm_vol), logs, f"warmup-{name}")
        if err:
            raise BenchError(f"warm-up send to {name} failed: {err}")
    shutil.rmtree(work / "series-warmup")
    progress("receivers up and warmed")

    sends: list[Send] = []
    listener_hwm: dict[int, float] = {}  # listener pid -> VmHWM (its peak since it started), last read
    for rnd in range(args.rounds):
        for n in args.assoc_counts:
            root = work / f"series-r{rnd}-a{n}"
            folders = write_series(vol, root, n, f"R{rnd}A{n}")
            k = rnd % len(RECEIVERS)
            order = RECEIVERS[k:] + RECEIVERS[:k]
            for pos, name in enumerate(order):
                settle()
                rss = ListenerRss(app.proc.pid, app.port) if name == "appliance" else None
                secs, acked, codes, err = send(children, storescu, by_count[n][name], folders, args.slices, logs,
                                               f"r{rnd}-a{n}-{name}", rss)
                s = Send(name, n, rnd, pos, secs, acked, args.slices, codes, err is None, err,
                         rss.peak_mb if rss is not None else None)
                if rss is not None:
                    listener_hwm.update(rss.hwm_mb)
                sends.append(s)
                if err:
                    progress(f"round {rnd + 1}/{args.rounds}, {n} assoc, {name}: FAILED after {secs:.2f}s: {err}")
                else:
                    progress(f"round {rnd + 1}/{args.rounds}, {n} assoc, {name}: {secs:.2f}s")
            shutil.rmtree(root)
        for r in scp.values():
            assert r.out_dir is not None
            clear_dir(r.out_dir)

    # Did the durable receivers really keep everything they acknowledged?
    time.sleep(2.0)
    stored = {
        "appliance": {"reported": appliance_instances(appliance, app)},
        "orthanc": {"reported": orthanc_instances(orth)},
    }
    for name, counts in stored.items():
        counts["acknowledged"] = len(warm_vol) + sum(s.acknowledged for s in sends if s.receiver == name)

    results: dict[str, Any] = {}
    for n in args.assoc_counts:
        per = {name: stats([s.seconds for s in sends if s.ok and s.receiver == name and s.associations == n])
               for name in RECEIVERS}
        med: dict[str, float | None] = {name: per[name]["median"] for name in RECEIVERS}
        peaks = [s.listener_peak_rss_mb for s in sends
                 if s.receiver == "appliance" and s.associations == n and s.listener_peak_rss_mb is not None]
        results[f"{n}"] = {
            "seconds": per,
            "appliance_listener_peak_rss_mb": max(peaks) if peaks else None,
            "ratios": {"appliance/orthanc": ratio(med["appliance"], med["orthanc"]),
                       "appliance/storescp": ratio(med["appliance"], med["storescp"])},
            "goal_appliance/orthanc": GOALS.get(n),
        }

    failed = [s for s in sends if not s.ok]
    report = {
        "benchmark": "ingest",
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "rounds": args.rounds, "slices": args.slices, "size": args.size, "associations": args.assoc_counts,
            "series_bytes_pixels": series_bytes, "transfer_syntax": "Explicit VR Little Endian",
            "sender": f"{storescu} -v -xs +sd +r -aet {CALLING_AET} -aec <AET> 127.0.0.1 <port> <dir>",
            "env": DCMTK_ENV, "warmup_slices": len(warm_vol), "settle_seconds": SETTLE_SECONDS,
            "order": "receivers alternate within each round, rotating the first each round",
            "appliance_config": (work / "appliance.toml").read_text(),
            "orthanc": "SyncStorageArea true, StorageCompression false",
            "storescp": {"1": "storescp -od DIR PORT", "4": "storescp --fork -od DIR PORT"},
        },
        "host": {**host_info(appliance, storescu, orthanc), "loadavg_start": load_start,
                 "loadavg_end": os.getloadavg()},
        "results": results,
        "stored_check": stored,
        "appliance_listener_rss": {
            "peak_rss_mb": max((s.listener_peak_rss_mb for s in sends if s.listener_peak_rss_mb is not None),
                               default=None),
            "vmhwm_mb": {str(pid): mb for pid, mb in sorted(listener_hwm.items())},
            "how": f"VmRSS of each listener process sampled every {ListenerRss.INTERVAL_S * 1000:.0f} ms during "
                   "every timed appliance send (the largest single process); VmHWM = each listener's own peak "
                   "since it started (warm-up included), read after each send",
        },
        "failed_sends": len(failed),
        "sends": [asdict(s) for s in sends],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {args.json}")

    mb = series_bytes / 1e6
    out: list[str] = []
    out.append(f"ingest of {args.slices} x {args.size}x{args.size} int16 CT ({mb:.0f} MB of pixels) over loopback, "
               f"seconds per series, {args.rounds} rounds")
    out.append(f"{'receiver':<10} {'assoc':>5} {'ok':>4} {'min':>7} {'median':>7} {'max':>7} {'peak RSS MB':>12}")
    for n in args.assoc_counts:
        for name in RECEIVERS:
            st = results[f"{n}"]["seconds"][name]
            # Peak resident memory of one listener process: measured for the appliance only.
            peak = fmt(results[f"{n}"]["appliance_listener_peak_rss_mb"], 0) if name == "appliance" else "-"
            out.append(f"{name:<10} {n:>5} {st['n']:>4} {fmt(st['min'], 2):>7} {fmt(st['median'], 2):>7} "
                       f"{fmt(st['max'], 2):>7} {peak:>12}")
    if listener_hwm:
        out.append("appliance listener VmHWM (peak since start, MB): "
                   + ", ".join(f"pid {pid} {mb:.0f}" for pid, mb in sorted(listener_hwm.items())))
    for s in failed:
        out.append(f"FAILED: round {s.round + 1}, {s.associations} assoc, {s.receiver}: {s.error}")
    mismatch = False
    for name, c in stored.items():
        if c["reported"] != c["acknowledged"]:
            mismatch = True
            out.append(f"WARNING: {name} reports {c['reported']} instances stored, "
                       f"{c['acknowledged']} were acknowledged")
    vs_o = ", ".join(f"{n}-assoc {fmt(results[f'{n}']['ratios']['appliance/orthanc'], 2)} (goal <= {GOALS[n]})"
                     for n in args.assoc_counts)
    vs_s = ", ".join(f"{n}-assoc {fmt(results[f'{n}']['ratios']['appliance/storescp'], 1)}" for n in args.assoc_counts)
    out.append(f"appliance/orthanc {vs_o}; appliance/storescp {vs_s}")
    return (1 if failed or mismatch else 0), out


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench_ingest", parse_args(argv), Children(), run,
                      "stopping receivers (the appliance drains first; this can take a few seconds)")


if __name__ == "__main__":
    sys.exit(main())
