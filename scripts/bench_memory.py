#!/usr/bin/env python3
"""Peak memory of the inference worker's code path against the series length.

Run from the project root with the project's environment:

    .venv/bin/python scripts/bench_memory.py [--slices 300 1000] [--long] [--reference d83b19a]

For each length, a thin-slice synthetic abdominal CT of 512x512 slices is written (one phantom patient,
``appliance_dev.synthetic``, rendered once as bench_e2e renders it: 300 slices of 1 mm; a series of n slices
covers the same 300 mm at 300/n mm, each slice interpolated between the two nearest rendered ones, so the
liver is on the same share of slices at every length, as in a real thin-slice reconstruction) with
the benchmarks' full CT header (``appliance_dev.ct_series``). Then ``appliance infer`` runs on it as a
subprocess, exactly as an operator runs it (label map, summary, SEG, SR, key image and previews written),
and what it costs is recorded:

- ``peak_rss``: the child's peak resident set size, its ``VmHWM`` (the kernel's high-water mark since the
  exec, what ``/usr/bin/time -v`` reports for a small parent) sampled from ``/proc/<pid>/status`` every
  10 ms until it exits, the number the goal is judged on (<= 1.0 GB at every length). ``ru_maxrss`` from
  ``os.wait4`` is kept in the JSON but not used: Linux counts the forked copy of this benchmark in it;
- ``peak_anon`` / ``peak_file``: the largest RssAnon and RssFile seen by sampling ``/proc/<pid>/status``
  every 10 ms (anonymous memory is what cannot be dropped under pressure; file pages are the mapped
  libraries and model);
- the wall time per slice, and the pipeline's own stage times from ``summary.json`` per slice.

Reference, in the same run: ``--reference REV`` (e.g. ``d83b19a``, the last commit with the whole-volume
path) exports that commit's ``appliance/`` and ``models/`` with ``git archive`` (the git state is not
touched) and runs its ``appliance infer`` on the same series, up to ``--reference-max-slices`` (the
whole-volume code needs ~6 GB at 1,000 slices); ratios new/reference are printed and their label maps and
measurements compared (they must be identical). Ratios against this run's shortest series are always
printed (the default, ``--reference none``, has only those). ``--repeats K`` runs each code K times,
alternating, and reports the fastest run and the largest peak (the forward pass is the same code in
both, so on a shared machine only repeats tell a real difference from load). ``--long`` adds the 3,000-slice series
(~25 minutes on 2 cores, 1.6 GB of files).

Numbers go to stdout (the goal line last) and to JSON (``--out``); progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance_dev.ct_series import ct_slice, render_volume
from appliance_dev.harness import PROJECT_ROOT, BenchError, Children, bench_main, fmt, host_info, log_tail, progress

DEFAULT_JSON = PROJECT_ROOT / "bench-results" / "bench_memory.json"
MODEL = "liver-ct-demo"
#: The issue's goals.
PEAK_GOAL_BYTES = 1_000_000_000
TIME_GOAL_RATIO = 1.10
#: The rendered anatomy: bench_e2e's 300 slices of 1 mm.
BASE_SLICES = 300
BASE_SPACING_MM = 1.0
SAMPLE_S = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Peak resident memory and time per slice of `appliance infer` (the worker's code path) on "
                    "300, 1,000 (and with --long 3,000) slice synthetic 512x512 CT, against a reference commit "
                    "run in the same session. Results on stdout (last line: the goal) and as JSON; progress on "
                    "stderr. See the module docstring for exactly what is measured.")
    p.add_argument("--slices", type=int, nargs="+", default=[300, 1000], metavar="N",
                   help="series lengths (default 300 1000)")
    p.add_argument("--long", action="store_true", help="add the 3,000-slice series (slow: ~25 min here)")
    p.add_argument("--size", type=int, default=512, help="rows = columns of each slice (default 512)")
    p.add_argument("--seed", type=int, default=7, help="phantom patient (default 7, as bench_e2e)")
    p.add_argument("--reference", default="none", metavar="REV",
                   help="git commit whose appliance infer is the reference, e.g. d83b19a (the whole-volume code); "
                        "default none: ratios against the shortest series only")
    p.add_argument("--reference-max-slices", type=int, default=1000, metavar="N",
                   help="run the reference only up to this length (default 1000)")
    p.add_argument("--budget-mb", type=int, default=None,
                   help="[inference] memory_budget_mb for the new code (default: the appliance's default)")
    p.add_argument("--backend", choices=("onnxruntime", "auto", "tensorrt"), default="onnxruntime",
                   help="[inference] backend (default onnxruntime)")
    p.add_argument("--out", "--json", dest="out", type=Path, default=DEFAULT_JSON,
                   help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--repeats", type=int, default=1, metavar="K",
                   help="runs per length and code, this tree and the reference alternating (default 1); the "
                        "fastest run's times and the largest peak are reported (other load on the machine only "
                        "ever slows a run down)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (series, outputs, logs)")
    p.add_argument("--python", type=Path, default=Path(sys.executable),
                   help="Python of the project's environment (default: this one)")
    args = p.parse_args(argv)
    args.slices = sorted(set(args.slices + ([3000] if args.long else [])))
    return args


# --------------------------------------------------------------------------------------------- series


def render_base(size: int, seed: int) -> np.ndarray:
    """bench_e2e's phantom: stored values (HU + 1024, int16), 300 slices of 1 mm, superior first."""
    vol, _ = render_volume(BASE_SLICES, size, seed)
    return vol


def write_thin_series(base: np.ndarray, n: int, folder: Path) -> None:
    """``base``'s 300 mm as ``n`` slices of 300/n mm, linearly interpolated along z, as a new series."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    spacing = BASE_SLICES * BASE_SPACING_MM / n
    for i in range(n):
        f = i * (base.shape[0] - 1) / max(1, n - 1)
        a = int(np.floor(f))
        b = min(a + 1, base.shape[0] - 1)
        w = f - a
        sl = np.rint(base[a] * (1.0 - w) + base[b] * w).astype(np.int16)[None]
        ds = ct_slice(sl, 0, study, series, frame, f"mem{n}")
        z = -i * spacing
        ipp = list(ds.ImagePositionPatient)
        ds.ImagePositionPatient = [ipp[0], ipp[1], f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        ds.SliceThickness = f"{spacing:.4g}"
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"CT{i:05d}.dcm", enforce_file_format=True)


# --------------------------------------------------------------------------------------------- running


def export_reference(rev: str, dest: Path) -> str:
    """``rev``'s appliance/ and models/ under ``dest`` (git archive: nothing in the repository changes)."""
    commit = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", rev], check=True, capture_output=True,
                            text=True).stdout.strip()
    tar = dest.with_suffix(".tar")
    with open(tar, "wb") as f:
        subprocess.run(["git", "-C", str(PROJECT_ROOT), "archive", "--format=tar", commit, "appliance", "models"],
                       check=True, stdout=f)
    dest.mkdir(parents=True)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    return commit


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def check_import(python: Path, code_root: Path, cwd: Path) -> None:
    """The child must run ``code_root``'s appliance, not the installed one."""
    r = subprocess.run([str(python), "-c", "import appliance; print(appliance.__file__)"], cwd=cwd,
                       env={**os.environ, "PYTHONPATH": str(code_root)}, capture_output=True, text=True, check=False)
    where = Path(r.stdout.strip() or "?").resolve()
    if not str(where).startswith(str(code_root.resolve())):
        raise BenchError(f"PYTHONPATH={code_root} imports appliance from {where}: cannot run that tree's code")


def run_infer(children: Children, python: Path, code_root: Path, folder: Path, out: Path, log: Path,
              config: Path | None, backend: str) -> dict[str, Any]:
    """One ``appliance infer`` of ``code_root``'s code; its peak memory (wait4, sampled /proc) and times.

    It runs in the work directory (its ./var), with ``code_root`` first on its path."""
    check_import(python, code_root, log.parent.parent)
    cmd = [str(python), "-m", "appliance"]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += ["infer", "--model", MODEL, "--backend", backend, "--quiet", "--out", str(out), str(folder)]
    env = {"PYTHONPATH": str(code_root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    env = {k: v for k, v in env.items() if v}
    t0 = time.perf_counter()
    proc = children.start(cmd, log, env=env, cwd=log.parent.parent)
    peaks: dict[str, int] = {}
    peak_at = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            st = _status(proc.pid)
            for k, v in st.items():
                if v > peaks.get(k, 0):
                    peaks[k] = v
                    if k == "VmRSS":
                        peak_at[0] = time.perf_counter() - t0
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    children.forget(proc)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise BenchError(f"appliance infer ({code_root}) on {folder.name} exited {code}: {log_tail(log, 1500)}")
    summary = json.loads((out / "summary.json").read_text())
    # VmHWM is the kernel's own high-water mark of the process since exec (sampled to the end: it only
    # grows). ru_maxrss is not used as the peak: Linux folds the forked, not yet exec'd copy of this
    # benchmark (phantom and all) into it.
    return {"exit": code, "wall_s": round(wall, 3), "peak_rss_bytes": peaks.get("VmHWM", peaks.get("VmRSS", 0)),
            "ru_maxrss_bytes": int(usage.ru_maxrss) * 1024, "peak_sampled": peaks, "peak_at_s": round(peak_at[0], 2), "timings_s": summary.get("timings_s", {}),
            "summary": {k: summary.get(k) for k in ("organs", "lesions", "labels")}}


def same_outputs(a: Path, b: Path) -> dict[str, bool]:
    la, lb = np.load(a / "labelmap.npz"), np.load(b / "labelmap.npz")
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    return {"labels": bool(np.array_equal(la["labels"], lb["labels"])),
            "sop_instance_uids": bool(np.array_equal(la["sop_instance_uids"], lb["sop_instance_uids"])),
            "measurements": all(sa.get(k) == sb.get(k) for k in ("labels", "organs", "lesions"))}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def gb(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1e9:.2f}"


def run(args: argparse.Namespace, children: Children, work: Path) -> tuple[int, list[str]]:
    started = dt.datetime.now(dt.timezone.utc)
    (work / "logs").mkdir()
    config = None
    if args.budget_mb is not None:
        config = work / "appliance.toml"
        config.write_text(f"[inference]\nmemory_budget_mb = {args.budget_mb}\n")
    ref_root = ref_commit = None
    if args.reference.lower() != "none":
        ref_root = work / "reference"
        ref_commit = export_reference(args.reference, ref_root)
        progress(f"reference: {args.reference} = {ref_commit[:12]} exported to {ref_root}")
    t = time.perf_counter()
    progress(f"rendering the {BASE_SLICES}x{args.size}^2 phantom (seed {args.seed})")
    base = render_base(args.size, args.seed)
    progress(f"rendered in {time.perf_counter() - t:.1f}s")

    results: list[dict[str, Any]] = []
    for n in args.slices:
        folder = work / f"series-{n}"
        t = time.perf_counter()
        write_thin_series(base, n, folder)
        progress(f"{n} slices written in {time.perf_counter() - t:.1f}s")
        rec: dict[str, Any] = {"slices": n, "slice_spacing_mm": round(BASE_SLICES * BASE_SPACING_MM / n, 4)}
        runs: dict[str, list[dict[str, Any]]] = {"new": [], "reference": []}
        with_ref = ref_root is not None and n <= args.reference_max_slices
        for rep in range(max(1, args.repeats)):
            runs["new"].append(run_infer(children, args.python, PROJECT_ROOT, folder, work / f"out-new-{n}",
                                         work / "logs" / f"new-{n}-{rep}.log", config, args.backend))
            progress(f"{n} slices, this tree: peak {gb(runs['new'][-1]['peak_rss_bytes'])} GB, "
                     f"{runs['new'][-1]['wall_s']:.1f}s")
            if with_ref:
                runs["reference"].append(run_infer(children, args.python, ref_root, folder, work / f"out-ref-{n}",
                                                   work / "logs" / f"ref-{n}-{rep}.log", None, args.backend))
                progress(f"{n} slices, reference: peak {gb(runs['reference'][-1]['peak_rss_bytes'])} GB, "
                         f"{runs['reference'][-1]['wall_s']:.1f}s")
        for who, got in runs.items():
            if got:
                best = dict(min(got, key=lambda r: r["wall_s"]))
                best["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in got)
                best["all_runs"] = [{"wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_bytes"]} for r in got]
                rec[who] = best
        if with_ref:
            rec["identical_to_reference"] = same_outputs(work / f"out-new-{n}", work / f"out-ref-{n}")
            progress(f"{n} slices: identical to the reference: {rec['identical_to_reference']}")
        for who in ("new", "reference"):
            if who in rec:
                r = rec[who]
                r["wall_per_slice_s"] = round(r["wall_s"] / n, 5)
                r["pipeline_per_slice_s"] = round(sum(r["timings_s"].values()) / n, 5)
        if not args.keep:
            for p in sorted(folder.iterdir()):
                p.unlink()
            folder.rmdir()
        results.append(rec)

    shortest = results[0]
    for rec in results:
        ref = rec.get("reference")
        rec["ratios"] = {
            "peak_vs_reference": ratio(rec["new"]["peak_rss_bytes"], ref["peak_rss_bytes"]) if ref else None,
            "wall_per_slice_vs_reference": ratio(rec["new"]["wall_per_slice_s"], ref["wall_per_slice_s"]) if ref else None,
            "peak_vs_shortest": ratio(rec["new"]["peak_rss_bytes"], shortest["new"]["peak_rss_bytes"]),
            "wall_per_slice_vs_shortest": ratio(rec["new"]["wall_per_slice_s"], shortest["new"]["wall_per_slice_s"]),
        }
    peak_ok = all(r["new"]["peak_rss_bytes"] <= PEAK_GOAL_BYTES for r in results)
    time_ratios = [r["ratios"]["wall_per_slice_vs_reference"] for r in results
                   if r["ratios"]["wall_per_slice_vs_reference"] is not None]
    time_ok = all(x <= TIME_GOAL_RATIO for x in time_ratios) if time_ratios else None
    identical = all(all(r["identical_to_reference"].values()) for r in results if "identical_to_reference" in r)
    report = {
        "benchmark": "memory",
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"slices": args.slices, "repeats": args.repeats, "size": args.size, "seed": args.seed, "model": MODEL,
                     "backend": args.backend, "budget_mb": args.budget_mb, "reference": args.reference,
                     "reference_commit": ref_commit, "reference_max_slices": args.reference_max_slices,
                     "series": f"bench_e2e's phantom ({BASE_SLICES} x 1 mm), resliced to n slices of 300/n mm",
                     "peak": "VmHWM of the appliance infer child, sampled every 10 ms until exit; RssAnon/RssFile peaks sampled too"},
        "host": host_info(PROJECT_ROOT / ".venv" / "bin" / "appliance", "storescu", "Orthanc"),
        "goals": {"peak_rss_bytes": PEAK_GOAL_BYTES, "peak_met": peak_ok,
                  "wall_per_slice_ratio": TIME_GOAL_RATIO, "time_met": time_ok,
                  "identical_to_reference": identical},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    progress(f"wrote {args.out}")

    out = [f"appliance infer ({MODEL}, {args.backend}) on thin-slice synthetic CT, {args.size}x{args.size}; "
           f"peak = VmHWM of the child; reference = {args.reference} ({(ref_commit or 'none')[:12]})"]
    out.append(f"{'slices':>6} {'peak GB':>8} {'anon GB':>8} {'s/slice':>8} {'ref peak':>8} {'ref s/sl':>8} "
               f"{'peak x':>7} {'time x':>7}  identical  stages per slice (ms)")
    for r in results:
        new, ref, q = r["new"], r.get("reference"), r["ratios"]
        stages = ", ".join(f"{k} {1000 * v / r['slices']:.1f}" for k, v in new["timings_s"].items())
        ident = "-" if "identical_to_reference" not in r else ("yes" if all(r["identical_to_reference"].values())
                                                                 else f"NO {r['identical_to_reference']}")
        ref_peak = gb(ref["peak_rss_bytes"]) if ref else "-"
        ref_sps = f"{ref['wall_per_slice_s']:.4f}" if ref else "-"
        peak_x = fmt(q["peak_vs_reference"], 2) if ref else "-"
        time_x = fmt(q["wall_per_slice_vs_reference"], 2) if ref else "-"
        out.append(f"{r['slices']:>6} {gb(new['peak_rss_bytes']):>8} {gb(new['peak_sampled'].get('RssAnon')):>8} "
                   f"{new['wall_per_slice_s']:>8.4f} {ref_peak:>8} {ref_sps:>8} {peak_x:>7} {time_x:>7}  "
                   f"{ident:<9}  {stages}")
    out.append("against the shortest series (this tree): " + ", ".join(
        f"{r['slices']}: peak x{fmt(r['ratios']['peak_vs_shortest'], 2)}, s/slice x{fmt(r['ratios']['wall_per_slice_vs_shortest'], 2)}"
        for r in results))
    out.append(f"goal: peak <= {PEAK_GOAL_BYTES / 1e9:.1f} GB at every length: {'met' if peak_ok else 'NOT met'}; "
               f"time per slice <= {TIME_GOAL_RATIO:.2f}x the reference: "
               f"{'n/a' if time_ok is None else ('met' if time_ok else 'NOT met')}; identical results: "
               f"{'yes' if identical else 'NO'}")
    return (0 if identical else 1), out


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench_memory", parse_args(argv), Children(), run, "stopping appliance infer")


if __name__ == "__main__":
    sys.exit(main())
